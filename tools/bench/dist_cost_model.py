"""Predicted scaling of data-parallel training past one machine, from figures measured on one
machine: the step time of N nodes is the compute of one node's share of the batch plus the
part of a ring all-reduce of the gradients that computation does not hide,

    T(N) = T_compute + max(0, T_ring(N) - hidden),
    T_ring(N) = 2 (N - 1) / N * bytes / bandwidth + 2 (N - 1) * latency * buckets,

(a ring all-reduce sends and receives 2 (N - 1) / N of the buffer per rank, in 2 (N - 1)
steps per bucket), and the scaling efficiency is T_compute / T(N) (weak scaling: every node
keeps its batch, the global batch grows with N). Two bounds: no overlap (hidden = 0), and
overlap with the backward pass after the first bucket is complete (hidden = the backward
share of the step, 2/3 of the compute, as backward costs twice the forward pass).

    python3 tools/bench/dist_cost_model.py          # the table of docs/distributed.md

The defaults are this repository's measurements (docs/distributed.md says how each was
made): per-node step compute at 2 threads, gradient bytes from the parameter counts, and
per-link bandwidth taken as 90% of the line rate with a per-step latency typical of MPI over
that link.
"""

import argparse

# Parameters (float32 gradients) and measured compute per node step (2 cores, 2 threads,
# `convnet bench --threads 2`), with the per-node batch used.
MODELS = {
    # name: (parameters, per-node batch, seconds of compute per step, buckets at 25 MiB)
    "resnet20": (269_722, 128, 0.208, 2),
    "resnet50": (25_557_032, 32, 4.72, 5),
}
# Link: (line rate in Gbit/s, latency per ring step in seconds).
LINKS = {"10 Gb/s": (10, 30e-6), "25 Gb/s": (25, 20e-6), "100 Gb/s": (100, 5e-6)}
NODES = [2, 4, 8, 16, 32, 64]


def ring_seconds(n, nbytes, gbit, latency, buckets):
    bandwidth = 0.9 * gbit * 1e9 / 8
    return 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * latency * buckets


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, (params, batch, secs, buckets) in MODELS.items():
        p.add_argument(f"--{name}-step", type=float, default=secs, help=f"{name}: compute seconds per node step (batch {batch})")
    p.add_argument("--speedups", default="1,10,100",
                   help="nodes this many times faster than the measured one (a many-core server, a GPU)")
    a = p.parse_args()
    for name, (params, batch, secs, buckets) in MODELS.items():
        nbytes = 4 * params
        for speedup in map(float, a.speedups.split(",")):
            compute = getattr(a, f"{name.replace('-', '_')}_step") / speedup
            print(f"\n{name}, node {speedup:g}x the measured one: {nbytes / 2**20:.1f} MiB of gradients, "
                  f"{compute * 1e3:.1f} ms of compute per step (batch {batch} per node)\n")
            print("| link | " + " | ".join(f"N={n}" for n in NODES) + " |")
            print("|---|" + "---|" * len(NODES))
            for link, (gbit, latency) in LINKS.items():
                cells = []
                for n in NODES:
                    ring = ring_seconds(n, nbytes, gbit, latency, buckets)
                    serial = compute / (compute + ring)
                    hidden = 2.0 / 3.0 * compute
                    overlapped = compute / (compute + max(0.0, ring - hidden))
                    cells.append(f"{100 * serial:.0f}% / {100 * overlapped:.0f}%")
                print(f"| {link} | " + " | ".join(cells) + " |")
    print("\ncells: scaling efficiency without overlap / with the all-reduce overlapping the backward pass")


if __name__ == "__main__":
    main()

"""Data-parallel scaling of `convnet bench` under MPI on one machine: for each model and
global batch, in one run and alternating so that machine noise hits every configuration
alike, the training step's images/s of

  1p x 1t    one process, 1 compute thread
  1p x 2t    one process, 2 compute threads
  2r shm     mpirun -np 2, 1 thread per rank, shared memory between the ranks
  2r tcp     mpirun -np 2 --mca btl tcp,self, 1 thread per rank, TCP only (as between nodes)
  2r serial  like 2r shm with --no-overlap: gradients reduced only after backward

and the communication time not hidden by computation (the rank-0 report of
`convnet bench`). Prints a markdown table of medians over the rounds and the ratios the
distributed-training bars are stated in. Dev-time only; needs a convnet built with
`--features mpi` and Open MPI's mpirun.

    cargo build --release -p convnet-cli --features mpi
    python3 tools/bench/dist_scaling.py --rounds 5
"""

import argparse
import json
import os
import statistics
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
MPIRUN = ["mpirun", "--oversubscribe"]
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def configs(binary):
    return {
        "1p x 1t": ([binary], ["--threads", "1"]),
        "1p x 2t": ([binary], ["--threads", "2"]),
        "2r shm": (MPIRUN + ["-np", "2", binary], ["--threads", "1"]),
        "2r tcp": (MPIRUN + ["--mca", "btl", "tcp,self", "-np", "2", binary], ["--threads", "1"]),
        "2r serial": (MPIRUN + ["-np", "2", binary], ["--threads", "1", "--no-overlap"]),
    }


def bench(prefix, extra, model, batch, steps, warmup, bucket_mb):
    cmd = prefix + ["bench", "--model", model, "--batch-size", str(batch), "--steps", str(steps),
                    "--warmup", str(warmup), "--bucket-mb", str(bucket_mb), "--json"] + extra
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "convnet"))
    p.add_argument("--models", default="seed-cnn,resnet20")
    p.add_argument("--batches", default="64,128")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--configs", default=None, help="comma-separated subset of the configurations")
    a = p.parse_args()
    cfgs = configs(a.binary)
    names = a.configs.split(",") if a.configs else list(cfgs)
    rows = []
    for model in a.models.split(","):
        for batch in map(int, a.batches.split(",")):
            ips = {n: [] for n in names}
            comm = {n: [] for n in names}
            for _ in range(a.rounds):
                for n in names:
                    r = bench(*cfgs[n], model, batch, a.steps, a.warmup, a.bucket_mb)
                    ips[n].append(r["images_per_sec"])
                    comm[n].append(r.get("comm_exposed_ms", 0.0))
            med = {n: statistics.median(v) for n, v in ips.items()}
            rows.append((model, batch, med, {n: statistics.median(v) for n, v in comm.items()}))
            print(f"{model} b{batch}: " + ", ".join(f"{n} {med[n]:.0f}" for n in names), flush=True)
    print()
    print("| model, global batch | " + " | ".join(names) + " | 2r/1t | 2r/2t | tcp/1t | overlap gain |")
    print("|---|" + "---|" * (len(names) + 4))
    for model, batch, med, comm in rows:
        def ratio(a_, b_):
            return f"{med[a_] / med[b_]:.2f}x" if a_ in med and b_ in med else "-"
        cells = [f"{med[n]:.0f}" + (f" ({comm[n]:.2f} ms)" if comm[n] else "") for n in names]
        gain = ratio("2r shm", "2r serial")
        print(f"| {model} b{batch} | " + " | ".join(cells) + f" | {ratio('2r shm', '1p x 1t')} | {ratio('2r shm', '1p x 2t')} | {ratio('2r tcp', '1p x 1t')} | {gain} |")
    print("\nimages/s, median of", a.rounds, "alternating rounds; in brackets: communication not hidden by computation, ms per step (rank 0)")


if __name__ == "__main__":
    main()

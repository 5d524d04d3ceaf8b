"""Side-by-side CPU benchmark: convnet against PyTorch (eager, channels-last, torch.compile)
on the same models, batch sizes and thread counts, in one run, alternating the frameworks so
that machine noise hits them alike. Dev-time only (needs torch).

    python tools/bench/compare.py                      # full grid, 3 rounds -> markdown table
    python tools/bench/compare.py --models seed-cnn --batches 64 --threads 2 --rounds 5
    python tools/bench/compare.py --compile            # add torch.compile (slow to compile)

Each measurement runs in its own process: warm-up steps, then the median of timed steps of
the real training step (forward, cross-entropy, backward, SGD momentum 0.9) or of inference
(eval mode, no autograd). Reported: images/s (median over rounds), convnet/PyTorch ratios
and peak RSS. The table is headed by the machine's class and float32 multiply-add peak as
`convnet bench --machine` measures them.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))


def torch_worker(args):
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(ROOT, "tools", "fixtures"))
    import torch_zoo

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torch_zoo.build(args.model, 10, (3, args.size, args.size))
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    if args.variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if args.variant == "compile" else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if args.mode == "infer":
        model.eval()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        if args.mode == "train":
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(step_model(x), y).backward()
            opt.step()
        else:
            with torch.no_grad():
                step_model(x)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    with open("/proc/self/status") as f:
        rss = next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
    print(json.dumps(dict(images_per_sec=args.batch / med, peak_rss_mib=rss)))


def run(cmd, env=None):
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["torch"])
    ap.add_argument("--model", default="seed-cnn")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--sizes", default="32", help="image sizes (same architecture), for the cost curve")
    ap.add_argument("--mode", default="train")
    ap.add_argument("--variant", default="eager")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--models", default="seed-cnn,resnet20")
    ap.add_argument("--batches", default="16,64,128,256")
    ap.add_argument("--thread-counts", default="1,2")
    ap.add_argument("--modes", default="train,infer")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--convnet", default=os.path.join(ROOT, "target", "release", "convnet"))
    args = ap.parse_args()
    if args.worker == "torch":
        return torch_worker(args)

    # The machine first: its class and float32 multiply-add peak, so that figures from
    # different machines are not compared as if they were one.
    machine = run([args.convnet, "bench", "--machine", "--threads", str(max(int(t) for t in args.thread_counts.split(","))), "--json"])
    peaks = ", ".join(f"{p['gflops']:.0f} GFLOP/s on {p['threads']} thread(s)" for p in machine["peak_avx512"] or machine["peak_avx2"])
    print(f"Machine: {machine['cpu']}, {machine['class']} (float32 FMA peak {peaks})\n")

    configs = []
    for model in args.models.split(","):
        for mode in args.modes.split(","):
            for batch in [int(b) for b in args.batches.split(",")]:
                for threads in [int(t) for t in args.thread_counts.split(",")]:
                    for size in [int(s) for s in args.sizes.split(",")]:
                        configs.append((model, mode, batch, threads, size))
    variants = ["eager", "channels_last"] + (["compile"] if args.compile else [])
    results = {}
    for rnd in range(args.rounds):
        for model, mode, batch, threads, size in configs:
            steps = str(max(5, min(args.steps, int(3000 * 1024 / (batch * size * size)))))
            runs = [("convnet", [args.convnet, "bench", "--model", model, "--batch-size", str(batch), "--threads", str(threads),
                                 "--mode", mode, "--steps", steps, "--input", f"3x{size}x{size}", "--json"])]
            for v in variants:
                if v == "channels_last" and model == "seed-cnn":
                    continue
                runs.append((f"torch-{v}", [sys.executable, __file__, "--worker", "torch", "--model", model, "--batch", str(batch),
                                             "--threads", str(threads), "--mode", mode, "--variant", v, "--steps", steps, "--size", str(size)]))
            if rnd % 2:
                runs.reverse()
            for name, cmd in runs:
                r = run(cmd)
                results.setdefault((model, mode, batch, threads, size, name), []).append(r)
                print(f"round {rnd + 1}: {model} {mode} b{batch} t{threads} {size}px {name}: {r['images_per_sec']:.0f} img/s", file=sys.stderr, flush=True)

    def med(key, field="images_per_sec"):
        v = results.get(key)
        return statistics.median(r[field] for r in v) if v else None

    print(f"| model | mode | batch | threads | image | convnet img/s | PyTorch eager | channels-last | {'compiled | ' if args.compile else ''}ratio vs eager | ratio vs best torch | RSS convnet / torch (MiB) |")
    print(f"|---|---|---|---|---|---|---|---|{'---|' if args.compile else ''}---|---|---|")
    for model, mode, batch, threads, size in configs:
        k = (model, mode, batch, threads, size)
        c = med(k + ("convnet",))
        e = med(k + ("torch-eager",))
        cl = med(k + ("torch-channels_last",))
        co = med(k + ("torch-compile",))
        best = max(v for v in [e, cl, co] if v)
        fmt = lambda v: f"{v:.0f}" if v else "—"
        rc, rt = med(k + ("convnet",), "peak_rss_mib"), med(k + ("torch-eager",), "peak_rss_mib")
        print(f"| {model} | {mode} | {batch} | {threads} | {size} | {fmt(c)} | {fmt(e)} | {fmt(cl)} | {fmt(co) + ' | ' if args.compile else ''}{c / e:.2f}x | {c / best:.2f}x | {rc:.0f} / {rt:.0f} |")


if __name__ == "__main__":
    main()

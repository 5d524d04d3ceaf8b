"""Text-CNN speed: convnet against PyTorch eager on the same model, batch, sequence length
and thread count, in one run, alternating the two so that machine noise hits them alike.
Dev-time only (needs torch).

The model is the `text-cnn` zoo model (Kim 2014): nn.Embedding(vocab, 128, padding_idx=0)
with dense gradients, permute to [N, 128, L], nn.Conv1d widths 3/4/5 x 100 maps (an
nn.ModuleList), ReLU, max over time (amax), concatenation, dropout 0.5, nn.Linear(300, C).
Inputs are random token ids in 1..vocab. A training step is forward, cross-entropy,
backward and the optimizer step (SGD momentum 0.9, or Adam); inference is eval mode under
no_grad. convnet runs as `convnet/examples/text_cnn_speed.rs` (its training loop:
DataLoader + Trainer), PyTorch in a worker process of this script; each measurement is the
median of timed steps after warm-up steps, each figure in the table the median over rounds.

    cargo build --release -p convnet --example text_cnn_speed
    python tools/bench/text_cnn_peers.py                      # len 200 and 400, 5 rounds
    python tools/bench/text_cnn_peers.py --lens 200 --rounds 3 --cases train-sgd
    python tools/bench/text_cnn_peers.py --baseline OLD_EXAMPLE   # and an older build of it
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
CASES = ["train-sgd", "train-adam", "infer-b64", "infer-b1"]


def torch_worker(args):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    class TextCnn(nn.Module):
        def __init__(self, vocab, classes, dim=128, maps=100, widths=(3, 4, 5)):
            super().__init__()
            self.embedding = nn.Embedding(vocab, dim, padding_idx=0)
            self.convs = nn.ModuleList(nn.Conv1d(dim, maps, k) for k in widths)
            self.dropout = nn.Dropout(0.5)
            self.fc = nn.Linear(maps * len(widths), classes)

        def forward(self, ids):
            x = self.embedding(ids).permute(0, 2, 1)
            x = torch.cat([F.relu(conv(x)).amax(2) for conv in self.convs], 1)
            return self.fc(self.dropout(x))

    model = TextCnn(args.vocab, args.classes)
    steps = args.warmup + args.steps
    if args.mode == "train":
        # A fresh batch every step, as a data loader gives.
        xs = torch.randint(1, args.vocab, (steps, args.batch, args.len))
        ys = torch.randint(0, args.classes, (steps, args.batch))
        if args.optimizer == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        model.train()
    else:
        x = torch.randint(1, args.vocab, (args.batch, args.len))
        model.eval()
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        if args.mode == "train":
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xs[i]), ys[i]).backward()
            opt.step()
        else:
            with torch.no_grad():
                model(x)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(json.dumps(dict(framework="torch", step_ms=med * 1e3, examples_per_sec=args.batch / med)))


def run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def case_settings(case, steps):
    """(mode, optimizer, batch, steps) of a case."""
    if case.startswith("train"):
        return "train", case.split("-")[1], 64, steps
    batch = int(case.split("-b")[1])
    return "infer", "sgd", batch, steps * 4 if batch == 1 else steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["torch"])
    ap.add_argument("--mode", default="train")
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--len", type=int, default=200)
    ap.add_argument("--lens", default="200,400")
    ap.add_argument("--vocab", type=int, default=20000)
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--example", default=os.path.join(ROOT, "target", "release", "examples", "text_cnn_speed"))
    ap.add_argument("--baseline", help="an older build of the example, timed in the same rounds")
    ap.add_argument("--convnet", default=os.path.join(ROOT, "target", "release", "convnet"))
    args = ap.parse_args()
    if args.worker == "torch":
        return torch_worker(args)

    import torch

    if os.path.exists(args.convnet):
        machine = run([args.convnet, "bench", "--machine", "--threads", str(args.threads), "--json"])
        peaks = ", ".join(f"{p['gflops']:.0f} GFLOP/s on {p['threads']} thread(s)" for p in machine["peak_avx512"] or machine["peak_avx2"])
        print(f"Machine: {machine['cpu']}, {machine['class']} (float32 FMA peak {peaks})\n")

    configs = [(case, length) for length in (int(v) for v in args.lens.split(",")) for case in args.cases.split(",")]
    results = {}
    for rnd in range(args.rounds):
        for case, length in configs:
            mode, optimizer, batch, steps = case_settings(case, args.steps)
            common = ["--mode", mode, "--optimizer", optimizer, "--batch", str(batch), "--len", str(length),
                      "--vocab", str(args.vocab), "--classes", str(args.classes), "--threads", str(args.threads),
                      "--warmup", str(args.warmup), "--steps", str(steps)]
            runs = [("convnet", [args.example] + common),
                    ("torch", [sys.executable, __file__, "--worker", "torch"] + common)]
            if args.baseline:
                runs.insert(1, ("baseline", [args.baseline] + common))
            if rnd % 2:
                runs.reverse()
            for name, cmd in runs:
                r = run(cmd)
                results.setdefault((case, length, name), []).append(r["examples_per_sec"])
                print(f"round {rnd + 1}: {case} len {length} {name}: {r['examples_per_sec']:.0f} examples/s",
                      file=sys.stderr, flush=True)

    print(f"text-cnn, vocabulary {args.vocab}, {args.classes} classes, {args.threads} threads, "
          f"PyTorch {torch.__version__} eager; medians of {args.rounds} alternating rounds (examples/s)\n")
    base = " convnet before | ratio before |" if args.baseline else ""
    print(f"| case | length |{base} convnet | PyTorch eager | ratio |")
    print("|---|---|" + ("---|---|" if args.baseline else "") + "---|---|---|")
    for case, length in configs:
        c = statistics.median(results[(case, length, "convnet")])
        t = statistics.median(results[(case, length, "torch")])
        old = ""
        if args.baseline:
            b = statistics.median(results[(case, length, "baseline")])
            old = f" {b:.0f} | {b / t:.2f}x |"
        print(f"| {case} | {length} |{old} {c:.0f} | {t:.0f} | {c / t:.2f}x |")


if __name__ == "__main__":
    main()

"""Side-by-side CPU benchmark: convnet against PyTorch (eager, channels-last, torch.compile,
CPU autocast bf16) and TensorFlow/Keras on the same models, batch sizes and thread counts, in
one run, alternating the frameworks so that machine noise hits them alike. Dev-time only
(needs torch; TensorFlow lives in an interpreter of its own, see --tf-python).

    python tools/bench/compare.py                      # full grid, 3 rounds -> markdown table
    python tools/bench/compare.py --models seed-cnn --batches 64 --thread-counts 2 --rounds 5
    python tools/bench/compare.py --compile            # add torch.compile (slow to compile)
    python tools/bench/compare.py --bf16               # add convnet --precision bf16 and torch autocast bf16
    python tools/bench/compare.py --tf --tf-python /path/to/tf-venv/bin/python   # add TensorFlow/Keras
    CONVNET_TF_PYTHON=/path/to/tf-venv/bin/python python tools/bench/compare.py --tf

`python` here is an interpreter with torch and torchvision; the TensorFlow peer is launched
with --tf-python (default: $CONVNET_TF_PYTHON; without either, --tf is skipped with a note),
an interpreter with `tensorflow` (Keras 3) installed, e.g. a venv made by
`python3.11 -m venv VENV && VENV/bin/pip install tensorflow`.

Each measurement runs in its own process: warm-up steps, then the median of timed steps of
the real training step (forward, cross-entropy, backward, SGD lr 0.01 momentum 0.9) or of
inference (eval mode, no autograd). The columns:

- convnet fp32: `convnet bench`; convnet bf16 (--bf16): the same with `--precision bf16`,
  shown as "—" when the binary rejects it (or fails);
- PyTorch eager, channels-last (not for seed-cnn), torch.compile (--compile), and autocast
  bf16 (--bf16): eager with `torch.autocast("cpu", dtype=torch.bfloat16)` around forward and
  loss, backward outside it;
- TF/Keras (--tf): Keras 3 twins of tools/fixtures/torch_zoo.py's models in NHWC (same
  layers, strides, padding, BatchNorm eps 1e-5 and momentum, option-A shortcuts), trained by
  a GradientTape step with SGD momentum 0.9 and sparse categorical cross-entropy from logits,
  inference as `model(x, training=False)`, both inside `tf.function`. Both graph mode
  (jit_compile=False) and XLA (jit_compile=True) are measured; the column shows the faster
  of the two medians, marked "xla" when XLA won (--tf-jit graph|xla measures only one).
  intra-op threads = the thread count, inter-op threads 1. The worker reports the Keras
  model's trainable parameter count and the table's run warns if it differs from PyTorch's.

Every figure is images/s (median over rounds) followed by the achieved share of the machine's
float32 multiply-add peak on that many threads: FLOPs per image are convnet's count for the
model and mode (`mflop_per_image` of its bench JSON), so every column is measured against
the same work; bf16 columns are also given against the fp32 peak (and may pass 100% on
machines with bf16 matrix units). Ratios: convnet fp32 against PyTorch eager and against the
best fp32 peer (the fastest of eager, channels-last, compiled and TF/Keras); with --bf16,
convnet bf16 against autocast bf16 and against convnet fp32. Then peak RSS. The table is
headed by the machine's class and float32 multiply-add peak as `convnet bench --machine`
measures them.
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


def peak_rss_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024


def torch_worker(args):
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(ROOT, "tools", "fixtures"))
    import torch_zoo

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torch_zoo.build(args.model, 10, (3, args.size, args.size))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    if args.variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if args.variant == "compile" else model
    if args.variant == "autocast_bf16":
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        import contextlib
        autocast = contextlib.nullcontext
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if args.mode == "infer":
        model.eval()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        if args.mode == "train":
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = F.cross_entropy(step_model(x), y)
            loss.backward()
            opt.step()
        else:
            with torch.no_grad(), autocast():
                step_model(x)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    print(json.dumps(dict(images_per_sec=args.batch / med, peak_rss_mib=peak_rss_mib(), params=params)))


def keras_model(name, size, num_classes=10):
    """Keras 3 twin (NHWC) of torch_zoo.build(name, num_classes, (3, size, size))."""
    import keras
    from keras import layers

    inp = keras.Input((size, size, 3))
    if name == "seed-cnn":
        x = layers.Conv2D(32, 3, padding="same", activation="relu")(inp)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Flatten()(x)
        x = layers.Dense(128, activation="relu")(x)
        return keras.Model(inp, layers.Dense(num_classes)(x))
    depth = {"resnet20": 3, "resnet32": 5, "resnet56": 9}.get(name)
    if depth is None:
        raise SystemExit(f"no Keras twin of {name}")

    class PadShortcut(layers.Layer):
        """Option A: subsample by 2 and add zero channels on both sides."""

        def __init__(self, before, after, **kw):
            super().__init__(**kw)
            self.before, self.after = before, after

        def call(self, x):
            return keras.ops.pad(x[:, ::2, ::2, :], [[0, 0], [0, 0], [0, 0], [self.before, self.after]])

    def conv3(x, planes, stride):
        # PyTorch's padding=1 pads both sides; "same" with stride 2 would pad only bottom/right.
        if stride == 1:
            return layers.Conv2D(planes, 3, padding="same", use_bias=False)(x)
        x = layers.ZeroPadding2D(1)(x)
        return layers.Conv2D(planes, 3, strides=stride, padding="valid", use_bias=False)(x)

    bn = lambda x: layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)
    x = layers.ReLU()(bn(conv3(inp, 16, 1)))
    inp_planes = 16
    for stage, planes in enumerate([16, 32, 64]):
        for b in range(depth):
            stride = 2 if stage > 0 and b == 0 else 1
            out = layers.ReLU()(bn(conv3(x, planes, stride)))
            out = bn(conv3(out, planes, 1))
            extra = planes - inp_planes
            short = PadShortcut(extra // 2, extra - extra // 2)(x) if stride != 1 or inp_planes != planes else x
            x = layers.ReLU()(layers.Add()([out, short]))
            inp_planes = planes
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, layers.Dense(num_classes)(x))


def tf_worker(args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf
    import keras

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(0)
    model = keras_model(args.model, args.size)
    params = int(sum(np.prod(v.shape) for v in model.trainable_weights))
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((args.batch, args.size, args.size, 3), dtype=np.float32))
    y = tf.constant(rng.integers(0, 10, args.batch), dtype=tf.int32)
    opt = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    jit = args.variant == "xla"

    @tf.function(jit_compile=jit)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function(jit_compile=jit)
    def infer_step(x):
        return model(x, training=False)

    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        if args.mode == "train":
            train_step(x, y).numpy()
        else:
            infer_step(x).numpy()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    print(json.dumps(dict(images_per_sec=args.batch / med, peak_rss_mib=peak_rss_mib(), params=params,
                          tf_version=tf.__version__, keras_version=keras.__version__)))


def run(cmd, env=None):
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def try_run(cmd):
    """run(), but a failure (nonzero exit, no JSON) is reported on stderr and gives None."""
    try:
        return run(cmd)
    except (RuntimeError, ValueError, IndexError) as e:
        print(f"missing: {e}".rstrip(), file=sys.stderr, flush=True)
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["torch", "tf"])
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
    ap.add_argument("--bf16", action="store_true", help="add convnet --precision bf16 and PyTorch CPU autocast bf16")
    ap.add_argument("--tf", action="store_true", help="add TensorFlow/Keras (needs --tf-python or $CONVNET_TF_PYTHON)")
    ap.add_argument("--tf-python", default=os.environ.get("CONVNET_TF_PYTHON"), help="interpreter with tensorflow installed")
    ap.add_argument("--tf-jit", choices=["both", "graph", "xla"], default="both",
                    help="TF variants to measure: tf.function graph mode, XLA (jit_compile=True), or both (the faster is shown)")
    ap.add_argument("--convnet", default=os.path.join(ROOT, "target", "release", "convnet"))
    args = ap.parse_args()
    if args.worker == "torch":
        return torch_worker(args)
    if args.worker == "tf":
        return tf_worker(args)
    if args.tf and not args.tf_python:
        print("TensorFlow skipped: give --tf-python PATH or set CONVNET_TF_PYTHON to an interpreter with tensorflow\n", file=sys.stderr)
        args.tf = False

    # The machine first: its class and float32 multiply-add peak, so that figures from
    # different machines are not compared as if they were one.
    thread_counts = [int(t) for t in args.thread_counts.split(",")]
    machine = run([args.convnet, "bench", "--machine", "--threads", str(max(thread_counts)), "--json"])
    peak_list = lambda m: m["peak_avx512"] or m["peak_avx2"]
    peak = {p["threads"]: p["gflops"] for p in peak_list(machine)}
    for t in thread_counts:
        if t not in peak:
            peak.update({p["threads"]: p["gflops"] for p in peak_list(run([args.convnet, "bench", "--machine", "--threads", str(t), "--json"]))})
    peaks = ", ".join(f"{g:.0f} GFLOP/s on {t} thread(s)" for t, g in sorted(peak.items()))
    print(f"Machine: {machine['cpu']}, {machine['class']} (float32 FMA peak {peaks})\n")

    configs = []
    for model in args.models.split(","):
        for mode in args.modes.split(","):
            for batch in [int(b) for b in args.batches.split(",")]:
                for threads in thread_counts:
                    for size in [int(s) for s in args.sizes.split(",")]:
                        configs.append((model, mode, batch, threads, size))
    variants = ["eager", "channels_last"] + (["compile"] if args.compile else []) + (["autocast_bf16"] if args.bf16 else [])
    tf_variants = ([] if not args.tf else ["graph", "xla"] if args.tf_jit == "both" else [args.tf_jit])
    results, failed = {}, set()
    for rnd in range(args.rounds):
        for model, mode, batch, threads, size in configs:
            k = (model, mode, batch, threads, size)
            steps = str(max(5, min(args.steps, int(3000 * 1024 / (batch * size * size)))))
            convnet = [args.convnet, "bench", "--model", model, "--batch-size", str(batch), "--threads", str(threads),
                       "--mode", mode, "--steps", steps, "--input", f"3x{size}x{size}", "--json"]
            runs = [("convnet", convnet, True)]
            if args.bf16:
                runs.append(("convnet-bf16", convnet + ["--precision", "bf16"], False))
            for v in variants:
                if v == "channels_last" and model == "seed-cnn":
                    continue
                runs.append((f"torch-{v}", [sys.executable, __file__, "--worker", "torch", "--model", model, "--batch", str(batch),
                                            "--threads", str(threads), "--mode", mode, "--variant", v, "--steps", steps, "--size", str(size)], True))
            for v in tf_variants:
                runs.append((f"tf-{v}", [args.tf_python, __file__, "--worker", "tf", "--model", model, "--batch", str(batch),
                                         "--threads", str(threads), "--mode", mode, "--variant", v, "--steps", steps, "--size", str(size)], False))
            if rnd % 2:
                runs.reverse()
            for name, cmd, required in runs:
                if k + (name,) in failed:
                    continue
                r = run(cmd) if required else try_run(cmd)
                if r is None:
                    failed.add(k + (name,))
                    print(f"round {rnd + 1}: {model} {mode} b{batch} t{threads} {size}px {name}: missing (not retried)", file=sys.stderr, flush=True)
                    continue
                results.setdefault(k + (name,), []).append(r)
                print(f"round {rnd + 1}: {model} {mode} b{batch} t{threads} {size}px {name}: {r['images_per_sec']:.0f} img/s", file=sys.stderr, flush=True)

    def med(key, field="images_per_sec"):
        v = [r[field] for r in results.get(key, []) if field in r]
        return statistics.median(v) if v else None

    head = ["model", "mode", "batch", "threads", "image", "convnet fp32"] + (["convnet bf16"] if args.bf16 else []) + \
        ["PyTorch eager", "channels-last"] + (["compiled"] if args.compile else []) + (["autocast bf16"] if args.bf16 else []) + \
        (["TF/Keras"] if args.tf else []) + ["ratio vs eager", "ratio vs best fp32 peer"] + \
        (["bf16: convnet vs autocast", "convnet bf16 vs fp32"] if args.bf16 else []) + \
        [f"RSS convnet / torch{' / TF' if args.tf else ''} (MiB)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    warnings = []
    for model, mode, batch, threads, size in configs:
        k = (model, mode, batch, threads, size)
        c = med(k + ("convnet",))
        flops = med(k + ("convnet",), "mflop_per_image")
        if flops is None and med(k + ("convnet",), "gflops"):
            flops = med(k + ("convnet",), "gflops") * 1e3 / c
        p = peak.get(threads)

        def fmt(v, note=""):
            if not v:
                return "—"
            share = f" ({v * flops * 1e6 / (p * 1e9):.0%})" if flops and p else ""
            return f"{v:.0f}{share}{note}"

        ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "—"
        cb = med(k + ("convnet-bf16",))
        e, cl, co, ab = (med(k + (f"torch-{v}",)) for v in ["eager", "channels_last", "compile", "autocast_bf16"])
        tg, tx = med(k + ("tf-graph",)), med(k + ("tf-xla",))
        tf_best, tf_note = (tx, " xla") if tx and (not tg or tx > tg) else (tg, "")
        best = max(v for v in [e, cl, co, tf_best] if v)
        rss = [med(k + ("convnet",), "peak_rss_mib"), med(k + ("torch-eager",), "peak_rss_mib")]
        if args.tf:
            rss.append(med(k + ("tf-xla" if tf_note else "tf-graph",), "peak_rss_mib"))
        row = [model, mode, str(batch), str(threads), str(size), fmt(c)] + ([fmt(cb)] if args.bf16 else []) + \
            [fmt(e), fmt(cl)] + ([fmt(co)] if args.compile else []) + ([fmt(ab)] if args.bf16 else []) + \
            ([fmt(tf_best, tf_note)] if args.tf else []) + [ratio(c, e), ratio(c, best)] + \
            ([ratio(cb, ab), ratio(cb, c)] if args.bf16 else []) + [" / ".join(f"{v:.0f}" if v else "—" for v in rss)]
        print("| " + " | ".join(row) + " |")
        tp = med(k + ("torch-eager",), "params")
        for v in tf_variants:
            kp = med(k + (f"tf-{v}",), "params")
            if kp is not None and tp is not None and kp != tp:
                warnings.append(f"warning: {model} {size}px: Keras model has {kp:.0f} trainable parameters, PyTorch {tp:.0f}")
    versions = {(r["tf_version"], r["keras_version"]) for key, rs in results.items() if key[-1].startswith("tf-") for r in rs}
    for tf_version, keras_version in sorted(versions):
        print(f"\nTF/Keras: TensorFlow {tf_version}, Keras {keras_version}")
    for w in dict.fromkeys(warnings):
        print(w, file=sys.stderr)


if __name__ == "__main__":
    main()

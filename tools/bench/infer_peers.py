"""CPU inference speed of convnet's pretrained CIFAR models against other frameworks (PyTorch
eager / torch.compile / int8, ONNX Runtime fp32 / int8, convnet fp32 / int8), in one run,
alternating the frameworks round by round so that machine noise hits them alike. Dev-time only
(needs the packages in requirements-infer.txt).

    python tools/bench/infer_peers.py                                  # full grid, 3 rounds
    python tools/bench/infer_peers.py --models resnet20 --batches 64 --rounds 1 --steps 10
    python tools/bench/infer_peers.py --peers torch-eager,torch-eager-im,torch-compile,torch-compile-freeze
    python tools/bench/infer_peers.py --convnet-int8 'quantized/{model}-int8.safetensors' --json out.json
    python tools/bench/infer_peers.py --isa-check --rounds 0          # which oneDNN kernels / AMX

Every measurement runs in its own process with its thread count fixed (torch.set_num_threads
and OMP/MKL_NUM_THREADS; ONNX Runtime intra-op threads, one inter-op thread, sequential
execution): model set-up (loading the pretrained weights, quantizing, compiling) and warm-up
steps, then one forward pass per timed step (time.perf_counter); the median step gives images/s.
The table reports the median over rounds. The input batch is real test images.

Weights are convnet's pretrained checkpoints (pretrained/<model>-cifar10.safetensors), loaded
into the PyTorch twins of tools/fixtures/torch_zoo.py; the inputs are normalised with the
checkpoint's own normalize_mean/normalize_std. The int8 peers are calibrated on 512 training
images of data/cifar10-sample (train.tar.gz, round robin over the classes) and checked on its
1,000 test images: top-1 agreement with the fp32 model and accuracy (second table).

Peers (--peers, comma-separated; default: all but the *-im / *-freeze variants):
  torch-eager          fp32, eval, under torch.no_grad(), NCHW
  torch-eager-im       the same under torch.inference_mode()
  torch-compile        fp32 torch.compile(model) (inductor, --compile-mode), under no_grad
  torch-compile-freeze the same with torch._inductor.config.freezing = True
  torch-int8-fx        FX graph mode PTQ, x86 engine: prepare_fx(get_default_qconfig_mapping("x86"))
                       -> calibrate -> convert_fx (deprecated in torch 2.15, still present)
  torch-int8-pt2e      PT2E PTQ (torchao.quantization.pt2e, moved out of torch.ao): torch.export
                       -> X86InductorQuantizer(get_default_x86_inductor_quantization_config())
                       -> prepare_pt2e -> calibrate -> convert_pt2e -> torch.compile (freezing on)
  torch-int8           both of the above
  ort-fp32, ort-int8   ONNX Runtime CPU EP, ORT_ENABLE_ALL; the twin exported to ONNX (opset 17,
                       dynamic batch); int8 = quant_pre_process + quantize_static (QDQ,
                       per-channel, activations QUInt8, weights QInt8, MinMax calibration)
  convnet, convnet-int8  `convnet bench --checkpoint FILE --mode infer ... --json` (images_per_sec
                       of its last stdout line); fp32 FILE = the pretrained checkpoint, int8 FILE =
                       --convnet-int8 (a path with {model} in it, or MODEL=PATH,...). A failing
                       command is reported as unavailable; --convnet-synthetic times
                       `convnet bench --model NAME` (random weights) for convnet fp32 instead.
"""

import argparse
import ctypes
import gc
import io
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
SAMPLE = os.path.join(ROOT, "data", "cifar10-sample")
N_CALIB = 512
ALL_PEERS = ["torch-eager", "torch-eager-im", "torch-compile", "torch-compile-freeze", "torch-int8-fx",
             "torch-int8-pt2e", "ort-fp32", "ort-int8", "convnet", "convnet-int8"]
DEFAULT_PEERS = ["torch-eager", "torch-compile", "torch-int8-fx", "torch-int8-pt2e", "ort-fp32", "ort-int8",
                 "convnet", "convnet-int8"]
INT8_PEERS = ["torch-int8-fx", "torch-int8-pt2e", "ort-int8", "convnet-int8"]
# int8 peer -> the fp32 peer of the same framework (for the int8/fp32 ratios)
INT8_VS_FP32 = [("torch-int8-fx", "torch-eager"), ("torch-int8-pt2e", "torch-compile"), ("ort-int8", "ort-fp32"),
                ("convnet-int8", "convnet")]


# ---------------------------------------------------------------------------------------------
# shared helpers (workers)


def checkpoint_path(model):
    return os.path.join(ROOT, "pretrained", f"{model}-cifar10.safetensors")


def checkpoint_meta(path):
    from safetensors import safe_open

    with safe_open(path, "np") as f:
        meta = f.metadata() or {}
    return dict(
        mean=json.loads(meta["normalize_mean"]) if "normalize_mean" in meta else [0.4914, 0.4822, 0.4465],
        std=json.loads(meta["normalize_std"]) if "normalize_std" in meta else [0.2470, 0.2435, 0.2616],
        classes=json.loads(meta["classes"]) if "classes" in meta else None,
        input_shape=tuple(json.loads(meta["input_shape"])) if "input_shape" in meta else (3, 32, 32),
        architecture=meta.get("architecture"),
    )


def load_images(work_dir, mean, std, classes):
    """512 calibration images (train split, round robin over the classes) and the whole test
    split of the sample, normalised, NCHW float32; cached as .npz in work_dir."""
    import numpy as np

    key = "-".join(f"{v:.4f}" for v in list(mean) + list(std))
    cache = os.path.join(work_dir, f"cifar10-sample-{key}.npz")
    if os.path.exists(cache):
        d = np.load(cache)
        return d["calib"], d["test"], d["test_labels"]
    from PIL import Image

    def read(split):
        by_class = {}
        with tarfile.open(os.path.join(SAMPLE, f"{split}.tar.gz")) as t:
            for m in t:
                parts = m.name.split("/")
                if m.isfile() and len(parts) == 3 and parts[0] == split:
                    by_class.setdefault(parts[1], {})[parts[2]] = t.extractfile(m).read()
        names = classes or sorted(by_class)
        return [(names.index(c), by_class[c][n]) for c in sorted(by_class) for n in sorted(by_class[c])], names

    def decode(items):
        x = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float32) / 255.0 for _, b in items])
        x = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2).astype(np.float32))

    train, _ = read("train")
    per_class = {}
    for label, b in train:
        per_class.setdefault(label, []).append((label, b))
    rr = [per_class[c][i] for i in range(max(len(v) for v in per_class.values())) for c in sorted(per_class)
          if i < len(per_class[c])]
    calib = decode(rr[:N_CALIB])
    test_items, _ = read("test")
    test = decode(test_items)
    labels = np.array([l for l, _ in test_items], np.int64)
    os.makedirs(work_dir, exist_ok=True)
    tmp = cache + f".{os.getpid()}.npz"
    np.savez(tmp, calib=calib, test=test, test_labels=labels)
    os.replace(tmp, cache)
    return calib, test, labels


def chunks(data, batch):
    """data in batches of exactly `batch` images (the last one padded by repeating its first
    image), so that static-shape compiled models see one shape only; yields (x, n_real)."""
    import numpy as np

    for i in range(0, len(data), batch):
        x = data[i:i + batch]
        n = len(x)
        if n < batch:
            x = np.concatenate([x, np.repeat(x[:1], batch - n, axis=0)])
        yield np.ascontiguousarray(x), n


def amx_permitted():
    """Whether this process holds the AMX tile-data permission (arch_prctl ARCH_GET_XCOMP_PERM,
    bit 18 = XTILEDATA): oneDNN and ONNX Runtime's MLAS request it before using AMX kernels."""
    if platform.machine() != "x86_64":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mask = ctypes.c_uint64(0)
        if libc.syscall(158, 0x1022, ctypes.byref(mask)) != 0:  # SYS_arch_prctl, ARCH_GET_XCOMP_PERM
            return None
        return bool(mask.value & (1 << 18))
    except Exception:
        return None


def cpu_busy_s():
    """CPU seconds the whole machine has spent busy (all CPUs, /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def self_cpu_s(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def time_steps(step, warmup, steps, probe=None):
    # Objects made during set-up go to the permanent generation: the cyclic GC would otherwise
    # walk the whole heap (torch, inductor) now and then inside the timed loop (~10% of an
    # eager ResNet-20 step at batch 64).
    gc.collect()
    gc.freeze()
    if os.environ.get("INFER_PEERS_MARK"):  # set by isa_check: separates set-up from timed work in
        ctypes.CDLL(None).fflush(None)       # the ONEDNN_VERBOSE output
        sys.stdout.flush()
        os.write(1, b"@@timed\n")
    ctl = os.environ.get("INFER_PEERS_PERF_CTL")  # set by perf_isa: sample the timed loop only
    if ctl:
        with open(ctl + ".ctl", "w") as f:
            f.write("enable\n")
        with open(ctl + ".ack") as f:
            f.readline()
    times = []
    for i in range(warmup + steps):
        if i == warmup and probe is not None:
            probe.update(busy=cpu_busy_s(), own=self_cpu_s(resource.RUSAGE_SELF), wall=time.perf_counter())
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if probe is not None:
        wall = time.perf_counter() - probe["wall"]
        other = (cpu_busy_s() - probe["busy"]) - (self_cpu_s(resource.RUSAGE_SELF) - probe["own"])
        probe.clear()
        probe["other_load"] = max(0.0, other / wall) if wall > 0 else 0.0
    return times


def timing_result(batch, times, probe, **extra):
    med = statistics.median(times)
    return dict(images_per_sec=batch / med, step_ms=med * 1e3, step_ms_min=min(times) * 1e3,
                other_load=probe.get("other_load"), peak_rss_mib=peak_rss_mib(), amx_permitted=amx_permitted(), **extra)


def peak_rss_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024


def emit(d):
    sys.stdout.flush()
    print(json.dumps(d), flush=True)


# ---------------------------------------------------------------------------------------------
# workers


def build_torch(model_name):
    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, os.path.join(ROOT, "tools", "fixtures"))
    import torch_zoo

    path = checkpoint_path(model_name)
    meta = checkpoint_meta(path)
    model = torch_zoo.build(model_name, len(meta["classes"] or range(10)), meta["input_shape"])
    sd = {k: (v.long() if k.endswith("num_batches_tracked") else v) for k, v in load_file(path).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing:
        raise RuntimeError(f"{path}: missing from the checkpoint: {missing}")
    if unexpected:
        print(f"note: unexpected keys in {path}: {unexpected}", file=sys.stderr)
    return model.eval(), meta


def torch_worker(args):
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(0)
    model, meta = build_torch(args.model)
    calib, test, _ = load_images(args.work_dir, meta["mean"], meta["std"], meta["classes"])
    x = torch.from_numpy(np.ascontiguousarray(test[:args.batch]))
    if len(x) < args.batch:
        x = x.repeat((args.batch + len(x) - 1) // len(x), 1, 1, 1)[:args.batch]
    peer = args.worker
    grad_ctx = torch.inference_mode if peer == "torch-eager-im" else torch.no_grad
    t_setup = time.perf_counter()
    if peer in ("torch-eager", "torch-eager-im"):
        run = model
    elif peer in ("torch-compile", "torch-compile-freeze"):
        import torch._inductor.config as icfg

        icfg.freezing = peer == "torch-compile-freeze"
        icfg.cpp_wrapper = args.cpp_wrapper
        with torch.no_grad():
            run = torch.compile(model, mode=None if args.compile_mode == "default" else args.compile_mode)
    elif peer == "torch-int8-fx":
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = "x86"
        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (x,))
        with torch.no_grad():
            for i in range(0, len(calib), 64):
                prepared(torch.from_numpy(calib[i:i + 64]))
        run = convert_fx(prepared)
    elif peer == "torch-int8-pt2e":
        # torch.ao.quantization.quantize_pt2e / .quantizer were removed from torch (2.10+);
        # the PT2E flow and the X86InductorQuantizer live in torchao now. Importing the
        # quantizer module registers the x86 int8 fusion passes with inductor.
        import torch._inductor.config as icfg
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

        icfg.freezing = True
        icfg.cpp_wrapper = args.cpp_wrapper
        xc = x  # exported (and calibrated) at the timed batch size: static shapes throughout
        with torch.no_grad():
            exported = torch.export.export(model, (xc,)).module()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for xb, _ in chunks(calib, args.batch):
                prepared(torch.from_numpy(xb))
        converted = convert_pt2e(prepared)
        with torch.no_grad():
            run = torch.compile(converted)
    else:
        raise SystemExit(f"unknown torch peer {peer}")
    with grad_ctx():
        run(x)  # compile / first call, not counted
        setup_s = time.perf_counter() - t_setup
        probe = {}
        times = time_steps(lambda: run(x), args.warmup, args.steps, probe)
        preds = None
        if args.predict:
            preds = []
            for xb, n in chunks(test, args.batch):
                preds.extend(run(torch.from_numpy(xb))[:n].argmax(1).tolist())
    out = timing_result(args.batch, times, probe, setup_s=setup_s, threads=torch.get_num_threads())
    if preds is not None:
        out["preds"] = preds
    emit(out)


def ort_worker(args):
    import numpy as np
    import onnxruntime as ort

    meta = checkpoint_meta(checkpoint_path(args.model))
    _, test, _ = load_images(args.work_dir, meta["mean"], meta["std"], meta["classes"])
    path = os.path.join(args.work_dir, f"{args.model}-{'int8' if args.worker == 'ort-int8' else 'fp32'}.onnx")
    amx_before = amx_permitted()
    t_setup = time.perf_counter()
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if args.ort_optimized_model:
        so.optimized_model_filepath = path[:-5] + ".opt.onnx"
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = np.ascontiguousarray(test[:args.batch])
    sess.run(None, {name: x})
    setup_s = time.perf_counter() - t_setup
    probe = {}
    times = time_steps(lambda: sess.run(None, {name: x}), args.warmup, args.steps, probe)
    out = timing_result(args.batch, times, probe, setup_s=setup_s, amx_permitted_after_import=amx_before)
    if args.predict:
        preds = []
        for xb, n in chunks(test, args.batch):
            preds.extend(sess.run(None, {name: xb})[0][:n].argmax(1).tolist())
        out["preds"] = preds
    emit(out)


def prepare_worker(args):
    """Per model: decode the images, fp32 reference predictions, ONNX export and quantization."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    model, meta = build_torch(args.model)
    calib, test, labels = load_images(args.work_dir, meta["mean"], meta["std"], meta["classes"])
    with torch.no_grad():
        ref = torch.cat([model(torch.from_numpy(test[i:i + 100])) for i in range(0, len(test), 100)]).argmax(1).numpy()
    out = dict(ref_preds=ref.tolist(), labels=labels.tolist(), fp32_accuracy=float((ref == labels).mean()),
               n_test=len(test), n_calib=len(calib), mean=meta["mean"], std=meta["std"], notes=[])
    if args.onnx:
        import onnx
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process

        fp32 = os.path.join(args.work_dir, f"{args.model}-fp32.onnx")
        pre = os.path.join(args.work_dir, f"{args.model}-fp32.pre.onnx")
        int8 = os.path.join(args.work_dir, f"{args.model}-int8.onnx")
        # The TorchScript-based exporter (dynamo=False) still ships in torch 2.15 (deprecated);
        # it gives a plain opset-17 graph with a symbolic batch dimension.
        torch.onnx.export(model, (torch.from_numpy(test[:2]),), fp32, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        onnx.checker.check_model(fp32)
        # ORT's recommended pre-processing: symbolic shape inference + graph optimisation
        # (folds BatchNorm into the convolutions before the quantization parameters are chosen).
        quant_pre_process(fp32, pre)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(range(0, len(calib), 64))

            def get_next(self):
                i = next(self.it, None)
                return None if i is None else {"input": calib[i:i + 64]}

        quantize_static(pre, int8, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        q = onnx.load(int8)
        ops = {}
        for n in q.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        out.update(onnx_fp32=fp32, onnx_int8=int8, onnx_int8_ops=ops)
    emit(out)


# ---------------------------------------------------------------------------------------------
# orchestrator


def run_json(cmd, env=None, timeout=1800):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    except OSError as e:
        return None, str(e)
    for line in reversed(p.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            if p.returncode == 0 and isinstance(d, dict):
                return d, None
    tail = (p.stderr.strip() or p.stdout.strip()).splitlines()[-6:]
    return None, f"exit {p.returncode}: " + " | ".join(tail)


def machine_info():
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            txt = f.read()
        info["cpu"] = re.search(r"^model name\s*:\s*(.*)$", txt, re.M).group(1)
        flags = set(re.search(r"^flags\s*:\s*(.*)$", txt, re.M).group(1).split())
        info["flags"] = {f: f in flags for f in ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16"]}
        info["logical_cpus"] = len(re.findall(r"^processor\s*:", txt, re.M))
    except (OSError, AttributeError):
        pass
    with open("/proc/loadavg") as f:
        info["loadavg"] = f.read().split()[:3]
    probe = ("import json, torch, numpy\n"
             "d = dict(torch=torch.__version__, numpy=numpy.__version__, quantized_engine=torch.backends.quantized.engine,\n"
             "         supported_engines=torch.backends.quantized.supported_engines, mkldnn=torch.backends.mkldnn.is_available(),\n"
             "         cpu_capability=torch.backends.cpu.get_cpu_capability(), onednn=torch.backends.mkldnn.version() if hasattr(torch.backends.mkldnn, 'version') else None)\n"
             "for m in ['onnxruntime', 'onnx', 'torchao', 'onnxscript']:\n"
             "    try:\n"
             "        d[m] = __import__(m).__version__\n"
             "    except Exception as e:\n"
             "        d[m] = None\n"
             "print(json.dumps(d, default=str))\n")
    d, err = run_json([sys.executable, "-c", probe])
    info.update(d or {"probe_error": err})
    return info


def machine_load(seconds=1.0):
    """CPUs' worth of work the machine did over the next `seconds` (0 = idle, 2 = both cores)."""
    b0, t0 = cpu_busy_s(), time.monotonic()
    time.sleep(seconds)
    return (cpu_busy_s() - b0) / (time.monotonic() - t0)


def wait_idle(args):
    """Waits (up to --idle-max-wait s) until the machine is idle: under --idle-below CPUs busy
    over one second. Returns the seconds waited."""
    t0 = time.monotonic()
    said = False
    while args.idle_below > 0:
        load = machine_load(1.0)
        if load < args.idle_below:
            break
        if time.monotonic() - t0 > args.idle_max_wait:
            print(f"  machine still busy ({load:.2f} CPUs) after {args.idle_max_wait} s: measuring anyway", file=sys.stderr, flush=True)
            break
        if not said:
            print(f"  waiting for the machine to go idle ({load:.2f} CPUs busy)...", file=sys.stderr, flush=True)
            said = True
        time.sleep(4)
    return time.monotonic() - t0


def measure(cmd, env):
    """One worker or convnet run; adds other_load_process: CPUs' worth of work done by other
    processes while it ran (machine busy time less this run's own), and other_load (the same
    over the timed loop only, as the Python workers measure it; else the process-wide figure)."""
    b0, c0, w0 = cpu_busy_s(), self_cpu_s(resource.RUSAGE_CHILDREN), time.monotonic()
    d, err = run_json(cmd, env)
    wall = time.monotonic() - w0
    other = ((cpu_busy_s() - b0) - (self_cpu_s(resource.RUSAGE_CHILDREN) - c0)) / wall if wall > 0 else 0.0
    if d is not None:
        if not isinstance(d.get("images_per_sec"), (int, float)):
            return None, f"no images_per_sec in its JSON: {json.dumps(d)[:200]}"
        d["other_load_process"] = max(0.0, other)
        if d.get("other_load") is None:
            d["other_load"] = d["other_load_process"]
    return d, err


def convnet_cmd(args, model, batch, peer, warmup, steps):
    if peer == "convnet":
        src = ["--model", model] if args.convnet_synthetic else ["--checkpoint", checkpoint_path(model)]
    else:
        f = convnet_int8_file(args, model)
        if not f:
            return None
        src = ["--checkpoint", f]
    return [args.convnet_bin, "bench", *src, "--mode", "infer", "--batch-size", str(batch), "--threads",
            str(args.threads), "--warmup", str(warmup), "--steps", str(steps), "--json"]


def convnet_int8_file(args, model):
    spec = args.convnet_int8
    if not spec:
        return None
    if "=" in spec:
        return dict(p.split("=", 1) for p in spec.split(",")).get(model)
    return spec.replace("{model}", model)


def worker_cmd(args, model, batch, peer, warmup, steps, predict):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", peer, "--model", model, "--batch", str(batch),
           "--threads", str(args.threads), "--warmup", str(warmup), "--steps", str(steps),
           "--work-dir", args.work_dir, "--compile-mode", args.compile_mode]
    if args.cpp_wrapper:
        cmd.append("--cpp-wrapper")
    if predict:
        cmd.append("--predict")
    return cmd


def worker_env(args):
    env = dict(os.environ)
    for k in ["OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"]:
        env[k] = str(args.threads)
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(args.work_dir, "inductor-cache"))
    return env


def steps_for(args, batch):
    small = batch < 8
    # Enough timed steps that the fastest peers are timed for most of a second (their
    # medians of 50 steps at batch 64 moved by 10% from run to run).
    warmup = args.warmup if args.warmup is not None else (100 if small else 20)
    steps = args.steps if args.steps is not None else (1500 if small else 150)
    return warmup, steps


ISA_CLASSES = [  # most specific first: the first class whose instructions occur names the code
    ("amx", re.compile(r"\bt(dpb[su][su]d|dpbf16ps|dpfp16ps|ileloadd|ileloaddt1)\b")),
    ("vnni", re.compile(r"\bvpdp(bu|ws)sds?\b")),
    ("avx512-int8", re.compile(r"\bvpmaddubsw\b.*%zmm")),
    ("avx2-int8", re.compile(r"\bvpmaddubsw\b")),
    ("avx512-fma", re.compile(r"\bvfn?m(add|sub)\w*\b.*%zmm")),
    ("avx2-fma", re.compile(r"\bvfn?m(add|sub)\w*\b")),
]


def classify_asm(text):
    for name, rx in ISA_CLASSES:
        if rx.search(text):
            return name
    return "other"


def perf_isa(cmd, env, work_dir, gated):
    """Samples a run with `perf record` and sorts the samples by the instruction set of the code
    they land in: AOT code only (ONNX Runtime's MLAS, convnet, fbgemm's and inductor's compiled
    code); stripped libraries are read around the sampled address, others by whole function.
    JIT code (oneDNN, fbgemm's asmjit kernels) shows as 'jit/unknown'. None if perf fails."""
    data = os.path.join(work_dir, f"perf-{os.getpid()}.data")
    ctl = os.path.join(work_dir, f"perf-{os.getpid()}")
    gate = []
    if gated:  # the worker enables sampling when its warm-up starts (set-up and compilation left out)
        for suffix in (".ctl", ".ack"):
            if os.path.exists(ctl + suffix):
                os.remove(ctl + suffix)
            os.mkfifo(ctl + suffix)
        gate = ["-D", "-1", "--control", f"fifo:{ctl}.ctl,{ctl}.ack"]
        env = dict(env, INFER_PEERS_PERF_CTL=ctl)
    try:
        p = subprocess.run(["perf", "record", "-q", "-F", "1999", "-o", data] + gate + ["--"] + cmd,
                           capture_output=True, text=True, env=env, timeout=1800)
        if p.returncode != 0 or not os.path.exists(data):
            return None
        ids = subprocess.run(["perf", "buildid-list", "-i", data], capture_output=True, text=True).stdout
        paths = {os.path.basename(l.split(None, 1)[1]): l.split(None, 1)[1] for l in ids.splitlines() if " " in l}
        rep = subprocess.run(["perf", "report", "-i", data, "--no-children", "--no-demangle", "--sort", "dso,sym",
                              "--stdio", "-q"], capture_output=True, text=True).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    finally:
        for f in (data, ctl + ".ctl", ctl + ".ack"):
            if os.path.exists(f):
                os.remove(f)
    shares, cache, top = {}, {}, []
    for line in rep.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(.+?)\s+\[(.)\]\s+(\S+)", line)
        if not m:
            continue
        pct, dso, kind, sym = float(m.group(1)), m.group(2), m.group(3), m.group(4)
        path = paths.get(dso)
        if kind == "k":
            cls = "kernel"
        elif dso.startswith("[JIT]") or path is None or not os.path.exists(path):
            cls = "jit/unknown"
        elif "libpython" in dso:
            cls = "python"
        elif pct < 0.3 and not sym.startswith("0x"):
            cls = "rest (functions under 0.3%)"
        else:
            if sym.startswith("0x"):
                a = int(sym, 16)
                key = (path, a // 64)
                span = ["--start-address", hex(max(0, a - 96)), "--stop-address", hex(a + 96)]
            else:
                key = (path, sym)
                span = [f"--disassemble={sym}"]
            if key not in cache:
                asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn"] + span + [path], capture_output=True,
                                     text=True).stdout
                cache[key] = classify_asm(asm)
            cls = cache[key]
        shares[cls] = shares.get(cls, 0.0) + pct
        if len(top) < 12:
            top.append(dict(pct=pct, dso=dso, sym=sym[:120], cls=cls))
    return dict(shares={k: round(v, 1) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}, top=top)


def isa_check(args, models, peers, env):
    """Runs each torch peer once with ONEDNN_VERBOSE=1: which oneDNN implementations execute
    (e.g. brg_conv_fwd:avx512_core_amx = AMX, ...avx512_core_vnni = VNNI) and the ISA oneDNN
    detected; fbgemm kernels (the FX x86 engine's default for most convolutions) do not show.
    Then samples every peer under perf (perf_isa): the share of samples per instruction set."""
    rows = []
    venv = dict(env, ONEDNN_VERBOSE="1", INFER_PEERS_MARK="1")
    batch = int(args.batches.split(",")[0])
    for model in models:
        for peer in [p for p in peers if p.startswith("torch-")]:
            cmd = worker_cmd(args, model, batch, peer, 0, 1, False)
            p = subprocess.run(cmd, capture_output=True, text=True, env=venv)
            isa, impls, timed = None, {}, False
            for line in p.stdout.splitlines():
                timed = timed or line.startswith("@@timed")
                if not line.startswith(("onednn_verbose", "dnnl_verbose")):
                    continue
                f = line.split(",")
                if "isa:" in line and isa is None:
                    isa = line.split("isa:", 1)[1].strip()
                if "exec" in f and timed:
                    i = f.index("exec")
                    kind, impl = f[i + 2], f[i + 3]
                    src = next((x for x in f[i + 5:i + 8] if x.startswith("src")), "")
                    key = f"{kind}:{impl} ({src.split(':')[1] if ':' in src else '?'})"
                    impls[key] = impls.get(key, 0) + 1
            rows.append(dict(model=model, peer=peer, isa=isa, impls=impls, rc=p.returncode))
            print(f"isa-check {model} {peer}: {isa}; {impls or 'no oneDNN primitives executed'}", file=sys.stderr, flush=True)
    perf_rows = []
    for model in models:
        warmup, steps = steps_for(args, batch)
        for peer in peers:
            if peer.startswith("convnet"):
                cmd = convnet_cmd(args, model, batch, peer, warmup, steps)
                if cmd is None:
                    continue
            else:
                cmd = worker_cmd(args, model, batch, peer, warmup, steps, False)
            r = perf_isa(cmd, env, args.work_dir, gated=not peer.startswith("convnet")) or {}
            perf_rows.append(dict(model=model, peer=peer, batch=batch, **r))
            print(f"perf-isa {model} b{batch} {peer}: {r.get('shares')}", file=sys.stderr, flush=True)
    return rows, perf_rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=ALL_PEERS + ["prepare"], help=argparse.SUPPRESS)
    ap.add_argument("--model", default="resnet20", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--predict", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--onnx", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="seed-cnn,resnet20")
    ap.add_argument("--batches", default="64,1")
    ap.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                    help=f"comma-separated, of {', '.join(ALL_PEERS)}, torch-int8 (= both torch int8 peers)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 20, or 100 for batches under 8)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 150, or 1500 for batches under 8)")
    ap.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune",
                                                                  "max-autotune-no-cudagraphs"])
    ap.add_argument("--cpp-wrapper", action="store_true", help="torch._inductor.config.cpp_wrapper = True (compiled peers)")
    ap.add_argument("--ort-optimized-model", action="store_true", help="save ORT's optimised graphs (*.opt.onnx) in --work-dir")
    ap.add_argument("--convnet-bin", default=os.path.join(ROOT, "target", "release", "convnet"))
    ap.add_argument("--convnet-int8", default=None, help="int8 checkpoint: a path with {model} in it, or MODEL=PATH,...")
    ap.add_argument("--convnet-synthetic", action="store_true",
                    help="time convnet fp32 with `bench --model NAME` (random weights) instead of --checkpoint")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the int8 agreement check")
    ap.add_argument("--idle-below", type=float, default=0.3,
                    help="before each run, wait until other processes use fewer CPUs than this (0: don't wait)")
    ap.add_argument("--idle-max-wait", type=float, default=900, help="longest wait for an idle machine, s")
    ap.add_argument("--max-other-load", type=float, default=0.25,
                    help="redo a run during whose timed loop other processes used more CPUs than this")
    ap.add_argument("--retries", type=int, default=2, help="redos per run (then it is kept, marked *)")
    ap.add_argument("--isa-check", action="store_true",
                    help="afterwards: one run of each torch peer under ONEDNN_VERBOSE=1 (oneDNN kernels, e.g. AMX/VNNI) "
                         "and one of every peer under `perf record` (share of samples per instruction set)")
    ap.add_argument("--work-dir", default=os.path.join("/tmp", "convnet-infer-peers"),
                    help="decoded images, ONNX models, inductor cache")
    ap.add_argument("--json", dest="json_out", default=None, help="write all raw per-round results here")
    args = ap.parse_args()
    if args.worker == "prepare":
        return prepare_worker(args)
    if args.worker and args.worker.startswith("torch-"):
        return torch_worker(args)
    if args.worker and args.worker.startswith("ort-"):
        return ort_worker(args)

    os.makedirs(args.work_dir, exist_ok=True)
    command = " ".join(shlex.quote(a) for a in [sys.executable, os.path.relpath(__file__, os.getcwd())] + sys.argv[1:])
    peers = []
    for p in args.peers.split(","):
        for q in (["torch-int8-fx", "torch-int8-pt2e"] if p == "torch-int8" else [p]):
            if q not in ALL_PEERS:
                ap.error(f"unknown peer {q}")
            if q not in peers:
                peers.append(q)
    models = args.models.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    env = worker_env(args)
    machine = machine_info()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    print(f"machine: {json.dumps(machine)}", file=sys.stderr, flush=True)

    # Per model: images, fp32 reference predictions, ONNX models (fp32 and int8).
    prep = {}
    need_onnx = any(p.startswith("ort-") for p in peers)
    for model in models:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "prepare", "--model", model,
               "--threads", str(args.threads), "--work-dir", args.work_dir] + (["--onnx"] if need_onnx else [])
        d, err = run_json(cmd, env)
        if d is None:
            raise SystemExit(f"preparing {model} failed: {err}")
        prep[model] = d
        print(f"prepared {model}: fp32 accuracy {d['fp32_accuracy']:.4f} on {d['n_test']} test images"
              + (f"; ONNX int8 ops {d.get('onnx_int8_ops')}" if need_onnx else ""), file=sys.stderr, flush=True)

    results = []  # one entry per (round, model, batch, peer)
    unavailable = {}  # (model, batch, peer) -> reason
    preds = {}  # (model, peer) -> predictions on the test split
    for rnd in range(args.rounds):
        for model in models:
            for batch in batches:
                warmup, steps = steps_for(args, batch)
                order = peers[rnd % len(peers):] + peers[:rnd % len(peers)]  # rotate: each peer moves one slot per round
                if rnd % 2:
                    order.reverse()
                for pos, peer in enumerate(order):
                    key = (model, batch, peer)
                    if key in unavailable:
                        continue
                    predict = (not args.no_accuracy and rnd == 0 and batch == batches[0] and peer != "torch-eager-im"
                               and not peer.startswith("convnet"))
                    if peer.startswith("convnet"):
                        cmd = convnet_cmd(args, model, batch, peer, warmup, steps)
                        if cmd is None:
                            unavailable[key] = "no --convnet-int8 file given"
                            continue
                    else:
                        cmd = worker_cmd(args, model, batch, peer, warmup, steps, predict)
                    for attempt in range(args.retries + 1):
                        waited = wait_idle(args)
                        t0 = time.time()
                        d, err = measure(cmd, env)
                        entry = dict(round=rnd + 1, position=pos, model=model, batch=batch, peer=peer, warmup=warmup,
                                     steps=steps, command=" ".join(shlex.quote(c) for c in cmd), wall_s=time.time() - t0,
                                     waited_idle_s=waited, attempt=attempt + 1)
                        if d is not None:
                            # What a run reports under a name the entry already has (convnet's
                            # JSON has its own "model", e.g. "seed-cnn (int8, amx)") is kept
                            # beside it, not over it.
                            d = {(f"reported_{k}" if k in entry else k): v for k, v in d.items()}
                        if d is None or d["other_load"] <= args.max_other_load or attempt == args.retries:
                            break
                        entry.update(d, rejected=True)
                        if "preds" in d:
                            preds[(model, peer)] = entry.pop("preds")
                        results.append(entry)
                        print(f"round {rnd + 1}: {model} b{batch} {peer}: {d['images_per_sec']:.0f} img/s rejected: other "
                              f"processes used {d['other_load']:.2f} CPUs while it ran; again", file=sys.stderr, flush=True)
                    if d is None:
                        unavailable[key] = err
                        entry["error"] = err
                        print(f"round {rnd + 1}: {model} b{batch} {peer}: unavailable ({err[-300:]})", file=sys.stderr, flush=True)
                    else:
                        if "preds" in d:
                            preds[(model, peer)] = d.pop("preds")
                        entry.update(d, noisy=d["other_load"] > args.max_other_load)
                        print(f"round {rnd + 1}: {model} b{batch} {peer}: {d['images_per_sec']:.0f} img/s "
                              f"({d.get('step_ms', 0):.3f} ms/step, setup {d.get('setup_s', 0):.1f} s, others "
                              f"{d['other_load']:.2f} CPUs)", file=sys.stderr, flush=True)
                    results.append(entry)

    isa_rows, perf_rows = isa_check(args, models, peers, env) if args.isa_check else ([], [])
    finished = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    with open("/proc/loadavg") as f:
        machine["loadavg_end"] = f.read().split()[:3]

    def accepted(model, batch, peer):
        return [r for r in results if (r["model"], r["batch"], r["peer"]) == (model, batch, peer)
                and "images_per_sec" in r and not r.get("rejected")]

    def med(model, batch, peer):
        v = [r["images_per_sec"] for r in accepted(model, batch, peer)]
        return statistics.median(v) if v else None

    def spread(model, batch, peer):
        v = [r["images_per_sec"] for r in accepted(model, batch, peer)]
        return (max(v) / min(v) - 1) if len(v) > 1 else None

    noisy = {(r["model"], r["batch"], r["peer"]) for r in results if r.get("noisy")}
    fmt = lambda v: f"{v:.0f}" if v else "—"
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "—"
    others = [p for p in peers if p != "convnet-int8"]
    pairs = [(a, b) for a, b in INT8_VS_FP32 if a in peers and b in peers]
    head = ["model", "batch"] + peers + ([f"cn-int8 / {p}" for p in others] if "convnet-int8" in peers else []) \
        + [f"{a} / {b}" for a, b in pairs]
    lines = [f"Inference throughput, images/s (median of {args.rounds} rounds; {args.threads} threads; "
             f"'—' = unavailable)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in models:
        for batch in batches:
            m = {p: med(model, batch, p) for p in peers}
            row = [model, str(batch)] + [fmt(m[p]) + ("*" if (model, batch, p) in noisy else "") for p in peers]
            if "convnet-int8" in peers:
                row += [ratio(m["convnet-int8"], m[p]) for p in others]
            row += [ratio(m[a], m[b]) for a, b in pairs]
            lines.append("| " + " | ".join(row) + " |")
    spreads = [(spread(*k), k) for k in {(r["model"], r["batch"], r["peer"]) for r in results}]
    spreads = [s for s in spreads if s[0] is not None]
    if spreads:
        s, k = max(spreads)
        lines += ["", f"Largest round-to-round spread (max/min - 1): {s * 100:.1f}% ({k[0]} b{k[1]} {k[2]})."]
    n_rej = sum(1 for r in results if r.get("rejected"))
    lines += ["", f"Other processes' CPU use during the timed loops: at most "
                  f"{max([r['other_load'] for r in results if 'other_load' in r and not r.get('rejected')] or [0]):.2f} CPUs "
                  f"in an accepted run; {n_rej} run(s) redone for exceeding {args.max_other_load} CPUs"
                  + ("; * = a run above it was kept (retries exhausted)." if noisy else ".")]
    if unavailable:
        lines += ["", "Unavailable:"]
        for (model, batch, peer), why in unavailable.items():
            lines.append(f"- {model} b{batch} {peer}: {why[-400:]}")

    acc_rows = []
    if not args.no_accuracy:
        import numpy as np

        lines += ["", f"Int8 sanity on the sample's {prep[models[0]]['n_test']} test images: top-1 agreement with the "
                      f"fp32 PyTorch model / top-1 accuracy (calibration: {N_CALIB} training images)", ""]
        apeers = [p for p in peers if p in ("torch-compile", "torch-compile-freeze", "ort-fp32") + tuple(INT8_PEERS)
                  and not p.startswith("convnet")]
        lines += ["| model | fp32 accuracy | " + " | ".join(apeers) + " |", "|" + "---|" * (2 + len(apeers))]
        for model in models:
            ref = np.array(prep[model]["ref_preds"])
            labels = np.array(prep[model]["labels"])
            row = [model, f"{prep[model]['fp32_accuracy'] * 100:.1f}%"]
            for p in apeers:
                pr = preds.get((model, p))
                if pr is None:
                    row.append("—")
                    continue
                pr = np.array(pr)
                agree, acc = float((pr == ref).mean()), float((pr == labels).mean())
                acc_rows.append(dict(model=model, peer=p, agreement=agree, accuracy=acc))
                row.append(f"{agree * 100:.1f}% / {acc * 100:.1f}%")
            lines.append("| " + " | ".join(row) + " |")

    if isa_rows:
        lines += ["", "oneDNN kernels executed in one timed step (ONEDNN_VERBOSE=1, batch %d): primitive:implementation (src type) x calls" % batches[0], ""]
        for r in isa_rows:
            impls = ", ".join(f"{k} x{v}" for k, v in sorted(r["impls"].items())) or "none (no oneDNN primitive ran)"
            lines.append(f"- {r['model']} {r['peer']}: {impls}")
        isa = next((r["isa"] for r in isa_rows if r["isa"]), None)
        if isa:
            lines.append(f"- oneDNN detected ISA: {isa}")
    if perf_rows:
        lines += ["", "Where the timed loop spends its time, by instruction set of the code (perf samples, %; amx = "
                      "tdpb*/tileload, vnni = vpdpbusd/vpdpwssd, jit/unknown = JIT code such as oneDNN's):", ""]
        for r in perf_rows:
            shares = ", ".join(f"{k} {v}" for k, v in (r.get("shares") or {}).items()) or "perf unavailable"
            lines.append(f"- {r['model']} b{r['batch']} {r['peer']}: {shares}")

    mflags = machine.get("flags", {})
    lines += ["", f"Command: `{command}`", "",
              f"Machine: {machine.get('cpu')}, {machine.get('logical_cpus')} logical CPUs; flags: "
              + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in mflags.items())
              + f"; load average {' '.join(machine['loadavg'])} at start, {' '.join(machine['loadavg_end'])} at end "
              f"({started} - {finished}).",
              f"Software: Python {platform.python_version()}, torch {machine.get('torch')} (CPU capability "
              f"{machine.get('cpu_capability')}, quantized engine {machine.get('quantized_engine')}, mkldnn available "
              f"{machine.get('mkldnn')}), torchao {machine.get('torchao')}, onnxruntime {machine.get('onnxruntime')}, "
              f"onnx {machine.get('onnx')}, numpy {machine.get('numpy')}."]
    print("\n".join(lines))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(dict(command=command, started=started, finished=finished, machine=machine, args=vars(args),
                           peers=peers, results=results, unavailable=[dict(model=k[0], batch=k[1], peer=k[2], reason=v)
                                                                     for k, v in unavailable.items()],
                           accuracy=acc_rows, prepare={m: {k: v for k, v in d.items() if k not in ("ref_preds", "labels")}
                                                       for m, d in prep.items()},
                           isa_check=isa_rows, perf_isa=perf_rows), f, indent=1)


if __name__ == "__main__":
    main()

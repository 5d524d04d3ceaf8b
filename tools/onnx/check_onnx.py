"""Exports every zoo architecture with `convnet export --onnx` and runs the graph in ONNX
Runtime on the interoperability fixtures: the ONNX logits must match the reference logits
that convnet itself reproduces in `convnet/tests/zoo_vs_torch.rs`. The example model files
(examples/models) are exported with fresh weights and `--reference-io`, and ONNX Runtime
must reproduce the logits convnet computed for that batch, and so must a text-cnn trained
briefly on the committed text sample.

    pip install -r tools/onnx/requirements.txt
    python tools/onnx/check_onnx.py target/release/convnet          # committed fixtures
    python tools/onnx/check_onnx.py target/release/convnet --large  # also zoo-large/

Needs only numpy and onnxruntime (no PyTorch). Tolerance: every logit within
1e-4 * |ref| + 1e-4 * max |ref| (the Rust test's bound). With `onnx` installed the
graph is also validated by `onnx.checker` (full check, shape inference included).
Exits non-zero on the first mismatch.
"""

import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np
import onnxruntime as ort

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
FIXTURES = os.path.join(ROOT, "convnet", "tests", "fixtures")
COMMITTED = ["seed-cnn", "lenet5", "resnet20", "resnet32", "resnet56", "vgg11-bn", "resnet18", "mobilenet_v2"]
LARGE = ["vgg16-bn", "resnet34", "resnet50", "resnet18-cifar", "resnet34-cifar", "resnet50-cifar"]
TOL = 1e-4


def read_safetensors(path):
    """Tensors of a safetensors file as float32/int64 numpy arrays."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        body = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = body[a:b]
        dt = info["dtype"]
        if dt == "F32":
            arr = np.frombuffer(raw, "<f4")
        elif dt == "BF16":
            arr = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif dt == "I64":
            arr = np.frombuffer(raw, "<i8")
        else:
            raise ValueError(f"{path}: {name} has dtype {dt}")
        out[name] = arr.reshape(info["shape"])
    return out


def check(convnet, directory, name, tmp):
    """A zoo architecture with the fixture weights, against the fixture logits."""
    weights = os.path.join(directory, f"{name}.weights.safetensors")
    probe = read_safetensors(os.path.join(directory, f"{name}.probe.safetensors"))
    x = probe["input"]
    model = os.path.join(tmp, f"{name}.onnx")
    cmd = [convnet, "export", "--model", name, "--weights", weights, "--input", "x".join(map(str, x.shape[1:])), "--onnx", model]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return compare(name, model, x, probe["logits"])


def check_model_file(convnet, path, tmp):
    """A model file with fresh weights, against convnet's own logits for a reference batch."""
    name = os.path.basename(path)
    model = os.path.join(tmp, f"{name}.onnx")
    io = os.path.join(tmp, f"{name}.io.safetensors")
    cmd = [convnet, "export", "--model-file", path, "--random-init", "--seed", "3", "--onnx", model, "--reference-io", io]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    ref = read_safetensors(io)
    return compare(name, model, ref["input"], ref["logits"])


def check_text_model(convnet, tmp):
    """text-cnn trained briefly on the committed text sample, against convnet's own logits
    for two random texts of token ids."""
    run = os.path.join(tmp, "text-cnn-run")
    data = os.path.join(ROOT, "data", "debian-sample")
    cmd = [convnet, "train", "--data", data, "--epochs", "1", "--limit-train", "96", "--max-len", "40", "--out", run, "--no-tensorboard"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    model = os.path.join(tmp, "text-cnn.onnx")
    io = os.path.join(tmp, "text-cnn.io.safetensors")
    cmd = [convnet, "export", "--checkpoint", os.path.join(run, "model.safetensors"), "--onnx", model, "--reference-io", io]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    ref = read_safetensors(io)
    return compare("text-cnn", model, ref["input"], ref["logits"])


def compare(name, model, x, want):
    try:
        import onnx

        onnx.checker.check_model(onnx.load(model), full_check=True)
        checked = "onnx.checker ok"
    except ImportError:
        checked = "onnx not installed, checker skipped"
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x.astype(np.float32)})[0]
    scale = np.abs(want).max()
    err = np.abs(got - want)
    bound = TOL * np.abs(want) + TOL * scale
    worst = float((err / bound).max())
    status = "ok" if worst <= 1.0 else "MISMATCH"
    print(f"{name:18s} {status:8s} max |onnx - ref| = {err.max():.2e} (max |ref| {scale:.2f}, {worst:.1e} of the bound); {checked}")
    return worst <= 1.0


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    convnet = sys.argv[1]
    jobs = [(os.path.join(FIXTURES, "zoo"), n) for n in COMMITTED]
    if "--large" in sys.argv[2:]:
        jobs += [(os.path.join(FIXTURES, "zoo-large"), n) for n in LARGE]
    print(f"onnxruntime {ort.__version__}")
    examples = os.path.join(ROOT, "examples", "models")
    with tempfile.TemporaryDirectory() as tmp:
        ok = all([check(convnet, d, n, tmp) for d, n in jobs])
        files = sorted(os.listdir(examples))
        ok = all([check_model_file(convnet, os.path.join(examples, f), tmp) for f in files]) and ok
        ok = check_text_model(convnet, tmp) and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

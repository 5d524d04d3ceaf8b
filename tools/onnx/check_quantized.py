"""Quantizes convnet's pretrained CIFAR-10 models with `convnet quantize`, exports them with
`convnet export --onnx` in QDQ form, and runs them in ONNX Runtime on 256 test images of
the bundled sample: ONNX Runtime must turn the QDQ pairs into its int8 kernels
(QLinearConv, QGemm), agree with convnet's int8 model on at least 99% of the predictions,
and give every logit within 2 "classifier steps" of convnet's, a classifier step being
how far the logits move when every input of the classifier moves by one step of its
quantization (s_in * max_o sum_i |W[o, i]|): rounding a tie the other way anywhere in the
network moves a classifier input by about one step.

    pip install -r tools/onnx/requirements.txt
    python tools/onnx/check_quantized.py target/release/convnet

Needs numpy, onnx and onnxruntime (no PyTorch). Exits non-zero on the first failure.
"""

import os
import subprocess
import sys
import tempfile
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

sys.path.insert(0, os.path.dirname(__file__))
from check_onnx import read_safetensors  # noqa: E402

MODELS = ["seed-cnn-cifar10", "resnet20-cifar10"]
IMAGES = 256


def classifier_step(model):
    """s_in * max_o sum_i |W[o, i]| for the Gemm that writes `logits`."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    gemm = producer["logits"]
    while gemm.op_type != "Gemm":
        gemm = producer[gemm.input[0]]
    x_dq, w_dq = producer[gemm.input[0]], producer[gemm.input[1]]
    assert x_dq.op_type == "DequantizeLinear" and w_dq.op_type == "DequantizeLinear", "the classifier reads QDQ values"
    s_in = float(inits[x_dq.input[1]])
    w = inits[w_dq.input[0]].astype(np.float32) * inits[w_dq.input[1]][:, None]
    return s_in * np.abs(w).sum(axis=1).max()


def main():
    convnet = sys.argv[1] if len(sys.argv) > 1 else "target/release/convnet"
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            q = os.path.join(tmp, f"{name}-int8.safetensors")
            onnx_path = os.path.join(tmp, f"{name}-int8.onnx")
            ref = os.path.join(tmp, f"{name}-ref.safetensors")
            subprocess.run([convnet, "quantize", "--pretrained", name, "--out", q, "--no-eval"], check=True, capture_output=True)
            subprocess.run(
                [convnet, "export", "--checkpoint", q, "--onnx", onnx_path, "--reference-io", ref,
                 "--reference-data", "sample", "--reference-images", str(IMAGES)],
                check=True, capture_output=True,
            )
            model = onnx.load(onnx_path)
            onnx.checker.check_model(model, full_check=True)
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            opts.optimized_model_filepath = os.path.join(tmp, f"{name}-ort.onnx")
            session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
            r = read_safetensors(ref)
            y = session.run(None, {"input": r["input"]})[0]
            ops = Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
            int8_ops = ops["QLinearConv"] + ops["QGemm"]
            agree = float((y.argmax(1) == r["logits"].argmax(1)).mean())
            step = classifier_step(model)
            worst = float(np.abs(y - r["logits"]).max())
            print(f"{name}: {len(y)} images, predictions agree {100 * agree:.1f}%, worst logit difference "
                  f"{worst:.4f} = {worst / step:.2f} classifier steps; ONNX Runtime int8 kernels: "
                  f"{ops['QLinearConv']} QLinearConv, {ops['QGemm']} QGemm")
            if int8_ops == 0:
                sys.exit(f"{name}: ONNX Runtime did not fuse any QDQ group into an int8 kernel")
            if agree < 0.99:
                sys.exit(f"{name}: predictions agree on only {100 * agree:.1f}%")
            if worst > 2 * step:
                sys.exit(f"{name}: a logit differs by {worst / step:.2f} classifier steps")
    print("quantized ONNX export: ok")


if __name__ == "__main__":
    main()

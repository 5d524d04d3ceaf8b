"""Times attribution on torchvision's ResNet-18 layout (random weights, one 224x224 image)
in PyTorch eager, as `convnet/examples/explain_speed.rs` times convnet: a plain predict,
Grad-CAM at `layer4` (forward + backward to the layer's output, hooks as pytorch-grad-cam
does), and integrated gradients with 50 Gauss-Legendre points in one batch (as Captum's
`IntegratedGradients` with `internal_batch_size=50`; both take `torch.autograd.grad` of
the target logit with respect to what they read, so no weight gradient is computed). Prints medians and the ratios to the predict.

    python tools/bench/explain_peers.py [--threads 2] [--rounds 5]
"""

import argparse
import statistics
import time

import numpy as np
import torch
import torchvision


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 224, 224)
    nodes, weights = np.polynomial.legendre.leggauss(50)
    alphas = torch.tensor((nodes + 1) / 2, dtype=torch.float32)
    weights = torch.tensor(weights / 2, dtype=torch.float32)

    def predict():
        with torch.no_grad():
            return model(x)

    saved = {}

    def keep(_module, _inputs, output):
        saved["a"] = output

    model.layer4.register_forward_hook(keep)

    def gradcam():
        out = model(x)
        t = int(out.argmax())
        a = saved["a"]
        (g,) = torch.autograd.grad(out[0, t], a)
        w = g.mean(dim=(2, 3), keepdim=True)
        return torch.relu((w * a).sum(1))

    def integrated_gradients():
        with torch.no_grad():
            t = int(model(x).argmax())
        path = (alphas.view(-1, 1, 1, 1) * x).requires_grad_(True)
        out = model(path)[:, t].sum()
        (g,) = torch.autograd.grad(out, path)
        return (weights.view(-1, 1, 1, 1) * g).sum(0) * x[0]

    for f in (predict, gradcam, integrated_gradients):
        f()
    p, g, i = [], [], []
    for r in range(args.rounds):
        for _ in range(5):
            t0 = time.perf_counter()
            predict()
            p.append(time.perf_counter() - t0)
        for _ in range(5):
            t0 = time.perf_counter()
            gradcam()
            g.append(time.perf_counter() - t0)
        if r < 3:
            t0 = time.perf_counter()
            integrated_gradients()
            i.append(time.perf_counter() - t0)
    p, g, i = (statistics.median(v) for v in (p, g, i))
    print(
        f"PyTorch {torch.__version__} eager, resnet18 224x224, {args.threads} threads: "
        f"predict {p * 1e3:.1f} ms, Grad-CAM {g * 1e3:.1f} ms ({g / p:.2f}x), "
        f"integrated gradients (50) {i * 1e3:.0f} ms ({i / p:.1f}x)"
    )


if __name__ == "__main__":
    main()

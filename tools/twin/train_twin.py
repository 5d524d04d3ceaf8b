"""PyTorch twin of `convnet train`: the same models, recipe and data, for accuracy and speed
comparisons. Dev-time only.

    python tools/twin/train_twin.py --data PATH/cifar10-jpeg --model seed-cnn --epochs 10
    python tools/twin/train_twin.py --data PATH/cifar10-jpeg --model resnet20 --epochs 30 \\
        --lr 0.1 --nesterov --weight-decay 5e-4 --augment --schedule onecycle --batch-size 128 \\
        [--label-smoothing 0.1 --cutout 8]

Reads the image-folder archives (train.tar.gz, test.tar.gz) with PIL, normalises with the
CIFAR-10 statistics, and prints one line per epoch and a final JSON line like convnet's.
"""

import argparse
import io
import json
import math
import os
import sys
import tarfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
import torch_zoo  # noqa: E402


def read_folder_archive(path):
    images, labels, classes = {}, [], None
    with tarfile.open(path) as t:
        for m in t:
            parts = [p for p in m.name.split("/") if p not in ("", ".")]
            if m.isfile() and len(parts) == 3 and parts[2].lower().endswith((".jpg", ".jpeg", ".png")):
                images[(parts[1], parts[2])] = t.extractfile(m).read()
    classes = sorted({c for c, _ in images})
    keys = sorted(images)
    x = np.stack([np.asarray(Image.open(io.BytesIO(images[k])).convert("RGB")) for k in keys])
    y = np.array([classes.index(c) for c, _ in keys])
    return x.transpose(0, 3, 1, 2).copy(), y, classes


def build_model(name, classes=10):
    """The PyTorch twin of a convnet zoo architecture (tools/fixtures/torch_zoo.py)."""
    return torch_zoo.build(name, classes)


def augment(x, gen, black, cutout=0):
    """Random 32x32 crops of the images padded by 4 black pixels (`black`: black after
    normalisation, per channel, as torchvision's RandomCrop(32, padding=4) before Normalize
    and convnet's --augment) and horizontal flips, then, with `cutout`, a square of that side
    zeroed at a random centre (clipped at the borders, after normalisation, as convnet's
    --cutout). Drawn from the CPU generator and applied on x's device in batched indexing ops
    (no per-image Python loop, so the GPU twin is not held back by its host)."""
    n, c = x.shape[0], x.shape[1]
    padded = F.pad(x - black, (4, 4, 4, 4)) + black
    dy = torch.randint(0, 9, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 9, (n,), generator=gen).to(x.device)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    r = torch.arange(32, device=x.device)
    rows = (dy[:, None] + r)[:, None, :, None]
    cols = (dx[:, None] + r)[:, None, None, :]
    cols = torch.where(flip[:, None, None, None], dx[:, None, None, None] + 31 - r[None, None, None, :], cols)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[batch, chan, rows, cols]
    if cutout > 0:
        cy = torch.randint(0, 32, (n,), generator=gen).to(x.device)
        cx = torch.randint(0, 32, (n,), generator=gen).to(x.device)
        half = cutout // 2
        inside_y = (r[None, :] >= (cy[:, None] - half)) & (r[None, :] < (cy[:, None] - half + cutout))
        inside_x = (r[None, :] >= (cx[:, None] - half)) & (r[None, :] < (cx[:, None] - half + cutout))
        hole = inside_y[:, None, :, None] & inside_x[:, None, None, :]
        out = out.masked_fill(hole, 0.0)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="seed-cnn")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--nesterov", action="store_true")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--schedule", default="constant", choices=["constant", "cosine", "onecycle"])
    ap.add_argument("--augment", action="store_true")
    ap.add_argument("--cutout", type=int, default=0, help="cutout square side when augmenting (0 = off)")
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    t0 = time.time()
    xtr, ytr, classes = read_folder_archive(os.path.join(args.data, "train.tar.gz"))
    xte, yte, _ = read_folder_archive(os.path.join(args.data, "test.tar.gz"))
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    norm = lambda a: ((torch.from_numpy(a).float() / 255.0) - mean) / std
    black = (-mean / std).to(dev)
    xtr, xte = norm(xtr).to(dev), norm(xte).to(dev)
    ytr, yte = torch.from_numpy(ytr).to(dev), torch.from_numpy(yte).to(dev)
    print(f"data: {len(ytr)} train, {len(yte)} test, {time.time() - t0:.1f}s", flush=True)
    model = build_model(args.model).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay)
    steps = math.ceil(len(ytr) / args.batch_size)
    sched = None
    if args.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps)
    elif args.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps)
    gen = torch.Generator().manual_seed(args.seed)
    ips = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(len(ytr), generator=gen).to(dev)
        t0, tot, correct, seen = time.time(), 0.0, 0, 0
        for i in range(steps):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            x, y = xtr[idx], ytr[idx]
            if args.augment:
                x = augment(x, gen, black, args.cutout)
            out = model(x)
            loss = F.cross_entropy(out, y, label_smoothing=args.label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched:
                sched.step()
            tot += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
            seen += len(y)
        secs = time.time() - t0
        ips.append(seen / secs)
        model.eval()
        with torch.no_grad():
            outs = torch.cat([model(xte[j : j + 500]) for j in range(0, len(yte), 500)])
            tl, ta = F.cross_entropy(outs, yte).item(), (outs.argmax(1) == yte).float().mean().item()
        print(f"epoch {epoch:3d}/{args.epochs} train loss {tot / seen:.4f} acc {100 * correct / seen:.2f}% test loss {tl:.4f} acc {100 * ta:.2f}% {secs:.1f}s ({seen / secs:.0f} img/s)", flush=True)
    print(json.dumps(dict(framework="pytorch", model=args.model, test_accuracy=ta, test_loss=tl, epochs=args.epochs, train_images_per_sec=sum(ips) / len(ips))))


if __name__ == "__main__":
    main()

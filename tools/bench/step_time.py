"""PyTorch twin of `convnet bench --model seed-cnn --batch-size N --threads 2`: the tutorial
CNN's training step (forward, cross-entropy, backward, SGD momentum 0.9), median of 30 steps
after 5 warm-up. For the full grid of models, batches and threads use compare.py.

    python tools/bench/step_time.py 64        # threads: torch.set_num_threads(2)
"""

import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(2)
batch = int(sys.argv[1]) if len(sys.argv) > 1 else 64
model = nn.Sequential(
    nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(4096, 128), nn.ReLU(), nn.Linear(128, 10),
)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
times = []
for i in range(35):
    t0 = time.perf_counter()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    if i >= 5:
        times.append(time.perf_counter() - t0)
times.sort()
m = times[len(times) // 2]
print(json.dumps(dict(framework="pytorch-eager", model="seed-cnn", batch=batch, threads=2, step_ms=round(m * 1e3, 3), images_per_sec=round(batch / m, 1))))

"""Loads a convnet checkpoint into the PyTorch twin model with load_state_dict(strict=True)
and evaluates it on an image-folder test archive, to compare with `convnet eval`.

    python tools/twin/check_checkpoint.py runs/X/model.safetensors data/cifar10-sample/test.tar.gz
"""

import json
import sys

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from train_twin import read_folder_archive
import torch_zoo  # noqa: E402  (importable once train_twin is)

ckpt, data = sys.argv[1], sys.argv[2]
with safe_open(ckpt, "pt") as f:
    meta = f.metadata()
model = torch_zoo.build(meta["architecture"], len(json.loads(meta["classes"])), json.loads(meta["input_shape"]))
missing = model.load_state_dict(load_file(ckpt), strict=True)
model.eval()
x, y, _ = read_folder_archive(data)
mean = torch.tensor(json.loads(meta["normalize_mean"])).view(1, -1, 1, 1)
std = torch.tensor(json.loads(meta["normalize_std"])).view(1, -1, 1, 1)
x = (torch.from_numpy(x).float() / 255.0 - mean) / std
with torch.no_grad():
    out = model(x)
y = torch.from_numpy(y)
print(json.dumps(dict(strict_load="ok", architecture=meta["architecture"], epoch=int(meta["epoch"]),
                      accuracy=(out.argmax(1) == y).float().mean().item(), loss=F.cross_entropy(out, y).item())))

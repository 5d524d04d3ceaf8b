"""Checks `convnet train`'s TensorBoard event files with TensorBoard's own reader.

Trains two epochs on a slice of the bundled CIFAR-10 sample, stopped after the first and
resumed (so the run folder holds two event files), then loads the folder with
`tensorboard.backend.event_processing.event_accumulator.EventAccumulator` and checks:

- every figure of metrics.jsonl is a scalar series with one point per epoch, equal to it
  in float32 (train/loss, train/accuracy, test/loss, test/accuracy, lr,
  train/images_per_sec, train/epoch_seconds);
- train/loss_step has points at multiples of --tensorboard-every, all finite;
- every parameter has weight and gradient histograms for both epochs, whose bucket counts
  add up to the parameter's size;
- test images with their true and predicted classes are there, and decode as PNG of the
  data's image size;
- a run with --no-tensorboard writes no event file.

    pip install -r tools/tensorboard/requirements.txt
    python tools/tensorboard/check_events.py target/release/convnet

Exits non-zero on the first failed check.
"""

import glob
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
from tensorboard.backend.event_processing import event_accumulator

SCALARS = {
    "train_loss": "train/loss",
    "train_accuracy": "train/accuracy",
    "test_loss": "test/loss",
    "test_accuracy": "test/accuracy",
    "lr": "lr",
    "train_images_per_sec": "train/images_per_sec",
    "seconds": "train/epoch_seconds",
}
EVERY = 7
TRAIN, BATCH = 640, 32
COMMON = ["--limit-train", str(TRAIN), "--limit-test", "128", "--batch-size", str(BATCH),
          "--threads", "2", "--tensorboard-every", str(EVERY)]


def run(binary, *args):
    r = subprocess.run([binary, *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"convnet {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def check(cond, what):
    if not cond:
        sys.exit(f"FAILED: {what}")
    print(f"ok: {what}")


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: check_events.py path/to/convnet")
    binary = os.path.abspath(sys.argv[1])
    with tempfile.TemporaryDirectory(prefix="convnet-tensorboard-") as tmp:
        out = os.path.join(tmp, "run")
        run(binary, "train", *COMMON, "--epochs", "2", "--stop-after", "1", "--out", out)
        run(binary, "train", "--resume", out, "--epochs", "2", "--tensorboard-every", str(EVERY))
        files = sorted(glob.glob(os.path.join(out, "events.out.tfevents.*")))
        check(len(files) == 2, f"the first run and its resumption wrote an event file each: {files}")

        metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        check([m["epoch"] for m in metrics] == [1, 2], "metrics.jsonl has epochs 1 and 2")

        acc = event_accumulator.EventAccumulator(
            out,
            size_guidance={
                event_accumulator.SCALARS: 0,
                event_accumulator.HISTOGRAMS: 0,
                event_accumulator.COMPRESSED_HISTOGRAMS: 0,
                event_accumulator.IMAGES: 0,
                event_accumulator.TENSORS: 0,
                event_accumulator.AUDIO: 0,
            },
        )
        acc.Reload()
        tags = acc.Tags()

        for key, tag in SCALARS.items():
            check(tag in tags["scalars"], f"scalar series {tag}")
            points = acc.Scalars(tag)
            check([p.step for p in points] == [1, 2], f"{tag} has steps 1 and 2")
            for p, m in zip(points, metrics):
                want = float(np.float32(m[key]))
                check(p.value == want, f"{tag} at epoch {p.step}: {p.value} == metrics.jsonl's {m[key]} (float32)")

        steps_per_epoch = math.ceil(TRAIN / BATCH)
        want_steps = list(range(EVERY, 2 * steps_per_epoch + 1, EVERY))
        points = acc.Scalars("train/loss_step")
        check([p.step for p in points] == want_steps, f"train/loss_step every {EVERY} steps: {[p.step for p in points]}")
        check(all(math.isfinite(p.value) and p.value > 0 for p in points), "train/loss_step values are finite and positive")

        weights = sorted(t for t in tags["histograms"] if t.startswith("weights/"))
        grads = sorted(t for t in tags["histograms"] if t.startswith("grads/"))
        check(len(weights) > 0, f"weight histograms: {weights}")
        check([t[len("grads/"):] for t in grads] == [t[len("weights/"):] for t in weights],
              "a gradient histogram for every weight histogram")
        for tag in weights + grads:
            events = acc.Histograms(tag)
            if [e.step for e in events] != [1, 2]:
                check(False, f"{tag} at epochs 1 and 2: {[e.step for e in events]}")
            for e in events:
                h = e.histogram_value
                ok = (h.num > 0 and sum(h.bucket) == h.num and len(h.bucket) == len(h.bucket_limit)
                      and h.min <= h.max and list(h.bucket_limit) == sorted(h.bucket_limit))
                if not ok:
                    check(False, f"{tag} at step {e.step} is a well-formed histogram: {h}")
            if tag.startswith("grads/"):
                twin = "weights/" + tag[len("grads/"):]
                if [e.histogram_value.num for e in events] != [e.histogram_value.num for e in acc.Histograms(twin)]:
                    check(False, f"{tag} counts as many values as {twin}")
        check(True, f"{len(weights) + len(grads)} histograms at epochs 1 and 2, well formed, gradients as large as weights")

        images = [t for t in tags["images"] if t.startswith("test_images/")]
        check(len(images) == 8, f"8 test images: {images}")
        check(all(" true=" in t and " predicted=" in t for t in images), "image tags name the true and predicted class")
        for tag in images:
            (img,) = acc.Images(tag)
            data = img.encoded_image_string
            if not (data.startswith(b"\x89PNG") and img.width == 32 and img.height == 32 and img.step == 2):
                check(False, f"{tag} is a 32x32 PNG at epoch 2")
        check(True, "the test images are 32x32 PNGs written after the last epoch")

        quiet = os.path.join(tmp, "quiet")
        run(binary, "train", *COMMON, "--epochs", "1", "--no-tensorboard", "--out", quiet)
        check(not glob.glob(os.path.join(quiet, "events.out.tfevents.*")), "--no-tensorboard writes no event file")
    print("all TensorBoard checks passed")


if __name__ == "__main__":
    main()

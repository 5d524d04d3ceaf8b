"""Peak memory of `convnet train` against the size of the data set it trains on.

Writes two synthetic image folders (once; reused afterwards) and trains on each, measuring
the peak resident memory of the process (its max RSS, from wait4):

  small   200,000 PNG images of 32x32 (10 classes): 614 MB of decoded pixels
  photos  2,000 JPEG photos of 1024x768 (4 classes): 4.7 GB of decoded pixels

Each is trained (seed-cnn on the small images; on the photos a small model that pools
them 8x8 first, so that activations stay small) (a) decoding with the cache off, (b) decoding into the cache, (c) reading
the cache entry, and for the small set also (d) with the data-set memory limit lowered to
64 MiB, so that its pixels are read from disk too. Training is short (`--limit-train`): the
whole folder is decoded and stored either way, which is what the memory bound is about.

    python3 tools/bench/memory_bound.py --dir /data/convnet-memory [--binary target/release/convnet]
"""

import argparse
import os
import random
import shutil
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))


def write_small(root, n, classes=10):
    from PIL import Image
    rng = random.Random(0)
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
    for i in range(n):
        c = i % classes
        img = Image.frombytes("RGB", (32, 32), bytes(rng.getrandbits(8) for _ in range(32 * 32 * 3)))
        img.save(os.path.join(root, f"class{c}", f"{i:06d}.png"))


def write_photos(root, n, classes=4):
    from PIL import Image, ImageFilter
    rng = random.Random(1)
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
    base = Image.effect_noise((1024, 768), 64).convert("RGB").filter(ImageFilter.GaussianBlur(2))
    for i in range(n):
        c = i % classes
        img = base.rotate(rng.uniform(0, 360)).point(lambda v, s=rng.randint(0, 80): min(255, v + s))
        img.save(os.path.join(root, f"class{c}", f"{i:05d}.jpg"), quality=90)


def photo_model(root):
    """A model that shrinks 1024x768 photos at once (an 8x8 average pool), so that the
    measurement is about the data, not the activations of a network at full size."""
    path = os.path.join(root, "photo-model.toml")
    with open(path, "w") as f:
        f.write('name = "photo-probe"\n'
                '[[layer]]\ntype = "avgpool2d"\nkernel_size = 8\n'
                '[[layer]]\ntype = "conv2d"\nout_channels = 8\nkernel_size = 3\nstride = 2\n'
                '[[layer]]\ntype = "relu"\n'
                '[[layer]]\ntype = "adaptive_avgpool2d"\noutput_size = 1\n'
                '[[layer]]\ntype = "flatten"\n'
                '[[layer]]\ntype = "linear"\nout_features = "classes"\n')
    return path


def measure(cmd, env):
    start = time.time()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.decode()[-2000:]}")
    return usage.ru_maxrss / 1024.0, time.time() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/convnet-memory")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "convnet"))
    ap.add_argument("--small", type=int, default=200_000)
    ap.add_argument("--photos", type=int, default=2_000)
    a = ap.parse_args()
    small, photos = os.path.join(a.dir, "small"), os.path.join(a.dir, "photos")
    for path, write, n in [(small, write_small, a.small), (photos, write_photos, a.photos)]:
        if not os.path.isdir(path):
            t = time.time()
            write(path, n)
            print(f"wrote {path} ({n} images) in {time.time() - t:.0f} s", flush=True)
    cache = os.path.join(a.dir, "cache")
    rows = []
    for name, path, decoded, model_args in [
        ("small", small, a.small * 32 * 32 * 3, ["--model", "seed-cnn", "--limit-train", "2048", "--limit-test", "512", "--batch-size", "64"]),
        ("photos", photos, a.photos * 1024 * 768 * 3, ["--model-file", photo_model(a.dir), "--limit-train", "64", "--limit-test", "32", "--batch-size", "8"]),
    ]:
        shutil.rmtree(cache, ignore_errors=True)
        cases = [
            ("no cache", ["--no-cache"], {}),
            ("decode into the cache", [], {}),
            ("from the cache", [], {}),
        ]
        if name == "small":
            cases.append(("from the cache, data memory limit 64 MiB", [], {"CONVNET_DATA_MEMORY_BYTES": str(64 << 20)}))
        for label, extra, env_extra in cases:
            out = os.path.join(a.dir, "run")
            shutil.rmtree(out, ignore_errors=True)
            env = dict(os.environ, CONVNET_CACHE_DIR=cache, **env_extra)
            cmd = [a.binary, "train", "--data", path, "--epochs", "1", "--threads", "2", "--out", out] + model_args + extra
            rss, secs = measure(cmd, env)
            rows.append((name, decoded, label, rss, secs))
            print(f"{name:7s} {decoded / 2**20:8.0f} MiB decoded  {label:42s} peak RSS {rss:7.0f} MiB  {secs:6.1f} s", flush=True)
    print("\n| data set | decoded pixels | run | peak RSS | time |")
    print("|---|---|---|---|---|")
    for name, decoded, label, rss, secs in rows:
        print(f"| {name} | {decoded / 2**20:.0f} MiB | {label} | {rss:.0f} MiB | {secs:.0f} s |")


if __name__ == "__main__":
    main()

"""Builds the CIFAR-10 sample shipped in data/cifar10-sample/ from the full JPEG copy.

    python3 tools/make_sample.py PATH/TO/cifar10-jpeg

Takes images 0000-0499 of every class from train.tar.gz (5,000) and 0000-0099 from
test.tar.gz (1,000) and writes them as reproducible archives (sorted, zero timestamps).
"""

import gzip
import io
import os
import sys
import tarfile

src = sys.argv[1]
out = os.path.join(os.path.dirname(__file__), "..", "data", "cifar10-sample")
os.makedirs(out, exist_ok=True)
for split, per_class in [("train", 500), ("test", 100)]:
    keep = {}
    with tarfile.open(os.path.join(src, f"{split}.tar.gz")) as t:
        for m in t:
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 3 and int(parts[2].split(".")[0]) < per_class:
                keep[m.name] = t.extractfile(m).read()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name in sorted(keep):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(keep[name]), 0, 0o644
            t.addfile(info, io.BytesIO(keep[name]))
    with open(os.path.join(out, f"{split}.tar.gz"), "wb") as f:
        with gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
            gz.write(buf.getvalue())
    print(split, len(keep), "images")

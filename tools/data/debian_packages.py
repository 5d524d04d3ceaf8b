"""Builds a text-classification data set from Debian's package descriptions: each package's
summary and long description, labelled by its archive section (games, sound, science, ...).
Tens of thousands of short human-written texts, available offline on any Debian or Ubuntu
machine after `apt-get update -o Acquire::Languages=en` (the long descriptions live in the
archive's `Translation-en` files, which some images do not fetch; without them every text is
the one-line summary, and the script says so).

    python tools/data/debian_packages.py --out data/debian            # every section
    python tools/data/debian_packages.py --out data/debian --sections games,sound,graphics,science,math,fonts
    python tools/data/debian_packages.py --packages Packages --out ...  # from a Packages file

Writes `train.tsv` and `test.tsv` (`section<TAB>text` lines, what `convnet::data::text`
reads). A package goes to the test split when a hash of its name falls in the test fraction,
so the split does not move when the archive changes; each package is taken once (its first
stanza), and `--min-per-class` drops sections with fewer packages. `--per-class N` keeps at
most N training and N/4 test texts per section (the committed sample uses it).
"""

import argparse
import collections
import hashlib
import os
import subprocess
import sys


def stanzas(text):
    """Yields dicts of the fields of each `Package:` stanza (continuation lines joined)."""
    fields, key = {}, None
    for line in text.splitlines():
        if not line.strip():
            if fields:
                yield fields
            fields, key = {}, None
        elif line[0] in " \t" and key:
            fields[key] += "\n" + line
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip()
            fields[key] = value.strip()
    if fields:
        yield fields


def description(raw):
    """The summary line and the long description as one line of text."""
    lines = raw.split("\n")
    parts = [lines[0].strip()]
    for l in lines[1:]:
        l = l.strip()
        if l and l != ".":
            parts.append(l)
    return " ".join(" ".join(parts).split())


def long_descriptions():
    """Description-md5 -> long description, from the apt lists' Translation-en files."""
    lists = "/var/lib/apt/lists"
    out = {}
    try:
        names = [n for n in os.listdir(lists) if "Translation-en" in n]
    except OSError:
        return out
    for n in names:
        text = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", os.path.join(lists, n)],
                              capture_output=True, text=True, errors="replace").stdout
        for s in stanzas(text):
            if "Description-md5" in s and "Description-en" in s:
                out[s["Description-md5"]] = s["Description-en"]
    return out


def in_test(name, fraction):
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--packages", help="a Packages file (default: `apt-cache dumpavail`)")
    ap.add_argument("--sections", help="comma-separated sections to keep (default: all)")
    ap.add_argument("--min-per-class", type=int, default=100)
    ap.add_argument("--per-class", type=int, default=0, help="cap per section (0: none)")
    ap.add_argument("--test-fraction", type=float, default=0.2)
    args = ap.parse_args()
    if args.packages:
        with open(args.packages, encoding="utf-8", errors="replace") as f:
            text = f.read()
    else:
        text = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True).stdout
    longs = {} if args.packages else long_descriptions()
    if not args.packages and not longs:
        print("no Translation-en lists: texts are one-line summaries "
              "(run apt-get update -o Acquire::Languages=en for the long descriptions)", file=sys.stderr)
    wanted = set(args.sections.split(",")) if args.sections else None
    seen, rows = set(), collections.defaultdict(list)
    for s in stanzas(text):
        name, section, desc = s.get("Package"), s.get("Section"), s.get("Description")
        if not (name and section and desc) or name in seen:
            continue
        seen.add(name)
        section = section.rsplit("/", 1)[-1]
        if wanted and section not in wanted:
            continue
        desc = longs.get(s.get("Description-md5"), desc)
        rows[section].append((name, description(desc)))
    os.makedirs(args.out, exist_ok=True)
    counts = collections.Counter()
    with open(os.path.join(args.out, "train.tsv"), "w", encoding="utf-8") as train, \
            open(os.path.join(args.out, "test.tsv"), "w", encoding="utf-8") as test:
        for section in sorted(rows):
            items = sorted(rows[section])
            if len(items) < args.min_per_class:
                continue
            kept = collections.Counter()
            for name, body in items:
                split = "test" if in_test(name, args.test_fraction) else "train"
                cap = args.per_class if split == "train" else max(1, args.per_class // 4)
                if args.per_class and kept[split] >= cap:
                    continue
                kept[split] += 1
                counts[split, section] += 1
                (test if split == "test" else train).write(f"{section}\t{body}\n")
    for split in ("train", "test"):
        total = sum(n for (s, _), n in counts.items() if s == split)
        sections = len({c for (s, c) in counts if s == split})
        print(f"{split}: {total} texts in {sections} sections", file=sys.stderr)


if __name__ == "__main__":
    main()

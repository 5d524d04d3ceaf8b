"""The baselines a text CNN must beat on a `label<TAB>text` data set (train.tsv, test.tsv as
`tools/data/debian_packages.py` writes them): the majority class, and a bag-of-words linear
model (lower-cased words seen at least twice in training, binary features, softmax
regression trained with full-batch Adam and L2). Dev-time only (needs numpy); the features
are dense, which suits a few thousand texts (a choice of sections), not all 63,000.

    python tools/data/text_baselines.py data/debian6           # six sections (see docs/sequences.md)
    python tools/data/text_baselines.py data/debian-sample
"""

import collections
import re
import sys

import numpy as np


def read(path):
    labels, texts = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                label, _, text = line.rstrip("\n").partition("\t")
                labels.append(label)
                texts.append(text)
    return labels, texts


def words(text):
    # As convnet's word-level tokenizer: lower-cased runs of letters and digits.
    return [w.lower() for w in re.split(r"[^\w]|_", text) if w]


def main():
    root = sys.argv[1]
    ytr, xtr = read(f"{root}/train.tsv")
    yte, xte = read(f"{root}/test.tsv")
    classes = sorted(set(ytr))
    ci = {c: i for i, c in enumerate(classes)}
    majority = collections.Counter(ytr).most_common(1)[0][0]
    print(f"{len(xtr)} train, {len(xte)} test texts, {len(classes)} classes")
    print(f"majority class ({majority}): {100 * np.mean([y == majority for y in yte]):.2f}%")
    counts = collections.Counter(w for t in xtr for w in set(words(t)))
    vocab = {w: i for i, w in enumerate(sorted(w for w, n in counts.items() if n >= 2))}

    def features(texts):
        rows, cols = [], []
        for r, t in enumerate(texts):
            for w in set(words(t)):
                if w in vocab:
                    rows.append(r)
                    cols.append(vocab[w])
        x = np.zeros((len(texts), len(vocab)), dtype=np.float32)
        x[rows, cols] = 1.0
        return x

    a, b = features(xtr), features(xte)
    y = np.array([ci[v] for v in ytr])
    yt = np.array([ci.get(v, -1) for v in yte])
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.01, (len(vocab), len(classes))).astype(np.float32)
    bias = np.zeros(len(classes), dtype=np.float32)
    m = [np.zeros_like(w), np.zeros_like(bias)]
    v = [np.zeros_like(w), np.zeros_like(bias)]
    onehot = np.eye(len(classes), dtype=np.float32)[y]
    lr, l2 = 0.05, 1e-4
    for step in range(1, 201):
        z = a @ w + bias
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(y)
        grads = [a.T @ g + l2 * w, g.sum(0)]
        for k, (param, grad) in enumerate(zip((w, bias), grads)):
            m[k] = 0.9 * m[k] + 0.1 * grad
            v[k] = 0.999 * v[k] + 0.001 * grad * grad
            param -= lr * (m[k] / (1 - 0.9**step)) / (np.sqrt(v[k] / (1 - 0.999**step)) + 1e-8)
    acc = np.mean((b @ w + bias).argmax(1) == yt)
    print(f"bag of words ({len(vocab)} words), softmax regression: {100 * acc:.2f}%")


if __name__ == "__main__":
    main()

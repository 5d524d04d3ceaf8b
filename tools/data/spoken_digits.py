"""Synthesises a spoken-digit data set ("zero" .. "nine") with the espeak-ng speech
synthesiser. The recordings are SYNTHETIC: formant-synthesised speech, not people. They are
a stand-in for the Free Spoken Digit Dataset or Speech Commands when no recordings can be
downloaded, good for checking that a speech pipeline and model learn, not for claims about
real speech.

    apt-get install -y espeak-ng
    python tools/data/spoken_digits.py --out data/spoken-digits            # full set
    python tools/data/spoken_digits.py --out data/spoken-digits-sample --sample

Writes `<out>/train/<digit>/*.wav` and `<out>/test/<digit>/*.wav`: 8 kHz mono 16-bit PCM,
leading and trailing silence trimmed, then a random 0-100 ms of silence in front and a
random peak level (0.3-0.9), one word per file (most are under a second: 8000 samples).

A voice is an English accent of espeak-ng (`en-us`, `en-gb-x-rp`, ...) with a voice
variant (`+m1`, `+f3`, `+klatt`, ...). Test voices are held out: the test split uses voice
variants that never occur in the training split (with every accent), so a model is scored
on speakers it has not heard. Each training voice says each digit at every speed (`-s`,
words per minute) and pitch (`-p`, 0-99) of a grid; each test voice says each digit at two
grid points drawn at random. `--sample` keeps 2 training and 1 test clip per digit (the
committed sample).

espeak-ng writes 22050 Hz; the clips are resampled to 8 kHz here with numpy: a Kaiser-
windowed sinc low-pass (128 taps, beta 8, cutoff 3.6 kHz: flat to 3.4 kHz, more than 85 dB
down from 4.1 kHz, so nothing aliases) evaluated at each output instant, which is rational
resampling by 160/441 without an intermediate upsampled signal. Needs numpy; no other
Python packages.
"""

import argparse
import math
import os
import random
import subprocess
import sys
import tempfile
import wave

import numpy as np

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ACCENTS = ["en-us", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]
TRAIN_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m8", "f1", "f2", "f3", "klatt", "klatt3"]
TEST_VARIANTS = ["m6", "m7", "f4", "f5"]
SPEEDS = [130, 175]
PITCHES = [30, 55, 80]
RATE = 8000


def synthesise(text, voice, speed, pitch):
    """espeak-ng's output as (float64 samples in [-1, 1], sample rate)."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", tmp.name, text], check=True, capture_output=True)
        with wave.open(tmp.name, "rb") as w:
            if w.getsampwidth() != 2 or w.getnchannels() != 1:
                sys.exit(f"espeak-ng wrote {w.getnchannels()} channels of {8 * w.getsampwidth()} bits; expected 16-bit mono")
            rate = w.getframerate()
            x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64) / 32768.0
    return x, rate


def resample(x, rate_in, rate_out, half_taps=64, beta=8.0):
    """x at rate_in -> rate_out with a Kaiser-windowed sinc low-pass at 0.45 * rate_out."""
    if rate_in == rate_out:
        return x
    g = math.gcd(rate_in, rate_out)
    up, down = rate_out // g, rate_in // g  # output n sits at input instant n * down / up
    # The filter at each of the `up` fractional positions, computed once per rate pair.
    key = (rate_in, rate_out, half_taps, beta)
    if key not in _FILTERS:
        frac = (np.arange(up) * down % up) / up  # output instant minus floor, in input samples
        offset = frac[:, None] + half_taps - 1 - np.arange(2 * half_taps)[None, :]
        fc = 0.45 * min(rate_in, rate_out) / rate_in  # cutoff in cycles per input sample
        window = np.i0(beta * np.sqrt(np.clip(1 - (offset / half_taps) ** 2, 0, None))) / np.i0(beta)
        _FILTERS[key] = 2 * fc * np.sinc(2 * fc * offset) * window
    h = _FILTERS[key]
    n_out = len(x) * up // down
    n = np.arange(n_out)
    taps = (n * down // up - half_taps + 1)[:, None] + np.arange(2 * half_taps)[None, :]
    padded = np.concatenate([np.zeros(2 * half_taps), x, np.zeros(2 * half_taps)])
    return (padded[taps + 2 * half_taps] * h[n % up]).sum(axis=1)


_FILTERS = {}


def trim(x, threshold=0.02):
    """x without leading and trailing samples quieter than threshold x peak."""
    loud = np.nonzero(np.abs(x) > threshold * np.abs(x).max())[0]
    if len(loud) == 0:
        return x
    return x[max(loud[0] - 40, 0) : loud[-1] + 40]


def clip(text, voice, speed, pitch, rng):
    x, rate = synthesise(text, voice, speed, pitch)
    y = trim(resample(x, rate, RATE))
    y = np.concatenate([np.zeros(rng.randrange(0, RATE // 10)), y])
    y = y / np.abs(y).max() * rng.uniform(0.3, 0.9)
    return np.round(y * 32767).astype("<i2")


def write(path, samples):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(samples.tobytes())


def jobs(split, sample, rng):
    """(digit, voice, speed, pitch) of every clip of a split."""
    grid = [(s, p) for s in SPEEDS for p in PITCHES]
    variants = TRAIN_VARIANTS if split == "train" else TEST_VARIANTS
    voices = [f"{a}+{v}" for v in variants for a in ACCENTS]
    out = []
    for digit in DIGITS:
        for voice in voices:
            points = grid if split == "train" else rng.sample(grid, 2)
            out += [(digit, voice, s, p) for s, p in points]
    if sample:
        keep = 2 if split == "train" else 1
        by_digit = {d: [j for j in out if j[0] == d] for d in DIGITS}
        out = [js[i * len(js) // keep + len(js) // (2 * keep)] for js in by_digit.values() for i in range(keep)]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (gets train/ and test/)")
    ap.add_argument("--sample", action="store_true", help="2 training and 1 test clip per digit")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        subprocess.run(["espeak-ng", "--version"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        sys.exit("espeak-ng not found: apt-get install -y espeak-ng")
    rng = random.Random(args.seed)
    for split in ["train", "test"]:
        todo = jobs(split, args.sample, rng)
        lengths = []
        for i, (digit, voice, speed, pitch) in enumerate(todo):
            samples = clip(digit, voice, speed, pitch, rng)
            lengths.append(len(samples))
            name = f"{voice.replace('+', '_')}_s{speed}_p{pitch}.wav"
            write(os.path.join(args.out, split, digit, name), samples)
            if (i + 1) % 500 == 0:
                print(f"{split}: {i + 1}/{len(todo)}", flush=True)
        voices = sorted({j[1] for j in todo})
        longer = sum(n > RATE for n in lengths)
        print(f"{split}: {len(todo)} clips, {len(todo) // len(DIGITS)} per digit, {len(voices)} voices: {' '.join(voices)}")
        print(f"{split}: length {min(lengths) / RATE:.2f}-{max(lengths) / RATE:.2f} s (mean {np.mean(lengths) / RATE:.2f} s), {longer} longer than 1 s")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# GPU check for the CUDA backend: runs on a machine with an NVIDIA GPU and no Rust toolchain,
# from a kit of prebuilt binaries and the CIFAR-10 archives; compares convnet with its PyTorch
# twin on the same GPU in the same run.
#
#   bash tools/gpu_check.sh --prepare KIT DATA   # here: build with --features cuda, copy the
#                                                # binaries, tests and CIFAR-10 archives to KIT
#                                                # (and the shared PyTorch GPU anchor if found)
#   bash tools/gpu_check.sh --kit KIT            # there: the whole check
#   bash tools/gpu_check.sh --kit KIT --dry-run  # anywhere: check the kit and the libraries,
#                                                # print the commands, run no GPU work
#
# What the check runs, in order: library discovery (CONVNET_CUDA_LIB_DIR, LD_LIBRARY_PATH);
# the GPU tests (the ignored tests of the CUDA build: every op fixture on cuda, the GPU
# against the CPU at network sizes, training steps of the zoo); `convnet train --device cuda` for
# seed-cnn (10 epochs, batch 64) and resnet20 (3 epochs, batch 128), eagerly and with
# --cuda-graph; the PyTorch twin
# (tools/twin/train_twin.py --device cuda) with the same recipes; then a table of training
# images/s, the ratio, and test accuracy for both.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=run kit="" data="" dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        --prepare) mode=prepare kit="$2" data="$3"; shift 3 ;;
        --kit) kit="$2"; shift 2 ;;
        --dry-run) dry=1; shift ;;
        *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -n "$kit" ] || { echo "gpu_check: give --kit KIT or --prepare KIT DATA" >&2; exit 2; }

if [ "$mode" = prepare ]; then
    for f in train.tar.gz test.tar.gz; do
        [ -f "$data/$f" ] || { echo "gpu_check: $data/$f not found" >&2; exit 1; }
    done
    mkdir -p "$kit/bin/tests" "$kit/data/cifar10-jpeg"
    cargo build --release --locked -p convnet-cli --features cuda
    cp target/release/convnet "$kit/bin/"
    # The test binaries of the CUDA build that hold CUDA tests (cargo lists them), except the
    # CLI's, which run the binary at its build path. Stripped: the kit must stay small.
    cargo test --release --locked --workspace --features convnet-cli/cuda --no-run \
        --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])' |
        while read -r exe; do
            case "$(basename "$exe")" in cli-*) continue ;; esac
            # Ignored tests are the GPU ones (and the NVRTC compile check).
            # (grep -c reads everything: with pipefail, grep -q's early exit would fail the
            # listing with SIGPIPE.)
            if [ "$("$exe" --list --ignored </dev/null 2>/dev/null | grep -c ': test$')" -gt 0 ]; then
                cp "$exe" "$kit/bin/tests/"
            fi
        done
    strip "$kit/bin/convnet" "$kit"/bin/tests/*
    cp "$data/train.tar.gz" "$data/test.tar.gz" "$kit/data/cifar10-jpeg/"
    # The shared PyTorch GPU anchor, when this checkout sits beside it (run last, briefly).
    anchor="${ANCHOR:-$data/../../bench/pytorch_gpu_anchor.py}"
    if [ -f "$anchor" ]; then mkdir -p "$kit/anchor" && cp "$anchor" "$kit/anchor/"; fi
    du -sh "$kit"
    exit 0
fi

fail() { echo "gpu_check: $*" >&2; exit 1; }
convnet="$kit/bin/convnet"
data="$kit/data/cifar10-jpeg"
[ -x "$convnet" ] || fail "$convnet missing: run --prepare first"
[ -f "$data/train.tar.gz" ] && [ -f "$data/test.tar.gz" ] || fail "CIFAR-10 archives missing in $data"
python=${PYTHON:-python3}

# Library discovery: the driver on the system path; cuDNN, cuBLAS and NVRTC often only inside
# a Python environment.
find_lib() {
    for root in /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/cuda*/lib64 /opt /usr/local/lib; do
        [ -d "$root" ] || continue
        hit=$(find -L "$root" -maxdepth 8 -name "$1" -print -quit 2>/dev/null || true)
        [ -n "$hit" ] && { dirname "$hit"; return 0; }
    done
    hit=$("$python" -c "import site,glob,os
for s in site.getsitepackages():
    g = glob.glob(os.path.join(s, 'nvidia', '**', '$1'), recursive=True)
    if g: print(os.path.dirname(g[0])); break" 2>/dev/null || true)
    [ -n "$hit" ] && { echo "$hit"; return 0; }
    return 1
}
libdirs=""
missing=""
for lib in libcuda.so.1 libcudnn.so.9 libcublas.so.13 libnvrtc.so.13; do
    if d=$(find_lib "$lib"); then
        echo "found $lib in $d"
        case ":$libdirs:" in *":$d:"*) ;; *) libdirs="$libdirs:$d" ;; esac
    else
        echo "missing $lib"
        missing="$missing $lib"
    fi
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvrtc_dir=$(find_lib libnvrtc.so.13 || true)
export CONVNET_CUDA_LIB_DIR="${nvrtc_dir:-}"
command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "nvidia-smi not found"

seed_cnn="--model seed-cnn --epochs 10 --batch-size 64"
resnet20="--model resnet20 --epochs 3 --batch-size 128 --lr 0.1 --nesterov --weight-decay 5e-4 --schedule onecycle --augment"
out="${TMPDIR:-/tmp}/convnet-gpu-check-$$"
steps=(
    "tests: for t in $kit/bin/tests/*; do \$t --ignored; done"
    "convnet seed-cnn: $convnet train --device cuda --data $data $seed_cnn --json --out $out/seed-cnn"
    "convnet seed-cnn graph: $convnet train --device cuda --cuda-graph --data $data $seed_cnn --json --out $out/seed-cnn-graph"
    "convnet seed-cnn graph tf32: $convnet train --device cuda --cuda-graph --tf32 --data $data $seed_cnn --json --out $out/seed-cnn-tf32"
    "pytorch seed-cnn: $python tools/twin/train_twin.py --device cuda --data $data $seed_cnn"
    "convnet resnet20: $convnet train --device cuda --data $data $resnet20 --json --out $out/resnet20"
    "convnet resnet20 graph: $convnet train --device cuda --cuda-graph --data $data $resnet20 --json --out $out/resnet20-graph"
    "convnet resnet20 graph tf32: $convnet train --device cuda --cuda-graph --tf32 --data $data $resnet20 --json --out $out/resnet20-tf32"
    "convnet resnet20 graph bf16: $convnet train --device cuda --cuda-graph --precision bf16 --data $data $resnet20 --json --out $out/resnet20-bf16"
    "pytorch resnet20: $python tools/twin/train_twin.py --device cuda --data $data $resnet20"
)
if [ "$dry" = 1 ]; then
    echo "dry run: kit complete ($(ls "$kit/bin/tests" | wc -l) test binaries); libraries missing:${missing:- none}"
    "$convnet" train --help >/dev/null || fail "$convnet does not run here"
    "$python" -c "import torch" 2>/dev/null && echo "PyTorch importable" || echo "PyTorch not importable (needed for the twin)"
    printf 'would run:\n'
    printf '  %s\n' "${steps[@]}"
    exit 0
fi
[ -z "$missing" ] || fail "libraries missing:$missing"
mkdir -p "$out"

# The GPU tests are the ignored ones; fixtures are read from this checkout. Each test runs
# in its own process with synchronous launches: a CUDA fault poisons its context, so one
# broken kernel must not fail the tests after it, and the fault is reported at its launch.
failed="" passed=0
for t in "$kit"/bin/tests/*; do
    for name in $("$t" --list --ignored 2>/dev/null | sed -n 's/: test$//p'); do
        if CUDA_LAUNCH_BLOCKING=1 "$t" --ignored --exact "$name" -q >"$out.log" 2>&1; then
            passed=$((passed + 1))
        else
            failed="$failed $(basename "$t")::$name"
            tail -25 "$out.log" >&2
        fi
    done
done
echo "GPU tests: $passed passed, failed:${failed:- none}"
# A failed run prints its error and leaves "failed" in the table; the others still run.
run_json() { { "$@" || echo '"failed"'; } | tee /dev/stderr | tail -1; }
cs=$(run_json "$convnet" train --device cuda --data "$data" $seed_cnn --json --out "$out/seed-cnn")
cgs=$(run_json "$convnet" train --device cuda --cuda-graph --data "$data" $seed_cnn --json --out "$out/seed-cnn-graph")
cts=$(run_json "$convnet" train --device cuda --cuda-graph --tf32 --data "$data" $seed_cnn --json --out "$out/seed-cnn-tf32")
ps=$(run_json "$python" tools/twin/train_twin.py --device cuda --data "$data" $seed_cnn)
cr=$(run_json "$convnet" train --device cuda --data "$data" $resnet20 --json --out "$out/resnet20")
cgr=$(run_json "$convnet" train --device cuda --cuda-graph --data "$data" $resnet20 --json --out "$out/resnet20-graph")
ctr=$(run_json "$convnet" train --device cuda --cuda-graph --tf32 --data "$data" $resnet20 --json --out "$out/resnet20-tf32")
cbr=$(run_json "$convnet" train --device cuda --cuda-graph --precision bf16 --data "$data" $resnet20 --json --out "$out/resnet20-bf16")
pr=$(run_json "$python" tools/twin/train_twin.py --device cuda --data "$data" $resnet20)
if [ -f "$kit/anchor/pytorch_gpu_anchor.py" ]; then
    "$python" "$kit/anchor/pytorch_gpu_anchor.py" "$data/train.tar.gz" "$data/test.tar.gz" \
        --out "$out/anchor" --budget "${ANCHOR_BUDGET:-150}" || echo "gpu_check: the anchor failed" >&2
fi
"$python" - "$cs" "$cgs" "$cts" "$ps" "$cr" "$cgr" "$ctr" "$pr" "$cbr" <<'PY'
import json, sys
def parse(s):
    try:
        v = json.loads(s)
        return v if isinstance(v, dict) else None
    except ValueError:
        return None
a = [parse(s) for s in sys.argv[1:]]
# PyTorch eager fp32 is the target; its cuDNN convolutions use TF32 by default
# (torch.backends.cudnn.allow_tf32), so "graph+tf32" is the like-for-like column.
rows = [("seed-cnn b64", a[0:3], a[3], 2.0), ("resnet20 b128", a[4:7], a[7], 1.2)]
print("| model | convnet img/s (eager / graph / graph+tf32) | PyTorch img/s | ratio fp32 / tf32 | target | convnet acc | PyTorch acc |")
print("|---|---|---|---|---|---|---|")
for name, (c, g, t), p, target in rows:
    ips = lambda r: r["train_images_per_sec"] if r else float("nan")
    acc = lambda r: f"{100 * r['test_accuracy']:.2f}%" if r else "failed"
    fp32 = max([ips(r) for r in (c, g) if r] or [float("nan")])
    print(f"| {name} | {ips(c):.0f} / {ips(g):.0f} / {ips(t):.0f} | {ips(p):.0f} | {fp32 / ips(p):.2f}x / {ips(t) / ips(p):.2f}x | {target}x | {acc(c)} / {acc(g)} / {acc(t)} | {acc(p)} |")
b = a[8]
if b or len(sys.argv) > 9:
    print(f"resnet20 b128 graph + bf16: {ips(b):.0f} img/s ({ips(b) / ips(a[7]):.2f}x PyTorch eager fp32), test accuracy {acc(b)}")
PY

#!/usr/bin/env bash
# The GPU checks, as one short run on a lent GPU machine (no network there; Python 3.12 with
# torch, timm, scikit-learn and pandas, but not zarr or faiss). Two steps:
#
#   bash benchmarks/device_checks.sh --prepare   # here: wheels of what the GPU image lacks, into .whl/
#   bash benchmarks/device_checks.sh             # there, with .whl carried: the three benchmarks on cuda
#
# Each benchmark compares against its reference in the same run and prints the machine; the
# outputs land in $OUT (or benchmarks/out) as one text file each.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    for pkg in zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 \
               faiss-cpu==1.15.1; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$pkg"
    done
    ls .whl
    exit 0
fi

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
out="${OUT:-benchmarks/out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 benchmarks/fit_speed.py --device cuda 2>&1 | tee "$out/fit_speed.txt"
python3 benchmarks/finetune_step.py --device cuda --batch 64 --image-size 224 2>&1 \
    | tee "$out/finetune_step.txt"
python3 benchmarks/dump_overhead.py --device cuda --backbone vit_b --image-size 518 \
    --batch-size 64 --workers 8 --classes 20 --per-class 32 2>&1 | tee "$out/dump_overhead.txt"

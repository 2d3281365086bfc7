#!/usr/bin/env bash
# The GPU checks, as one short run on a lent GPU machine (no network there; Python 3.12 with
# torch, timm, scikit-learn and pandas, but not zarr or faiss). Two steps:
#
#   bash benchmarks/device_checks.sh --prepare   # here: wheels of what the GPU image lacks, into .whl/
#   bash benchmarks/device_checks.sh             # there, with .whl carried: the three benchmarks on cuda
#
# Each benchmark compares against its reference in the same run and prints the machine; the
# outputs land in $OUT (or benchmarks/out) as one text file each. A benchmark that fails or
# runs past its time limit is reported and the next one still runs: device time is scarce.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    mkdir -p .whl
    exclude="$(git rev-parse --git-path info/exclude)"  # also right in a git worktree
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
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
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
out="${OUT:-benchmarks/out}"
mkdir -p "$out"

bench() {  # bench NAME SECONDS ARGS...: one benchmark, its output in $out/NAME.txt
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 "benchmarks/$name.py" "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    [[ $rc == 0 ]] || echo "$name FAILED (exit $rc; 124 = past its $limit s)" | tee -a "$out/$name.txt"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
bench fit_speed 180 --device cuda
bench finetune_step 150 --device cuda --batch 64 --image-size 224 --seconds 60
bench dump_overhead 180 --device cuda --backbone vit_b --image-size 518 --batch-size 64 \
    --workers 8 --classes 20 --per-class 32

#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what tests/gpu/run.sh installs on a CUDA machine that has only torch and no
# network: every pin of tests/gpu/requirements.txt (without dependencies, so never torch) and NVIDIA DALI
# with its dependencies. Run it where pip reaches PyPI, for the GPU machine's Python and CUDA driver:
#
#   bash tests/gpu/prepare_wheels.sh                           this interpreter's Python, DALI for CUDA 13
#   PY_VERSION=3.12 CUDA=12 bash tests/gpu/prepare_wheels.sh   another Python; a CUDA 12 driver
#   SPLIT=60M bash tests/gpu/prepare_wheels.sh                 cut wheels over 60 MB into NAME.part-NN files
#                                                              (run.sh joins them: for size-limited copies)
#
# Then copy the working tree with .whl/ to the GPU machine and run `bash tests/gpu/run.sh` there.
# About 300 MB, most of it DALI (CUDA 13: ~200 MB; CUDA 12: ~425 MB).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
pyver="${PY_VERSION:-$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')}"
cuda="${CUDA:-13}"
dali="nvidia-dali-cuda${cuda}0==${DALI_VERSION:-2.4.0}"
out="$root/.whl"
mkdir -p "$out"
pins="$(grep -Ev '^[[:space:]]*(#|$)' tests/gpu/requirements.txt)"
download=("$python" -m pip download -q --disable-pip-version-check --dest "$out" --only-binary=:all:
    --implementation cp --python-version "$pyver" --platform manylinux_2_28_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform linux_x86_64)

echo "[wheels] Python $pyver, $dali -> $out"
# DeepSpeed publishes only a source archive: build its pure-Python wheel here (no ops are compiled)
"$python" -m pip wheel -q --disable-pip-version-check --no-deps --wheel-dir "$out" \
    "$(grep '^deepspeed==' <<<"$pins")"
grep -v '^deepspeed==' <<<"$pins" | "${download[@]}" --no-deps -r /dev/stdin
"${download[@]}" -c tests/gpu/requirements.txt "$dali"

if [ -n "${SPLIT:-}" ]; then
    find "$out" -maxdepth 1 -name '*.whl' -size "+${SPLIT}" | while read -r whl; do
        split -b "$SPLIT" -d -a 2 "$whl" "$whl.part-"
        rm "$whl"
    done
fi
ls -l "$out" | tail -n +2
du -sh "$out"

#!/usr/bin/env bash
# One-call GPU verification: DALI NVDEC decode parity vs PyAV, SDPA / flash-attn bf16 parity (fwd+bwd), and a
# short bf16 ZeRO-2 ViT-B pretraining fed by DALI and by synthetic input; ends with one SUMMARY line (MFU,
# DALI-fed / synthetic throughput ratio, parity errors). About 8 minutes on one GPU; see tests/gpu/verify.py.
#
#   bash tests/gpu/run.sh [verify.py options]      e.g. --steps 40 --micro 32
#
# Works on a CUDA machine that has nothing but a Python with a CUDA torch, and no network: what the checks
# import and is missing is installed offline from the wheels in .whl/ (made elsewhere by
# tests/gpu/prepare_wheels.sh and copied with the working tree) into .gpu-site/, a folder put first on
# PYTHONPATH, so the machine's own torch and environment stay untouched. With the project's .venv
# (launch/setup.sh) nothing is installed. Without CUDA it runs up to the first CUDA-only step and exits 0
# with a SKIP line.
#   PYTHON=/path/to/python   the interpreter whose torch to use (default: .venv/bin/python, else python3)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
wheels="$root/.whl"
site="$root/.gpu-site"
needs=(deepspeed nvidia.dali av webdataset einops safetensors yaml tqdm)
export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}"  # the installed wheels, then tubelet itself

missing() {  # the modules of $needs that "$1" cannot find
    "$1" - "${needs[@]}" <<'PY'
import importlib.util
import sys


def absent(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except ModuleNotFoundError:  # a missing parent package (nvidia for nvidia.dali)
        return True


print(" ".join(m for m in sys.argv[1:] if absent(m)))
PY
}

python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
if ! "$python" -c "import torch" 2>/dev/null; then
    echo "tests/gpu/run.sh: $python cannot import torch; install a CUDA build of torch (or set PYTHON=...)" >&2
    exit 1
fi

lacking="$(missing "$python")"
if [ -n "$lacking" ]; then
    echo "[gpu] $python lacks: $lacking; installing from $wheels into $site"
    if ! compgen -G "$wheels/*.whl*" >/dev/null; then
        echo "tests/gpu/run.sh: no wheels in $wheels: run 'bash tests/gpu/prepare_wheels.sh' where pip reaches" \
            "PyPI (for this machine's Python) and copy .whl/ here" >&2
        exit 1
    fi
    for first in "$wheels"/*.whl.part-00; do  # wheels cut by `SPLIT=... prepare_wheels.sh`: join them back
        [ -e "$first" ] || continue
        whole="${first%.part-00}"
        [ -f "$whole" ] || cat "$whole".part-* >"$whole"
    done
    pip=("$python" -m pip install --disable-pip-version-check -q --no-index --find-links "$wheels"
        --target "$site" --upgrade)
    "${pip[@]}" --no-deps -r tests/gpu/requirements.txt
    dali="$(find "$wheels" -maxdepth 1 -name 'nvidia_dali_cuda*.whl' | head -1)"
    if [ -n "$dali" ]; then  # DALI's own dependencies (per CUDA version) from .whl/, shared ones pinned
        "${pip[@]}" -c tests/gpu/requirements.txt "$dali"
    fi
    lacking="$(missing "$python")"
    if [ -n "$lacking" ]; then
        echo "[gpu] still missing after the install: $lacking (the checks that need them will fail)" >&2
    fi
fi
exec "$python" tests/gpu/verify.py "$@"

#!/usr/bin/env bash
# One-call GPU verification: DALI NVDEC decode parity vs PyAV, SDPA / flash-attn bf16 parity (fwd+bwd), the
# masked-video step ours vs HF VideoMAE (time, memory), and a short bf16 ZeRO-2 ViT-B pretraining fed by DALI
# and by synthetic input; ends with one SUMMARY line (MFU, DALI-fed / synthetic throughput ratio, parity
# errors, ours vs HF ratios). A few minutes on one GPU; see tests/gpu/verify.py.
#
#   bash tests/gpu/run.sh [verify.py options]      e.g. --steps 40 --micro 32
#
# Works on a CUDA machine that has nothing but a Python with a CUDA torch, and no network: what the checks
# import and is missing is installed offline from the wheels in .whl/ (made elsewhere by
# tests/gpu/prepare_wheels.sh and copied with the working tree) into .gpu-site/, a folder put first on
# PYTHONPATH: only the distributions the machine lacks, so its own torch and packages stay in use. With the project's .venv
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

absent_wheels() {  # the wheels in "$2" whose distribution "$1" does not have (any version)
    "$1" - "$2" <<'PY'
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    name = whl.name.split("-")[0]
    try:
        version(name)
    except PackageNotFoundError:
        try:
            version(re.sub(r"[-_.]+", "-", name))
        except PackageNotFoundError:
            print(whl)
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
    # every wheel of .whl/ (the pins and DALI with its dependencies) whose distribution this interpreter
    # lacks, without dependencies: what the machine already has (numpy, pydantic, ...) is not shadowed
    mapfile -t todo < <(absent_wheels "$python" "$wheels")
    if [ "${#todo[@]}" -gt 0 ]; then
        echo "[gpu] installing ${#todo[@]} wheels: $(printf '%s ' "${todo[@]##*/}")"
        "$python" -m pip install --disable-pip-version-check -q --no-index --no-deps --no-compile \
            --target "$site" --upgrade "${todo[@]}"
    fi
    if [ -f "$site/nvidia/__init__.py" ]; then
        # DALI's wheels make nvidia/ here a regular package, which would hide the machine's own nvidia/
        # (CUDA libraries of its torch): extend its path to every nvidia/ folder on sys.path instead
        echo '__path__ = __import__("pkgutil").extend_path(__path__, __name__)' >"$site/nvidia/__init__.py"
    fi
    lacking="$(missing "$python")"
    if [ -n "$lacking" ]; then
        echo "[gpu] still missing after the install: $lacking (the checks that need them will fail)" >&2
    fi
fi
exec "$python" tests/gpu/verify.py "$@"

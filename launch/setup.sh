#!/usr/bin/env bash
# One set-up path for the README's two commands: a .venv with torch installed first, then tubelet.
#   TUBELET_TORCH   pip spec for torch (default torch==2.13.0, from pip's own configuration); "system" reuses
#                   the interpreter's own torch (e.g. a CUDA build) through --system-site-packages.
#   TUBELET_TORCH_INDEX  a package index for torch only, e.g. https://download.pytorch.org/whl/cpu (PyPI's
#                   Linux torch is the CUDA build: on a CPU machine this avoids its GBs of nvidia-* wheels).
#   TUBELET_CUDA    13 (default) or 12: which NVIDIA DALI build to install.
#   TUBELET_EXTRAS  extras to install (default dev; flash builds flash-attn against the installed torch).
# Idempotent: a second run with the same inputs only checks a stamp.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
torch_spec="${TUBELET_TORCH:-torch==2.13.0}"
cuda="${TUBELET_CUDA:-13}"
extras="${TUBELET_EXTRAS:-dev}"

if [ ! -x .venv/bin/python ]; then
  if [ "$torch_spec" = system ]; then
    "$python" -m venv --system-site-packages .venv
  else
    "$python" -m venv .venv
  fi
elif [ "$torch_spec" = system ] && ! grep -qi "include-system-site-packages *= *true" .venv/pyvenv.cfg; then
  echo "[setup] TUBELET_TORCH=system, but .venv was made without the system's packages (its torch would" \
    "be used, not yours): remove .venv and run this again" >&2
  exit 2
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
quiet_pip() { "${pip[@]}" "$@" 2> >(grep -v -e "is ignored: it is neither a file nor a directory" >&2); }

stamp=.venv/.tubelet-setup
want="$(cat pyproject.toml launch/setup.sh | sha256sum | cut -c1-16) $torch_spec ${TUBELET_TORCH_INDEX:-} $cuda $extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "[setup] installing into .venv ($torch_spec, DALI cuda$cuda, extras: $extras)" >&2
if [ "$torch_spec" != system ]; then
  quiet_pip install "$torch_spec" ${TUBELET_TORCH_INDEX:+--index-url "$TUBELET_TORCH_INDEX"}
fi
# flash-attn compiles against the torch installed above, so it cannot build in pip's isolated environment
others="$(echo ",$extras," | sed 's/,flash,/,/g; s/^,*//; s/,*$//')"
quiet_pip install -e ".${others:+[$others]}"
if [ "$others" != "$extras" ]; then
  quiet_pip install --no-build-isolation "flash-attn>=2.6"
fi
# boto3 at the release of the botocore aiobotocore pinned (they are released in lockstep): MLflow's S3
# artifact store needs it, and a plain `boto3` requirement sends pip's resolver backtracking through s3fs
botocore="$(.venv/bin/python -c 'import botocore; print(botocore.__version__)')"
quiet_pip install "boto3==$botocore"
if [ "$cuda" = 12 ]; then
  # both builds install the package `nvidia.dali`, and tubelet's requirements name the CUDA-13 one: install
  # the CUDA-12 one, remove the CUDA-13 one, then write the CUDA-12 files again (the removal took the shared ones)
  quiet_pip install -e ".[${others:+$others,}cuda12]"
  "${pip[@]}" uninstall -y nvidia-dali-cuda130 >/dev/null 2>&1 || true
  dali12="$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("nvidia-dali-cuda120"))')"
  quiet_pip install --force-reinstall --no-deps "nvidia-dali-cuda120==$dali12"
fi
echo "$want" > "$stamp"
echo "[setup] done" >&2

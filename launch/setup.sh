#!/usr/bin/env bash
# One set-up path for the README's two commands: a .venv with torch installed first, then tubelet.
#   TUBELET_TORCH   pip spec for torch (default torch==2.13.0, the CPU wheel here); "system" reuses the
#                   interpreter's own torch (e.g. a CUDA build) through --system-site-packages.
#   TUBELET_CUDA    13 (default) or 12: which NVIDIA DALI build to install.
#   TUBELET_EXTRAS  extras to install (default dev).
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
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
quiet_pip() { "${pip[@]}" "$@" 2> >(grep -v -e "is ignored: it is neither a file nor a directory" >&2); }

stamp=.venv/.tubelet-setup
want="$(cat pyproject.toml launch/setup.sh | sha256sum | cut -c1-16) $torch_spec $cuda $extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "[setup] installing into .venv ($torch_spec, DALI cuda$cuda, extras: $extras)" >&2
if [ "$torch_spec" != system ]; then
  quiet_pip install "$torch_spec"
fi
quiet_pip install -e ".[$extras]"
# boto3 at the release of the botocore aiobotocore pinned (they are released in lockstep): MLflow's S3
# artifact store needs it, and a plain `boto3` requirement sends pip's resolver backtracking through s3fs
botocore="$(.venv/bin/python -c 'import botocore; print(botocore.__version__)')"
quiet_pip install "boto3==$botocore"
if [ "$cuda" = 12 ]; then
  "${pip[@]}" uninstall -y nvidia-dali-cuda130 >/dev/null 2>&1 || true
  quiet_pip install -e ".[$extras,cuda12]"
fi
echo "$want" > "$stamp"
echo "[setup] done" >&2

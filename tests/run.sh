#!/usr/bin/env bash
# The README's test command: set-up (idempotent) + lint + the default test suite.
#   bash tests/run.sh                 default run (CPU, < ~12 min on 2 cores)
#   bash tests/run.sh -m slow         the slow suites;  bash tests/run.sh -m gpu   GPU tests (need CUDA)
#   bash tests/run.sh tests/models    any pytest arguments
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash launch/setup.sh
.venv/bin/ruff check .
# Tests start Ray, DeepSpeed (gloo) and MLflow servers on 127.0.0.1 only.
export DS_ACCELERATOR=cpu RAY_USAGE_STATS_ENABLED=0 MLFLOW_TRACKING_URI="" PYTHONHASHSEED=0
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"

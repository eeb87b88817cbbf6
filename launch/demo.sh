#!/usr/bin/env bash
# The README's main command: set-up, then the whole pipeline on the embedded defaults
# (CPU, synthetic data, local Ray, local MLflow store), end to end.
#   bash launch/demo.sh            writes everything under ./demo (DEMO_DIR to change it)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash launch/setup.sh
demo="${DEMO_DIR:-$root/demo}"
py=.venv/bin/python
export DS_ACCELERATOR=cpu RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$demo/mlflow.db}"
mkdir -p "$demo"
start=$SECONDS
step() { printf '\n\033[1m== %s\033[0m (%ds)\n' "$*" $((SECONDS - start)); }

step "1/4 synthetic motion videos (4 classes: the direction of motion)"
$py -m data_shards synth --out "$demo/videos" --videos 240 --classes 4 --frames 24 --size 32 --codec vp9 --seed 0

step "2/4 shards: validate + write (Ray, local cluster)"
$py -m data_shards build "$demo/videos/labels.csv" --out "$demo/shards" --val-fraction 0.15 --test-fraction 0.15 \
  --shard-samples 64 --quiet
$py -m data_shards verify "$demo/shards"

step "3/4 masked-video pretraining (tiny ViT, DeepSpeed ZeRO-2 on CPU)"
$py -m pretrain --config pretrain/configs/tiny_cpu.yaml data.shards="$demo/shards" train.run_dir="$demo/runs/pretrain" \
  --resume auto

step "4/4 export the pretrained model"
$py -m pretrain export "$demo/runs/pretrain" "$demo/models/pretrained"

step "done"
echo "MLflow runs: .venv/bin/mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI   (then open http://127.0.0.1:5000)"

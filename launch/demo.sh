#!/usr/bin/env bash
# The README's main command: set-up, then the whole pipeline on the embedded defaults
# (CPU, synthetic data, local Ray, local MLflow store), end to end:
#   synth -> shards -> pretrain -> fine-tune (scratch baseline, full, LoRA; each registered in MLflow)
#   -> test evaluation (into each fine-tune's MLflow run) -> predict -> continual learning (naive vs replay)
#   -> serve over HTTP (Ray Serve) while the update loop runs three rounds (promote, promote, refuse)
#   bash launch/demo.sh            writes everything under ./demo (DEMO_DIR to change it; DEMO_PORT: 8000)
# Re-running resumes: shards and finished runs are kept (delete ./demo for a fresh start).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash launch/setup.sh
demo="${DEMO_DIR:-$root/demo}"
py=.venv/bin/python
export DS_ACCELERATOR=cpu RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$demo/mlflow.db}"
mkdir -p "$demo"
start=$SECONDS
step() { printf '\n\033[1m== %s\033[0m (%ds)\n' "$*" $((SECONDS - start)); }
S="$demo/shards"
R="$demo/runs"
MODEL_NAME=tubelet-demo
# a fine-tune registers its best model as a new version of $MODEL_NAME, once (not again when a re-run resumes it)
register() { [ -f "$1/model/config.json" ] || echo "tracking.register_as=$MODEL_NAME"; }

step "1/9 synthetic motion videos: 4 classes, the direction of motion (visible only over time)"
$py -m data_shards synth --out "$demo/videos" --videos 400 --classes 4 --frames 24 --size 32 --codec vp9 --seed 0

step "2/9 shards: validate + write (Ray, local cluster), then verify"
$py -m data_shards build "$demo/videos/labels.csv" --out "$S" --val-fraction 0.15 --test-fraction 0.15 \
  --shard-samples 64 --quiet
$py -m data_shards verify "$S"

step "3/9 masked-video pretraining (tiny ViT MAE, DeepSpeed ZeRO-2 on CPU) + export"
$py -m pretrain --config pretrain/configs/tiny_cpu.yaml data.shards="$S" train.run_dir="$R/pretrain" --resume auto
$py -m pretrain export "$R/pretrain" "$demo/models/pretrained"

step "4/9 fine-tune: from scratch (the baseline), full from the pretrained encoder"
$py -m finetune --config finetune/configs/tiny_cpu.yaml data.shards="$S" finetune.init=null \
  train.run_dir="$R/ft_scratch" $(register "$R/ft_scratch") --resume auto
$py -m finetune --config finetune/configs/tiny_cpu.yaml data.shards="$S" finetune.init="$demo/models/pretrained" \
  train.run_dir="$R/ft_full" $(register "$R/ft_full") --resume auto

step "5/9 fine-tune: LoRA (peft) from the pretrained encoder"
$py -m finetune --config finetune/configs/tiny_cpu_lora.yaml data.shards="$S" finetune.init="$demo/models/pretrained" \
  train.run_dir="$R/ft_lora" $(register "$R/ft_lora") --resume auto

step "6/9 test-set evaluation (multi-view, per-video averaging; test/* metrics into each fine-tune's MLflow run)"
$py -m finetune evaluate --shards "$S" --split test --json \
  --model "$R/ft_scratch/best" --model "$R/ft_full/best" --model "$R/ft_lora/best" | tee "$demo/test_results.jsonl"

step "7/9 predict on new files (one unreadable on purpose)"
printf 'not a video' > "$demo/broken.mp4"
mapfile -t clips < <(ls "$demo/videos/videos" | head -3)
$py -m finetune predict --model "$R/ft_full/best" --top-k 2 "${clips[@]/#/$demo/videos/videos/}" "$demo/broken.mp4" \
  || echo "(exit code $?: one file could not be read, as intended; the others were predicted)"

step "8/9 continual learning: the classes arrive in 2 experiences; replay keeps the first ones (vs naive)"
for strategy in naive replay; do
  $py -m finetune continual --config finetune/configs/tiny_cpu_continual.yaml data.shards="$S" \
    finetune.init="$demo/models/pretrained" continual.strategy=$strategy continual.classes_per_experience=2 \
    continual.memory_size=32 train.run_dir="$R/continual_$strategy" --resume auto | grep -E "^\[continual\]|after "
done

step "9/9 serve the champion, then the update loop: three batches of new videos, each a round (fine-tune @champion, gate, promote or refuse) while the server follows @champion"
B="$demo/incoming"
[ -f "$B/b1/labels.csv" ] || $py -m data_shards synth --out "$B/b1" --videos 120 --classes 4 --frames 24 --size 32 --codec vp9 --seed 11
[ -f "$B/b2/labels.csv" ] || $py -m data_shards synth --out "$B/b2" --videos 120 --classes 4 --frames 24 --size 32 --codec vp9 --seed 12 --domain 1
[ -f "$B/b3/labels.csv" ] || $py -m data_shards synth --out "$B/b3" --videos 120 --classes 4 --frames 24 --size 32 --codec vp9 --seed 13 --shuffle-labels
update() {  # one round; the report table and the decision
  $py -m finetune update --config finetune/configs/update.yaml model="$MODEL_NAME" work_dir="$demo/update" "$@" \
    --resume auto 2>&1 | grep -E '^\[update\] (round |batch|PROMOTED|REFUSED)|^  '
}
echo "-- round 1: new videos of the training look; no champion yet: starts from the full fine-tune's best model"
update round=round1 videos="$B/b1/labels.csv" init="$R/ft_full/best"
port="${DEMO_PORT:-8000}"
$py -m finetune serve --model "models:/$MODEL_NAME@champion" --port "$port" --reload-interval 2 > "$demo/serve.log" 2>&1 &
server=$!
trap 'touch "$demo/client.stop"; kill -INT "$server" 2> /dev/null || true' EXIT  # a failed round stops them too
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 1; done
clip="$demo/videos/videos/${clips[0]}"
echo "\$ curl --data-binary @$(basename "$clip") 'http://127.0.0.1:$port/predict?top_k=2'"
curl -s -w '  (HTTP %{http_code})\n' --data-binary @"$clip" "http://127.0.0.1:$port/predict?top_k=2"
echo "\$ curl --data-binary @broken.mp4 http://127.0.0.1:$port/predict"
curl -s -w '  (HTTP %{http_code})\n' --data-binary @"$demo/broken.mp4" "http://127.0.0.1:$port/predict"
rm -f "$demo/client.stop"
$py launch/demo_client.py "http://127.0.0.1:$port" "$clip" "$demo/client.stop" &
client=$!
echo "-- round 2: a new look (domain 1: dark background), the same classes; the server keeps answering"
update round=round2 videos="$B/b2/labels.csv"
echo "-- round 3: a batch whose labels were shuffled by mistake"
update round=round3 videos="$B/b3/labels.csv"
sleep 4  # one reload interval and a little: the server has seen the final @champion
touch "$demo/client.stop"
wait "$client" || echo "(the client saw failed requests: see above)"
kill -INT "$server"
wait "$server" || true
trap - EXIT

step "summary"
$py - "$demo" <<'PY'
import json, sys
from pathlib import Path
demo = Path(sys.argv[1])
results = [json.loads(line) for line in open(demo / "test_results.jsonl") if line.strip()]
def run_id(run: Path) -> str:
    f = run / "mlflow_run.json"
    return json.loads(f.read_text())["run_id"][:12] if f.is_file() else "-"
pre = demo / "runs" / "pretrain"
losses = [json.loads(l)["loss"] for l in open(pre / "metrics.jsonl") if '"loss"' in l]
print(f"pretraining: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} logged steps, MLflow run {run_id(pre)}")
print(f"{'run':<12}{'init':<12}{'method':<8}{'trainable %':>12}{'test top-1':>12}{'top-5':>8}{'videos':>8}  MLflow run")
for r in results:
    model = Path(r["model_dir"])
    ft = json.loads((model / "config.json").read_text()).get("extra", {}).get("finetune", {})
    init = "scratch" if not ft.get("init") else "pretrained"
    print(f"{model.parent.name:<12}{init:<12}{ft.get('method', '?'):<8}{ft.get('trainable_pct', 0):>11.2f}%"
          f"{100 * r['top1']:>11.1f}%{100 * r['top5']:>7.1f}%{r['n']:>8}  {run_id(model.parent)}")
print("chance: 25.0% (4 balanced classes)")
PY
echo
echo "MLflow: .venv/bin/mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI   (then open http://127.0.0.1:5000:"
echo "        experiment tubelet-demo compares the runs' test/top1; Models shows $MODEL_NAME and its versions)"
echo "Serve:  $py -m finetune serve --model models:/$MODEL_NAME@champion --tracking-uri $MLFLOW_TRACKING_URI"
echo "        (curl --data-binary @clip.mp4 http://127.0.0.1:8000/predict)"
echo "Update: reports in $demo/update/rounds/*/report.json;"
echo "        $py -m finetune rollback $MODEL_NAME --tracking-uri $MLFLOW_TRACKING_URI moves @champion back"
echo "done in $((SECONDS - start)) s; everything is under $demo"

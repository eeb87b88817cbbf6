#!/usr/bin/env bash
# Object storage end to end on one machine, as a cluster without a shared disk would run it:
#   a local S3 server (SeaweedFS, tests/s3server.py) -> build the videos into a bucket -> verify there
#   -> pretrain from the bucket with checkpoints in it -> SIGKILL after a checkpoint -> resume on a "new node"
#   -> fine-tune from the run in the bucket into the bucket -> evaluate and predict the model from the bucket.
#   bash launch/storage_demo.sh     writes under ./demo_s3 (DEMO_DIR to change it); a fresh start each time
# Every step after the videos runs in its own empty working directory with its own cache (TUBELET_CACHE): what
# one step hands the next goes through the bucket only. The runs are short (~2 min in all on 2 cores): this
# shows where things live and that a killed run resumes; launch/demo.sh trains for accuracy.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash launch/setup.sh
demo="${DEMO_DIR:-$root/demo_s3}"
py="$root/.venv/bin/python"
export DS_ACCELERATOR=cpu RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 TQDM_DISABLE=1 MLFLOW_TRACKING_URI=""
rm -rf "$demo"
mkdir -p "$demo"
start=$SECONDS
step() { printf '\n\033[1m== %s\033[0m (%ds)\n' "$*" $((SECONDS - start)); }
fresh() { mktemp -d "$demo/node.XXXX"; }  # a "node": an empty working directory, its cache inside
node() {  # node CMD...: run CMD on a fresh node
  local d
  d="$(fresh)"
  (cd "$d" && TUBELET_CACHE="$d/cache" exec "$@")
}
shown() {  # shown LOG PATTERN CMD...: CMD on a fresh node into LOG; the lines matching PATTERN, all of LOG if it fails
  local log=$1 pattern=$2
  shift 2
  node "$@" > "$log" 2>&1 || { cat "$log" >&2; echo "failed: $* (log: $log)" >&2; exit 1; }
  grep -E "$pattern" "$log" || true
}
B=s3://tubelet
PRE=(--config "$root/pretrain/configs/tiny_cpu.yaml" data.shards=$B/shards/demo train.run_dir=$B/runs/mae
  train.steps=150 train.eval_every=50 train.visualize_every=0 checkpoint.every=50 tracking.enabled=false)

step "1/6 a local S3 server (SeaweedFS on 127.0.0.1, its own credentials) and the bucket"
"$py" tests/s3server.py "$demo/s3" --bucket tubelet > "$demo/s3.log" 2>&1 &
server=$!
trainer=
stop() {  # on any exit: the killed run's trainer if still there, then the server
  [ -z "$trainer" ] || kill -KILL "$trainer" 2> /dev/null || true
  kill -TERM "$server" 2> /dev/null || true
  wait 2> /dev/null || true
}
trap stop EXIT
until [ -f "$demo/s3/env.sh" ]; do
  kill -0 "$server" 2> /dev/null || { cat "$demo/s3.log"; echo "the S3 server did not start" >&2; exit 1; }
  sleep 0.5
done
# shellcheck disable=SC1091
source "$demo/s3/env.sh"
cat "$demo/s3.log"

step "2/6 videos -> shards in the bucket (local Ray), verified there"
"$py" -m data_shards synth --out "$demo/videos" --videos 160 --classes 4 --frames 24 --size 32 --codec vp9 --seed 0
node "$py" -m data_shards build "$demo/videos/labels.csv" --out $B/shards/demo --val-fraction 0.15 \
  --test-fraction 0.15 --shard-samples 32 --quiet
node "$py" -m data_shards verify $B/shards/demo

step "3/6 pretrain from the bucket, checkpoints into it; SIGKILL once the first checkpoint is complete"
d="$(fresh)"
(cd "$d" && TUBELET_CACHE="$d/cache" exec "$py" -m pretrain "${PRE[@]}") > "$demo/pretrain_killed.log" 2>&1 &
trainer=$!  # the trainer itself (exec), so SIGKILL reaches it
"$py" - $trainer "$B/runs/mae/checkpoints" <<'PY' || { cat "$demo/pretrain_killed.log"; exit 1; }
import os, signal, sys, time
from data_shards import storage
pid, ckpts = int(sys.argv[1]), sys.argv[2]
def complete() -> list[str]:  # what --resume auto may take: checkpoints whose marker is in the bucket
    return [t for t in storage.listdir(ckpts) if t.startswith("step_") and storage.exists(f"{ckpts}/{t}/complete")]
def running() -> bool:  # the trainer (the script's child, reaped only by its `wait`) has not exited
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
while not complete():
    if not running():
        sys.exit("the run ended before its first checkpoint:")
    time.sleep(0.2)
os.kill(pid, signal.SIGKILL)
print(f"killed (SIGKILL); complete checkpoints in the bucket: {' '.join(complete())}")
PY
wait $trainer 2> /dev/null || true
trainer=

step "4/6 resume on another node: --resume auto takes the newest complete checkpoint from the bucket"
shown "$demo/pretrain_resumed.log" "resuming from|^\[tubelet\] (finished|checkpoint)" \
  "$py" -m pretrain "${PRE[@]}" --resume auto

step "5/6 fine-tune from the pretrained run in the bucket, into the bucket"
shown "$demo/finetune.log" "^\[finetune\] (init|method|finished|best|model)" \
  "$py" -m finetune --config "$root/finetune/configs/tiny_cpu.yaml" finetune.init=$B/runs/mae \
  data.shards=$B/shards/demo train.run_dir=$B/runs/ft train.steps=150 tracking.enabled=false

step "6/6 the model from the bucket: test-set evaluation, and predict on two files"
shown "$demo/evaluate.log" "^\{" "$py" -m finetune evaluate --model $B/runs/ft/model --shards $B/shards/demo \
  --split test --json --no-mlflow | tail -1 | "$py" -c "import json, sys; r = json.load(sys.stdin); print(f\"test top-1 {100 * r['top1']:.1f} % on {r['n']} videos (chance 25 %)\")"
mapfile -t clips < <(ls "$demo/videos/videos" | head -2)
node "$py" -m finetune predict --model $B/runs/ft/model --top-k 1 "${clips[@]/#/$demo/videos/videos/}"

step "what the bucket holds"
"$py" - <<PY
from data_shards import storage
for prefix in ("shards/demo", "runs/mae", "runs/mae/checkpoints", "runs/ft"):
    print(f"$B/{prefix}/:", " ".join(sorted(storage.listdir("$B/" + prefix))))
PY
echo "done in $((SECONDS - start)) s; the server's data is under $demo/s3 (stopped now)"

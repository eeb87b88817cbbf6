"""End to end through `python -m finetune` with real DeepSpeed (gloo): train → best/final model dirs →
export (+HF) → evaluate → predict; early stopping in the engine; a 2-rank ZeRO-2 run; a pretraining run
dir as the starting point; the `deepspeed` launcher."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from ft_helpers import PY, REPO, base_env, free_port, ft_args, ok, run_cli, run_ranks


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lora_from_mae_dir_then_export_evaluate_predict(
    tmp_path: Path, shards: Path, mae_dir: Path, raw_videos: list[Path]
) -> None:
    run = tmp_path / "run"
    r = run_cli(ft_args(run, shards, mae_dir, "finetune.method=lora", "train.eval_every=2"))
    ok(r)
    log = r.stdout + r.stderr
    assert "missing (expected, new classification head): head.bias, head.weight" in log
    assert "not used (expected, MAE decoder (pretraining only))" in log
    assert "method lora:" in log and "trainable of" in log
    assert (run / "best" / "model.safetensors").is_file() and (run / "model" / "model.safetensors").is_file()
    final = json.loads((run / "model" / "config.json").read_text())
    assert final["extra"]["finetune"]["merged"] is True and final["class_names"][0] == "move_right"

    out, hf = tmp_path / "exported", tmp_path / "hf"
    ok(run_cli(["export", str(run), str(out), "--hf", str(hf)]))
    from transformers import AutoImageProcessor, VideoMAEForVideoClassification

    processor = AutoImageProcessor.from_pretrained(str(hf))  # the pipeline's processor: see test_hf_pipeline
    assert (processor.num_frames, processor.crop_size["height"]) == (8, 32)

    from finetune.model_dir import load_finetuned
    from pretrain.models import load_model

    ours = load_model(out).eval()
    theirs = VideoMAEForVideoClassification.from_pretrained(str(hf)).eval()
    x = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(pixel_values=x.permute(0, 2, 1, 3, 4)).logits, ours(x), atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(
            load_model(run / "model").eval()(x), ours(x)
        )  # export == the run's own export
        # evaluate / predict read HF directories too
        torch.testing.assert_close(load_finetuned(hf)(x), ours(x), atol=1e-5, rtol=1e-4)

    r = run_cli(
        [
            "evaluate",
            "--model",
            str(out),
            "--shards",
            str(shards),
            "--split",
            "test",
            "--json",
            "--no-mlflow",
            "--backend",
            "pyav",
        ]
    )
    ok(r)
    line = json.loads([x for x in r.stdout.splitlines() if x.startswith("{")][-1])
    assert line["n"] == 4 and 0 <= line["top1"] <= 1 and line["views"] == "2x1"
    assert (out / "eval_test" / "confusion.png").stat().st_size > 1000
    assert "macro avg" in (out / "eval_test" / "report.txt").read_text()

    r = run_cli(["predict", "--model", str(out), *map(str, raw_videos), "--top-k", "2", "--json"])
    assert r.returncode == 1, r.stdout + r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert [Path(row["video"]).name for row in rows] == ["good0.mp4", "broken.mp4", "good1.webm"]
    assert "error" in rows[1] and all(len(rows[i]["top"]) == 2 for i in (0, 2))
    assert "broken.mp4" in r.stderr
    assert abs(sum(t["score"] for t in rows[0]["top"]) - 1) < 0.5


def test_early_stopping_ends_the_run_with_a_model(tmp_path: Path, shards: Path) -> None:
    run = tmp_path / "run"
    r = run_cli(
        ft_args(run, shards, None, "train.steps=8", "optim.lr=1e-12", "train.eval_every=1", "eval.patience=2")
    )
    ok(r)
    assert "early stopping" in r.stdout + r.stderr
    vals = [m for m in metrics(run) if "val/top1" in m]
    assert len(vals) == 3  # best at step 1, two evaluations without improvement
    assert max(m["step"] for m in metrics(run)) == 3
    assert (run / "model" / "model.safetensors").is_file() and (run / "best" / "config.json").is_file()


def test_two_ranks_zero2_gathers_val_videos(tmp_path: Path, shards: Path, mae_dir: Path) -> None:
    run = tmp_path / "run"
    args = ft_args(
        run,
        shards,
        mae_dir,
        "finetune.method=lora",
        "train.micro_batch_size=2",
        "train.eval_every=2",
        "deepspeed.zero_stage=2",
    )
    ok(run_ranks(args, 2))
    vals = [m for m in metrics(run) if "val/top1" in m]
    assert vals and all(m["val/videos"] == 4.0 for m in vals)  # 2 per rank, all-gathered
    from pretrain.models import load_model

    model = load_model(run / "model")  # ZeRO-2 consolidation kept the frozen base weights
    assert model.cfg.num_classes == 4


@pytest.mark.slow
def test_pretraining_run_dir_as_init_and_deepspeed_launcher(tmp_path: Path, shards: Path) -> None:
    pre = tmp_path / "pre"
    cmd = [
        PY, "-m", "pretrain", "--config", str(REPO / "pretrain/configs/tiny_cpu.yaml"), f"train.run_dir={pre}",
        "data.backend=synthetic", "train.steps=2", "optim.warmup_steps=1", "train.eval_every=0",
        "train.visualize_every=0", "checkpoint.every=0", "tracking.enabled=false", "tracking.log_model=false",
    ]  # fmt: skip
    ok(subprocess.run(cmd, env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=240))
    run = tmp_path / "ft"
    ds = Path(PY).with_name("deepspeed")
    cmd = [str(ds), "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "launch" / "finetune.sh"),
           *ft_args(run, shards, pre, "train.micro_batch_size=2", "finetune.method=adapter")]  # fmt: skip
    r = subprocess.run(cmd, env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    ok(r)
    assert "init from run" in r.stdout + r.stderr
    assert (run / "model" / "peft_sidecar.safetensors").is_file()


@pytest.mark.slow
def test_partial_fine_tune_resumed_on_another_world_size_keeps_its_frozen_weights(
    tmp_path: Path, shards: Path, mae_dir: Path
) -> None:
    """2 ranks ZeRO-2 → 1 rank ZeRO-3: DeepSpeed's universal checkpoint carries only what the optimizer
    holds; the frozen blocks (never re-read from finetune.init on resume) come from the consolidated
    checkpoint, and the layer-decay groups keep their own learning rates and weight decay."""
    run = tmp_path / "run"
    common = ["finetune.method=partial", "train.steps=4", "data.val_split=null", "tracking.log_model=true"]
    common.append("train.seed=1")  # mae_dir was drawn with seed 0: a fresh model must not equal it by chance
    ok(run_ranks(ft_args(run, shards, mae_dir, *common, "train.micro_batch_size=2", "train.stop_at=2"), 2))
    r = run_ranks([*ft_args(run, shards, mae_dir, *common, "deepspeed.zero_stage=3"), "--resume", "auto"], 1)
    ok(r)
    assert "now 1 ranks, ZeRO-3" in r[0].stdout and "universal checkpoint" in r[0].stdout
    from finetune.model_dir import load_finetuned
    from pretrain.models import load_model

    start, tuned = load_model(mae_dir).state_dict(), load_finetuned(run / "model").state_dict()
    frozen = [k for k in start if k.startswith(("encoder.patch_embed.", "encoder.blocks.0."))]
    assert len(frozen) == 15 and all(torch.equal(tuned[k], start[k]) for k in frozen)
    trained = "encoder.blocks.1.mlp.fc1.weight"  # partial_blocks=1: the last block trains
    assert not torch.equal(tuned[trained], start[trained])

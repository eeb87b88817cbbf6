"""Real DeepSpeed (gloo, CPU) training on real shards: exact resume, NaN skip/stop, preemption, refusal,
launchers and export. Every run is a separate process group in its own processes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from engine_helpers import (
    PY,
    REPO,
    base_env,
    deepspeed_launch,
    free_port,
    losses,
    ok,
    relative_gap,
    run_ranks,
    tiny_args,
)
from safetensors.torch import load_file

from pretrain.models import MaskedVideoAutoencoder, load_model

STEPS = 6


def _resume_case(tmp_path, shards, world: int, stage: int, launcher: str) -> None:
    """N steps + resume + N steps gives bit-identical losses to 2N steps."""
    common = [f"train.steps={STEPS}", f"deepspeed.zero_stage={stage}"]

    def train(run_dir, *extra):
        args = tiny_args(run_dir, shards, *common, *extra)
        if launcher == "deepspeed":
            ok(deepspeed_launch(args, world))
        else:
            ok(run_ranks(args, world))

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight)
    train(resumed, f"train.stop_at={STEPS // 2}")
    marker = json.loads((resumed / "checkpoints" / f"step_{STEPS // 2:08d}" / "complete").read_text())
    assert marker["world_size"] == world and marker["zero_stage"] == stage
    train(resumed, "--resume", "auto")
    a, b = losses(straight), losses(resumed)
    assert [s for s, _ in a] == list(range(1, STEPS + 1))
    assert a == b, f"resume is not exact:\n{a}\n{b}"
    assert a[-1][1] < a[0][1]  # and it learns
    if world == 1 and launcher == "env":  # 1 rank x 2 accumulation steps = 2 ranks: one trajectory
        two = tmp_path / "two_ranks"
        ok(run_ranks(tiny_args(two, shards, *common), 2))
        assert relative_gap(losses(two), a) <= 1e-5, (losses(two), a)  # measured: 0 (bit-identical)


@pytest.mark.parametrize(
    ("world", "stage", "launcher"),
    [
        (1, 2, "env"),
        # 75 s; the default run resumes 2 ranks in test_backbones (exact) and test_elastic
        pytest.param(2, 3, "deepspeed", marks=pytest.mark.slow),
        pytest.param(1, 3, "env", marks=pytest.mark.slow),
        pytest.param(2, 2, "env", marks=pytest.mark.slow),
    ],
)
def test_exact_resume(tmp_path, shards, world: int, stage: int, launcher: str) -> None:
    _resume_case(tmp_path, shards, world, stage, launcher)


def test_nonfinite_loss_is_skipped_on_every_rank(tmp_path, shards) -> None:
    """Rank 1 alone sees NaN on its 2nd and 3rd micro-batch: both ranks skip them, nobody hangs."""
    run_dir = tmp_path / "run"
    extra = ["train.steps=4", "deepspeed.zero_stage=3", "data.val_split=val", "train.eval_batches=1"]
    args = ["--nan-calls", "2,3", "--nan-rank", "1", *tiny_args(run_dir, shards, *extra)]
    results = run_ranks(args, 2, module="worker")
    ok(results)
    assert "DONE step=4 nonfinite=2" in results[0].stdout
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert train_rows[-1]["nonfinite_total"] == 2 and all(r["loss"] == r["loss"] for r in train_rows)
    assert rows[-1]["val/recon_loss"] > 0  # ZeRO-3 evaluation on the val split (collective forwards)


def test_consecutive_nonfinite_losses_stop_the_run(tmp_path, shards) -> None:
    run_dir = tmp_path / "run"
    extra = [
        "train.steps=20",
        "checkpoint.every=2",
        "train.max_consecutive_nonfinite=3",
        "train.micro_batch_size=8",
    ]
    args = ["--nan-from", "6", *tiny_args(run_dir, shards, *extra)]
    (r,) = run_ranks(args, 1, module="worker")
    assert r.returncode == 3, r.stdout[-3000:]
    assert "3 consecutive non-finite losses at step 5" in r.stdout
    assert "step_00000004" in r.stdout  # the message names the last good checkpoint
    complete = sorted(p.parent.name for p in (run_dir / "checkpoints").glob("*/complete"))
    assert complete == ["step_00000002", "step_00000004"]


def test_sigterm_checkpoints_and_resume_continues(tmp_path) -> None:
    """Preemption through `bash launch/pretrain.sh`: SIGTERM → checkpoint at the step boundary → exit 0."""
    run_dir = tmp_path / "run"
    cmd = ["bash", str(REPO / "launch" / "pretrain.sh"), *tiny_args(run_dir, None, "train.steps=100000")]
    p = subprocess.Popen(
        cmd, env=base_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-3000:]
    assert "SIGTERM: checkpointing at the next step boundary" in out
    (ckpt,) = [c.parent for c in (run_dir / "checkpoints").glob("*/complete")]
    step = int(ckpt.name.split("_")[1])
    assert step >= 3 and (run_dir / "checkpoints" / "latest").read_text() == ckpt.name
    # resume may change the run length (train.steps is not part of the resume signature)
    r = subprocess.run(
        [
            "bash",
            str(REPO / "launch" / "pretrain.sh"),
            *tiny_args(run_dir, None, f"train.steps={step + 2}"),
            "--resume",
            "auto",
        ],
        env=base_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    ok(r)
    assert losses(run_dir)[-1][0] == step + 2
    assert f"finished at step {step + 2}" in r.stdout


def test_sigterm_to_the_whole_process_group_still_checkpoints(tmp_path, shards) -> None:
    """`timeout`, `kill -TERM -PGID` and schedulers signal every process of the job, DataLoader workers
    included: a worker must leave SIGTERM to the trainer (a killed worker failed the run, no checkpoint)."""
    import os

    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, shards, "train.steps=100000", "data.num_workers=1")
    p = subprocess.Popen([PY, "-m", "pretrain", *args], env=base_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0 and "preempted" in out, out[-3000:]
    assert (run_dir / "checkpoints" / "latest").is_file()


def test_resume_refuses_incompatible_config(tmp_path) -> None:
    run_dir = tmp_path / "run"
    ok(run_ranks(tiny_args(run_dir, None, "train.steps=3"), 1))
    r = run_ranks(
        [
            *tiny_args(
                run_dir,
                None,
                "train.steps=6",
                "model.decoder_depth=2",
                "mask.ratio=0.5",
                "train.global_batch_size=16",
                "train.micro_batch_size=16",
            ),
            "--resume",
            "auto",
        ],
        1,
    )[0]
    assert r.returncode == 2
    assert "refusing to resume" in r.stdout
    assert (
        "model.decoder_depth: checkpoint None vs now 2" in r.stdout
        and "mask.ratio: checkpoint 0.75 vs now 0.5" in r.stdout
        and "train.global_batch_size: checkpoint 8 vs now 16" in r.stdout
    )
    assert "micro_batch_size" not in r.stdout  # re-partitioned on resume, not a refusal
    # ZeRO 1-3 re-partition into each other; stage 0 (a plain optimizer) only resumes as stage 0
    r = run_ranks(
        [*tiny_args(run_dir, None, "train.steps=6", "deepspeed.zero_stage=0"), "--resume", "auto"], 1
    )[0]
    assert r.returncode == 2 and "deepspeed.zero_stage=2, this run has 0" in r.stdout, r.stdout[-2000:]
    r = run_ranks(tiny_args(run_dir, None, "train.steps=6"), 1)[0]  # no --resume with checkpoints present
    assert r.returncode == 2 and "--resume auto" in r.stdout
    # a checkpoint marked complete whose optimizer file was cut short after the fact: named, not a traceback
    (optim,) = (run_dir / "checkpoints" / "step_00000003").glob("*optim_states.pt")
    optim.write_bytes(optim.read_bytes()[:1000])
    r = run_ranks([*tiny_args(run_dir, None, "train.steps=6"), "--resume", "auto"], 1)[0]
    assert r.returncode == 2 and "step_00000003: the checkpoint cannot be read" in r.stdout, r.stdout[-2000:]
    assert "it may be damaged" in r.stdout and "Traceback" not in r.stdout


@pytest.mark.parametrize("stage", [0, pytest.param(3, marks=pytest.mark.slow)])  # ZeRO-3: 9 s, -m slow
def test_export_round_trip(tmp_path, stage: int) -> None:
    run_dir, out = tmp_path / "run", tmp_path / "model"
    ok(run_ranks(tiny_args(run_dir, None, "train.steps=3", f"deepspeed.zero_stage={stage}"), 1))
    r = subprocess.run(
        [PY, "-m", "pretrain", "export", str(run_dir), str(out)],
        env=base_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    ok(r)
    model = load_model(out)
    assert isinstance(model, MaskedVideoAutoencoder)
    ckpt = run_dir / "checkpoints" / "step_00000003"
    if stage == 0:
        raw = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)[
            "module"
        ]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        raw = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    sd = model.state_dict()
    assert set(raw) == set(sd)
    for k, v in raw.items():
        assert torch.equal(sd[k], v.float()), k
    assert not torch.equal(sd["mask_token"], torch.zeros_like(sd["mask_token"]))
    x = torch.randn(2, 3, 8, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, :48] = True
    assert torch.isfinite(model(x, mask).loss)
    if stage == 0:
        _export_refuses_what_is_not_its_to_write(tmp_path, run_dir)


def _export_refuses_what_is_not_its_to_write(tmp_path: Path, run_dir: Path) -> None:
    """One `error:` line (exit 2), nothing written: a folder of other files, the run itself, the other
    stage's export command, a folder that is not a run."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    cases = [
        ("pretrain", run_dir, notes, "a folder of other files (no model.safetensors)"),
        ("pretrain", run_dir, run_dir, "the run directory itself"),
        ("pretrain", notes, tmp_path / "m2", "not a training run directory"),
        ("finetune", run_dir, tmp_path / "m2", "a pretrain run (MaskedVideoAutoencoder): export it with "
                                               "`python -m pretrain export`"),
    ]  # fmt: skip
    for module, run, out, message in cases:
        r = subprocess.run([PY, "-m", module, "export", str(run), str(out)], env=base_env(), cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (out, r.stderr[-2000:])
    assert [p.name for p in notes.iterdir()] == ["todo.txt"] and not (tmp_path / "m2").exists()
    assert not (run_dir / "model.safetensors").exists()

def test_a_checkpoint_deepspeed_cannot_consolidate_is_named_with_deepspeeds_output(tmp_path) -> None:
    """DeepSpeed's consolidation runs quietly (its progress would cut into the training bar), so when it fails
    the error carries the checkpoint and what DeepSpeed printed."""
    from pretrain.engine import checkpoint as ckpt_io

    ckpt = tmp_path / "checkpoints" / "step_00000003"
    ckpt.mkdir(parents=True)
    (ckpt / ckpt_io.COMPLETE).write_text(json.dumps({"step": 3, "zero_stage": 2}))
    with pytest.raises(RuntimeError, match="ZeRO consolidation failed") as e:
        ckpt_io.consolidated_state_dict(ckpt)
    assert str(ckpt) in str(e.value)


def test_torchrun_two_ranks_synthetic(tmp_path) -> None:
    """`torchrun --nproc_per_node 2 -m pretrain` (the module entry point, without the launch script)."""
    run_dir = tmp_path / "run"
    torchrun = Path(PY).with_name("torchrun")
    r = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            "pretrain",
            *tiny_args(run_dir, None, "train.steps=3", "tracking.log_model=true"),
        ],
        env=base_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    ok(r)
    assert [s for s, _ in losses(run_dir)] == [1, 2, 3]
    assert set(load_file(str(run_dir / "model" / "model.safetensors"))) >= {"mask_token"}
    # DeepSpeed's "untested optimizer, proceed with caution" is not shown for torch's AdamW with the step veto
    assert "untested optimizer" not in r.stdout + r.stderr
    # nor the progress DeepSpeed's ZeRO consolidation prints while the final model is written
    assert "zero checkpoint" not in r.stdout + r.stderr and "Loading checkpoint shards" not in r.stderr


def test_zero_steps_without_importing_deepspeeds_muon_kernels(tmp_path) -> None:
    """DeepSpeed's ZeRO optimizer imports its Muon modules on every rank, which `torch.compile` their kernels
    (1.1-1.4 s of start-up); `import_deepspeed` defers them. A ZeRO-2 run must train without them; any other
    name of those modules is still the real one, and a Muon optimizer made anyway is the real one."""
    r = subprocess.run(
        [PY, "-X", "importtime", "-m", "pretrain", *tiny_args(tmp_path / "run", None, "train.steps=3")],
        env=base_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    ok(r)
    assert [s for s, _ in losses(tmp_path / "run")] == [1, 2, 3]
    assert "deepspeed.runtime.zero.muon" not in r.stderr and "torch._inductor.compile_fx" not in r.stderr
    code = (
        "from pretrain.engine.dist import import_deepspeed\n"
        "import_deepspeed()\n"
        "from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam as stand_in\n"
        "from deepspeed.runtime.zero.muon import original_muon\n"
        "print(stand_in.__module__, original_muon.adam_update.__module__)\n"
        "import torch\n"
        "muon = stand_in([dict(params=[torch.nn.Parameter(torch.ones(2, 2))], use_muon=True)])\n"
        "from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam\n"
        "print(isinstance(muon, MuonWithAuxAdam))\n"
    )
    out = subprocess.run([PY, "-c", code], env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["pretrain.engine.dist", "deepspeed.runtime.zero.muon.original_muon", "True"]

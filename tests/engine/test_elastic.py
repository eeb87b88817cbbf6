"""Elastic resume with real DeepSpeed (gloo, CPU) on real shards: a run stopped on one number of ranks and
ZeRO stage continues on another from the same weights and Adam moments (DeepSpeed's universal
checkpoint), and the epoch goes on at its global sample position: every sample of the interrupted epoch is
seen exactly once, in the epoch's order, step by step. Here the micro-batch size changes with the world size
too; at the same micro-batch size an elastic 2 → 1 resume follows the uninterrupted run's losses exactly (masks,
crops and micro-batches keyed by sample, not by rank): tests/engine/test_same_trajectory.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_helpers import losses, ok, run_ranks, tiny_args

from data_shards.loader import SamplingSpec, build_loader
from data_shards.loader.sampling import epoch_order

STEPS, STOP, GLOBAL = 8, 2, 4  # 16 train clips: 4 steps per epoch, stopped mid-epoch 0


def _args(run_dir: Path, shards: Path, world: int, stage: int, *extra: str) -> list[str]:
    return [
        "--log-keys",
        *tiny_args(
            run_dir,
            shards,
            f"train.steps={STEPS}",
            f"train.global_batch_size={GLOBAL}",
            f"train.micro_batch_size={GLOBAL // world // 2 or 1}",
            f"deepspeed.zero_stage={stage}",
            *extra,
        ),
    ]


def _keys_by_step(run_dir: Path) -> dict[int, list[str]]:
    """Every micro-batch's keys from every rank's log, grouped by the optimizer step they went into."""
    out: dict[int, list[str]] = {}
    for f in sorted((run_dir / "keys").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            out.setdefault(row["step"], []).extend(row["keys"])
    return out


def _expected_steps(shards: Path, seed: int = 0) -> dict[int, set[str]]:
    """Step -> the keys an uninterrupted run takes: GLOBAL consecutive samples of each epoch's order."""
    spec = SamplingSpec(frames=8, stride=2, size=32)
    refs = build_loader(shards, "train", batch_size=1, spec=spec, backend="pyav", num_workers=0).refs
    out = {}
    for step in range(1, STEPS + 1):
        epoch, k = divmod(step - 1, len(refs) // GLOBAL)
        order = epoch_order(len(refs), seed=seed, epoch=epoch, shuffle=True)
        out[step] = {refs[i].key for i in order[k * GLOBAL : (k + 1) * GLOBAL].tolist()}
    return out


def _elastic_case(tmp_path: Path, shards: Path, before: tuple[int, int], after: tuple[int, int]) -> None:
    (w0, z0), (w1, z1) = before, after
    run_dir, dump = tmp_path / "run", tmp_path / "state"
    probe = ["--dump-state", f"{dump}0"] if z0 == 3 else []  # see _worker.py: ZeRO-3 only here
    ok(run_ranks([*_args(run_dir, shards, w0, z0, f"train.stop_at={STOP}"), *probe], w0, module="worker"))
    second = run_ranks(
        [*_args(run_dir, shards, w1, z1), "--resume", "auto", "--dump-state", f"{dump}1"], w1, module="worker"
    )
    ok(second)
    line = next(x for x in second[0].stdout.splitlines() if "resuming from" in x)
    assert f"written by {w0} ranks, ZeRO-{z0}" in line and f"now {w1} ranks, ZeRO-{z1}" in line, line
    assert "universal checkpoint" in line and "sample-exact, not bit-exact" in line, line

    # the data: each step takes the samples an uninterrupted run takes; the interrupted epoch sees every
    # train sample exactly once, and so does the next one
    seen = _keys_by_step(run_dir)
    assert sorted(seen) == list(range(1, STEPS + 1))
    assert {s: set(k) for s, k in seen.items()} == _expected_steps(shards)
    per_epoch = len(_expected_steps(shards)) // 2
    for e in range(2):
        keys = [k for s in range(1 + e * per_epoch, 1 + (e + 1) * per_epoch) for k in seen[s]]
        assert len(keys) == len(set(keys)) == 16

    # the model and optimizer state: what the new layout holds right after the restore is what was saved
    restored = torch.load(f"{dump}1.restored.pt", weights_only=True)
    groups, steps = restored.pop("__groups__"), restored.pop("__steps__")
    assert sorted({wd for wd, _ in groups}) == [0.0, 0.05]  # each group keeps its own weight decay
    *per_group, distinct = steps
    assert per_group == [float(STOP)] * len(per_group) and distinct == len(per_group)  # one step each
    ckpt = run_dir / "checkpoints" / f"step_{STOP:08d}"
    universal = ckpt / "universal" / "zero"
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    saved_fp32 = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    assert set(restored) == set(saved_fp32)
    for name, (fp32, m1, m2) in restored.items():
        assert torch.equal(fp32, saved_fp32[name].float()), name
        assert torch.equal(m1, torch.load(universal / name / "exp_avg.pt", weights_only=False)["param"]), name
        assert torch.equal(m2, torch.load(universal / name / "exp_avg_sq.pt", weights_only=False)["param"]), (
            name
        )
    assert any(m2.abs().sum() > 0 for _, _, m2 in restored.values())  # moments carried over, not fresh
    if Path(f"{dump}0.final.pt").exists():  # the first run was ZeRO-3: its own view of its final state
        final = torch.load(f"{dump}0.final.pt", weights_only=True)
        final.pop("__groups__"), final.pop("__steps__")
        assert all(torch.equal(a, b) for n in final for a, b in zip(final[n], restored[n]))

    # the loss curve goes on where it was (not from scratch); the LR schedule continues by step
    curve = losses(run_dir)
    assert [s for s, _ in curve] == list(range(1, STEPS + 1))
    (_, l1), (_, l_stop), (_, l_next) = curve[0], curve[STOP - 1], curve[STOP]
    assert abs(l_next - l_stop) < 0.25 * l_stop and l_next < l1, curve


def test_two_ranks_zero2_resume_on_one_rank_zero3(tmp_path: Path, shards: Path) -> None:
    _elastic_case(tmp_path, shards, (2, 2), (1, 3))


@pytest.mark.slow
def test_one_rank_zero3_resume_on_two_ranks_zero2(tmp_path: Path, shards: Path) -> None:
    _elastic_case(tmp_path, shards, (1, 3), (2, 2))


@pytest.mark.slow
def test_zero_stage_change_on_the_same_ranks_follows_the_uninterrupted_run(
    tmp_path: Path, shards: Path
) -> None:
    """2 ranks ZeRO-2 → 2 ranks ZeRO-3: every rank keeps its own random streams and data position, so the
    curve is the uninterrupted one up to float32 reduction order (measured 3e-8)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ok(run_ranks(_args(straight, shards, 2, 2), 2, module="worker"))
    ok(run_ranks(_args(resumed, shards, 2, 2, f"train.stop_at={STOP}"), 2, module="worker"))
    second = run_ranks([*_args(resumed, shards, 2, 3), "--resume", "auto"], 2, module="worker")
    ok(second)
    line = next(x for x in second[0].stdout.splitlines() if "resuming from" in x)
    assert "universal checkpoint" in line and "per-rank random streams" not in line, line
    a, b = losses(straight), losses(resumed)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, STEPS + 1))
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) <= 1e-6, (a, b)

"""Order, rank split, sampling parameters, synthetic backend and `auto`: no decoding involved."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from data_shards.loader import LoaderError, SamplingSpec, build_loader, choose_backend
from data_shards.loader.sampling import apply_short_policy, epoch_plan, eval_boxes, plan_video, sample_rng


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [12, 13, 7])
def test_drop_last_each_rank_floor_and_disjoint(world: int, n: int) -> None:
    plans = [
        epoch_plan(
            n, seed=3, epoch=1, rank=r, world_size=world, shuffle=True, drop_last=True, videos_per_batch=1
        )
        for r in range(world)
    ]
    seen = np.concatenate([p.indices for p in plans])
    assert all(len(p.indices) == n // world for p in plans)
    assert len(set(seen.tolist())) == len(seen) == (n // world) * world
    assert not any(p.pad.any() for p in plans)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [12, 13, 7])
def test_padded_eval_covers_every_sample_exactly_once(world: int, n: int) -> None:
    plans = [
        epoch_plan(
            n, seed=0, epoch=0, rank=r, world_size=world, shuffle=False, drop_last=False, videos_per_batch=4
        )
        for r in range(world)
    ]
    assert len({len(p.indices) for p in plans}) == 1  # same length on all ranks
    assert len({p.num_batches for p in plans}) == 1
    real = np.concatenate([p.indices[~p.pad] for p in plans])
    assert sorted(real.tolist()) == list(range(n))
    assert sum(int(p.pad.sum()) for p in plans) == -n % world


def test_dropped_remainder_rotates_across_epochs() -> None:
    def dropped(epoch: int) -> set[int]:
        kept = {
            i
            for r in range(3)
            for i in epoch_plan(
                10,
                seed=0,
                epoch=epoch,
                rank=r,
                world_size=3,
                shuffle=True,
                drop_last=True,
                videos_per_batch=1,
            ).indices.tolist()
        }
        return set(range(10)) - kept

    assert len({frozenset(dropped(e)) for e in range(6)}) > 1


def test_order_deterministic_per_seed_epoch() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        return epoch_plan(
            50, seed=seed, epoch=epoch, rank=0, world_size=1, shuffle=True, drop_last=True, videos_per_batch=1
        ).indices.tolist()

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize(("n", "world", "vpb"), [(24, 2, 3), (13, 3, 2), (10, 4, 2), (7, 1, 2)])
def test_plan_from_a_batch_boundary_is_the_tail_of_the_full_plan(
    n: int, world: int, vpb: int, drop_last: bool
) -> None:
    """Same world size: continuing from global position k * vpb * world gives the full plan's remaining
    batches, indices and padding flags alike (what makes a same-size resume bit-exact)."""
    kw = dict(seed=2, epoch=3, world_size=world, shuffle=True, drop_last=drop_last, videos_per_batch=vpb)
    for rank in range(world):
        full = epoch_plan(n, rank=rank, **kw)  # type: ignore[arg-type]
        for k in range(full.num_batches + 1):
            tail = epoch_plan(n, rank=rank, start=k * vpb * world, **kw)  # type: ignore[arg-type]
            assert tail.num_batches == full.num_batches - k
            assert tail.indices.tolist() == full.indices[k * vpb :].tolist()
            assert tail.pad.tolist() == full.pad[k * vpb :].tolist()


@pytest.mark.parametrize(("before", "after", "batch_after"), [(2, 1, 4), (2, 4, 2), (1, 2, 5), (3, 2, 3)])
def test_resume_on_another_number_of_ranks_takes_every_sample_once(
    before: int, after: int, batch_after: int
) -> None:
    """2 batches on `before` ranks, state of rank 0, the rest of the epoch on `after` ranks with another batch
    size: together every sample of the epoch exactly once, in the epoch's order, with the same clips."""
    spec = SamplingSpec(frames=2, stride=1, size=8)

    def make(rank: int, world: int, batch: int):
        return build_loader(
            "/nonexistent", "train", batch_size=batch, spec=spec, backend="synthetic", num_samples=24,
            rank=rank, world_size=world, seed=7, epoch=1,
        )  # fmt: skip

    whole = {k: v for b in make(0, 1, 4) for k, v in zip(b["key"], b["video"])}
    first = [make(r, before, 2) for r in range(before)]
    its = [iter(x) for x in first]
    taken = [b for _ in range(2) for it in its for b in [next(it)]]
    states = [x.state_dict() for x in first]
    assert {s["position"] for s in states} == {2 * 2 * before}  # the same global position on every rank
    rest = []
    for r in range(after):
        x = make(r, after, batch_after)
        x.load_state_dict(states[0])
        x.set_epoch(1)  # what the trainer does: keeps the position
        rest += list(x)
    keys = [k for b in taken + rest for k in b["key"]]
    assert sorted(keys) == sorted(whole) and len(set(keys)) == len(keys) == 24
    order = list(whole)  # one rank, in order: the epoch's order
    assert {k for b in rest for k in b["key"]} == set(order[2 * 2 * before :])
    assert all(torch.equal(v, whole[k]) for b in taken + rest for k, v in zip(b["key"], b["video"]))


def test_short_policies() -> None:
    idx = np.array([0, 4, 8, 12, 16])
    assert apply_short_policy(idx, 10, "repeat").tolist() == [0, 4, 8, 2, 6]
    assert apply_short_policy(idx, 10, "pad_last").tolist() == [0, 4, 8, 9, 9]
    with pytest.raises(ValueError):
        SamplingSpec(short_video="explode")


def test_plan_train_and_eval_views() -> None:
    spec = SamplingSpec(frames=4, stride=2, size=32, clips_per_video=3)
    p = plan_video(40, 48, 64, spec, sample_rng(0, 0, 7))
    assert len(p.frames) == 4 and len(p.views) == 3
    for v in p.views:
        assert v.y0 >= 0 and v.y0 + v.h <= 48 and v.x0 >= 0 and v.x0 + v.w <= 64
    again = plan_video(40, 48, 64, spec, sample_rng(0, 0, 7))  # same (seed, epoch, index) -> same plan
    assert again.views == p.views and again.frames.tolist() == p.frames.tolist()
    ev = SamplingSpec(frames=4, stride=2, size=32, train=False, eval_clips=3, eval_crops=3)
    pe = plan_video(40, 48, 64, ev, None)
    assert len(pe.frames) == 12 and len(pe.views) == 9
    starts = pe.frames[::4].tolist()
    assert starts[0] == 0 and starts[-1] == 40 - 7  # uniformly spaced over the whole video
    assert eval_boxes(48, 64, 3) == [(0, 0, 48, 48), (0, 8, 48, 48), (0, 16, 48, 48)]
    assert eval_boxes(48, 64, 1) == [(0, 8, 48, 48)]


def test_synthetic_backend(vp9_set: Path) -> None:
    spec = SamplingSpec(frames=4, stride=2, size=16, clips_per_video=2)
    loader = build_loader(vp9_set, "train", batch_size=4, spec=spec, backend="synthetic")
    assert loader.backend == "synthetic" and loader.num_samples == 12 and len(loader) == 6
    batches = list(loader)
    assert len(batches) == 6
    b = batches[0]
    assert b["video"].shape == (4, 3, 4, 16, 16) and b["video"].dtype == torch.float32
    assert b["label"].dtype == torch.int64 and b["key"][0] == b["key"][1]
    keys = [k for b in batches for k in b["key"][::2]]
    assert sorted(keys) == sorted(f"synthetic-{i:08d}" for i in range(12))
    # resume
    fresh = build_loader(vp9_set, "train", batch_size=4, spec=spec, backend="synthetic")
    it = iter(fresh)
    next(it), next(it)
    state = fresh.state_dict()
    again = build_loader(vp9_set, "train", batch_size=4, spec=spec, backend="synthetic")
    again.load_state_dict(state)
    assert [b["key"] for b in again] == [b["key"] for b in batches[2:]]
    synth_only = build_loader(
        "/nonexistent", "train", batch_size=2, spec=spec, backend="synthetic", num_samples=10
    )
    assert synth_only.num_samples == 10


def test_state_dict_mismatch_is_an_error(vp9_set: Path) -> None:
    spec = SamplingSpec(frames=4, stride=2, size=16)
    a = build_loader(vp9_set, "train", batch_size=2, spec=spec, backend="synthetic", seed=1)
    b = build_loader(vp9_set, "train", batch_size=2, spec=spec, backend="synthetic", seed=2)
    with pytest.raises(LoaderError, match="seed"):
        b.load_state_dict(a.state_dict())


def test_auto_selection(vp9_set: Path, h264_set: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert choose_backend({"vp9"})[:2] == ("dali", "cpu")
    assert choose_backend({"vp9", "mjpeg"})[:2] == ("dali", "cpu")
    assert choose_backend({"h264"})[0] == "pyav"
    assert choose_backend({"vp9", "h264"})[0] == "pyav"
    assert choose_backend(set())[0] == "pyav"
    spec = SamplingSpec(frames=4, stride=2, size=16)
    with caplog.at_level(logging.INFO, logger="data_shards.loader"):
        assert build_loader(vp9_set, "train", batch_size=2, spec=spec).backend == "dali-cpu"
        assert build_loader(h264_set, "train", batch_size=2, spec=spec).backend == "pyav"
    text = caplog.text
    assert "auto chose dali-cpu" in text and "auto chose pyav" in text and "h264" in text
    # the CLI's format is "%(levelname)s %(name)s: %(message)s": a message must not repeat the name
    assert caplog.records and not [r for r in caplog.records if r.name in r.getMessage()]


@pytest.mark.parametrize(("world", "vpb"), [(2, 4), (3, 2), (4, 1)])
def test_ranks_and_accumulation_steps_read_the_same_micro_batches(world: int, vpb: int) -> None:
    """The order is dealt in batches: rank r's b-th batch is batch b * world + r of 1 rank with the same batch
    size (its accumulation steps), so a micro-batch holds the same samples however a step is split."""
    kw = dict(seed=4, epoch=2, shuffle=True, drop_last=True, videos_per_batch=vpb)
    one = epoch_plan(30, rank=0, world_size=1, **kw)  # type: ignore[arg-type]
    for rank in range(world):
        plan = epoch_plan(30, rank=rank, world_size=world, **kw)  # type: ignore[arg-type]
        assert plan.num_batches == 30 // (world * vpb)
        for b in range(plan.num_batches):
            assert plan.batch(b)[0].tolist() == one.batch(b * world + rank)[0].tolist()


def test_batches_carry_the_keys_of_their_draws() -> None:
    """index / epoch / view: what a task keys its own per-sample draws by (masks, mixup)."""
    spec = SamplingSpec(frames=2, stride=1, size=8, clips_per_video=2)
    loader = build_loader(
        "/nonexistent", "train", batch_size=4, spec=spec, backend="synthetic", num_samples=8,
        rank=1, world_size=2, seed=7, epoch=3,
    )  # fmt: skip
    batch = next(iter(loader))
    first = loader.plan().batch(0)[0].tolist()
    assert batch["index"].tolist() == [i for i in first for _ in range(2)]
    assert batch["epoch"].tolist() == [3] * 4 and batch["view"].tolist() == [0, 1, 0, 1]
    assert batch["key"] == [f"synthetic-{i:08d}" for i in batch["index"].tolist()]


def test_an_epoch_is_whole_global_batches_however_they_are_split() -> None:
    """drop_last keeps a multiple of the step (world x batch x accumulation steps): 1 rank x 2 accumulation
    steps and 2 ranks end the epoch at the same sample, so no step mixes two epochs on one layout only."""
    kw = dict(seed=1, epoch=0, shuffle=True, drop_last=True, videos_per_batch=4)
    one = epoch_plan(20, rank=0, world_size=1, batches_per_step=2, **kw)  # type: ignore[arg-type]
    two = [epoch_plan(20, rank=r, world_size=2, **kw) for r in range(2)]  # type: ignore[arg-type]
    assert one.num_batches == 4 and [p.num_batches for p in two] == [2, 2]
    assert sorted(one.indices.tolist()) == sorted(i for p in two for i in p.indices.tolist())

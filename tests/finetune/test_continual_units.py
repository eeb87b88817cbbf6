"""Continual learning, in process: the metric definitions on hand-made matrices (Avalanche's), the replay
memory (bounds, reservoir fairness, class balance, determinism), the replay loader's mixing and resume, the
EWC/MAS penalty's injected gradient against plain autograd, LwF's distillation, and config errors that name
the key before any process starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data_shards import format as fmt
from finetune.continual import metrics as m
from finetune.continual.config import ContinualConfig, plan_experiences
from finetune.continual.memory import MemoryItem, ReplayLoader, ReplayMemory
from finetune.continual.regularize import QuadraticPenalty, distillation_loss
from pretrain.engine import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_follow_avalanche_definitions() -> None:
    # Avalanche's functional test matrix (rows: after experience i), lower triangle
    matrix = [[1.0, None, None], [0.5, 0.8, None], [0.2, 1.0, 0.5]]
    assert m.forgetting_per_experience(matrix) == [pytest.approx(0.8), pytest.approx(-0.2), None]
    assert m.forgetting(matrix) == pytest.approx(0.3)  # the last experience has no forgetting yet: left out
    assert m.bwt(matrix) == pytest.approx(-0.3)
    assert m.average_accuracy(matrix) == pytest.approx((0.2 + 1.0 + 0.5) / 3)
    assert m.forgetting(matrix, row=1) == pytest.approx(0.5) and m.forgetting(matrix, row=0) is None
    assert m.average_accuracy(matrix, row=1) == pytest.approx(0.65)
    before, at_init = [0.1, 0.3, 0.6], [0.1, 0.2, 0.25]  # FWT_k = before_k - init_k for k >= 1
    assert m.forward_transfer(before, at_init) == pytest.approx(((0.3 - 0.2) + (0.6 - 0.25)) / 2)
    s = m.summary(matrix, before, at_init)
    assert s["forgetting_per_step"] == [None, pytest.approx(0.5), pytest.approx(0.3)]


def test_heatmap_is_written(tmp_path: Path) -> None:
    path = m.plot_matrix([[0.9, None], [0.4, 0.8]], ["exp 0", "exp 1"], tmp_path / "m.png", "naive")
    assert path.stat().st_size > 2000


# ------------------------------------------------------------------------------------------------ memory


def items(n: int, classes: int = 4, start: int = 0) -> list[MemoryItem]:
    return [MemoryItem("S", f"k{i}", i % classes) for i in range(start, start + n)]


def test_reservoir_is_bounded_deterministic_and_fair() -> None:
    a, b = ReplayMemory(10, "reservoir", seed=3), ReplayMemory(10, "reservoir", seed=3)
    for k in range(4):
        a.update(items(25, start=25 * k), k)
        b.update(items(25, start=25 * k), k)
        assert len(a.items) == min(10, 25 * (k + 1))
    assert a.items == b.items and a.seen == 100
    assert ReplayMemory.from_json(a.to_json()) == a  # the state saved between experiences
    # every one of the 100 videos is kept with probability 10/100, whichever experience it came in
    kept = np.zeros(100)
    for seed in range(300):
        mem = ReplayMemory(10, "reservoir", seed=seed)
        for k in range(4):
            mem.update(items(25, start=25 * k), k)
        for it in mem.items:
            kept[int(it.ref[1:])] += 1
    per_experience = kept.reshape(4, 25).sum(1) / 300
    assert np.allclose(per_experience, 2.5, atol=0.35), per_experience


def test_class_balanced_memory_shares_slots_equally() -> None:
    mem = ReplayMemory(12, "class_balanced", seed=0)
    mem.update([MemoryItem("S", f"a{i}", i % 2) for i in range(40)], 0)  # classes 0, 1
    assert mem.per_class() == {0: 6, 1: 6}
    mem.update([MemoryItem("S", f"b{i}", 2 + i % 2) for i in range(40)], 1)  # classes 2, 3 arrive
    assert mem.per_class() == {0: 3, 1: 3, 2: 3, 3: 3} and len(mem.items) == 12
    mem.update([MemoryItem("S", f"c{i}", 4) for i in range(2)], 2)  # a class with only 2 videos
    assert len(mem.items) <= 12 and mem.per_class()[4] == 2


class FakeLoader:
    """Batches {"video": [i], "label": [i], "key": [f"{tag}{epoch}:{i}"]}, resumable like the shard loader."""

    def __init__(self, n: int, tag: str) -> None:
        self.n, self.tag, self.epoch, self.pos, self.pending = n, tag, 0, 0, 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.pos, self.pending = epoch, 0, 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        start, self.pending = self.pending, 0
        for i in range(start, self.n):
            self.pos = i + 1
            yield {
                "video": torch.tensor([float(i)]),
                "label": torch.tensor([i]),
                "key": [f"{self.tag}{self.epoch}:{i}"],
            }

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.pos, self.pending = s["epoch"], s["pos"], s["pos"]


def test_replay_loader_mixes_every_batch_cycles_the_memory_and_resumes() -> None:
    def keys(loader: ReplayLoader, epochs: range) -> list[list[str]]:
        out = []
        for e in epochs:
            loader.set_epoch(e)
            out += [b["key"] for b in loader]
        return out

    straight = ReplayLoader(FakeLoader(5, "c"), FakeLoader(2, "m"))
    assert len(straight) == 5
    seen = keys(straight, range(2))
    assert seen[:3] == [["c0:0", "m0:0"], ["c0:1", "m0:1"], ["c0:2", "m1:0"]]  # the memory cycles its epochs
    # stop after 3 batches of epoch 1, resume from the state: the same continuation
    a = ReplayLoader(FakeLoader(5, "c"), FakeLoader(2, "m"))
    first = keys(a, range(1))
    a.set_epoch(1)
    it = iter(a)
    first += [next(it)["key"] for _ in range(3)]
    b = ReplayLoader(FakeLoader(5, "c"), FakeLoader(2, "m"))
    b.load_state_dict(a.state_dict())
    assert first + [x["key"] for x in b] == seen


# ---------------------------------------------------------------------------------------- regularisers


def test_penalty_gradient_injected_per_module_equals_autograd_of_the_penalty() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    anchor = {k: v.detach().clone() for k, v in net.state_dict().items()}
    importance = {k: torch.rand_like(v) for k, v in anchor.items()}
    with torch.no_grad():  # move away from the anchor
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(5, 4)
    lam, scale = 7.0, 0.5

    reference = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    expected = sum(0.5 * lam * (importance[n] * (p - anchor[n]) ** 2).sum() for n, p in reference.items())
    expected.backward()

    penalty = QuadraticPenalty(dict(importance), dict(anchor), lam, grad_scale=scale)
    assert penalty.attach(net) == 2
    net(x).sum().mul(0.0).backward()  # only the penalty's gradient reaches the parameters
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, scale * reference[n].grad, msg=n)
    assert float(penalty.take()) == pytest.approx(float(expected.detach()), rel=1e-5)
    net.eval()
    net(x)
    assert penalty.take() == 0.0  # no penalty in evaluation


def test_penalty_fits_a_grown_head() -> None:
    head = nn.Linear(4, 5)  # grew from 3 classes: rows 3, 4 are new
    penalty = QuadraticPenalty(
        {"weight": torch.ones(3, 4), "bias": torch.ones(3)},
        {"weight": torch.zeros(3, 4), "bias": torch.zeros(3)},
        1.0,
        1.0,
    )
    penalty.attach(head)
    head(torch.randn(2, 4)).sum().mul(0.0).backward()
    assert torch.equal(head.weight.grad[3:], torch.zeros(2, 4)) and torch.equal(
        head.weight.grad[:3], head.weight.detach()[:3]
    )


def test_distillation_is_zero_when_the_student_matches_the_teacher_on_old_classes() -> None:
    teacher = torch.randn(4, 3)
    student = torch.cat([teacher, torch.randn(4, 2)], 1)  # two new classes: ignored
    assert float(distillation_loss(student, teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(student + torch.randn(4, 5), teacher, 2.0)) > 0


# -------------------------------------------------------------------------------------------- config


@pytest.fixture(scope="module")
def manifest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest of 4 classes × 10 train videos (no tars: planning reads only the manifest)."""
    folder = tmp_path_factory.mktemp("cl_manifest")
    classes = ["a", "b", "c", "d"]
    splits = {"train": fmt.SplitInfo(samples=40, shards=1, bytes=1, per_class={c: 10 for c in classes})}
    fmt.Manifest(classes=classes, shards=[], splits=splits).save(folder)
    return folder


def cl_config(shards: Path, *over: str) -> ContinualConfig:
    cfg = load_config(
        ContinualConfig, REPO / "finetune/configs/tiny_cpu_continual.yaml", [f"data.shards={shards}", *over]
    )
    cfg.validate()
    return cfg


def test_experiences_from_groups_or_a_seeded_order(manifest_dir: Path) -> None:
    plan = plan_experiences(
        cl_config(
            manifest_dir, "continual.experiences=[[3,1],[0,2]]", "continual.classes_per_experience=null"
        )
    )
    assert [e.classes for e in plan] == [(3, 1), (0, 2)] and plan[0].name == "exp 0: d, b"
    a = plan_experiences(
        cl_config(manifest_dir, "continual.classes_per_experience=2", "continual.class_order_seed=5")
    )
    b = plan_experiences(
        cl_config(manifest_dir, "continual.classes_per_experience=2", "continual.class_order_seed=5")
    )
    assert [e.classes for e in a] == [e.classes for e in b] and sorted(c for e in a for c in e.classes) == [
        0,
        1,
        2,
        3,
    ]


@pytest.mark.parametrize(
    ("over", "message"),
    [
        (
            ["continual.experiences=[[0,1],[4]]", "continual.classes_per_experience=null"],
            r"continual\.experiences\[1\] has unknown class ids \[4\]",
        ),
        (
            ["continual.experiences=[[0,1],[]]", "continual.classes_per_experience=null"],
            r"continual\.experiences\[1\] is empty",
        ),
        (
            ["continual.experiences=[[0,1],[1,2]]", "continual.classes_per_experience=null"],
            r"repeats class ids \[1\]",
        ),
        (
            ["continual.classes_per_experience=3"],
            r"continual\.classes_per_experience=3 must divide the 4 classes",
        ),
        (
            ["continual.strategy=replay", "continual.memory_size=41"],
            r"continual\.memory_size=41 is larger than all the training data \(40 videos",
        ),
        (
            ["continual.strategy=replay", "continual.memory_size=0"],
            r"continual\.strategy=replay replays a memory",
        ),
        (["continual.strategy=ewc", "deepspeed.fp16=true", "train.device=cuda"], r"use bf16 or fp32"),
        (["continual.strategy=sgd"], r"continual\.strategy: 'sgd' is not one of"),
        (
            ["continual.strategy=replay", "continual.replay_batch_size=16"],
            r"continual\.replay_batch_size=16 must be smaller than train\.micro_batch_size=16",
        ),
    ],
)
def test_bad_configs_fail_before_any_process_naming_the_key(
    manifest_dir: Path, over: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        cl_config(manifest_dir, *over)


def test_a_strategy_without_replay_ignores_the_memory_size(manifest_dir: Path) -> None:
    """naive / ewc keep no memory: the config's memory_size (set for replay) is not a reason to refuse."""
    cl_config(manifest_dir, "continual.strategy=naive", "continual.memory_size=41")


@pytest.fixture(scope="module")
def domain_dir(manifest_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second domain with the same 4 classes (manifest only)."""
    folder = tmp_path_factory.mktemp("cl_domain1")
    fmt.load_manifest(manifest_dir).save(folder)
    return folder


def test_command_line_mode_wins_over_the_files(manifest_dir: Path, domain_dir: Path, tmp_path: Path) -> None:
    # the README's domain-incremental recipe: the shipped YAML sets classes_per_experience
    plan = plan_experiences(cl_config(manifest_dir, f"continual.domains=[{domain_dir}]"))
    assert [e.shards for e in plan] == [str(manifest_dir), str(domain_dir)]
    assert plan[1].classes == (0, 1, 2, 3)
    # a command-line experiences list replaces the file's classes_per_experience
    plan = plan_experiences(cl_config(manifest_dir, "continual.experiences=[[2,3],[0,1]]"))
    assert [e.classes for e in plan] == [(2, 3), (0, 1)]
    # and the reverse: a file in domain mode, a class-incremental command line
    shipped = (REPO / "finetune/configs/tiny_cpu_continual.yaml").read_text()
    domain_yaml = tmp_path / "domains.yaml"
    domain_yaml.write_text(shipped.replace("  classes_per_experience: 2", f"  domains: [{domain_dir}]"))
    cfg = load_config(
        ContinualConfig, domain_yaml, [f"data.shards={manifest_dir}", "continual.classes_per_experience=2"]
    )
    assert cfg.continual.domains == [] and len(plan_experiences(cfg)) == 2
    assert (
        len(plan_experiences(load_config(ContinualConfig, domain_yaml, [f"data.shards={manifest_dir}"]))) == 2
    )


def test_both_modes_on_the_command_line_say_the_fix(manifest_dir: Path, domain_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"continual\.classes_per_experience=null"):
        cl_config(manifest_dir, f"continual.domains=[{domain_dir}]", "continual.classes_per_experience=2")
    with pytest.raises(ConfigError, match=r"continual\.experiences=null"):
        cl_config(manifest_dir, "continual.experiences=[[0,1],[2,3]]", "continual.classes_per_experience=2")


@pytest.fixture(scope="module")
def uneven_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes; classes c and d have 3 train videos each (experience 1 of [[0,1],[2,3]]: 6 videos)."""
    folder = tmp_path_factory.mktemp("cl_uneven")
    per_class = {"a": 10, "b": 10, "c": 3, "d": 3}
    splits = {"train": fmt.SplitInfo(samples=26, shards=1, bytes=1, per_class=per_class)}
    fmt.Manifest(classes=list(per_class), shards=[], splits=splits).save(folder)
    return folder


def test_an_experience_too_small_for_one_step_fails_before_any_process(uneven_dir: Path) -> None:
    groups = ["continual.experiences=[[0,1],[2,3]]", "continual.memory_size=4"]
    groups += ["train.global_batch_size=8", "train.micro_batch_size=8"]
    with pytest.raises(
        ConfigError, match=r"exp 1: c, d has 6 training videos in split 'train'.*needs \(8 = "
    ):
        cl_config(uneven_dir, *groups)
    # 2 ranks × micro 4: the same 8 videos per step
    with pytest.raises(ConfigError, match=r"exp 1: c, d has 6 .*\(8 = 2 rank\(s\) × 1 micro-batch"):
        load_config(
            ContinualConfig,
            REPO / "finetune/configs/tiny_cpu_continual.yaml",
            [f"data.shards={uneven_dir}", *groups, "train.micro_batch_size=4"],
        ).validate(world_size=2)
    # replay: experience 1 reads micro − replay_batch_size = 8 − 4 of its own clips per micro-batch
    cl_config(uneven_dir, *groups, "continual.strategy=replay", "continual.replay_batch_size=4")
    with pytest.raises(ConfigError, match=r"8 − continual\.replay_batch_size=1"):
        cl_config(uneven_dir, *groups, "continual.strategy=replay", "continual.replay_batch_size=1")
    # joint trains on every class so far: 26 videos by experience 1
    cl_config(uneven_dir, *groups, "continual.strategy=joint")

"""`--print-config`: every key of every config a user writes, with its value and its meaning (the comment beside
the field in the schema), so the listing is the config reference and cannot drift from the code."""

from __future__ import annotations

import dataclasses
import subprocess
import typing
from pathlib import Path

import pytest
from procs import PY, REPO, base_env

from finetune.config import FinetuneConfig
from finetune.continual.config import ContinualConfig
from finetune.update.config import UpdateConfig
from pretrain.config import PretrainConfig
from pretrain.engine.config.describe import _comments, describe, field_comments


def _keys_without_meaning(cls: type, prefix: str = "") -> list[str]:
    notes = field_comments(cls)
    hints = typing.get_type_hints(cls)
    missing = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            missing += _keys_without_meaning(hints[f.name], f"{prefix}{f.name}.")
        elif not notes.get(f.name):
            missing.append(prefix + f.name)
    return missing


@pytest.mark.parametrize("cls", [PretrainConfig, FinetuneConfig, ContinualConfig, UpdateConfig])
def test_every_config_key_says_what_it_means(cls: type) -> None:
    assert _keys_without_meaning(cls) == [], "give these fields a comment in their section's dataclass"


def test_comments_beside_above_and_after_a_multiline_value_are_read_pragmas_are_not() -> None:
    source = (
        "class S:\n"
        '    """Doc."""\n'
        "\n"
        "    a: int = 1  # beside\n"
        "    # above, first line\n"
        "    # second line\n"
        "    b: int = 2  # type: ignore[assignment]\n"
        "    c: list[int] = field(\n"
        "        default_factory=list\n"
        "    )  # after the value\n"
        "    d: int = 4\n"
        "\n"
        "    def check(self) -> None:  # not a field\n"
        "        x: int = 5  # a local, not a field\n"
    )
    assert _comments(source) == {
        "a": "beside",
        "b": "above, first line second line",
        "c": "after the value",
        "d": "",
    }


def test_the_listing_shows_the_resolved_values_with_their_meanings() -> None:
    from pretrain.engine.config import load_config

    cfg = load_config(PretrainConfig, REPO / "pretrain/configs/tiny_cpu.yaml", ["train.steps=7", "clip.stride=3"])
    text = describe(cfg)
    assert "\ntrain:\n" in f"\n{text}" and "  steps: 7  # optimizer steps" in text
    assert "  stride: 3  # frames between sampled frames" in text
    assert "  scales: [1.0, 0.875, 0.75, 0.66]  # multi-scale crop" in text
    assert "  uri: null  #" in text


def test_print_config_lists_checks_and_starts_nothing(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PY, "-m", *args], env=base_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120
        )

    run = tmp_path / "run"
    r = cli("pretrain", "--config", str(REPO / "pretrain/configs/tiny_cpu.yaml"), "--print-config",
            f"train.run_dir={run}", "data.backend=synthetic", "train.steps=90")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"  run_dir: {run}  #" in r.stdout and "  steps: 90  #" in r.stdout and not run.exists()
    # a config error is reported after the listing, which shows the value to fix
    r = cli("finetune", "--config", str(REPO / "finetune/configs/tiny_cpu.yaml"), "--print-config",
            "data.backend=synthetic", "optim.warmup_steps=999")  # fmt: skip
    assert r.returncode == 2 and "  warmup_steps: 999  #" in r.stdout
    assert "config error: optim.warmup_steps=999 >= train.steps" in r.stderr
    r = cli("finetune", "continual", "--config", str(REPO / "finetune/configs/tiny_cpu_continual.yaml"),
            "--print-config", "data.backend=synthetic", "continual.strategy=ewc")  # fmt: skip
    assert "  strategy: ewc  # naive | joint | replay" in r.stdout, r.stderr[-2000:]
    r = cli("finetune", "update", "--config", str(REPO / "finetune/configs/update.yaml"), "--print-config",
            "model=clf", f"videos={tmp_path}", f"finetune.config={REPO / 'finetune/configs/tiny_cpu_update.yaml'}")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "  max_drop_old: 0.05  # no older set's top-1 may drop more than this" in r.stdout
    assert not (tmp_path / "runs").exists()

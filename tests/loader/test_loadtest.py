"""The loadtest command: one JSON line, coverage across simulated ranks, non-zero exit on loader errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from data_shards import loadtest


def _args(*argv: str) -> argparse.Namespace:
    return loadtest.add_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_loadtest_summary(vp9_set: Path, capsys: pytest.CaptureFixture) -> None:
    args = _args(
        str(vp9_set),
        "--frames",
        "4",
        "--stride",
        "2",
        "--size",
        "16",
        "--batch",
        "2",
        "--ranks",
        "3",
        "--epochs",
        "2",
        "--clips-per-video",
        "2",
    )
    assert loadtest.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    s = json.loads(lines[0])
    assert s["ok"] and s["backend"] == "dali-cpu" and "DALI-CPU" in s["why"]
    assert s["unique_keys"] == 12 and s["duplicate_keys_within_epoch"] == 0 and s["skipped"] == 0
    assert s["clips"] == 2 * 12 * 2 and s["clips_per_s"] > 0 and 0 <= s["decode_wait_fraction"] <= 1


def test_loadtest_fails_loudly(h264_set: Path, capsys: pytest.CaptureFixture) -> None:
    args = _args(str(h264_set), "--backend", "dali", "--frames", "4", "--size", "16", "--batch", "2")
    assert loadtest.main(args) == 1
    s = json.loads(capsys.readouterr().out.strip())
    assert not s["ok"] and "train-00000" in s["error"]


def test_run_loadtest_kwargs(h264_set: Path) -> None:
    s = loadtest.run_loadtest(
        shards=str(h264_set), frames=4, stride=2, size=16, batch=4, eval=True, max_batches=1
    )
    assert s["backend"] == "pyav" and s["batches"] == 1 and s["clips"] == 4


def test_loadtest_that_loads_nothing_fails_and_bad_numbers_are_refused(
    h264_set: Path, capsys: pytest.CaptureFixture
) -> None:
    """`"ok": true` with 0 batches passed a load test that tested nothing (a batch larger than the split)."""
    args = _args(str(h264_set), "--backend", "pyav", "--workers", "0", "--frames", "4", "--size", "16",
                 "--batch", "100")  # fmt: skip
    assert loadtest.main(args) == 1
    s = json.loads(capsys.readouterr().out.strip())
    assert not s["ok"] and s["batches"] == 0 and "no batch loaded: split 'train' has" in s["error"]
    for flag, value, message in [("--ranks", "0", "must be >= 1"), ("--workers", "-1", "must be >= 0"),
                                 ("--max-skip-fraction", "2", "must be in [0, 1]")]:  # fmt: skip
        with pytest.raises(SystemExit):
            _args(str(h264_set), flag, value)
        assert f"argument {flag}: {message}" in capsys.readouterr().err

"""`python -m finetune embed`: embeddings of a fine-tuned model group the synthetic motion classes (nearest
neighbours share labels far above chance), are written as Parquet or .npy + keys, and answer a query."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ft_helpers import Registry, ok, run_cli

from finetune import embed


@pytest.mark.slow  # trains a classifier first (27 s); the embed command's plumbing is in test_user_errors
def test_nearest_neighbours_share_labels_far_above_chance(
    registry: Registry, video_inputs: dict, tmp_path: Path
) -> None:
    query = tmp_path / "query.mp4"
    query.write_bytes(video_inputs["mp4"])
    out = tmp_path / "test.parquet"
    args = [
        "embed",
        "--model",
        str(registry.runs[0] / "best"),
        "--shards",
        str(registry.shards),
        "--split",
        "test",
    ]
    r = run_cli([*args, "--out", str(out), "--query", str(query), "-k", "3", "--backend", "pyav"])
    ok(r)
    emb = embed.load(out)
    assert len(emb) == 24 and emb.vectors_ND.shape == (24, 64) and len(set(emb.keys)) == 24
    assert sorted(set(emb.label_names)) == ["move_down", "move_left", "move_right", "move_up"]
    agree, chance = embed.neighbour_agreement(emb)
    assert f"{100 * agree:.1f}% (chance {100 * chance:.1f}%)" in r.stdout
    # Under the null (labels unrelated to the embedding) each of the 24 test videos' nearest neighbour
    # matches with probability `chance` (~0.24): P(>= 12 of 24) < 0.01. The model (300 steps from scratch,
    # val top-1 ~0.75) reaches ~0.7.
    assert agree >= 0.5 > chance + 0.2, (agree, chance)
    (line,) = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert line["query"] == str(query) and len(line["neighbours"]) == 3
    sims = [n["cosine"] for n in line["neighbours"]]
    assert sims == sorted(sims, reverse=True) and all(n["key"] in emb.keys for n in line["neighbours"])


def test_npy_and_parquet_round_trip_and_cosine_neighbours(tmp_path: Path) -> None:
    vectors = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    e = embed.Embeddings(["a", "b", "c", "d"], np.array([0, 0, 1, -1]), ["x", "x", "y", None], vectors)
    for name in ("e.npy", "e.parquet"):
        back = embed.load(embed.save(e, tmp_path / name))
        assert back.keys == e.keys and back.label_names == e.label_names
        assert np.array_equal(back.labels, e.labels) and np.array_equal(back.vectors_ND, vectors)
    assert (tmp_path / "e.keys.jsonl").is_file()
    near = embed.neighbours(e, np.array([2.0, 0.1, 0], np.float32), k=2)  # cosine: the scale does not matter
    assert [n["key"] for n in near] == ["a", "b"] and near[0]["cosine"] > near[1]["cosine"]
    assert embed.neighbour_agreement(e) == (
        pytest.approx(2 / 3),
        pytest.approx(1 / 3),
    )  # unlabeled d left out
    with pytest.raises(ValueError, match=r"\.parquet, or \.npy"):
        embed.save(e, tmp_path / "e.csv")

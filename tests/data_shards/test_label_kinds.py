"""Label kinds beyond one class per clip, on the data side: several labels per clip (CSV `a;b`, JSONL lists,
Charades) and labelled time segments (a segments CSV, ActivityNet/THUMOS JSON, Charades actions). Bad
annotations go to `rejects.jsonl` naming file:line; the shards keep the label sets and segments (format
version 2, version 1 still read); the loaders return the sets and per-frame classes from the same frame plan
as the pixels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from data_shards import format as fmt
from data_shards.build import BuildOptions, build
from data_shards.inputs import SourceOptions, read_inputs
from data_shards.loader import build_loader
from data_shards.loader.sampling import SamplingSpec, plan_video
from data_shards.plan import plan_inputs
from data_shards.synth import SynthSpec, render_segments, write_synthetic_set
from data_shards.verify import verify


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_label_sets_from_csv_and_jsonl_with_rejects_naming_the_line(tmp_path: Path) -> None:
    rows = [
        ["a.mp4", "run;jump"],
        ["b.mp4", "jump"],
        ["c.mp4", ""],
        ["d.mp4", "run;fly"],
        ["e.mp4", " jump ; run ;"],
    ]
    source = _write_csv(tmp_path / "m.csv", ["path", "label"], rows)
    inputs = read_inputs(source)
    assert inputs.kind == "multi"
    plan = plan_inputs(inputs, ["jump", "run"], 0.0, 0.0)
    got = {p.item.id: p.labels for p in plan.samples}
    assert got == {"a.mp4": (0, 1), "b.mp4": (0,), "e.mp4": (0, 1)}
    assert {p.item.id: p.label for p in plan.samples}["a.mp4"] == 0  # the first of the set
    why = {r.where: (r.kind, r.reason) for r in plan.rejects}
    assert why["m.csv:4"] == ("missing-label", "empty label set")
    assert why["m.csv:5"][0] == "unknown-label" and "'fly'" in why["m.csv:5"][1]

    lines = [
        {"path": "a.mp4", "label": ["x", "y"]},
        {"path": "b.mp4", "label": []},
        {"path": "c.mp4", "label": ["y"]},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    plan = plan_inputs(read_inputs(tmp_path / "m.jsonl"), None, 0.0, 0.0)
    assert plan.kind == "multi" and plan.classes == ["x", "y"]
    assert [p.labels for p in plan.samples] == [(0, 1), (1,)]
    assert [(r.where, r.reason) for r in plan.rejects] == [("m.jsonl:2", "empty label set")]
    # one label per row and no separator: still the single-label path, unchanged
    single = plan_inputs(
        read_inputs(_write_csv(tmp_path / "s.csv", ["path", "label"], [["a.mp4", "x"]])), None, 0, 0
    )
    assert single.kind == "single" and single.samples[0].labels is None and single.samples[0].label == 0


def test_segment_sources_csv_activitynet_and_charades(tmp_path: Path) -> None:
    rows = [
        ["v1.mp4", "0", "1.5", "walk"],
        ["v1.mp4", "2", "3", "run"],
        ["v2.mp4", "1", "0.5", "walk"],  # end before start
        ["v3.mp4", "0", "1", "swim"],  # not in --classes
        ["v4.mp4", "", "", ""],  # no action at all: background only
        ["v5.mp4", "x", "1", "run"],  # unreadable time
    ]
    src = _write_csv(tmp_path / "seg.csv", ["path", "segment_start", "segment_end", "label"], rows)
    inputs = read_inputs(src)
    assert inputs.kind == "segments"
    plan = plan_inputs(inputs, ["walk", "run"], 0.0, 0.0)
    assert plan.classes == ["background", "walk", "run"]
    segs = {p.item.id: p.segments for p in plan.samples}
    assert segs == {"v1.mp4": ((0.0, 1.5, 1), (2.0, 3.0, 2)), "v4.mp4": ()}
    assert {p.item.id: p.label for p in plan.samples} == {"v1.mp4": 1, "v4.mp4": 0}  # the longest class
    why = {r.where: r.kind for r in inputs.rejects + plan.rejects}
    assert why == {"seg.csv:4": "bad-segment", "seg.csv:5": "unknown-label", "seg.csv:7": "bad-segment"}

    (tmp_path / "anet").mkdir()
    for name in ("v_a.mp4", "b.webm"):
        (tmp_path / "anet" / name).touch()
    database = {
        "a": {"subset": "training", "annotations": [{"segment": [1.0, 2.5], "label": "jump"}]},
        "b": {"subset": "validation", "annotations": [{"segment": [0.5, 1.0], "label": "sit"}]},
        "c": {"subset": "testing", "annotations": []},
        "d": {"subset": "training", "annotations": [{"segment": [0, 1], "label": "sit"}]},
    }
    (tmp_path / "anet" / "gt.json").write_text(json.dumps({"version": "1.3", "database": database}))
    inputs = read_inputs(tmp_path / "anet" / "gt.json")
    assert inputs.kind == "segments" and inputs.notes and "testing" in inputs.notes[0]
    plan = plan_inputs(inputs, None, 0.0, 0.0)
    assert plan.classes == ["background", "jump", "sit"]
    assert {p.item.id: (p.split, p.segments) for p in plan.samples} == {
        "a": ("train", ((1.0, 2.5, 1),)),
        "b": ("val", ((0.5, 1.0, 2),)),
    }
    assert [(r.where, r.kind) for r in inputs.rejects] == [("gt.json:database.d", "missing-file")]

    root = tmp_path / "charades"
    (root / "Charades_v1_480").mkdir(parents=True)
    (root / "Charades_v1_classes.txt").write_text(
        "c000 Holding some clothes\nc001 Putting clothes somewhere\n"
    )
    header = ["id", "subject", "scene", "actions", "length"]
    _write_csv(root / "Charades_v1_train.csv", header, [["AB1", "s", "x", "c000 0.0 4.5;c001 3.0 6.0", "8"]])
    _write_csv(
        root / "Charades_v1_test.csv",
        header,
        [["CD2", "s", "x", "c001 1.0 2.0", "5"], ["EF3", "s", "x", "", "5"]],
    )
    for vid in ("AB1", "CD2", "EF3"):
        (root / "Charades_v1_480" / f"{vid}.mp4").touch()
    multi = plan_inputs(read_inputs(root), None, 0.0, 0.0)
    assert multi.kind == "multi" and multi.classes == ["Holding some clothes", "Putting clothes somewhere"]
    assert {p.item.id: (p.split, p.labels) for p in multi.samples} == {
        "AB1": ("train", (0, 1)),
        "CD2": ("test", (1,)),
    }
    assert [(r.where, r.reason) for r in multi.rejects] == [("Charades_v1_test.csv:3", "empty label set")]
    timed = plan_inputs(read_inputs(root, options=SourceOptions(labels="segments")), None, 0.0, 0.0)
    assert timed.classes[0] == "background" and len(timed.samples) == 3
    assert {p.item.id: p.segments for p in timed.samples}["AB1"] == ((0.0, 4.5, 1), (3.0, 6.0, 2))


@pytest.fixture(scope="module")
def segment_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """8 `--segments` videos (48 frames at 16 fps: 3 s) + one annotation past the end of its video."""
    root = tmp_path_factory.mktemp("segments")
    spec = SynthSpec(videos=8, classes=4, frames=48, size=32, codec="vp9", seed=3, segments=True)
    src = write_synthetic_set(root, spec)
    with open(src, "a", newline="") as f:
        csv.writer(f).writerow(["videos/000007.webm", "2.5", "9.0", "move_up"])  # the video is 3 s long
    out = root / "shards"
    build(src, out, BuildOptions(val_fraction=0.0, test_fraction=0.0), quiet=True)
    return src, out


def test_segments_reach_the_shards_and_the_loaders_frame_by_frame(segment_set: tuple[Path, Path]) -> None:
    src, out = segment_set
    manifest = fmt.load_manifest(out)
    assert manifest.labels == "segments" and manifest.version == fmt.FORMAT_VERSION
    assert manifest.classes == ["background", "move_down", "move_left", "move_right", "move_up"]
    rejects = [json.loads(line) for line in (out / fmt.REJECTS_NAME).read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["kind"] == "bad-segment", rejects
    assert "outside the video (3s long)" in rejects[0]["reason"]
    assert rejects[0]["where"] == f"segments.csv:{len(src.read_text().splitlines())}"  # the appended line
    assert rejects[0]["id"] == "videos/000007.webm"
    problems, counts = verify(out)
    assert problems == [] and counts == {"train": 7}

    spec = SynthSpec(videos=8, classes=4, frames=48, size=32, codec="vp9", seed=3, segments=True)
    names = manifest.classes
    by_id = {}
    for i in range(7):
        _, segs = render_segments(i, spec)
        per_frame = [0] * 48
        for first, end, motion in segs:
            per_frame[first:end] = [names.index(motion)] * (end - first)
        by_id[f"videos/{i:06d}.webm"] = per_frame
    sampling = SamplingSpec(frames=16, stride=3, size=32, train=False, eval_clips=2, eval_crops=1)
    for backend in ("pyav", "dali"):
        loader = build_loader(out, "train", batch_size=4, spec=sampling, backend=backend, num_workers=0)
        assert len(loader.refs) == 7  # the video with the bad annotation is out, nothing else
        key_to_id = {fmt.sample_key(vid): vid for vid in by_id}
        seen = 0
        for batch in loader:
            for row, key in enumerate(batch["key"]):
                ref = next(r for r in loader.refs if r.key == key)
                plan = plan_video(ref.frames, ref.height, ref.width, sampling, None)
                view = plan.views[int(batch["view"][row])]
                frames = plan.frames[view.clip * 16 : (view.clip + 1) * 16]
                expected = [by_id[key_to_id[key]][f] for f in frames]
                assert batch["frame_label"][row].tolist() == expected, (backend, key)
                seen += 1
        assert seen == 14


def test_label_sets_reach_the_loader_and_version_1_sets_still_read(tmp_path: Path) -> None:
    spec = SynthSpec(videos=6, classes=4, frames=16, size=32, codec="vp9", seed=2, multi_label=True)
    src = write_synthetic_set(tmp_path / "ml", spec)
    with open(src, encoding="utf-8") as f:
        truth = {row["path"]: row["label"].split(";") for row in csv.DictReader(f)}
    out = tmp_path / "ml" / "shards"
    build(src, out, BuildOptions(), quiet=True)
    manifest = fmt.load_manifest(out)
    assert manifest.labels == "multi" and manifest.num_classes >= 2
    sampling = SamplingSpec(frames=8, stride=2, size=32, train=False)
    loader = build_loader(out, "train", batch_size=6, spec=sampling, backend="pyav", num_workers=0)
    batch = next(iter(loader))
    key_to_id = {fmt.sample_key(p): p for p in truth}
    for row, key in enumerate(batch["key"]):
        got = [manifest.classes[c] for c in batch["labels"][row].tolist() if c >= 0]
        assert sorted(got) == sorted(truth[key_to_id[key]])
        assert manifest.classes[int(batch["label"][row])] == got[0]
    counts = manifest.splits["train"].per_class
    assert sum(counts.values()) == sum(len(v) for v in truth.values())  # every label of a set counted

    # a version 1 set (no label kinds): read as single-label, its label set is its one label
    old = json.loads((out / fmt.MANIFEST_NAME).read_text())
    old["version"] = 1
    del old["labels"]
    (out / fmt.MANIFEST_NAME).write_text(json.dumps(old))
    assert fmt.load_manifest(out).labels == "single"
    old["version"] = 4
    (out / fmt.MANIFEST_NAME).write_text(json.dumps(old))
    with pytest.raises(fmt.FormatError, match="version 4 is not supported"):
        fmt.load_manifest(out)

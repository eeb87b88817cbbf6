"""Input formats from their own annotation files: CSV/JSONL time ranges, Kinetics, Something-Something v2,
UCF101, HMDB51; auto-detection; wrong rows rejected with the file:line they came from."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from data_shards import format as fmt
from data_shards.__main__ import main as cli
from data_shards.build import BuildOptions, build
from data_shards.inputs import SourceOptions, read_inputs
from data_shards.inputs.detect import detect_format


def _built(out: Path) -> tuple[dict[str, fmt.Sample], dict[str, dict]]:
    """(stored samples by id, rejects by where)."""
    m = fmt.load_manifest(out)
    samples = {s.meta["id"]: s for sh in m.shards for s in fmt.iter_tar_samples(out / sh.path)}
    rejects = {r["where"]: r for r in map(json.loads, (out / fmt.REJECTS_NAME).read_text().splitlines())}
    return samples, rejects


def _split_of(out: Path) -> dict[str, str]:
    m = fmt.load_manifest(out)
    return {s.meta["id"]: sh.split for sh in m.shards for s in fmt.iter_tar_samples(out / sh.path)}


@pytest.fixture(scope="module")
def kinetics(tmp_path_factory: pytest.TempPathFactory, make_clip: Callable[..., Path]) -> Path:
    """train.csv + validate.csv; AAA is pre-cut, BBB a full 2 s video cut at build time."""
    root = tmp_path_factory.mktemp("k400")
    make_clip(root / "videos" / "abseiling" / "AAA_000002_000004.mp4", codec="libx264", container="mp4")
    make_clip(root / "videos" / "full" / "BBB.mp4", codec="libx264", container="mp4")
    (root / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "abseiling,AAA,2,4,train\n"  # 2: pre-cut file
        "abseiling,BBB,0,1,train\n"  # 3: cut 0-1 s of BBB
        "bowling,CCC,0,10,train\n"  # 4: no such video
        "bowling,BBB,1,5,train\n"  # 5: ends past BBB's 2 s
        "bowling,DDD,5,3,train\n"  # 6: empty range
        "juggling,BBB,0,2,train\n"  # 7: not in --classes
    )
    (root / "validate.csv").write_text(
        "label,youtube_id,time_start,time_end,split\nbowling,BBB,1,2,validate\n"
    )
    return root


def test_kinetics(kinetics: Path, tmp_path: Path) -> None:
    assert detect_format(kinetics) == "kinetics" and detect_format(kinetics / "train.csv") == "kinetics"
    out = tmp_path / "out"
    code = cli([
        "build", str(kinetics), "--out", str(out), "--videos", str(kinetics / "videos"),
        "--classes", "abseiling,bowling", "--quiet",
    ])  # fmt: skip
    assert code == 0
    samples, rejects = _built(out)
    assert set(samples) == {"AAA_000002_000004", "BBB_000000_000001", "BBB_000001_000002"}
    whole, cut, val = (samples[k].meta for k in sorted(samples))
    assert whole["ingest"] == "kept" and whole["frames"] == 24
    assert (cut["ingest"], cut["frames"], cut["clip_start"], cut["clip_end"]) == ("trimmed", 12, 0.0, 1.0)
    assert (val["ingest"], val["frames"]) == ("trimmed", 12)
    assert _split_of(out)["BBB_000001_000002"] == "val"
    assert rejects["train.csv:4"]["kind"] == "missing-file" and "CCC" in rejects["train.csv:4"]["reason"]
    assert (
        rejects["train.csv:5"]["kind"] == "bad-time-range"
        and "past the video" in rejects["train.csv:5"]["reason"]
    )
    assert rejects["train.csv:6"]["kind"] == "bad-time-range"
    assert rejects["train.csv:7"]["kind"] == "unknown-label"
    assert len(rejects) == 4


@pytest.fixture(scope="module")
def ssv2(tmp_path_factory: pytest.TempPathFactory, make_clip: Callable[..., Path]) -> Path:
    root = tmp_path_factory.mktemp("ssv2")
    for vid in ("1", "2", "3", "4", "5"):
        make_clip(root / "20bn-something-something-v2" / f"{vid}.webm", codec="libvpx-vp9", container="webm")
    labels = root / "labels"
    labels.mkdir()
    (labels / "labels.json").write_text(
        json.dumps({"Putting something on a surface": "1", "Pushing something from left to right": "0"})
    )
    train = [
        {"id": "1", "label": "pushing a cup from left to right", "template": "Pushing [something] from left to right", "placeholders": ["a cup"]},
        {"id": "2", "label": "putting a pen on a surface", "template": "Putting [something] on a surface", "placeholders": ["a pen"]},
        {"id": "3", "template": "Dancing with [something]"},
        {"id": "99", "template": "Putting [something] on a surface"},
    ]  # fmt: skip
    (labels / "train.json").write_text("[\n" + ",\n".join(json.dumps(e) for e in train) + "\n]\n")
    (labels / "validation.json").write_text(
        json.dumps([{"id": "4", "template": "Putting [something] on a surface"}])
    )
    (labels / "test.json").write_text(json.dumps([{"id": "5"}]))
    return root


def test_something_something_v2(ssv2: Path, tmp_path: Path) -> None:
    assert detect_format(ssv2) == "ssv2"
    inputs = read_inputs(ssv2)
    assert inputs.classes == ["Pushing something from left to right", "Putting something on a surface"]
    assert inputs.notes == ["test.json: 1 entries without a label left out"]
    result = build(ssv2, tmp_path / "out", BuildOptions(), quiet=True)
    samples, rejects = _built(tmp_path / "out")
    assert {k: s.label for k, s in samples.items()} == {"1": 0, "2": 1, "4": 1}
    assert all(s.meta["ingest"] == "kept" and s.video_ext == "webm" for s in samples.values())
    assert _split_of(tmp_path / "out") == {"1": "train", "2": "train", "4": "val"}
    assert rejects["train.json:4"]["kind"] == "unknown-label"  # entries start on lines 2..5
    assert rejects["train.json:5"]["kind"] == "missing-file"
    assert result.manifest.classes == inputs.classes and result.notes == inputs.notes


@pytest.fixture(scope="module")
def ucf101(tmp_path_factory: pytest.TempPathFactory, make_clip: Callable[..., Path]) -> Path:
    root = tmp_path_factory.mktemp("ucf") / "UCF101"
    videos = root / "UCF-101"
    for rel in (
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi",
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi",
        "HandstandPushups/v_HandStandPushups_g08_c01.avi",
    ):
        make_clip(videos / rel)
    lists = root / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 HandstandPushups\n")
    (lists / "trainlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\n"
        "HandstandPushups/v_HandStandPushups_g08_c01.avi 2\n"
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g09_c01.avi 1\n"  # line 3: no such file
        "Juggling/v_Juggling_g01_c01.avi 3\n"  # line 4: not in classInd
    )
    (lists / "testlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\n")
    (lists / "trainlist02.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 1\n")
    (lists / "testlist02.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi\n")
    return root.parent


def test_ucf101_official_splits(ucf101: Path, tmp_path: Path) -> None:
    assert detect_format(ucf101) == "ucf101"
    build(ucf101, tmp_path / "s1", BuildOptions(), quiet=True)
    samples, rejects = _built(tmp_path / "s1")
    assert _split_of(tmp_path / "s1") == {
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi": "train",
        "HandstandPushups/v_HandStandPushups_g08_c01.avi": "train",
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi": "test",
    }
    assert samples["HandstandPushups/v_HandStandPushups_g08_c01.avi"].label == 1  # classInd order
    assert all(s.meta["ingest"] == "remuxed" for s in samples.values())  # AVI -> mp4, lossless
    assert rejects["trainlist01.txt:3"]["kind"] == "missing-file"
    assert rejects["trainlist01.txt:4"]["kind"] == "unknown-label"
    split2 = read_inputs(ucf101, "ucf101", SourceOptions(split_id=2))
    assert {i.id: i.split for i in split2.items} == {
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi": "train",
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi": "test",
    }
    # a hash val split is carved from train by actor group: g08 clips of every class land together
    groups = {i.group for i in read_inputs(ucf101).items}
    assert groups == {"ApplyEyeMakeup/g08", "HandstandPushups/g08", "ApplyEyeMakeup/g01"}


@pytest.fixture(scope="module")
def hmdb51(tmp_path_factory: pytest.TempPathFactory, make_clip: Callable[..., Path]) -> Path:
    root = tmp_path_factory.mktemp("hmdb")
    for rel in ("brush_hair/a.avi", "brush_hair/b.avi", "brush_hair/c.avi", "cartwheel/d.avi"):
        make_clip(root / "hmdb51_org" / rel, frames=16)
    splits = root / "testTrainMulti_7030_splits"
    splits.mkdir()
    (splits / "brush_hair_test_split1.txt").write_text("a.avi 1 \nb.avi 2 \nc.avi 0 \nmissing.avi 1 \n")
    (splits / "cartwheel_test_split1.txt").write_text("d.avi 1 \nd2.avi 7 \n")
    (splits / "cartwheel_test_split2.txt").write_text("d.avi 2 \n")
    (splits / "brush_hair_test_split2.txt").write_text("a.avi 2 \n")
    return root


def test_hmdb51_official_splits(hmdb51: Path, tmp_path: Path) -> None:
    assert detect_format(hmdb51) == "hmdb51"
    result = build(hmdb51, tmp_path / "out", BuildOptions(val_fraction=0.5), quiet=True)
    samples, rejects = _built(tmp_path / "out")
    splits = _split_of(tmp_path / "out")
    assert set(samples) == {"brush_hair/a.avi", "brush_hair/b.avi", "cartwheel/d.avi"}
    assert splits["brush_hair/b.avi"] == "test" and {
        splits["brush_hair/a.avi"],
        splits["cartwheel/d.avi"],
    } <= {"train", "val"}
    assert result.manifest.classes == ["brush_hair", "cartwheel"] and samples["cartwheel/d.avi"].label == 1
    assert rejects["brush_hair_test_split1.txt:4"]["kind"] == "missing-file"
    assert rejects["cartwheel_test_split1.txt:2"]["kind"] == "bad-row"
    assert result.notes == ["HMDB51 split 1: 1 videos marked 0 (not used) left out"]
    assert {i.split for i in read_inputs(hmdb51, "hmdb51", SourceOptions(split_id=2)).items} == {"test"}


def test_csv_and_jsonl_time_ranges(tmp_path: Path, make_clip: Callable[..., Path]) -> None:
    make_clip(tmp_path / "v" / "long.avi", frames=36)  # 3 s at 12 fps
    (tmp_path / "clips.csv").write_text(
        "path,label,start,end\n"
        "v/long.avi,a,0,1\n"
        "v/long.avi,b,1,2.5\n"
        "v/long.avi,a,2,4\n"  # 4: ends past 3 s
        "v/long.avi,a,x,1\n"  # 5: not numeric
        "v/long.avi,b,1,\n"  # 6: half a range
        "v/long.avi,a,,\n"  # 7: the whole video
    )
    build(tmp_path / "clips.csv", tmp_path / "out", BuildOptions(), quiet=True)
    samples, rejects = _built(tmp_path / "out")
    frames = {k: (s.meta["ingest"], s.meta["frames"]) for k, s in samples.items()}
    assert frames == {
        "v/long.avi#0-1": ("trimmed", 12),
        "v/long.avi#1-2.5": ("trimmed", 18),
        "v/long.avi": ("remuxed", 36),
    }
    assert {w: r["kind"] for w, r in rejects.items()} == {
        "clips.csv:4": "bad-time-range",
        "clips.csv:5": "bad-time-range",
        "clips.csv:6": "bad-time-range",
    }
    jsonl = tmp_path / "clips.jsonl"
    jsonl.write_text(
        json.dumps({"path": "v/long.avi", "label": "a", "time_start": 0.5, "time_end": 1.0}) + "\n"
    )
    items = read_inputs(jsonl).items
    assert [(i.id, i.start, i.end, i.group) for i in items] == [("v/long.avi#0.5-1", 0.5, 1.0, "v/long.avi")]


def test_detection_is_unambiguous_or_asks(ucf101: Path, hmdb51: Path, tmp_path: Path) -> None:
    both = tmp_path / "both"
    (both / "a" / "ucfTrainTestlist").mkdir(parents=True)
    (both / "b" / "testTrainMulti_7030_splits").mkdir(parents=True)
    with pytest.raises(fmt.FormatError, match="ucf101 and hmdb51; pass --format"):
        detect_format(both)
    (tmp_path / "plain.csv").write_text("path,label\nx.mp4,a\n")
    assert detect_format(tmp_path / "plain.csv") == "csv"
    empty = tmp_path / "videos"
    empty.mkdir()
    assert detect_format(empty) == "folder"
    with pytest.raises(fmt.FormatError, match="no ucfTrainTestlist/ folder"):
        read_inputs(tmp_path / "plain.csv", "ucf101")
    with pytest.raises(fmt.FormatError, match="reads a manifest file"):
        read_inputs(empty, "csv")


def test_source_options_a_source_cannot_use_are_errors_not_ignored(
    ucf101: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--labels, --videos and --split-id that the source has no use for used to be dropped silently: a plain CSV
    built with --labels segments made a one-label set, and with --videos it read the videos beside the CSV."""
    plain = tmp_path / "plain.csv"
    plain.write_text("path,label\nx.mp4,a\n")
    sets = tmp_path / "sets.csv"
    sets.write_text("path,label\nx.mp4,a;b\n")
    with pytest.raises(
        ValueError, match=r"--labels segments: .*plain.csv is a csv source with one label per"
    ):
        read_inputs(plain, "auto", SourceOptions(labels="segments"))
    with pytest.raises(ValueError, match=r"--labels multi: .*with one label per video"):
        read_inputs(plain, "auto", SourceOptions(labels="multi"))
    assert read_inputs(sets, "auto", SourceOptions(labels="multi")).kind == "multi"  # what it is: fine
    with pytest.raises(ValueError, match=r"--videos /elsewhere: .*the paths in it \(relative to"):
        read_inputs(plain, "auto", SourceOptions(videos="/elsewhere"))
    with pytest.raises(ValueError, match=r"--split-id 2: .*a csv source"):
        read_inputs(plain, "auto", SourceOptions(split_id=2))
    with pytest.raises(ValueError, match=r"--videos /elsewhere: .*the folder's own files"):
        read_inputs(tmp_path, "folder", SourceOptions(videos="/elsewhere"))
    # a data set's annotations take all three
    assert read_inputs(ucf101, "auto", SourceOptions(split_id=2, videos=str(ucf101))).items
    # the command says so and builds nothing
    out = tmp_path / "out"
    assert cli(["build", str(plain), "--out", str(out), "--labels", "segments", "--quiet"]) == 1
    assert "--labels segments" in capsys.readouterr().err and not out.exists()


def test_split_names_any_case_and_aliases_others_rejected_with_their_line(tmp_path: Path) -> None:
    from data_shards.plan import plan_inputs

    rows = ["Train", "validation", "DEV", "testing", "bogus_split", "val", "Valid"]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\n" + "".join(f"v{i}.mp4,a,{s}\n" for i, s in enumerate(rows)))
    plan = plan_inputs(read_inputs(manifest, "csv"), None, 0.0, 0.0)
    assert [p.split for p in plan.samples] == ["train", "val", "val", "test", "val", "val"]
    (bad,) = plan.rejects
    assert bad.where == "m.csv:6" and bad.kind == "bad-split"
    assert (
        "'bogus_split'" in bad.reason and "train, val, test" in bad.reason and "validation→val" in bad.reason
    )
    # JSONL the same; a source's own val split (an alias) means --val-fraction carves nothing
    lines = tmp_path / "m.jsonl"
    lines.write_text(
        "".join(json.dumps({"path": f"w{i}.mp4", "split": s}) + "\n" for i, s in enumerate(rows))
    )
    plan = plan_inputs(read_inputs(lines, "jsonl"), None, 0.5, 0.0)
    assert [p.split for p in plan.samples] == ["train", "val", "val", "test", "val", "val"]
    assert [r.where for r in plan.rejects] == ["m.jsonl:5"]

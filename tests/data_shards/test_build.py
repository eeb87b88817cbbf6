"""The sharding job end to end: real Ray (local, and a `ray start --head` cluster), real PyAV."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/procs.py
from procs import ray_head

from data_shards import format as fmt
from data_shards.__main__ import main as cli
from data_shards.build import BuildOptions, build, hash_split
from data_shards.ingest import IngestOptions
from data_shards.verify import verify

REPO = Path(__file__).resolve().parents[2]


def _write_csv(path: Path, rows: list[dict[str, str]], fields: list[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def _shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: fmt.sha256_file(p) for p in sorted(out.iterdir()) if p.suffix in (".tar", ".idx")}


def test_bad_inputs_are_rejected_with_reasons_and_the_rest_sharded(
    synth_copy: Path, synth_rows: list[dict[str, str]], broken_videos: dict[str, Path], tmp_path: Path
) -> None:
    rows = synth_rows
    good = rows[:8]
    vids = synth_copy / "videos"
    for path in broken_videos.values():
        shutil.copy(path, vids)
    # spaces and non-ASCII in the path: accepted, and never in member names
    odd = vids / "my vidéo ünïcode.webm"
    shutil.copy(synth_copy / rows[9]["path"], odd)
    bad = [
        {"path": "videos/missing.webm", "label": "move_up"},
        {"path": "videos/empty.webm", "label": "move_up"},
        {"path": "videos/text.webm", "label": "move_up"},
        {"path": "videos/trunc.webm", "label": "move_up"},
        {"path": "videos/audio.mp4", "label": "move_up"},
        {"path": "videos/picture.mp4", "label": "move_up"},
        {"path": rows[10]["path"], "label": ""},
        {"path": rows[11]["path"], "label": "jump"},
        {"path": good[0]["path"], "label": good[0]["label"]},  # duplicate id
        {"path": "videos/my vidéo ünïcode.webm", "label": "move_left"},
    ]
    manifest = _write_csv(synth_copy / "mixed.csv", good + bad, ["path", "label"])
    out = tmp_path / "shards"
    classes = "move_right,move_left,move_down,move_up"
    assert (
        cli(
            [
                "build",
                str(manifest),
                "--out",
                str(out),
                "--classes",
                classes,
                "--shard-samples",
                "4",
                "--quiet",
            ]
        )
        == 0
    )

    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    reasons = {Path(r["path"]).name if r["path"] else r["where"]: r["reason"] for r in rejects}
    assert reasons["missing.webm"] == "missing file"
    assert reasons["empty.webm"].startswith("empty file")
    assert reasons["text.webm"].startswith("not a video")
    assert reasons["trunc.webm"].startswith("truncated")
    assert reasons["audio.mp4"] == "no video stream"
    assert reasons["picture.mp4"] == "not a video: a still image (png_pipe)"
    assert any(r["reason"] == "missing label" for r in rejects)
    assert any(r["reason"].startswith("unknown label 'jump'") for r in rejects)
    assert any(r["reason"].startswith("duplicate id") for r in rejects)
    assert len(rejects) == 9

    m = fmt.load_manifest(out)
    assert m.classes == classes.split(",")
    assert m.splits["train"].samples == 9 and m.rejects == 9
    for shard in m.shards:
        with tarfile.open(out / shard.path) as tf:
            names = tf.getnames()
        assert all(n.count("/") == 0 and "vid" not in n and " " not in n for n in names)
    metas = {s.meta["id"]: s for shard in m.shards for s in fmt.iter_tar_samples(out / shard.path)}
    odd_sample = metas["videos/my vidéo ünïcode.webm"]
    assert odd_sample.label == 1 and odd_sample.meta["label_name"] == "move_left"
    assert odd_sample.video == odd.read_bytes()  # copy mode stores the source bytes untouched
    for key in ("source", "duration", "fps", "frames", "width", "height", "codec"):
        assert key in odd_sample.meta
    assert odd_sample.meta["frames"] == 16 and odd_sample.meta["codec"] == "vp9"
    assert verify(out, decode=True) == ([], {"train": 9})


def test_rerun_resumes_and_redoes_only_damaged_shards(synth_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    opts = BuildOptions(shard_samples=3, val_fraction=0.25)
    first = build(synth_copy / "labels.csv", out, opts, quiet=True)
    assert first.written_shards == len(first.manifest.shards) and first.kept_shards == 0
    manifest_bytes = (out / "manifest.json").read_bytes()
    before = _shard_hashes(out)

    again = build(synth_copy / "labels.csv", out, opts, quiet=True)
    assert again.written_shards == 0 and again.kept_shards == len(first.manifest.shards)

    victim = out / first.manifest.shards[0].path
    victim.write_bytes(victim.read_bytes()[:-700])  # truncated, as if the machine died mid-copy
    (out / first.manifest.shards[1].index).unlink()
    (out / ".train-000009.tar.partial").write_bytes(b"junk")
    third = build(synth_copy / "labels.csv", out, opts, quiet=True)
    assert third.written_shards == 2
    assert _shard_hashes(out) == before
    assert (out / "manifest.json").read_bytes() == manifest_bytes
    assert not (out / ".train-000009.tar.partial").exists()

    # a set built before shard listings existed (no listing files, none in the manifest or the resume
    # records): the re-run keeps every shard and adds the listings, the same bytes a build writes
    listings = {p.name: p.read_bytes() for p in out.glob(f"*{fmt.LISTING_SUFFIX}")}
    assert len(listings) == len(first.manifest.shards)
    for name in listings:
        (out / name).unlink()
    for record in (out / ".work" / "shards").glob("*.json"):
        data = json.loads(record.read_text())
        del data["info"]["listing"]
        record.write_text(json.dumps(data))
    old = fmt.load_manifest(out)
    for info in old.shards:
        info.listing = ""
    old.save(out)
    upgraded = build(synth_copy / "labels.csv", out, opts, quiet=True)
    assert upgraded.written_shards == 0 and upgraded.kept_shards == len(first.manifest.shards)
    assert {p.name: p.read_bytes() for p in out.glob(f"*{fmt.LISTING_SUFFIX}")} == listings
    assert (out / "manifest.json").read_bytes() == manifest_bytes and _shard_hashes(out) == before

    # another source pointed at this set is refused before any work, the set untouched; --replace rebuilds
    lines = (synth_copy / "labels.csv").read_text().splitlines(keepends=True)
    (synth_copy / "other.csv").write_text("".join(lines[:9]))
    with pytest.raises(ValueError, match=r"holds a shard set built from .*labels\.csv; building .*other\.csv"):
        build(synth_copy / "other.csv", out, opts, quiet=True)
    assert (out / "manifest.json").read_bytes() == manifest_bytes and _shard_hashes(out) == before
    replaced = build(synth_copy / "other.csv", out, opts, quiet=True, workers=0, replace_other=True)
    assert replaced.accepted == 8 and fmt.load_manifest(out).splits["train"].samples < first.accepted


def test_output_is_the_same_whatever_the_worker_count_and_local_ray_is_quiet(
    synth_vp9: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["build", str(synth_vp9 / "labels.csv"), "--shard-samples", "5", "--test-fraction", "0.3"]
    assert cli([*args, "--quiet", "--out", str(tmp_path / "a")]) == 0  # in-process Ray, 2 CPUs
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # as a user's shell has it
    run = subprocess.run(
        [sys.executable, "-m", "data_shards", *args, "--out", str(tmp_path / "b"), "--workers", "1"],
        check=True,
        env={**env, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"},
        capture_output=True,
        text=True,
    )
    assert _shard_hashes(tmp_path / "a") == _shard_hashes(tmp_path / "b")
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    assert "Token authentication" not in run.stderr and "WARNING" not in run.stderr, run.stderr
    test = fmt.load_manifest(tmp_path / "b").splits["test"]
    row = run.stdout.splitlines()[
        2
    ].split()  # split samples shards MB kept remuxed transcoded trimmed rejected
    assert row[:3] == ["test", str(test.samples), "1"] and row[4] == str(test.samples)  # all kept

    # --workers 0: no Ray, the tasks one by one in this process; every file the same, byte for byte
    assert cli([*args, "--quiet", "--out", str(tmp_path / "c"), "--workers", "0"]) == 0
    files = {p.name for p in (tmp_path / "b").iterdir() if p.is_file()}
    assert files == {p.name for p in (tmp_path / "c").iterdir() if p.is_file()}
    for name in files:
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    capsys.readouterr()
    assert cli([*args, "--out", str(tmp_path / "d"), "--workers", "0", "--ray-address", "auto"]) == 1
    assert cli([*args, "--out", str(tmp_path / "d"), "--workers", "-1"]) == 1
    err = capsys.readouterr().err
    assert "--workers 0 builds in this process: it cannot also join a Ray cluster" in err
    assert "--workers must be 0 (in this process) or more, got -1" in err
    assert not (tmp_path / "d").exists()  # refused before anything was written


def test_splits_from_manifest_column_jsonl_and_hash(
    synth_vp9: Path, synth_rows: list, tmp_path: Path
) -> None:
    rows = synth_rows
    jsonl = tmp_path / "set.jsonl"
    with open(jsonl, "w") as f:
        for i, r in enumerate(rows):
            f.write(
                json.dumps(
                    {
                        "path": str(synth_vp9 / r["path"]),
                        "label": r["label"],
                        "split": ["train", "val", "test"][i % 3],
                    }
                )
                + "\n"
            )
        f.write("{not json\n")
    result = build(jsonl, tmp_path / "out", BuildOptions(shard_samples=100), quiet=True)
    assert {k: v.samples for k, v in result.manifest.splits.items()} == {"test": 4, "train": 4, "val": 4}
    assert result.rejected == 1
    # hash splits are a function of the id alone
    assert hash_split("videos/a.mp4", 0.2, 0.1) == hash_split("videos/a.mp4", 0.2, 0.1)
    picks = [hash_split(f"v{i}", 0.2, 0.1) for i in range(2000)]
    assert 0.07 < picks.count("test") / 2000 < 0.13 and 0.16 < picks.count("val") / 2000 < 0.24


def test_class_folders_flat_folders_and_transcode(synth_vp9: Path, synth_rows: list, tmp_path: Path) -> None:
    rows = synth_rows
    tree = tmp_path / "tree"
    for r in rows:
        (tree / r["label"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(synth_vp9 / r["path"], tree / r["label"] / Path(r["path"]).name)
    opts = BuildOptions(ingest=IngestOptions(codec="h264", short_side=24, fps=8, max_frames=6, gop=4))
    result = build(tree, tmp_path / "out", opts, quiet=True)
    m = result.manifest
    assert m.classes == sorted({r["label"] for r in rows})
    samples = [s for sh in m.shards for s in fmt.iter_tar_samples(tmp_path / "out" / sh.path)]
    assert len(samples) == 12 and all(s.video_ext == "mp4" for s in samples)
    s = samples[0]
    assert (s.meta["codec"], s.meta["frames"], s.meta["width"], s.meta["fps"], s.meta["source_codec"]) == (
        "h264",
        6,
        24,
        8.0,
        "vp9",
    )
    with av.open(__import__("io").BytesIO(s.video)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 6
    assert m.shards[0].codecs == ["h264"]
    assert not any(p.suffix == ".mp4" for p in (tmp_path / "out" / ".work").iterdir())  # staging cleaned

    flat = tmp_path / "flat"
    flat.mkdir()
    for r in rows[:3]:
        shutil.copy(synth_vp9 / r["path"], flat)
    unl = build(flat, tmp_path / "out_flat", BuildOptions(), quiet=True)
    assert unl.manifest.classes is None
    assert {
        s.label for sh in unl.manifest.shards for s in fmt.iter_tar_samples(tmp_path / "out_flat" / sh.path)
    } == {-1}


def test_shard_size_by_bytes_and_nothing_accepted(synth_vp9: Path, synth_rows: list, tmp_path: Path) -> None:
    one = (synth_vp9 / synth_rows[0]["path"]).stat().st_size
    r = build(
        synth_vp9 / "labels.csv", tmp_path / "out", BuildOptions(shard_bytes=int(one * 2.5)), quiet=True
    )
    assert len(r.manifest.shards) >= 4 and all(s.samples <= 4 for s in r.manifest.shards)
    bad = _write_csv(tmp_path / "bad.csv", [{"path": "nope.mp4"}], ["path"])
    assert cli(["build", str(bad), "--out", str(tmp_path / "none"), "--quiet"]) == 1
    assert json.loads((tmp_path / "none" / "rejects.jsonl").read_text())["reason"] == "missing file"
    assert cli(["build", str(bad), "--out", str(tmp_path / "x"), "--codec", "copy", "--fps", "5"]) == 2


def test_verify_names_shard_and_problem(synth_vp9: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build(synth_vp9 / "labels.csv", out, BuildOptions(shard_samples=6), quiet=True)
    assert verify(out)[0] == []
    (out / "train-000001.idx").write_text("v1.2 0\n")
    shutil.copy(out / "train-000000.tar", out / "train-000007.tar")
    problems, _ = verify(out)
    assert any("train-000001.idx: does not match" in p for p in problems)
    assert any("train-000007.tar: not listed" in p for p in problems)
    with open(out / "train-000000.tar", "r+b") as f:
        f.seek(3000)
        f.write(b"\0" * 64)
    problems, _ = verify(out)
    assert any(p.startswith("train-000000.tar: sha256") for p in problems)


@pytest.mark.slow  # ~60 s: a second Ray cluster starts and stops
def test_build_on_a_ray_cluster_started_with_ray_start(synth_vp9: Path, tmp_path: Path) -> None:
    """`--ray-address` joins an existing cluster (token auth: the client needs RAY_AUTH_MODE=token); the
    same shards as a local build; and stopping that cluster leaves this process's own Ray alive."""
    import ray

    build_args = ["build", str(synth_vp9 / "labels.csv"), "--shard-samples", "5", "--quiet"]
    assert cli([*build_args, "--out", str(tmp_path / "l")]) == 0  # this process's own (local) Ray is up
    with ray_head({**os.environ}) as (address, env):
        client = [sys.executable, "-m", "data_shards", *build_args, "--ray-address", address]
        ok = subprocess.run(
            [*client, "--out", str(tmp_path / "c")],
            env={**env, "RAY_AUTH_MODE": "token"},
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert ok.returncode == 0, ok.stderr[-2000:]
        no_token = subprocess.run(  # 2 connection attempts instead of Ray's default 20 (~1 s each)
            [*client, "--out", str(tmp_path / "d")],
            env={**env, "RAY_AUTH_MODE": "disabled", "RAY_gcs_server_port_wait_time_s": "2"},
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert no_token.returncode == 1 and "RAY_AUTH_MODE=token" in no_token.stderr
    assert _shard_hashes(tmp_path / "c") == _shard_hashes(tmp_path / "l")
    assert ray.is_initialized() and ray.cluster_resources().get("CPU", 0) >= 1
    assert ray.get(ray.remote(lambda: 42).remote()) == 42


def test_verify_says_decoded_only_when_every_sample_decoded(
    synth_vp9: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = tmp_path / "s"
    build(synth_vp9 / "labels.csv", shards, BuildOptions(shard_samples=100), quiet=True)
    n = fmt.load_manifest(shards).splits["train"].samples

    def report(*flags: str) -> tuple[int, dict]:
        code = cli(["verify", str(shards), *flags])
        return code, json.loads(capsys.readouterr().out.splitlines()[-1])

    assert report("--decode") == (
        0,
        {
            "shards": str(shards),
            "status": "ok",
            "samples": {"train": n},
            "decoded": True,
            "decoded_samples": f"{n}/{n}",
        },
    )
    assert report()[1]["decoded"] is False  # nothing decoded without --decode
    with open(shards / "train-000000.tar", "r+b") as f:  # a checksum failure: no sample is decoded
        f.seek(2000)
        f.write(b"\0" * 64)
    code, out = report("--decode")
    assert code == 1 and out["decoded"] is False and out["decoded_samples"] == f"0/{n}"


def test_build_summary_columns_fit_long_split_names() -> None:
    import re

    from data_shards.build import BuildResult, summary
    from data_shards.inputs import Reject

    splits = {
        "train": fmt.SplitInfo(samples=12, shards=1, bytes=10**6),
        "holdout_extra_long": fmt.SplitInfo(samples=3, shards=1, bytes=10**5),
    }
    m = fmt.Manifest(classes=["a"], shards=[], splits=splits)
    rejects = [Reject("m.csv:3", "x.mp4", "bad", kind="bad-row")]  # split unknown: the "?" row
    text = summary(BuildResult(Path("out"), m, 15, 1, 0, 2, 0.1, rejects))
    table = text.splitlines()[1:5]  # header, then ?-last: holdout_extra_long, train, ?
    assert [line.split()[0] for line in table] == ["split", "holdout_extra_long", "train", "?"]
    ends = {re.match(r"\s*\S+\s+\S+", line).end() for line in table}  # where the samples column ends
    assert len(ends) == 1, "\n".join(table)


def test_a_misnamed_label_column_and_bad_class_lists_are_said(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A CSV whose label column is misnamed built an unlabelled set without a word; `--classes` naming a
    missing file took the name as the only class (every video rejected); a class twice made a dead output."""
    from data_shards.__main__ import main
    from data_shards.inputs.tables import read_csv

    csv_path = _write_csv(tmp_path / "l.csv", [{"path": "a.mp4", "cls": "up"}], ["path", "cls"])
    notes = read_csv(csv_path).notes
    assert len(notes) == 1 and "column(s) ['cls'] not read" in notes[0] and "the set is unlabelled" in notes[0]
    for classes, message in [(str(tmp_path / "classes.txt"), "no such file"),
                             ("up,down,up", "['up'] given more than once")]:  # fmt: skip
        assert main(["build", str(csv_path), "--out", str(tmp_path / "out"), "--classes", classes]) == 2
        assert f"--classes {classes}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "latin1.csv").write_bytes("path,label\nvid\xe9o.mp4,a\n".encode("latin-1"))
    assert main(["build", str(tmp_path / "latin1.csv"), "--out", str(tmp_path / "out")]) == 1
    assert "latin1.csv: not UTF-8 text (invalid continuation byte" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert main(["build", str(csv_path), "--out", str(tmp_path / "a-file")]) == 1
    assert "a-file: a file, not a folder" in capsys.readouterr().err and (tmp_path / "a-file").read_text() == "x"

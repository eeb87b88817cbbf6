from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest

from data_shards import format as fmt
from data_shards.shardio import write_shard
from data_shards.synth import DOMAINS, MOTIONS, SynthSpec, clip_motion, render_clip, write_synthetic_set


def _digest(folder: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "videos").iterdir())]


@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_synth_is_deterministic_for_a_seed(tmp_path: Path, codec: str) -> None:
    spec = SynthSpec(videos=4, frames=12, size=32, codec=codec, seed=3)
    write_synthetic_set(tmp_path / "a", spec)
    write_synthetic_set(tmp_path / "b", spec)
    write_synthetic_set(tmp_path / "c", SynthSpec(videos=4, frames=12, size=32, codec=codec, seed=4))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert (tmp_path / "a" / "labels.csv").read_bytes() == (tmp_path / "b" / "labels.csv").read_bytes()


def test_synth_clips_decode_with_declared_shape_and_labels(synth_vp9: Path) -> None:
    with open(synth_vp9 / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {r["label"] for r in rows} <= set(MOTIONS[:4])
    with av.open(str(synth_vp9 / rows[0]["path"])) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 16 and frames[0].shape == (32, 32, 3)


def _horizontal_shift(frames: np.ndarray, t: int) -> int:
    """Circular x-shift (pixels) that best maps the moving foreground of frame t onto frame t+1.

    The static background is removed with the temporal median, so only what moves is compared.
    """
    gray = frames.astype(np.float32).mean(-1)
    fg = gray - np.median(gray, axis=0)
    scores = [float((np.roll(fg[t], s, axis=1) * fg[t + 1]).sum()) for s in range(-8, 9)]
    return int(np.argmax(scores)) - 8


def test_class_is_the_direction_of_motion_not_the_frame_content() -> None:
    spec = SynthSpec(videos=40, classes=2, frames=16, size=64, seed=0)
    shifts: dict[str, list[int]] = {"move_right": [], "move_left": []}
    first_frames: dict[str, list[float]] = {"move_right": [], "move_left": []}
    for i in range(40):
        frames, motion = render_clip(i, spec)
        shifts[motion].append(_horizontal_shift(frames, 0))
        first_frames[motion].append(float(frames[0].mean()))
    assert all(s > 0 for s in shifts["move_right"]) and all(s < 0 for s in shifts["move_left"]), shifts
    # a single frame carries no class signal: mean brightness distributions overlap
    r, left = np.array(first_frames["move_right"]), np.array(first_frames["move_left"])
    assert abs(r.mean() - left.mean()) < r.std() + left.std()


def test_synth_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="--classes"):
        SynthSpec(classes=99)
    with pytest.raises(ValueError, match="--size"):
        SynthSpec(size=33)


def test_synth_keeps_out_of_a_folder_it_did_not_write(tmp_path: Path) -> None:
    """`synth --out` over a user's labelled folder replaced their labels.csv; its own folders it re-writes."""
    mine = tmp_path / "mine"
    (mine / "videos").mkdir(parents=True)
    (mine / "labels.csv").write_text("path,label\nvideos/a.mp4,cat\n")
    r = subprocess.run(
        [sys.executable, "-m", "data_shards", "synth", "--out", str(mine), "--videos", "2", "--frames", "8"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "holds files synth did not write (labels.csv, videos)" in r.stderr
    assert (mine / "labels.csv").read_text() == "path,label\nvideos/a.mp4,cat\n"
    assert not list((mine / "videos").iterdir())
    ours = tmp_path / "ours"
    write_synthetic_set(ours, SynthSpec(videos=3, frames=8, size=32, seed=1))
    write_synthetic_set(ours, SynthSpec(videos=2, frames=8, size=32, seed=2))  # a re-run: replaced
    assert len((ours / "labels.csv").read_text().splitlines()) == 3
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="a file, not a folder"):
        write_synthetic_set(tmp_path / "file", SynthSpec(videos=1, frames=8, size=32))


def test_label_and_meta_members_round_trip() -> None:
    for label in (-1, 0, 7, 2**40):
        assert fmt.decode_label(fmt.encode_label(label)) == label
    assert len(fmt.encode_label(3)) == 8
    with pytest.raises(fmt.FormatError, match="8 bytes"):
        fmt.decode_label(b"12")
    meta = {"id": "a/vidéo 1.mp4", "frames": 3}
    assert fmt.decode_meta(fmt.encode_meta(meta)) == meta
    key = fmt.sample_key("some dir/with.dots/file.mp4")
    assert "." not in key and "/" not in key and key == fmt.sample_key("some dir/with.dots/file.mp4")


def test_index_matches_dalis_wds2idx(tmp_path: Path, synth_vp9: Path) -> None:
    videos = sorted((synth_vp9 / "videos").iterdir())[:4]
    samples = [
        fmt.Sample(
            key=fmt.sample_key(v.name), video=v.read_bytes(), video_ext="webm", label=i, meta={"codec": "vp9"}
        )
        for i, v in enumerate(videos)
    ]
    info = write_shard(tmp_path / "train-000000.tar", samples)
    wds2idx = Path(sys.executable).parent / "wds2idx"
    subprocess.run(
        [str(wds2idx), str(tmp_path / info.path), str(tmp_path / "ref.idx")], check=True, capture_output=True
    )
    assert (tmp_path / "ref.idx").read_text() == (tmp_path / info.index).read_text()
    assert [s.key for s in fmt.iter_tar_samples(tmp_path / info.path)] == [s.key for s in samples]
    # reproducible bytes
    again = write_shard(tmp_path / "val-000000.tar", samples)
    assert again.sha256 == info.sha256


def test_manifest_errors_name_the_field(tmp_path: Path) -> None:
    m = fmt.Manifest(classes=["a"], shards=[], splits={})
    m.save(tmp_path)
    assert fmt.load_manifest(tmp_path).classes == ["a"]
    data = m.to_json()
    data["shards"] = [
        {
            "path": "train-000000.tar",
            "index": "x.idx",
            "split": "train",
            "samples": "3",
            "bytes": 1,
            "sha256": "",
        }
    ]
    with pytest.raises(fmt.FormatError, match=r"shards\[0\]\.samples"):
        fmt.Manifest.from_json(data)
    with pytest.raises(fmt.FormatError, match="no manifest"):
        fmt.load_manifest(tmp_path / "nowhere")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text("[1, 2]")
    with pytest.raises(fmt.FormatError, match="must hold a JSON object, got a list"):
        fmt.load_manifest(tmp_path / "m")
    with pytest.raises(fmt.FormatError, match=r"manifest\.json is a file, not a shard folder"):
        fmt.load_manifest(tmp_path / "m" / "manifest.json")  # the file given for its folder


def test_reading_a_tar_with_pickle_payloads_executes_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    import pickle

    payload = pickle.dumps(Evil())
    tar_path = tmp_path / "train-000000.tar"
    with tarfile.open(tar_path, "w") as tf:
        for name, data in [
            ("k.lbl.i64", fmt.encode_label(0)),
            ("k.json", b"{}"),
            ("k.pyd", payload),
            ("k.pth", payload),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            import io

            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(fmt.FormatError, match=r"unknown members|exactly one video"):
        list(fmt.iter_tar_samples(tar_path))
    assert not marker.exists()


def test_eight_classes_are_balanced_ish() -> None:
    spec = SynthSpec(videos=400, classes=8)
    counts = Counter(clip_motion(i, spec) for i in range(400))
    assert set(counts) == set(MOTIONS[:8])
    assert all(0.6 * 50 <= c <= 1.5 * 50 for c in counts.values()), counts


def _look(frames_THWC: np.ndarray) -> np.ndarray:
    """Mean R, G, B and mean horizontal gradient (texture) of a clip, on the 0..1 scale."""
    x = frames_THWC.astype(np.float32) / 255
    return np.array([*x.mean(axis=(0, 1, 2)), np.abs(np.diff(x, axis=2)).mean()])


def test_domains_change_the_look_not_the_classes() -> None:
    looks = {}
    for d in range(len(DOMAINS)):
        spec = SynthSpec(videos=8, classes=8, frames=8, size=32, seed=2, domain=d)
        clips = [render_clip(i, spec) for i in range(8)]
        assert [m for _, m in clips] == [clip_motion(i, spec) for i in range(8)]  # same class per index
        looks[d] = np.mean([_look(f) for f, _ in clips], axis=0)
    for a in range(len(DOMAINS)):
        for b in range(a + 1, len(DOMAINS)):
            assert np.abs(looks[a] - looks[b]).max() > 0.03, (a, b, looks[a], looks[b])
    assert looks[1][:3].mean() < 0.25  # night is dark
    assert looks[2][3] > 2 * looks[0][3]  # stripes: sharp background edges
    assert looks[3][0] > looks[3][1] > looks[3][2]  # sepia: red > green > blue
    # class = direction of motion, in every domain
    for d in range(1, len(DOMAINS)):
        spec = SynthSpec(videos=10, classes=2, frames=16, size=64, seed=0, domain=d)
        for i in range(10):
            frames, motion = render_clip(i, spec)
            shift = _horizontal_shift(frames, 0)
            assert shift > 0 if motion == "move_right" else shift < 0, (d, i, motion, shift)


def test_domains_are_deterministic_with_distinct_ids(tmp_path: Path) -> None:
    spec = SynthSpec(videos=2, frames=8, size=32, codec="vp9", seed=1, domain=3)
    write_synthetic_set(tmp_path / "a", spec)
    write_synthetic_set(tmp_path / "b", spec)
    write_synthetic_set(tmp_path / "c", SynthSpec(videos=2, frames=8, size=32, codec="vp9", seed=1, domain=1))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    names = [p.name for p in sorted((tmp_path / "a" / "videos").iterdir())]
    assert all(n.startswith("d3_") for n in names)
    assert [n[3:] for n in names] == [n[3:] for n in sorted(os.listdir(tmp_path / "c" / "videos"))]
    with pytest.raises(ValueError, match="--domain"):
        SynthSpec(domain=len(DOMAINS))

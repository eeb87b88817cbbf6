"""Sound in the shards: `build --audio keep|optional` stores each video's sound as a mono FLAC member whose
first sample is at the first frame (checked click by click against the synthetic set's event times, for
AAC-in-MP4 and Opus-in-WebM sources and a time range), rejects or drops what has no usable sound, `verify`
checks it, and the loaders return the window of it that goes with each clip's frames, shifted by a keyed
draw, the same on DALI and PyAV."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from data_shards import format as fmt
from data_shards.audio import decode_member
from data_shards.build import BuildOptions, build, summary
from data_shards.codec import VideoWriter
from data_shards.ingest import IngestOptions
from data_shards.loader import build_loader
from data_shards.loader.audio import AudioSpec, log_mel
from data_shards.loader.sampling import SamplingSpec
from data_shards.shardio import write_shard
from data_shards.synth import SynthSpec, sound_events, write_synthetic_set
from data_shards.verify import verify

FPS = 16


def _onsets(wave: np.ndarray, rate: int) -> list[float]:
    """Times (s) where a click starts: |x| crosses 0.2 after 25 ms of quiet."""
    loud = np.abs(wave) > 0.2
    quiet = np.convolve(loud, np.ones(round(0.025 * rate)), "full")[: len(loud)]
    starts = np.nonzero(loud[1:] & (quiet[:-1] == 0))[0] + 1
    return [float(s) / rate for s in starts]


def _index(meta: dict) -> int:
    return int(Path(meta["id"]).name[:6])


def _audio_set(
    root: Path, codec: str, videos: int = 6, frames: int = 32, **over: object
) -> tuple[Path, SynthSpec]:
    spec = SynthSpec(videos=videos, frames=frames, size=32, codec=codec, seed=3, audio=True, **over)
    write_synthetic_set(root, spec)
    return root / "labels.csv", spec


def _samples(shards: Path) -> list[fmt.Sample]:
    return [s for t in sorted(shards.glob("*.tar")) for s in fmt.iter_tar_samples(t)]


@pytest.fixture(scope="module")
def sound_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthSpec]:
    """6 H.264 + AAC clips with sound, built with --audio keep (val 1/3)."""
    root = tmp_path_factory.mktemp("sound")
    table, spec = _audio_set(root / "src", "h264")
    opts = BuildOptions(val_fraction=0.34, ingest=IngestOptions(audio="keep"))
    build(table, root / "shards", opts, workers=1, quiet=True)
    return root / "shards", spec


@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_build_keeps_the_sound_aligned_to_the_first_frame(tmp_path: Path, codec: str) -> None:
    table, spec = _audio_set(tmp_path / "src", codec, videos=3)
    result = build(
        table, tmp_path / "out", BuildOptions(ingest=IngestOptions(audio="keep")), workers=1, quiet=True
    )
    assert result.accepted == 3 and result.rejected == 0
    manifest = fmt.load_manifest(tmp_path / "out")
    assert manifest.version == fmt.FORMAT_VERSION == 3 and manifest.audio == "keep"
    assert manifest.splits["train"].audio == 3
    for s in _samples(tmp_path / "out"):
        info = s.meta["audio"]
        assert (
            info["rate"] == 16000
            and info["codec"] == "flac"
            and info["covered"] == pytest.approx(2.0, abs=0.05)
        )
        assert info["source_codec"] == ("aac" if codec == "h264" else "opus")
        wave, rate = decode_member(s.audio)
        assert len(wave) == info["samples"] == round(s.meta["duration"] * 16000)
        events = sound_events(_index(s.meta), spec)
        got = _onsets(wave, rate)
        assert len(got) == len(events), (got, events)
        assert np.abs(np.array(got) - np.array(events)).max() < 0.004, (got, events)  # 4 ms
    assert verify(tmp_path / "out", decode=True)[0] == []


def test_a_time_range_takes_its_stretch_of_the_sound(tmp_path: Path) -> None:
    _, spec = _audio_set(tmp_path / "src", "h264", videos=1, frames=48)
    video = next((tmp_path / "src" / "videos").iterdir())
    (tmp_path / "m.csv").write_text(f"path,label,start,end\n{video},a,0.75,2.5\n")
    build(
        tmp_path / "m.csv",
        tmp_path / "out",
        BuildOptions(ingest=IngestOptions(audio="keep")),
        workers=1,
        quiet=True,
    )
    (s,) = _samples(tmp_path / "out")
    wave, rate = decode_member(s.audio)
    assert len(wave) / rate == pytest.approx(s.meta["duration"], abs=1e-3) and s.meta["ingest"] == "trimmed"
    inside = [t - 0.75 for t in sound_events(0, spec) if 0.75 <= t < 2.5 - 0.06]
    got = _onsets(wave, rate)
    assert len(got) == len(inside) and np.abs(np.array(got) - np.array(inside)).max() < 0.004, (got, inside)


def _short_sound(path: Path) -> Path:
    """2 s of video, 0.4 s of sound."""
    with VideoWriter(path, "h264", FPS, 32, 32, audio=True) as w:
        for i in range(2 * FPS):
            w.write_rgb(np.full((32, 32, 3), 8 * i, np.uint8))
        w.write_audio(np.zeros(round(0.4 * w.audio_rate), np.float32))
    return path


def test_no_or_short_sound_is_rejected_with_keep_and_counted_with_optional(tmp_path: Path) -> None:
    _audio_set(tmp_path / "src", "h264", videos=2)
    silent = tmp_path / "silent"
    write_synthetic_set(silent, SynthSpec(videos=1, frames=32, size=32, seed=9))
    short = _short_sound(tmp_path / "short.mp4")
    rows = [f"{p},a" for p in sorted((tmp_path / "src" / "videos").iterdir())]
    rows += [f"{next((silent / 'videos').iterdir())},a", f"{short},a"]
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")

    keep = build(
        tmp_path / "m.csv",
        tmp_path / "keep",
        BuildOptions(ingest=IngestOptions(audio="keep")),
        workers=1,
        quiet=True,
    )
    assert keep.accepted == 2
    assert sorted((r.where, r.kind) for r in keep.rejects) == [
        ("m.csv:4", "no-audio-stream"),
        ("m.csv:5", "audio-short"),
    ]
    lines = [json.loads(x) for x in (tmp_path / "keep" / fmt.REJECTS_NAME).read_text().splitlines()]
    assert any(re.search(r"covers 0\.4\ds of the 2\.00s video", x["reason"]) for x in lines), lines
    assert any("no audio stream (--audio keep needs one; --audio optional" in x["reason"] for x in lines), lines

    opt = build(
        tmp_path / "m.csv",
        tmp_path / "opt",
        BuildOptions(ingest=IngestOptions(audio="optional")),
        workers=1,
        quiet=True,
    )
    assert opt.accepted == 4 and opt.rejected == 0
    assert "audio: 2 of 4 videos stored without sound (audio-short 1, no-audio-stream 1)" in summary(opt)
    samples = _samples(tmp_path / "opt")
    assert sum(s.audio is not None for s in samples) == 2
    assert all((s.audio is None) == (s.meta["audio"] is None) for s in samples)
    assert verify(tmp_path / "opt", decode=True)[0] == []
    with pytest.raises(ValueError, match="--audio must be one of"):
        IngestOptions(audio="maybe")


def test_verify_names_a_missing_sound_member(sound_shards: tuple[Path, SynthSpec], tmp_path: Path) -> None:
    shards, _ = sound_shards
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / fmt.MANIFEST_NAME).read_text())
    info = next(s for s in manifest["shards"] if s["split"] == "train")
    samples = list(fmt.iter_tar_samples(copy / info["path"]))
    samples[0] = fmt.Sample(
        samples[0].key, samples[0].video, samples[0].video_ext, samples[0].label, samples[0].meta
    )
    written = write_shard(copy / info["path"], iter(samples))
    info.update(bytes=written.bytes, sha256=written.sha256)
    (copy / fmt.MANIFEST_NAME).write_text(json.dumps(manifest))
    problems, _ = verify(copy)
    assert problems == [
        f"{info['path']}: {samples[0].key}: no .flac member, the set was built with --audio keep"
    ]
    # a version 2 set (no sound) still reads
    manifest.update(version=2)
    manifest["options"]["ingest"].pop("audio")
    assert fmt.Manifest.from_json(manifest).audio == "drop"


def _flash_times(video_CTHW: torch.Tensor, frames: np.ndarray) -> list[int]:
    bright = video_CTHW.mean(dim=(0, 2, 3))
    return [int(frames[t]) for t in range(len(bright)) if bright[t] > bright.median() + 0.5]


def test_loader_sound_follows_the_frames_and_the_drawn_shift(sound_shards: tuple[Path, SynthSpec]) -> None:
    shards, _ = sound_shards
    offsets = (-0.25, 0.0, 0.25)
    audio = AudioSpec(feature="waveform", seconds=1.0, offsets=offsets)
    spec = SamplingSpec(frames=16, stride=1, size=32, train=True, flip=False, audio=audio)

    def epoch(e: int) -> list[dict]:
        loader = build_loader(shards, "train", batch_size=2, spec=spec, backend="pyav", num_workers=0, seed=5)
        loader.set_epoch(e)
        return list(loader)

    batches = epoch(0)
    checked = 0
    for b in batches:
        assert b["audio"].shape == (len(b["key"]), 16000) and b["audio_shift"].dtype == torch.int64
        for i in range(len(b["key"])):
            offset = float(b["audio_offset"][i])
            assert offsets[int(b["audio_shift"][i])] == pytest.approx(offset)
            # the 16 frames (1 s at 16 fps) and the 1 s window share a centre: a flash at clip time t is
            # heard at t + offset in the window
            bright = b["video"][i].mean(dim=(0, 2, 3))
            flashes = [t / FPS for t in range(16) if bright[t] > bright.median() + 0.5]
            heard = _onsets(b["audio"][i].numpy(), 16000)
            for t in flashes:
                if 0.05 < t + offset < 0.9:
                    assert min(abs(h - (t + offset)) for h in heard) < 1.5 / FPS, (flashes, heard, offset)
                    checked += 1
    assert checked >= 3
    again = epoch(0)
    assert all(torch.equal(a["audio"], b["audio"]) for a, b in zip(batches, again))  # keyed, repeatable
    drawn = [torch.cat([b["audio_offset"] for b in epoch(e)]) for e in (0, 1, 2)]
    assert not (torch.equal(drawn[0], drawn[1]) and torch.equal(drawn[1], drawn[2]))  # redrawn per epoch

    mel = build_loader(
        shards,
        "val",
        batch_size=2,
        backend="pyav",
        num_workers=0,
        spec=SamplingSpec(frames=16, stride=1, size=32, train=False, audio=AudioSpec()),
    )
    b = next(iter(mel))
    assert b["audio"].shape[1:] == (64, 101) and (b["audio_offset"] == 0).all()
    silent = SamplingSpec(frames=8, stride=1, size=32, audio=AudioSpec())
    with pytest.raises(fmt.FormatError, match="built without sound"):
        _silent(shards, silent)


def _silent(shards: Path, spec: SamplingSpec) -> None:
    import shutil

    copy = shards.parent / "silent_copy"
    if not copy.exists():
        shutil.copytree(shards, copy)
        m = json.loads((copy / fmt.MANIFEST_NAME).read_text())
        m["options"]["ingest"]["audio"] = "drop"
        (copy / fmt.MANIFEST_NAME).write_text(json.dumps(m))
    build_loader(copy, "train", batch_size=2, spec=spec, backend="pyav", num_workers=0)


def test_dali_feeds_the_same_sound_as_pyav(tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")
    table, _ = _audio_set(tmp_path / "src", "vp9", videos=4)
    build(table, tmp_path / "out", BuildOptions(ingest=IngestOptions(audio="keep")), workers=1, quiet=True)
    spec = SamplingSpec(frames=8, stride=2, size=32, train=True, audio=AudioSpec(offsets=(-0.2, 0.0, 0.2)))
    got = {}
    for backend in ("dali", "pyav"):
        loader = build_loader(
            tmp_path / "out", "train", batch_size=2, spec=spec, backend=backend, num_workers=0
        )
        got[backend] = list(loader)
    assert got["dali"][0]["key"] and [b["key"] for b in got["dali"]] == [b["key"] for b in got["pyav"]]
    for a, b in zip(got["dali"], got["pyav"]):
        assert torch.equal(a["audio"], b["audio"]) and torch.equal(a["audio_shift"], b["audio_shift"])


def test_log_mel_puts_a_tone_in_its_band() -> None:
    spec = AudioSpec()
    t = torch.arange(16000) / 16000
    mel = log_mel(torch.stack([torch.sin(2 * torch.pi * 440 * t), torch.sin(2 * torch.pi * 3000 * t)]), spec)
    assert mel.shape == (2, 64, 101)
    low, high = mel[0].mean(1).argmax(), mel[1].mean(1).argmax()
    assert 5 <= low < high <= 50  # 440 Hz low in the mel scale, 3 kHz higher; both inside the range
    silence = log_mel(torch.zeros(1, 16000), spec)
    assert torch.allclose(silence, torch.full_like(silence, float(np.log(1e-6))))


def test_the_synthetic_backend_gives_sound_of_the_same_shape_and_draws() -> None:
    from data_shards.loader.audio import draw_offset

    audio = AudioSpec(offsets=(-0.2, 0.0, 0.2))
    spec = SamplingSpec(frames=8, size=32, audio=audio)
    loader = build_loader(
        "none", "train", batch_size=4, spec=spec, backend="synthetic", num_samples=8, seed=3
    )
    for b in loader:
        assert b["audio"].shape == (4, 64, 101)
        want = [draw_offset(audio, 3, 0, int(i)) for i in b["index"]]
        assert b["audio_offset"].tolist() == pytest.approx(want)

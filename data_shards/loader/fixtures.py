"""Small synthetic shard sets for the loader's tests and benchmark (real encodes, real shard writer)."""

from __future__ import annotations

from pathlib import Path

from data_shards import format as fmt
from data_shards.codec import ENCODERS
from data_shards.shardio import write_shard
from data_shards.synth import MOTIONS, SynthSpec, encode_clip, render_clip


def make_sample(
    index: int,
    spec: SynthSpec,
    tmp: Path,
    frames: int | None = None,
    *,
    stored_frames: int | None = None,
    prefix: str = "",
) -> fmt.Sample:
    """Render + encode video `index` of `spec` (optionally with another frame count) as a shard sample.

    `stored_frames` writes another count into the metadata than the stream has (a lying shard);
    `prefix` goes in front of the video id (so two sets made from the same spec have distinct keys)."""
    if frames is not None:
        spec = SynthSpec(**{**spec.__dict__, "frames": frames})
    clip_THWC, motion = render_clip(index, spec)
    ext = ENCODERS[spec.codec][1]
    path = tmp / f"clip{index}.{ext}"
    encode_clip(clip_THWC, path, spec.codec, spec.fps)
    video_id = f"{prefix}{spec.codec}/{index:06d}_{motion}"
    meta = {
        "id": video_id,
        "codec": spec.codec,
        "frames": stored_frames or spec.frames,
        "height": spec.size,
        "width": spec.size,
    }
    data = path.read_bytes()
    path.unlink()
    return fmt.Sample(fmt.sample_key(video_id), data, ext, MOTIONS.index(motion), meta)


def make_shard_set(
    folder: str | Path,
    *,
    codec: str = "vp9",
    shards: int = 2,
    per_shard: int = 6,
    frames: int = 32,
    size: int = 64,
    split: str = "train",
    short: dict[int, int] | None = None,
    seed: int = 0,
    prefix: str = "",
) -> Path:
    """Write `shards` x `per_shard` clips; `short` maps video index -> its (shorter) frame count;
    `prefix` makes the video ids (and keys) distinct from another set's."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = SynthSpec(videos=shards * per_shard, classes=4, frames=frames, size=size, codec=codec, seed=seed)
    short = short or {}
    infos = []
    for s in range(shards):
        samples = [
            make_sample(i, spec, folder, short.get(i), prefix=prefix)
            for i in range(s * per_shard, (s + 1) * per_shard)
        ]
        infos.append(write_shard(folder / fmt.shard_name(split, s), samples))
    counts = sum(i.samples for i in infos)
    manifest = fmt.Manifest(
        classes=list(MOTIONS[:4]),
        shards=infos,
        splits={split: fmt.SplitInfo(samples=counts, shards=len(infos), bytes=sum(i.bytes for i in infos))},
        options={"synthetic": True},
    )
    manifest.save(folder)
    return folder

"""Stage 3 of a build: the two Ray task bodies and the small dataclasses that cross the Ray boundary.

validate: every input goes through `ingest.ingest_video` (kept, remuxed, transcoded or trimmed, then fully
decoded); the result (and any new bytes) is cached in `OUT/.work/` keyed by (input, options), so a re-run
resumes.
write: one shard from its planned entries, written to a temporary name, renamed, indexed; its plan digest
is recorded so an identical shard on disk is kept untouched next time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from data_shards import storage
from data_shards.format import AUDIO_EXT, Sample, ShardInfo, atomic_write_bytes
from data_shards.ingest import Clip, IngestOptions, ingest_video
from data_shards.plan import ShardEntry
from data_shards.probe import RejectError
from data_shards.shardio import write_shard


@dataclass(frozen=True)
class ValidateJob:
    """One input to validate: its key, source file and optional time range (seconds)."""

    key: str
    path: str
    start: float | None = None
    end: float | None = None

    @property
    def clip(self) -> Clip | None:
        return Clip(self.start, self.end) if self.start is not None and self.end is not None else None


@dataclass(frozen=True)
class Validated:
    """What validation decided about one input; `digest` + `fingerprint` say whether a cached one is
    still valid (same options, same file size and mtime)."""

    key: str
    digest: str
    fingerprint: list[int] | None
    ok: bool
    ext: str | None = None
    meta: dict[str, Any] | None = None
    reason: str | None = None
    kind: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Validated:
        return cls(**data)


def _fingerprint(path: str) -> list[Any] | None:
    return storage.fingerprint(path)


def _cached(cache: storage.Location, digest: str, fp: list[int] | None) -> Validated | None:
    try:
        got = Validated.from_json(storage.read_json(cache))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):  # a cache from another version of this code: redo it
        return None
    return got if got.digest == digest and got.fingerprint == fp else None


@contextlib.contextmanager
def _local_input(path: str) -> Iterator[str]:
    """A source video as a local file for probing and decoding: itself, or a temporary download of a URL."""
    if not storage.is_url(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="tubelet-src-") as tmp:
        local = Path(tmp) / storage.name(path)
        storage.download(path, local)
        yield str(local)


def _validate_one(job: ValidateJob, opts: IngestOptions, work: str, digest: str) -> Validated:
    fp = _fingerprint(job.path)
    try:
        scratch = tempfile.gettempdir() if storage.is_url(work) else work  # re-encoding needs a local folder
        with _local_input(job.path) as local:
            got = ingest_video(local, opts, job.clip, workdir=scratch)
    except RejectError as e:
        return Validated(job.key, digest, fp, ok=False, reason=str(e), kind=e.kind)
    except Exception as e:  # a bug or an FFmpeg crash path we did not foresee: reject, name it, go on
        return Validated(
            job.key, digest, fp, ok=False, reason=f"error: {type(e).__name__}: {e}", kind="error"
        )
    if got.meta["ingest"] != "kept":  # new bytes wait in the work folder for the shard writer
        atomic_write_bytes(storage.join(work, f"{job.key}.{got.ext}"), got.data)
    if got.audio is not None:
        atomic_write_bytes(storage.join(work, f"{job.key}.{AUDIO_EXT}"), got.audio)
    return Validated(job.key, digest, fp, ok=True, ext=got.ext, meta=got.meta)


def validate_batch(jobs: list[ValidateJob], opts: IngestOptions, work: str, digest: str) -> list[Validated]:
    """Ray task body: validate each input (or reuse its cached result)."""
    out = []
    for job in jobs:
        cache = storage.join(work, f"{job.key}.json")
        got = _cached(cache, digest, _fingerprint(job.path))
        if got is None:
            got = _validate_one(job, opts, work, digest)
            atomic_write_bytes(cache, json.dumps(asdict(got)).encode())
        out.append(got)
    return out


def _video_bytes(entry: ShardEntry, work: str) -> bytes:
    kept = entry.meta["ingest"] == "kept"
    src = entry.path if kept else storage.join(work, f"{entry.key}.{entry.ext}")
    data = storage.read_bytes(src)
    if hashlib.sha256(data).hexdigest() != entry.meta["sha256"]:
        raise RuntimeError(f"{entry.path}: changed since it was validated; re-run the build")
    return data


def _audio_bytes(entry: ShardEntry, work: str) -> bytes | None:
    info = entry.meta.get("audio")
    if not info:
        return None
    data = storage.read_bytes(storage.join(work, f"{entry.key}.{AUDIO_EXT}"))
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise RuntimeError(
            f"{entry.path}: its extracted sound changed since it was validated; re-run the build"
        )
    return data


def write_shard_task(out: str, name: str, entries: list[ShardEntry], work: str, plan: str) -> ShardInfo:
    """Ray task body: write one shard and record its plan digest for resume."""
    samples = (
        Sample(
            key=e.key,
            video=_video_bytes(e, work),
            video_ext=e.ext,
            label=e.label,
            meta=e.meta,
            audio=_audio_bytes(e, work),
        )
        for e in entries
    )
    info = write_shard(storage.join(out, name), samples)
    record = {"plan": plan, "info": asdict(info)}
    atomic_write_bytes(storage.join(work, "shards", f"{name}.json"), json.dumps(record).encode())
    return info

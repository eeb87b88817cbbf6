"""A run directory at a URL (`train.run_dir: s3://bucket/runs/x`): nothing needs a shared disk.

Each rank works in its own local staging copy (`$TUBELET_CACHE/runs/<url>/rank_<r>`, wiped at start: the store
is the truth) and mirrors to the store what it writes:

- a checkpoint: every rank uploads its own files (its ZeRO partitions, its `rank_*.pt`; rank 0 also the
  model states), all ranks meet, then rank 0 uploads the `complete` marker and `latest` last, so a
  checkpoint counts in the store only when every rank's part is there; retention deletes in the store too;
- everything else rank 0 writes (resolved config, `metrics.jsonl`, images, exported models) after each
  checkpoint and at the end.

`--resume auto` lists the store's complete checkpoints and downloads the newest one's files (DeepSpeed's
ZeRO-1/2 loader reads every rank's optimizer partition, so a rank fetches the whole tag but only its own
`rank_*.pt`), plus rank 0's small files so `metrics.jsonl` continues.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from data_shards import storage

CKPT_DIR, COMPLETE, LATEST, UNIVERSAL = "checkpoints", "complete", "latest", "universal"


def staging_dir(url: str, rank: int) -> Path:
    return storage.cache_root() / "runs" / url.rstrip("/").replace("://", "/") / f"rank_{rank}"


def _is_rank_file(name: str) -> int | None:
    """The rank a checkpoint file belongs to (`rank_00001.pt`, `zero_pp_rank_1_...`), None for shared ones."""
    if name.startswith("rank_") and name.endswith(".pt"):
        return int(name[len("rank_") : -len(".pt")])
    if name.startswith("zero_pp_rank_"):
        return int(name[len("zero_pp_rank_") :].split("_", 1)[0])
    return None


def shown(path: Path, local: Path, url: str | None) -> str:
    """A path as the user knows it: under a staging copy `local` of a run directory at `url`, its URL (logs
    never name this machine's staging copy); any other path (or no URL) as it is."""
    if url is None or not path.is_relative_to(local):
        return str(path)
    return storage.join(url, *path.relative_to(local).parts)


class RunMirror:
    """The store side of a URL run directory; `local` is this rank's staging copy (the engine's run_dir)."""

    def __init__(self, url: str, rank: int) -> None:
        storage.check_access(url)
        self.url = url.rstrip("/")
        self.rank = rank
        self.local = staging_dir(self.url, rank)
        self._pushed: dict[str, tuple[int, int]] = {}

    # -- start ---------------------------------------------------------------------------------------
    def complete_tags(self) -> list[str]:
        """Tags of the store's complete checkpoints, oldest first: one listing of the checkpoints' keys, not a
        request per checkpoint (a store whose folders were emptied by another client may still list them)."""
        keys = storage.find(storage.join(self.url, CKPT_DIR))
        done = [
            k.split("/")[0]
            for k in keys
            if k.startswith("step_") and k.endswith(f"/{COMPLETE}") and k.count("/") == 1
        ]
        return sorted(done, key=lambda t: int(t.split("_")[1]))

    def pull(self, resume: str | None) -> None:
        """Fresh staging; the newest complete checkpoint's marker always (so a run without `--resume` is
        refused over existing checkpoints, as locally), its files and rank 0's small files for `auto`."""
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
        tags = self.complete_tags()
        if not tags:
            return
        newest = tags[-1]
        marker = storage.join(self.url, CKPT_DIR, newest, COMPLETE)
        if resume != "auto":
            storage.download(marker, self.local / CKPT_DIR / newest / COMPLETE)
            return
        self.pull_checkpoint(newest, every_rank=False)
        if self.rank == 0:
            for name in storage.listdir(self.url):
                if name != CKPT_DIR and storage.isfile(storage.join(self.url, name)):
                    storage.download(storage.join(self.url, name), self.local / name)

    def pull_checkpoint(self, tag: str, every_rank: bool) -> Path:
        """A checkpoint's files into staging (`every_rank`: other ranks' `rank_*.pt` too, for an export);
        the marker last, so the local copy counts as complete only when whole."""
        src = storage.join(self.url, CKPT_DIR, tag)
        dst = self.local / CKPT_DIR / tag
        for name in storage.listdir(src):
            owner = _is_rank_file(name)
            # rank 0's resume state is everyone's when the world size changed
            theirs = name.startswith("rank_") and owner not in (self.rank, 0)
            if name == COMPLETE or (theirs and not every_rank):
                continue
            if name == UNIVERSAL or not (dst / name).is_file():
                storage.download(storage.join(src, name), dst / name)
        storage.download(storage.join(src, COMPLETE), dst / COMPLETE)
        return dst

    # -- checkpoints ---------------------------------------------------------------------------------
    def push_rank_files(self, ckpt: Path) -> None:
        """This rank's files of a checkpoint just written (rank 0: also the files no rank owns)."""
        for f in sorted(p for p in ckpt.iterdir() if p.is_file()):
            owner = _is_rank_file(f.name)
            if f.name != COMPLETE and (owner == self.rank or (owner is None and self.rank == 0)):
                storage.upload(f, storage.join(self.url, CKPT_DIR, ckpt.name, f.name))

    def push_marker(self, ckpt: Path) -> None:
        """Rank 0, after every rank pushed: the checkpoint counts from here on."""
        storage.upload(ckpt / COMPLETE, storage.join(self.url, CKPT_DIR, ckpt.name, COMPLETE))
        storage.write_text(storage.join(self.url, CKPT_DIR, LATEST), ckpt.name)

    def push_universal(self, ckpt: Path) -> None:
        """Rank 0's universal conversion of a checkpoint, for the ranks on other machines."""
        storage.upload(ckpt / UNIVERSAL, storage.join(self.url, CKPT_DIR, ckpt.name, UNIVERSAL))

    def pull_universal(self, ckpt: Path) -> None:
        storage.download(storage.join(self.url, CKPT_DIR, ckpt.name, UNIVERSAL), ckpt / UNIVERSAL)

    def prune(self, keep: list[str]) -> None:
        """Rank 0: complete checkpoints in the store other than `keep` are deleted (retention)."""
        for tag in self.complete_tags():
            if tag not in keep:
                storage.remove(storage.join(self.url, CKPT_DIR, tag, COMPLETE))  # not complete from now on
                storage.remove(storage.join(self.url, CKPT_DIR, tag), recursive=True)

    # -- everything else -----------------------------------------------------------------------------
    def push_files(self) -> None:
        """Rank 0: every file outside `checkpoints/` that changed since the last push."""
        for f in sorted(p for p in self.local.rglob("*") if p.is_file()):
            rel = f.relative_to(self.local)
            if rel.parts[0] == CKPT_DIR:
                continue
            st = f.stat()
            if self._pushed.get(str(rel)) != (st.st_size, st.st_mtime_ns):
                storage.upload(f, storage.join(self.url, *rel.parts))
                self._pushed[str(rel)] = (st.st_size, st.st_mtime_ns)


def fetch_run(url: str) -> Path:
    """A run directory at a URL, made local for reading (fine-tuning from it, exporting it): its small
    files and its newest complete checkpoint with every rank's files, in the local cache."""
    mirror = RunMirror(url, rank=0)
    mirror.local = storage.cache_root() / "sources" / url.rstrip("/").replace("://", "/")
    mirror.local.mkdir(parents=True, exist_ok=True)
    for name in storage.listdir(mirror.url):
        if name != CKPT_DIR and storage.isfile(storage.join(mirror.url, name)):
            storage.download(storage.join(mirror.url, name), mirror.local / name)
    tags = mirror.complete_tags()
    if not tags:
        raise FileNotFoundError(f"{url}: no complete checkpoint under {CKPT_DIR}/")
    mirror.pull_checkpoint(tags[-1], every_rank=True)
    return mirror.local


def env_rank() -> int:
    """This process's global rank from the launcher's environment (before any process group)."""
    return int(os.environ.get("RANK", "0"))

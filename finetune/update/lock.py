"""One round at a time per model: an exclusive lock file (O_EXCL) in the work directory, naming its holder.

A second round started meanwhile waits up to `lock_wait_s`, then refuses (`RoundBusy`); a lock whose
holder process is gone (same host) is stale and taken over. Promotion itself re-checks that the champion
is still the one the round compared against, so even two work directories can never both promote.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from data_shards import storage


class RoundBusy(RuntimeError):
    """Another round of the same model holds the lock."""


def _try_take(path: Path, holder: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(holder, f)
    return True


def _stale(path: Path) -> bool:
    try:
        held = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return False  # being written right now
    return held.get("host") == socket.gethostname() and not storage.pid_alive(int(held.get("pid", -1)))


@contextlib.contextmanager
def round_lock(work_dir: Path, model: str, round_name: str, wait_s: float = 0.0) -> Iterator[Path]:
    """Hold `WORK_DIR/locks/MODEL.lock` for the block."""
    folder = work_dir / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{model}.lock"
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "round": round_name, "since": time.time()}
    deadline = time.monotonic() + wait_s
    while not _try_take(path, holder):
        if _stale(path):
            path.unlink(missing_ok=True)
            continue
        if time.monotonic() >= deadline:
            try:
                held = json.loads(path.read_text())
            except (OSError, ValueError):
                held = {}
            raise RoundBusy(
                f"another update round of {model!r} is running ({held.get('round', '?')} on "
                f"{held.get('host', '?')}, pid {held.get('pid', '?')}; lock {path}): this one refuses to start"
            )
        time.sleep(0.5)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)

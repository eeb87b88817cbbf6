"""Request capture (`serve --capture DIR|URL`): accepted uploads kept, with what the model said about them,
as new training data in waiting.

Layout (local folder or a URL, written through `data_shards.storage`):

    DIR/videos/<id>.<ext>          the uploaded bytes, as received (only uploads that decoded and got an answer)
    DIR/captures-<replica>.csv     path,label,predicted,score,model_version,captured_at — one file per replica,
                                   rewritten whole after each capture (objects cannot be appended to)

`label` is left empty: fill it in (a person, or a labelling tool) and `python -m data_shards build
DIR/captures-<replica>.csv` reads it (its extra columns are ignored); the update loop takes it as `videos=`.
Captures are sampled (`--capture-rate`), bounded in total video bytes (`--capture-max-bytes`), written on a
background thread off the request path, and a failed write never fails the request (it is counted).
"""

from __future__ import annotations

import csv
import io
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from queue import Full, Queue
from typing import Any

from data_shards import storage

log = logging.getLogger("tubelet.capture")
COLUMNS = ("path", "label", "predicted", "score", "model_version", "captured_at")


def video_extension(data: bytes) -> str:
    """A file name extension from the container's magic bytes (decoders probe the content anyway)."""
    if data[4:8] == b"ftyp":
        return "mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "webm" if b"webm" in data[:64] else "mkv"
    if data[:4] == b"RIFF":
        return "avi"
    return "video"


@dataclass
class Capture:
    """One replica's capture writer."""

    where: str
    replica: str
    rate: float = 1.0
    max_bytes: int = 1 << 30
    seed: int | None = None
    stats: dict[str, int] = field(
        default_factory=lambda: {"captured": 0, "bytes": 0, "failed": 0, "skipped": 0}
    )

    def __post_init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._rng = random.Random(self.seed)
        self._queue: Queue[tuple[bytes, dict[str, Any]] | None] = Queue(maxsize=64)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._writer, name="capture", daemon=True)
        self._thread.start()

    def offer(self, data: bytes, top: dict[str, Any], version: str | None) -> bool:
        """Queue an accepted upload (sampled, within the byte budget); never blocks the request."""
        with self._lock:
            if self._rng.random() >= self.rate or self.stats["bytes"] + len(data) > self.max_bytes:
                self.stats["skipped"] += 1
                return False
            self.stats["bytes"] += len(data)
        row = {
            "predicted": top["label"],
            "score": round(float(top["score"]), 6),
            "model_version": version or "",
        }
        try:
            self._queue.put_nowait((data, row))
        except Full:  # the store is slower than the traffic: drop, counted
            with self._lock:
                self.stats["skipped"] += 1
                self.stats["bytes"] -= len(data)
            return False
        return True

    def _writer(self) -> None:
        while (item := self._queue.get()) is not None:
            data, row = item
            try:
                self._write(data, row)
            except Exception as e:  # the request has been answered: a capture failure is only counted
                with self._lock:
                    self.stats["failed"] += 1
                log.warning("capture to %s failed: %s", self.where, e)
            finally:
                self._queue.task_done()

    def _write(self, data: bytes, row: dict[str, Any]) -> None:
        rel = f"videos/{uuid.uuid4().hex}.{video_extension(data)}"
        storage.write_bytes(storage.join(self.where, rel), data)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.rows.append({"path": rel, "label": "", **row, "captured_at": stamp})
        text = io.StringIO()
        w = csv.DictWriter(text, COLUMNS)
        w.writeheader()
        w.writerows(self.rows)
        storage.write_bytes(
            storage.join(self.where, f"captures-{self.replica}.csv"), text.getvalue().encode()
        )
        with self._lock:
            self.stats["captured"] += 1

    def flush(self) -> None:
        """Wait until every queued capture is written (tests, shutdown)."""
        self._queue.join()

    def describe(self) -> dict[str, Any]:
        return {"where": self.where, "rate": self.rate, "max_bytes": self.max_bytes, **self.stats}

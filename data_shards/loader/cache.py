"""Samples read from object storage: concurrent prefetch and an optional local cache bounded in bytes.

`RemoteSamples` is what `ShardReader` uses for shards at a URL. Each sample is one ranged GET of its video
member (the `.idx` byte range), retried on transient errors by `storage.retried`. `prefetch(refs)` starts the
GETs of a batch (and the next one) on a background thread, so a worker decodes while the network works.

The cache (`data.cache_dir`, `data.cache_bytes`) keeps sample bytes as files named by a hash of (shard URL,
offset, size), least recently used first out. Before files are added (a prefetched batch at a time, under one
lock), older ones are deleted until the new total fits the bound. The total is kept in a small `.total` file under the folder's lock (so several workers
and ranks sharing it stay within it) and recounted from the folder whenever files must go, so a write costs
a small read, not a scan. Files are written under a temporary name holding the
writer's pid and renamed when complete; temporaries of dead processes are removed when a cache opens, so a
crashed run leaves nothing that breaks the next.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import queue
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from data_shards import storage

MAX_PENDING = 256  # prefetched samples held at most (a batch or two)
IO_STATS = ("remote_gets", "remote_bytes", "cache_hits", "storage_retries")


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An advisory lock every process sharing the cache folder takes to make room and write: without it two
    DataLoader workers could each find room for their sample and together pass the bound."""
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class SampleCache:
    """Sample bytes on local disk, LRU, at most `max_bytes` in total."""

    def __init__(self, root: str | os.PathLike, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"data.cache_bytes must be > 0 with data.cache_dir set, got {max_bytes}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        for f in self.root.glob(".*.partial"):  # a crashed writer's leftovers
            pid = f.name.split(".")[1]
            if not (pid.isdigit() and storage.pid_alive(int(pid))):
                f.unlink(missing_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / hashlib.sha1(key.encode()).hexdigest()

    def get(self, key: str) -> bytes | None:
        p = self._path(key)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return None
        os.utime(p)  # most recently used
        return data

    def put(self, key: str, data: bytes) -> None:
        self.put_many([(key, data)])

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        """Add samples (a prefetched batch) under one lock: one read and one write of the recorded total for
        all of them (a put per sample cost ~1 ms of a loader's CPU), files written under temporary names and
        renamed. A batch larger than the bound keeps its first samples that fit."""
        paths: dict[Path, bytes] = {}  # a key twice: stored once; what would pass the bound alone: not at all
        for key, data in items:
            p = self._path(key)
            if sum(len(d) for q, d in paths.items() if q != p) + len(data) <= self.max_bytes:
                paths[p] = data
        if not paths:
            return
        with self._lock, _exclusive(self.root / ".lock"):  # threads here, worker processes across
            replaced = sum(p.stat().st_size for p in paths if p.exists())
            incoming = sum(len(d) for d in paths.values())
            total = self._total() - replaced
            if total + incoming > self.max_bytes:
                total = self._make_room(incoming)
            # the new total is recorded before the files land: a crash in between over-counts (evicts early,
            # corrected at the next scan), never under-counts (which could pass the bound)
            self._record(total + incoming)
            for p, data in paths.items():
                tmp = p.with_name(f".{os.getpid()}.{p.name}.partial")
                tmp.write_bytes(data)
                os.replace(tmp, p)

    def _total(self) -> int:
        """Bytes in the cache as recorded by the last writer (any process), or counted when there is no record:
        a put costs a small read, not a scan of a folder of thousands of samples."""
        try:
            return int((self.root / ".total").read_text())
        except (FileNotFoundError, ValueError):
            return self.size()

    def _record(self, total: int) -> None:
        tmp = self.root / f".{os.getpid()}.total.partial"
        tmp.write_text(str(total))
        os.replace(tmp, self.root / ".total")

    def _make_room(self, incoming: int) -> int:
        """Evict least recently used files until `incoming` more bytes fit; the remaining total, counted."""
        files = []
        for e in os.scandir(self.root):
            if e.is_file() and not e.name.startswith("."):
                st = e.stat()
                files.append((st.st_mtime_ns, st.st_size, e.path))
        total = sum(s for _, s, _ in files)
        for _, size, path in sorted(files):  # oldest use first
            if total + incoming <= self.max_bytes:
                break
            Path(path).unlink(missing_ok=True)
            total -= size
        return total

    def size(self) -> int:
        return sum(
            e.stat().st_size for e in os.scandir(self.root) if e.is_file() and not e.name.startswith(".")
        )

    def __getstate__(self) -> dict[str, Any]:  # a lock does not pickle (spawned workers)
        return {"root": self.root, "max_bytes": self.max_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.root, self.max_bytes, self._lock = state["root"], state["max_bytes"], threading.Lock()


class _Prefetcher:
    """One daemon thread running submitted calls in order. Not a ThreadPoolExecutor: Python joins an executor's
    threads at exit, so a process whose training stopped (a missing object, the end) waited for prefetches nobody
    would read, each retrying an unreachable store for about a minute (measured: over a minute after pytest
    finished). A prefetch killed at exit leaves at most a cache temporary, removed at the next start. The
    thread ends when its prefetcher is garbage-collected."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Future, Any, tuple] | None] = queue.SimpleQueue()
        threading.Thread(target=_serve, args=(self._calls,), name="tubelet-prefetch", daemon=True).start()
        weakref.finalize(self, self._calls.put, None)

    def submit(self, fn: Any, *args: Any) -> Future:
        fut: Future = Future()
        self._calls.put((fut, fn, args))
        return fut


def _serve(calls: queue.SimpleQueue[tuple[Future, Any, tuple] | None]) -> None:
    while (call := calls.get()) is not None:
        fut, fn, args = call
        if not fut.set_running_or_notify_cancel():
            continue
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # handed to the reader, raised there
            fut.set_exception(e)


class RemoteSamples:
    """Video members of shards at URLs: cache, then prefetched GETs, then a GET now. A batch is prefetched
    as one call on a background thread (concurrent ranged GETs on the client's event loop). Counts what it
    did in `stats` (gets, bytes, cache hits, retries) for the loader's metrics."""

    def __init__(self, cache: SampleCache | None = None) -> None:
        self.cache = cache
        self.stats = dict.fromkeys(IO_STATS, 0)
        self._stats_lock = threading.Lock()  # the prefetch thread counts while the worker takes the counts
        self._pid = os.getpid()
        self._pool: _Prefetcher | None = None
        self._pending: OrderedDict[tuple[str, int, int], tuple[Future, int]] = OrderedDict()

    def _fresh(self) -> None:
        """After a fork (a DataLoader worker): the parent's thread does not exist here."""
        if self._pid != os.getpid():
            self._pid, self._pool, self._pending = os.getpid(), None, OrderedDict()

    def _fetch_many(self, items: list[tuple[str, int, int]]) -> list[bytes | OSError]:
        """Each item's bytes, or the error reading it (raised by `read` for that item only)."""
        out: list[bytes | OSError | None] = [None] * len(items)
        missing = []
        for i, (shard, start, size) in enumerate(items):
            if self.cache is not None and (data := self.cache.get(f"{shard}:{start}:{size}")) is not None:
                self._count(cache_hits=1)
                out[i] = data
            else:
                missing.append(i)
        if missing:
            before = storage.thread_retries()  # read_many retries in this thread
            got = storage.read_many([(items[i][0], items[i][1], items[i][1] + items[i][2]) for i in missing])
            fetched = []
            for i, data in zip(missing, got):
                shard, start, size = items[i]
                out[i] = data
                if isinstance(data, OSError):
                    continue
                if len(data) == size:
                    fetched.append((f"{shard}:{start}:{size}", data))
            ok = [d for d in got if not isinstance(d, OSError)]
            self._count(
                remote_gets=len(ok),
                remote_bytes=sum(len(d) for d in ok),
                storage_retries=storage.thread_retries() - before,
            )
            if self.cache is not None:
                self.cache.put_many(fetched)
        return out  # type: ignore[return-value]

    def prefetch(self, items: list[tuple[str, int, int]]) -> None:
        """Start fetching (shard, offset, size) items not already under way, as one background call."""
        self._fresh()
        new = [item for item in dict.fromkeys(items) if item not in self._pending]
        if not new:
            return
        if self._pool is None:
            self._pool = _Prefetcher()
        fut = self._pool.submit(self._fetch_many, new)
        for i, item in enumerate(new):
            self._pending[item] = (fut, i)
        while len(self._pending) > MAX_PENDING:  # the oldest were never asked for (a skipped batch)
            self._pending.popitem(last=False)

    def read(self, shard: str, start: int, size: int) -> bytes:
        self._fresh()
        pending = self._pending.pop((shard, start, size), None)
        if pending is not None:
            fut, i = pending
            data = fut.result()[i]
        else:
            data = self._fetch_many([(shard, start, size)])[0]
        if isinstance(data, OSError):
            raise data
        return data

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for k, n in deltas.items():
                self.stats[k] += n

    def take_stats(self) -> dict[str, int]:
        """The counts since the last call (reset): a worker hands them to the main process with its batch."""
        with self._stats_lock:
            out, self.stats = self.stats, dict.fromkeys(self.stats, 0)
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {"cache": self.cache, "stats": dict.fromkeys(self.stats, 0), "_pid": -1, "_pool": None,
                "_pending": OrderedDict()}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._stats_lock = threading.Lock()

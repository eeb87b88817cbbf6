"""The sample cache's bound: a running total shared by every process using the folder, never passed."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from data_shards.loader.cache import SampleCache


def _files(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in root.iterdir() if not p.name.startswith(".")}


def _fill(root: str, bound: int, worker: int) -> None:
    """One sample at a time (worker 0) or prefetched batches of 4 (the others)."""
    cache = SampleCache(root, bound)
    samples = [(f"w{worker}:{i}", bytes([worker]) * (100 + 7 * i)) for i in range(40)]
    for i in range(0, 40, 1 if worker == 0 else 4):
        if worker == 0:
            cache.put(*samples[i])
        else:
            cache.put_many(samples[i : i + 4])


def test_processes_sharing_a_cache_stay_within_its_bound(tmp_path: Path) -> None:
    bound = 5000
    procs = [mp.get_context("fork").Process(target=_fill, args=(str(tmp_path), bound, w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    files = _files(tmp_path)
    assert 0 < sum(files.values()) <= bound
    assert int((tmp_path / ".total").read_text()) == sum(files.values())  # the record agrees with the folder


def test_a_lost_or_wrong_record_is_recounted_and_a_rewrite_is_not_counted_twice(tmp_path: Path) -> None:
    cache = SampleCache(tmp_path, 1000)
    cache.put("a", b"x" * 300)
    cache.put("a", b"y" * 300)  # the same key again: replaces, 300 bytes in all
    assert int((tmp_path / ".total").read_text()) == 300 and cache.get("a") == b"y" * 300
    (tmp_path / ".total").unlink()  # a crash or a user's cleanup: the next write counts the folder
    cache.put("b", b"z" * 300)
    assert int((tmp_path / ".total").read_text()) == 600
    (tmp_path / ".total").write_text("999")  # over-counted (a writer died after recording): evicts, recounts
    cache.put("c", b"w" * 300)
    assert sum(_files(tmp_path).values()) <= 1000
    assert int((tmp_path / ".total").read_text()) == sum(_files(tmp_path).values())
    assert cache.get("c") == b"w" * 300


def test_a_batch_larger_than_the_bound_keeps_what_fits(tmp_path: Path) -> None:
    cache = SampleCache(tmp_path, 1000)
    cache.put("old", b"o" * 500)
    cache.put_many([("a", b"a" * 400), ("b", b"b" * 400), ("a", b"A" * 400), ("c", b"c" * 400)])
    files = _files(tmp_path)
    assert sum(files.values()) <= 1000 and int((tmp_path / ".total").read_text()) == sum(files.values())
    assert cache.get("a") == b"A" * 400 and cache.get("b") == b"b" * 400  # the key twice: stored once, last
    assert cache.get("c") is None and cache.get("old") is None  # c did not fit; old was the least recent

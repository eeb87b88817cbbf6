"""Where bytes live: one small module owns every location a user gives, a local path or a URL.

Local paths behave as plain files always did (atomic writes by rename). A URL (`s3://bucket/prefix`,
`gs://...`, any protocol fsspec knows and has its library for) goes through fsspec; `s3://` through s3fs,
which reads the standard AWS configuration (`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` for S3-compatible
stores, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, profiles). Why fsspec + s3fs: one
maintained API for local files and every object store (GCS, Azure, HTTP come with their fsspec packages),
concurrent ranged reads (`cat_ranges`), and it is already in the dependency tree (Ray, pyarrow, MLflow use it).
The one hot path, the loaders' sample reads (`read_many`), goes through obstore for `s3://` (`_object_store`:
a tenth of botocore's CPU per GET, measured by tests/bench/bench_storage.py); the ranges one object is read
at (a shard's listing) are coalesced into few GETs (`coalesce`).

An object store has no rename, but a PUT is atomic: an object appears under its key only complete, which
is the same guarantee the local rename gives. A URL whose scheme is unknown, or whose library is not
installed, is an error naming it, never a local folder called `s3:`.

This is the bottom layer: it imports nothing from the project, and every package may import it.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

Location = str | os.PathLike  # a local path or a URL
T = TypeVar("T")

# errors worth another try: the store or the network, not the request (throttling, 5xx, resets, timeouts)
TRANSIENT_HINTS = (
    "slowdown",
    "throttl",
    "timeout",
    "timed out",
    "reset",
    "503",
    "500",
    "502",
    "504",
    "internal",
)
COALESCE_GAP = 1 << 20  # ranges of one object closer than this are read by one GET (`coalesce`)
COALESCE_MOST = 8 << 20  # ... up to this many bytes per GET
RETRIES = int(os.environ.get("TUBELET_STORAGE_RETRIES", "8"))
# transient errors retried in this process, and ranges read by obstore (loaders report `thread_retries`)
stats = {"retries": 0, "obstore_reads": 0}
_this_thread = threading.local()


def thread_retries() -> int:
    """Retries made by the calling thread so far. A caller counting its own retries takes the difference of
    this, not of `stats`, which also moves with other threads' retries (a loader's prefetch thread)."""
    return getattr(_this_thread, "retries", 0)


class StorageError(OSError):
    """A location that cannot be used: an unsupported URL scheme, a missing library, a missing bucket."""


def is_url(loc: Location) -> bool:
    """`scheme://...` other than `file://` (a local path, even one with a colon, is not a URL)."""
    text = os.fspath(loc)
    return "://" in text and not text.startswith("file://") and text.split("://", 1)[0].isidentifier()


def local_path(loc: Location) -> Path:
    """The path of a local location (`file://` stripped); a URL is an error naming it."""
    if is_url(loc):
        raise StorageError(f"{loc}: a local path is needed here")
    text = os.fspath(loc)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


# the umask, read once at import (reading it means setting it, which is not thread-safe later): files written
# through a temporary get the mode a plain open() gives, not mkstemp's 0600 (a shared set readable by others)
_UMASK = os.umask(0o022)
os.umask(_UMASK)

_clients: dict[str, Any] = {}
_inherited: list[Any] = []  # a forked child's copies of its parent's clients: kept, never closed (see below)


def _filesystem(protocol: str) -> Any:
    """One client per protocol and process. s3fs reads AWS_* from the environment, as boto does; fsspec's own
    instance cache is bypassed so `reset_clients()` really starts over (tests, a changed environment)."""
    if protocol not in _clients:
        import fsspec

        for name in (
            "botocore",
            "aiobotocore",
            "s3fs",
        ):  # their INFO lines (credentials found, ...) are noise
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))

        try:
            cls = fsspec.get_filesystem_class(protocol)
        except (ValueError, ImportError) as e:
            raise StorageError(
                f"{protocol}:// locations are not supported here ({e}); local paths and s3:// work out of the "
                "box, other protocols need their fsspec package (gcsfs for gs://, adlfs for az://)"
            ) from None
        if protocol == "s3":
            _s3_settings()  # here, in the process that lists the shards, not once per forked worker
        options: dict[str, Any] = {"skip_instance_cache": True}
        parent = next((c[protocol] for c in reversed(_inherited) if protocol in c), None)
        if getattr(parent, "session", None) is not None:  # a forked worker: the parent's loaded botocore
            options["session"] = parent.session  # session (service models, credentials), not its connections
        try:  # no listings cache: another machine's writes (a checkpoint, its universal copy) must show at once
            _clients[protocol] = cls(use_listings_cache=False, **options)
        except TypeError:
            _clients[protocol] = cls(**options)
    return _clients[protocol]


def _object_store(url: str) -> Any | None:
    """An obstore client for the bucket of an `s3://` URL, or None (another protocol, obstore not installed,
    no credentials): the loaders' ranged GETs go through it. Why a second library: a GET through
    botocore costs ~1 ms of this process's CPU (request signing and parsing in Python), obstore's ~0.1 ms
    (Rust), and on a data-loading core that CPU is taken from the decoder. Credentials, region and endpoint
    are resolved by botocore exactly as for s3fs (environment, profiles, SSO, instance roles), so both
    clients see the same store. Retries are left to `retried` (counted, logged): obstore retries nothing."""
    protocol, rest = url.split("://", 1)
    if protocol != "s3" or _obstore["forked"]:
        return None
    bucket = rest.split("/", 1)[0]
    key = f"obstore:{bucket}"
    if key not in _clients:
        settings = _s3_settings()
        store = None
        if settings is not None:
            from obstore.store import S3Store

            store = S3Store(bucket, **settings)
            _obstore["used"] = True
        _clients[key] = store
    return _clients[key]


# obstore's I/O runtime does not survive fork(): a child of a process that used it hangs on its first GET.
# Such a child (a DataLoader worker forked after the main process read samples itself) uses s3fs instead.
_obstore = {"used": False, "forked": False}
# obstore's S3 settings, kept across fork on purpose: resolved once, before the loader's workers start
_resolved: dict[str, Any] = {}


def _s3_settings() -> dict[str, Any] | None:
    """obstore's S3 settings (credential provider, region, endpoint), resolved by botocore as s3fs does;
    None without obstore or without credentials (anonymous access stays with s3fs)."""
    if "s3" in _resolved:
        return _resolved["s3"]
    try:
        import botocore.session
        from obstore.auth.boto3 import Boto3CredentialProvider

        session = botocore.session.Session()
        provider = Boto3CredentialProvider(session)  # ValueError: no credentials found
    except (ImportError, ValueError):
        _resolved["s3"] = None
        return None
    meta = session.create_client("s3").meta  # the endpoint and region botocore (and so s3fs) resolved
    client: dict[str, Any] = {"timeout": timedelta(seconds=60), "connect_timeout": timedelta(seconds=10)}
    settings = {"credential_provider": provider, "region": meta.region_name or "us-east-1"}
    if not meta.endpoint_url.split("://", 1)[-1].split("/", 1)[0].endswith("amazonaws.com"):
        settings["endpoint"] = meta.endpoint_url  # an S3-compatible store (path-style requests)
        client["allow_http"] = meta.endpoint_url.startswith("http://")
    settings["client_options"] = client
    settings["retry_config"] = {"max_retries": 0, "retry_timeout": timedelta(seconds=60)}
    _resolved["s3"] = settings
    return settings


def reset_clients() -> None:
    """Forget this process's clients: the next call makes new ones from the current environment."""
    _clients.clear()
    _resolved.clear()


def _after_fork_in_child() -> None:
    # The parent's client shares its pooled connections (sockets) with this child; closing it here would
    # close them under the parent, whose next request would hang until its read timeout. Keep it, unused.
    _inherited.append(dict(_clients))
    _clients.clear()
    _obstore["forked"] = _obstore["forked"] or _obstore["used"]


os.register_at_fork(after_in_child=_after_fork_in_child)


def filesystem(loc: Location) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of a URL."""
    text = os.fspath(loc)
    protocol, rest = text.split("://", 1)
    if not rest.strip("/"):
        raise StorageError(f"{text}: a URL needs a bucket (and usually a prefix)")
    return _filesystem(protocol), rest.rstrip("/")


def join(loc: Location, *parts: str) -> Location:
    """`loc / part / ...`; a URL stays a string (Path would fold `s3://` into `s3:/`). An unsupported URL
    scheme fails here, where a location first enters the code."""
    if is_url(loc):
        filesystem(loc)
        return "/".join([os.fspath(loc).rstrip("/"), *(p.strip("/") for p in parts)])
    return local_path(loc).joinpath(*parts)


def name(loc: Location) -> str:
    return os.fspath(loc).rstrip("/").rsplit("/", 1)[-1]


def parent(loc: Location) -> Location:
    if is_url(loc):
        return os.fspath(loc).rstrip("/").rsplit("/", 1)[0]
    return local_path(loc).parent


def retried(what: str, fn: Callable[[], T]) -> T:
    """`fn()`, retried with exponential backoff and jitter on transient errors (counted in `stats`); a missing
    object or a denied access fails at once, naming `what`."""
    for attempt in range(RETRIES + 1):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, StorageError):
            raise
        except Exception as e:
            if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):  # botocore's
                raise StorageError(
                    f"{what}: no credentials for the store ({e}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                    "(or AWS_PROFILE), and AWS_ENDPOINT_URL for an S3-compatible store"
                ) from None
            if attempt == RETRIES and _transient(e):
                raise StorageError(f"{what}: the store did not answer after {RETRIES} retries: {e}") from e
            if attempt == RETRIES or not _transient(e):
                raise
            stats["retries"] += 1
            _this_thread.retries = thread_retries() + 1
            delay = min(30.0, 0.25 * 2**attempt) * (0.5 + random.random())
            log.warning("%s: %s (try %d of %d, again in %.1f s)", what, e, attempt + 1, RETRIES, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _transient(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(e).__name__} {e}".lower()
    return any(h in text for h in TRANSIENT_HINTS) or "connect" in text


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine still runs (a lock or a cache entry it left is stale if not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_access(loc: Location) -> None:
    """Fail before any work when a URL's bucket is missing or the credentials are refused (a store that would
    create buckets on first write must not hide a typo). Local locations: nothing to check."""
    if not is_url(loc):
        return
    fs, path = filesystem(loc)
    bucket = path.split("/", 1)[0]
    try:
        if hasattr(fs, "call_s3"):
            retried(os.fspath(loc), lambda: fs.call_s3("head_bucket", Bucket=bucket))
        elif not retried(os.fspath(loc), lambda: fs.exists(bucket)):
            raise FileNotFoundError(bucket)
    except FileNotFoundError:
        raise StorageError(f"{loc}: bucket {bucket!r} does not exist (create it first)") from None
    except PermissionError as e:
        raise StorageError(
            f"{loc}: access denied ({e}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        ) from None


# -- queries ---------------------------------------------------------------------------------------------
def exists(loc: Location) -> bool:
    if not is_url(loc):
        return local_path(loc).exists()
    fs, path = filesystem(loc)
    return retried(os.fspath(loc), lambda: fs.exists(path))


def isfile(loc: Location) -> bool:
    if not is_url(loc):
        return local_path(loc).is_file()
    fs, path = filesystem(loc)
    return retried(os.fspath(loc), lambda: fs.isfile(path))


def isdir(loc: Location) -> bool:
    """A local folder, or a URL prefix with at least one object under it."""
    if not is_url(loc):
        return local_path(loc).is_dir()
    fs, path = filesystem(loc)
    return retried(os.fspath(loc), lambda: fs.isdir(path))


def listdir(loc: Location) -> list[str]:
    """Names directly under `loc`, sorted ([] when it does not exist)."""
    if not is_url(loc):
        p = local_path(loc)
        return sorted(x.name for x in p.iterdir()) if p.is_dir() else []
    fs, path = filesystem(loc)
    try:
        entries = retried(os.fspath(loc), lambda: fs.ls(path, detail=False, refresh=True))
    except FileNotFoundError:
        return []
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != path)


def find(loc: Location) -> list[str]:
    """Every file under `loc`, as paths relative to it ('/'-separated), sorted."""
    if not is_url(loc):
        root = local_path(loc)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    fs, path = filesystem(loc)
    keys = retried(os.fspath(loc), lambda: fs.find(path))
    return sorted(k[len(path) + 1 :] for k in keys if k.startswith(path + "/"))


def fingerprint(loc: Location) -> list[Any] | None:
    """What says a file changed (size and modification time / ETag); None when it cannot be read."""
    try:
        if not is_url(loc):
            st = os.stat(local_path(loc))
            return [st.st_size, st.st_mtime_ns]
        fs, path = filesystem(loc)
        info = retried(os.fspath(loc), lambda: fs.info(path))
        return [int(info.get("size") or 0), str(info.get("ETag") or info.get("LastModified") or "")]
    except OSError:
        return None


def size(loc: Location) -> int:
    if not is_url(loc):
        return local_path(loc).stat().st_size
    fs, path = filesystem(loc)
    return int(retried(os.fspath(loc), lambda: fs.size(path)))


# -- reads -----------------------------------------------------------------------------------------------
def read_bytes(loc: Location, start: int | None = None, end: int | None = None) -> bytes:
    """The object's bytes, or the range [start, end) (one ranged GET for a URL)."""
    if not is_url(loc):
        with open(local_path(loc), "rb") as f:
            if start:
                f.seek(start)
            return f.read() if end is None else f.read(end - (start or 0))
    fs, path = filesystem(loc)
    return retried(os.fspath(loc), lambda: fs.cat_file(path, start=start, end=end))


def read_ranges(loc: Location, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """Several [start, end) ranges of one object; concurrent ranged GETs for a URL."""
    if not ranges:
        return []
    if not is_url(loc):
        with open(local_path(loc), "rb") as f:
            out = []
            for a, b in ranges:
                f.seek(a)
                out.append(f.read(b - a))
            return out
    fs, path = filesystem(loc)
    spans = coalesce(ranges)
    starts, ends = [a for a, _ in spans], [b for _, b in spans]
    got = retried(os.fspath(loc), lambda: fs.cat_ranges([path] * len(spans), starts, ends, on_error="raise"))
    out = []
    for a, b in ranges:  # each range cut from the span that covers it
        j = bisect.bisect_right(starts, a) - 1
        out.append(got[j][a - starts[j] : b - starts[j]])
    return out


def coalesce(
    ranges: Sequence[tuple[int, int]], gap: int = COALESCE_GAP, most: int = COALESCE_MOST
) -> list[tuple[int, int]]:
    """Ascending [start, end) ranges -> fewer spans covering them: neighbours less than `gap` bytes apart
    share one GET, up to `most` bytes a span. An object store charges a round trip and a request's CPU per
    GET, and a megabyte more in one response costs less than either (the rule obstore and Arrow follow)."""
    spans: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if spans and a - spans[-1][1] < gap and max(b, spans[-1][1]) - spans[-1][0] <= most:
            spans[-1] = (spans[-1][0], max(b, spans[-1][1]))
        else:
            spans.append((a, b))
    return spans


def read_many(items: Sequence[tuple[Location, int, int]]) -> list[bytes | OSError]:
    """Byte ranges [start, end) of several objects in one call: concurrent ranged GETs on the client's own
    event loop for URLs (one caller thread: the async client is not shared between threads). An item that
    fails is retried alone; one that still fails is returned as its error, naming its URL, so the caller
    reports the sample it belongs to, not its batch."""
    if not any(is_url(loc) for loc, _, _ in items):
        return [read_bytes(loc, a, b) for loc, a, b in items]
    got = _read_many_fast(items)
    if got is None:
        fs, _ = filesystem(os.fspath(items[0][0]))
        paths = [filesystem(loc)[1] for loc, _, _ in items]
        starts, ends = [a for _, a, _ in items], [b for _, _, b in items]
        got = fs.cat_ranges(paths, starts, ends, on_error="return")
    out: list[bytes | OSError] = []
    for (loc, a, b), r in zip(items, got):
        if isinstance(r, BaseException):
            try:
                r = read_bytes(loc, a, b)
            except OSError as e:
                r = (
                    type(e)(f"{os.fspath(loc)}: {e}")
                    if isinstance(e, (FileNotFoundError, PermissionError))
                    else e
                )
        out.append(r)
    return out


def _read_many_fast(items: Sequence[tuple[Location, int, int]]) -> list[bytes | BaseException] | None:
    """`read_many` through obstore: the ranges of each object in one `get_ranges` (neighbours closer than
    64 KiB merged into one GET), all objects concurrently. None when an item has no obstore client."""
    import asyncio

    import obstore

    groups: dict[str, list[int]] = {}
    for i, (loc, _, _) in enumerate(items):
        groups.setdefault(os.fspath(loc), []).append(i)
    stores = {url: _object_store(url) if is_url(url) else None for url in groups}
    if any(s is None for s in stores.values()):
        return None

    async def one(url: str, idx: list[int]) -> list[Any]:
        starts, ends = [items[i][1] for i in idx], [items[i][2] for i in idx]
        path = url.split("://", 1)[1].split("/", 1)[1]
        try:
            got = await obstore.get_ranges_async(
                stores[url], path, starts=starts, ends=ends, coalesce=64 * 1024
            )
            stats["obstore_reads"] += len(got)
            return [bytes(b) for b in got]
        except Exception as e:  # each item is then retried alone through `read_bytes`
            return [e] * len(idx)

    async def run() -> list[list[Any]]:
        return await asyncio.gather(*(one(url, idx) for url, idx in groups.items()))

    out: list[bytes | BaseException] = [b""] * len(items)
    for idx, got in zip(groups.values(), asyncio.run(run())):
        for i, data in zip(idx, got):
            out[i] = data
    return out


def open_read(loc: Location) -> Any:
    """A binary file object to stream `loc` through (tarfile, hashing); use it as a context manager."""
    if not is_url(loc):
        return open(local_path(loc), "rb")
    fs, path = filesystem(loc)
    return retried(os.fspath(loc), lambda: fs.open(path, "rb", block_size=8 << 20))


def read_text(loc: Location) -> str:
    return read_bytes(loc).decode()


def read_json(loc: Location) -> Any:
    return json.loads(read_bytes(loc))


# -- writes ----------------------------------------------------------------------------------------------
def makedirs(loc: Location) -> None:
    """A local folder (with parents); nothing for an object store (prefixes need no creation)."""
    if not is_url(loc):
        local_path(loc).mkdir(parents=True, exist_ok=True)


def write_bytes(loc: Location, data: bytes) -> None:
    """Atomic: the object / file appears complete or not at all (temp file + rename locally, one PUT remotely)."""
    if is_url(loc):
        fs, path = filesystem(loc)
        retried(os.fspath(loc), lambda: fs.pipe_file(path, data))
        return
    path = local_path(loc)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        plain_mode(tmp)  # mkstemp made it 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plain_mode(path: str | os.PathLike) -> None:
    """Give a local file the mode a plain open() would: writers that go through a private temporary file
    (mkstemp, safetensors) leave 0600, unreadable to the other users of a shared disk."""
    os.chmod(path, 0o666 & ~_UMASK)


def write_text(loc: Location, text: str) -> None:
    write_bytes(loc, text.encode())


def upload(src: str | os.PathLike, loc: Location) -> None:
    """A local file (or every file of a folder, recursively) to `loc`; each object appears complete."""
    src = Path(src)
    if src.is_dir():
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            upload(f, join(loc, *f.relative_to(src).parts))
        return
    if not is_url(loc):
        dst = local_path(loc)
        if dst.resolve() != src.resolve():
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.partial")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        return
    fs, path = filesystem(loc)
    retried(os.fspath(loc), lambda: fs.put_file(str(src), path))


@contextlib.contextmanager
def staged_dir(loc: Location) -> Iterator[Path]:
    """A local folder to write a directory into: `loc` itself when local; for a URL a temporary folder,
    uploaded to `loc` when the block ends without an error (nothing is uploaded from a failed write)."""
    if not is_url(loc):
        yield local_path(loc)
        return
    with tempfile.TemporaryDirectory(prefix="tubelet-out-") as tmp:
        yield Path(tmp)
        upload(tmp, loc)


def download(loc: Location, dst: str | os.PathLike) -> Path:
    """`loc` (an object, or every object under a prefix) to the local `dst`; files appear complete."""
    dst = Path(dst)
    if not is_url(loc):
        src = local_path(loc)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        return dst
    fs, path = filesystem(loc)
    if retried(os.fspath(loc), lambda: fs.isdir(path)):
        for key in retried(os.fspath(loc), lambda: fs.find(path)):
            download(f"{os.fspath(loc).split('://')[0]}://{key}", dst / key[len(path) + 1 :])
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial")
    retried(os.fspath(loc), lambda: fs.get_file(path, str(tmp)))
    os.replace(tmp, dst)
    return dst


def remove(loc: Location, recursive: bool = False) -> None:
    """Delete a file / object (or a whole folder / prefix with `recursive`); missing is fine."""
    if not is_url(loc):
        p = local_path(loc)
        if p.is_dir() and recursive:
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        return
    fs, path = filesystem(loc)
    with contextlib.suppress(FileNotFoundError):
        retried(os.fspath(loc), lambda: fs.rm(path, recursive=recursive))
    if recursive and os.fspath(loc).startswith("s3://"):
        _remove_emptied_folders(fs, loc, path)


def _remove_emptied_folders(fs: Any, loc: Location, path: str) -> None:
    """A store with real folders (SeaweedFS's filer) keeps the folders of deleted objects, and lists them (a
    deleted checkpoint would still show) until their keys (`folder/`) are deleted, deepest first. On a store
    without folders (AWS S3) nothing is left: one listing, no delete."""
    try:
        left = retried(os.fspath(loc), lambda: [folder for folder, _, _ in fs.walk(path)])
    except FileNotFoundError:
        return
    for folder in sorted(left, key=lambda f: f.count("/"), reverse=True):
        bucket, _, key = folder.partition("/")
        if key:
            retried(
                os.fspath(loc), lambda b=bucket, k=key: fs.call_s3("delete_object", Bucket=b, Key=f"{k}/")
            )


def remove_many(locs: Iterable[Location]) -> None:
    for loc in locs:
        remove(loc)


def cache_root() -> Path:
    """Local cache of things downloaded from URLs and staged runs (`$TUBELET_CACHE`, default
    `$XDG_CACHE_HOME/tubelet`, `~/.cache/tubelet`)."""
    if os.environ.get("TUBELET_CACHE"):
        return Path(os.environ["TUBELET_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tubelet"


def local_copy(loc: Location, kind: str = "files") -> Path:
    """A local path for `loc`: itself when local; for a URL a copy under `cache_root()/kind/`, downloaded
    once per version of its content (into a temporary folder, renamed when complete: an interrupted download
    is never used). The version comes from one listing (sizes and ETags): a model written again at the same
    URL (a re-run into the same run directory) is downloaded again, never served from the old copy."""
    if not is_url(loc):
        return local_path(loc)
    text = os.fspath(loc).rstrip("/")
    dst = cache_root() / kind / text.replace("://", "/") / _content_version(text)
    if dst.exists():
        _used(dst)
        return dst
    tmp = Path(tempfile.mkdtemp(dir=_mkdir(dst.parent), prefix=f".{dst.name}."))
    try:
        download(text, tmp / "x")
        os.replace(tmp / "x", dst)
    except FileExistsError:  # another process finished first: theirs is as good
        pass
    except OSError as e:
        if not dst.exists():
            raise StorageError(f"{text}: could not download ({e})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _used(dst)
    return dst


def _used(copy: Path) -> None:
    """Mark `copy` as just used and prune the URL's older copies (a directory rewritten at the same URL, a
    server's model replaced in place: every content gets its own copy)."""
    with contextlib.suppress(OSError):
        os.utime(copy)
    prune_copies(copy, order=lambda p: p.stat().st_mtime)


CACHE_KEEP_ENV = "TUBELET_MODEL_CACHE_KEEP"


def prune_copies(used: Path, order: Callable[[Path], float]) -> None:
    """Keep the newest `$TUBELET_MODEL_CACHE_KEEP` (default 3) of the cached copies beside `used` (the versions
    of one registered model, the contents of one URL; newest by `order`), and `used` itself. An older one asked
    for again is downloaded again. A copy is renamed away before it is deleted, so another process sees it
    whole or not at all; one being downloaded (a temporary folder inside) is left alone, as is one another
    process pruned first."""
    raw = os.environ.get(CACHE_KEEP_ENV, "3")
    try:
        keep = max(1, int(raw))
    except ValueError:
        raise ValueError(f"{CACHE_KEEP_ENV}={raw!r}: give the number of copies to keep (default 3)") from None
    try:
        entries = list(used.parent.iterdir())
    except OSError:
        return
    doomed = [p for p in entries if p.name.startswith(".pruned-")]  # a prune that was killed midway
    versions = []
    for p in entries:
        if not p.name.startswith(".") and p.is_dir():
            with contextlib.suppress(OSError, ValueError):  # gone meanwhile, or not a version
                versions.append((order(p), p))
    for _, old in sorted(versions)[:-keep]:
        if old == used:
            continue
        try:
            if any(c.name.startswith(".") for c in old.iterdir()):
                continue
            gone = old.with_name(f".pruned-{old.name}-{os.getpid()}")
            old.rename(gone)
        except OSError:
            continue
        doomed.append(gone)
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)


def _content_version(url: str) -> str:
    """What the object or folder at `url` holds, in 12 hex digits: each object's key, size and ETag (or
    modification time), from one listing (one metadata request for a single object)."""
    fs, path = filesystem(url)
    found = retried(url, lambda: fs.find(path, detail=True))
    if not found:
        found = {path: retried(url, lambda: fs.info(path))}
    rows = sorted(
        (
            key[len(path) :],
            info.get("size"),
            str(info.get("ETag") or info.get("LastModified") or info.get("mtime")),
        )
        for key, info in found.items()
    )
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:12]


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p

"""`python -m data_shards build`: videos + labels -> validated WebDataset shards, as Ray tasks.

Two phases, both Ray tasks, both cached so a re-run resumes:
1. validate: every input is opened and fully decoded (optionally re-encoded) by `probe.probe_video`;
   results (and re-encoded bytes) land in `OUT/.work/` keyed by (input, options).
2. write: accepted samples are assigned to shards deterministically (per split, sorted by key) and each
   shard is written to a temporary name, renamed, indexed. A shard whose recorded plan and checksum
   match what is on disk is kept untouched.
The output is a pure function of the inputs and options: worker count and scheduling do not matter.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data_shards.format import (
    MANIFEST_NAME,
    REJECTS_NAME,
    UNLABELED,
    FormatError,
    Manifest,
    Sample,
    ShardInfo,
    SplitInfo,
    atomic_write_bytes,
    check_split,
    parse_shard_name,
    sample_key,
    sha256_file,
    shard_name,
)
from data_shards.probe import RejectError, TranscodeOptions, probe_video
from data_shards.shardio import write_shard

log = logging.getLogger("data_shards.build")

VIDEO_SUFFIXES = frozenset(
    {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts", ".3gp"}
)
WORK_DIR = ".work"


@dataclass
class InputItem:
    """One row of the input: `where` says where it came from (file:line) for rejects."""

    id: str
    path: str
    label: str | None
    split: str | None
    where: str


@dataclass
class BuildOptions:
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    shard_samples: int = 256
    shard_bytes: int | None = None
    classes: list[str] | None = None
    transcode: TranscodeOptions = field(default_factory=TranscodeOptions)

    def __post_init__(self) -> None:
        if not (
            0 <= self.val_fraction < 1
            and 0 <= self.test_fraction < 1
            and self.val_fraction + self.test_fraction < 1
        ):
            raise ValueError("--val-fraction and --test-fraction must be in [0, 1) and sum to less than 1")
        if self.shard_samples < 1:
            raise ValueError(f"--shard-samples must be >= 1, got {self.shard_samples}")
        if self.shard_bytes is not None and self.shard_bytes < 1:
            raise ValueError(f"--shard-bytes must be >= 1, got {self.shard_bytes}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BuildResult:
    out: Path
    manifest: Manifest
    accepted: int
    rejected: int
    kept_shards: int
    written_shards: int
    seconds: float


# --------------------------------------------------------------------------------------------- inputs


def _reject(item_where: str, path: str, reason: str, id_: str | None = None) -> dict[str, Any]:
    return {"path": path, "id": id_, "where": item_where, "reason": reason}


def read_inputs(source: str | os.PathLike) -> tuple[list[InputItem], list[dict[str, Any]], bool]:
    """Parse a CSV/JSONL manifest or a (class-)folder; returns (items, early rejects, labelled?).

    Relative paths resolve against the manifest's folder. Ids are those relative paths (posix),
    so they are stable when the data set is moved.
    """
    source = Path(source)
    if source.is_dir():
        return _read_folder(source)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such manifest or folder")
    rows: list[tuple[str, dict[str, Any]]] = []
    suffix = source.suffix.lower()
    if suffix == ".csv":
        with open(source, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            if "path" not in columns:
                raise FormatError(f"{source}: the CSV header must have a 'path' column (got {columns})")
            labelled = "label" in columns
            for n, row in enumerate(reader, start=2):
                rows.append(
                    (f"{source.name}:{n}", {k.strip(): (v or "").strip() for k, v in row.items() if k})
                )
        early: list[dict[str, Any]] = []
    elif suffix in (".jsonl", ".ndjson"):
        early = []
        labelled = False
        with open(source, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{source.name}:{n}"
                try:
                    obj = json.loads(line)
                    if not isinstance(obj, dict) or not isinstance(obj.get("path"), str):
                        raise ValueError("expected an object with a string 'path'")
                except ValueError as e:
                    early.append(_reject(where, "", f"invalid JSONL line: {e}"))
                    continue
                labelled |= obj.get("label") is not None
                rows.append((where, {k: "" if v is None else str(v) for k, v in obj.items()}))
    else:
        raise FormatError(f"{source}: manifest must be .csv or .jsonl (or pass a folder)")

    items = []
    for where, row in rows:
        rel = row["path"]
        if not rel:
            early.append(_reject(where, "", "empty path"))
            continue
        p = Path(rel)
        path = p if p.is_absolute() else source.parent / p
        label = row.get("label") or None
        items.append(
            InputItem(
                id=Path(rel).as_posix(),
                path=str(path),
                label=label,
                split=row.get("split") or None,
                where=where,
            )
        )
    return items, early, labelled


def _read_folder(root: Path) -> tuple[list[InputItem], list[dict[str, Any]], bool]:
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES and WORK_DIR not in p.parts
    )
    class_layout = any(p.relative_to(root).parts[:-1] for p in files)
    items, early = [], []
    for p in files:
        rel = p.relative_to(root).as_posix()
        parts = p.relative_to(root).parts
        if class_layout and len(parts) == 1:
            early.append(_reject(rel, str(p), "missing label: file is not inside a class folder", rel))
            continue
        items.append(
            InputItem(id=rel, path=str(p), label=parts[0] if class_layout else None, split=None, where=rel)
        )
    return items, early, class_layout


def _class_order(labels: Iterable[str]) -> list[str]:
    names = set(labels)
    if names and all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def hash_split(video_id: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split from the id alone, so adding videos never moves existing ones."""
    u = int(hashlib.sha256(video_id.encode("utf-8")).hexdigest()[:12], 16) / float(1 << 48)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


@dataclass
class Planned:
    item: InputItem
    key: str
    label: int
    split: str


def plan_inputs(
    items: list[InputItem], labelled: bool, opts: BuildOptions
) -> tuple[list[Planned], list[dict[str, Any]], list[str] | None]:
    """Labels, splits, keys and duplicate checks: everything decidable without decoding."""
    rejects: list[dict[str, Any]] = []
    classes = (
        list(opts.classes)
        if opts.classes
        else (_class_order(i.label for i in items if i.label) if labelled else None)
    )
    index = {c: i for i, c in enumerate(classes or [])}
    seen: dict[str, str] = {}
    planned = []
    for it in items:
        if it.id in seen:
            rejects.append(_reject(it.where, it.path, f"duplicate id (first at {seen[it.id]})", it.id))
            continue
        seen[it.id] = it.where
        if labelled and not it.label:
            rejects.append(_reject(it.where, it.path, "missing label", it.id))
            continue
        if labelled and it.label not in index:
            rejects.append(
                _reject(it.where, it.path, f"unknown label {it.label!r} (not in --classes)", it.id)
            )
            continue
        try:
            split = (
                check_split(it.split)
                if it.split
                else hash_split(it.id, opts.val_fraction, opts.test_fraction)
            )
        except FormatError as e:
            rejects.append(_reject(it.where, it.path, str(e), it.id))
            continue
        label = index[it.label] if labelled and it.label else UNLABELED
        planned.append(Planned(item=it, key=sample_key(it.id), label=label, split=split))
    keys = Counter(p.key for p in planned)
    if any(c > 1 for c in keys.values()):  # 96-bit hash collision: astronomically unlikely, but never silent
        clash = [k for k, c in keys.items() if c > 1]
        raise RuntimeError(f"sample key collision for {clash}; rename one of the inputs")
    return planned, rejects, classes


# ------------------------------------------------------------------------------------------ phase 1


def _options_digest(opts: BuildOptions) -> str:
    return hashlib.sha256(json.dumps(opts.transcode.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def _fingerprint(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def validate_items(
    batch: list[dict[str, Any]], transcode: dict[str, Any], work: str, digest: str
) -> list[dict[str, Any]]:
    """Ray task body: probe (and re-encode) each input; cache result + bytes under `work`."""
    opts = TranscodeOptions(**transcode)
    out = []
    for job in batch:
        cache = Path(work) / f"{job['key']}.json"
        try:
            fp = _fingerprint(job["path"])
        except OSError:
            fp = None
        if cache.is_file():
            cached = json.loads(cache.read_text())
            if cached.get("digest") == digest and cached.get("fingerprint") == fp:
                out.append(cached)
                continue
        result: dict[str, Any] = {"key": job["key"], "digest": digest, "fingerprint": fp}
        try:
            probed = probe_video(job["path"], opts, workdir=work)
            result |= {"ok": True, "ext": probed.ext, "meta": probed.meta}
            if opts.codec != "copy":
                atomic_write_bytes(Path(work) / f"{job['key']}.{probed.ext}", probed.data)
        except RejectError as e:
            result |= {"ok": False, "reason": str(e)}
        except Exception as e:  # a bug or an FFmpeg crash path we did not foresee: reject, name it, go on
            result |= {"ok": False, "reason": f"error: {type(e).__name__}: {e}"}
        atomic_write_bytes(cache, json.dumps(result).encode())
        out.append(result)
    return out


# ------------------------------------------------------------------------------------------ phase 2


def _video_bytes(entry: dict[str, Any], work: str, copy: bool) -> bytes:
    src = entry["path"] if copy else str(Path(work) / f"{entry['key']}.{entry['ext']}")
    data = Path(src).read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["meta"]["sha256"]:
        raise RuntimeError(f"{entry['path']}: changed since it was validated; re-run the build")
    return data


def write_shard_task(
    out: str, name: str, entries: list[dict[str, Any]], work: str, copy: bool, plan: str
) -> dict[str, Any]:
    """Ray task body: write one shard and record its plan digest for resume."""
    samples = (
        Sample(
            key=e["key"],
            video=_video_bytes(e, work, copy),
            video_ext=e["ext"],
            label=e["label"],
            meta=e["meta"],
        )
        for e in entries
    )
    info = write_shard(Path(out) / name, samples)
    record = {"plan": plan, "info": asdict(info)}
    atomic_write_bytes(Path(work) / "shards" / f"{name}.json", json.dumps(record).encode())
    return record["info"]


def assign_shards(accepted: list[dict[str, Any]], opts: BuildOptions) -> dict[str, list[dict[str, Any]]]:
    """Deterministic shard plan: per split, samples sorted by key, cut by count and/or bytes."""
    by_split: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in accepted:
        by_split[e["split"]].append(e)
    plan: dict[str, list[dict[str, Any]]] = {}
    for split in sorted(by_split):
        entries = sorted(by_split[split], key=lambda e: e["key"])
        number, current, size = 0, [], 0
        for e in entries:
            nbytes = e["meta"]["bytes"]
            full = len(current) >= opts.shard_samples or (
                opts.shard_bytes and current and size + nbytes > opts.shard_bytes
            )
            if full:
                plan[shard_name(split, number)] = current
                number, current, size = number + 1, [], 0
            current.append(e)
            size += nbytes
        if current:
            plan[shard_name(split, number)] = current
    return plan


def _plan_digest(entries: list[dict[str, Any]]) -> str:
    sig = [(e["key"], e["ext"], e["label"], e["meta"]) for e in entries]
    return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()


def _shard_is_current(out: Path, work: Path, name: str, plan: str) -> dict[str, Any] | None:
    record_path = work / "shards" / f"{name}.json"
    tar = out / name
    if not (record_path.is_file() and tar.is_file()):
        return None
    record = json.loads(record_path.read_text())
    info = record["info"]
    if record.get("plan") != plan or not (out / info["index"]).is_file():
        return None
    if tar.stat().st_size != info["bytes"] or sha256_file(tar) != info["sha256"]:
        return None
    return info


# ---------------------------------------------------------------------------------------------- ray


def _init_ray(address: str | None, workers: int | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        # A remote cluster needs our code: ship the package; it needs PyAV/webdataset/numpy installed.
        try:
            ray.init(
                address=address,
                runtime_env={"py_modules": [str(Path(__file__).parent)]},
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
        except (ConnectionError, ray.exceptions.AuthenticationError) as e:
            raise ConnectionError(
                f"cannot join the Ray cluster at {address}: {e}\n"
                "A cluster started with `ray start --head` uses token auth: run this command with "
                "RAY_AUTH_MODE=token and the head's token (~/.ray/auth_token on the head, copied here, "
                "or RAY_AUTH_TOKEN=...)."
            ) from None
    else:
        ray.init(
            num_cpus=workers or os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )


def _run_tasks(
    fn: Callable[..., Any], calls: list[tuple], desc: str, unit_counts: list[int], quiet: bool
) -> list[Any]:
    """Submit `fn(*args)` as Ray tasks (retried if a worker dies); ordered results; tqdm with units/s."""
    import ray
    from tqdm import tqdm

    remote = ray.remote(max_retries=3, num_cpus=1)(fn)
    refs = [remote.remote(*args) for args in calls]
    pos = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    with tqdm(
        total=sum(unit_counts), desc=desc, unit="clip", disable=quiet, file=sys.stderr, dynamic_ncols=True
    ) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                i = pos[ref]
                results[i] = ray.get(ref)
                bar.update(unit_counts[i])
    return results


# -------------------------------------------------------------------------------------------- build


def build(
    source: str | os.PathLike,
    out: str | os.PathLike,
    opts: BuildOptions,
    *,
    ray_address: str | None = None,
    workers: int | None = None,
    batch: int = 4,
    keep_work: bool = False,
    quiet: bool = False,
) -> BuildResult:
    """Run the whole job; returns what it did. Raises only for bad options or when nothing is accepted."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / WORK_DIR
    (work / "shards").mkdir(parents=True, exist_ok=True)

    items, rejects, labelled = read_inputs(source)
    planned, plan_rejects, classes = plan_inputs(items, labelled, opts)
    rejects += plan_rejects
    copy = opts.transcode.codec == "copy"
    digest = _options_digest(opts)

    _init_ray(ray_address, workers)
    jobs = [{"key": p.key, "path": p.item.path} for p in planned]
    chunks = [jobs[i : i + batch] for i in range(0, len(jobs), batch)]
    validated = _run_tasks(
        validate_items,
        [(c, opts.transcode.to_json(), str(work), digest) for c in chunks],
        "validate",
        [len(c) for c in chunks],
        quiet,
    )
    by_key = {r["key"]: r for chunk in validated for r in chunk}
    accepted = []
    for p in planned:
        r = by_key[p.key]
        if r["ok"]:
            meta = {"id": p.item.id, "source": p.item.id, "label": p.label, "split": p.split, **r["meta"]}
            if classes and p.label >= 0:
                meta["label_name"] = classes[p.label]
            accepted.append(
                {
                    "key": p.key,
                    "path": p.item.path,
                    "ext": r["ext"],
                    "label": p.label,
                    "split": p.split,
                    "meta": meta,
                }
            )
        else:
            rejects.append(_reject(p.item.where, p.item.path, r["reason"], p.item.id))

    plan = assign_shards(accepted, opts)
    kept: dict[str, dict[str, Any]] = {}
    todo = []
    for name, entries in plan.items():
        digest_ = _plan_digest(entries)
        current = _shard_is_current(out, work, name, digest_)
        if current:
            kept[name] = current
        else:
            todo.append((name, entries, digest_))
    written = _run_tasks(
        write_shard_task,
        [(str(out), name, entries, str(work), copy, d) for name, entries, d in todo],
        "write",
        [len(e) for _, e, _ in todo],
        quiet,
    )
    infos = {**kept, **{name: info for (name, _, _), info in zip(todo, written)}}
    _remove_stale(out, set(plan))

    shards = [ShardInfo(**infos[name]) for name in sorted(plan, key=lambda n: parse_shard_name(n))]
    splits: dict[str, SplitInfo] = {}
    for s in shards:
        sp = splits.setdefault(s.split, SplitInfo())
        sp.samples += s.samples
        sp.shards += 1
        sp.bytes += s.bytes
    for e in accepted:
        if classes and e["label"] >= 0:
            per = splits[e["split"]].per_class
            per[classes[e["label"]]] = per.get(classes[e["label"]], 0) + 1
    manifest = Manifest(
        classes=classes,
        shards=shards,
        splits=dict(sorted(splits.items())),
        options={k: v for k, v in opts.to_json().items()},
        rejects=len(rejects),
    )
    rejects.sort(key=lambda r: (r["where"], r["reason"]))
    atomic_write_bytes(
        out / REJECTS_NAME, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects).encode()
    )
    if not accepted:
        raise RuntimeError(f"no input was accepted ({len(rejects)} rejected; see {out / REJECTS_NAME})")
    manifest.save(out)
    if not keep_work:
        for f in work.iterdir():
            if (
                f.is_file() and f.suffix != ".json"
            ):  # re-encoded bytes; the small .json results stay for resume
                f.unlink()
    return BuildResult(
        out, manifest, len(accepted), len(rejects), len(kept), len(todo), time.perf_counter() - t0
    )


def _remove_stale(out: Path, planned: set[str]) -> None:
    """Shards from an earlier run with other inputs/options would otherwise look like part of the set."""
    for f in out.iterdir():
        stem = f.name[: -len(".idx")] + ".tar" if f.name.endswith(".idx") else f.name
        try:
            parse_shard_name(stem)
        except FormatError:
            continue
        if stem not in planned:
            f.unlink()
    for f in out.glob(".*.partial"):
        f.unlink()
    for f in (out / WORK_DIR / "shards").glob("*.json"):
        if f.name[: -len(".json")] not in planned:
            f.unlink()


def summary(result: BuildResult) -> str:
    m = result.manifest
    lines = [
        f"shards in {result.out}: {result.accepted} accepted, {result.rejected} rejected, "
        f"{result.written_shards} shards written, {result.kept_shards} kept, {result.seconds:.1f}s"
    ]
    for name, sp in m.splits.items():
        lines.append(f"  {name:<6} {sp.samples:>7} samples {sp.shards:>4} shards {sp.bytes / 1e6:>9.1f} MB")
    if m.classes:
        lines.append(
            f"  classes ({len(m.classes)}): {', '.join(m.classes[:12])}{' ...' if len(m.classes) > 12 else ''}"
        )
    if result.rejected:
        lines.append(f"  rejects: {result.out / REJECTS_NAME}")
    return "\n".join(lines)


def clean_work(out: str | os.PathLike) -> None:
    shutil.rmtree(Path(out) / WORK_DIR, ignore_errors=True)


__all__ = [
    "MANIFEST_NAME",
    "BuildOptions",
    "BuildResult",
    "InputItem",
    "build",
    "hash_split",
    "read_inputs",
    "summary",
]

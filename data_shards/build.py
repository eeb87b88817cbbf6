"""`python -m data_shards build`: videos + labels -> validated WebDataset shards, as Ray tasks.

The job, stage by stage (each its own module):
1. `inputs`: read the source (manifest, folder, Kinetics/SSv2/UCF101/HMDB51 annotations) into
   `InputItem`s; unreadable rows are rejected with their file:line.
2. `plan`: labels, splits, keys, duplicate ids -- everything decidable without decoding.
3. `tasks.validate_batch` on Ray (`execute`): every input kept, remuxed, transcoded or trimmed
   (`ingest`) and the stored bytes fully decoded, cached in `OUT/.work/` so a re-run resumes.
4. `plan.assign_shards`, then `tasks.write_shard_task` on Ray: per split, sorted by key, cut by count/bytes;
   a shard whose recorded plan and checksum match what is on disk is kept untouched.
5. here: manifest, rejects, summary. The output is a pure function of the inputs and options.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from data_shards import storage
from data_shards.execute import check_workers, init_ray, run_tasks
from data_shards.format import (
    MANIFEST_NAME,
    REJECTS_NAME,
    SEGMENT_SLACK_S,
    Manifest,
    ShardInfo,
    SplitInfo,
    atomic_write_bytes,
    parse_shard_name,
    sha256_file,
    shard_of,
)
from data_shards.ingest import ACTIONS, IngestOptions
from data_shards.inputs import FORMATS, WORK_DIR, InputItem, Reject, SourceOptions, read_inputs
from data_shards.plan import (
    Plan,
    PlannedSample,
    ShardEntry,
    assign_shards,
    hash_split,
    plan_digest,
    plan_inputs,
)
from data_shards.shardio import add_listing
from data_shards.storage import Location
from data_shards.tasks import Validated, ValidateJob, validate_batch, write_shard_task


@dataclass
class BuildOptions:
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    shard_samples: int = 256
    shard_bytes: int | None = None
    classes: list[str] | None = None
    format: str = "auto"  # inputs.FORMATS
    source: SourceOptions = field(default_factory=SourceOptions)
    ingest: IngestOptions = field(default_factory=IngestOptions)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {FORMATS}, got {self.format!r}")
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
    out: Location
    manifest: Manifest
    accepted: int
    rejected: int
    kept_shards: int
    written_shards: int
    seconds: float
    rejects: list[Reject] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _options_digest(opts: BuildOptions) -> str:
    return hashlib.sha256(json.dumps(opts.ingest.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def _validate(
    plan: Plan, opts: BuildOptions, work: Location, batch: int, quiet: bool, in_process: bool
) -> tuple[list[ShardEntry], list[Reject]]:
    """Run validation on Ray (or here); accepted samples become shard entries (with their metadata)."""
    jobs = [ValidateJob(p.key, p.item.path, p.item.start, p.item.end) for p in plan.samples]
    chunks = [jobs[i : i + batch] for i in range(0, len(jobs), batch)]
    digest = _options_digest(opts)
    results: list[list[Validated]] = run_tasks(
        validate_batch,
        [(c, opts.ingest, os.fspath(work), digest) for c in chunks],
        "validate",
        [len(c) for c in chunks],
        quiet,
        in_process,
    )
    by_key = {r.key: r for chunk in results for r in chunk}
    accepted, rejects = [], []
    for p in plan.samples:
        r = by_key[p.key]
        if not r.ok:
            reason, kind = r.reason or "rejected", r.kind or "error"
            rejects.append(Reject(p.item.where, p.item.path, reason, p.item.id, kind, p.split))
            continue
        meta = {"id": p.item.id, "source": p.item.id, "label": p.label, "split": p.split, **(r.meta or {})}
        if plan.classes and p.label >= 0:
            meta["label_name"] = plan.classes[p.label]
        outside = _outside(p, meta.get("duration"))
        if outside:
            rejects.append(Reject(outside[0], p.item.path, outside[1], p.item.id, "bad-segment", p.split))
            continue
        meta.update(p.label_meta())
        accepted.append(ShardEntry(p.key, p.item.path, r.ext or "", p.label, p.split, meta))
    return accepted, rejects


def _outside(p: PlannedSample, duration: float | None) -> tuple[str, str] | None:
    """(where, reason) of the first segment outside the validated video, else None."""
    if duration is None or not p.item.segments:
        return None
    for s in p.item.segments:
        if s.start >= duration or s.end > duration + SEGMENT_SLACK_S:
            return s.where, f"segment {s.start:g}-{s.end:g}s is outside the video ({duration:g}s long)"
    return None


def _shard_is_current(out: Location, work: Location, name: str, plan: str) -> ShardInfo | None:
    record_path = storage.join(work, "shards", f"{name}.json")
    tar = storage.join(out, name)
    if not (storage.isfile(record_path) and storage.isfile(tar)):
        return None
    record = storage.read_json(record_path)
    info = ShardInfo(**record["info"])
    written = [info.index, *([info.listing] if info.listing else [])]
    if record.get("plan") != plan or not all(storage.isfile(storage.join(out, f)) for f in written):
        return None
    if storage.size(tar) != info.bytes or sha256_file(tar) != info.sha256:
        return None
    if not info.listing:  # built before listings existed: the shard stays, its listing is added
        info = replace(info, listing=add_listing(tar))
        atomic_write_bytes(record_path, json.dumps({**record, "info": asdict(info)}).encode())
    return info


def _write(
    shard_plan: dict[str, list[ShardEntry]], out: Location, work: Location, quiet: bool, in_process: bool
) -> tuple[list[ShardInfo], int, int]:
    """Write the shards that are not already on disk as planned; (all infos in order, kept, written)."""
    kept: dict[str, ShardInfo] = {}
    todo = []
    for name, entries in shard_plan.items():
        digest = plan_digest(entries)
        current = _shard_is_current(out, work, name, digest)
        if current:
            kept[name] = current
        else:
            todo.append((name, entries, digest))
    written = run_tasks(
        write_shard_task,
        [(os.fspath(out), name, entries, os.fspath(work), d) for name, entries, d in todo],
        "write",
        [len(e) for _, e, _ in todo],
        quiet,
        in_process,
    )
    infos = {**kept, **{name: info for (name, _, _), info in zip(todo, written)}}
    ordered = [infos[name] for name in sorted(shard_plan, key=parse_shard_name)]
    return ordered, len(kept), len(todo)


def _classes_of(e: ShardEntry) -> list[int]:
    """The classes a sample counts for in `per_class`: its label set, its segments' classes, or its label."""
    if "segments" in e.meta:
        return sorted({c for _, _, c in e.meta["segments"]})
    return list(e.meta.get("labels", [e.label] if e.label >= 0 else []))


def _manifest(
    shards: list[ShardInfo], accepted: list[ShardEntry], plan: Plan, opts: BuildOptions, rejects: int
) -> Manifest:
    classes = plan.classes
    splits: dict[str, SplitInfo] = {}
    for s in shards:
        sp = splits.setdefault(s.split, SplitInfo())
        sp.samples += s.samples
        sp.shards += 1
        sp.bytes += s.bytes
    for e in accepted:
        sp = splits[e.split]
        sp.ingest[e.meta["ingest"]] = sp.ingest.get(e.meta["ingest"], 0) + 1
        sp.audio += 1 if e.meta.get("audio") else 0
        for c in _classes_of(e):
            sp.per_class[classes[c]] = sp.per_class.get(classes[c], 0) + 1
    for sp in splits.values():
        sp.ingest = {a: sp.ingest[a] for a in ACTIONS if a in sp.ingest}
    return Manifest(
        classes=classes,
        shards=shards,
        splits=dict(sorted(splits.items())),
        options=opts.to_json(),
        rejects=rejects,
        labels=plan.kind,
    )


SOURCE_RECORD = "source.json"  # in OUT/.work: which source the set in OUT was built from


def _claim(out: Location, work: Location, source: str | os.PathLike, replace_other: bool) -> None:
    """Refuse to build into a folder whose finished set came from another source: a re-run of the same
    command resumes (and picks up changed videos), but another labels file pointed at an existing set
    would silently replace it. The source is recorded in `.work/` (not in the manifest, which stays
    byte-identical wherever the source lives)."""
    if not storage.is_url(out) and storage.local_path(out).exists() and not storage.local_path(out).is_dir():
        raise ValueError(f"--out {out}: a file, not a folder")
    here = os.fspath(source) if storage.is_url(source) else str(storage.local_path(source).resolve())
    record = storage.join(work, SOURCE_RECORD)
    if storage.isfile(storage.join(out, MANIFEST_NAME)) and not replace_other:
        before = storage.read_json(record).get("source") if storage.isfile(record) else None
        if before is not None and before != here:
            raise ValueError(
                f"{out} holds a shard set built from {before}; building {here} there would replace it: give "
                "another --out, or --replace to rebuild it from this source"
            )
    storage.makedirs(work)
    storage.write_text(record, json.dumps({"source": here}) + "\n")


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
    replace_other: bool = False,
) -> BuildResult:
    """Run the whole job; returns what it did. Raises only for bad options or when nothing is accepted.
    `workers`: local Ray CPUs (all cores by default); 0 runs the tasks in this process, without Ray.
    `replace_other`: rebuild an `out` that holds a set built from another source (refused otherwise)."""
    t0 = time.perf_counter()
    check_workers(ray_address, workers)
    out = storage.join(out)
    storage.check_access(out)
    # the source is read before anything is written: a source that cannot be read leaves no folder behind
    inputs = read_inputs(source, opts.format, opts.source)
    plan = plan_inputs(inputs, opts.classes, opts.val_fraction, opts.test_fraction)
    work = storage.join(out, WORK_DIR)
    _claim(out, work, source, replace_other)
    storage.makedirs(storage.join(work, "shards"))
    rejects = inputs.rejects + plan.rejects
    init_ray(ray_address, workers)
    in_process = workers == 0
    accepted, failed = _validate(plan, opts, work, batch, quiet, in_process)
    rejects += failed

    shard_plan = assign_shards(accepted, opts.shard_samples, opts.shard_bytes)
    shards, kept, written = _write(shard_plan, out, work, quiet, in_process)
    _remove_stale(out, set(shard_plan))
    manifest = _manifest(shards, accepted, plan, opts, len(rejects))
    rejects.sort(key=lambda r: (r.where, r.reason))
    lines = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in rejects)
    atomic_write_bytes(storage.join(out, REJECTS_NAME), lines.encode())
    if not accepted:
        where = storage.join(out, REJECTS_NAME)
        raise RuntimeError(f"no input was accepted ({len(rejects)} rejected; see {where})")
    manifest.save(out)
    if not keep_work:  # re-encoded bytes go; the small .json results stay for resume
        storage.remove_many(
            storage.join(work, f) for f in storage.listdir(work) if f != "shards" and not f.endswith(".json")
        )
    seconds = time.perf_counter() - t0
    notes = inputs.notes + plan.notes + _audio_notes(accepted, opts)
    return BuildResult(out, manifest, len(accepted), len(rejects), kept, written, seconds, rejects, notes)


def _audio_notes(accepted: list[ShardEntry], opts: BuildOptions) -> list[str]:
    """`--audio optional`: how many videos went in without sound, and the commonest reasons."""
    if opts.ingest.audio != "optional":
        return []
    missing = Counter(e.meta["audio_missing"].split(":")[0] for e in accepted if e.meta.get("audio_missing"))
    if not missing:
        return [f"audio: all {len(accepted)} accepted videos have sound"]
    why = ", ".join(f"{k} {n}" for k, n in sorted(missing.items(), key=lambda kn: (-kn[1], kn[0])))
    return [f"audio: {sum(missing.values())} of {len(accepted)} videos stored without sound ({why})"]


def _remove_stale(out: Location, planned: set[str]) -> None:
    """Shards from an earlier run with other inputs/options would otherwise look like part of the set."""
    for f in storage.listdir(out):
        stem = shard_of(f)
        if stem is None:
            if f.startswith(".") and f.endswith(".partial"):
                storage.remove(storage.join(out, f))
            continue
        if stem not in planned:
            storage.remove(storage.join(out, f))
    records = storage.join(out, WORK_DIR, "shards")
    for f in storage.listdir(records):
        if f.endswith(".json") and f[: -len(".json")] not in planned:
            storage.remove(storage.join(records, f))


def _split_table(result: BuildResult) -> list[str]:
    """Per split: samples, shards, MB, what ingest did, and the rejects by kind."""
    m = result.manifest
    rejected: dict[str, Counter[str]] = {}
    for r in result.rejects:
        rejected.setdefault(r.split or "?", Counter())[r.kind] += 1
    names = sorted(set(m.splits) | set(rejected), key=lambda n: (n == "?", n))
    w = max([len("split"), *map(len, names)])  # the first column as wide as the longest split name
    head = f"  {'split':<{w}} {'samples':>7} {'shards':>6} {'MB':>8} " + " ".join(f"{a:>10}" for a in ACTIONS)
    lines = [head + "   rejected"]
    for name in names:
        sp = m.splits.get(name)
        bad = rejected.get(name, Counter())
        why = ", ".join(f"{k} {c}" for k, c in sorted(bad.items(), key=lambda kc: (-kc[1], kc[0])))
        cols = (
            f"{sp.samples:>7} {sp.shards:>6} {sp.bytes / 1e6:>8.1f} "
            + " ".join(f"{sp.ingest.get(a, 0):>10}" for a in ACTIONS)
            if sp
            else f"{0:>7} {0:>6} {0.0:>8.1f} " + " ".join(f"{0:>10}" for _ in ACTIONS)
        )
        lines.append(f"  {name:<{w}} {cols}   {sum(bad.values())}" + (f" ({why})" if why else ""))
    return lines


def summary(result: BuildResult) -> str:
    """What the build did: totals, then per split how many were kept / remuxed / transcoded / trimmed and
    rejected (by kind; "?" = rejects whose split is unknown), classes, notes, where the rejects are."""
    m = result.manifest
    lines = [
        f"shards in {result.out}: {result.accepted} accepted, {result.rejected} rejected, "
        f"{result.written_shards} shards written, {result.kept_shards} already up to date, {result.seconds:.1f}s",
        *_split_table(result),
    ]
    if m.classes:
        more = " ..." if len(m.classes) > 12 else ""
        lines.append(f"  classes ({len(m.classes)}): {', '.join(m.classes[:12])}{more}")
    lines += [f"  note: {n}" for n in result.notes]
    if result.rejected:
        lines.append(f"  rejects: {storage.join(result.out, REJECTS_NAME)}")
    return "\n".join(lines)


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

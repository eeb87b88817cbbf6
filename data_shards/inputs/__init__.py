"""Stage 1 of a build: what to shard. A source (manifest, folder or a standard data set's annotation
files) -> `InputItem`s, plus the rows rejected before any video is opened, each with the file:line it came
from (for `rejects.jsonl`).

Formats (`--format`, `auto` detects them where unambiguous):
  csv / jsonl  `path,label[,split][,start,end]` (or `time_start,time_end`) manifests      (tables.py)
  folder       class sub-folders (labelled) or a flat folder of videos (unlabelled)        (folders.py)
  kinetics     Kinetics CSVs `label,youtube_id,time_start,time_end,split`                  (kinetics.py)
  ssv2         Something-Something v2: labels.json + train/validation/test.json, {id}.webm   (ssv2.py)
  ucf101       UCF-101/{Class}/v_*.avi + ucfTrainTestlist/ (classInd, train/testlist0N)    (actions.py)
  hmdb51       {class}/*.avi + testTrainMulti_7030_splits/{class}_test_split{N}.txt         (actions.py)
  segments     labelled time segments: a CSV `path,segment_start,segment_end,label[,split]` (one row per
               segment) or ActivityNet/THUMOS JSON {"database": {id: {"subset", "annotations"}}} (segments.py)
  charades     Charades_v1_{train,test}.csv + Charades_v1_classes.txt: several labels per video, or its
               action segments with --labels segments                                        (segments.py)

Label kinds (`Inputs.kind`): one label per row (`single`); several (`multi`: `a;b` in a CSV label column, a
JSON list in JSONL, Charades); labelled segments (`segments`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_shards import storage
from data_shards.format import FormatError

VIDEO_SUFFIXES = frozenset(
    {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts", ".3gp", ".ogv"}
)
WORK_DIR = ".work"  # the build's cache inside the output folder: never an input
FORMATS = ("auto", "csv", "jsonl", "folder", "kinetics", "ssv2", "ucf101", "hmdb51", "segments", "charades")
LABEL_SEPARATOR = ";"  # several labels in one CSV cell: "running;jumping"


@dataclass(frozen=True)
class Segment:
    """A labelled time range of a video (seconds), with the file:line it came from."""

    start: float
    end: float
    label: str
    where: str


@dataclass(frozen=True)
class InputItem:
    """One sample to make. `id` is stable across machines (relative path or data-set id, plus `#start-end`
    for a time range), so keys and hash splits do not move when the data set does; `where` (file:line)
    goes into rejects; `group` (default: the id) is what a hash split hashes, so clips of one source video
    (or one UCF101 actor group) never straddle train and val."""

    id: str
    path: str
    label: str | None
    split: str | None
    where: str
    start: float | None = None  # seconds: frames with start <= t < end are the sample
    end: float | None = None
    group: str | None = None
    labels: tuple[str, ...] | None = None  # a multi-label row's label set (`label` is its first)
    segments: tuple[Segment, ...] | None = None  # a segments row's annotations (`label` unused)


@dataclass(frozen=True)
class Reject:
    """One input that did not make it into a shard, and why (a line of `rejects.jsonl`)."""

    where: str
    path: str
    reason: str
    id: str | None = None
    kind: str = "bad-row"
    split: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "id": self.id,
            "where": self.where,
            "reason": self.reason,
            "kind": self.kind,
            "split": self.split,
        }


@dataclass
class Inputs:
    """What a source holds: items, early rejects, whether it carries labels at all (unlabelled sets make
    label -1 shards for pretraining), the data set's own class order if it has one, and notes for the
    summary (e.g. rows an official split leaves out)."""

    items: list[InputItem]
    rejects: list[Reject] = field(default_factory=list)
    labelled: bool = False
    classes: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    kind: str = "single"  # format.LABEL_KINDS


@dataclass(frozen=True)
class SourceOptions:
    """Where a data set's videos are (`--videos`, default: next to its annotation files), which
    official split to use (`--split-id`, UCF101/HMDB51: 1-3) and which labels of a data set that has both
    (`--labels`, Charades: its label sets or its segments)."""

    videos: str | None = None
    split_id: int = 1
    labels: str = "auto"  # Charades: "multi" (auto) or "segments"

    def __post_init__(self) -> None:
        if self.labels not in ("auto", "multi", "segments"):
            raise ValueError(f"--labels must be auto, multi or segments, got {self.labels!r}")
        if self.split_id not in (1, 2, 3):
            raise ValueError(
                f"--split-id must be 1, 2 or 3 (the official UCF101/HMDB51 splits), got {self.split_id}"
            )


def parse_range(start: str | None, end: str | None) -> tuple[float | None, float | None]:
    """A row's time range in seconds, or (None, None); ValueError says what is wrong with it."""
    if not start and not end:
        return None, None
    if not start or not end:
        raise ValueError(f"time range needs both start and end (got start={start!r}, end={end!r})")
    try:
        s, e = float(start), float(end)
    except ValueError:
        raise ValueError(f"time range {start!r}-{end!r} is not numeric (seconds)") from None
    if not (0 <= s < e) or e == float("inf"):
        raise ValueError(f"time range {s:g}-{e:g}s is empty or negative")
    return s, e


def split_labels(cell: str) -> tuple[str, ...]:
    """A CSV label cell as a label set: "a;b" -> ("a", "b") (blanks dropped, order kept, no repeats)."""
    return tuple(dict.fromkeys(p.strip() for p in cell.split(LABEL_SEPARATOR) if p.strip()))


def clip_id(base: str, start: float | None, end: float | None) -> str:
    """The id of a time range of `base`: `base#start-end` (seconds), so each clip is its own sample."""
    return base if start is None or end is None else f"{base}#{start:g}-{end:g}"


def read_inputs(
    source: str | os.PathLike, format: str = "auto", options: SourceOptions | None = None
) -> Inputs:
    """Read `source` in `format` (`auto`: detect it). Relative paths resolve against the manifest's folder."""
    options = options or SourceOptions()
    if storage.is_url(source) or (options.videos and storage.is_url(options.videos)):
        return _read_remote(source, format, options)
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such manifest or folder")
    if format not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {format!r}")
    try:
        return _read_local(source, format, options)
    except UnicodeDecodeError as e:  # an annotation file saved in another encoding
        raise FormatError(
            f"{source}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
        ) from None


def _read_local(source: Path, format: str, options: SourceOptions) -> Inputs:
    from data_shards.inputs import actions, folders, kinetics, segments, ssv2, tables
    from data_shards.inputs.detect import detect_format

    fmt = detect_format(source) if format == "auto" else format
    readers = {
        "csv": lambda: tables.read_csv(_file(source, fmt)),
        "jsonl": lambda: tables.read_jsonl(_file(source, fmt)),
        "folder": lambda: folders.read_folder(_folder(source, fmt)),
        "kinetics": lambda: kinetics.read_kinetics(source, options),
        "ssv2": lambda: ssv2.read_ssv2(source, options),
        "ucf101": lambda: actions.read_ucf101(source, options),
        "hmdb51": lambda: actions.read_hmdb51(source, options),
        "segments": lambda: segments.read_segments(_file(source, fmt), options),
        "charades": lambda: segments.read_charades(source, options),
    }
    _check_videos_and_split(source, fmt, options)
    inputs = readers[fmt]()
    if options.labels != "auto" and fmt != "charades" and options.labels != inputs.kind:
        raise ValueError(
            f"--labels {options.labels}: {source} is a {fmt} source with {_KIND_WORDS[inputs.kind]}; --labels "
            "chooses between Charades' label sets and its segments, other sources' labels come from their "
            "columns (a;b in the label column: several labels; segment_start,segment_end: segments)"
        )
    return inputs


_KIND_WORDS = {"single": "one label per video", "multi": "label sets", "segments": "labelled segments"}
# the formats whose annotations name videos that `--videos` locates; the others hold the videos' paths
_VIDEO_ROOT_FORMATS = ("kinetics", "ssv2", "ucf101", "hmdb51", "charades")


def _check_videos_and_split(source: Path, fmt: str, options: SourceOptions) -> None:
    """`--videos` and `--split-id` where this source has no use for them are errors: silently ignored, the
    build would read other videos or another split than the user asked for."""
    takes_videos = fmt in _VIDEO_ROOT_FORMATS or (fmt == "segments" and source.suffix.lower() == ".json")
    if options.videos and not takes_videos:
        where = (
            "the folder's own files" if fmt == "folder" else f"the paths in it (relative to {source.parent})"
        )
        raise ValueError(
            f"--videos {options.videos}: {source} is a {fmt} source, whose videos are {where}; --videos "
            "locates the videos of a data set's annotations (Kinetics, SSv2, UCF101, HMDB51, Charades, "
            "ActivityNet JSON)"
        )
    if options.split_id != 1 and fmt not in ("ucf101", "hmdb51"):
        raise ValueError(
            f"--split-id {options.split_id}: {source} is a {fmt} source; --split-id picks one of the official "
            "UCF101 / HMDB51 splits"
        )


def _file(source: Path, fmt: str) -> Path:
    if not source.is_file():
        raise FormatError(f"{source}: --format {fmt} reads a manifest file, not a folder")
    return source


def _folder(source: Path, fmt: str) -> Path:
    if not source.is_dir():
        raise FormatError(f"{source}: --format {fmt} reads a folder")
    return source


ANNOTATION_SUFFIXES = (".csv", ".jsonl", ".json", ".txt")


def _read_remote(source: str | os.PathLike, format: str, options: SourceOptions) -> Inputs:
    """A source (or `--videos`) at a URL: every reader works on a local view of the store -- annotation files
    downloaded, videos as empty stand-ins with their names -- and the items come back with URLs as paths
    (ids stay relative, so keys, splits and the manifest are those of a local build of the same files)."""
    with tempfile.TemporaryDirectory(prefix="tubelet-inputs-") as tmp:
        back: dict[str, str] = {}
        local_source: str | os.PathLike = source
        if storage.is_url(source):
            is_file = storage.isfile(source)
            root = _mirror(storage.parent(source) if is_file else source, Path(tmp) / "source", back)
            local_source = root / storage.name(source) if is_file else root
        if options.videos and storage.is_url(options.videos):
            videos = _mirror(options.videos, Path(tmp) / "videos", back)
            options = dataclasses.replace(options, videos=str(videos))
        try:
            inputs = read_inputs(local_source, format, options)
        except (ValueError, FormatError) as e:  # name the store's locations, not the local view's
            message = str(e)
            for local, url in back.items():
                message = message.replace(local, url)
            raise type(e)(message) from None
    remap = functools.partial(_to_url, back=back)
    inputs.items = [dataclasses.replace(i, path=remap(i.path), where=remap(i.where)) for i in inputs.items]
    inputs.rejects = [
        dataclasses.replace(r, path=remap(r.path), where=remap(r.where)) for r in inputs.rejects
    ]
    return inputs


def _mirror(url: str | os.PathLike, dst: Path, back: dict[str, str]) -> Path:
    """`dst` made a local view of the prefix `url` (see `_read_remote`); `back` learns dst → url."""
    keys = storage.find(url)
    if not keys:
        raise FileNotFoundError(f"{url}: no such manifest or folder (nothing under this prefix)")
    for key in keys:
        p = dst / key
        p.parent.mkdir(parents=True, exist_ok=True)
        if key.lower().endswith(ANNOTATION_SUFFIXES):
            storage.download(storage.join(url, key), p)
        else:
            p.touch()
    back[str(dst)] = os.fspath(url).rstrip("/")
    return dst


def _to_url(text: str, back: dict[str, str]) -> str:
    for local, url in back.items():
        if text == local or text.startswith(local + "/"):
            return url + text[len(local) :]
    return text

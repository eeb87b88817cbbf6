"""`python -m data_shards {synth,build,verify,loadtest}`: make, check and exercise shard sets."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from data_shards import storage


def _synth(args: argparse.Namespace) -> int:
    from data_shards.synth import SynthSpec, write_synthetic_set

    try:
        spec = SynthSpec(
            videos=args.videos,
            classes=args.classes,
            frames=args.frames,
            size=args.size,
            fps=args.fps,
            codec=args.codec,
            seed=args.seed,
            domain=args.domain,
            shuffle_labels=args.shuffle_labels,
            multi_label=args.multi_label,
            segments=args.segments,
            audio=args.audio,
            audio_delay=args.audio_delay,
        )
        csv_path = write_synthetic_set(args.out, spec)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {spec.videos} {spec.codec} clips ({spec.classes} classes, {spec.frames}x{spec.size}x{spec.size}, "
        f"domain {spec.domain}{', labels shuffled' if spec.shuffle_labels else ''}"
        f"{', several labels per clip' if spec.multi_label else ''}"
        f"{', labelled segments' if spec.segments else ''}{', with sound' if spec.audio else ''}) and {csv_path}"
    )
    return 0


def _classes(value: str | None) -> list[str] | None:
    """`--classes`: a file (one class per line) or a,b,c. A single word that looks like a file name but
    names none is an error (it would be taken as the only class, rejecting every video); so is a class
    given twice (a head with a dead output)."""
    if not value:
        return None
    p = Path(value)
    if not p.is_file() and "," not in value and ("/" in value or p.suffix in (".txt", ".csv", ".lst")):
        raise ValueError(f"--classes {value}: no such file (give a file with one class per line, or a,b,c)")
    names = [
        c.strip() for c in (p.read_text(encoding="utf-8").splitlines() if p.is_file() else value.split(","))
    ]
    names = [c for c in names if c]
    twice = sorted({c for c in names if names.count(c) > 1})
    if twice:
        raise ValueError(f"--classes {value}: {twice} given more than once")
    return names


def _build_options(args: argparse.Namespace) -> Any:
    """BuildOptions from the command line (ValueError names the bad option)."""
    from data_shards.build import BuildOptions
    from data_shards.ingest import IngestOptions
    from data_shards.inputs import SourceOptions

    return BuildOptions(
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        shard_samples=args.shard_samples,
        shard_bytes=args.shard_bytes,
        classes=_classes(args.classes),
        format=args.format,
        source=SourceOptions(videos=args.videos, split_id=args.split_id, labels=args.labels),
        ingest=IngestOptions(
            codec=args.codec,
            dali_cpu=args.dali_cpu,
            short_side=args.short_side,
            fps=args.fps,
            max_frames=args.max_frames,
            max_duration=args.max_duration,
            gop=args.gop,
            audio=args.audio,
            audio_rate=args.audio_rate,
        ),
    )


def _build(args: argparse.Namespace) -> int:
    from data_shards.build import build, summary
    from data_shards.format import FormatError

    try:
        opts = _build_options(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = build(
            args.source,
            args.out,
            opts,
            ray_address=args.ray_address,
            workers=args.workers,
            keep_work=args.keep_work,
            quiet=args.quiet,
            replace_other=args.replace,
        )
    except (
        RuntimeError,
        OSError,
        ValueError,
        FormatError,
    ) as e:  # OSError: files, and storage (bucket, access)
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary(result))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from data_shards.verify import verify_report

    report = verify_report(args.shards, decode=args.decode)
    for p in report.problems:
        print(f"FAIL {p}")
    status = "ok" if not report.problems else f"{len(report.problems)} problem(s)"
    out = {"shards": str(args.shards), "status": status, "samples": report.counts}
    # "decoded": every listed sample decoded cleanly (false without --decode, or when any did not)
    out["decoded"] = args.decode and report.fully_decoded
    if args.decode:
        out["decoded_samples"] = f"{report.decoded}/{report.listed}"
    print(json.dumps(out))
    return 0 if not report.problems else 1


def _synth_args(p: argparse.ArgumentParser) -> None:
    from data_shards.synth import DOMAINS

    p.add_argument("--out", required=True)
    p.add_argument("--videos", type=int, default=64)
    p.add_argument("--classes", type=int, default=4, help="2-10 motion classes")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--codec", choices=["h264", "vp9"], default="h264")
    p.add_argument("--seed", type=int, default=0)
    looks = ", ".join(f"{i} {name}" for i, name in enumerate(DOMAINS))
    p.add_argument("--domain", type=int, default=0, help=f"look of the clips, same classes ({looks})")
    p.add_argument(
        "--shuffle-labels",
        action="store_true",
        help="write the labels in a seeded random order (a mislabelled batch, to see a quality gate refuse it)",
    )
    p.add_argument(
        "--audio",
        action="store_true",
        help="a sound track: a click whenever the picture flashes, at irregular times (audio-visual sync)",
    )
    p.add_argument(
        "--audio-delay",
        type=float,
        default=0.0,
        help="with --audio: the clicks come this many seconds after their flashes (negative: before)",
    )
    kind = p.add_mutually_exclusive_group()
    kind.add_argument(
        "--multi-label",
        action="store_true",
        help="1-3 shapes, each its own motion: labels.csv holds a;b sets",
    )
    kind.add_argument(
        "--segments",
        action="store_true",
        help="still and moving stretches: segments.csv (path,segment_start,segment_end,label); use --frames >= 48",
    )
    p.set_defaults(func=_synth)


def _build_args(p: argparse.ArgumentParser) -> None:
    from data_shards.ingest import CODEC_CHOICES
    from data_shards.inputs import FORMATS

    p.add_argument(
        "source",
        help="a manifest (CSV/JSONL: path,label[,split][,start,end]), a folder (class sub-folders or flat), "
        "or a data set's annotations (Kinetics CSV, SSv2 labels.json folder, UCF101 / HMDB51 root)",
    )
    p.add_argument("--out", required=True, help="shard folder (re-running the same command resumes)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="source format (auto: detect)")
    p.add_argument(
        "--videos", default=None, help="where a data set's videos are (default: beside its annotations)"
    )
    p.add_argument("--split-id", type=int, default=1, help="official UCF101/HMDB51 split (1-3)")
    p.add_argument(
        "--labels",
        choices=("auto", "multi", "segments"),
        default="auto",
        help="Charades: its label sets (auto, multi) or its action segments",
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.0, help="hash val split (from train if the source has splits)"
    )
    p.add_argument("--test-fraction", type=float, default=0.0)
    p.add_argument("--shard-samples", type=int, default=256, help="max samples per shard")
    p.add_argument("--shard-bytes", type=int, default=None, help="max bytes per shard (and --shard-samples)")
    p.add_argument(
        "--classes", default=None, help="class list: a file (one per line) or a,b,c; fixes label order"
    )
    p.add_argument(
        "--codec",
        choices=CODEC_CHOICES,
        default="auto",
        help="auto: keep what the loaders read, remux other containers, re-encode the rest (default); "
        "copy: source bytes only; h264/vp9: always re-encode",
    )
    p.add_argument(
        "--dali-cpu",
        action="store_true",
        help="with --codec auto: keep only what DALI decodes on CPU (VP9, MJPEG) and re-encode the rest to VP9",
    )
    p.add_argument("--short-side", type=int, default=None)
    p.add_argument("--fps", type=float, default=None)
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--max-duration", type=float, default=None, help="seconds")
    p.add_argument("--gop", type=int, default=None, help="keyframe interval of the re-encode")
    p.add_argument(
        "--audio",
        choices=("drop", "keep", "optional"),
        default="drop",
        help="the sound: drop it (default); keep it as a {key}.flac member (a video without usable sound is "
        "rejected); optional: keep it where there is one, store the video without it elsewhere",
    )
    p.add_argument("--audio-rate", type=int, default=16000, help="Hz of the stored mono FLAC (--audio keep)")
    p.add_argument(
        "--ray-address", default=None, help="join an existing Ray cluster (default: local embedded one)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local Ray CPUs (default: all cores); 0: no Ray, the tasks run one by one in this process",
    )
    p.add_argument(
        "--keep-work", action="store_true", help="keep re-encoded bytes in OUT/.work after success"
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="rebuild an OUT that holds a set built from another source (refused without it)",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_build)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_shards", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _synth_args(sub.add_parser("synth", help="write a labelled synthetic motion video set + labels.csv"))
    _build_args(sub.add_parser("build", help="videos + labels -> validated WebDataset shards (Ray job)"))
    p = sub.add_parser(
        "verify", help="check shards against their manifest (checksums, index, members, labels)"
    )
    p.add_argument("shards")
    p.add_argument("--decode", action="store_true", help="also fully decode every video")
    p.set_defaults(func=_verify)
    try:  # the loader needs torch; synth/build/verify do not
        from data_shards import loadtest
    except ImportError:
        loadtest = None
    if loadtest is not None:
        p = sub.add_parser("loadtest", help="drive the loader like training would; one JSON summary line")
        loadtest.add_arguments(p)
        p.set_defaults(func=loadtest.main)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except storage.StorageError as e:  # a bucket, URL scheme or credentials problem, from any subcommand
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

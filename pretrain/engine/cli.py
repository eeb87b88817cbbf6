"""The training command both stages share: argument parsing, config → task → `run`, exit codes, report.

`python -m pretrain` and `python -m finetune` differ only in their config class, task and the lines
they add to the report; everything else is here so the two commands behave the same.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from data_shards import storage

from .config import ConfigError, EngineConfig, load_config
from .config.describe import describe
from .dist import env_world_size, launched
from .remote import shown
from .task import Task
from .trainer import Outcome, RunResult, TrainingStopped, run

C = TypeVar("C", bound=EngineConfig)
T = TypeVar("T", bound=Task)

EXIT_CONFIG_ERROR = 2
EXIT_TRAINING_STOPPED = 3


def training_parser(
    prog: str,
    description: str,
    config_example: str,
    overrides_example: str,
    commands: dict[str, str] | None = None,
) -> argparse.ArgumentParser:
    """`--config FILE [--resume auto|DIR] [key.sub=value ...]` (+ the deepspeed launcher's --local_rank).
    `commands`: the module's other commands (name: what it does), listed under the usage so `--help` shows
    a new user every job, not only training."""
    epilog = None
    if commands:
        width = max(map(len, commands))
        lines = [f"  {name:<{width}}  {what}" for name, what in commands.items()]
        epilog = f"other commands ({prog} COMMAND --help):\n" + "\n".join(lines)
    p = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help=f"YAML file, e.g. {config_example}")
    p.add_argument(
        "--resume", default=None, help="auto (newest complete checkpoint, else fresh) or a checkpoint dir"
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print every key with its value (file and overrides applied) and its meaning, check it, and exit",
    )
    p.add_argument("overrides", nargs="*", help=f"key.sub=value, e.g. {overrides_example}")
    return p


def print_config(config_cls: type[C], args: argparse.Namespace) -> int:
    """`--print-config`: the resolved config as annotated YAML (what a run would use), then its check: a config
    error is reported after the listing (exit 2), so the listing also shows what to fix."""

    def show_and_check() -> None:
        cfg = load_config(config_cls, args.config, args.overrides)
        print(describe(cfg), end="")
        cfg.validate(env_world_size())

    code, _ = guarded(show_and_check)
    return code


def not_a_command(argv: list[str], commands: Iterable[str], prog: str) -> str | None:
    """The error for a first word that looks like a mistyped command (`evalute`): without it argparse
    answers that --config is required, which sends a user looking in the wrong place."""
    word = argv[0] if argv else ""
    if not word or word.startswith("-") or "=" in word:
        return None
    close = difflib.get_close_matches(word, list(commands), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{prog}: unknown command {word!r}{hint}; commands: {', '.join(commands)} (or training: --config FILE)"


def one_line_errors(command: Callable[[], int]) -> int:
    """Run a subcommand (export, evaluate, predict, ...); input it rejects by name (a split the shards lack,
    classes that do not match the model, a missing file or bucket; FormatError and ConfigError are
    ValueErrors) ends it with one `error:` line and exit 2, not a traceback."""
    try:
        return command()
    except (ValueError, FileNotFoundError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


R = TypeVar("R")


def guarded(fn: Callable[[], R], data_errors: tuple[type[Exception], ...] = ()) -> tuple[int, R | None]:
    """(0, fn()) or, for a config error / a stopped run / bad data, its exit code with the message on stderr:
    the one place the training commands map their expected failures to exit codes. `data_errors`: what the
    stage's data path raises for input the user must fix (the engine imports no data code)."""
    try:
        return 0, fn()
    except data_errors as e:
        print(f"data error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR, None
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR, None
    except TrainingStopped as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return EXIT_TRAINING_STOPPED, None
    except storage.StorageError as e:  # a URL that cannot be used: a missing bucket, refused credentials
        print(f"storage error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR, None


def train_command(
    args: argparse.Namespace,
    config_cls: type[C],
    make_task: Callable[[C], T],
    tag: str,
    report: Callable[[T, RunResult], None] | None = None,
    data_errors: tuple[type[Exception], ...] = (),
) -> int:
    """Load + validate the config, build the task, `run` it; print the outcome on rank 0; exit code."""
    if args.print_config:
        return print_config(config_cls, args)

    def build_and_run() -> tuple[T, RunResult]:
        cfg = load_config(config_cls, args.config, args.overrides)
        cfg.validate(env_world_size())
        task = make_task(cfg)
        return task, run(task, cfg, resume=args.resume)

    code, done = guarded(build_and_run, data_errors)
    if done is None:
        return code
    task, result = done
    if result.run_dir and is_main_rank():
        _print_result(result, tag)
        if report is not None:
            report(task, result)
        print(f"[{tag}] {result.tracking}")
    return 0


def strip_launcher_args(argv: list[str]) -> list[str]:
    """`argv` without the `--local_rank=N` the deepspeed launcher puts *before* the user's arguments, so a
    subcommand (`python -m finetune continual ...`) is still the first word; LOCAL_RANK is in the env."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--local_rank", "--local-rank"):
            skip = True
        elif not a.startswith(("--local_rank=", "--local-rank=")):
            out.append(a)
    return out


def is_main_rank() -> bool:
    return launched().is_main


def _print_result(result: RunResult, tag: str) -> None:
    def show(p: Path) -> str:  # a URL run directory is shown by its URL, not this machine's staging copy
        return shown(p, result.run_dir, result.location) if result.location else str(p.resolve())

    state = {
        Outcome.FINISHED: "finished",
        Outcome.EARLY_STOPPED: "stopped early (the task's early stopping)",
        Outcome.PREEMPTED: "preempted (SIGTERM/SIGINT)",
        Outcome.PAUSED: "paused at train.stop_at",
    }[result.outcome]
    print(f"\n[{tag}] {state} at step {result.step}; run dir: {show(result.run_dir)}")
    if not result.outcome.completed:
        print(f"[{tag}] continue with the same command plus --resume auto")
    if result.last_checkpoint:
        print(f"[{tag}] checkpoint: {show(result.last_checkpoint)}")
    if result.model_dir:
        print(f"[{tag}] final model: {show(result.model_dir)}")

"""Ray execution for the build: join or start a cluster, run task bodies with retries and a progress bar."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

TOKEN_HINT = (
    "A cluster started with `ray start --head` uses token auth: run this command with RAY_AUTH_MODE=token and "
    "the head's token (~/.ray/auth_token on the head, copied here, or RAY_AUTH_TOKEN=...)."
)


def _join(address: str) -> None:
    import ray

    # A remote cluster needs our code: ship the package; it needs PyAV/webdataset/numpy installed.
    try:
        ray.init(
            address=address,
            runtime_env={"py_modules": [str(Path(__file__).parent)]},
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    except (ConnectionError, ray.exceptions.AuthenticationError) as e:
        raise ConnectionError(f"cannot join the Ray cluster at {address}: {e}\n{TOKEN_HINT}") from None


def check_workers(address: str | None, workers: int | None) -> None:
    """Refuse a worker count that means nothing before any work (ValueError)."""
    if workers is not None and workers < 0:
        raise ValueError(f"--workers must be 0 (in this process) or more, got {workers}")
    if workers == 0 and address:
        raise ValueError("--workers 0 builds in this process: it cannot also join a Ray cluster")


def init_ray(address: str | None, workers: int | None) -> None:
    """Join `address`, or start an embedded local cluster with `workers` CPUs (all cores by default);
    `workers=0` starts nothing: `run_tasks(..., in_process=True)` runs the task bodies here.

    The local cluster starts quietly: Ray >= 2.59 turns token auth on for a new local cluster and warns
    about it unless RAY_AUTH_MODE is set. We set it to `token` -- the same secure default, chosen
    explicitly -- before Ray reads its configuration (at import), unless the user set it.
    """
    check_workers(address, workers)
    if workers == 0:
        return
    if not address and "ray" not in sys.modules:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if ray.is_initialized():
        return
    if address:
        _join(address)
        return
    ray.init(
        num_cpus=workers or os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )


def run_tasks(
    fn: Callable[..., Any],
    calls: list[tuple],
    desc: str,
    unit_counts: list[int],
    quiet: bool,
    in_process: bool = False,
) -> list[Any]:
    """Submit `fn(*args)` as Ray tasks (retried if a worker dies); ordered results; tqdm with units/s.
    `in_process`: call them here, one after the other (a small set: starting Ray costs more than the work)."""
    from tqdm import tqdm

    if in_process:
        results = []
        with tqdm(total=sum(unit_counts), desc=desc, unit="clip", disable=quiet, file=sys.stderr) as bar:
            for args, units in zip(calls, unit_counts):
                results.append(fn(*args))
                bar.update(units)
        return results
    import ray

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

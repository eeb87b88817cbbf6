"""The registry side of a round: register the challenger, move the aliases, roll back.

Aliases of the registered model: `challenger` (the latest round's version), `champion` (what serving
follows), `previous` (the champion before it). The promotion history is a JSON list of versions in the
registered model's tag `tubelet.champion_history`, so `rollback` can walk back more than one step.
Every call goes through a client bound to the round's store (never MLflow's process-wide URI).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow

from finetune.registry import alias_version

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
HISTORY_TAG = "tubelet.champion_history"
ROUND_TAG = "tubelet.update.round"


def client_for(uri: str) -> Any:
    return mlflow.MlflowClient(uri, registry_uri=uri)


def round_version(client: Any, name: str, round_name: str) -> str | None:
    """The version a round already registered (a resumed round registers nothing twice)."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name='{name}' and tags.`{ROUND_TAG}`='{round_name}'")
    except MlflowException:
        return None
    return str(max(int(v.version) for v in found)) if found else None


def register(model_dir: Path, uri: str, run_id: str, name: str, round_name: str) -> str:
    """Log `model_dir` as the round's training run's model and register it; alias `challenger`."""
    from finetune.mlflow_model import log_model

    client = client_for(uri)
    version = round_version(client, name, round_name)
    if version is None:
        experiment_id = client.get_run(run_id).info.experiment_id
        logged = log_model(
            model_dir, uri=uri, run_id=run_id, experiment_id=experiment_id, name="model", register_as=name
        )
        version = str(logged.registered_model_version)
        client.set_model_version_tag(name, version, ROUND_TAG, round_name)
    client.set_registered_model_alias(name, CHALLENGER, version)
    return version


def tag_version(uri: str, name: str, version: str, tags: dict[str, Any]) -> None:
    client = client_for(uri)
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v)[:4000])


def history(client: Any, name: str) -> list[str]:
    tags = client.get_registered_model(name).tags or {}
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def promote(uri: str, name: str, version: str) -> str | None:
    """`champion` ← `version`, `previous` ← the old champion (returned); idempotent."""
    client = client_for(uri)
    old = alias_version(name, CHAMPION, uri)
    if old == version:
        return _previous_of(client, name, version)
    if old is not None:
        client.set_registered_model_alias(name, PREVIOUS, old)
    client.set_registered_model_alias(name, CHAMPION, version)
    past = [v for v in history(client, name) if v != version]
    if old is not None and old not in past:
        past.append(old)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps([*past, version]))
    return old


def _previous_of(client: Any, name: str, version: str) -> str | None:
    past = history(client, name)
    return past[-2] if len(past) >= 2 and past[-1] == version else None


def rollback(uri: str, name: str) -> tuple[str, str]:
    """`champion` back to the version before it; returns (from, to). Refused when there is none."""
    client = client_for(uri)
    current = alias_version(name, CHAMPION, uri)
    if current is None:
        try:
            client.get_registered_model(name)
        except Exception:
            raise ValueError(f"{name}: no registered model of that name in {uri}") from None
        raise ValueError(f"{name} has no 'champion' alias in {uri}: nothing to roll back")
    past = history(client, name)
    if past and past[-1] == current:
        past = past[:-1]
    if not past:
        raise ValueError(f"{name}: champion version {current} has no earlier champion to roll back to")
    target = past[-1]
    client.set_registered_model_alias(name, CHAMPION, target)
    if len(past) >= 2:
        client.set_registered_model_alias(name, PREVIOUS, past[-2])
    else:
        client.delete_registered_model_alias(name, PREVIOUS)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(past))
    client.set_model_version_tag(name, current, "tubelet.update.rolled_back", f"champion back to {target}")
    return current, target

"""Finding a model: `resolve_model` turns what `serve` / `evaluate` / `predict` / `embed` are given — a
directory, `models:/NAME/VERSION` or `models:/NAME@ALIAS` — into a local model directory plus where it came
from. Registry versions are looked up in the store the user set (never created by a lookup), downloaded once
into the model cache (`$TUBELET_CACHE`, default `~/.cache/tubelet/models/STORE/NAME/VERSION/ID`) and reused.
Every MLflow call goes through a client bound to that store: MLflow's process-wide URI is never touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow

from data_shards import storage
from pretrain.engine.tracking import RUN_ID_FILE  # (its import also quiets MLflow's progress bars)
from pretrain.models.io import ARCHITECTURES

MODEL_DIR_ARTIFACT = "model_dir"  # the pyfunc artifact holding the tubelet model directory
REGISTRY_PREFIX = "models:/"


@dataclass
class ResolvedModel:
    """A local model directory and where it came from (a directory, or a registry version)."""

    model_dir: Path
    source: str
    name: str | None = None
    version: str | None = None
    aliases: list[str] = field(default_factory=list)
    run_id: str | None = None
    tracking_uri: str | None = None  # the store holding `run_id` (and the registry version)

    @property
    def run(self) -> tuple[str, str] | None:
        """(store URI, run id) of the training run, when known."""
        return (self.tracking_uri, self.run_id) if self.run_id and self.tracking_uri else None

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "model_dir": str(self.model_dir),
            "registered_name": self.name,
            "version": self.version,
            "aliases": self.aliases,
            "run_id": self.run_id,
        }


def resolve_model(source: str, uri: str | None = None, cache: str | Path | None = None) -> ResolvedModel:
    """`DIR`, a URL of one (`s3://...`, fetched once into the cache), `models:/NAME/VERSION` or
    `models:/NAME@ALIAS` → a local model directory. A registry version is
    downloaded once into the model cache (`model_cache`; `cache` overrides its root) and reused: versions
    never change. Errors name the source and what exists."""
    if storage.is_url(source) and not source.startswith(REGISTRY_PREFIX):  # a model directory in a bucket
        if not storage.isfile(storage.join(source, "config.json")):
            raise FileNotFoundError(f"{source}: not a model directory (no config.json)")
        run = run_of_url(source)
        return ResolvedModel(
            storage.local_copy(source, "models"),
            source,
            run_id=run[1] if run else None,
            tracking_uri=run[0] if run else None,
        )
    if not source.startswith(REGISTRY_PREFIX):
        path = Path(source)
        if not (path / "config.json").is_file():
            final = path.parent / "model"  # RUN/best without a best (no val split): name RUN/model
            hint = (
                f" ({final} is one: the run wrote no {path.name})"
                if (final / "config.json").is_file()
                else ""
            )
            raise FileNotFoundError(
                f"{source}: not a model directory (no config.json){hint}; give RUN/best, RUN/model, an exported "
                "directory, or models:/NAME/VERSION | models:/NAME@ALIAS"
            )
        run = run_of_dir(path)
        return ResolvedModel(
            path, source, run_id=run[1] if run else None, tracking_uri=run[0] if run else None
        )
    uri = registry_store(source, uri)
    mv = _model_version(source, uri)
    local = _download_version(mv, uri, model_cache(uri, mv.name, str(mv.version), version_id(mv), cache))
    storage.prune_copies(local.parent, order=lambda p: int(p.name))  # the newest versions
    model_dir = _model_dir_of(local)
    if model_dir is None:
        raise ValueError(
            f"{source} (version {mv.version}) is not a tubelet video classifier: its MLmodel has no "
            f"{MODEL_DIR_ARTIFACT!r} artifact holding a model directory"
        )
    aliases = list(mv.aliases or [])
    return ResolvedModel(model_dir, source, mv.name, str(mv.version), aliases, mv.run_id, uri)


# where tubelet's commands put their store by default, from the folder they ran in: MLflow's own default, a
# training run's (beside `train.run_dir`, `runs/NAME` by default) and the update loop's (its `work_dir`)
DEFAULT_STORES = ("mlflow.db", "runs/mlflow.db", "runs/update/mlflow.db")


def registry_store(source: str, uri: str | None) -> str:
    """The MLflow store to look `source` up in: `uri`, else $MLFLOW_TRACKING_URI, else the one of the default
    stores here (`DEFAULT_STORES`) that registers the model. A local store that does not exist is an error,
    never created: looking a model up must not leave an empty database behind."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or _default_store(source)
    local = _local_store_path(uri)
    if local is not None and not local.exists():
        raise ValueError(f"{source}: no MLflow store at {local} (from {uri}); check the tracking URI")
    return uri


def _default_store(source: str) -> str:
    """The default store that has `source`'s registered model (the only one there is, if it has none)."""
    found = [f"sqlite:///{Path(p).resolve()}" for p in DEFAULT_STORES if Path(p).is_file()]
    if not found:
        raise ValueError(
            f"{source}: no MLflow store to look it up in: set MLFLOW_TRACKING_URI or --tracking-uri (none of "
            f"the default stores {', '.join('./' + p for p in DEFAULT_STORES)} is here)"
        )
    name = _registered_name(source)
    having = [u for u in found if _registers(u, name)]
    if len(having) == 1 or (not having and len(found) == 1):
        return (having or found)[0]
    raise ValueError(
        f"{source}: {'several' if having else 'none'} of the default stores here register {name!r} "
        f"({', '.join(having or found)}): say which with --tracking-uri or MLFLOW_TRACKING_URI"
    )


def _registered_name(source: str) -> str:
    """NAME of `models:/NAME/VERSION` or `models:/NAME@ALIAS`."""
    rest = source[len(REGISTRY_PREFIX) :]
    return rest.rsplit("@", 1)[0] if "@" in rest else rest.rpartition("/")[0]


def _registers(uri: str, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient(uri, registry_uri=uri).get_registered_model(name)
        return True
    except MlflowException:
        return False


def _local_store_path(uri: str) -> Path | None:
    """The file or folder a local store URI names (sqlite:///PATH, file:PATH, a bare path); None if remote."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///").split("?")[0])
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file://").removeprefix("file:"))
    return None if "://" in uri else Path(uri)


def model_cache(uri: str, name: str, version: str, ident: str, root: str | Path | None = None) -> Path:
    """Where version `version` of `name` from store `uri` is kept: `$TUBELET_CACHE` (default
    `$XDG_CACHE_HOME/tubelet`, `~/.cache/tubelet`) / models / store hash / name / version / `ident`
    (`version_id`: what the version is, since a store recreated at the same URI numbers its versions again)."""
    root = storage.cache_root() if root is None else root
    store = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return Path(root) / "models" / store / name / version / ident


def version_id(mv: Any) -> str:
    """A registry version's identity: its run, artifact source and creation time. `NAME/VERSION` alone is not
    one: a store deleted and made again at the same path (a demo re-run from scratch) has its own version 1,
    and a copy cached from the old store would be served in its place."""
    what = f"{mv.run_id}|{mv.source}|{mv.creation_timestamp}"
    return hashlib.sha256(what.encode()).hexdigest()[:12]


def _download_version(mv: Any, uri: str, dst: Path) -> Path:
    """The version's pyfunc model in `dst` (downloaded into a sibling folder, then renamed: a reader never
    sees a half-written copy, and concurrent replicas downloading the same version both end with it)."""
    import shutil

    if (dst / "MLmodel").is_file():
        return dst
    for attempt in range(2):  # another replica may prune this (old) version's folder in between: once more
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
            break
        except FileNotFoundError:
            if attempt:
                raise
    try:
        # by the version's storage location: a `models:/` URI would be resolved through the process-wide
        # registry URI, not this store's
        location = mlflow.MlflowClient(uri, registry_uri=uri).get_model_version_download_uri(
            mv.name, str(mv.version)
        )
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=location, dst_path=str(tmp), tracking_uri=uri
        )
        try:
            Path(local).rename(dst)
        except OSError:  # another process finished the same version first
            if not (dst / "MLmodel").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def check_source(source: str, uri: str | None = None) -> str:
    """`source` checked without downloading anything (a directory with config.json, or a registry version
    that exists); returns what it names, for a log line."""
    if not source.startswith(REGISTRY_PREFIX):
        model_dir = resolve_model(source).model_dir
        meta = json.loads((model_dir / "config.json").read_text())
        arch = meta.get("architecture")  # None: an HF directory, checked when loaded
        if arch is not None and ARCHITECTURES.get(arch, (None, None, ""))[2] != "classification":
            raise ValueError(
                f"{model_dir} holds a {arch}, not a classifier: fine-tune it first (python -m finetune)"
            )
        return str(model_dir)
    mv = _model_version(source, registry_store(source, uri))
    return f"{source} (version {mv.version} of {mv.name}, run {mv.run_id})"


def _model_dir_of(local: Path) -> Path | None:
    """The tubelet model directory inside a downloaded pyfunc model (its `model_dir` artifact)."""
    from mlflow.models import Model

    artifacts = Model.load(str(local)).flavors.get("python_function", {}).get("artifacts", {})
    rel = artifacts.get(MODEL_DIR_ARTIFACT, {}).get("path")
    path = local / rel if rel else None
    return path if path is not None and (path / "config.json").is_file() else None


def _model_version(source: str, uri: str) -> Any:
    """The registry entry `source` names (`models:/NAME/VERSION` or `models:/NAME@ALIAS`)."""
    from mlflow.exceptions import MlflowException

    rest = source[len(REGISTRY_PREFIX) :]
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    try:
        if "@" in rest:
            name, alias = rest.rsplit("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, version = rest.rpartition("/")
        if not name or not version.isdigit():
            raise ValueError(f"{source}: expected models:/NAME/VERSION (a number) or models:/NAME@ALIAS")
        return client.get_model_version(name, version)
    except MlflowException as e:
        known = {m.name: m for m in client.search_registered_models()}
        name = _registered_name(source)
        if name in known:  # the model is here; the version or alias is not
            versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
            aliases = sorted(known[name].aliases or {})
            raise ValueError(
                f"{source}: {name} in {uri} has versions {versions or 'none'} and aliases {aliases or 'none'}; "
                "give one of them (an alias such as @champion is set when `finetune update` promotes a "
                "version, or by MlflowClient.set_registered_model_alias)"
            ) from None
        raise ValueError(
            f"{source}: not in the model registry at {uri} ({e.message.splitlines()[0]}); registered models: "
            f"{sorted(known) or 'none'} (set MLFLOW_TRACKING_URI or --tracking-uri to the store that has it)"
        ) from None


def run_of_dir(model_dir: Path) -> tuple[str, str] | None:
    """(store URI, run id) of the fine-tuning run a model directory belongs to (`RUN/best`, `RUN/model`:
    `RUN/mlflow_run.json`), or None."""
    f = Path(model_dir).resolve().parent / RUN_ID_FILE
    if not f.is_file():
        return None
    info = json.loads(f.read_text())
    return (info["uri"], info["run_id"]) if info.get("uri") and info.get("run_id") else None


def run_of_url(model_url: str) -> tuple[str, str] | None:
    """(store URI, run id) of the run a model directory in a bucket belongs to (`RUN_URL/mlflow_run.json`,
    which a run with a URL run directory uploads), or None; also None when that store is a local file this
    machine does not have (the default sqlite store stays on the machine of the run's rank 0)."""
    f = storage.join(storage.parent(model_url), RUN_ID_FILE)
    if not storage.isfile(f):
        return None
    info = json.loads(storage.read_text(f))
    uri, run_id = info.get("uri"), info.get("run_id")
    if not uri or not run_id:
        return None
    local = _local_store_path(uri)
    return None if local is not None and not local.exists() else (uri, run_id)


def alias_of(source: str) -> tuple[str, str] | None:
    """(name, alias) of a `models:/NAME@ALIAS` source, else None (a fixed version or a directory)."""
    if not source.startswith(REGISTRY_PREFIX) or "@" not in source:
        return None
    name, alias = source[len(REGISTRY_PREFIX) :].rsplit("@", 1)
    return name, alias


def alias_version(name: str, alias: str, uri: str) -> str | None:
    """The version `alias` points at now; None when the model or the alias does not exist. Any other
    failure (the store unreachable) raises: "no champion" must not be reported for a server that is down."""
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow.MlflowClient(uri, registry_uri=uri).get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # no model / no alias
            return None
        raise

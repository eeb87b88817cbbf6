"""A fine-tuned model directory as an MLflow model (pyfunc flavor), the model registry, and the way back.

`log_model` wraps a model directory in a pyfunc model (the directory is its artifact `model_dir`, the code of
`finetune`/`pretrain`/`data_shards` rides along in `code/`, so the model loads wherever its requirements are
installed), with a signature, an input example (a synthetic clip) and optional registration, so every
fine-tune or continual experience that registers under one name adds a version.
`resolve_model` turns what `serve` / `evaluate` are given — a directory, `models:/NAME/VERSION` or
`models:/NAME@ALIAS` — into a local model directory plus where it came from.

The pyfunc's `predict` takes video bytes and/or paths: a DataFrame with a `video` (binary) or `path` (string)
column, or a list of bytes / path strings; it returns one row per video: `label`, `score` (top-1), `top_k`
([{"label", "score"}], `params={"top_k": k}`, default 5) and `error` (null, or why this input is not a video).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault(
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"
)  # before mlflow reads it: no bars in logs

import mlflow
import pandas as pd

from finetune.predict import Predictor, VideoInputError

MODEL_DIR_ARTIFACT = "model_dir"
LOGGED_MODEL_TAG = "tubelet.logged_model_id"  # on a registry version: the MLflow 3 logged model it holds
REGISTRY_PREFIX = "models:/"
DEFAULT_TOP_K = 5
PREDICT_CHUNK = 8  # videos per forward inside one pyfunc call: bounds memory on big inputs
_REQUIREMENTS = ("torch", "av", "numpy", "safetensors", "einops", "pyyaml", "pandas")


class VideoClassifierModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of `Predictor`: the same decoding and eval sampling as `predict` and `serve`."""

    def load_context(self, context: Any) -> None:
        self.predictor = Predictor(context.artifacts[MODEL_DIR_ARTIFACT])

    # a DataFrame hint: MLflow then checks inputs against the signature only (no type-hint schema, no warning)
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        k = int((params or {}).get("top_k", DEFAULT_TOP_K))
        items = _input_items(model_input)
        views: list[Any] = [None] * len(items)
        errors: list[str | None] = [None] * len(items)
        for i, item in enumerate(items):
            try:
                data = item if isinstance(item, bytes) else Path(item).read_bytes()
                views[i] = self.predictor.decode(data)
            except (OSError, VideoInputError) as e:
                errors[i] = f"{getattr(e, 'reason', type(e).__name__)}: {e}"
        ok = [i for i in range(len(items)) if errors[i] is None]
        probs: dict[int, Any] = {}
        for start in range(0, len(ok), PREDICT_CHUNK):
            chunk = ok[start : start + PREDICT_CHUNK]
            probs.update(zip(chunk, self.predictor.probabilities([views[i] for i in chunk])))
        tops = [
            [{"label": t["label"], "score": t["score"]} for t in self.predictor.top(probs[i], k)]
            if i in probs
            else []
            for i in range(len(items))
        ]
        # object columns: a failed row's label / error stay None (pandas' string dtype would make them NaN)
        return pd.DataFrame(
            {
                "label": pd.Series([t[0]["label"] if t else None for t in tops], dtype=object),
                "score": pd.Series([t[0]["score"] if t else None for t in tops], dtype=object),
                "top_k": pd.Series(tops, dtype=object),
                "error": pd.Series(errors, dtype=object),
            }
        )


def _input_items(model_input: Any) -> list[bytes | str]:
    """Videos of a pyfunc input: DataFrame (`video` bytes, else `path`), Series, list/array, or one item."""
    if isinstance(model_input, pd.DataFrame):
        cols = [c for c in ("video", "path") if c in model_input.columns]
        if not cols:
            raise ValueError(
                f"input columns {list(model_input.columns)}: give a `video` column (bytes) or a `path` column"
            )
        out = []
        for _, row in model_input.iterrows():
            value = next((row[c] for c in cols if _present(row[c])), None)
            if value is None:
                raise ValueError("an input row has neither `video` bytes nor a `path`")
            out.append(value)
        return [_as_item(v) for v in out]
    if isinstance(model_input, (bytes, str)):
        return [_as_item(model_input)]
    return [_as_item(v) for v in list(model_input)]


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and v != v)  # None / NaN = absent


def _as_item(v: Any) -> bytes | str:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, (str, Path)):
        return str(v)
    raise TypeError(f"a video is bytes or a path string, got {type(v).__name__}")


# ------------------------------------------------------------------------------------------- logging


def signature() -> Any:
    """Inputs: `video` bytes or `path`; outputs: top-1 label/score, the top-k list, an error; param top_k."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    top = Array(Object([Property("label", "string"), Property("score", "double")]))
    return ModelSignature(
        inputs=Schema(
            [ColSpec("binary", "video", required=False), ColSpec("string", "path", required=False)]
        ),
        outputs=Schema(
            [
                ColSpec("string", "label", required=False),
                ColSpec("double", "score", required=False),
                ColSpec(top, "top_k"),
                ColSpec("string", "error", required=False),
            ]
        ),
        params=ParamSchema([ParamSpec("top_k", "long", DEFAULT_TOP_K)]),
    )


def example_clip(model_dir: Path) -> bytes:
    """A small synthetic H.264 clip long enough for the model's sampling: the logged input example."""
    from data_shards.synth import SynthSpec, encode_clip, render_clip
    from finetune.evaluate import sampling_for
    from finetune.export import load_finetuned, model_extra
    from pretrain.models.io import input_geometry

    model = load_finetuned(model_dir)
    frames, size = input_geometry(model.cfg)
    stride = sampling_for(model, model_extra(model_dir), None, None, None).stride
    spec = SynthSpec(videos=1, frames=frames * stride, size=size, codec="h264", seed=0)
    clip, _ = render_clip(0, spec)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "example.mp4"
        encode_clip(clip, path, "h264", spec.fps)
        return path.read_bytes()


def requirements(model_dir: Path) -> list[str]:
    """Pinned pip requirements of the pyfunc model (peft only when the directory has a PEFT sidecar)."""
    names = list(_REQUIREMENTS) + (["peft"] if any(Path(model_dir).glob("peft*")) else [])
    out = []
    for name in names:
        try:
            out.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def code_paths() -> list[str]:
    """tubelet's packages, shipped with a pyfunc model or a Serve job (a cluster node has no checkout)."""
    import data_shards
    import finetune
    import pretrain

    return [str(Path(m.__file__).parent) for m in (finetune, pretrain, data_shards)]


@dataclass(frozen=True)
class LoggedVideoModel:
    """What `log_model` logged: the MLflow 3 logged model and, when registered, its registry version."""

    model_id: str
    registered_model_version: str | None = None

    @property
    def model_uri(self) -> str:
        return f"{REGISTRY_PREFIX}{self.model_id}"


def log_model(
    model_dir: str | Path,
    *,
    uri: str,
    run_id: str,
    experiment_id: str,
    name: str = "model",
    register_as: str | None = None,
) -> LoggedVideoModel:
    """Log `model_dir` as a pyfunc model of run `run_id` (an MLflow 3 logged model named `name`), registered
    as a new version of `register_as` when given.

    Every call goes through an `MlflowClient` bound to `uri`: MLflow's process-wide tracking URI and the
    `MLFLOW_TRACKING_URI` variable are neither read nor changed, so later runs of the same command (the next
    continual experience) log to the store the user set."""
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    model_dir = Path(model_dir)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    meta = Model(
        artifact_path=logged.artifact_location,
        model_uuid=logged.model_id,
        run_id=run_id,
        model_id=logged.model_id,
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                path=str(local),
                mlflow_model=meta,
                python_model=str(Path(__file__).with_name("pyfunc_entry.py")),  # models from code: no pickle
                artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
                code_paths=code_paths(),
                signature=signature(),
                input_example=pd.DataFrame({"video": [example_clip(model_dir)]}),
                pip_requirements=requirements(model_dir),
                metadata={"tubelet_model_dir": model_dir.name},
            )
            client.log_model_artifacts(logged.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")  # never left pending
        raise
    client.finalize_logged_model(logged.model_id, "READY")
    if register_as is None:
        return LoggedVideoModel(logged.model_id)
    _ensure_registered_model(client, register_as)
    # the source is the logged model's artifact location, not `models:/<id>`: MLflow's sqlite registry looks a
    # `models:/` source up through the process-wide tracking URI (its own TODO), which may be another store;
    # the logged model is named by a tag instead
    version = client.create_model_version(
        register_as,
        source=logged.artifact_location,
        run_id=run_id,
        tags={LOGGED_MODEL_TAG: logged.model_id},
    )
    return LoggedVideoModel(logged.model_id, str(version.version))


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


# ------------------------------------------------------------------------------------------ resolving


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
    """`DIR`, `models:/NAME/VERSION` or `models:/NAME@ALIAS` → a local model directory. A registry version is
    downloaded once into the model cache (`model_cache`; `cache` overrides its root) and reused: versions
    never change. Errors name the source and what exists."""
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
    local = _download_version(mv, uri, model_cache(uri, mv.name, str(mv.version), cache))
    model_dir = _model_dir_of(local)
    if model_dir is None:
        raise ValueError(
            f"{source} (version {mv.version}) is not a tubelet video classifier: its MLmodel has no "
            f"{MODEL_DIR_ARTIFACT!r} artifact holding a model directory"
        )
    aliases = list(mv.aliases or [])
    return ResolvedModel(model_dir, source, mv.name, str(mv.version), aliases, mv.run_id, uri)


def registry_store(source: str, uri: str | None) -> str:
    """The MLflow store to look `source` up in: `uri`, else $MLFLOW_TRACKING_URI, else MLflow's default
    `./mlflow.db` when it exists. A local store that does not exist is an error, never created: looking a
    model up must not leave an empty database behind."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        if not Path("mlflow.db").is_file():
            raise ValueError(
                f"{source}: no MLflow store to look it up in: set MLFLOW_TRACKING_URI or --tracking-uri "
                "(there is no ./mlflow.db here)"
            )
        uri = f"sqlite:///{Path('mlflow.db').resolve()}"
    local = _local_store_path(uri)
    if local is not None and not local.exists():
        raise ValueError(f"{source}: no MLflow store at {local} (from {uri}); check the tracking URI")
    return uri


def _local_store_path(uri: str) -> Path | None:
    """The file or folder a local store URI names (sqlite:///PATH, file:PATH, a bare path); None if remote."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///").split("?")[0])
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file://").removeprefix("file:"))
    return None if "://" in uri else Path(uri)


def model_cache(uri: str, name: str, version: str, root: str | Path | None = None) -> Path:
    """Where version `version` of `name` from store `uri` is kept: `$TUBELET_CACHE` (default
    `$XDG_CACHE_HOME/tubelet`, `~/.cache/tubelet`) / models / store hash / name / version."""
    import hashlib

    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = os.environ.get("TUBELET_CACHE") or str(Path(base) / "tubelet")
    store = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return Path(root) / "models" / store / name / version


def _download_version(mv: Any, uri: str, dst: Path) -> Path:
    """The version's pyfunc model in `dst` (downloaded into a sibling folder, then renamed: a reader never
    sees a half-written copy, and concurrent replicas downloading the same version both end with it)."""
    import shutil

    if (dst / "MLmodel").is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
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
        return str(resolve_model(source).model_dir)
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
        known = sorted(m.name for m in client.search_registered_models())
        raise ValueError(
            f"{source}: not in the model registry at {uri} ({e.message.splitlines()[0]}); registered models: "
            f"{known or 'none'} (set MLFLOW_TRACKING_URI or --tracking-uri to the store that has it)"
        ) from None


def run_of_dir(model_dir: Path) -> tuple[str, str] | None:
    """(store URI, run id) of the fine-tuning run a model directory belongs to (`RUN/best`, `RUN/model`:
    `RUN/mlflow_run.json`), or None."""
    from pretrain.engine.tracking import RUN_ID_FILE

    f = Path(model_dir).resolve().parent / RUN_ID_FILE
    if not f.is_file():
        return None
    info = json.loads(f.read_text())
    return (info["uri"], info["run_id"]) if info.get("uri") and info.get("run_id") else None

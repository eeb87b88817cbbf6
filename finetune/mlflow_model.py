"""A fine-tuned model directory as an MLflow model (pyfunc flavor) and its logging.

`log_model` wraps a model directory in a pyfunc model (the directory is its artifact `model_dir`, the code of
`finetune`/`pretrain`/`data_shards` rides along in `code/`, so the model loads wherever its requirements are
installed), with a signature, an input example (a synthetic clip) and optional registration, so every
fine-tune or continual experience that registers under one name adds a version. Finding a model again (a
directory or a registry version → a local model directory) is `finetune/registry.py`.

The pyfunc's `predict` takes video bytes and/or paths: a DataFrame with a `video` (binary) or `path` (string)
column, or a list of bytes / path strings; it returns one row per video: `label`, `score` (top-1), `top_k`
([{"label", "score"}], `params={"top_k": k}`, default 5) and `error` (null, or why this input is not a video).
"""

from __future__ import annotations

import importlib.metadata
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from finetune.predict import Predictor, VideoInputError
from finetune.registry import MODEL_DIR_ARTIFACT, REGISTRY_PREFIX

LOGGED_MODEL_TAG = "tubelet.logged_model_id"  # on a registry version: the MLflow 3 logged model it holds
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
            [{"label": t["label"], "score": t["score"]} for t in self.predictor.answer(probs[i], k)]
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
    """A small synthetic H.264 clip long enough for the model's sampling (with sound for a model that
    listens): the logged input example."""
    from data_shards.codec import AUDIO_ENCODERS
    from data_shards.synth import SynthSpec, encode_clip, render_clip, render_sound
    from finetune.model_dir import open_model_dir

    opened = open_model_dir(model_dir)
    (frames, size), stride = opened.geometry, opened.spec.stride
    listens = opened.spec.audio is not None
    spec = SynthSpec(videos=1, frames=frames * stride, size=size, codec="h264", seed=0, audio=listens)
    clip, _ = render_clip(0, spec)
    sound = render_sound(0, spec, clip, AUDIO_ENCODERS["h264"][1]) if listens else None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "example.mp4"
        encode_clip(clip, path, "h264", spec.fps, sound)
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
    pyfunc_log = logging.getLogger("mlflow.pyfunc")  # its INFO "Validating input example" line at every save
    level = pyfunc_log.level
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "model"
            pyfunc_log.setLevel(max(level, logging.WARNING))
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
    finally:
        pyfunc_log.setLevel(level)
    client.finalize_logged_model(logged.model_id, "READY")
    if register_as is None:
        return LoggedVideoModel(logged.model_id)
    _ensure_registered_model(client, register_as)
    # the source is the logged model's artifact location, not `models:/<id>`: MLflow's sqlite registry looks a
    # `models:/` source up through the process-wide tracking URI (its own TODO), which may be another store;
    # the logged model is named by a tag too. `model_id` is what lets a tracking server with proxied artifacts
    # (`--artifacts-destination s3://...`) accept the source: it must lie inside that logged model's location
    version = client.create_model_version(
        register_as,
        source=logged.artifact_location,
        run_id=run_id,
        tags={LOGGED_MODEL_TAG: logged.model_id},
        model_id=logged.model_id,
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

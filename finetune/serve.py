"""`python -m finetune serve`: a fine-tuned classifier behind HTTP, on Ray Serve.

    POST /predict[?top_k=K]   video bytes as the body (or a multipart file field) → [{"label", "score"}, ...]
    POST /embed               video bytes → {"embedding": [...], "dim": D}
    GET  /health              {"status": "ok"}
    GET  /metadata            labels, input geometry and sampling, model source/version, batching statistics

One deployment (`VideoClassifierServer`, FastAPI ingress) with `--replicas N` copies. Each request is read
(size-limited) and decoded from memory in a worker thread with the `Predictor` — the eval sampling of
`evaluate` / `predict` — then its views join a `@serve.batch` queue: one forward for up to `--max-batch-size`
videos arriving within `--batch-wait-ms`. Each replica accepts `max_ongoing_requests` = 2 × the batch size
by default (one batch computing while the next one fills; Serve's default of 5 would silently cap batches).
Bad input gets a 4xx JSON error {"error": reason, "detail": what is wrong}; nothing received is written to
disk (bodies and multipart files are held in memory) or unpickled.

Local Ray by default; `--ray-address HOST:PORT` deploys onto an existing cluster (the code is shipped with
the app; the cluster needs tubelet's dependencies). `--model` is a model directory (visible to every node)
or a registry version `models:/NAME/VERSION` / `models:/NAME@ALIAS`, downloaded once per machine
into the model cache (`~/.cache/tubelet/models`, `$TUBELET_CACHE`) and shared by its replicas.
"""

# No `from __future__ import annotations` here: FastAPI reads the route methods' annotations (Request) at
# runtime, and Serve's ingress rebinds the methods where string annotations no longer resolve.
import asyncio
import hmac
import logging
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

# Ray >= 2.59 turns token auth on for a new local cluster and warns unless RAY_AUTH_MODE is set: choose the
# same secure default explicitly, before Ray reads its configuration at import (as data_shards.execute does)
os.environ.setdefault("RAY_AUTH_MODE", "token")
from ray import serve

from data_shards import storage
from data_shards.loader.pyav import DecodeLimits
from finetune.predict import Predictor, VideoInputError
from pretrain.engine import ConfigError

APP_NAME = "tubelet"
MULTIPART = "multipart/form-data"


@dataclass
class ServeConfig:
    """What `python -m finetune serve` takes; `check` names the flag and the fix."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    max_batch_size: int = 8  # 1 = no batching
    batch_wait_ms: float = 20.0
    max_ongoing_requests: int | None = None  # per replica; None: 2 × max_batch_size
    max_upload_mb: float = 64.0
    cpus_per_replica: float = 1.0
    clips: int | None = None  # None: the model's exported test views
    crops: int | None = None
    ray_address: str | None = None
    tracking_uri: str | None = None  # for models:/ sources; None: $MLFLOW_TRACKING_URI
    max_pixels: int | None = 3840 * 2160  # per frame of an upload (0/None: no limit)
    max_decode_seconds: float | None = 3600.0  # duration of an upload (0/None: no limit)
    auth_token: str | None = field(default=None, repr=False)  # bearer token: every endpoint but /health
    reload_interval: float = 10.0  # seconds between checks of a models:/NAME@ALIAS source (0: never)
    capture: str | None = None  # DIR or URL: accepted uploads kept with their prediction
    capture_rate: float = 1.0
    capture_max_bytes: int = 1 << 30

    def check(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.replicas >= 1, f"--replicas must be >= 1, got {self.replicas}")
        need(
            self.max_batch_size >= 1,
            f"--max-batch-size must be >= 1 (1 = no batching), got {self.max_batch_size}",
        )
        need(self.batch_wait_ms >= 0, f"--batch-wait-ms must be >= 0, got {self.batch_wait_ms}")
        need(self.max_upload_mb > 0, f"--max-upload-mb must be > 0, got {self.max_upload_mb}")
        need(self.cpus_per_replica > 0, f"--cpus-per-replica must be > 0, got {self.cpus_per_replica}")
        need(0 < self.port < 65536, f"--port must be in 1..65535, got {self.port}")
        need(
            self.ongoing >= self.max_batch_size,
            f"--max-ongoing-requests={self.max_ongoing_requests} is below --max-batch-size={self.max_batch_size}: "
            "batches could never fill; raise it (default 2 × batch size)",
        )
        need(self.crops in (None, 1, 3), f"--crops must be 1 or 3, got {self.crops}")
        need(self.clips is None or self.clips >= 1, f"--clips must be >= 1, got {self.clips}")
        need((self.max_pixels or 0) >= 0, f"--max-pixels must be >= 0 (0: no limit), got {self.max_pixels}")
        need(
            (self.max_decode_seconds or 0) >= 0,
            f"--max-decode-seconds must be >= 0 (0: no limit), got {self.max_decode_seconds}",
        )
        need(
            self.reload_interval >= 0,
            f"--reload-interval must be >= 0 (0: never), got {self.reload_interval}",
        )
        need(0 <= self.capture_rate <= 1, f"--capture-rate must be in [0, 1], got {self.capture_rate}")
        need(self.capture_max_bytes > 0, f"--capture-max-bytes must be > 0, got {self.capture_max_bytes}")
        need(
            self.auth_token is None or len(self.auth_token) >= 16,
            "the bearer token (--auth-token or $TUBELET_SERVE_TOKEN) must be >= 16 characters",
        )

    @property
    def limits(self) -> DecodeLimits:
        return DecodeLimits(self.max_pixels or None, self.max_decode_seconds or None)

    @property
    def ongoing(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size

    @property
    def upload_limit(self) -> int:
        return int(self.max_upload_mb * 2**20)


def error_response(
    reason: str, detail: str, status: int, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": reason, "detail": detail}, status_code=status, headers=headers)


class Unauthorized(Exception):
    """No bearer token, or not the server's."""


def authorize(request: Request, token: str | None) -> None:
    """`Authorization: Bearer TOKEN` when the server has a token; compared in constant time."""
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized()


async def read_video(request: Request, limit: int) -> bytes:
    """The video bytes of a request: the raw body, or the file part of a multipart form; at most `limit`
    bytes are read (a larger Content-Length is refused before reading). Held in memory only."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise VideoInputError("too_large", _too_large(int(declared), limit))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise VideoInputError("too_large", _too_large(size, limit))
        chunks.append(chunk)
    body = b"".join(chunks)
    if request.headers.get("content-type", "").startswith(MULTIPART):
        return await _multipart_file(request, body, limit)
    return body


def _too_large(size: int, limit: int) -> str:
    return f"request body of {size} bytes (or more) is over the limit of {limit} bytes (--max-upload-mb)"


async def _multipart_file(request: Request, body: bytes, limit: int) -> bytes:
    """The file part of a multipart body (field `file`, `video`, or the only file), parsed from memory."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream() -> Any:
        yield body

    parser = MultiPartParser(request.headers, stream(), max_files=1, max_fields=8)
    parser.spool_max_size = limit + 1  # the file part stays in memory: nothing received touches the disk
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise VideoInputError("bad_request", f"malformed multipart body: {e.message}") from None
    files = {k: v for k, v in form.multi_items() if isinstance(v, UploadFile)}
    upload = files.get("file") or files.get("video") or next(iter(files.values()), None)
    if upload is None:
        raise VideoInputError(
            "bad_request", "the multipart body has no file part: send the video as field `file`"
        )
    data = await upload.read()
    await form.close()
    return data


def top_k_param(request: Request) -> int:
    raw = request.query_params.get("top_k", "5")
    if not raw.isdigit() or int(raw) < 1:
        raise VideoInputError("bad_request", f"top_k={raw!r}: give an integer >= 1 (clipped to the classes)")
    return int(raw)


app = FastAPI(title="tubelet video classifier")


@app.exception_handler(VideoInputError)
async def _bad_input(request: Request, e: VideoInputError) -> JSONResponse:
    return error_response(e.reason, str(e), e.status)


@app.exception_handler(Unauthorized)
async def _unauthorized(request: Request, e: Unauthorized) -> JSONResponse:
    detail = "this server needs 'Authorization: Bearer TOKEN' (the token given to serve --auth-token)"
    return error_response("unauthorized", detail, 401, {"WWW-Authenticate": "Bearer"})


@app.exception_handler(Exception)
async def _internal(request: Request, e: Exception) -> JSONResponse:
    """Our fault, not the client's: 500 with the exception named; the replica goes on serving."""
    return error_response("internal", f"{type(e).__name__}: {e}", 500)


def by_predictor(items: list[tuple[Predictor, torch.Tensor]], features: bool) -> list[torch.Tensor]:
    """One forward per model in the batch (two only right after a reload), results in request order."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(items)
    for predictor in {id(p): p for p, _ in items}.values():
        idx = [i for i, (p, _) in enumerate(items) if p is predictor]
        views = [items[i][1] for i in idx]
        results = predictor.embeddings(views) if features else predictor.probabilities(views)
        for i, r in zip(idx, results):
            out[i] = r
    return out


@dataclass(frozen=True)
class Served:
    """What a replica serves right now: a request reads it once, so a reload never mixes two models."""

    source: Any  # registry.ResolvedModel
    predictor: Predictor


@serve.deployment(name="VideoClassifier")
@serve.ingress(app)
class VideoClassifierServer:
    """One replica: the served model (swapped in place when a followed alias moves), two batch queues
    (predict, embed) with a batch-size histogram, and the optional capture writer."""

    def __init__(self, cfg: ServeConfig) -> None:
        from finetune.capture import Capture
        from finetune.registry import alias_of, resolve_model

        torch.set_num_threads(max(1, int(cfg.cpus_per_replica)))
        self.cfg = cfg
        source = resolve_model(cfg.model, cfg.tracking_uri)
        self.served = Served(source, self._predictor(source))
        self.batches: dict[str, Counter[int]] = {"predict": Counter(), "embed": Counter()}
        for queue in (self.predict_batch, self.embed_batch):
            queue.set_max_batch_size(cfg.max_batch_size)
            queue.set_batch_wait_timeout_s(cfg.batch_wait_ms / 1000)
        replica = serve.get_replica_context().replica_id.unique_id
        self.capture = (
            Capture(cfg.capture, replica, cfg.capture_rate, cfg.capture_max_bytes) if cfg.capture else None
        )
        self.reload: dict[str, Any] | None = None
        if alias_of(cfg.model) and cfg.reload_interval > 0:
            self.reload = {"following": cfg.model, "interval_s": cfg.reload_interval, "loads": 0,
                           "last_error": None, "checked_at": None}  # fmt: skip
            threading.Thread(target=self._follow, name="follow-alias", daemon=True).start()

    def _predictor(self, source: Any) -> Predictor:
        c = self.cfg
        return Predictor(source.model_dir, clips=c.clips, crops=c.crops, limits=c.limits)

    def _follow(self) -> None:
        """Poll the alias; load a version it moved to beside the served one, then swap. A version that fails
        to load leaves the old one serving, and is not retried until the alias moves again."""
        from finetune.registry import alias_of, alias_version, resolve_model

        assert self.reload is not None
        log = logging.getLogger("ray.serve")
        name, alias = alias_of(self.cfg.model) or ("", "")
        failed: str | None = None
        while True:
            time.sleep(self.cfg.reload_interval)
            try:
                version = alias_version(name, alias, self.cfg.tracking_uri or "")
            except Exception as e:  # the store is down: keep serving, say so
                self.reload["last_error"] = f"alias lookup failed: {type(e).__name__}: {e}"
                continue
            self.reload["checked_at"] = time.time()
            if version is None or version in (self.served.source.version, failed):
                continue
            try:
                src = resolve_model(f"models:/{name}/{version}", self.cfg.tracking_uri)
                self.served = Served(replace(src, source=self.cfg.model), self._predictor(src))
            except Exception as e:
                failed = version
                self.reload["last_error"] = f"version {version} did not load ({type(e).__name__}: {e})"
                log.warning("%s: %s; version %s goes on serving", self.cfg.model, self.reload["last_error"],
                            self.served.source.version)  # fmt: skip
                continue
            failed, self.reload["last_error"] = None, None
            self.reload["loads"] += 1
            log.warning("%s moved: now serving version %s", self.cfg.model, version)

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metadata")
    async def metadata(self, request: Request) -> dict[str, Any]:
        authorize(request, self.cfg.auth_token)
        c, served = self.cfg, self.served
        replica = serve.get_replica_context().replica_id.unique_id
        return {
            **served.predictor.describe(),
            "model": served.source.describe(),
            "auth": c.auth_token is not None,
            "reload": self.reload,
            "capture": self.capture.describe() if self.capture else None,
            "serving": {
                "replicas": c.replicas,
                "replica": replica,
                "max_batch_size": c.max_batch_size,
                "batch_wait_ms": c.batch_wait_ms,
                "max_ongoing_requests": c.ongoing,
                "max_upload_bytes": c.upload_limit,
                # this replica's batches so far: {route: {batch size (videos): count}}
                "batch_size_histogram": {
                    k: {str(n): m for n, m in sorted(v.items())} for k, v in self.batches.items()
                },
            },
        }

    @app.post("/predict")
    async def predict(self, request: Request) -> list[dict[str, Any]]:
        authorize(request, self.cfg.auth_token)
        k = top_k_param(request)
        served = self.served
        data = await read_video(request, self.cfg.upload_limit)
        if served.predictor.temporal:  # a whole video slid through a temporal model: its segments
            return (await asyncio.to_thread(served.predictor.segments, data))["segments"]
        views = await asyncio.to_thread(served.predictor.decode, data)  # decoding off the event loop
        probs = await self.predict_batch((served.predictor, views))
        top = served.predictor.answer(probs, k)
        if self.capture is not None:
            self.capture.offer(data, served.predictor.top(probs, 1)[0], served.source.version)
        return [{"label": t["label"], "score": t["score"]} for t in top]

    @app.post("/embed")
    async def embed(self, request: Request) -> dict[str, Any]:
        authorize(request, self.cfg.auth_token)
        served = self.served
        data = await read_video(request, self.cfg.upload_limit)
        views = await asyncio.to_thread(served.predictor.decode, data)
        emb = await self.embed_batch((served.predictor, views))
        return {"embedding": [round(float(x), 6) for x in emb.tolist()], "dim": int(emb.numel())}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)  # set from the config in __init__
    async def predict_batch(self, items: list[tuple[Predictor, torch.Tensor]]) -> list[torch.Tensor]:
        self.batches["predict"][len(items)] += 1
        return await asyncio.to_thread(by_predictor, items, False)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def embed_batch(self, items: list[tuple[Predictor, torch.Tensor]]) -> list[torch.Tensor]:
        self.batches["embed"][len(items)] += 1
        return await asyncio.to_thread(by_predictor, items, True)


# --------------------------------------------------------------------------------------------- driver


def build_app(cfg: ServeConfig) -> Any:
    """The Serve application: the deployment with replicas, concurrency and per-replica CPUs."""
    env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    if cfg.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = cfg.tracking_uri
    return VideoClassifierServer.options(
        num_replicas=cfg.replicas,
        max_ongoing_requests=cfg.ongoing,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "runtime_env": {"env_vars": env}},
    ).bind(cfg)


def start_ray(address: str | None) -> None:
    """Local Ray on every core, or join the cluster at `address` (the token-auth hint when refused); the
    job ships tubelet's packages, which every replica imports (Ray takes local code only at the job level)."""
    import ray

    from data_shards.execute import TOKEN_HINT
    from finetune.mlflow_model import code_paths

    if ray.is_initialized():
        return
    env = {"py_modules": code_paths()}
    if address is None:
        ray.init(
            num_cpus=os.cpu_count(), include_dashboard=False, runtime_env=env, logging_level=logging.WARNING
        )
        return
    try:
        ray.init(address=address, runtime_env=env, logging_level=logging.WARNING)
    except (ConnectionError, ray.exceptions.AuthenticationError) as e:
        raise ConnectionError(f"cannot join the Ray cluster at {address}: {e}\n{TOKEN_HINT}") from None


def run(cfg: ServeConfig, stop: threading.Event | None = None) -> None:
    """Deploy and serve until SIGINT/SIGTERM (or `stop`), then take the app (and a local Ray) down."""
    from ray import serve as rs

    from finetune.registry import REGISTRY_PREFIX, check_source, registry_store

    cfg.check()
    if cfg.model.startswith(REGISTRY_PREFIX):  # the replicas look it up in the store the driver found
        cfg.tracking_uri = registry_store(cfg.model, cfg.tracking_uri)
    what = check_source(cfg.model, cfg.tracking_uri)  # fail here, naming the source, not inside a replica
    if cfg.capture:  # likewise the capture destination: one that cannot be written failed every capture quietly
        storage.check_access(cfg.capture)  # an unsupported scheme, a missing bucket, refused credentials
        if not storage.is_url(cfg.capture):
            if Path(cfg.capture).exists() and not Path(cfg.capture).is_dir():
                raise ConfigError(f"--capture {cfg.capture}: a file, not a folder")
            storage.makedirs(cfg.capture)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and cfg.auth_token is None:
        print(
            f"[serve] warning: listening on {cfg.host} without --auth-token: anyone who reaches it can use it"
        )
    start_ray(cfg.ray_address)
    stop = stop or threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        rs.start(http_options={"host": cfg.host, "port": cfg.port})
        rs.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        base = f"http://{cfg.host}:{cfg.port}"
        print(f"[serve] {what} at {base}  ({cfg.replicas} replica(s), batches of <= {cfg.max_batch_size})")
        print(f"[serve] curl --data-binary @clip.mp4 '{base}/predict?top_k=3'   (Ctrl-C stops)", flush=True)
        stop.wait()
    finally:
        print("[serve] stopping", flush=True)
        if cfg.ray_address is None:
            import ray

            rs.shutdown()
            ray.shutdown()
        else:
            rs.delete(APP_NAME)

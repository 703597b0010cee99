"""The HTTP server: the Open Inference Protocol (KServe v2), image classification and Prometheus metrics.

`create_app(models, config)` returns a Starlette ASGI application; `build_models` opens each
artifact's engines first, so a bad artifact stops the server before it listens. Every user mistake
is answered with a 4xx JSON body `{"error": ...}` naming the problem, and the worker keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .artifact import Artifact, ArtifactError
from .batcher import BatcherClosedError, DynamicBatcher, QueueFullError
from .engine import Engine
from .engines import create_engine
from .errors import BatchSizeError, EngineLoadError, RuntimeInputError
from .metrics import ServerMetrics
from .preprocess import DEFAULT_MAX_PIXELS, ImageError, ImageTooLargeError, decode_image

LOG = logging.getLogger("vitsparse.serve")
SERVER_NAME = "vitsparse"
DATATYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64,
             "INT32": np.int32, "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}
RETRY_AFTER_SECONDS = 1


class ServeConfigError(RuntimeInputError):
    """Server settings that cannot work (a batch size below 1, a negative delay, ...)."""


@dataclass(frozen=True)
class ServeConfig:
    """How every model is served: engine, compiled batch sizes, batching delay, limits."""

    engine: str = "onnxruntime"
    batch_sizes: tuple[int, ...] = (1,)
    max_delay_ms: float = 5.0
    num_cores: int | None = None
    num_streams: int = 1  # batches run at once per model (DeepSparse's multi-stream scheduler)
    precision: str | None = None  # the float layers' precision hint (OpenVINO: f32 or bf16); None: f32
    max_queue: int = 64  # items waiting per model before requests get 503
    max_body_bytes: int = 32 * 2**20
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    top_k: int = 5

    def __post_init__(self) -> None:
        sizes = self.batch_sizes
        if not sizes or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in sizes):
            raise ServeConfigError(f"batch sizes must be positive integers, got {list(sizes)}")
        if len(set(sizes)) != len(sizes):
            raise ServeConfigError(f"batch sizes repeat: {list(sizes)}")
        if not math.isfinite(self.max_delay_ms) or self.max_delay_ms < 0:
            raise ServeConfigError(f"max_delay_ms must be >= 0, got {self.max_delay_ms}")
        for name in ("num_streams", "max_queue", "max_body_bytes", "max_image_pixels", "top_k"):
            if getattr(self, name) < 1:
                raise ServeConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < max(sizes):
            raise ServeConfigError(f"max_queue {self.max_queue} is below the largest batch size {max(sizes)}")


class HTTPError(Exception):
    """A request the server answers with `status` and `{"error": message}`; `kind` labels the metric."""

    def __init__(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


@dataclass
class ServedModel:
    """An artifact with its engines (one per compiled batch size) and its batcher."""

    artifact: Artifact
    engines: dict[int, Engine] = field(repr=False)
    batcher: DynamicBatcher = field(repr=False)

    @property
    def name(self) -> str:
        return self.artifact.name

    @property
    def engine(self) -> Engine:
        """The engine at the smallest batch size: every size shares its file, inputs and outputs."""
        return self.engines[min(self.engines)]

    @property
    def input_spec(self):
        return self.engine.inputs[0]

    @property
    def output_names(self) -> list[str]:
        return self.engine.output_names

    def metadata(self, config: ServeConfig) -> dict:
        """KServe v2 model metadata, with the engine, batching, preprocessing and sparsity as parameters."""
        engine = self.engine
        tensors = lambda specs: [{"name": s.name, "datatype": _v2_datatype(s.dtype),  # noqa: E731
                                  "shape": [-1, *(d if d is not None else -1 for d in s.shape[1:])]}
                                 for s in specs]
        prep = self.artifact.preprocessing
        return {"name": self.name, "versions": ["1"], "platform": "onnx",
                "inputs": tensors(engine.inputs), "outputs": tensors(engine.outputs),
                "parameters": {"engine": config.engine, "batch_sizes": sorted(self.engines),
                               "num_streams": self.batcher.streams,
                               "max_delay_ms": config.max_delay_ms,
                               "fraction_of_supported_ops": engine.fraction_of_supported_ops,
                               "preprocessing": dataclasses.asdict(prep),
                               "labels": len(self.artifact.labels) if self.artifact.labels else None,
                               "sparsity": self.artifact.sparsity_summary()}}


def build_models(artifacts: Sequence[Artifact], config: ServeConfig,
                 metrics: ServerMetrics) -> list[ServedModel]:
    """Compile every artifact at every batch size; ArtifactError or an engine error if one cannot serve."""
    names = [artifact.name for artifact in artifacts]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ArtifactError(f"two artifacts are named {', '.join(repeated)}; name them with NAME=DIR")
    if config.num_streams > 1 and len(config.batch_sizes) > 1:
        # measured (deit_small, DeepSparse, 2 cores): batch sizes 1,2,4,8 with 2 streams ran at 0.5x the
        # requests/sec of batch 1 with 2 streams; each engine seems to place its streams on the same cores
        LOG.warning("--num-streams %d with several batch sizes runs one engine per size, and concurrent "
                    "calls on different engines compete for the same cores; prefer --num-streams 1 with "
                    "batching, or --batch-sizes 1 with streams", config.num_streams)
    models = []
    for artifact in artifacts:
        engines = {size: _compile(artifact, config, size) for size in sorted(config.batch_sizes)}
        _check_servable(artifact, engines[min(engines)])

        def on_batch(size: int, seconds: float, name: str = artifact.name) -> None:
            metrics.batch_size.observe(size, model=name)
            metrics.engine_seconds.observe(seconds, model=name)

        batcher = DynamicBatcher(engines, max_delay=config.max_delay_ms / 1000, max_queue=config.max_queue,
                                 streams=config.num_streams, on_batch=on_batch)
        models.append(ServedModel(artifact, engines, batcher))
    return models


def _compile(artifact: Artifact, config: ServeConfig, batch_size: int) -> Engine:
    """The artifact's engine at `batch_size`; a file whose batch is baked in says how to re-export it."""
    try:
        return create_engine(config.engine, artifact.onnx_path, batch_size=batch_size,
                             num_cores=config.num_cores, num_streams=config.num_streams,
                             precision=config.precision)
    except (BatchSizeError, EngineLoadError) as exc:
        exported = artifact.meta.get("batch_size")
        if artifact.meta.get("dynamic_batch") or batch_size == exported:
            raise
        raise ArtifactError(f"{artifact.directory} was exported at batch {exported} and cannot run at batch "
                            f"{batch_size}; export it with ExportConfig(dynamic_batch=True) to serve batch "
                            f"sizes {','.join(map(str, config.batch_sizes))}") from exc


def _check_servable(artifact: Artifact, engine: Engine) -> None:
    """One image input of the preprocessed shape, and labels (if any) for every class."""
    if len(engine.inputs) != 1:
        raise ArtifactError(f"{artifact.directory}: the server runs models with one input, this one has "
                            f"{len(engine.inputs)}")
    shape = tuple(engine.inputs[0].shape[1:])
    if shape != artifact.preprocessing.input_size:
        raise ArtifactError(f"{artifact.directory}: model.onnx takes {list(shape)} but meta.json's "
                            f"preprocessing makes {list(artifact.preprocessing.input_size)}")
    classes = engine.outputs[0].shape[-1] if engine.outputs[0].shape else None
    if artifact.labels is not None and classes is not None and len(artifact.labels) != classes:
        raise ArtifactError(f"{artifact.directory}: meta.json lists {len(artifact.labels)} labels for "
                            f"{classes} classes")


def create_app(models: Sequence[ServedModel], config: ServeConfig,
               metrics: ServerMetrics | None = None) -> Starlette:
    """The ASGI application serving `models` (built by `build_models`) under `config`."""
    metrics = metrics or ServerMetrics()
    by_name = {model.name: model for model in models}
    state = {"ready": False}

    def model_of(request: Request) -> ServedModel:
        name = request.path_params["name"]
        if name not in by_name:
            raise HTTPError(404, f"unknown model {name!r}; this server has {', '.join(sorted(by_name))}",
                            "unknown_model")
        return by_name[name]

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": SERVER_NAME, "version": _version(), "extensions": ["classify"]})

    async def model_metadata(request: Request) -> Response:
        return JSONResponse(model_of(request).metadata(config))

    async def model_ready(request: Request) -> Response:
        model = model_of(request)
        return JSONResponse({"name": model.name, "ready": state["ready"]},
                            status_code=200 if state["ready"] else 503)

    async def infer(request: Request) -> Response:
        model = model_of(request)
        body = await _read_body(request, config.max_body_bytes)
        request_id, items, wanted = await run_in_threadpool(_parse_infer, body, model)
        outputs = await _submit(model, items)
        tensors = [{"name": n, "datatype": _v2_datatype(o.dtype), "shape": list(o.shape),
                    "data": o.reshape(-1).tolist()} for n, o in zip(model.output_names, outputs, strict=True)
                   if wanted is None or n in wanted]
        reply = {"model_name": model.name, "model_version": "1", "outputs": tensors}
        if request_id is not None:
            reply["id"] = request_id
        return JSONResponse(reply)

    async def classify(request: Request) -> Response:
        model = model_of(request)
        top_k = _top_k(request, config.top_k)
        body = await _read_body(request, config.max_body_bytes)
        pixels = await run_in_threadpool(_preprocess, body, model, config.max_image_pixels)
        logits = (await _submit(model, pixels[None]))[0][0]
        return JSONResponse({"model_name": model.name, "predictions": _top_predictions(logits, model, top_k)})

    async def prometheus(request: Request) -> Response:
        for model in models:
            metrics.queue_depth.set(model.batcher.queue_depth, model=model.name)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        for model in models:
            model.batcher.start()
        state["ready"] = True
        LOG.info("serving %s on %s", ", ".join(f"{m.name} (batch {sorted(m.engines)})" for m in models),
                 config.engine)
        try:
            yield
        finally:
            state["ready"] = False  # drain: finish what is queued, then stop the engines' threads
            await asyncio.gather(*(model.batcher.close() for model in models))

    handlers = [("/v2/health/live", live, "GET"), ("/v2/health/ready", ready, "GET"),
                ("/v2", server_metadata, "GET"), ("/v2/models/{name}", model_metadata, "GET"),
                ("/v2/models/{name}/ready", model_ready, "GET"), ("/v2/models/{name}/infer", infer, "POST"),
                ("/v2/models/{name}/classify", classify, "POST"), ("/metrics", prometheus, "GET")]
    routes = [Route(path, _measured(path, handler, metrics), methods=[method])
              for path, handler, method in handlers]

    async def http_exception(request: Request, exc: HTTPException) -> Response:
        metrics.requests.inc(route="other", status=exc.status_code)
        metrics.errors.inc(route="other", status=exc.status_code, error="no_route")
        return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}"},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_exception})
    app.state.models, app.state.metrics = by_name, metrics  # for embedding applications and tests
    return app


def _measured(route: str, handler: Callable[[Request], Awaitable[Response]], metrics: ServerMetrics):
    """The handler, answering HTTPError as JSON, any other failure as a 500, and counting every request."""

    async def endpoint(request: Request) -> Response:
        started = time.perf_counter()
        kind = None
        try:
            response = await handler(request)
        except HTTPError as exc:
            kind = exc.kind
            response = JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)
        except Exception:  # a bug or an engine failure: logged, answered, and the worker keeps serving
            LOG.exception("%s %s failed", request.method, request.url.path)
            kind = "internal"
            response = JSONResponse({"error": "internal server error (see the server log)"}, status_code=500)
        metrics.requests.inc(route=route, status=response.status_code)
        if kind is not None:
            metrics.errors.inc(route=route, status=response.status_code, error=kind)
        metrics.latency.observe(time.perf_counter() - started, route=route)
        return response

    return endpoint


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length", "")
    too_large = HTTPError(413, f"the request body is over the limit of {limit:,} bytes", "body_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _submit(model: ServedModel, items: np.ndarray) -> list[np.ndarray]:
    try:
        return await model.batcher.submit(items)
    except QueueFullError as exc:
        raise HTTPError(503, f"model {model.name!r} is at capacity ({exc}); retry shortly", "queue_full",
                        {"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
    except BatcherClosedError as exc:
        raise HTTPError(503, str(exc), "shutting_down", {"Retry-After": str(RETRY_AFTER_SECONDS)}) from None


def _parse_infer(body: bytes, model: ServedModel) -> tuple[object, np.ndarray, set[str] | None]:
    """A v2 infer request's id, its one input as an array of the compiled shape, and the outputs asked."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HTTPError(400, f"the body is not valid JSON: {exc}", "bad_json") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise HTTPError(400, 'the body must be a JSON object with an "inputs" list', "bad_request")
    spec = model.input_spec
    if len(request["inputs"]) != 1 or not isinstance(request["inputs"][0], dict):
        raise HTTPError(400, f"model {model.name!r} takes exactly one input, {spec.name!r}", "bad_request")
    tensor = request["inputs"][0]
    if tensor.get("name", spec.name) != spec.name:
        raise HTTPError(400, f"unknown input {tensor.get('name')!r}; the model's input is {spec.name!r}",
                        "bad_input")
    items = _tensor_array(tensor, spec, model.batcher.max_batch)
    wanted = request.get("outputs")
    if wanted is not None:
        if not isinstance(wanted, list) or not all(isinstance(o, dict) and "name" in o for o in wanted):
            raise HTTPError(400, '"outputs" must be a list of {"name": ...} objects', "bad_request")
        names = set(model.output_names)
        unknown = sorted({o["name"] for o in wanted} - names)
        if unknown:
            raise HTTPError(400, f"unknown output(s) {unknown}; the model has {sorted(names)}", "bad_input")
        wanted = {o["name"] for o in wanted}
    return request.get("id"), items, wanted


def _tensor_array(tensor: dict, spec, max_batch: int) -> np.ndarray:
    """A v2 input tensor (shape, datatype, row-major data) checked against the model's input."""
    expected = _v2_datatype(spec.dtype)
    if tensor.get("datatype") != expected:
        raise HTTPError(400, f"input {spec.name!r} has datatype {expected}, got {tensor.get('datatype')!r}",
                        "bad_input")
    shape = tensor.get("shape")
    want = [d for d in spec.shape[1:]]
    if (not isinstance(shape, list) or len(shape) != len(spec.shape)
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or list(shape[1:]) != want or not 1 <= shape[0] <= max_batch):
        raise HTTPError(400, f"input {spec.name!r} must have shape [n, {', '.join(map(str, want))}] with "
                             f"1 <= n <= {max_batch}, got {shape!r}", "bad_shape")
    try:
        data = np.asarray(tensor.get("data"), dtype=spec.dtype)
    except (TypeError, ValueError):
        raise HTTPError(400, f"input {spec.name!r}: data must be numbers ({expected})", "bad_input") from None
    if data.size != math.prod(shape):
        raise HTTPError(400, f"input {spec.name!r}: shape {shape} needs {math.prod(shape)} values, got "
                             f"{data.size}", "bad_shape")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise HTTPError(400, f"input {spec.name!r} holds NaN or infinite values", "bad_input")
    return np.ascontiguousarray(data.reshape(shape))


def _preprocess(body: bytes, model: ServedModel, max_pixels: int) -> np.ndarray:
    try:
        image = decode_image(body, max_pixels)
    except ImageTooLargeError as exc:
        raise HTTPError(413, str(exc), "image_too_large") from None
    except ImageError as exc:
        raise HTTPError(400, str(exc), "bad_image") from None
    return model.artifact.preprocessing.apply(image)


def _top_k(request: Request, default: int) -> int:
    raw = request.query_params.get("top_k", str(default))
    if not raw.isdigit() or int(raw) < 1:
        raise HTTPError(400, f"top_k must be a positive integer, got {raw!r}", "bad_request")
    return int(raw)


def _top_predictions(logits: np.ndarray, model: ServedModel, top_k: int) -> list[dict]:
    """The k most probable classes (softmax of the logits), best first, with labels where known."""
    shifted = np.exp(logits.astype(np.float64) - logits.max())
    probabilities = shifted / shifted.sum()
    best = np.argsort(-probabilities, kind="stable")[:top_k]
    labels = model.artifact.labels
    return [{"index": int(i), "label": labels[i] if labels else str(int(i)),
             "probability": float(probabilities[i])} for i in best]


def _v2_datatype(dtype: np.dtype) -> str:
    for name, numpy_type in DATATYPES.items():
        if np.dtype(numpy_type) == dtype:
            return name
    return str(dtype).upper()


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("vitsparse")
    except metadata.PackageNotFoundError:
        return "unknown"

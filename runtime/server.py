"""The HTTP server: the Open Inference Protocol (KServe v2), image classification and Prometheus metrics.

`create_app(models, config)` returns a Starlette ASGI application; `build_models` opens each
artifact's engines first, so a bad artifact stops the server before it listens. Every user mistake
is answered with a 4xx JSON body `{"error": ...}` naming the problem, and the worker keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.parser
import email.policy
import json
import logging
import math
import re
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
from .dynamic_batcher import BatcherClosedError, DynamicBatcher, QueueFullError
from .engine_base import Engine
from .engine_registry import create_engine
from .errors import BatchSizeError, EngineLoadError, RuntimeInputError, first_line
from .metrics import ServerMetrics
from .preprocess import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageFormatError,
    decode_image,
)

LOG = logging.getLogger("vitsparse.serve")
SERVER_NAME = "vitsparse"
DATATYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64,
             "INT32": np.int32, "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}
RETRY_AFTER_SECONDS = 1
TOP_K = re.compile(r"[0-9]{1,4}")  # ASCII digits only: str.isdigit() also takes '²' and '٣'
ECHOED_CHARACTERS = 64  # a client's model name or path is cut to this in error messages
JSON_TYPES = re.compile(r"application/(?:[\w.+-]+\+)?json", re.ASCII)


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
        for name in ("num_streams", "max_queue", "max_body_bytes", "max_image_pixels", "top_k", "num_cores"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ServeConfigError(f"{name} must be an integer >= 1, got {value!r}")
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
        # one engine per batch size, each with its own streams: the engines place their streams on the
        # same cores, so several sizes with several streams serve fewer requests/sec than one size
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
        if name not in by_name:  # the names are listed at /v2/models/{name} of each, not echoed here
            raise HTTPError(404, f"unknown model {_echo(name)}", "unknown_model")
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
        _require_json(request)
        body = await _read_body(request, config.max_body_bytes)
        request_id, items, wanted = await _in_worker(_parse_infer, body, model)
        del body
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
        pixels = await _in_worker(_preprocess, body, request.headers.get("content-type", ""), model,
                                  config.max_image_pixels)
        del body
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
        return JSONResponse({"error": f"{request.method} {_echo(request.url.path)}: {exc.detail}"},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_exception})
    app.router.redirect_slashes = False  # its redirect builds Location from the client's Host header
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


async def _in_worker(function: Callable, *args: object):
    """`function(*args)` in the thread pool. An HTTPError comes back as a fresh one: the raised one's
    traceback (and the one it replaced, kept as its context) holds the worker's frames, and with them the
    request body and its parsed arrays, in a reference cycle only the garbage collector would break."""
    result = await run_in_threadpool(_returning_errors, function, *args)
    if isinstance(result, _Refusal):
        raise HTTPError(result.status, result.message, result.kind, result.headers)
    return result


@dataclass(frozen=True)
class _Refusal:
    status: int
    message: str
    kind: str
    headers: dict[str, str]


def _returning_errors(function: Callable, *args: object):
    try:
        return function(*args)
    except HTTPError as exc:
        refusal = _Refusal(exc.status, exc.message, exc.kind, exc.headers)
    return refusal  # outside the except block: nothing here refers to the exception any more


def _echo(text: str) -> str:
    """Client text quoted for an error message, cut to ECHOED_CHARACTERS."""
    cut = text[:ECHOED_CHARACTERS]
    return repr(cut) + ("..." if len(text) > ECHOED_CHARACTERS else "")


def _require_json(request: Request) -> None:
    """415 for a body declared as anything but JSON (no Content-Type is taken as JSON)."""
    declared = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if declared and not JSON_TYPES.fullmatch(declared):
        raise HTTPError(415, f"the body must be JSON (Content-Type: application/json), got {_echo(declared)}",
                        "bad_content_type")


def _parse_infer(body: bytes, model: ServedModel) -> tuple[object, np.ndarray, set[str] | None]:
    """A v2 infer request's id, its one input as an array of the compiled shape, and the outputs asked."""
    try:
        request = json.loads(body)
    except RecursionError:
        raise HTTPError(400, "the body is not usable JSON: it nests too deep", "bad_json") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, or an integer over 4,300 digits
        raise HTTPError(400, f"the body is not valid JSON: {first_line(exc, 200)}", "bad_json") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise HTTPError(400, 'the body must be a JSON object with an "inputs" list', "bad_request")
    spec = model.input_spec
    if len(request["inputs"]) != 1 or not isinstance(request["inputs"][0], dict):
        raise HTTPError(400, f"model {model.name!r} takes exactly one input, {spec.name!r}", "bad_request")
    tensor = request["inputs"][0]
    if tensor.get("name", spec.name) != spec.name:
        raise HTTPError(400, f"unknown input {_echo(str(tensor.get('name')))}; the model's input is "
                             f"{spec.name!r}", "bad_input")
    items = _tensor_array(tensor, spec, model.batcher.max_batch)
    return request.get("id"), items, _wanted_outputs(request.get("outputs"), model.output_names)


def _wanted_outputs(wanted: object, names: list[str]) -> set[str] | None:
    """The output names a request's "outputs" asks for (None: all)."""
    if wanted is None:
        return None
    if not isinstance(wanted, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                               for o in wanted):
        raise HTTPError(400, '"outputs" must be a list of {"name": "..."} objects', "bad_request")
    asked = {o["name"] for o in wanted}
    unknown = sorted(asked - set(names))
    if unknown:
        shown = [name[:ECHOED_CHARACTERS] for name in unknown[:5]]
        raise HTTPError(400, f"unknown output(s) {shown}; the model has {sorted(names)}", "bad_input")
    return asked


def _tensor_array(tensor: dict, spec, max_batch: int) -> np.ndarray:
    """A v2 input tensor (shape, datatype, row-major data) checked against the model's input."""
    expected = _v2_datatype(spec.dtype)
    if tensor.get("datatype") != expected:
        raise HTTPError(400, f"input {spec.name!r} has datatype {expected}, got "
                             f"{_echo(str(tensor.get('datatype')))}", "bad_input")
    shape = tensor.get("shape")
    want = [d for d in spec.shape[1:]]
    if (not isinstance(shape, list) or len(shape) != len(spec.shape)
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or list(shape[1:]) != want or not 1 <= shape[0] <= max_batch):
        raise HTTPError(400, f"input {spec.name!r} must have shape [n, {', '.join(map(str, want))}] with "
                             f"1 <= n <= {max_batch}, got {_echo(str(shape))}", "bad_shape")
    values = _flat_numbers(tensor.get("data"), spec.name, max_depth=len(shape))
    if len(values) != math.prod(shape):
        raise HTTPError(400, f"input {spec.name!r}: shape {shape} needs {math.prod(shape)} values, got "
                             f"{len(values)}", "bad_shape")
    return _as_dtype(values, spec).reshape(shape)


def _flat_numbers(data: object, name: str, max_depth: int) -> list[int | float]:
    """The numbers of `data`, a list nested at most `max_depth` deep (walked without recursion); 400 for
    anything else in it (strings, booleans, nulls, objects)."""
    if not isinstance(data, list):
        raise HTTPError(400, f"input {name!r}: data must be a list of numbers", "bad_input")
    numbers: list[int | float] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if type(item) is list:
                if len(stack) >= max_depth:
                    raise HTTPError(400, f"input {name!r}: data nests deeper than its {max_depth} dimensions",
                                    "bad_input")
                stack.append(iter(item))
                break
            if type(item) not in (int, float):  # bool is an int subclass: refused here too
                raise HTTPError(400, f"input {name!r}: data must hold numbers only, got "
                                     f"{type(item).__name__} {_echo(json.dumps(item))}", "bad_input")
            numbers.append(item)
        else:
            stack.pop()
    return numbers


def _as_dtype(values: list[int | float], spec) -> np.ndarray:
    """`values` as the input's dtype; 400 for a value that type cannot hold."""
    try:
        wide = np.array(values, dtype=np.float64)
    except OverflowError:  # an integer literal past float64's range
        wide = np.array([math.inf])
    out_of_range = HTTPError(400, f"input {spec.name!r} holds NaN, infinite or out-of-range values for "
                                  f"{_v2_datatype(spec.dtype)}", "bad_input")
    dtype = np.dtype(spec.dtype)
    if not np.isfinite(wide).all():
        raise out_of_range
    if dtype.kind == "f":
        with np.errstate(over="ignore"):
            array = wide.astype(dtype)
        if not np.isfinite(array).all():
            raise out_of_range
        return array
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if (wide != np.round(wide)).any() or wide.min(initial=0) < info.min or wide.max(initial=0) > info.max:
            raise out_of_range
    return wide.astype(dtype)


def _preprocess(body: bytes, content_type: str, model: ServedModel, max_pixels: int) -> np.ndarray:
    """The model input of an uploaded image: raw file bytes, or the file part of a multipart form."""
    if content_type.split(";")[0].strip().lower() == "multipart/form-data":
        body = _multipart_file(body, content_type)
    try:
        image = decode_image(body, max_pixels)
        return model.artifact.preprocessing.apply(image)
    except ImageTooLargeError as exc:
        raise HTTPError(413, str(exc), "image_too_large") from None
    except UnsupportedImageFormatError as exc:
        raise HTTPError(415, str(exc), "unsupported_image") from None
    except ImageError as exc:
        raise HTTPError(400, str(exc), "bad_image") from None


def _multipart_file(body: bytes, content_type: str) -> bytes:
    """The uploaded file of a multipart/form-data body: the field named "file", or the only file part."""
    bad = HTTPError(400, 'the multipart body holds no single image: send it as the form field "file" '
                         "(curl -F file=@image.jpg)", "bad_multipart")
    try:
        header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
        parts = list(message.iter_parts()) if message.is_multipart() else []
    except (UnicodeError, ValueError, TypeError, LookupError):
        raise bad from None
    named = [part for part in parts if part.get_param("name", header="content-disposition") == "file"]
    files = named or [part for part in parts if part.get_filename() is not None]
    if len(files) != 1:
        raise bad
    payload = files[0].get_payload(decode=True)
    if not isinstance(payload, bytes):
        raise bad
    return payload


def _top_k(request: Request, default: int) -> int:
    raw = request.query_params.get("top_k", str(default))
    if not TOP_K.fullmatch(raw) or int(raw) < 1:
        raise HTTPError(400, f"top_k must be a positive integer of at most 4 digits, got {_echo(raw)}",
                        "bad_request")
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

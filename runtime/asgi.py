"""The server as an importable ASGI application, configured from the environment, for any ASGI server.

    VITSPARSE_ARTIFACTS=/srv/deit90 gunicorn -k uvicorn.workers.UvicornWorker vitsparse.runtime.asgi:app

`app` is built on first access (importing this module compiles nothing). Settings, each optional
but the first: VITSPARSE_ARTIFACTS (comma-separated DIR or NAME=DIR), VITSPARSE_ENGINE,
VITSPARSE_BATCH_SIZES (e.g. 1,8), VITSPARSE_MAX_DELAY_MS, VITSPARSE_NUM_CORES, VITSPARSE_NUM_STREAMS,
VITSPARSE_MAX_QUEUE.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from starlette.applications import Starlette

from .artifact import ArtifactError, load_artifact, parse_artifact_spec
from .availability import default_engine
from .metrics import ServerMetrics
from .server import ServeConfig, ServeConfigError, build_models, create_app

_APP: Starlette | None = None


def app_from_environment(env: Mapping[str, str] = os.environ) -> Starlette:
    """Open the artifacts VITSPARSE_ARTIFACTS names and return the application serving them."""
    specs = [spec.strip() for spec in env.get("VITSPARSE_ARTIFACTS", "").split(",") if spec.strip()]
    if not specs:
        raise ArtifactError("set VITSPARSE_ARTIFACTS to one or more artifact directories (comma-separated)")
    try:
        numbers = {"batch_sizes": tuple(int(b) for b in env.get("VITSPARSE_BATCH_SIZES", "1").split(",")),
                   "max_delay_ms": float(env.get("VITSPARSE_MAX_DELAY_MS", "5")),
                   "num_cores": int(env["VITSPARSE_NUM_CORES"]) if env.get("VITSPARSE_NUM_CORES") else None,
                   "num_streams": int(env.get("VITSPARSE_NUM_STREAMS", "1")),
                   "max_queue": int(env.get("VITSPARSE_MAX_QUEUE", "64"))}
    except ValueError as exc:
        raise ServeConfigError(f"a VITSPARSE_* setting is not a number: {exc}") from None
    config = ServeConfig(engine=env.get("VITSPARSE_ENGINE") or default_engine(), **numbers)
    artifacts = [load_artifact(path, name) for name, path in map(parse_artifact_spec, specs)]
    metrics = ServerMetrics()
    return create_app(build_models(artifacts, config, metrics), config, metrics)


def __getattr__(name: str) -> Starlette:
    global _APP
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _APP is None:
        _APP = app_from_environment()
    return _APP

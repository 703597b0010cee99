"""`vitsparse serve ARTIFACT_DIR ...`: serve exported models over HTTP with uvicorn (torch-free).

Every artifact is opened and compiled before the port opens, so a missing, incomplete or corrupt
artifact stops the command with one line. SIGTERM (or Ctrl-C) stops accepting connections, lets the
requests in flight finish (up to --graceful-timeout seconds), drains the queues, then exits 0.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal

from .artifact import load_artifact, parse_artifact_spec
from .availability import ENGINES, default_engine
from .metrics import ServerMetrics
from .preprocess import DEFAULT_MAX_PIXELS
from .server import ServeConfig, ServeConfigError, build_models, create_app

MAX_BODY_MB = 1024.0  # a body is held in memory whole: more than this is a typo, not a setting


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,8, got {text!r}") \
            from None


def configure_serve_parser(parser: argparse.ArgumentParser) -> None:
    """Add the serve flags."""
    parser.add_argument("artifacts", nargs="+", metavar="ARTIFACT_DIR",
                        help="exported artifact directories (NAME=DIR names the model; default: the "
                             "folder name)")
    parser.add_argument("--engine", choices=ENGINES, default=None,
                        help="engine (default: openvino-sparse where its kernels are built, else openvino, "
                             "else onnxruntime)")
    parser.add_argument("--precision", default=None,
                        help="precision of the float layers: f32, or bf16 on OpenVINO where the CPU has it "
                             "(default: f32)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--batch-sizes", type=_batch_sizes, default=(1,),
                        help="compiled batch sizes; requests are gathered up to the largest (default 1)")
    parser.add_argument("--max-delay-ms", type=float, default=5.0,
                        help="longest a request waits for others to join its batch (default 5)")
    parser.add_argument("--num-cores", type=int, default=None, help="cores per engine (default: all)")
    parser.add_argument("--num-streams", type=int, default=1,
                        help="batches run at once per model, the cores shared among them (default 1)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="items waiting per model before requests get 503 + Retry-After (default 64)")
    parser.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (default 32)")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"largest declared image size in pixels (default {DEFAULT_MAX_PIXELS:,})")
    parser.add_argument("--graceful-timeout", type=float, default=30.0,
                        help="seconds requests in flight get to finish on shutdown (default 30)")
    parser.add_argument("--log-level", default="info",
                        choices=("critical", "error", "warning", "info", "debug"))


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig the flags describe."""
    if not math.isfinite(args.max_body_mb) or not 0 < args.max_body_mb <= MAX_BODY_MB:
        raise ServeConfigError(f"--max-body-mb must be a number in (0, {MAX_BODY_MB:g}], got "
                               f"{args.max_body_mb}")
    if not math.isfinite(args.graceful_timeout) or args.graceful_timeout < 0:
        raise ServeConfigError(f"--graceful-timeout must be a number of seconds >= 0, got "
                               f"{args.graceful_timeout}")
    return ServeConfig(engine=args.engine or default_engine(), batch_sizes=args.batch_sizes,
                       max_delay_ms=args.max_delay_ms, num_cores=args.num_cores,
                       num_streams=args.num_streams, precision=args.precision, max_queue=args.max_queue,
                       max_body_bytes=int(args.max_body_mb * 2**20), max_image_pixels=args.max_image_pixels)


def run_serve(args: argparse.Namespace) -> int:
    """Open every artifact, compile its engines, then serve until SIGTERM or Ctrl-C; exit status 0."""
    import uvicorn

    config = serve_config(args)
    if not 0 < args.port < 65536:
        raise ServeConfigError(f"--port must be 1-65535, got {args.port}")
    artifacts = [load_artifact(path, name) for name, path in map(parse_artifact_spec, args.artifacts)]
    metrics = ServerMetrics()
    app = create_app(build_models(artifacts, config, metrics), config, metrics)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # uvicorn drains on SIGTERM, then raises SIGTERM again under the handler found here: make that a
    # clean return, so a drained shutdown exits 0 instead of dying by the signal
    signal.signal(signal.SIGTERM, _drained)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_timeout)
    return 0


def _drained(signum: int, frame: object) -> None:
    """What SIGTERM does once uvicorn has drained and handed it back: nothing; run_serve returns 0."""

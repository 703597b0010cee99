"""`vitsparse bench MODEL.onnx`: benchmark one engine with DeepSparse's benchmark flag names (torch-free).

bench/cli.py registers `configure_bench_parser` and `run_bench`; every user mistake raises a
ValueError or FileNotFoundError subclass, which that command line prints in one line.
"""

from __future__ import annotations

import argparse

from .atomic import write_json_atomic
from .availability import ENGINES, default_engine
from .benchmark import SCENARIOS, benchmark_model


def configure_bench_parser(parser: argparse.ArgumentParser) -> None:
    """Add the bench flags: the same short and long names as `deepsparse.benchmark`."""
    parser.add_argument("model_path", metavar="MODEL.onnx", help="ONNX file to benchmark")
    parser.add_argument("-e", "--engine", choices=ENGINES, default=None,
                        help="engine to run (default: openvino-sparse where its kernels are built, else "
                             "openvino, else onnxruntime)")
    parser.add_argument("--precision", default=None,
                        help="precision of the float layers: f32, or bf16 on OpenVINO where the CPU has it "
                             "(default: f32)")
    parser.add_argument("-b", "--batch_size", type=int, default=1, help="items per call (default 1)")
    parser.add_argument("-ncores", "--num_cores", type=int, default=None,
                        help="cores to run on (default: all physical cores)")
    parser.add_argument("-s", "--scenario", choices=tuple(SCENARIOS), default="sync",
                        help="sync: one stream, calls in sequence; async: several streams at once")
    parser.add_argument("-nstreams", "--num_streams", type=int, default=None,
                        help="concurrent streams for async; sync takes only 1 (default: -ncores, else the "
                             "CPU count, at least 2)")
    parser.add_argument("-t", "--time", type=float, default=10.0, help="seconds to time (default 10)")
    parser.add_argument("-w", "--warmup_time", type=float, default=2.0, help="warm-up seconds (default 2)")
    parser.add_argument("-x", "--export_path", default=None, help="write the result as JSON to this file")


def run_bench(args: argparse.Namespace) -> int:
    """Build the engine, time it, print a short summary and optionally write JSON; exit status 0."""
    engine = args.engine or default_engine()
    result = benchmark_model(args.model_path, engine, batch_size=args.batch_size, num_cores=args.num_cores,
                             scenario=args.scenario, num_streams=args.num_streams, seconds=args.time,
                             warmup_seconds=args.warmup_time, precision=args.precision)
    print(f"model: {args.model_path}")
    print(result.summary())
    if args.export_path:
        path = write_json_atomic(args.export_path, result.to_dict())
        print(f"wrote {path}")
    return 0

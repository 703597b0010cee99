"""`vitsparse eval ARTIFACT --data DIR`: the exported model's top-1/top-5 on an engine (torch-free).

bench/cli.py adds the PyTorch model's agreement where torch is installed; `python -m vitsparse.runtime
eval` runs without it.
"""

from __future__ import annotations

import argparse
import sys

from .artifact import load_artifact
from .atomic import write_json_atomic
from .availability import ENGINES, default_engine
from .evaluate import Reference, evaluate_artifact


def configure_eval_parser(parser: argparse.ArgumentParser) -> None:
    """Add the eval flags."""
    parser.add_argument("artifact", metavar="ARTIFACT_DIR", help="an exported artifact directory")
    parser.add_argument("--data", required=True, help="image folder: DIR/<class>/<image>.jpg|png")
    parser.add_argument("-e", "--engine", choices=ENGINES, default=None,
                        help="engine (default: openvino-sparse where its kernels are built, else openvino, "
                             "else onnxruntime)")
    parser.add_argument("--precision", default=None, help="f32, or bf16 on OpenVINO (default: f32)")
    parser.add_argument("-b", "--batch-size", type=int, default=16,
                        help="images per call for a dynamic-batch artifact (default 16)")
    parser.add_argument("-ncores", "--num-cores", type=int, default=None, help="cores (default: all)")
    parser.add_argument("-x", "--export-path", default=None, help="write the result as JSON to this file")


def run_eval(args: argparse.Namespace, reference_for=None) -> int:
    """Evaluate and print one summary line; `reference_for(artifact)` gives the PyTorch model, if any."""
    artifact = load_artifact(args.artifact)
    reference: Reference | None = reference_for(artifact) if reference_for else None
    result = evaluate_artifact(artifact, args.data, args.engine or default_engine(),
                               batch_size=args.batch_size, precision=args.precision,
                               num_cores=args.num_cores, reference=reference, progress=_progress)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    agreement = ("" if result.agreement is None
                 else f", same top-1 as PyTorch on {100 * result.agreement:.2f} %")
    print(f"{artifact.name} on {result.engine}: top-1 {100 * result.top1:.2f} %, top-5 "
          f"{100 * result.top5:.2f} % over {result.images} images ({len(result.skipped)} skipped: "
          f"not decodable){agreement}")
    if args.export_path:
        print(f"wrote {write_json_atomic(args.export_path, result.to_dict())}")
    return 0


def _progress(done: int, total: int) -> None:
    """A line rewritten in place on a terminal; a line per tenth of the images in a log."""
    if sys.stderr.isatty():
        print(f"\r  {done}/{total} images", end="", file=sys.stderr, flush=True)
    elif done == total or done % max(total // 10, 1) == 0:
        print(f"  {done}/{total} images", file=sys.stderr, flush=True)

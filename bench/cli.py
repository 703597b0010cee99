"""The `vitsparse` command line: one sub-command per job, kept in a registry."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Handler


COMMANDS: dict[str, Command] = {}


def command(
    name: str, help: str, configure: Callable[[argparse.ArgumentParser], None] = lambda p: None
) -> Callable[[Handler], Handler]:
    """Register a sub-command: `configure` adds its flags, the decorated function runs it."""

    def decorate(fn: Handler) -> Handler:
        COMMANDS[name] = Command(help, configure, fn)
        return fn

    return decorate


WORDS = {"true": True, "false": False, "none": None, "null": None}  # any case: timm reads 'false' as true


def parse_assignment(text: str) -> tuple[str, object]:
    """`key=value` with true/false/none in any case, a Python literal (numbers, tuples), else the string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected key=value with a Python identifier key, got {text!r}")
    if raw.strip().lower() in WORDS:
        return key, WORDS[raw.strip().lower()]
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw


def _model_kwargs_flag(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument(
        "--set",
        dest="model_kwargs",
        type=parse_assignment,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=help,
    )


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="timm ViT name (deit_small_patch16_224, ...) or built-in (digits-vit)")
    _model_kwargs_flag(parser, "timm keyword argument, repeatable (--set img_size=224)")
    parser.add_argument(
        "--pretrained",
        action="store_true",
        help="load pretrained weights (timm: needs network; digits-vit: trains once, cached)",
    )
    parser.add_argument("--checkpoint", help="local state dict (.safetensors, .pth) to load")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


@command("info", "trace a model and print its ViT structure, MACs and parameters", _model_flags)
def _info(args: argparse.Namespace) -> int:
    from vitsparse.compiler import count_costs, find_vit_structure, trace
    from vitsparse.models import build_model

    model = build_model(
        args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, **dict(args.model_kwargs)
    )
    gm = trace(model)
    structure, costs = find_vit_structure(gm), count_costs(gm)
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "depth": structure.depth,
                    "embed_dim": structure.embed_dim,
                    "num_prefix_tokens": structure.num_prefix_tokens,
                    "pool": structure.pool,
                    **costs.as_dict(),
                },
                indent=2,
            )
        )
    else:
        print(structure.describe())
        print(
            f"MACs per image: {costs.macs / 1e9:.3f} G (multiply-accumulates; DeiT/timm call these "
            f"FLOPs)\nparameters: {costs.params / 1e6:.3f} M ({costs.nonzero_params / 1e6:.3f} M non-zero)"
        )
    return 0


@command("env", "print library versions and which CPU engines can run here")
def _env(args: argparse.Namespace) -> int:
    import platform
    from importlib import metadata

    from vitsparse.runtime import ENGINES, default_engine, engine_status

    print(f"python {platform.python_version()} on {platform.machine()}")
    for package in ("torch", "timm", "onnx", "onnxruntime", "deepsparse", "openvino", "numpy"):
        try:
            print(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            print(f"{package} not installed")
    for name in ENGINES:
        status = engine_status(name)
        print(f"engine {name}: {'available' if status.available else 'unavailable'} ({status.reason})")
    if engine_status("openvino").available:
        from vitsparse.runtime.openvino_engine import cpu_capabilities

        print(f"openvino CPU capabilities: {', '.join(cpu_capabilities())} (bf16 needs BF16)")
    print(f"default engine: {default_engine()}")
    return 0


def _csv(cast: Callable[[str], object]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(cast(part) for part in text.split(",") if part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None

    return parse


def _speed_setting(text: str):
    from vitsparse.bench.methods import parse_speed_setting

    try:
        return parse_speed_setting(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _csv_or_none(cast: Callable[[str], object]) -> Callable[[str], tuple]:
    """A comma-separated list, or 'none' for an empty one."""
    return lambda text: () if text.strip().lower() == "none" else _csv(cast)(text)


METHODS_EPILOG = "<methods>"  # filled in only when the help is printed: the registry imports torch


class _MethodsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """prune-and-bench's help, its epilog listing every registered method's setting syntax."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34)

    def add_text(self, text: str | None) -> None:
        super().add_text(_methods_epilog() if text == METHODS_EPILOG else text)


def _methods_epilog() -> str:
    from vitsparse.bench.registry import SPECS

    grouped: dict[tuple[str, str], list[str]] = {}  # the mask saliencies share one syntax
    for name, spec in SPECS.items():
        grouped.setdefault((spec.summary, spec.example), []).append(name)
    lines = [f"  {'|'.join(names)}={summary}  e.g. {example}"
             for (summary, example), names in grouped.items()]
    return ("methods and their settings (--only METHOD=S1,S2; 'none' empties any list):\n"
            + "\n".join(lines))


def _bench_flags(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _MethodsHelpFormatter
    parser.epilog = METHODS_EPILOG
    parser.add_argument("--profile", choices=("default", "full"), default="default",
                        help="default: every method, ~12 min; full: hours")
    parser.add_argument("--only", action="append", default=[], metavar="METHOD[=SETTINGS]",
                        help="only these (repeatable; METHOD: its profile settings)")
    parser.add_argument("--skip", action="append", default=[], metavar="METHOD", help="leave a method out")
    parser.add_argument("--model", default="deit_small_patch16_224", help="ViT timed for speed")
    _model_kwargs_flag(parser, "timm keyword for the speed model (repeatable)")
    parser.add_argument("--pretrained", action="store_true", help="timm pretrained weights (needs network)")
    parser.add_argument("--checkpoint", metavar="FILE", help="local weights for the speed model")
    parser.add_argument("--calibration-data", type=Path, metavar="DIR",
                        help="image folder for the speed model's solvers")
    parser.add_argument("--epochs", type=int, help="epochs of every digits-vit fine-tune")
    parser.add_argument("--seeds", type=int, help="seeds per digits-vit row")
    parser.add_argument("--skip-accuracy", action="store_true", help="only the speed rows")
    parser.add_argument("-b", "--batch-sizes", type=_csv_or_none(int), metavar="B1,B2", help="e.g. 1,16")
    parser.add_argument("-e", "--engines", type=_csv_or_none(str), metavar="E1,E2",
                        help="engines (default: every one here + torch)")
    parser.add_argument("-t", "--time", type=float, dest="seconds_per_block", metavar="S",
                        help="seconds per timing block")
    parser.add_argument("--rounds", type=int, help="alternating timing rounds")
    parser.add_argument("-ncores", "--num-cores", type=int, metavar="N", help="cores for every engine")
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("bench/results"), metavar="DIR",
                        help="the run's folder goes under this one (default bench/results)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the closing line")


@command(
    "prune-and-bench", "prune with every method, export, and benchmark on CPU engines", _bench_flags
)
def _prune_and_bench(args: argparse.Namespace) -> int:
    from vitsparse.bench.workflow import BenchOptions, run_prune_and_bench

    run_prune_and_bench(
        BenchOptions(
            profile=args.profile,
            only=tuple(args.only),
            skip=tuple(args.skip),
            model=args.model,
            model_kwargs=dict(args.model_kwargs),
            pretrained=args.pretrained,
            checkpoint=args.checkpoint,
            calibration_data=args.calibration_data,
            batch_sizes=args.batch_sizes,
            engines=args.engines,
            seconds_per_block=args.seconds_per_block,
            rounds=args.rounds,
            num_cores=args.num_cores,
            epochs=args.epochs,
            seeds=args.seeds,
            output_dir=args.output_dir,
            accuracy=not args.skip_accuracy,
            quiet=args.quiet,
        )
    )
    return 0


def _prune_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="timm ViT name, digits-vit, or an artifact folder to prune further")
    parser.add_argument("--recipe", required=True, type=Path, help="recipe file (YAML or JSON; see recipes/)")
    parser.add_argument("--data", required=True, type=Path,
                        help="image folder with train/<class>/ and val/<class>/")
    parser.add_argument("-o", "--output", required=True, type=Path,
                        help="run folder (checkpoints, artifact, report)")
    _model_kwargs_flag(parser, "timm constructor argument, repeatable (--set drop_path_rate=0.1)")
    parser.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights")
    parser.add_argument("--checkpoint", help="start from a local state dict (.safetensors, .pth)")
    parser.add_argument("--replace-head", action="store_true",
                        help="give the model a new classifier for the data's classes")
    parser.add_argument("--resume", action="store_true", help="continue the run in OUTPUT where it stopped")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in OUTPUT")
    parser.add_argument("--epochs", type=int,
                        help="cap every training step at this many epochs (a quick trial)")
    parser.add_argument("--skip-speed", action="store_true", help="do not time the engines at the end")
    parser.add_argument("--engines", type=_csv(str), help="engines to time (default: every one installed)")
    parser.add_argument("-t", "--time", type=float, default=1.0, metavar="S",
                        help="seconds per timing block, per engine and model (default 1.0)")
    parser.add_argument("--device", help="train on this device (default: cuda when there is one, else cpu)")


@command("prune", "run a recipe file on your model and image folder: prune, fine-tune, export, report",
         _prune_flags)
def _prune(args: argparse.Namespace) -> int:
    from vitsparse.pruners.checkpoints import is_writer

    from .prune import PruneRequest, run_prune

    if args.epochs is not None and args.epochs < 0:
        raise ValueError(f"--epochs must be >= 0, got {args.epochs}")
    request = PruneRequest(model=args.model, recipe=args.recipe, data=args.data, out=args.output,
                           pretrained=args.pretrained, checkpoint=args.checkpoint,
                           model_kwargs=dict(args.model_kwargs), replace_head=args.replace_head,
                           resume=args.resume, overwrite=args.overwrite, epochs=args.epochs,
                           speed=not args.skip_speed, engines=args.engines, speed_seconds=args.time,
                           device=args.device,
                           progress=sys.stderr.isatty())
    result = run_prune(request)
    if not is_writer():  # under torchrun, rank 0 speaks for the run
        return 0
    print(f"top-1 on val: {100 * result.top1_before:.2f} % before, {100 * result.top1_after:.2f} % after; "
          f"artifact {result.artifact}")
    return 0


def _bench_engine_flags(parser: argparse.ArgumentParser) -> None:
    from vitsparse.runtime.bench_cli import configure_bench_parser

    configure_bench_parser(parser)


@command("bench", "benchmark one ONNX file on a CPU engine (DeepSparse's flags)", _bench_engine_flags)
def _bench(args: argparse.Namespace) -> int:
    from vitsparse.runtime.bench_cli import run_bench

    return run_bench(args)


def _serve_flags(parser: argparse.ArgumentParser) -> None:
    from vitsparse.runtime.serve_cli import configure_serve_parser

    configure_serve_parser(parser)


@command("serve", "serve exported models over HTTP: KServe v2, /classify, /metrics", _serve_flags)
def _serve(args: argparse.Namespace) -> int:
    from vitsparse.runtime.serve_cli import run_serve

    return run_serve(args)


def _verify_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifacts", nargs="+", metavar="ARTIFACT_DIR", help="exported artifact directories")


@command("verify", "check an artifact: model.onnx against its recipe replayed on its weights (needs torch)",
         _verify_flags)
def _verify(args: argparse.Namespace) -> int:
    from .verify import verify_artifact

    failed = 0
    for directory in args.artifacts:
        result = verify_artifact(directory)
        verdict = "ok" if result.passed else "FAILED"
        print(f"{verdict}: {result.directory}: model.onnx differs from the replayed recipe by "
              f"{result.max_abs_diff:.3g} (limit {result.limit:g})")
        failed += not result.passed
    return 1 if failed else 0


def _eval_flags(parser: argparse.ArgumentParser) -> None:
    from vitsparse.runtime.eval_cli import configure_eval_parser

    configure_eval_parser(parser)


@command("eval", "top-1/top-5 of an exported model on an engine over an image folder, as served",
         _eval_flags)
def _eval(args: argparse.Namespace) -> int:
    from vitsparse.runtime.eval_cli import run_eval

    try:
        from .verify import torch_reference
    except ModuleNotFoundError as err:  # a runtime-only install (requirements-runtime.txt) has no torch
        if (err.name or "").partition(".")[0] != "torch":
            raise
        print("vitsparse eval: torch is not installed; the PyTorch agreement is left out", file=sys.stderr)
        torch_reference = None
    return run_eval(args, reference_for=torch_reference)


def _load_test_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="deit_small_patch16_224", help="ViT to serve")
    _model_kwargs_flag(parser, "timm keyword argument for the model, repeatable")
    parser.add_argument("--pretrained", action="store_true", help="timm pretrained weights (needs network)")
    parser.add_argument("--checkpoint", help="local weights for the model")
    parser.add_argument("--masks", type=_csv(_speed_setting), default="0,0.9",
                        help="one artifact per setting: 0 = dense, else magnitude masks, SPARSITY or "
                             "SPARSITY@PATTERN (default 0,0.9; e.g. 0,0.9,0.9@1x4)")
    parser.add_argument("--artifacts", nargs="+", metavar="[NAME=]DIR",
                        help="serve these exported artifacts instead of building them")
    parser.add_argument("-e", "--engine", metavar="ENGINE",
                        help="engine of the servers (default: openvino-sparse where its kernels are built, "
                             "else openvino, else onnxruntime)")
    parser.add_argument("-c", "--concurrency", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("-t", "--time", type=float, default=20.0,
                        help="seconds measured per setting, over all rounds (default 20)")
    parser.add_argument("-w", "--warmup-time", type=float, default=2.0,
                        help="warm-up seconds before each setting's turn (default 2)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="the settings take turns this many times, -t/rounds seconds each (default 4)")
    parser.add_argument("--batch-sizes", type=_csv(int), default=(1, 2, 3, 4, 5, 6, 7, 8),
                        help="compiled batch sizes for dynamic batching (default 1-8: no batch is padded)")
    parser.add_argument("--max-delay-ms", type=float, default=10.0, help="batching delay (default 10)")
    parser.add_argument("-ncores", "--num-cores", type=int, help="cores per engine")
    parser.add_argument("-nstreams", "--num-streams", type=int, default=1,
                        help="batches each server runs at once (default 1)")
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("bench/results"),
                        help="the run's folder goes under this one (default bench/results)")


@command("load-test", "load-test `vitsparse serve` on loopback: batch-1 vs dynamic batching, dense vs masked",
         _load_test_flags)
def _load_test(args: argparse.Namespace) -> int:
    import datetime as dt
    import os

    from vitsparse.runtime import check_engine_spec, default_engine
    from vitsparse.runtime.artifact import parse_artifact_spec

    from .serve_load import LoadConfig, build_load_artifacts, load_test, summary, write_load_report

    config = LoadConfig(engine=args.engine or default_engine(), concurrency=args.concurrency,
                        seconds=args.time, warmup_seconds=args.warmup_time,
                        batch_sizes=tuple(args.batch_sizes), max_delay_ms=args.max_delay_ms,
                        num_cores=args.num_cores, num_streams=args.num_streams, rounds=args.rounds)
    check_engine_spec(config.engine)  # before minutes of building artifacts and starting servers
    started = dt.datetime.now()
    run_dir = args.output_dir / f"{started.strftime('%Y%m%d-%H%M%S')}-load"
    if args.artifacts:
        specs = [parse_artifact_spec(spec) for spec in args.artifacts]
        artifacts = {name or Path(path).resolve().name: Path(path) for name, path in specs}
    else:
        artifacts = build_load_artifacts(args.model, tuple(args.masks), run_dir / "artifacts",
                                         engine=config.engine, pretrained=args.pretrained,
                                         checkpoint=args.checkpoint,
                                         model_kwargs=dict(args.model_kwargs or {}))
    results = load_test(artifacts, config)
    meta = {"started": started.isoformat(timespec="seconds"), "model": args.model, "engine": config.engine,
            "concurrency": config.concurrency, "seconds": config.seconds,
            "warmup_seconds": config.warmup_seconds, "batch_sizes": list(config.batch_sizes),
            "max_delay_ms": config.max_delay_ms, "num_streams": config.num_streams, "rounds": config.rounds,
            "cpu_count": os.cpu_count(),
            "artifacts": {name: str(path) for name, path in artifacts.items()}}
    files = write_load_report(run_dir, meta, results)
    print("\n".join(summary(results)))
    for path in files.values():
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitsparse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        cmd.configure(sub.add_parser(name, help=cmd.help, description=cmd.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except (ValueError, OSError) as err:  # user mistakes, a missing file, a full disk: one line, no traceback
        print(f"vitsparse {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

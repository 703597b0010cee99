"""`python -m vitsparse.runtime serve|bench|eval ...`: the runtime's commands on a server without torch."""

from __future__ import annotations

import argparse
import sys

from .bench_cli import configure_bench_parser, run_bench
from .eval_cli import configure_eval_parser, run_eval
from .serve_cli import configure_serve_parser, run_serve

COMMANDS = {"serve": ("serve exported models over HTTP (KServe v2)", configure_serve_parser, run_serve),
            "bench": ("benchmark one ONNX file on a CPU engine", configure_bench_parser, run_bench),
            "eval": ("top-1/top-5 of an exported model over images", configure_eval_parser, run_eval)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vitsparse.runtime", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, configure, _) in COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except (ValueError, FileNotFoundError) as err:  # user mistakes: one line, no traceback
        print(f"vitsparse {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``resetnet`` command line. Each subcommand lives in its own module, imported on use.

A subcommand module provides ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "models": "resetnet.models.command",
    "train": "resetnet.train.command_train",
    "eval": "resetnet.train.command_eval",
    "reproduce": "resetnet.train.command_reproduce",
    "analyze": "resetnet.analysis.command",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resetnet", description="ReSet: dynamic recurrent routing in ResNet-like networks.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"resetnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("resetnet"):
                continue  # subcommand not present in this build
            raise
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

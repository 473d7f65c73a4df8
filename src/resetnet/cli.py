"""The ``resetnet`` command line. Each subcommand module, imported on use, provides ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``: the library's ``models``, ``train`` and ``eval``, and those
other packages add through the ``resetnet.commands`` entry point (the experiments' ``reproduce``, ``analyze``).

A user error (:class:`resetnet.errors.UserError`) ends a command with exit code 2 and one line on stderr,
``resetnet COMMAND: error: WHAT; FIX``, never a traceback; the ``resetnet`` logger prints on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from .errors import UsageError, UserError

COMMANDS = {"models": "resetnet.models.command", "train": "resetnet.train.command_train", "eval": "resetnet.train.command_eval"}
EXIT_BAD_INPUT = 2


def one_line(text: Any) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def fail(command: str | None, message: Any, code: int = EXIT_BAD_INPUT) -> int:
    """Print ``resetnet COMMAND: error: MESSAGE`` as one line on stderr; returns ``code``."""
    print(f"resetnet{' ' + command if command else ''}: error: {one_line(message)}", file=sys.stderr)
    return code


def check_output_file(path: str | os.PathLike[str], flag: str) -> Path:
    """Check, before any work, that ``path`` can be written: not a directory, in a writable directory that exists."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{flag} {p} is a directory; give a file path such as {p / 'eval.json'}")
    if p.parent.exists() and not p.parent.is_dir():
        raise UsageError(f"{flag} {p}: {p.parent} is not a directory; choose another path")
    if not p.parent.is_dir():
        raise UsageError(f"{flag} {p}: the directory {p.parent} does not exist; create it first or choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.probe-", dir=p.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"{flag} {p}: cannot write in {p.parent} ({err.strerror or err}); choose another path") from None
    return p


def write_output_file(path: Path, text: str, flag: str) -> None:
    """Write ``text`` to ``path`` atomically; a UsageError on failure."""
    from .checkpoint import atomic_write_bytes

    try:
        atomic_write_bytes(path, text.encode("utf-8"))
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot write the file ({err.strerror or err}); choose another path") from None


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``resetnet train: error: ... (see resetnet train --help)``."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        self.exit(EXIT_BAD_INPUT)


def _commands() -> dict[str, str]:
    from importlib.metadata import entry_points

    return {**COMMANDS, **{ep.name: ep.value for ep in entry_points(group="resetnet.commands")}}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="resetnet", description="ReSet: dynamic recurrent routing in ResNet-like networks.")
    parser.add_argument("--version", action="version", version=f"resetnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module_name in _commands().items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:  # an optional plug-in that cannot load must not break the library's commands
            logging.getLogger("resetnet").debug("command %s unavailable: %s", name, err)
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each record (tests and notebooks replace it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _log_to_stderr() -> None:
    logger = logging.getLogger("resetnet")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    _log_to_stderr()
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"resetnet {args.command}: interrupted", file=sys.stderr)
        return 130
    except UserError as err:  # a command that let a user error through: still one line, exit 2
        return fail(args.command, err)


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``resetnet`` command line. Each subcommand lives in its own module, imported on use.

A subcommand module provides ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``.

Every user error (a bad argument, config, dataset, checkpoint, output path or a locked run
directory) ends the command with exit code 2 and one line on stderr,
``resetnet COMMAND: error: WHAT; FIX``, never a traceback. :func:`main` turns the library's
error types (:data:`user_errors`) into that line as a last resort; the commands also use
:func:`fail`, :func:`resolve_device`, :func:`check_output_file` and
:func:`load_checkpoint_model` to check their inputs before doing any work.
"""
from __future__ import annotations

import argparse
import importlib
import os
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

COMMANDS = {
    "models": "resetnet.models.command",
    "train": "resetnet.train.command_train",
    "eval": "resetnet.train.command_eval",
    "reproduce": "resetnet.train.command_reproduce",
    "analyze": "resetnet.analysis.command",
}

#: Exit code of every user error (bad input: arguments, config, data, checkpoint, output path, lock).
EXIT_BAD_INPUT = 2


class UsageError(ValueError):
    """A command-line value is unusable (a device that is not there, an output path that cannot be written)."""


# ----------------------------------------------------------------------------- reporting
def one_line(text: Any) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def fail(command: str | None, message: Any, code: int = EXIT_BAD_INPUT) -> int:
    """Print ``resetnet COMMAND: error: MESSAGE`` as one line on stderr; returns ``code``."""
    prog = f"resetnet {command}" if command else "resetnet"
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return code


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input (reported as one line, exit 2)."""
    types: list[type[BaseException]] = [UsageError]
    for module, names in (("resetnet.train.config", ("ConfigError",)), ("resetnet.data", ("DataError",)),
                          ("resetnet.train.checkpoint", ("CheckpointError",)), ("resetnet.train.runlock", ("RunDirError",))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        types += [t for t in (getattr(mod, n, None) for n in names) if isinstance(t, type) and issubclass(t, BaseException)]
    return tuple(types)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): ``resetnet train: error: ...; see resetnet train --help``."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        self.exit(EXIT_BAD_INPUT)


# ----------------------------------------------------------------------------- input checks
def resolve_device(text: str, flag: str = "--device"):
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N``, ...; a UsageError when
    the name is not a device or the device is not on this machine."""
    import torch

    text = (text or "auto").strip()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {text!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {text}: CUDA is not available on this machine (torch {torch.__version__}); use --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"{flag} {text}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1}); choose one of them")
        return device
    backend = {"mps": getattr(torch.backends, "mps", None), "xpu": getattr(torch, "xpu", None)}.get(device.type)
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        raise UsageError(f"{flag} {text}: device type {device.type!r} is not available here; use auto, cpu or cuda")
    return device


def check_output_file(path: str | os.PathLike[str], flag: str) -> Path:
    """Check, before any work, that ``path`` can be written: not a directory, its directory exists and is writable."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{flag} {p} is a directory; give a file path such as {p / 'eval.json'}")
    parent = p.parent
    if not parent.exists():
        raise UsageError(f"{flag} {p}: the directory {parent} does not exist; create it first or choose another path")
    if not parent.is_dir():
        raise UsageError(f"{flag} {p}: {parent} is not a directory; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"{flag} {p}: cannot write in {parent} ({err.strerror or err}); choose another path") from None
    return p


def write_output_file(path: Path, text: str, flag: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file and rename); a UsageError on failure."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise UsageError(f"{flag} {path}: cannot write the file ({err.strerror or err}); choose another path") from None


_ACCEPTED = "a run directory or a .safetensors checkpoint written by resetnet train"
_KINDS = {".yaml": "a config file", ".yml": "a config file", ".jsonl": "a metrics log", ".md": "a report",
          ".png": "an image", ".pt": "a PyTorch file; resetnet checkpoints are safetensors", ".pth": "a PyTorch file; resetnet checkpoints are safetensors",
          ".ckpt": "not a safetensors file", ".bin": "not a safetensors file"}


def _checkpoint_error(message: str) -> BaseException:
    try:
        from .train.checkpoint import CheckpointError
    except ImportError:  # pragma: no cover - a stand-in module without it
        return UsageError(message)
    return CheckpointError(message)


def check_checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """``path`` must be a run directory, a ``.safetensors`` file or a ``checkpoint.json``; else a CheckpointError saying what is accepted."""
    p = Path(path).expanduser()
    if not p.exists() and p.name == "checkpoint.safetensors" and p.parent.is_dir():
        return p  # names DIR's current checkpoint (the reader resolves it, or says there is none)
    if not p.exists():
        raise _checkpoint_error(f"no checkpoint at {p}: no such file or directory; give {_ACCEPTED}")
    if p.is_dir():
        return p
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return p
    if suffix == ".json":
        import json

        try:
            meta = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise _checkpoint_error(f"{p} is not a checkpoint (not readable JSON: {err}); give {_ACCEPTED}") from None
        if isinstance(meta, dict) and isinstance(meta.get("tensors"), dict) and "config" in meta:
            return p
        raise _checkpoint_error(f"{p} is not a checkpoint (a JSON file, but not a resetnet checkpoint.json); give {_ACCEPTED}")
    kind = _KINDS.get(suffix, f"a {suffix} file" if suffix else "a file without the .safetensors suffix")
    raise _checkpoint_error(f"{p} is not a checkpoint ({kind}); give {_ACCEPTED}")


def load_checkpoint_model(path: str | os.PathLike[str], device: Any = "cpu") -> tuple[Any, dict]:
    """``resetnet.train.checkpoint.load_model`` for the command line: every failure is a CheckpointError with
    a one-line message (not a checkpoint, unreadable or torn file, a model or overrides this version cannot
    build, weights that do not fit the model)."""
    p = check_checkpoint_path(path)
    ck = importlib.import_module("resetnet.train.checkpoint")
    if not (hasattr(ck, "read_checkpoint") and hasattr(ck, "load_weights")):  # a minimal stand-in module
        return ck.load_model(str(path), device=str(device))
    CheckpointError = ck.CheckpointError
    from .models import create_model

    bad_file: tuple[type[BaseException], ...] = (OSError, ValueError, struct.error, KeyError, TypeError, IndexError)
    try:
        from safetensors import SafetensorError

        bad_file += (SafetensorError,)
    except ImportError:  # pragma: no cover
        pass
    try:
        ckpt = ck.read_checkpoint(p)
    except CheckpointError:
        raise
    except bad_file as err:
        raise CheckpointError(f"{p} is not a readable checkpoint ({type(err).__name__}: {one_line(err)}); the file is truncated, "
                              f"corrupt or not written by resetnet train: give {_ACCEPTED}") from None
    model_cfg = (ckpt.meta.get("config") or {}).get("model") or {}
    name = model_cfg.get("name") if isinstance(model_cfg, dict) else None
    overrides = (model_cfg.get("overrides") or {}) if isinstance(model_cfg, dict) else {}
    if not name:
        raise CheckpointError(f"checkpoint {ckpt.path} does not say which model it holds (no model name in its metadata); give {_ACCEPTED}")
    what = f"model {name!r}" + (f" with overrides {overrides}" if overrides else "")
    try:
        if not isinstance(overrides, dict):
            raise TypeError(f"overrides must be a mapping, got {overrides!r}")
        model = create_model(str(name), **overrides)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise CheckpointError(f"checkpoint {ckpt.path} holds {what}, which this resetnet cannot build ({one_line(err)}); "
                              "use the resetnet version that wrote it, or retrain") from None
    report = ck.load_weights(model, ckpt, strict=False)
    if any(report.values()):
        parts = [f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})"
                 for label, keys in (("missing", report["missing"]), ("unexpected", report["unexpected"]), ("shape-mismatched", report["mismatched"])) if keys]
        raise CheckpointError(f"checkpoint {ckpt.path}: its weights do not fit {what}: {'; '.join(parts)}; the file was modified "
                              "or written by another resetnet version: use that version, or retrain")
    return model.to(device).eval(), ckpt.meta


# ----------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="resetnet", description="ReSet: dynamic recurrent routing in ResNet-like networks.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"resetnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
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
        more = "; the run directory keeps its last checkpoint (if any): rerun with --resume to continue" if args.command == "train" else ""
        print(f"resetnet {args.command}: interrupted{more}", file=sys.stderr)
        return 130
    except user_errors() as err:  # a command that let a user error through: still one line, exit 2
        return fail(args.command, err)


if __name__ == "__main__":
    raise SystemExit(main())

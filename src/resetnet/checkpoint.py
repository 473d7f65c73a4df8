"""Checkpoints: tensors in safetensors, everything else in JSON. Never pickle.

A run directory holds one committed checkpoint, a *pair* plus a pointer:

* ``checkpoint-<step>-<id>.safetensors``: every tensor. Keys are prefixed:
  ``model/<state_dict key>`` (weights and buffers), ``optim/<param index>/<state key>``
  (optimizer state tensors such as ``momentum_buffer``, ``exp_avg``, ``step``) and
  ``aux/<name>/<state_dict key>`` (other stateful modules, e.g. the skip-reward baseline).
  Its safetensors metadata repeats the model name, overrides, step and a save id, so a
  lone ``.safetensors`` file can still rebuild its model.
* ``checkpoint-<step>-<id>.json``: the config, step, epoch, optimizer hyper-parameters and
  scalar state, schedule values, loader position, RNG states (base64), best metrics, and
  ``tensors: {file, sha256, bytes, save_id}`` naming the safetensors file it belongs to.
* ``checkpoint.json`` (:data:`CHECKPOINT_JSON`): the pointer, a copy of the current pair's
  JSON. Replacing it is the commit of a save.

A save writes the new pair (each file: temporary file in the same directory, fsync,
``os.replace``), then replaces the pointer the same way, then deletes the older pairs. A
crash at any point leaves the previous pointer and its pair intact, or the new ones. A
reader recomputes the SHA-256 of the tensors file named by the pointer; when the pointer
is missing, unreadable or names a torn pair, it falls back to the newest complete,
verified ``checkpoint-*.json`` pair and says so with a :class:`CheckpointWarning`.
``DIR/checkpoint.safetensors`` (:data:`CHECKPOINT_TENSORS`) is accepted as a name for
"the current checkpoint's tensors" of ``DIR``; run directories written by earlier
versions (``checkpoint.safetensors`` + ``checkpoint.json``) still load.

A save refuses NaN/Inf model or optimizer tensors (:class:`NonFiniteTensors`, nothing
written) and :func:`load_weights` refuses a checkpoint with non-finite model tensors.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import struct
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .errors import CheckpointError

__all__ = [
    "CHECKPOINT_JSON", "CHECKPOINT_TENSORS", "FORMAT", "CheckpointError", "NonFiniteTensors", "CheckpointWarning",
    "Checkpoint", "save_checkpoint", "read_checkpoint", "checkpoint_exists", "checkpoint_tensors", "nonfinite_tensors",
    "rng_state", "set_rng_state", "optimizer_to_parts", "optimizer_from_parts", "load_weights",
    "atomic_write_bytes",
]

#: The pointer of a run directory: a copy of the current pair's JSON (config, step, ...).
CHECKPOINT_JSON = "checkpoint.json"
#: ``DIR/checkpoint.safetensors`` names the current checkpoint's tensors of ``DIR`` (the file
#: itself is ``checkpoint-<step>-<id>.safetensors``; earlier versions wrote this name).
CHECKPOINT_TENSORS = "checkpoint.safetensors"
FORMAT = "resetnet-checkpoint/1"
_PAIR = re.compile(r"^checkpoint-\d+-[0-9a-f]{8}\.(?:safetensors|json)$")
_TEMP = re.compile(r"^\.checkpoint.*\.tmp-\d+-[0-9a-f]{8}$")
_ACCEPTED = "pass a run directory or a .safetensors checkpoint written by resetnet train"
#: Files people give instead of a checkpoint, by suffix: named in the error.
_NOT_CHECKPOINTS = {".yaml": "a config file", ".yml": "a config file", ".jsonl": "a metrics log", ".md": "a report", ".png": "an image",
                    ".txt": "a .txt file", ".csv": "a table", ".npy": "a numpy array", ".npz": "numpy arrays"}


class NonFiniteTensors(CheckpointError):
    """Tensors to save (or load) hold NaN/Inf; ``names`` lists them (prefixed keys)."""

    def __init__(self, message: str, names: list[str], total: int) -> None:
        super().__init__(message)
        self.names = names
        self.total = total


class CheckpointWarning(UserWarning):
    """A run directory's current checkpoint was unusable; an earlier complete pair was read."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``meta`` (the JSON) and ``tensors`` (CPU tensors by prefixed key)."""

    meta: dict
    tensors: dict[str, torch.Tensor]
    path: Path
    metadata: dict[str, str] = field(default_factory=dict)

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under ``prefix/`` with the prefix removed (``section("model")`` is a state dict)."""
        p = prefix.rstrip("/") + "/"
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}

    @property
    def model_state(self) -> dict[str, torch.Tensor]:
        return self.section("model")


# ----------------------------------------------------------------------------- files
def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, os.replace).

    Raises ``OSError`` (the temporary file removed, ``path`` untouched) when it cannot.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            if os.path.lexists(tmp):
                os.unlink(tmp)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make renames and unlinks in ``directory`` durable (best effort: not every OS allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _pair_files(run_dir: Path) -> list[Path]:
    try:
        return [p for p in run_dir.iterdir() if _PAIR.match(p.name)]
    except OSError:
        return []


def checkpoint_exists(out_dir: str | os.PathLike[str]) -> bool:
    """Whether ``out_dir`` holds a checkpoint: its pointer, or a pair (both files) to fall back on."""
    out_dir = Path(out_dir)
    if (out_dir / CHECKPOINT_JSON).is_file():
        return True
    return any(p.suffix == ".json" and p.with_suffix(".safetensors").is_file() for p in _pair_files(out_dir))


def _sniff(blob: bytes) -> str:
    """What a file that is not safetensors looks like, for the error message."""
    if not blob:
        return "it is an empty file"
    if blob[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "it starts with a zip header, as torch.save .pt/.pth files do"
    if blob[:1] == b"\x80" and blob[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "it starts with a pickle header, as torch.save and pickle files do; resetnet never unpickles"
    if blob[:6] == b"\x93NUMPY":
        return "it is a numpy .npy file"
    if blob.lstrip()[:1] in (b"{", b"["):
        return "it looks like JSON text"
    if len(blob) < 8:
        return f"it is only {len(blob)} bytes long"
    return "its first 8 bytes are not the length of a JSON header that fits in the file"


def _not_safetensors(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a resetnet checkpoint: it is not a safetensors file ({reason}); {_ACCEPTED}")


def _parse_header(blob: bytes, path: Path) -> dict[str, str]:
    """Validate the safetensors framing (8-byte little-endian length, a JSON object within the file)
    and return its ``__metadata__``; :class:`CheckpointError` for anything else."""
    if len(blob) < 10:
        raise _not_safetensors(path, _sniff(blob))
    (n,) = struct.unpack("<Q", blob[:8])
    if n < 2 or n > len(blob) - 8 or blob[8:9] != b"{":
        raise _not_safetensors(path, _sniff(blob))
    try:
        header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    except ValueError:  # UnicodeDecodeError and JSONDecodeError
        raise _not_safetensors(path, "its header is not valid JSON") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(header, dict) or not isinstance(metadata or {}, dict):
        raise _not_safetensors(path, "its header is not a JSON object of tensors")
    return {str(k): str(v) for k, v in (metadata or {}).items()}


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise CheckpointError(f"no checkpoint at {path} (a directory without {CHECKPOINT_JSON})") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None


def _read_json(path: Path) -> dict:
    raw = _read_bytes(path)
    try:
        meta = json.loads(raw.decode("utf-8"))
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError
        raise CheckpointError(f"{path} is not valid JSON ({err}): not a resetnet checkpoint JSON; {_ACCEPTED}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tensors"), dict) or not isinstance(meta["tensors"].get("file"), str):
        raise CheckpointError(f"{path} is not a checkpoint (a JSON file, but not a resetnet checkpoint.json: no tensors.file entry); {_ACCEPTED}")
    name = meta["tensors"]["file"]
    if not name or Path(name).name != name:
        raise CheckpointError(f"{path} names the tensors file {name!r}, which is not a plain file name")
    return meta


# ----------------------------------------------------------------------------- RNG
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """torch CPU and CUDA generator states, base64-encoded (the trainer uses no numpy/python RNG)."""
    state: dict[str, Any] = {"torch_cpu": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch_cpu"]))
    cuda = state.get("torch_cuda")
    if cuda and torch.cuda.is_available():
        states = [_unb64(s) for s in cuda]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:
            for i, s in enumerate(states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


# ----------------------------------------------------------------------------- optimizer
def optimizer_to_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (``optim/<i>/<key>``) and a JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim/{idx}/{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"class": type(optimizer).__name__, "param_groups": groups, "scalar_state": scalars}


def optimizer_from_parts(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Inverse of :func:`optimizer_to_parts`: load the state into ``optimizer``."""
    if meta.get("class") not in (None, type(optimizer).__name__):
        raise CheckpointError(f"checkpoint optimizer is {meta['class']}, the config builds {type(optimizer).__name__}")
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, name = key.split("/", 2)
        state.setdefault(int(idx), {})[name] = v
    for idx, st in meta.get("scalar_state", {}).items():
        state.setdefault(int(idx), {}).update(st)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------- finiteness
def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of the floating-point tensors holding NaN/Inf, in ``tensors``' order.

    One fused check per device: ``isfinite(t).all()`` of every tensor stacked into one
    vector, read back with a single host synchronisation.
    """
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        if torch.is_tensor(t) and (t.is_floating_point() or t.is_complex()) and t.device.type != "meta":
            by_device.setdefault(t.device, []).append((key, t))
    bad: set[str] = set()
    with torch.no_grad():
        for items in by_device.values():
            ok = torch.stack([torch.isfinite(t).all() for _, t in items]).tolist()
            bad.update(key for (key, _), good in zip(items, ok) if not good)
    return [k for k in tensors if k in bad]


def _describe(names: list[str], total: int, what: str) -> str:
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} of {total} {what} hold NaN/Inf (first: {shown})"


def checkpoint_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, aux: Mapping[str, nn.Module] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores, by prefixed key, where they live (no copies)."""
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    if optimizer is not None:
        tensors.update(optimizer_to_parts(optimizer)[0])
    for name, module in (aux or {}).items():
        tensors.update({f"aux/{name}/{k}": v for k, v in module.state_dict().items()})
    return tensors


# ----------------------------------------------------------------------------- save / read
def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def _step_tag(step: Any) -> int:
    try:
        return max(int(step), 0)
    except (TypeError, ValueError):
        return 0


def _remove_stale(out_dir: Path, keep: Iterable[str]) -> None:
    """After a commit: delete older pairs, a legacy ``checkpoint.safetensors`` and temporary
    files of interrupted saves (best effort; JSON before tensors, so no JSON outlives its tensors)."""
    keep = set(keep)
    try:
        names = [p.name for p in out_dir.iterdir()]
    except OSError:
        return
    stale = [n for n in names if n not in keep and (_PAIR.match(n) or _TEMP.match(n) or n == CHECKPOINT_TENSORS)]
    for name in sorted(stale, key=lambda n: not n.endswith(".json")):
        with contextlib.suppress(OSError):
            os.unlink(out_dir / name)
    if stale:
        _fsync_dir(out_dir)


def save_checkpoint(
    out_dir: str | os.PathLike[str],
    model: nn.Module,
    meta: Mapping[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    aux: Mapping[str, nn.Module] | None = None,
    check_finite: bool = True,
) -> Path:
    """Write a checkpoint into ``out_dir`` and make it the current one; returns the pointer path.

    ``meta`` must be JSON-serialisable (it should hold ``config``, a dict or a typed config, and
    ``step``); the optimizer's hyper-parameters and scalar state are added under ``optimizer``. Writes
    ``checkpoint-<step>-<id>.safetensors`` and ``.json``, then replaces ``checkpoint.json``
    (the commit), then deletes older pairs; the previous checkpoint stays readable until
    the commit. Raises, with nothing replaced: :class:`NonFiniteTensors` (with
    ``check_finite``, a model/optimizer/aux tensor holds NaN/Inf), ``ValueError`` (``meta``
    is not JSON) and :class:`CheckpointError` (the disk refuses: full, read-only, ...).
    """
    from safetensors.torch import save as st_save

    out_dir = Path(out_dir)
    meta = dict(meta)
    if hasattr(meta.get("config"), "to_dict"):
        meta["config"] = meta["config"].to_dict()
    live = checkpoint_tensors(model, optimizer, aux)
    if check_finite:
        bad = nonfinite_tensors(live)
        if bad:
            kept = "the previous checkpoint was kept" if checkpoint_exists(out_dir) else "nothing was written"
            raise NonFiniteTensors(f"not saving a checkpoint in {out_dir}: {_describe(bad, len(live), 'tensors')}; {kept}", bad, len(live))
    tensors = {k: _cpu(v) for k, v in live.items()}
    meta = dict(meta)
    if optimizer is not None:
        meta["optimizer"] = optimizer_to_parts(optimizer)[1]
    save_id = uuid.uuid4().hex
    cfg = meta.get("config") or {}
    model_cfg = cfg.get("model", {})
    metadata = {
        "format": FORMAT,
        "save_id": save_id,
        "step": str(meta.get("step", "")),
        "model_name": str(model_cfg.get("name", getattr(model, "model_name", ""))),
        "model_overrides": json.dumps(model_cfg.get("overrides", {})),
    }
    blob = st_save(tensors, metadata=metadata)
    stem = f"checkpoint-{_step_tag(meta.get('step'))}-{save_id[:8]}"
    meta.update(
        format=FORMAT,
        saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        torch_version=torch.__version__,
        tensors={"file": f"{stem}.safetensors", "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob), "save_id": save_id},
    )
    text = json.dumps(meta, indent=1, allow_nan=False).encode("utf-8")  # fails before anything is written
    pair = [out_dir / f"{stem}.safetensors", out_dir / f"{stem}.json"]
    pointer = out_dir / CHECKPOINT_JSON
    target = out_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for target, data in ((pair[0], blob), (pair[1], text), (pointer, text)):
            atomic_write_bytes(target, data)
    except OSError as err:  # the pointer was not replaced: drop what exists of the new pair
        for p in reversed(pair):
            with contextlib.suppress(OSError):
                p.unlink(missing_ok=True)
        reason = err.strerror or str(err) or type(err).__name__
        kept = "the previous checkpoint was kept" if checkpoint_exists(out_dir) else "no checkpoint was written"
        what = "creating" if target == out_dir else "writing"
        raise CheckpointError(f"cannot save the checkpoint of step {meta.get('step')}: {what} {target} failed: {reason}; {kept}") from None
    _remove_stale(out_dir, keep=[p.name for p in pair] + [CHECKPOINT_JSON])
    return pointer


def _load_tensors(blob: bytes, path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as st_load

    try:
        return st_load(blob)
    except Exception as err:  # noqa: BLE001 - safetensors' own error type varies between versions
        raise CheckpointError(f"{path} is not a resetnet checkpoint: its safetensors data is corrupt ({err}); {_ACCEPTED}") from None


def _read_pair(json_path: Path, meta: dict, verify: bool) -> Checkpoint:
    """The pair described by ``meta`` (read from ``json_path``); :class:`CheckpointError` if torn."""
    info = meta["tensors"]
    tensor_path = json_path.parent / info["file"]
    if not tensor_path.is_file():
        raise CheckpointError(f"{json_path} names {tensor_path.name}, which is missing: a torn or incomplete checkpoint")
    blob = _read_bytes(tensor_path)
    if verify and info.get("sha256") and hashlib.sha256(blob).hexdigest() != info["sha256"]:
        try:
            step = _parse_header(blob, tensor_path).get("step")
        except CheckpointError:
            step = None
        raise CheckpointError(
            f"{tensor_path} does not match {json_path} (SHA-256 differs; JSON step {meta.get('step')}, "
            f"tensors step {step!r}): a torn or mixed checkpoint pair"
        )
    metadata = _parse_header(blob, tensor_path)
    if info.get("save_id") and metadata.get("save_id") not in (None, info["save_id"]):
        raise CheckpointError(f"{tensor_path} does not belong to {json_path} (another save id): a torn or mixed checkpoint pair")
    return Checkpoint(meta=meta, tensors=_load_tensors(blob, tensor_path), path=tensor_path, metadata=metadata)


def _read_lone(tensor_path: Path) -> Checkpoint:
    blob = _read_bytes(tensor_path)
    metadata = _parse_header(blob, tensor_path)
    step = metadata.get("step", "")
    try:
        overrides = json.loads(metadata.get("model_overrides") or "{}")
    except ValueError:
        overrides = {}
    meta = {
        "step": int(step) if step.isdigit() else None,
        "config": {"model": {"name": metadata.get("model_name") or None, "overrides": overrides}},
    }
    return Checkpoint(meta=meta, tensors=_load_tensors(blob, tensor_path), path=tensor_path, metadata=metadata)


def _read_run_dir(run_dir: Path, verify: bool) -> Checkpoint:
    """The pointer's pair; else the newest complete verified pair (with a :class:`CheckpointWarning`)."""
    pointer = run_dir / CHECKPOINT_JSON
    problem: CheckpointError | None = None
    tried = None
    if pointer.is_file():
        try:
            meta = _read_json(pointer)
            tried = meta["tensors"]["file"]
            return _read_pair(pointer, meta, verify)
        except CheckpointError as err:
            problem = err
    candidates = []
    for path in _pair_files(run_dir):
        if path.suffix != ".json":
            continue
        try:
            meta = _read_json(path)
            mtime = path.stat().st_mtime_ns
        except (CheckpointError, OSError):
            continue
        if meta["tensors"]["file"] != tried:
            candidates.append((_step_tag(meta.get("step")), mtime, path, meta))
    for _, _, path, meta in sorted(candidates, key=lambda c: c[:2], reverse=True):
        try:
            ckpt = _read_pair(path, meta, verify)
        except CheckpointError:
            continue
        why = str(problem) if problem is not None else f"{run_dir} has no {CHECKPOINT_JSON} (a save interrupted before its commit?)"
        warnings.warn(f"{why}; using the complete checkpoint {path.name} (step {meta.get('step')}) instead", CheckpointWarning, stacklevel=3)
        return ckpt
    if problem is not None:
        raise problem
    if (run_dir / CHECKPOINT_TENSORS).is_file():  # an earlier version's lone tensors file
        return _read_lone(run_dir / CHECKPOINT_TENSORS)
    raise CheckpointError(f"no checkpoint at {run_dir} (expected {CHECKPOINT_JSON} and its checkpoint-<step>-<id>.safetensors)")


def read_checkpoint(path: str | os.PathLike[str], verify: bool = True) -> Checkpoint:
    """Load a checkpoint to CPU tensors: a run dir, its ``checkpoint.json``, a pair's ``.json``
    or a ``.safetensors`` file (``DIR/checkpoint.safetensors`` means ``DIR``'s current one).

    A run directory gives its current checkpoint, or the newest complete pair when that is
    torn (see the module docstring). The tensors must match the SHA-256 their JSON records,
    else :class:`CheckpointError` (a torn or mixed pair). A lone ``.safetensors`` file gives
    a ``meta`` rebuilt from its metadata (model name/overrides and step only). Anything that
    is not a checkpoint (a pickle, a ``torch.save`` file, an empty file) is a one-line
    :class:`CheckpointError`; nothing is ever unpickled.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return _read_run_dir(path, verify)
    if path.name == CHECKPOINT_JSON or (path.name == CHECKPOINT_TENSORS and checkpoint_exists(path.parent)):
        return _read_run_dir(path.parent, verify)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path} (no such file or directory); {_ACCEPTED}")
    if path.suffix.lower() in _NOT_CHECKPOINTS:
        raise CheckpointError(f"{path} is not a checkpoint ({_NOT_CHECKPOINTS[path.suffix.lower()]}); {_ACCEPTED}")
    if path.suffix == ".json":
        return _read_pair(path, _read_json(path), verify)
    sibling = path.with_suffix(".json")
    meta = None
    if sibling.is_file():
        with contextlib.suppress(CheckpointError):  # an unreadable sibling: read the tensors alone
            meta = _read_json(sibling)
    if meta is not None and meta["tensors"]["file"] == path.name:
        return _read_pair(sibling, meta, verify)
    return _read_lone(path)


# ----------------------------------------------------------------------------- models
def load_weights(model: nn.Module, source: str | os.PathLike[str] | Checkpoint, strict: bool = True) -> dict[str, list[str]]:
    """Copy a checkpoint's model weights into ``model``.

    ``strict=True``: every key must be present with its shape, and nothing extra.
    ``strict=False``: load what fits; returns the ``missing``, ``unexpected`` and
    ``mismatched`` (shape) key lists (for architecture changes between pipeline stages).
    A checkpoint whose model tensors hold NaN/Inf is refused (:class:`NonFiniteTensors`).
    """
    ckpt = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    state = ckpt.model_state
    own = model.state_dict()
    mismatched = sorted(k for k in state if k in own and tuple(own[k].shape) != tuple(state[k].shape))
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (mismatched or missing or unexpected):
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise CheckpointError(f"checkpoint {ckpt.path} does not fit the model: {'; '.join(parts)}; use strict=False to load what fits")
    loadable = {k: state[k] for k in own if k in state and k not in mismatched}  # the model's order, for messages
    bad = nonfinite_tensors(loadable)
    if bad:
        raise NonFiniteTensors(
            f"checkpoint {ckpt.path} (step {ckpt.meta.get('step')}) is unusable: {_describe(bad, len(loadable), 'model tensors')}; "
            "it was saved by a run that diverged: use an earlier checkpoint or retrain with a lower optim.lr / optim.grad_clip",
            bad, len(loadable),
        )
    model.load_state_dict(loadable, strict=strict)
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}

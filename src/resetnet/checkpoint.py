"""Checkpoints: tensors in safetensors, everything else in JSON. Never pickle.

A run directory holds pairs ``checkpoint-<step>-<id>.safetensors`` (keys ``model/``, ``optim/<param index>/``, ``aux/<name>/``) + ``.json`` (config,
step, optimizer, RNG, ``tensors: {file, sha256, bytes, save_id}``) and the pointer ``checkpoint.json``. A save writes a pair, atomically replaces the
pointer (the commit) and deletes older pairs; readers verify the SHA-256 and fall back to the newest complete pair (:class:`CheckpointWarning`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import time
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .errors import CheckpointError, require

__all__ = ["CHECKPOINT_JSON", "CHECKPOINT_TENSORS", "FORMAT", "CheckpointError", "NonFiniteTensors", "CheckpointWarning", "Checkpoint"]
__all__ += ["save_checkpoint", "read_checkpoint", "checkpoint_exists", "checkpoint_tensors", "nonfinite_tensors", "load_weights"]
__all__ += ["rng_state", "set_rng_state", "optimizer_to_parts", "optimizer_from_parts", "atomic_write_bytes"]

CHECKPOINT_JSON = "checkpoint.json"  #: The pointer of a run directory: a copy of the current pair's JSON (config, step, ...).
CHECKPOINT_TENSORS = "checkpoint.safetensors"  #: ``DIR/checkpoint.safetensors`` names DIR's current tensors (earlier versions wrote this file).
FORMAT = "resetnet-checkpoint/1"
_PAIR = re.compile(r"^checkpoint-\d+-[0-9a-f]{8}\.(?:safetensors|json)$")
#: What a commit deletes (unless kept): pairs, temporary files of interrupted saves, a legacy tensors file.
_STALE = re.compile(rf"{_PAIR.pattern}|^\.checkpoint.*\.tmp-\d+-[0-9a-f]{{8}}$|^checkpoint\.safetensors$")
_ACCEPTED = "pass a run directory or a .safetensors checkpoint written by resetnet train"
#: Files people give instead of a checkpoint, by suffix: named in the error.
_NOT_CHECKPOINTS = {".yaml": "a config file", ".yml": "a config file", ".jsonl": "a metrics log", ".md": "a report", ".png": "an image"}
_NOT_CHECKPOINTS.update({".txt": "a .txt file", ".csv": "a table", ".npy": "a numpy array", ".npz": "numpy arrays"})


class NonFiniteTensors(CheckpointError):
    """Tensors to save (or load) hold NaN/Inf; ``names`` lists them (prefixed keys)."""

    def __init__(self, message: str, names: list[str], total: int) -> None:
        super().__init__(message)
        self.names, self.total = names, total


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
        return {k[len(p) :]: v for k, v in self.tensors.items() if k.startswith(p)}

    @property
    def model_state(self) -> dict[str, torch.Tensor]:
        return self.section("model")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, os.replace); on ``OSError`` ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # gone after os.replace
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make renames and unlinks in ``directory`` durable (best effort: not every OS allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _files(directory: Path, pattern: re.Pattern[str] = _PAIR) -> list[Path]:
    with contextlib.suppress(OSError):
        return [p for p in directory.iterdir() if pattern.match(p.name)]
    return []


def checkpoint_exists(out_dir: str | os.PathLike[str]) -> bool:
    """Whether ``out_dir`` holds a checkpoint: its pointer, or a pair (both files) to fall back on."""
    out_dir = Path(out_dir)
    return (out_dir / CHECKPOINT_JSON).is_file() or any(p.suffix == ".json" and p.with_suffix(".safetensors").is_file() for p in _files(out_dir))


def _sniff(blob: bytes) -> str:
    """What a file that is not safetensors looks like, for the error message."""
    signs = (
        (not blob, "it is an empty file"),
        (blob[:4] in (b"PK\x03\x04", b"PK\x05\x06"), "it starts with a zip header, as torch.save .pt/.pth files do"),
        (re.match(rb"\x80[\x02-\x05]", blob), "it starts with a pickle header, as torch.save and pickle files do; resetnet never unpickles"),
        (blob[:6] == b"\x93NUMPY", "it is a numpy .npy file"),
        (blob.lstrip()[:1] in (b"{", b"["), "it looks like JSON text"),
        (len(blob) < 8, f"it is only {len(blob)} bytes long"),
    )
    return next((why for hit, why in signs if hit), "its first 8 bytes are not the length of a JSON header that fits in the file")


def _not_safetensors(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a resetnet checkpoint: it is not a safetensors file ({reason}); {_ACCEPTED}")


def _parse_header(blob: bytes, path: Path) -> dict[str, str]:
    """Validate the safetensors framing and return its ``__metadata__`` (:class:`CheckpointError` otherwise)."""
    n = int.from_bytes(blob[:8], "little") if len(blob) >= 10 else 0
    if n < 2 or n > len(blob) - 8 or blob[8:9] != b"{":
        raise _not_safetensors(path, _sniff(blob))
    try:
        header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    except ValueError:  # UnicodeDecodeError and JSONDecodeError
        raise _not_safetensors(path, "its header is not valid JSON") from None
    metadata = header.get("__metadata__") or {}  # the header is an object: it starts with "{"
    if not isinstance(metadata, dict):
        raise _not_safetensors(path, "its header is not a JSON object of tensors")
    return {str(k): str(v) for k, v in metadata.items()}


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None


def _read_json(path: Path) -> dict:
    try:
        meta = json.loads(_read_bytes(path).decode("utf-8"))
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError
        raise CheckpointError(f"{path} is not valid JSON ({err}): not a resetnet checkpoint JSON; {_ACCEPTED}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tensors"), dict) or not isinstance(meta["tensors"].get("file"), str):
        raise CheckpointError(f"{path} is not a checkpoint (a JSON file, but not a resetnet checkpoint.json: no tensors.file entry); {_ACCEPTED}")
    name = meta["tensors"]["file"]
    if not name or Path(name).name != name:
        raise CheckpointError(f"{path} names the tensors file {name!r}, which is not a plain file name")
    return meta


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
    if state.get("torch_cuda") and torch.cuda.is_available():
        for i, s in enumerate(state["torch_cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(_unb64(s), i)


def optimizer_to_parts(optimizer: Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (``optim/<i>/<key>``) and a JSON-able rest."""
    sd = optimizer.state_dict()
    tensors = {f"optim/{i}/{k}": v for i, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    scalars = {str(i): {k: v for k, v in st.items() if not torch.is_tensor(v)} for i, st in sd["state"].items()}
    return tensors, {"class": type(optimizer).__name__, "param_groups": sd["param_groups"], "scalar_state": {i: s for i, s in scalars.items() if s}}


def optimizer_from_parts(optimizer: Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Inverse of :func:`optimizer_to_parts`: load the state into ``optimizer``."""
    if meta.get("class") not in (None, type(optimizer).__name__):
        raise CheckpointError(f"checkpoint optimizer is {meta['class']}, the config builds {type(optimizer).__name__}")
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, name = key.split("/", 2)
        state.setdefault(int(idx), {})[name] = v
    for idx, st in meta.get("scalar_state", {}).items():
        state.setdefault(int(idx), {}).update(st)
    groups = [{**g, "betas": tuple(g["betas"])} if isinstance(g.get("betas"), list) else dict(g) for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of the floating-point tensors holding NaN/Inf, in ``tensors``' order (one host sync per device)."""
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        if torch.is_tensor(t) and (t.is_floating_point() or t.is_complex()) and t.device.type != "meta":
            by_device.setdefault(t.device, []).append((key, t))
    bad: set[str] = set()
    for items in by_device.values():
        ok = torch.stack([torch.isfinite(t).all() for _, t in items]).tolist()
        bad.update(key for (key, _), good in zip(items, ok) if not good)
    return [k for k in tensors if k in bad]


def _describe(names: list[str], total: int, what: str) -> str:
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} of {total} {what} hold NaN/Inf (first: {shown})"


def checkpoint_tensors(model: nn.Module, optimizer: Optimizer | None = None, aux: Mapping[str, nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores, by prefixed key, where they live (no copies)."""
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    if optimizer is not None:
        tensors.update(optimizer_to_parts(optimizer)[0])
    tensors.update({f"aux/{name}/{k}": v for name, module in (aux or {}).items() for k, v in module.state_dict().items()})
    return tensors


def _step_tag(step: Any) -> int:
    with contextlib.suppress(TypeError, ValueError):
        return max(int(step), 0)
    return 0


def save_checkpoint(
    out_dir: str | os.PathLike[str],
    model: nn.Module,
    meta: Mapping[str, Any],
    optimizer: Optimizer | None = None,
    aux: Mapping[str, nn.Module] | None = None,
    check_finite: bool = True,
) -> Path:
    """Write a checkpoint into ``out_dir`` and make it the current one; returns the pointer path. ``meta`` (JSON: ``config``, a dict or
    typed config, and ``step``) gains ``optimizer`` (hyper-parameters, scalar state). Raises, replacing nothing: :class:`NonFiniteTensors`
    (NaN/Inf, with ``check_finite``), ``ValueError`` (``meta`` is not JSON), :class:`CheckpointError` (disk full, read-only, ...)."""
    st_save = require("safetensors.torch", "train", "writing a checkpoint").save

    out_dir = Path(out_dir)
    meta = dict(meta)
    if hasattr(meta.get("config"), "to_dict"):
        meta["config"] = meta["config"].to_dict()
    live = checkpoint_tensors(model, optimizer, aux)
    bad = nonfinite_tensors(live) if check_finite else []
    if bad:
        kept = "the previous checkpoint was kept" if checkpoint_exists(out_dir) else "nothing was written"
        raise NonFiniteTensors(f"not saving a checkpoint in {out_dir}: {_describe(bad, len(live), 'tensors')}; {kept}", bad, len(live))
    if optimizer is not None:
        meta["optimizer"] = optimizer_to_parts(optimizer)[1]
    save_id = uuid.uuid4().hex
    model_cfg = (meta.get("config") or {}).get("model", {})
    model_name = str(model_cfg.get("name", getattr(model, "model_name", "")))
    overrides = json.dumps(model_cfg.get("overrides", {}))
    metadata = {"format": FORMAT, "save_id": save_id, "step": str(meta.get("step", "")), "model_name": model_name, "model_overrides": overrides}
    blob = st_save({k: v.detach().to("cpu").contiguous() for k, v in live.items()}, metadata=metadata)
    stem = f"checkpoint-{_step_tag(meta.get('step'))}-{save_id[:8]}"
    info = {"file": f"{stem}.safetensors", "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob), "save_id": save_id}
    meta.update(format=FORMAT, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), torch_version=torch.__version__, tensors=info)
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
    # Committed: delete every other pair, temporary and legacy file (best effort; JSON first: none outlives its tensors).
    stale = [p for p in _files(out_dir, _STALE) if p not in pair]
    for p in sorted(stale, key=lambda p: not p.name.endswith(".json")):
        with contextlib.suppress(OSError):
            p.unlink()
    _fsync_dir(out_dir)
    return pointer


def _load(blob: bytes, path: Path, meta: dict | None = None) -> Checkpoint:
    """The checkpoint in ``blob`` (read from ``path``); ``meta=None`` (a lone file): rebuilt from its metadata."""
    st_load = require("safetensors.torch", "train", "reading a checkpoint").load

    metadata = _parse_header(blob, path)
    if meta is None:
        overrides = {}
        with contextlib.suppress(ValueError):
            overrides = json.loads(metadata.get("model_overrides") or "{}")
        model = {"name": metadata.get("model_name") or None, "overrides": overrides}
        meta = {"step": int(metadata["step"]) if metadata.get("step", "").isdigit() else None, "config": {"model": model}}
    try:
        tensors = st_load(blob)
    except Exception as err:  # noqa: BLE001 - safetensors' own error type varies between versions
        raise CheckpointError(f"{path} is not a resetnet checkpoint: its safetensors data is corrupt ({err}); {_ACCEPTED}") from None
    return Checkpoint(meta=meta, tensors=tensors, path=path, metadata=metadata)


def _read_pair(json_path: Path, meta: dict, verify: bool) -> Checkpoint:
    """The pair described by ``meta`` (read from ``json_path``); :class:`CheckpointError` if torn."""
    info = meta["tensors"]
    tensor_path = json_path.parent / info["file"]
    if not tensor_path.is_file():
        raise CheckpointError(f"{json_path} names {tensor_path.name}, which is missing: a torn or incomplete checkpoint")
    blob = _read_bytes(tensor_path)
    header: dict[str, str] = {}
    with contextlib.suppress(CheckpointError):  # a corrupt header: reported by _load unless the SHA-256 differs
        header = _parse_header(blob, tensor_path)
    if verify and info.get("sha256") and hashlib.sha256(blob).hexdigest() != info["sha256"]:
        steps = f"JSON step {meta.get('step')}, tensors step {header.get('step')!r}"
        raise CheckpointError(f"{tensor_path} does not match {json_path} (SHA-256 differs; {steps}): a torn or mixed checkpoint pair")
    if info.get("save_id") and header.get("save_id") not in (None, info["save_id"]):
        raise CheckpointError(f"{tensor_path} does not belong to {json_path} (another save id): a torn or mixed checkpoint pair")
    return _load(blob, tensor_path, meta)


def _read_run_dir(run_dir: Path, verify: bool) -> Checkpoint:
    """The pointer's pair; else the newest complete verified pair (with a :class:`CheckpointWarning`)."""
    pointer = run_dir / CHECKPOINT_JSON
    problem: CheckpointError | None = None
    if pointer.is_file():
        try:
            return _read_pair(pointer, _read_json(pointer), verify)
        except CheckpointError as err:
            problem = err
    candidates = []
    for path in (p for p in _files(run_dir) if p.suffix == ".json"):
        with contextlib.suppress(CheckpointError, OSError):
            meta = _read_json(path)
            candidates.append((_step_tag(meta.get("step")), path.stat().st_mtime_ns, path, meta))
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
        return _load(_read_bytes(run_dir / CHECKPOINT_TENSORS), run_dir / CHECKPOINT_TENSORS)
    raise CheckpointError(f"no checkpoint at {run_dir} (expected {CHECKPOINT_JSON} and its checkpoint-<step>-<id>.safetensors)")


def read_checkpoint(path: str | os.PathLike[str], verify: bool = True) -> Checkpoint:
    """Load a checkpoint to CPU tensors from a run dir, its ``checkpoint.json``, a pair's ``.json`` or a ``.safetensors`` file (a lone
    file's ``meta``: model name/overrides and step); a torn pair or a non-checkpoint is a one-line :class:`CheckpointError`."""
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
    with contextlib.suppress(CheckpointError):  # no or an unreadable sibling: read the tensors alone
        meta = _read_json(sibling)
    if meta is not None and meta["tensors"]["file"] == path.name:
        return _read_pair(sibling, meta, verify)
    return _load(_read_bytes(path), path)


def load_weights(model: nn.Module, source: str | os.PathLike[str] | Checkpoint, strict: bool = True, weights: str = "model") -> dict[str, list[str]]:
    """Copy a checkpoint's model weights (``weights="aux/ema"``: its EMA of them) into ``model`` (:class:`NonFiniteTensors` if they hold
    NaN/Inf); returns the ``missing``, ``unexpected`` and ``mismatched`` (shape) keys. ``strict=True``: all must be empty; ``strict=False``: load what fits."""
    ckpt = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    state = ckpt.section(weights)
    if weights != "model" and not state:
        raise CheckpointError(f"checkpoint {ckpt.path} holds no {weights!r} weights (an EMA needs a run with train.ema_decay set)")
    own = model.state_dict()
    mismatched = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if strict and (mismatched or missing or unexpected):
        kinds = (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched))
        parts = [f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})" for label, keys in kinds if keys]
        raise CheckpointError(f"checkpoint {ckpt.path} does not fit the model: {'; '.join(parts)}; use strict=False to load what fits")
    loadable = {k: state[k] for k in own if k in state and k not in mismatched}  # the model's order, for messages
    bad = nonfinite_tensors(loadable)
    if bad:
        what = _describe(bad, len(loadable), "model tensors")
        hint = "it was saved by a run that diverged: use an earlier checkpoint or retrain with a lower optim.lr / optim.grad_clip"
        raise NonFiniteTensors(f"checkpoint {ckpt.path} (step {ckpt.meta.get('step')}) is unusable: {what}; {hint}", bad, len(loadable))
    model.load_state_dict(loadable, strict=strict)
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}

"""Checkpoints: tensors in safetensors, everything else in JSON. Never pickle.

A run directory holds a pair:

* ``checkpoint.safetensors``: every tensor. Keys are prefixed:
  ``model/<state_dict key>`` (weights and buffers), ``optim/<param index>/<state key>``
  (optimizer state tensors such as ``momentum_buffer``, ``exp_avg``, ``step``) and
  ``aux/<name>/<state_dict key>`` (other stateful modules, e.g. the skip-reward baseline).
  Its safetensors metadata repeats the model name, overrides, step and a save id, so a
  lone ``.safetensors`` file can still rebuild its model.
* ``checkpoint.json``: the config, step, epoch, optimizer hyper-parameters and scalar
  state, schedule values, loader position, RNG states (base64), best metrics, and
  ``tensors: {file, sha256, bytes, save_id}`` identifying the safetensors file it belongs to.

Writes are atomic: each file is written to a temporary file in the same directory,
fsynced and moved into place with ``os.replace``; the JSON is written last. A reader
recomputes the SHA-256 of the safetensors file and refuses a pair that does not
match (a crash between the two renames, or files copied from different saves).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

__all__ = [
    "CHECKPOINT_JSON", "CHECKPOINT_TENSORS", "FORMAT", "CheckpointError", "Checkpoint", "save_checkpoint",
    "read_checkpoint", "checkpoint_exists", "rng_state", "set_rng_state", "optimizer_to_parts",
    "optimizer_from_parts", "load_model", "load_weights", "atomic_write_bytes",
]

CHECKPOINT_JSON = "checkpoint.json"
CHECKPOINT_TENSORS = "checkpoint.safetensors"
FORMAT = "resetnet-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, torn or does not fit the model."""


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
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, os.replace)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _locate(path: str | os.PathLike[str]) -> tuple[Path | None, Path]:
    """``(json path or None, safetensors path)`` for a run dir, a .json or a .safetensors path."""
    path = Path(path).expanduser()
    if path.is_dir():
        return (path / CHECKPOINT_JSON if (path / CHECKPOINT_JSON).is_file() else None), path / CHECKPOINT_TENSORS
    if path.suffix == ".json":
        meta = json.loads(path.read_text(encoding="utf-8"))
        return path, path.parent / meta.get("tensors", {}).get("file", CHECKPOINT_TENSORS)
    sibling = path.with_suffix(".json")
    return (sibling if sibling.is_file() else None), path


def checkpoint_exists(out_dir: str | os.PathLike[str]) -> bool:
    return (Path(out_dir) / CHECKPOINT_JSON).is_file()


def _header_metadata(blob: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    return dict(header.get("__metadata__") or {})


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


# ----------------------------------------------------------------------------- save / read
def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def save_checkpoint(
    out_dir: str | os.PathLike[str],
    model: nn.Module,
    meta: Mapping[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    aux: Mapping[str, nn.Module] | None = None,
) -> Path:
    """Write the checkpoint pair into ``out_dir``; returns the JSON path.

    ``meta`` must be JSON-serialisable (it should hold ``config`` and ``step``); the
    optimizer's hyper-parameters and scalar state are added under ``optimizer``.
    """
    from safetensors.torch import save as st_save

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": _cpu(v) for k, v in model.state_dict().items()}
    meta = dict(meta)
    if optimizer is not None:
        opt_tensors, opt_meta = optimizer_to_parts(optimizer)
        tensors.update({k: _cpu(v) for k, v in opt_tensors.items()})
        meta["optimizer"] = opt_meta
    for name, module in (aux or {}).items():
        tensors.update({f"aux/{name}/{k}": _cpu(v) for k, v in module.state_dict().items()})
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
    meta.update(
        format=FORMAT,
        saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        torch_version=torch.__version__,
        tensors={"file": CHECKPOINT_TENSORS, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob), "save_id": save_id},
    )
    text = json.dumps(meta, indent=1, allow_nan=False)  # fails before anything is written
    atomic_write_bytes(out_dir / CHECKPOINT_TENSORS, blob)
    json_path = out_dir / CHECKPOINT_JSON
    atomic_write_bytes(json_path, text.encode("utf-8"))
    return json_path


def read_checkpoint(path: str | os.PathLike[str], verify: bool = True) -> Checkpoint:
    """Load a checkpoint (run dir, ``checkpoint.json`` or ``.safetensors``) to CPU tensors.

    With the JSON present, the safetensors file must match its recorded SHA-256, else
    :class:`CheckpointError` (a torn or mixed pair). A lone ``.safetensors`` file gives a
    ``meta`` rebuilt from its metadata (model name/overrides and step only).
    """
    from safetensors.torch import load as st_load

    json_path, tensor_path = _locate(path)
    if not tensor_path.is_file():
        where = Path(path)
        raise CheckpointError(f"no checkpoint at {where} (expected {tensor_path.name}" + (f" and {CHECKPOINT_JSON}" if where.is_dir() else "") + ")")
    blob = tensor_path.read_bytes()
    metadata = _header_metadata(blob)
    if json_path is not None:
        try:
            meta = json.loads(json_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{json_path} is not valid JSON ({err})") from None
        info = meta.get("tensors", {})
        if verify and info.get("sha256") and hashlib.sha256(blob).hexdigest() != info["sha256"]:
            raise CheckpointError(
                f"{tensor_path} does not match {json_path} (SHA-256 differs; JSON step {meta.get('step')}, "
                f"tensors step {metadata.get('step')!r}): a torn or mixed checkpoint pair"
            )
    else:
        meta = {
            "step": int(metadata["step"]) if metadata.get("step", "").isdigit() else None,
            "config": {"model": {"name": metadata.get("model_name") or None, "overrides": json.loads(metadata.get("model_overrides") or "{}")}},
        }
    return Checkpoint(meta=meta, tensors=st_load(blob), path=tensor_path, metadata=metadata)


# ----------------------------------------------------------------------------- models
def load_weights(model: nn.Module, source: str | os.PathLike[str] | Checkpoint, strict: bool = True) -> dict[str, list[str]]:
    """Copy a checkpoint's model weights into ``model``.

    ``strict=True``: every key must be present with its shape, and nothing extra.
    ``strict=False``: load what fits; returns the ``missing``, ``unexpected`` and
    ``mismatched`` (shape) key lists (for architecture changes between pipeline stages).
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
    model.load_state_dict({k: v for k, v in state.items() if k in own and k not in mismatched}, strict=strict)
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model from a checkpoint (run dir or ``.safetensors``) and load its weights (strict).

    Returns ``(model in eval mode on device, meta)``; ``meta["config"]`` holds the config.
    """
    from ..models import create_model

    ckpt = read_checkpoint(path)
    model_cfg = (ckpt.meta.get("config") or {}).get("model") or {}
    name = model_cfg.get("name")
    if not name:
        raise CheckpointError(f"checkpoint {ckpt.path} does not say which model it holds (no config.model.name)")
    model = create_model(name, **(model_cfg.get("overrides") or {}))
    load_weights(model, ckpt, strict=True)
    return model.to(device).eval(), ckpt.meta

"""Where and how a process trains: its device, bf16 autocast, memory format, and its rank in a torchrun job."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError
from .config import Config
from .distributed import RankInfo, env_world_size, init_distributed

__all__ = ["Runtime", "resolve_device", "resolve_runtime", "launch_runtime"]


@dataclass
class Runtime(RankInfo):
    """Where and how a process trains. ``backend`` is set when a process group is in use."""

    device: torch.device
    amp: bool = False
    channels_last: bool = False
    rank: int = 0
    world_size: int = 1
    backend: str | None = None


def resolve_device(text: str | torch.device | None, what: str = "--device") -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:N``; a UsageError names a device
    that is not one, or is not on this machine."""
    text = str(text or "auto").strip()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"{what} {text!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{what} {text}: CUDA is not available on this machine (torch {torch.__version__}); use cpu or auto (--device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{what} {text}: this machine has {torch.cuda.device_count()} CUDA device(s); choose one of them")
    elif device.type != "cpu":
        raise UsageError(f"{what} {text}: device type {device.type!r} is not supported; use auto, cpu or cuda")
    return device


def resolve_runtime(cfg: Config, device: torch.device | None = None, rank: int = 0, world_size: int = 1, backend: str | None = None) -> Runtime:
    """The runtime of ``cfg.train``: its device, bf16 autocast and channels_last (``auto``: on CUDA only;
    ``true`` also on the CPU, which runs the GPU's mixed-precision numerics where no GPU is)."""
    device = device if device is not None else resolve_device(cfg.train.device, "config key 'train.device':")
    amp, channels_last = (device.type == "cuda" if v == "auto" else bool(v) for v in (cfg.train.amp, cfg.train.channels_last))
    return Runtime(device, amp=amp, channels_last=channels_last, rank=rank, world_size=world_size, backend=backend)


def launch_runtime(cfg: Config) -> Runtime:
    """This process's runtime: under torchrun (``WORLD_SIZE`` > 1) join the process group and train
    as rank ``RANK`` on ``cuda:LOCAL_RANK`` (or the CPU with gloo); otherwise :func:`resolve_runtime`."""
    runtime = resolve_runtime(cfg)  # checks train.device
    if env_world_size() <= 1:
        return runtime
    ctx = init_distributed(timeout_s=cfg.train.dist_timeout_s, device=runtime.device.type)
    return resolve_runtime(cfg, ctx.device, ctx.rank, ctx.world_size, ctx.backend)

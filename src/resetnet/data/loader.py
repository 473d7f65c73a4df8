"""A whole-dataset-on-device batch loader with vectorised, reproducible augmentation."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .cifar10 import CIFAR10_MEAN, CIFAR10_STD

__all__ = ["DeviceLoader"]


def _mix(*parts: int | str) -> int:
    """Deterministic 63-bit seed from a tuple of ints/strings (stable across runs and platforms)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else int(p).to_bytes(16, "little", signed=True))
        h.update(b"|")
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


class DeviceLoader:
    """Batches of a small uint8 image dataset that lives entirely on ``device`` (semantics: docs/data.md#deviceloader).

    Images are stored once as uint8 ``(N, 3, H, W)``; each batch is gathered, augmented (zero-pad by ``pad``, random crop,
    flip) and normalised on the device. ``batch_size`` is the GLOBAL batch: the epoch order (seeded by ``(seed, epoch)``)
    and the augmentation (by ``(seed, epoch, batch)``) do not depend on ``world_size``, ``rank`` or device, and rank ``r``
    gets the ``r``-th contiguous chunk of each global batch. Eval loaders (``train=False``) default to no shuffle, no
    augmentation and keeping the last partial batch. ``iter(loader)`` yields the rest of the current epoch, then moves
    on; ``set_epoch(e)`` moves to ``(e, 0)`` unless it follows ``load_state_dict`` with that epoch. One iterator at a time.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        batch_size: int,
        *,
        train: bool,
        device: str | torch.device = "cpu",
        seed: int = 0,
        drop_last: bool | None = None,
        augment: bool | None = None,
        shuffle: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
        limit: int | None = None,
        pad: int = 4,
        flip: str = "random",
        mean: tuple[float, ...] = CIFAR10_MEAN,
        std: tuple[float, ...] = CIFAR10_STD,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size % world_size != 0:
            raise ValueError(f"global batch_size ({batch_size}) must be divisible by world_size ({world_size}): each rank takes an equal share")
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        if flip not in ("random", "alternating"):
            raise ValueError(f"flip must be 'random' or 'alternating', got {flip!r}")

        imgs, labs = torch.as_tensor(images), torch.as_tensor(labels)
        if imgs.dtype != torch.uint8 or imgs.ndim != 4 or imgs.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {imgs.dtype} {tuple(imgs.shape)}")
        if labs.ndim != 1 or len(labs) != len(imgs):
            raise ValueError(f"labels must be 1-D with {len(imgs)} entries, got {tuple(labs.shape)}")
        if limit is not None and limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        imgs, labs = imgs[:limit], labs[:limit]

        self.device = torch.device(device)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.train = train
        self.seed = int(seed)
        self.drop_last = train if drop_last is None else drop_last
        self.augment = train if augment is None else augment
        self.shuffle = train if shuffle is None else shuffle
        self.channels_last = channels_last
        self.dtype = dtype
        self.pad = pad
        self.flip = flip

        # NHWC -> NCHW once; the permuted tensor already has channels_last strides.
        x = imgs.to(self.device).permute(0, 3, 1, 2)
        self.images = x if channels_last else x.contiguous()
        self.labels = labs.to(device=self.device, dtype=torch.int64)
        self.num_samples = n = len(self.labels)
        mean_t, std_t = (torch.tensor(v, dtype=torch.float32, device=self.device).view(1, -1, 1, 1) for v in (mean, std))
        self._scale, self._shift = 1.0 / (255.0 * std_t), -mean_t / std_t  # normalize: x * scale + shift
        self._len = n // batch_size if self.drop_last else -(-n // batch_size)
        if self._len == 0:
            raise ValueError(f"no batches: {n} samples < batch_size {batch_size} with drop_last=True (lower batch_size or limit, or drop_last=False)")
        self._used = min(n, self._len * batch_size)  # samples consumed per epoch

        self._epoch, self._batch = 0, 0
        self._resume_pending = False
        self._plan: tuple[int, dict[str, torch.Tensor]] | None = None  # (epoch, plan) of the last epoch planned

    def __len__(self) -> int:
        """Number of (global) batches per epoch."""
        return self._len

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of ``epoch`` (keeps a just-restored position in that epoch)."""
        if not (self._resume_pending and epoch == self._epoch):
            self._epoch, self._batch = int(epoch), 0
        self._resume_pending = False

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batch"}`` of the next batch to be produced."""
        return {"epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``(state["epoch"], state["batch"])`` (a batch past the end rolls over)."""
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or batch < 0:
            raise ValueError(f"invalid loader state {state!r}")
        extra, batch = divmod(batch, self._len)
        self._epoch, self._batch = epoch + extra, batch
        self._resume_pending = True

    def _advance(self, epoch: int, batch: int) -> None:
        """Record that batch ``(epoch, batch)`` was produced."""
        self._epoch, self._batch = divmod(epoch * self._len + batch + 1, self._len)
        self._resume_pending = False

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._resume_pending = False
        for _, _, x, y in itertools.islice(self.batches(self._epoch * self._len + self._batch), self._len - self._batch):
            yield x, y

    def batches(self, start_step: int = 0) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """Infinite ``(step, epoch, x, y)`` stream from global step ``start_step`` (batch ``step % len(self)``)."""
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        for step in itertools.count(start_step):
            epoch, b = divmod(step, self._len)
            x, y = self.get_batch(epoch, b)
            self._advance(epoch, b)
            yield step, epoch, x, y

    def _epoch_plan(self, epoch: int) -> dict[str, torch.Tensor]:
        """Order and augmentation parameters of a whole epoch, generated on CPU, moved once."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        plan: dict[str, torch.Tensor] = {}
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, "perm"))
            plan["perm"] = torch.randperm(self.num_samples, generator=g)[: self._used]
        if self.augment:  # one generator per global batch: its offsets, then its flips
            gens = [torch.Generator().manual_seed(_mix(self.seed, epoch, b, "aug")) for b in range(self._len)]
            sizes = [min(self.batch_size, self._used - b * self.batch_size) for b in range(self._len)]
            plan["offsets"] = torch.cat([torch.randint(0, 2 * self.pad + 1, (m, 2), generator=g) for m, g in zip(sizes, gens)])
            if self.flip == "random":
                plan["flip"] = torch.cat([torch.randint(0, 2, (m,), generator=g, dtype=torch.bool) for m, g in zip(sizes, gens)])
            else:  # alternating: each image's one random flip in even epochs, its opposite in odd ones (Jordan 2024)
                base = torch.randint(0, 2, (self.num_samples,), generator=torch.Generator().manual_seed(_mix(self.seed, "flip")), dtype=torch.bool)
                plan["flip"] = base[plan.get("perm", torch.arange(self._used))] ^ bool(epoch % 2)
        self._plan = epoch, {k: v.to(self.device, non_blocking=True) for k, v in plan.items()}
        return self._plan[1]

    def _shard(self, start: int, stop: int) -> tuple[int, int]:
        """This rank's contiguous chunk of global positions ``[start, stop)``."""
        q, r = divmod(stop - start, self.world_size)
        lo = start + self.rank * q + min(self.rank, r)
        return lo, lo + q + (1 if self.rank < r else 0)

    def get_batch(self, epoch: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(x, y)`` for batch index ``batch`` of ``epoch`` (stateless)."""
        if not 0 <= batch < self._len:
            raise IndexError(f"batch {batch} out of range for {self._len} batches per epoch")
        plan = self._epoch_plan(epoch)
        lo, hi = self._shard(batch * self.batch_size, min((batch + 1) * self.batch_size, self._used))
        idx = plan["perm"][lo:hi] if "perm" in plan else slice(lo, hi)
        x, y = self.images[idx], self.labels[idx]
        if self.augment:
            x = self._crop_flip(x, plan["offsets"][lo:hi], plan["flip"][lo:hi])
        return self.normalize(x), y

    def _crop_flip(self, x: torch.Tensor, offsets: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Zero-pad, random-crop and optionally mirror a uint8 batch with one gather."""
        b, c, h, w = x.shape
        p = self.pad
        xp = F.pad(x, (p, p, p, p)) if p else x
        rows = offsets[:, :1] + torch.arange(h, device=x.device)  # (b, h)
        ar = torch.arange(w, device=x.device)
        cols = torch.where(flip[:, None], offsets[:, 1:] + (w - 1) - ar, offsets[:, 1:] + ar)  # (b, w)
        lin = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
        return xp.flatten(2).gather(2, lin).reshape(b, c, h, w)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> ``dtype`` with ``(x / 255 - mean) / std``, in the requested memory format."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(torch.float32).mul_(self._scale).add_(self._shift).to(self.dtype)  # no copy when dtype is float32

    def __repr__(self) -> str:
        return (
            f"DeviceLoader(n={self.num_samples}, batch_size={self.batch_size}, batches={self._len}, train={self.train}, "
            f"augment={self.augment}, shuffle={self.shuffle}, rank={self.rank}/{self.world_size}, device={self.device})"
        )

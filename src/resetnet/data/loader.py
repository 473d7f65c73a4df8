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
    """Batches of a small uint8 image dataset that lives entirely on ``device``.

    Images are stored once as ``uint8`` ``(N, 3, H, W)`` (optionally ``channels_last``); each batch is
    gathered, augmented and normalised on the device. Eval loaders (``train=False``) default to no
    shuffle, no augmentation and keeping the last partial batch.

    * ``batch_size`` is the GLOBAL batch; the epoch order is ``randperm(N)`` seeded by
      ``(seed, epoch)``, independent of ``world_size``, ``rank`` and device.
    * Augmentation: zero-pad the raw image by ``pad`` pixels, random ``H x W`` crop,
      horizontal flip with probability 1/2, drawn per global batch from ``(seed, epoch, batch)``.
    * Rank ``r`` gets the ``r``-th contiguous chunk of each global batch (``torch.tensor_split``
      semantics); concatenating the chunks in rank order gives the single-process batch.
    * ``iter(loader)`` yields the rest of the current epoch, then moves to ``(epoch + 1, 0)``.
      ``state_dict()`` is the position of the next batch; ``set_epoch(e)`` moves to ``(e, 0)``
      unless it follows ``load_state_dict`` with the same epoch. One active iterator at a time.
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
        mean: tuple[float, ...] = CIFAR10_MEAN,
        std: tuple[float, ...] = CIFAR10_STD,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size % world_size != 0:
            raise ValueError(
                f"global batch_size ({batch_size}) must be divisible by world_size ({world_size}); "
                "each rank gets batch_size // world_size samples per step"
            )
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")

        imgs, labs = torch.as_tensor(images), torch.as_tensor(labels)
        if imgs.dtype != torch.uint8 or imgs.ndim != 4 or imgs.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {imgs.dtype} {tuple(imgs.shape)}")
        if labs.ndim != 1 or len(labs) != len(imgs):
            raise ValueError(f"labels must be 1-D with {len(imgs)} entries, got {tuple(labs.shape)}")
        if limit is not None:
            if limit <= 0:
                raise ValueError(f"limit must be positive, got {limit}")
            imgs, labs = imgs[:limit], labs[:limit]

        self.device = torch.device(device)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.local_batch_size = batch_size // world_size
        self.train = train
        self.seed = int(seed)
        self.drop_last = train if drop_last is None else drop_last
        self.augment = train if augment is None else augment
        self.shuffle = train if shuffle is None else shuffle
        self.channels_last = channels_last
        self.dtype = dtype
        self.pad = pad

        # NHWC -> NCHW once; the permuted tensor already has channels_last strides.
        x = imgs.to(self.device).permute(0, 3, 1, 2)
        self.images = x if channels_last else x.contiguous()
        self.labels = labs.to(device=self.device, dtype=torch.int64)
        self.num_samples = len(self.labels)
        self.height, self.width = int(self.images.shape[2]), int(self.images.shape[3])

        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -mean_t / std_t

        n = self.num_samples
        self._len = n // batch_size if self.drop_last else -(-n // batch_size)
        if self._len == 0:
            raise ValueError(
                f"no batches: {n} samples < batch_size {batch_size} with drop_last=True (lower batch_size or limit, or pass drop_last=False)"
            )
        self._used = min(n, self._len * batch_size)  # samples consumed per epoch

        self._epoch, self._batch = 0, 0
        self._resume_pending = False
        self._plan_epoch: int | None = None
        self._plan: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        """Number of (global) batches per epoch."""
        return self._len

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def global_step(self) -> int:
        """Position of the next batch as a global step ``epoch * len(self) + batch``."""
        return self._epoch * self._len + self._batch

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
        epoch, start = self._epoch, self._batch
        self._resume_pending = False
        for b in range(start, self._len):
            x, y = self.get_batch(epoch, b)
            self._advance(epoch, b)
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
        if self._plan_epoch == epoch:
            return self._plan
        plan: dict[str, torch.Tensor] = {}
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, "perm"))
            plan["perm"] = torch.randperm(self.num_samples, generator=g)[: self._used]
        if self.augment:
            offs, flips = [], []
            for b in range(self._len):
                m = min(self.batch_size, self._used - b * self.batch_size)
                g = torch.Generator().manual_seed(_mix(self.seed, epoch, b, "aug"))
                offs.append(torch.randint(0, 2 * self.pad + 1, (m, 2), generator=g))
                flips.append(torch.randint(0, 2, (m,), generator=g, dtype=torch.bool))
            plan["offsets"] = torch.cat(offs)
            plan["flip"] = torch.cat(flips)
        self._plan = {k: v.to(self.device, non_blocking=True) for k, v in plan.items()}
        self._plan_epoch = epoch
        return self._plan

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
        if "perm" in plan:
            idx = plan["perm"][lo:hi]
            x, y = self.images[idx], self.labels[idx]
        else:
            x, y = self.images[lo:hi], self.labels[lo:hi]
        if self.augment:
            x = self._crop_flip(x, plan["offsets"][lo:hi], plan["flip"][lo:hi])
        return self.normalize(x), y

    def _crop_flip(self, x: torch.Tensor, offsets: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Zero-pad, random-crop and optionally mirror a uint8 batch with one gather."""
        b, c, h, w = x.shape
        p = self.pad
        wp = w + 2 * p
        xp = F.pad(x, (p, p, p, p)) if p else x
        rows = offsets[:, :1] + torch.arange(h, device=x.device)  # (b, h)
        ar = torch.arange(w, device=x.device)
        cols = torch.where(flip[:, None], offsets[:, 1:] + (w - 1) - ar, offsets[:, 1:] + ar)  # (b, w)
        lin = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
        return xp.reshape(b, c, -1).gather(2, lin).reshape(b, c, h, w)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> ``dtype`` with ``(x / 255 - mean) / std``, in the requested memory format."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = x.to(torch.float32).mul_(self._scale).add_(self._shift)
        return out if self.dtype == torch.float32 else out.to(self.dtype)

    def __repr__(self) -> str:
        return (
            f"DeviceLoader(n={self.num_samples}, batch_size={self.batch_size}, batches={self._len}, train={self.train}, "
            f"augment={self.augment}, shuffle={self.shuffle}, rank={self.rank}/{self.world_size}, device={self.device})"
        )

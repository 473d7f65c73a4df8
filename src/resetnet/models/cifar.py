"""CIFAR ResNets and ReSets built from stage specifications.

Both families share :class:`CifarNet`: a stem (conv3x3-BN-ReLU, then the paper's max-pool
or none, He et al.'s CIFAR stem), three stages, a head (BN-ReLU, global average pool, FC).
A *plain* stage is He et al.'s (a downsampling residual block when the width changes, then
identity residual blocks ``x + F(x)``); a *reset* stage is a transition when the width
changes (strided conv-BN-ReLU, or that downsampling block), then a :class:`~resetnet.nn.ReSet`
module over a pool of BasicBlock units.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..nn import BasicBlock, ConvBNReLU, DownsampleBlock, ReSet, ResidualSequence, Routing
from ..nn.norm import check_bn_mode


@dataclass
class StageSpec:
    """One stage of a :class:`CifarNet`.

    Attributes:
        width: channels of the stage.
        blocks: plain stage: number of residual blocks (the downsampling one included).
        units: reset stage: pool size n (0 means a plain stage).
        iterations: reset stage: number of iterations k.
        transition: how a reset stage changes width: "conv" (strided conv-BN-ReLU, the
            paper's ReSet-38) or "block" (He et al.'s downsampling residual block, so that
            a trained ResNet's stages can be moved into pools, Sec. 5.1). Plain stages
            always use the downsampling block.
    """

    width: int
    blocks: int = 0
    units: int = 0
    iterations: int = 0
    transition: str = "conv"

    @property
    def is_reset(self) -> bool:
        return self.units > 0


@dataclass
class ReSetOptions:
    """Options shared by every ReSet module of a model (see :class:`resetnet.nn.ReSet`).

    Attributes:
        controller: "rnn" or "cnn".
        scorer: "softmax", "gumbel_softmax", "gumbel_st" or "topk".
        zero_unit: add the zero unit (skip) to every pool.
        unit_bn: "per_iteration" (default: each CU keeps one BN per iteration, because
            a CU's input statistics depend on the iteration it runs at; Jastrzebski et
            al. 2017) or "shared" (one BN per CU, as in a plain ResNet).
        temperature: Gumbel temperature.
        topk: k for the top-k scorer.
        execution: eval-mode execution, "auto", "naive", "sparse" or "fused".
        train_execution: train-mode execution ("auto": every unit runs, the paper's
            straight-through estimator; "sparse": the truncated estimator, docs/execution.md).
        controller_options: extra arguments of the controller (e.g. hidden_dim).
    """

    controller: str = "rnn"
    scorer: str = "softmax"
    zero_unit: bool = True
    unit_bn: str = "per_iteration"
    temperature: float = 1.0
    topk: int = 1
    execution: str = "auto"
    train_execution: str = "auto"
    controller_options: dict[str, Any] = field(default_factory=dict)


class CifarNet(nn.Module):
    """Stem, stages, head. ``forward(x)`` returns logits; ``forward(x, return_routing=True)``
    returns ``(logits, routing)`` with one :class:`~resetnet.nn.Routing` per ReSet module.

    Args:
        stages: the stage specifications, in order.
        num_classes: classifier outputs.
        in_channels: image channels.
        stem_width: channels after the stem.
        stem_maxpool: end the stem with a 3x3 stride-2 max-pool, as the paper's ReSet-38
            (Sec. 4, item 1: "a convolutional layer, followed by a batch normalization,
            ReLU, and a max pooling"); it quarters the spatial area of every stage. False
            is He et al.'s CIFAR stem. The zoo sets it per model (docs/model.md).
        reset_options: options for every ReSet stage.
    """

    def __init__(
        self,
        stages: list[StageSpec],
        num_classes: int = 10,
        in_channels: int = 3,
        stem_width: int = 16,
        stem_maxpool: bool = True,
        reset_options: ReSetOptions | None = None,
    ) -> None:
        super().__init__()
        opts = reset_options or ReSetOptions()
        check_bn_mode(opts.unit_bn)
        self.stage_specs = list(stages)
        self.stem_maxpool = bool(stem_maxpool)
        stem: list[nn.Module] = [ConvBNReLU(in_channels, stem_width)]
        if stem_maxpool:
            stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem)
        self.transitions = nn.ModuleList()
        self.stages = nn.ModuleList()
        # ReSet arguments shared by every reset stage (temperature and k only for the scorers that take them).
        reset_kw: dict[str, Any] = dict(
            controller=opts.controller, scorer=opts.scorer, zero_unit=opts.zero_unit, execution=opts.execution, train_execution=opts.train_execution
        )
        reset_kw["temperature"] = opts.temperature if opts.scorer in ("gumbel_softmax", "gumbel_st") else None
        reset_kw["k"] = opts.topk if opts.scorer == "topk" else None
        width = stem_width
        for spec in stages:
            if spec.is_reset and spec.transition not in ("conv", "block"):
                raise ValueError(f"unknown stage transition {spec.transition!r}; valid: conv, block")
            if not spec.is_reset and spec.blocks < 1:
                raise ValueError(f"a plain stage needs blocks >= 1, got {spec.blocks}")
            change = spec.width != width
            if not change:
                self.transitions.append(nn.Identity())
            elif spec.is_reset and spec.transition == "conv":
                self.transitions.append(ConvBNReLU(width, spec.width, stride=2))
            else:
                self.transitions.append(DownsampleBlock(width, spec.width))
            if spec.is_reset:
                bn_iterations = spec.iterations if opts.unit_bn == "per_iteration" else 1
                units = [BasicBlock(spec.width, bn_iterations=bn_iterations) for _ in range(spec.units)]
                self.stages.append(ReSet(units, spec.iterations, channels=spec.width, controller_options=dict(opts.controller_options), **reset_kw))
            else:  # the downsampling block is the stage's first block
                blocks = spec.blocks - 1 if change else spec.blocks
                self.stages.append(ResidualSequence([BasicBlock(spec.width) for _ in range(blocks)]))
            width = spec.width
        self.head_norm = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)
        self.num_features = width
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # He init (Sec. 5.1)

    def reset_modules(self) -> list[ReSet]:
        """The ReSet modules, in forward order."""
        return [m for m in self.stages if isinstance(m, ReSet)]

    def forward_features(self, x: torch.Tensor, return_routing: bool = False):
        """Representation after the head's BN-ReLU, before pooling: (B, C, H, W)."""
        if x.dim() != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        routing: list[Routing] = []
        x = self.stem(x)
        for transition, stage in zip(self.transitions, self.stages):
            x = transition(x)
            if isinstance(stage, ReSet):
                x, r = stage(x, return_routing=True)
                routing.append(r)
            else:
                x = stage(x)
        x = torch.relu(self.head_norm(x))
        return (x, routing) if return_routing else x

    def forward(self, x: torch.Tensor, return_routing: bool = False):
        features, routing = self.forward_features(x, return_routing=True)
        logits = self.fc(features.mean(dim=(2, 3)))
        return (logits, routing) if return_routing else logits

"""Controllers: networks that score the computational units at every ReSet iteration.

| name | design |
| --- | --- |
| ``cnn`` | paper Fig. 2a: bias-free conv, per-iteration BN, ReLU, global average pool, FC |
| ``rnn`` | paper Fig. 2b: the same conv front, then an LSTM cell (state across iterations), FC |
| ``rnn_gap`` | our variant: global average pool, linear, LSTM cell, linear (no conv; cheaper) |

Controller protocol: any ``nn.Module`` providing::

    initial_state(x: Tensor) -> state          # optional (else None); once per ReSet forward: C.reset_state()
    forward(x: Tensor, iteration: int, state) -> (logits: Tensor (B, n_outputs), new_state)

``x`` is the representation (B, C, H, W), ``iteration`` the 0-based ReSet iteration j,
``state`` whatever the controller carries between iterations (``None`` if stateless).
``n_outputs`` is the number of units, plus one for the zero unit (the last logit).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class ConvFeatures(nn.Module):
    """The shared front of both paper controllers (Fig. 2a, 2b): ``x -> (B, hidden)``.

    bias-free conv3x3 -> BatchNorm of iteration j -> ReLU -> global average pool. One BatchNorm per
    iteration, as the paper recommends (Jastrzebski et al. 2017: the statistics change between iterations).

    Args:
        channels: channels C of the module's representation.
        iterations: number of ReSet iterations k (number of BatchNorm copies).
        hidden_channels: output channels of the conv (default: C // 2, at least 8; our
            choice, the paper gives none: it keeps ReSet-38's dense cost within 10% of ResNet-38's).
        stride: stride of the conv (2 quarters its cost; our choice, the paper gives none).
    """

    def __init__(self, channels: int, iterations: int, hidden_channels: int | None = None, stride: int = 2) -> None:
        super().__init__()
        self.out_features = hidden_channels or max(channels // 2, 8)
        self.conv = nn.Conv2d(channels, self.out_features, 3, stride=stride, padding=1, bias=False)
        self.norms = nn.ModuleList(nn.BatchNorm2d(self.out_features) for _ in range(iterations))

    def forward(self, x: torch.Tensor, iteration: int) -> torch.Tensor:
        return F.relu(self.norms[iteration](self.conv(x))).mean(dim=(2, 3))


class CNNController(nn.Module):
    """Convolutional controller (paper Fig. 2a): :class:`ConvFeatures` -> FC. Stateless.

    Args:
        channels: channels C of the module's representation.
        num_outputs: number of logits (units, plus one for the zero unit).
        iterations: number of ReSet iterations k (number of BatchNorm copies).
        hidden_channels: output channels of the conv (default: C // 2).
        stride: stride of the conv (our choice: 2).
    """

    def __init__(self, channels: int, num_outputs: int, iterations: int, hidden_channels: int | None = None, stride: int = 2) -> None:
        super().__init__()
        self.features = ConvFeatures(channels, iterations, hidden_channels, stride)
        self.fc = nn.Linear(self.features.out_features, num_outputs)

    def initial_state(self, x: torch.Tensor) -> None:
        return None

    def forward(self, x: torch.Tensor, iteration: int, state: Any = None):
        return self.fc(self.features(x, iteration)), None


class RNNController(nn.Module):
    """Recurrent controller (paper Fig. 2b): :class:`ConvFeatures` -> ``LSTMCell`` -> FC to logits.

    The LSTM's (h, c) state lives across the k iterations of one module ("along with x_i, an
    intermediate LSTM layer stores the hidden state").

    Args:
        channels: channels C of the module's representation.
        num_outputs: number of logits (units, plus one for the zero unit).
        iterations: number of ReSet iterations k (number of BatchNorm copies).
        hidden_dim: size of the LSTM state (our choice: 32; the paper gives none).
        hidden_channels: output channels of the conv (default: C // 2).
        stride: stride of the conv (our choice: 2).
    """

    def __init__(
        self, channels: int, num_outputs: int, iterations: int, hidden_dim: int = 32, hidden_channels: int | None = None, stride: int = 2
    ) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.features = ConvFeatures(channels, iterations, hidden_channels, stride)
        self.cell = nn.LSTMCell(self.features.out_features, hidden_dim)
        self.fc = nn.Linear(hidden_dim, num_outputs)

    def initial_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.new_zeros(x.shape[0], self.hidden_dim, dtype=self.fc.weight.dtype)
        return h, h

    def forward(self, x: torch.Tensor, iteration: int, state: tuple[torch.Tensor, torch.Tensor]):
        h, c = self.cell(self.features(x, iteration), state)
        return self.fc(h), (h, c)


class PooledRNNController(nn.Module):
    """Our lighter recurrent variant ``rnn_gap`` (not the paper's): no convolution.

    global average pool -> linear embedding (+ a learned iteration embedding) -> ReLU ->
    ``LSTMCell`` -> linear layer to logits. It reads only the channel means of x, so it
    costs almost nothing next to the units.

    Args:
        channels: channels C of the module's representation.
        num_outputs: number of logits (units, plus one for the zero unit).
        iterations: number of ReSet iterations k (size of the iteration embedding).
        embed_dim: size of the LSTM input embedding.
        hidden_dim: size of the LSTM state.
    """

    def __init__(self, channels: int, num_outputs: int, iterations: int, embed_dim: int = 32, hidden_dim: int = 32) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.embed = nn.Linear(channels, embed_dim)
        self.iteration_embed = nn.Embedding(iterations, embed_dim)
        nn.init.zeros_(self.iteration_embed.weight)
        self.cell = nn.LSTMCell(embed_dim, hidden_dim)
        self.head = nn.Linear(hidden_dim, num_outputs)

    def initial_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.new_zeros(x.shape[0], self.hidden_dim, dtype=self.head.weight.dtype)
        return h, h

    def forward(self, x: torch.Tensor, iteration: int, state: tuple[torch.Tensor, torch.Tensor]):
        z = F.relu(self.embed(x.mean(dim=(2, 3))) + self.iteration_embed.weight[iteration])
        h, c = self.cell(z, state)
        return self.head(h), (h, c)


CONTROLLERS: dict[str, Callable[..., nn.Module]] = {"rnn": RNNController, "cnn": CNNController, "rnn_gap": PooledRNNController}


def build_controller(spec: str | nn.Module, channels: int, num_outputs: int, iterations: int, **options: Any) -> nn.Module:
    """A controller from a registered name (``"rnn"``, ``"cnn"``, ``"rnn_gap"``) or a user module (returned as is)."""
    if isinstance(spec, nn.Module):
        if options:
            raise ValueError(f"controller options {sorted(options)} given with a controller module; configure the module instead")
        return spec
    if spec not in CONTROLLERS:
        raise ValueError(
            f"unknown controller {spec!r}; valid controllers: {', '.join(CONTROLLERS)} or an nn.Module following the controller protocol"
        )
    return CONTROLLERS[spec](channels, num_outputs, iterations, **options)

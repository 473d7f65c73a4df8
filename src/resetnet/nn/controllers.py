"""Controllers: networks that score the computational units at every ReSet iteration.

Controller protocol
-------------------
Any ``nn.Module`` can be a controller if it provides::

    initial_state(x: Tensor) -> state          # optional; called once per ReSet forward
    forward(x: Tensor, iteration: int, state) -> (logits: Tensor (B, n_outputs), new_state)

``x`` is the current representation (B, C, H, W), ``iteration`` the 0-based
index j of the ReSet iteration, and ``state`` whatever the controller wants
to carry between the iterations of one module (``None`` for stateless
controllers). ``initial_state`` implements ``C.reset_state()`` of
Algorithm 1; when it is missing the state starts as ``None``. ``n_outputs``
is the number of units plus one when the module has a zero unit; the zero
unit is the last logit.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


class RNNController(nn.Module):
    """Recurrent controller (paper Fig. 2b).

    global-average-pool -> linear embedding (+ learned iteration embedding) -> ReLU
    -> ``LSTMCell`` whose (h, c) state lives across the k iterations of one
    module -> linear layer to logits.

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
        pooled = x.mean(dim=(2, 3))
        z = F.relu(self.embed(pooled) + self.iteration_embed.weight[iteration])
        h, c = self.cell(z, state)
        return self.head(h), (h, c)


class CNNController(nn.Module):
    """Convolutional controller (paper Fig. 2a).

    bias-free conv3x3 -> per-iteration BatchNorm -> ReLU -> global-average-pool -> FC.
    One BatchNorm per iteration, as recommended by Jastrzebski et al. (2017).

    Args:
        channels: channels C of the module's representation.
        num_outputs: number of logits (units, plus one for the zero unit).
        iterations: number of ReSet iterations k (number of BatchNorm copies).
        hidden_channels: output channels of the conv (default: C).
        stride: stride of the conv (2 halves its cost; our choice).
    """

    def __init__(self, channels: int, num_outputs: int, iterations: int, hidden_channels: int | None = None, stride: int = 2) -> None:
        super().__init__()
        hidden = hidden_channels or channels
        self.conv = nn.Conv2d(channels, hidden, 3, stride=stride, padding=1, bias=False)
        self.norms = nn.ModuleList(nn.BatchNorm2d(hidden) for _ in range(iterations))
        self.fc = nn.Linear(hidden, num_outputs)

    def initial_state(self, x: torch.Tensor) -> None:
        return None

    def forward(self, x: torch.Tensor, iteration: int, state: Any = None):
        z = F.relu(self.norms[iteration](self.conv(x)))
        return self.fc(z.mean(dim=(2, 3))), None


CONTROLLERS: dict[str, Callable[..., nn.Module]] = {"rnn": RNNController, "cnn": CNNController}


def build_controller(spec: str | nn.Module, channels: int, num_outputs: int, iterations: int, **options: Any) -> nn.Module:
    """A controller from a registered name (``"rnn"``, ``"cnn"``) or a user module (returned as is)."""
    if isinstance(spec, nn.Module):
        if options:
            raise ValueError(f"controller options {sorted(options)} given with a controller module; configure the module instead")
        return spec
    if spec not in CONTROLLERS:
        raise ValueError(f"unknown controller {spec!r}; valid controllers: {', '.join(CONTROLLERS)} or an nn.Module following the controller protocol")
    return CONTROLLERS[spec](channels, num_outputs, iterations, **options)

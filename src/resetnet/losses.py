"""Routing regularizers: the entropy term (Eq. 13) and the Hybrid-RL skip reward (Eq. 9).

Eq. 13 is taken of the unit weights y of dense scorers (``softmax``, ``gumbel_softmax``) and of the controller's
probabilities ``softmax(logits)`` for hard scorers (``Routing.hard``: ``gumbel_st``, ``topk``), whose 0/1 weights
have an entropy that is constant almost everywhere and a gradient at 0 set by the log's clamp, not by the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .nn.routing import Routing

_EPS = 1e-12


def _as_weights(items: Sequence[Routing | torch.Tensor]) -> list[torch.Tensor]:
    """The distributions Eq. 13 is taken of: the weights, or a hard scorer's probabilities."""
    out = []
    for item in items:
        w = item
        if isinstance(item, Routing):
            w = item.probabilities() if item.hard else item.weights
        if w.dim() == 2:  # a single invocation (B, n_outputs)
            w = w.unsqueeze(1)
        if w.dim() != 3:
            raise ValueError(f"routing weights must have shape (B, iterations, n_outputs), got {tuple(w.shape)}")
        out.append(w)
    return out


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy (nats) along ``dim``; finite with exact zeros (0 log 0 = 0, finite gradient)."""
    return -(p * p.clamp_min(_EPS).log()).sum(dim)


class EntropyTerms(NamedTuple):
    """The two sums of Eq. 13 (nats): ``batch = sum_i H(mean_b y_i)``, ``sample = sum_i mean_b H(y_i)``."""

    batch: torch.Tensor
    sample: torch.Tensor


def entropy_terms(weights: Sequence[Routing | torch.Tensor], marginal_reduce=None) -> EntropyTerms:
    """``(sum_i H(mean_b y_i), sum_i mean_b H(y_i))`` over every controller invocation i.

    ``marginal_reduce``, if given, maps each batch mean ``(iterations, n_outputs)`` to a global mean (over all ranks).
    """
    batch_terms, sample_terms = [], []
    for w in _as_weights(weights):
        w = w.float()
        marginal = w.mean(dim=0)  # (iterations, n_outputs): mean over the batch of y_i
        if marginal_reduce is not None:
            marginal = marginal_reduce(marginal)
        batch_terms.append(entropy(marginal).sum())
        sample_terms.append(entropy(w).mean(dim=0).sum())
    if not batch_terms:
        zero = torch.zeros(())
        return EntropyTerms(zero, zero)
    return EntropyTerms(torch.stack(batch_terms).sum(), torch.stack(sample_terms).sum())


def entropy_regularizer(
    weights: Sequence[Routing | torch.Tensor], lambda_batch: float, lambda_sample: float, marginal_reduce=None, *, return_terms: bool = False
) -> torch.Tensor | tuple[torch.Tensor, EntropyTerms]:
    """Eq. 13: ``-lambda_batch * sum_i H(E_batch y_i) + lambda_sample * sum_i E_batch H(y_i)`` over every invocation i.

    ``weights`` is the ``routing`` list a model returns (or raw (B, k, n) tensors); a hard scorer's routing
    contributes its probabilities. With ``return_terms`` the two entropy sums come back too, for logging.
    """
    terms = entropy_terms(weights, marginal_reduce)
    reg = -lambda_batch * terms.batch + lambda_sample * terms.sample
    return (reg, terms) if return_terms else reg


def routing_log_prob(routing: Sequence[Routing]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_prob (B,), skips (B, t))``: log-probability under softmax(logits) of the route chosen by the arg-max
    weights, and the skip indicators of all t invocations."""
    log_probs, skips = [], []
    for r in routing:
        chosen = r.weights.argmax(dim=-1)  # (B, k)
        logp = F.log_softmax(r.logits.float(), dim=-1).gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
        log_probs.append(logp.sum(dim=1))
        skips.append(r.skip_mask().float())
    return torch.stack(log_probs).sum(0), torch.cat(skips, dim=1)


class HybridSkipReward(nn.Module):
    """Hybrid-RL skip reward (Eq. 9; SkipNet's hybrid RL) for hard scorers, added to the supervised loss.

    A sample's return is ``R = -CE + sum_k R_k * skip_k`` (``skip_k``: invocation k chose the zero unit); the loss is
    ``-mean_b((R_b - baseline) * log pi(route_b))`` with ``baseline`` a moving average (factor ``momentum``) of the
    previous batches' mean return, started by the first batch. ``reward``: R_k, one value or one per invocation.
    """

    def __init__(self, reward: float | Sequence[float] = 0.1, momentum: float = 0.9) -> None:
        super().__init__()
        self.register_buffer("reward", torch.as_tensor(reward, dtype=torch.float32).reshape(-1))
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.momentum = float(momentum)

    def forward(self, routing: Sequence[Routing], per_sample_ce: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Returns ``(reinforce_loss, stats)``; ``per_sample_ce`` is the (B,) cross-entropy."""
        log_prob, skips = routing_log_prob(routing)
        reward = self.reward.to(skips.device)
        if reward.numel() not in (1, skips.shape[1]):
            raise ValueError(f"skip reward has {reward.numel()} values; expected 1 or one per invocation ({skips.shape[1]})")
        ret = -per_sample_ce.detach().float() + (skips * reward).sum(dim=1)
        with torch.no_grad():
            mean = ret.mean()
            if not bool(self.initialized):
                self.baseline.copy_(mean)  # first batch: the baseline starts at its mean return
                self.initialized.fill_(True)
            # The advantage uses the baseline of the batches before this one (no self-reference).
            advantage = (ret - self.baseline).detach()
            if self.training:
                self.baseline.mul_(self.momentum).add_((1 - self.momentum) * mean)
        loss = -(advantage * log_prob).mean()
        return loss, {"skip_rate": float(skips.mean()), "return": float(mean), "baseline": float(self.baseline)}

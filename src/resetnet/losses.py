"""Routing regularizers: the entropy term (Eq. 13) and the Hybrid-RL skip reward (Eq. 9).

Eq. 13 is computed on the unit weights y of dense scorers (``softmax``,
``gumbel_softmax``). For hard scorers (``gumbel_st``, ``topk``; ``Routing.hard``) it is
computed on the controller's probabilities ``softmax(logits)``: the hard weights are
exact zeros and ones, so their entropy is 0 or constant almost everywhere, and at an
exact zero the gradient of ``y log y`` would be set by the clamp that keeps the log
finite, not by the model.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .nn.routing import Routing

_EPS = 1e-12


def _as_weights(items: Sequence[Routing | torch.Tensor]) -> list[torch.Tensor]:
    """The distributions Eq. 13 is taken of: the weights, or a hard scorer's probabilities."""
    out = []
    for item in items:
        if isinstance(item, Routing):
            w = item.probabilities() if item.hard else item.weights
        else:
            w = item
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

    ``marginal_reduce``, if given, maps the per-invocation batch means (a tensor of
    shape (iterations, n_outputs)) and the batch size to a global mean; the
    distributed trainer uses it to average the marginals over all ranks.
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
    weights: Sequence[Routing | torch.Tensor],
    lambda_batch: float,
    lambda_sample: float,
    marginal_reduce=None,
    *,
    return_terms: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, EntropyTerms]:
    """Eq. 13: ``-lambda_batch * sum_i H(E_batch y_i) + lambda_sample * sum_i E_batch H(y_i)``.

    The first term rewards different routes for different images (a spread-out
    batch marginal); the second rewards a decided route for each image. The sum
    runs over every controller invocation i: every module and every iteration.
    ``weights`` is the ``routing`` list a model returns (or raw (B, k, n) tensors);
    a hard scorer's routing contributes its probabilities (module docstring).
    With ``return_terms`` the two entropy sums come back too, for logging.
    """
    terms = entropy_terms(weights, marginal_reduce)
    reg = -lambda_batch * terms.batch + lambda_sample * terms.sample
    return (reg, terms) if return_terms else reg


def routing_log_prob(routing: Sequence[Routing]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample log-probability of the chosen route and the (B, t) skip indicators.

    For each invocation the chosen unit is the arg-max of the (one-hot) weights;
    its log-probability is taken under softmax(logits). Returns ``(log_prob (B,),
    skips (B, t))`` with t the total number of invocations.
    """
    log_probs, skips = [], []
    for r in routing:
        chosen = r.weights.argmax(dim=-1)  # (B, k)
        logp = F.log_softmax(r.logits.float(), dim=-1).gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
        log_probs.append(logp.sum(dim=1))
        skips.append(r.skip_mask().float())
    return torch.stack(log_probs).sum(0), torch.cat(skips, dim=1)


class HybridSkipReward(nn.Module):
    """Hybrid-RL skip reward (Eq. 9; SkipNet's hybrid RL), for hard scorers.

    The return of a sample is ``R = -CE + sum_k R_k * skip_k`` where ``skip_k``
    says whether invocation k chose the zero unit. The REINFORCE term is
    ``-mean_b((R_b - baseline) * log pi(route_b))``, with ``baseline`` a moving
    average of the mean return over the previous batches (the first batch's mean
    starts it); it is added to the supervised loss.

    Args:
        reward: R_k, a constant or a sequence with one value per invocation k.
        momentum: moving-average factor of the baseline.
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

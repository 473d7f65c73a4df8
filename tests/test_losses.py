"""Entropy regularizer (Eq. 13) and Hybrid-RL skip reward (Eq. 9) on hand-computed cases."""

import math

import pytest
import torch

from resetnet.losses import HybridSkipReward, entropy, entropy_regularizer, entropy_terms, routing_log_prob
from resetnet.nn import Routing

LOG2, LOG3, LOG4 = math.log(2), math.log(3), math.log(4)
# mixed example: sample a = (1/2, 1/2, 0), sample b = (1/4, 1/4, 1/2)
H_A = LOG2  # -(2 * 1/2 log 1/2)
H_B = 1.5 * LOG2  # -(2 * 1/4 log 1/4 + 1/2 log 1/2) = 1/2 log 4 + 1/2 log 2
H_MARGINAL = -(2 * 0.375 * math.log(0.375) + 0.25 * math.log(0.25))  # marginal (3/8, 3/8, 1/4)

ONE_HOT = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
MIXED = [[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]]
UNIFORM3 = [[1 / 3] * 3, [1 / 3] * 3]


def _w(*iterations):
    """(B, k, n) from k per-iteration (B, n) lists."""
    return torch.tensor(iterations).transpose(0, 1).contiguous()


def test_entropy_function():
    torch.testing.assert_close(entropy(torch.tensor([0.5, 0.5, 0.0])), torch.tensor(LOG2))
    assert entropy(torch.tensor([1.0, 0.0])).item() == 0.0


def test_one_hot_weights():
    w = _w(ONE_HOT).requires_grad_()
    h_batch, h_sample = entropy_terms([w])
    assert h_sample.item() == 0.0
    torch.testing.assert_close(h_batch, torch.tensor(LOG2))  # marginal (1/2, 1/2, 0)
    reg = entropy_regularizer([w], lambda_batch=0.3, lambda_sample=0.7)
    torch.testing.assert_close(reg, torch.tensor(-0.3 * LOG2))
    reg.backward()
    assert torch.isfinite(w.grad).all()
    # d/dw_bi of -0.3 H(m) + 0.7 mean_b H(w_b): 0.3 (log m_i + 1) / B - 0.7 (log w_bi + 1) / B
    torch.testing.assert_close(w.grad[0, 0, 0], torch.tensor(0.3 * (math.log(0.5) + 1) / 2 - 0.7 * (0 + 1) / 2))


def test_identical_one_hot_weights_finite_gradient():
    w = _w([[0.0, 1.0], [0.0, 1.0]]).requires_grad_()
    reg = entropy_regularizer([w], 1.0, 1.0)
    assert reg.item() == 0.0  # marginal is one-hot too
    reg.backward()
    assert torch.isfinite(w.grad).all()


def test_uniform_weights():
    w = torch.full((3, 1, 4), 0.25)
    h_batch, h_sample = entropy_terms([w])
    torch.testing.assert_close(h_sample, torch.tensor(LOG4))
    torch.testing.assert_close(h_batch, torch.tensor(LOG4))
    torch.testing.assert_close(entropy_regularizer([w], 1.0, 2.0), torch.tensor(LOG4))


def test_two_sample_mixed_example():
    w = _w(MIXED)
    h_batch, h_sample = entropy_terms([w])
    torch.testing.assert_close(h_sample, torch.tensor((H_A + H_B) / 2))
    torch.testing.assert_close(h_batch, torch.tensor(H_MARGINAL))
    torch.testing.assert_close(entropy_regularizer([w], 0.5, 0.25), torch.tensor(-0.5 * H_MARGINAL + 0.25 * (H_A + H_B) / 2))


def test_sum_over_modules_and_iterations():
    module1 = _w(ONE_HOT, MIXED)  # (B=2, k=2, n=3)
    module2 = _w(UNIFORM3, MIXED)
    assert module1.shape == (2, 2, 3)
    h_batch, h_sample = entropy_terms([module1, module2])
    torch.testing.assert_close(h_batch, torch.tensor(LOG2 + H_MARGINAL + LOG3 + H_MARGINAL))
    torch.testing.assert_close(h_sample, torch.tensor(0.0 + (H_A + H_B) / 2 + LOG3 + (H_A + H_B) / 2))
    # Routing records give the same; a (B, n) tensor is one invocation
    routings = [Routing(torch.zeros_like(module1), module1), Routing(torch.zeros_like(module2), module2)]
    torch.testing.assert_close(entropy_terms(routings)[0], h_batch)
    torch.testing.assert_close(entropy_terms([torch.tensor(MIXED)])[0], torch.tensor(H_MARGINAL))
    with pytest.raises(ValueError, match=r"\(B, iterations, n_outputs\)"):
        entropy_terms([torch.zeros(2, 2, 2, 3)])


def test_marginal_reduce_applies_to_the_batch_term_only():
    w = _w(ONE_HOT)
    other_rank = torch.tensor([[0.0, 0.0, 1.0]])  # another rank's marginal
    h_batch, h_sample = entropy_terms([w], marginal_reduce=lambda m: (m + other_rank) / 2)
    torch.testing.assert_close(h_batch, torch.tensor(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))))
    assert h_sample.item() == 0.0


# ------------------------------------------------------------- hybrid RL
def _hand_routing(requires_grad=False):
    # module 1: B=2, k=2, two units + zero unit (index 2)
    l1 = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]], [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]], requires_grad=requires_grad)
    w1 = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]])
    # module 2: B=2, k=1, one unit + zero unit; sample 1 picks the lower logit (a sampled route)
    l2 = torch.tensor([[[0.0, 0.0]], [[-1.0, 1.0]]], requires_grad=requires_grad)
    w2 = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])
    e = math.e
    logp = [
        (2 - math.log(e**2 + 2)) + (3 - math.log(1 + e + e**3)) + (-math.log(2)),
        (1 - math.log(2 + e)) + (-math.log(3)) + (-1 - math.log(e + 1 / e)),
    ]
    skips = [[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    return [Routing(l1, w1), Routing(l2, w2)], logp, skips


def test_routing_log_prob_hand_example():
    routing, logp, skips = _hand_routing()
    log_prob, skip = routing_log_prob(routing)
    torch.testing.assert_close(log_prob, torch.tensor(logp))
    assert torch.equal(skip, torch.tensor(skips))


def test_hybrid_skip_reward_loss_and_baseline():
    routing, logp, _ = _hand_routing(requires_grad=True)
    reward = HybridSkipReward(reward=0.1, momentum=0.9).train()
    ce = torch.tensor([0.5, 1.5], requires_grad=True)
    loss, stats = reward(routing, ce)
    # returns: -0.5 + 2 * 0.1 = -0.3 and -1.5 + 2 * 0.1 = -1.3; first call: baseline = mean = -0.8
    adv = [-0.3 - (-0.8), -1.3 - (-0.8)]
    expected = -(adv[0] * logp[0] + adv[1] * logp[1]) / 2
    torch.testing.assert_close(loss, torch.tensor(expected))
    assert stats["skip_rate"] == pytest.approx(4 / 6)
    assert stats["baseline"] == pytest.approx(-0.8)
    assert stats["return"] == pytest.approx(-0.8)
    loss.backward()
    assert ce.grad is None  # the reward never trains through the cross-entropy
    # d loss / d logits = -(adv_b / B) * (onehot(chosen) - softmax(logits))
    l1, w1 = routing[0].logits, routing[0].weights
    expected_grad = -(torch.tensor(adv).view(2, 1, 1) / 2) * (w1 - torch.softmax(l1.detach(), -1))
    torch.testing.assert_close(l1.grad, expected_grad)

    # second call: returns -0.1 + 0.2 = 0.1 and -0.9 + 0.2 = -0.7;
    # moving average 0.9 * -0.8 + 0.1 * mean(0.1, -0.7) = -0.75
    loss2, stats2 = reward(routing, torch.tensor([0.1, 0.9]))
    assert stats2["baseline"] == pytest.approx(-0.75)
    assert reward.baseline.item() == pytest.approx(-0.75)
    adv2 = [0.1 + 0.8, -0.7 + 0.8]  # the advantage uses the baseline before this batch
    torch.testing.assert_close(loss2.detach(), torch.tensor(-(adv2[0] * logp[0] + adv2[1] * logp[1]) / 2))

    # eval mode: no baseline update
    reward.eval()
    _, stats3 = reward(routing, torch.tensor([5.0, 5.0]))
    assert stats3["baseline"] == pytest.approx(-0.75)


def test_hybrid_skip_reward_per_invocation_rewards():
    routing, logp, _ = _hand_routing()
    reward = HybridSkipReward(reward=[0.1, 0.2, 0.3])
    ce = torch.tensor([1.0, 2.0])
    loss, stats = reward(routing, ce)
    ret = [-1.0 + 0.2 + 0.3, -2.0 + 0.1 + 0.2]  # skips (0,1,1) and (1,1,0)
    mean = sum(ret) / 2
    torch.testing.assert_close(loss, torch.tensor(-((ret[0] - mean) * logp[0] + (ret[1] - mean) * logp[1]) / 2))
    assert stats["return"] == pytest.approx(mean)
    with pytest.raises(ValueError, match=r"skip reward has 2 values; expected 1 or one per invocation \(3\)"):
        HybridSkipReward(reward=[0.1, 0.2])(routing, ce)


def test_skip_rate_is_fraction_of_zero_unit_choices():
    # B=4, k=2: zero unit (index 3) chosen 3 times out of 8
    route = torch.tensor([[3, 0], [1, 3], [2, 2], [3, 1]])
    w = torch.nn.functional.one_hot(route, 4).float()
    _, stats = HybridSkipReward()([Routing(torch.zeros(4, 2, 4), w)], torch.zeros(4))
    assert stats["skip_rate"] == pytest.approx(3 / 8)
    # without a zero unit nothing is ever skipped
    _, stats = HybridSkipReward()([Routing(torch.zeros(4, 2, 4), w, zero_unit=False)], torch.zeros(4))
    assert stats["skip_rate"] == 0.0

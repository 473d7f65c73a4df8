"""Scorers: train/eval behaviour, exact zeros, straight-through gradients, temperature."""

import pytest
import torch
import torch.nn.functional as F

import resetnet
from resetnet.nn import SCORERS, GumbelSoftmaxScorer, GumbelSTScorer, SoftmaxScorer, TopKScorer, build_scorer, set_temperature


def _logits(b=6, n=5):
    return torch.randn(b, n) * 2


def test_registered_scorer_names():
    assert list(SCORERS) == ["softmax", "gumbel_softmax", "gumbel_st", "topk"]
    assert isinstance(build_scorer("softmax"), SoftmaxScorer)
    assert isinstance(build_scorer("gumbel_softmax", temperature=0.3), GumbelSoftmaxScorer)
    assert build_scorer("gumbel_st", temperature=0.3).temperature == 0.3
    assert build_scorer("topk", k=2).k == 2
    instance = TopKScorer(3)
    assert build_scorer(instance) is instance
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="top-k scorer needs an integer k >= 1"):
            TopKScorer(bad)


def test_unknown_scorer_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown scorer 'sparsemax'.*softmax.*gumbel_softmax.*gumbel_st.*topk"):
        build_scorer("sparsemax")


def test_bad_scorer_option():
    with pytest.raises(ValueError, match=r"bad options .*'softmax'"):
        build_scorer("softmax", k=2)
    with pytest.raises(ValueError, match=r"k >= 1"):
        TopKScorer(0)


# ------------------------------------------------------------------ softmax
def test_softmax_same_in_train_and_eval():
    s = SoftmaxScorer()
    logits = _logits()
    y_train = s.train()(logits)
    y_eval = s.eval()(logits)
    assert torch.equal(y_train, y_eval)
    torch.testing.assert_close(y_train, torch.softmax(logits, -1))
    assert (y_train > 0).all()
    torch.testing.assert_close(y_train.sum(-1), torch.ones(6))


# ----------------------------------------------------------- gumbel softmax
def test_gumbel_softmax_stochastic_in_train():
    s = GumbelSoftmaxScorer(temperature=0.7).train()
    logits = _logits()
    a, b = s(logits), s(logits)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a.sum(-1), torch.ones(6))
    assert (a >= 0).all()
    # the noise comes from the global RNG: reseeding reproduces the sample
    torch.manual_seed(11)
    c = s(logits)
    torch.manual_seed(11)
    d = s(logits)
    assert torch.equal(c, d)


@pytest.mark.parametrize("tau", [0.25, 1.0, 3.0])
def test_gumbel_softmax_deterministic_in_eval(tau):
    s = GumbelSoftmaxScorer(temperature=tau).eval()
    logits = _logits()
    a, b = s(logits), s(logits)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, torch.softmax(logits / tau, -1))


@pytest.mark.parametrize("cls", [GumbelSoftmaxScorer, GumbelSTScorer])
def test_gumbel_max_sampling_frequencies(cls):
    """argmax(logits + g) with g ~ Gumbel(0, 1) is a sample of softmax(logits), whatever tau is."""
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    s = cls(temperature=0.5).train()
    y = s(logits.expand(20000, 4).clone())
    freq = torch.bincount(y.argmax(-1), minlength=4).float() / 20000
    torch.testing.assert_close(freq, torch.softmax(logits, -1), atol=0.015, rtol=0)


# -------------------------------------------------------- straight-through
def _is_exact_one_hot(y):
    nonzero = (y != 0).sum(-1)
    return bool((nonzero == 1).all()) and torch.allclose(y.sum(-1), torch.ones(y.shape[0]), atol=1e-6, rtol=0)


def test_gumbel_st_train_exact_one_hot_and_stochastic():
    s = GumbelSTScorer(temperature=1.0).train()
    logits = torch.zeros(64, 5)
    y = s(logits)
    assert _is_exact_one_hot(y)
    # equal logits: the sampled unit varies from row to row
    assert y.argmax(-1).unique().numel() > 1
    y2 = s(logits)
    assert not torch.equal(y, y2)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_gumbel_st_eval_is_one_hot_argmax(tau):
    s = GumbelSTScorer(temperature=tau).eval()
    logits = _logits(8, 5)
    y = s(logits)
    expected = F.one_hot(logits.argmax(-1), 5).float()
    assert torch.equal(y == 0, expected == 0)
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)
    assert torch.equal(s(logits), y)


def test_gumbel_st_gradient_is_gumbel_softmax_gradient():
    logits = _logits()
    upstream = torch.randn(6, 5)
    # eval: the gradient of softmax(logits / tau)
    l1 = logits.clone().requires_grad_()
    (GumbelSTScorer(0.5).eval()(l1) * upstream).sum().backward()
    l2 = logits.clone().requires_grad_()
    (torch.softmax(l2 / 0.5, -1) * upstream).sum().backward()
    torch.testing.assert_close(l1.grad, l2.grad)
    assert l1.grad.abs().sum() > 0
    # train: the gradient of the Gumbel-softmax sample with the same noise
    l3 = logits.clone().requires_grad_()
    torch.manual_seed(5)
    (GumbelSTScorer(0.5).train()(l3) * upstream).sum().backward()
    l4 = logits.clone().requires_grad_()
    torch.manual_seed(5)
    (GumbelSoftmaxScorer(0.5).train()(l4) * upstream).sum().backward()
    torch.testing.assert_close(l3.grad, l4.grad)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_keeps_k_softmax_values(k):
    s = TopKScorer(k)
    logits = _logits(8, 5)
    soft = torch.softmax(logits, -1)
    for mode in (True, False):
        y = s.train(mode)(logits)
        assert ((y != 0).sum(-1) == k).all()
        top = logits.topk(k, -1).indices
        mask = torch.zeros_like(y, dtype=torch.bool).scatter_(-1, top, True)
        assert torch.equal(y[mask], soft[mask])  # kept values are the (unrenormalised) softmax values
        assert (y[~mask] == 0).all()


def test_topk_gradient_is_full_softmax_gradient():
    logits = _logits()
    upstream = torch.randn(6, 5)
    l1 = logits.clone().requires_grad_()
    (TopKScorer(2)(l1) * upstream).sum().backward()
    l2 = logits.clone().requires_grad_()
    (torch.softmax(l2, -1) * upstream).sum().backward()
    torch.testing.assert_close(l1.grad, l2.grad)
    # ...which differs from the gradient of the masked output
    l3 = logits.clone().requires_grad_()
    soft = torch.softmax(l3, -1)
    mask = torch.zeros_like(soft).scatter_(-1, soft.topk(2, -1).indices, 1.0)
    ((soft * mask) * upstream).sum().backward()
    assert not torch.allclose(l1.grad, l3.grad)


def test_sparse_flags():
    assert not SoftmaxScorer.sparse and not GumbelSoftmaxScorer.sparse
    assert GumbelSTScorer.sparse and TopKScorer.sparse


# ------------------------------------------------------------- temperature
def test_set_temperature_on_a_model():
    model = resetnet.create_model("reset_t3_3cu2it", scorer="gumbel_softmax", temperature=2.0)
    scorers = [m.scorer for m in model.reset_modules()]
    assert [s.temperature for s in scorers] == [2.0]
    assert set_temperature(model, 0.5) == 1
    assert scorers[0].temperature == 0.5
    # the new temperature is used: eval routing weights are softmax(logits / 0.5)
    model.eval()
    _, routing = model(torch.randn(2, 3, 8, 8), return_routing=True)
    torch.testing.assert_close(routing[0].weights, torch.softmax(routing[0].logits / 0.5, -1))

    model = resetnet.create_model("reset38", scorer="gumbel_st", temperature=0.3)
    assert set_temperature(model, 0.1) == 3
    assert all(m.scorer.temperature == 0.1 for m in model.reset_modules())
    assert set_temperature(resetnet.create_model("reset_t3_3cu2it"), 0.5) == 0  # softmax: nothing to set

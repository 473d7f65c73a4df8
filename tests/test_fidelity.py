"""The paper's model and estimators: stems, the Fig. 2 controllers, Eq. 13 on hard scorers, the
trainer's loss terms, and behaviour of the regularizers over real (tiny) training."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resetnet
from helpers import random_arrays
from resetnet.losses import entropy_regularizer, entropy_terms
from resetnet.nn import CNNController, ConvFeatures, PooledRNNController, ReSet, RNNController, Routing
from resetnet.profile import macs_per_image
from resetnet.train import ConfigError, Trainer, build_data, build_model, load_config, resolve_runtime, train
from resetnet.train.config import list_configs, load_raw, merge
from resetnet.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIRS = [ROOT / "src" / "resetnet" / "configs", ROOT / "src" / "resetnet_experiments" / "configs"]


def _macs(name: str, **kw) -> float:
    return float(macs_per_image(resetnet.create_model(name, **kw).eval(), torch.zeros(1, 3, 32, 32))[0])


# ----------------------------------------------------------------------------- Sec. 4 / Fig. 3: the stems
def test_reset38_has_the_papers_stem_and_resnet38s_cost():
    model = resetnet.create_model("reset38")
    assert isinstance(model.stem[-1], nn.MaxPool2d) and model.stem_maxpool
    dense, resnet = _macs("reset38"), _macs("resnet38")
    assert abs(dense / resnet - 1) < 0.10  # paper: "saving the same number of net's parameters"; SM time 1.92
    he = _macs("reset38", stem_maxpool=False)  # our variant: He et al.'s stem, 4x the area in every pool
    assert he > 3.5 * dense


@pytest.mark.parametrize(
    "reset,baseline",
    [
        ("reset_t3_6cu2it", "resnet_t3"),
        ("reset_t3_3cu2it", "resnet_t3"),
        ("reset_t3_2cu3it", "resnet_t3"),
        ("reset_t3_2cu6it", "resnet_t3"),
        ("reset_t3_3cu3it", "resnet_t3"),
        ("reset_1_1_5", "resnet_1_1_5"),
        ("reset_1_5_1", "resnet_1_5_1"),
        ("reset_5_1_1", "resnet_5_1_1"),
    ],
)
def test_table_baselines_share_the_stem_of_their_reset_rows(reset, baseline):
    a, b = resetnet.create_model(reset), resetnet.create_model(baseline)
    assert a.stem_maxpool and b.stem_maxpool
    assert [type(m) for m in a.stem] == [type(m) for m in b.stem]


@pytest.mark.parametrize("name", ["resnet20", "resnet38", "resnet110", "reset_seq20", "reset_seq38"])
def test_he_models_keep_he_stem(name):
    assert not resetnet.create_model(name).stem_maxpool


def test_zero_and_negative_pool_sizes_are_errors():
    for key in ("units", "iterations"):
        for bad in (0, -1):
            with pytest.raises(ValueError, match=f"{key}.*>= 1"):
                resetnet.create_model("reset_t3_2cu3it", **{key: bad})
    with pytest.raises(ConfigError, match="model.overrides.*units"):
        load_config({"model": {"name": "reset_t3_2cu3it", "overrides": {"units": 0}}})


# ----------------------------------------------------------------------------- Fig. 2: controllers
def _randomized(module: nn.Module) -> nn.Module:
    torch.manual_seed(3)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return module.eval()


@pytest.mark.parametrize("cls", [CNNController, RNNController])
def test_controllers_use_the_batchnorm_of_their_iteration(cls):
    """Fig. 2a/2b: conv (no bias) -> BN of iteration j -> ReLU -> GAP [-> LSTM] -> FC, for every j."""
    k, C, n = 4, 8, 5
    ctrl = _randomized(cls(C, n, k))
    assert ctrl.features.conv.bias is None and len(ctrl.features.norms) == k
    x = torch.randn(3, C, 6, 6)
    state = ctrl.initial_state(x)
    for j in range(k):
        logits, new_state = ctrl(x, j, state)
        z = F.relu(ctrl.features.norms[j](ctrl.features.conv(x))).mean(dim=(2, 3))
        if cls is RNNController:
            h, c = ctrl.cell(z, state)
            expected = ctrl.fc(h)
            assert torch.equal(new_state[0], h)
        else:
            expected = ctrl.fc(z)
        torch.testing.assert_close(logits, expected)
        # any other iteration's BN gives other logits (the copies differ)
        other = ctrl.features.norms[(j + 1) % k]
        z_other = F.relu(other(ctrl.features.conv(x))).mean(dim=(2, 3))
        assert not torch.allclose(z, z_other)
        state = new_state


def test_rnn_is_fig_2b_and_rnn_gap_is_the_named_variant():
    m = ReSet([nn.Identity()], 2, controller="rnn", channels=8)
    assert isinstance(m.controller, RNNController) and isinstance(m.controller.features, ConvFeatures)
    assert isinstance(m.controller.cell, nn.LSTMCell)
    g = ReSet([nn.Identity()], 2, controller="rnn_gap", channels=8)
    assert isinstance(g.controller, PooledRNNController) and not any(isinstance(x, nn.Conv2d) for x in g.controller.modules())
    model = resetnet.create_model("reset38")
    assert all(isinstance(r.controller, RNNController) for r in model.reset_modules())


def test_rnn_controller_state_carries_across_iterations():
    ctrl = RNNController(8, 4, 3).eval()
    x = torch.randn(2, 8, 4, 4)
    zero = ctrl.initial_state(x)
    a, state = ctrl(x, 1, zero)
    b, _ = ctrl(x, 1, state)  # same x and BN, another state
    assert not torch.allclose(a, b)


def test_models_command_shows_stem_and_both_macs(capsys):
    from resetnet.cli import main

    assert main(["models", "--filter", "reset38"]) == 0
    out = capsys.readouterr().out
    header = [line for line in out.splitlines() if line.startswith("| model")][0]
    assert "stem" in header and "dense" in header and "one unit per iteration" in header
    row = [line for line in out.splitlines() if line.startswith("| reset38 ")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert "max-pool" in row
    dense, route = float(cells[3].rstrip("M")), float(cells[4].rstrip("M"))
    assert route < dense / 3  # one unit per iteration instead of five


def test_docs_model_table_is_the_commands_output(capsys):
    from resetnet.cli import main

    assert main(["models"]) == 0
    table = capsys.readouterr().out.strip()
    doc = (Path(__file__).resolve().parents[1] / "docs" / "model.md").read_text(encoding="utf-8")
    assert table in doc, "docs/model.md's model table is stale: run python tools/gen_docs.py"


# ----------------------------------------------------------------------------- Eq. 13 on hard weights
@pytest.mark.parametrize("scorer", ["gumbel_st", "topk"])
def test_entropy_regularizer_on_hard_weights_uses_probabilities_with_finite_gradients(scorer):
    torch.manual_seed(0)
    logits = torch.randn(16, 3, 4)
    logits[:, :, 0] += 3.0  # a concentrated policy: every sample mostly unit 0
    logits.requires_grad_()
    module = ReSet([nn.Identity()] * 3, 3, scorer=scorer, channels=4, zero_unit=True, **({"k": 1} if scorer == "topk" else {}))
    weights = torch.stack([module.scorer(logits[:, j]) for j in range(3)], dim=1)
    assert (weights == 0).any()
    routing = Routing(logits, weights, zero_unit=True, hard=True)
    probs = torch.softmax(logits, dim=-1)
    terms = entropy_terms([routing])
    torch.testing.assert_close(terms.batch, -(probs.mean(0) * probs.mean(0).log()).sum())
    torch.testing.assert_close(terms.sample, -(probs * probs.log()).sum(-1).mean(0).sum())
    for lb, ls, rises in ((1.0, 0.0, "batch"), (0.0, 1.0, None)):
        reg = entropy_regularizer([routing], lb, ls)
        (grad,) = torch.autograd.grad(reg, logits)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        with torch.no_grad():  # one small gradient-descent step moves each term the right way
            after = entropy_terms([Routing(logits - 0.5 * grad, weights, True, hard=True)])
        if rises == "batch":
            assert after.batch > terms.batch  # -lambda_1 H(E y): spreads the batch marginal
        else:
            assert after.sample < terms.sample  # +lambda_2 E H(y): decides each sample's route


# ----------------------------------------------------------------------------- the trainer's loss
QUIET = {
    "batch_size": 16,
    "eval_every": 0,
    "eval_batch_size": 32,
    "log_every": 1,
    "route_log_every": 0,
    "checkpoint_every": 0,
    "progress": False,
    "tensorboard": False,
}


def _trainer(tmp_path, cfg) -> Trainer:
    cfg = load_config(cfg)
    runtime = resolve_runtime(cfg)
    return Trainer(cfg, build_model(cfg), build_data(cfg, runtime, arrays=random_arrays()), tmp_path, runtime)


def test_trainer_loss_is_ce_plus_eq13_plus_eq9_with_their_signs(tmp_path):
    lb, ls, w = 0.3, 0.2, 0.7
    cfg = {
        "model": {"name": "reset_t3_2cu3it", "overrides": {"scorer": "gumbel_st"}},
        "regularizers": {"entropy": {"lambda_batch": lb, "lambda_sample": ls}, "skip_reward": {"enabled": True, "reward": 0.5, "weight": w}},
        "train": {**QUIET, "steps": 2},
    }
    trainer = _trainer(tmp_path, cfg)
    x, y = trainer.data.train.get_batch(0, 0)
    torch.manual_seed(0)
    logits, routing = trainer.model(x, return_routing=True)
    reward = copy.deepcopy(trainer.skip_reward)
    terms = trainer.compute_loss(logits, y, routing, trainer.schedules.values(0))
    ce = F.cross_entropy(logits, y)
    probs = [r.probabilities() for r in routing]  # hard scorer: Eq. 13 on the controller's probabilities
    h_batch = sum(-(p.mean(0) * p.mean(0).log()).sum() for p in probs)
    h_sample = sum(-(p * p.log()).sum(-1).mean(0).sum() for p in probs)
    rl, _ = reward(routing, F.cross_entropy(logits, y, reduction="none"))
    expected = ce - lb * h_batch + ls * h_sample + w * rl
    torch.testing.assert_close(terms["loss"], expected)
    torch.testing.assert_close(terms["entropy_reg"], (-lb * h_batch + ls * h_sample).detach())
    assert float((terms["loss"] - ce).detach()) != pytest.approx(float((ce - terms["loss"]).detach()))  # the signs matter


def test_hybrid_rl_with_top_k_is_refused():
    cfg = {"model": {"name": "reset_t3_2cu3it", "overrides": {"scorer": "topk", "topk": 2}}, "regularizers": {"skip_reward": {"enabled": True}}}
    with pytest.raises(ConfigError, match="REINFORCE.*top-k.*never fires"):
        load_config(cfg)
    with pytest.raises(ConfigError, match="samples its route"):  # a custom model whose scorer does not sample
        _trainer(
            "unused",
            {
                "model": {"name": "reset_t3_2cu3it", "overrides": {"scorer": "gumbel_softmax"}},
                "regularizers": {"skip_reward": {"enabled": True}},
                "train": {**QUIET, "steps": 1},
            },
        )


# ----------------------------------------------------------------------------- behaviour over training
def test_skip_reward_raises_the_zero_unit_rate(tmp_path):
    """Eq. 9 pays for the zero unit: over 150 tiny controller-only steps its rate climbs."""
    cfg = {
        "model": {"name": "reset_t3_2cu3it", "overrides": {"scorer": "gumbel_st"}},
        "trainable": ["controller"],
        "freeze_bn_stats": True,
        "optim": {"name": "adam", "lr": 0.003, "weight_decay": 0.0, "schedule": {"kind": "constant"}},
        "regularizers": {"skip_reward": {"enabled": True, "reward": 1.0}},
        "train": {**QUIET, "steps": 150, "log_every": 1},
    }
    train(cfg, tmp_path, arrays=random_arrays())
    rates = [r["skip_rate"] for r in read_metrics(tmp_path, "train")]
    first, last = np.mean(rates[:10]), np.mean(rates[-10:])
    assert first < 0.5 and last > first + 0.3, rates


def _entropy_run(tmp_path, lb, ls, bias):
    """Controller-only training with Eq. 13 only (CE weighted down); the controllers' final bias starts at ``bias``."""

    class Init:
        def on_fit_start(self, trainer):
            with torch.no_grad():
                for r in trainer.model.reset_modules():
                    r.controller.fc.bias.copy_(torch.tensor(bias, dtype=torch.float32))

    cfg = {
        "model": {"name": "reset_t3_2cu3it", "overrides": {"scorer": "softmax"}},
        "trainable": ["controller"],
        "freeze_bn_stats": True,
        "optim": {"name": "adam", "lr": 0.02, "weight_decay": 0.0, "schedule": {"kind": "constant"}},
        "regularizers": {"entropy": {"lambda_batch": lb, "lambda_sample": ls, "decay": {"kind": "constant"}}},
        "train": {**QUIET, "steps": 120, "log_every": 10},
    }
    train(cfg, tmp_path, arrays=random_arrays(), callbacks=[Init()])
    rows = read_metrics(tmp_path, "train")
    return rows[0], rows[-1]


def test_entropy_regularizer_spreads_the_batch_and_decides_each_sample(tmp_path):
    # lambda_1 from a collapsed policy (every image on unit 0): the batch marginal spreads out
    first, last = _entropy_run(tmp_path / "b", 1.0, 0.0, [6.0, 0.0, 0.0])
    assert last["entropy_batch"] > first["entropy_batch"] + 0.5
    # lambda_2 from the uniform policy: each image's route becomes decided
    first, last = _entropy_run(tmp_path / "s", 0.0, 1.0, [0.0, 0.0, 0.0])
    assert last["entropy_sample"] < first["entropy_sample"] - 0.5


# ----------------------------------------------------------------------------- every shipped YAML
def _yaml_files(recipes: bool = False) -> list[Path]:
    return sorted(p for d in CONFIG_DIRS for p in d.rglob("*.yaml") if (p.parent.name == "recipes") == recipes)


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    resetnet.create_model(cfg.model.name, **cfg.model.overrides)


@pytest.mark.parametrize("path", _yaml_files(recipes=True), ids=lambda p: p.name)
def test_every_recipe_validates(path):
    load_config(merge(load_raw("reset38"), load_raw(path)))


def test_config_names_list_the_shipped_configs():
    assert {"reset38", "resnet38", "smoke"} <= set(list_configs())

"""The model zoo: every registered model, overrides, errors, reproducibility, CLI."""

import re
import runpy
import sys

import pytest
import torch
from torch import nn

import resetnet
from resetnet.models import CifarNet
from resetnet.nn import BasicBlock, CNNController, ReSet, RNNController, TopKScorer

ALL_MODELS = resetnet.list_models()


def _is_reset_model(model):
    return len(model.reset_modules()) > 0


def test_registry_has_the_paper_models():
    for name in (
        "reset38",
        "resnet38",
        "resnet20",
        "resnet110",
        "reset_1_1_5",
        "resnet_1_1_5",
        "reset_5_1_1",
        "resnet_t3",
        "reset_t3_3cu2it",
        "reset_t3_2cu6it",
    ):
        assert name in ALL_MODELS
    assert ALL_MODELS == sorted(ALL_MODELS)
    assert resetnet.list_models("t3") == [n for n in ALL_MODELS if "t3" in n]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_model_logits_and_routing_shapes(name):
    model = resetnet.create_model(name)
    assert isinstance(model, CifarNet) and model.model_name == name
    x = torch.randn(2, 3, 8, 8)
    for train in (True, False):
        model.train(train)
        logits, routing = model(x, return_routing=True)
        assert logits.shape == (2, 10) and logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
        modules = model.reset_modules()
        assert len(routing) == len(modules)
        for r, m in zip(routing, modules):
            assert r.weights.shape == (2, m.iterations, len(m.units) + 1)
            assert r.logits.shape == r.weights.shape
            assert r.zero_unit
    assert torch.equal(model(x), logits)  # eval mode: deterministic, plain call returns logits only
    if name.startswith("reset"):
        assert _is_reset_model(model)


@pytest.mark.parametrize("name", [n for n in ALL_MODELS if n.startswith("reset")])
def test_reset_models_without_zero_unit(name):
    model = resetnet.create_model(name, zero_unit=False).eval()
    logits, routing = model(torch.randn(2, 3, 8, 8), return_routing=True)
    assert logits.shape == (2, 10)
    for r, m in zip(routing, model.reset_modules()):
        assert r.weights.shape == (2, m.iterations, len(m.units))
        assert not r.zero_unit and not r.skip_mask().any()


def test_reset38_full_size():
    model = resetnet.create_model("reset38")
    modules = model.reset_modules()
    assert len(modules) == 3
    for m, width in zip(modules, (16, 32, 64)):
        assert len(m.units) == 5 and m.iterations == 5 and m.zero_unit
        assert isinstance(m.controller, RNNController)
        assert all(isinstance(u, BasicBlock) and u.channels == width and u.bn1.iterations == 5 for u in m.units)
    x = torch.randn(2, 3, 32, 32)
    assert model.stem_maxpool and isinstance(model.stem[-1], torch.nn.MaxPool2d)  # the paper's stem (Sec. 4)
    features, routing = model.forward_features(x, return_routing=True)
    assert features.shape == (2, 64, 4, 4)  # 32 -> 16 (max-pool) -> 8 -> 4
    assert [tuple(r.weights.shape) for r in routing] == [(2, 5, 6)] * 3
    torch.testing.assert_close(routing[0].weights.sum(-1), torch.ones(2, 5))  # softmax rows
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 32, 32))


@pytest.mark.parametrize("name", [n for n in ALL_MODELS if re.fullmatch(r"resnet\d+", n)] + ["resnet26"])
def test_resnet_depth_counts_weight_layers(name):
    depth = int(name[len("resnet") :])
    model = resetnet.create_model(name)
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert layers == depth
    assert not _is_reset_model(model)


def test_table_models_layout():
    for name, stage in (("reset_1_1_5", 2), ("reset_1_5_1", 1), ("reset_5_1_1", 0)):
        model = resetnet.create_model(name)
        assert [isinstance(s, ReSet) for s in model.stages] == [i == stage for i in range(3)]
    for name in resetnet.list_models("reset_t3_"):
        units, iterations = map(int, re.fullmatch(r"reset_t3_(\d+)cu(\d+)it", name).groups())
        (m,) = resetnet.create_model(name).reset_modules()
        assert (len(m.units), m.iterations) == (units, iterations)


def test_overrides():
    model = resetnet.create_model(
        "reset_t3_3cu2it", num_classes=7, in_channels=1, controller="cnn", scorer="topk", topk=2, units=4, iterations=3, unit_bn="shared"
    )
    (m,) = model.reset_modules()
    assert isinstance(m.controller, CNNController)
    assert isinstance(m.scorer, TopKScorer) and m.scorer.k == 2
    assert len(m.units) == 4 and m.iterations == 3 and m.units[0].bn1.iterations == 1
    logits, routing = model(torch.randn(2, 1, 8, 8), return_routing=True)
    assert logits.shape == (2, 7)
    assert routing[0].weights.shape == (2, 3, 5)
    assert ((routing[0].weights != 0).sum(-1) == 2).all()
    model = resetnet.create_model("resnet20", num_classes=3)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3)


def test_float64_model():
    model = resetnet.create_model("reset_t3_3cu2it").double()
    logits = model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert logits.dtype == torch.float64


# ------------------------------------------------------------------ errors
def test_create_model_unknown_name():
    with pytest.raises(ValueError, match=r"unknown model 'resnet_huge'; registered models: .*reset38.*resnet\{6n\+2\}"):
        resetnet.create_model("resnet_huge")


def test_create_model_unknown_override():
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['scorer'\] for model 'resnet20'; valid overrides: .*num_classes"):
        resetnet.create_model("resnet20", scorer="topk")
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['widht'\] for model 'reset38'.*iterations"):
        resetnet.create_model("reset38", widht=3)


@pytest.mark.parametrize("name", ["resnet21", "resnet2", "resnet36"])
def test_resnet_depth_not_6n_plus_2(name):
    with pytest.raises(ValueError, match=r"6n\+2.*got " + name[len("resnet") :]):
        resetnet.create_model(name)


def test_bad_reset_options():
    with pytest.raises(ValueError, match=r"unknown BN mode 'none'.*per_iteration, shared"):
        resetnet.create_model("reset_t3_3cu2it", unit_bn="none")
    with pytest.raises(ValueError, match="unknown scorer"):
        resetnet.create_model("reset_t3_3cu2it", scorer="hard")
    with pytest.raises(ValueError, match="k=4 .*the pool has 3"):
        resetnet.create_model("reset_t3_3cu2it", scorer="topk", topk=4)


# --------------------------------------------------------- reproducibility
@pytest.mark.parametrize("scorer", ["gumbel_softmax", "gumbel_st"])
def test_reproducible_under_a_fixed_seed(scorer):
    def build(seed):
        torch.manual_seed(seed)
        return resetnet.create_model("reset_t3_3cu2it", scorer=scorer, controller="cnn").train()

    a, b, other = build(3), build(3), build(4)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], other.state_dict()[k]) for k in sa)

    x = torch.randn(4, 3, 8, 8)

    def run(model, seed):
        torch.manual_seed(seed)
        return model(x, return_routing=True)

    (la, ra), (lb, rb) = run(a, 7), run(b, 7)
    assert torch.equal(la, lb)
    assert torch.equal(ra[0].weights, rb[0].weights)
    # the noise really depends on the seed
    _, rc = run(a, 8)
    assert not torch.equal(ra[0].weights, rc[0].weights)


# --------------------------------------------------------------------- CLI
def test_models_command_prints_a_table(capsys):
    from resetnet.cli import main

    assert main(["models", "--filter", "t3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "| model | stem | params | MACs/image, dense | MACs/image, one unit per iteration |"
    assert out[1].startswith("| --- |")
    rows = out[2:]
    names = [row.split("|")[1].strip() for row in rows]
    assert names == resetnet.list_models("t3")  # substring filter: also reset38/resnet38
    assert {"resnet_t3", "reset_t3_3cu2it", "reset38"} <= set(names) and "resnet20" not in names
    for row in rows:
        assert re.fullmatch(r"\| \S+ \| conv[^|]* \| \d+\.\d{3}M \| \d+\.\dM \| (\d+\.\dM|-) \|", row), row


def test_version(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["resetnet", "--version"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("resetnet", run_name="__main__")
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"resetnet {resetnet.__version__}"


def test_cli_without_command_prints_help(capsys):
    from resetnet.cli import main

    assert main([]) == 2
    assert "models" in capsys.readouterr().out

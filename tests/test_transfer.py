"""ResNet -> ReSet twin transfer (Sec. 5.1) and the sequential-policy agreement."""

import pytest
import torch
from torch import nn

import resetnet
from resetnet.models.transfer import reset_from_resnet, resnet_to_reset_state
from resetnet.nn import Routing
from resetnet_experiments.analysis.agreement import sequential_agreement


class SequentialController(nn.Module):
    """Protocol controller choosing unit j at iteration j."""

    def __init__(self, num_outputs: int) -> None:
        super().__init__()
        self.num_outputs = num_outputs

    def forward(self, x, iteration, state):
        logits = torch.full((x.shape[0], self.num_outputs), -50.0)
        logits[:, iteration] = 50.0
        return logits, state


def _randomize_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)


def test_twin_with_sequential_policy_equals_resnet():
    torch.manual_seed(0)
    resnet = resetnet.create_model("resnet20")
    _randomize_bn(resnet)
    resnet.eval()
    twin = reset_from_resnet(resnet, scorer="gumbel_st").eval()
    for module in twin.reset_modules():
        module.controller = SequentialController(module.num_outputs)
    x = torch.randn(3, 3, 32, 32)
    logits, routing = twin(x, return_routing=True)
    assert torch.equal(logits, resnet(x))
    assert sequential_agreement(routing) == 1.0
    assert [m.iterations for m in twin.reset_modules()] == [3, 2, 2]


def test_twin_keeps_resnet_weights_and_fresh_controllers():
    resnet = resetnet.create_model("resnet20")
    twin = reset_from_resnet(resnet, controller="cnn")
    state = twin.state_dict()
    for key, value in resnet_to_reset_state(resnet.state_dict()).items():
        assert torch.equal(state[key], value), key
    assert any(".controller." in k for k in state)


def test_transfer_rejects_non_resnet_and_per_iteration_bn():
    with pytest.raises(ValueError, match="resnet"):
        reset_from_resnet(resetnet.create_model("reset_t3_2cu3it"))
    with pytest.raises(ValueError, match="shared"):
        reset_from_resnet(resetnet.create_model("resnet20"), unit_bn="per_iteration")


def test_sequential_agreement_counts_pairs():
    w = torch.zeros(2, 3, 4)
    w[0, 0, 0] = w[0, 1, 1] = w[0, 2, 3] = 1  # sample 0: 2 of 3 sequential
    w[1, :, 3] = 1  # sample 1: always the zero unit
    r = Routing(logits=w.clone(), weights=w)
    assert sequential_agreement([r]) == pytest.approx(2 / 6)
    with pytest.raises(ValueError):
        sequential_agreement([])

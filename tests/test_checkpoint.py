"""Checkpoint pairs: safetensors + JSON, atomic writes, torn-pair detection, load_model."""
from __future__ import annotations

import json

import pytest
import torch

import resetnet
from resetnet.train.checkpoint import (
    CHECKPOINT_JSON, CHECKPOINT_TENSORS, CheckpointError, load_model, load_weights, optimizer_from_parts,
    read_checkpoint, rng_state, save_checkpoint, set_rng_state,
)
from resetnet.train.config import load_config


def _model(**kw):
    return resetnet.create_model("reset_t3_2cu3it", **kw)


def _trained_optimizer(model, kind):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if kind == "sgd" else torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        loss = model(torch.randn(4, 3, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def _meta(cfg=None, step=2):
    cfg = cfg or load_config({"model": {"name": "reset_t3_2cu3it"}})
    return {"config": cfg, "step": step, "rng": rng_state()}


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_roundtrip_model_and_optimizer(tmp_path, kind):
    model = _model()
    opt = _trained_optimizer(model, kind)
    save_checkpoint(tmp_path, model, _meta(), opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_JSON, CHECKPOINT_TENSORS]  # no temp files left

    torch.manual_seed(1)
    other = _model()
    opt2 = torch.optim.SGD(other.parameters(), lr=0.5, momentum=0.9) if kind == "sgd" else torch.optim.Adam(other.parameters(), lr=0.5)
    ckpt = read_checkpoint(tmp_path)
    load_weights(other, ckpt)
    optimizer_from_parts(opt2, {k: v for k, v in ckpt.tensors.items() if k.startswith("optim/")}, ckpt.meta["optimizer"])
    for (n, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), n
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in s2["param_groups"]]
    for i in s1["state"]:
        for k, v in s1["state"][i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][i][k])), (i, k)


def test_json_is_plain_json_and_references_the_tensors(tmp_path):
    model = _model()
    save_checkpoint(tmp_path, model, _meta(step=7), _trained_optimizer(model, "sgd"))
    meta = json.loads((tmp_path / CHECKPOINT_JSON).read_text())
    assert meta["step"] == 7 and meta["tensors"]["file"] == CHECKPOINT_TENSORS and len(meta["tensors"]["sha256"]) == 64
    assert meta["optimizer"]["class"] == "SGD" and meta["config"]["model"]["name"] == "reset_t3_2cu3it"
    assert isinstance(meta["rng"]["torch_cpu"], str)
    keys = read_checkpoint(tmp_path).tensors.keys()
    assert any(k.startswith("model/") for k in keys) and any(k.startswith("optim/") and k.endswith("momentum_buffer") for k in keys)


def test_torn_pair_is_detected(tmp_path):
    model = _model()
    save_checkpoint(tmp_path, model, _meta(step=1))
    first = (tmp_path / CHECKPOINT_JSON).read_bytes()
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    save_checkpoint(tmp_path, model, _meta(step=2))
    (tmp_path / CHECKPOINT_JSON).write_bytes(first)  # as if the JSON rename of save 2 never happened
    with pytest.raises(CheckpointError, match="torn or mixed"):
        read_checkpoint(tmp_path)


def test_failed_save_leaves_the_previous_pair(tmp_path):
    model = _model()
    save_checkpoint(tmp_path, model, _meta(step=1))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path, model, {**_meta(step=2), "bad": float("nan")})  # not valid JSON: refused before writing
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_rng_roundtrip():
    state = rng_state()
    a = torch.rand(5)
    set_rng_state(json.loads(json.dumps(state)))
    assert torch.equal(torch.rand(5), a)


def test_load_model_from_dir_and_lone_safetensors(tmp_path):
    cfg = load_config({"model": {"name": "reset_t3_2cu3it", "overrides": {"scorer": "topk", "topk": 1}}})
    model = resetnet.create_model("reset_t3_2cu3it", scorer="topk", topk=1)
    save_checkpoint(tmp_path, model, _meta(cfg, step=5))
    x = torch.randn(3, 3, 8, 8)
    ref = model.eval()(x)
    loaded, meta = load_model(tmp_path)
    assert meta["step"] == 5 and not loaded.training and torch.equal(loaded(x), ref)
    (tmp_path / CHECKPOINT_JSON).unlink()
    alone, meta2 = load_model(tmp_path / CHECKPOINT_TENSORS)
    assert meta2["step"] == 5 and meta2["config"]["model"]["overrides"] == {"scorer": "topk", "topk": 1}
    assert torch.equal(alone(x), ref)


def test_load_weights_strict_and_relaxed(tmp_path):
    save_checkpoint(tmp_path, _model(), _meta())
    other = resetnet.create_model("reset_t3_2cu3it", controller="rnn_gap")  # a different controller
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_weights(other, tmp_path)
    report = load_weights(other, tmp_path, strict=False)
    assert report["missing"] and report["unexpected"]
    assert torch.equal(other.fc.weight, read_checkpoint(tmp_path).model_state["fc.weight"])


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_model(tmp_path)

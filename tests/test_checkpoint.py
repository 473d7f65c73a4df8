"""Checkpoint pairs: safetensors + JSON, atomic writes, the pointer, torn-pair detection and
recovery, files that are not checkpoints, non-finite tensors, load_model."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import warnings

import pytest
import torch

import resetnet
from resetnet.checkpoint import (
    CHECKPOINT_JSON,
    CHECKPOINT_TENSORS,
    CheckpointError,
    CheckpointWarning,
    NonFiniteTensors,
    checkpoint_exists,
    load_weights,
    optimizer_from_parts,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from resetnet.models import load_model
from resetnet.train.config import load_config

PAIR = re.compile(r"^checkpoint-(\d+)-[0-9a-f]{8}\.(safetensors|json)$")


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


def _names(run_dir):
    return sorted(p.name for p in run_dir.iterdir())


def _current(run_dir):
    """(pair JSON path, tensors path) the pointer names."""
    name = json.loads((run_dir / CHECKPOINT_JSON).read_text())["tensors"]["file"]
    return run_dir / name.replace(".safetensors", ".json"), run_dir / name


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_roundtrip_model_and_optimizer(tmp_path, kind):
    model = _model()
    opt = _trained_optimizer(model, kind)
    save_checkpoint(tmp_path, model, _meta(), opt)
    pair_json, tensors = _current(tmp_path)
    assert _names(tmp_path) == sorted([CHECKPOINT_JSON, pair_json.name, tensors.name])  # no temp files left
    assert PAIR.match(tensors.name).group(1) == "2" and pair_json.read_bytes() == (tmp_path / CHECKPOINT_JSON).read_bytes()

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
    assert meta["step"] == 7 and PAIR.match(meta["tensors"]["file"]) and len(meta["tensors"]["sha256"]) == 64
    assert (tmp_path / meta["tensors"]["file"]).stat().st_size == meta["tensors"]["bytes"]
    assert meta["optimizer"]["class"] == "SGD" and meta["config"]["model"]["name"] == "reset_t3_2cu3it"
    assert isinstance(meta["rng"]["torch_cpu"], str)
    keys = read_checkpoint(tmp_path).tensors.keys()
    assert any(k.startswith("model/") for k in keys) and any(k.startswith("optim/") and k.endswith("momentum_buffer") for k in keys)


def test_torn_pair_is_detected(tmp_path):
    # Adapted to the pointer layout: a mixed pair is the pointer's JSON with tensors from another save.
    model = _model()
    save_checkpoint(tmp_path / "a", model, _meta(step=1))
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    save_checkpoint(tmp_path, model, _meta(step=2))
    _current(tmp_path)[1].write_bytes(_current(tmp_path / "a")[1].read_bytes())  # tensors copied from save 1
    for path in (tmp_path, tmp_path / CHECKPOINT_JSON, _current(tmp_path)[0]):
        with pytest.raises(CheckpointError, match="torn or mixed"):
            read_checkpoint(path)
    _current(tmp_path)[1].unlink()
    with pytest.raises(CheckpointError, match="which is missing: a torn or incomplete checkpoint"):
        read_checkpoint(tmp_path)
    (tmp_path / CHECKPOINT_JSON).unlink()
    assert not checkpoint_exists(tmp_path)  # a pair's JSON without its tensors is nothing to resume


def test_saves_replace_the_pair_and_keep_one(tmp_path):
    model = _model()
    for step in (1, 2, 2, 3):  # the same step twice gets its own pair too
        save_checkpoint(tmp_path, model, _meta(step=step))
    pair_json, tensors = _current(tmp_path)
    assert _names(tmp_path) == sorted([CHECKPOINT_JSON, pair_json.name, tensors.name]) and PAIR.match(tensors.name).group(1) == "3"
    assert checkpoint_exists(tmp_path) and not checkpoint_exists(tmp_path / "nothing")
    for path in (tmp_path, tmp_path / CHECKPOINT_JSON, tmp_path / CHECKPOINT_TENSORS, pair_json, tensors):
        ckpt = read_checkpoint(path)  # CHECKPOINT_TENSORS: the directory's current tensors
        assert ckpt.meta["step"] == 3 and ckpt.path == tensors, path


def test_stale_pointer_recovers_the_complete_pair_with_a_warning(tmp_path):
    model = _model()
    save_checkpoint(tmp_path, model, _meta(step=1))
    first = (tmp_path / CHECKPOINT_JSON).read_bytes()
    save_checkpoint(tmp_path, model, _meta(step=2))
    (tmp_path / CHECKPOINT_JSON).write_bytes(first)  # names the pair that save 2 deleted
    with pytest.warns(CheckpointWarning, match=r"which is missing.*using the complete checkpoint checkpoint-2-\w+\.json \(step 2\)"):
        assert read_checkpoint(tmp_path).meta["step"] == 2
    (tmp_path / CHECKPOINT_JSON).unlink()  # a first save killed before its commit
    assert checkpoint_exists(tmp_path)
    with pytest.warns(CheckpointWarning, match="has no checkpoint.json"):
        assert load_model(tmp_path)[1]["step"] == 2


def test_torn_newest_pair_falls_back_to_the_previous_one(tmp_path):
    model = _model()
    save_checkpoint(tmp_path, model, _meta(step=1))
    previous = {p.name: p.read_bytes() for p in tmp_path.iterdir() if PAIR.match(p.name)}
    save_checkpoint(tmp_path, model, _meta(step=2))
    for name, data in previous.items():  # as if deleting the older pair had not happened yet
        (tmp_path / name).write_bytes(data)
    tensors = _current(tmp_path)[1]
    tensors.write_bytes(tensors.read_bytes()[:-100])  # the newest tensors lose their tail
    with pytest.warns(CheckpointWarning, match=r"torn or mixed.*using the complete checkpoint checkpoint-1-\w+\.json \(step 1\)"):
        assert read_checkpoint(tmp_path).meta["step"] == 1
    save_checkpoint(tmp_path, model, _meta(step=3))  # the next save clears the torn and the old pairs
    assert len(_names(tmp_path)) == 3 and read_checkpoint(tmp_path).meta["step"] == 3


def test_corrupt_pointer(tmp_path):
    model = _model()
    save_checkpoint(tmp_path, model, _meta(step=4))
    (tmp_path / CHECKPOINT_JSON).write_bytes(b'{"step": 4, "config": {tru')
    with pytest.warns(CheckpointWarning, match="checkpoint.json is not valid JSON"):
        assert read_checkpoint(tmp_path).meta["step"] == 4  # from the pair's JSON
    pair_json = next(p for p in tmp_path.iterdir() if PAIR.match(p.name) and p.suffix == ".json")
    pair_json.write_bytes(b"\xff\xfe not json")
    with pytest.raises(CheckpointError, match=r"checkpoint.json is not valid JSON") as info:
        read_checkpoint(tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match=r"is not valid JSON .*pass a run directory"):
        read_checkpoint(pair_json)
    (tmp_path / CHECKPOINT_JSON).write_text(json.dumps({"step": 4}))
    with pytest.raises(CheckpointError, match="not a resetnet checkpoint.json"):
        read_checkpoint(tmp_path / CHECKPOINT_JSON)


def test_an_earlier_versions_run_directory_still_loads(tmp_path):
    model = _model()
    save_checkpoint(tmp_path, model, _meta(step=5))
    pair_json, tensors = _current(tmp_path)
    meta = json.loads(pair_json.read_text())
    meta["tensors"]["file"] = CHECKPOINT_TENSORS
    tensors.rename(tmp_path / CHECKPOINT_TENSORS)
    pair_json.unlink()
    (tmp_path / CHECKPOINT_JSON).write_text(json.dumps(meta))  # the old layout: checkpoint.{safetensors,json}
    for path in (tmp_path, tmp_path / CHECKPOINT_TENSORS):
        assert read_checkpoint(path).meta["step"] == 5
    save_checkpoint(tmp_path, model, _meta(step=6))
    assert CHECKPOINT_TENSORS not in _names(tmp_path) and len(_names(tmp_path)) == 3


NOT_CHECKPOINTS = {
    "empty.safetensors": (b"", "it is an empty file"),
    "short.bin": (b"abc", "only 3 bytes long"),
    "random.safetensors": (bytes(range(7, 250)) * 3, "first 8 bytes are not the length of a JSON header"),
    "model.pkl": (pickle.dumps({"w": [1.0, 2.0]}), "pickle header"),
    "notes.safetensors": (b'{"a": 1}' + b" " * 20, "looks like JSON"),
    "bad-header.safetensors": ((20).to_bytes(8, "little") + b"{not json at all....}", "header is not valid JSON"),
}


@pytest.mark.parametrize("name", sorted(NOT_CHECKPOINTS))
def test_files_that_are_not_checkpoints_are_one_line_errors(tmp_path, name):
    data, reason = NOT_CHECKPOINTS[name]
    path = tmp_path / name
    path.write_bytes(data)
    for call in (read_checkpoint, load_model, lambda p: load_weights(_model(), p)):
        with pytest.raises(CheckpointError) as info:
            call(path)
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{path} is not a resetnet checkpoint: it is not a safetensors file (")
        assert reason in message and message.endswith("pass a run directory or a .safetensors checkpoint written by resetnet train")


def test_torch_save_files_and_plain_directories_are_refused(tmp_path):
    torch.save(_model().state_dict(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"model.pt is not a resetnet checkpoint: .*zip header, as torch.save"):
        load_model(tmp_path / "model.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"old.pt is not a resetnet checkpoint: .*pickle header"):
        read_checkpoint(tmp_path / "old.pt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*empty_dir \(expected checkpoint.json"):
        load_model(tmp_path / "empty_dir")
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*nope.safetensors \(no such file"):
        read_checkpoint(tmp_path / "nope.safetensors")


class _SideEffect:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_a_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_SideEffect(str(marker)))
    for name in ("checkpoint.safetensors", "x.pt"):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(CheckpointError, match="pickle header"):
            load_model(tmp_path / name)
    with pytest.raises(CheckpointError):
        load_model(tmp_path)  # a run directory holding only the pickle as checkpoint.safetensors
    assert not marker.exists()
    pickle.loads(payload)  # the payload does work: the check above is meaningful
    assert marker.exists()


def test_non_finite_tensors_are_never_saved_nor_loaded(tmp_path, capsys):
    model = _model()
    opt = _trained_optimizer(model, "sgd")
    save_checkpoint(tmp_path, model, _meta(step=1), opt)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    opt.state[next(iter(model.parameters()))]["momentum_buffer"].fill_(float("inf"))  # optimizer state blew up
    with pytest.raises(
        NonFiniteTensors,
        match=r"not saving a checkpoint .*1 of \d+ tensors hold NaN/Inf \(first: optim/0/momentum_buffer\); the previous checkpoint was kept",
    ) as info:
        save_checkpoint(tmp_path, model, _meta(step=2), opt)
    assert info.value.names == ["optim/0/momentum_buffer"]
    bn = next(n for n, _ in model.named_buffers() if n.endswith("running_var"))
    with torch.no_grad():
        model.get_buffer(bn)[0] = float("nan")  # a buffer alone: the loss of a training step stays finite
        model.fc.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteTensors, match=rf"3 of \d+ tensors .*first: model/{re.escape(bn)}, model/fc.weight, optim/0/momentum_buffer\)"):
        save_checkpoint(tmp_path, model, _meta(step=2), opt)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, nothing replaced

    bad_dir = tmp_path / "bad"
    save_checkpoint(bad_dir, model, _meta(step=9), check_finite=False)  # as written by an earlier version
    for call in (load_model, lambda p: load_weights(_model(), p, strict=False)):
        with pytest.raises(
            NonFiniteTensors, match=rf"\(step 9\) is unusable: 2 of \d+ model tensors hold NaN/Inf \(first: {re.escape(bn)}, fc.weight\)"
        ):
            call(bad_dir)
    from resetnet.cli import main

    assert main(["eval", str(bad_dir), "--data-dir", str(tmp_path / "no-data")]) == 2  # exit 2, not a 10% accuracy
    err = capsys.readouterr().err.strip()
    assert err.startswith("resetnet eval: error: checkpoint ") and "is unusable" in err and "\n" not in err


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = _model()
    save_checkpoint(tmp_path, model, _meta(step=1))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for broken in ("open", "replace"):
        with monkeypatch.context() as m:
            if broken == "replace":

                def fail(*args, **kwargs):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

                m.setattr(os, "replace", fail)
            else:
                real_open = open

                def fail_open(file, mode="r", *args, **kwargs):
                    if "w" in mode and ".tmp-" in str(file):
                        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
                    return real_open(file, mode, *args, **kwargs)

                m.setattr("builtins.open", fail_open)
            with pytest.raises(CheckpointError) as info:
                save_checkpoint(tmp_path, model, _meta(step=2))
        message = str(info.value)
        reason = "No space left on device" if broken == "replace" else "Read-only file system"
        assert "\n" not in message and reason in message and "the previous checkpoint was kept" in message
        assert re.search(rf"cannot save the checkpoint of step 2: writing {re.escape(str(tmp_path))}/checkpoint-2-\w+\.safetensors failed", message)
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before, broken  # no temp files, no half pair
        assert read_checkpoint(tmp_path).meta["step"] == 1


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
    assert torch.equal(load_model(tmp_path / CHECKPOINT_TENSORS)[0](x), ref)  # the name of the current tensors
    # Adapted to the pair layout: the lone file is the pair's tensors file without any JSON.
    pair_json, tensors = _current(tmp_path)
    (tmp_path / CHECKPOINT_JSON).unlink()
    pair_json.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no recovery involved
        alone, meta2 = load_model(tensors)
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

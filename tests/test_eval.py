"""Evaluation helpers and the ``resetnet eval`` command on synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import resetnet
from resetnet.checkpoint import rng_state, save_checkpoint
from resetnet.cli import main
from resetnet.data import DeviceLoader
from resetnet.train.config import load_config
from resetnet.train.evaluate import compare_timing, count_parameters, evaluate, mean_macs


def _loader(n=30, size=8, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    y = np.arange(n) % 10
    return DeviceLoader(x, y, batch, train=False)


def test_evaluate_returns_per_sample_correctness():
    model = resetnet.create_model("reset_t3_2cu3it")
    loader = _loader()
    next(iter(loader))  # a half-consumed iterator must not matter
    res = evaluate(model, loader)
    assert model.training  # mode restored
    assert res["n"] == 30 and res["correct"].dtype == bool and res["correct"].shape == (30,)
    assert res["acc"] == pytest.approx(res["correct"].mean())
    assert np.array_equal(res["labels"], np.arange(30) % 10) and res["predictions"].shape == (30,)
    assert len(res["per_class_acc"]) == 10
    expected = [res["correct"][res["labels"] == c].mean() for c in range(10)]
    assert res["per_class_acc"] == pytest.approx(expected)
    model.eval()
    logits = torch.cat([model(x) for x, _ in (loader.get_batch(0, b) for b in range(len(loader)))])
    assert np.array_equal(logits.argmax(1).numpy(), res["predictions"])


def test_flip_tta_averages_the_logits_of_each_image_and_its_mirror():
    torch.manual_seed(0)
    model = resetnet.create_model("resnet_t3").eval()
    loader = _loader()
    res, tta = evaluate(model, loader), evaluate(model, loader, flip=True)
    xs, ys = zip(*(loader.get_batch(0, b) for b in range(len(loader))))
    x, y = torch.cat(xs), torch.cat(ys)
    with torch.no_grad():
        plain, mirrored = model(x), model(x.flip(3))
    mean = (plain + mirrored) / 2
    assert np.array_equal(res["predictions"], plain.argmax(1).numpy())
    assert np.array_equal(tta["predictions"], mean.argmax(1).numpy())
    assert tta["loss"] == pytest.approx(torch.nn.functional.cross_entropy(mean, y).item(), rel=1e-5)
    assert not torch.allclose(plain, mirrored)  # the mirror is a different input: the average is not the plain logits


def test_per_class_accuracy_of_an_absent_class_is_none():
    rng = np.random.default_rng(0)
    loader = DeviceLoader(rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), np.array([0, 1, 0, 1, 0, 1]), 4, train=False)
    res = evaluate(resetnet.create_model("resnet_t3"), loader)
    assert res["per_class_acc"][2] is None and res["per_class_acc"][0] is not None


def test_mean_macs_and_timing():
    model = resetnet.create_model("reset_t3_2cu3it", scorer="topk", topk=1)
    loader = _loader()
    macs = mean_macs(model, loader)
    full = mean_macs(resetnet.create_model("reset_t3_2cu3it"), loader)
    assert 0 < macs < full  # top-1 routing runs fewer units than the dense softmax
    x = loader.get_batch(0, 0)[0]
    t = compare_timing(model, resetnet.create_model("resnet_t3"), x, repeats=3, warmup=1)
    assert t["ratio"] > 0 and t["model_s"] > 0 and t["baseline_s"] > 0 and t["repeats"] == 3
    assert compare_timing(model, None, x, repeats=1, warmup=0)["ratio"] is None


def _fake_data(root: Path, n=40, with_c101=False):
    rng = np.random.default_rng(1)
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    rec = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3072))], axis=1).astype(np.uint8)
    (d / "test_batch.bin").write_bytes(rec.tobytes())
    if with_c101:
        (root / "cifar-10.1").mkdir()
        np.save(root / "cifar-10.1" / "cifar10.1_v6_data.npy", rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8))
        np.save(root / "cifar-10.1" / "cifar10.1_v6_labels.npy", rng.integers(0, 10, 20))
    return root


def _checkpoint(path: Path, name: str, seed: int):
    torch.manual_seed(seed)
    cfg = load_config({"model": {"name": name}, "data": {"verify": False}})
    model = resetnet.create_model(name)
    save_checkpoint(path, model, {"config": cfg, "step": 11, "rng": rng_state()})
    return model


def test_eval_command_with_checkpoint_baseline_and_cifar10_1(tmp_path, capsys):
    data = _fake_data(tmp_path / "data", with_c101=True)
    model = _checkpoint(tmp_path / "model", "reset_t3_2cu3it", 0)
    _checkpoint(tmp_path / "base", "resnet_t3", 1)
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "eval",
                str(tmp_path / "model"),
                "--data-dir",
                str(data),
                "--baseline",
                str(tmp_path / "base"),
                "--json",
                str(out),
                "--timing-repeats",
                "1",
                "--timing-batch",
                "4",
                "--batch-size",
                "16",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "| model | params | MACs/image | C10 acc | C10.1 acc | gap | time ratio | C10 Δ | C10.1 Δ |" in text
    assert "| resnet_t3 (baseline) |" in text and "| class | C10 acc | baseline |" in text
    r = json.loads(out.read_text())
    for key in ("cifar10_acc", "cifar10_1_acc", "gap", "params", "macs_per_image", "time_ratio", "per_class_acc"):
        assert key in r
    assert r["n_cifar10"] == 40 and r["n_cifar10_1"] == 20 and r["params"] == count_parameters(model)
    assert r["gap"] == pytest.approx(r["cifar10_acc"] - r["cifar10_1_acc"])
    assert r["cifar10_acc_delta"] == pytest.approx(r["cifar10_acc"] - r["baseline"]["cifar10_acc"])
    assert r["cifar10_1_acc_delta"] == pytest.approx(r["cifar10_1_acc"] - r["baseline"]["cifar10_1_acc"])
    assert r["time_ratio"] > 0 and r["step"] == 11 and len(r["per_class_acc"]) == 10


def test_eval_command_without_cifar10_1_and_with_a_model_name_baseline(tmp_path, capsys):
    data = _fake_data(tmp_path / "data")
    _checkpoint(tmp_path / "model", "resnet_t3", 0)
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "eval",
                str(tmp_path / "model" / "checkpoint.safetensors"),
                "--data-dir",
                str(data),
                "--baseline",
                "resnet_t3",
                "--json",
                str(out),
                "--limit",
                "10",
                "--timing-repeats",
                "1",
                "--timing-batch",
                "4",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "CIFAR-10.1 not available" in captured.err and "| n/a |" in captured.out
    r = json.loads(out.read_text())
    assert r["cifar10_1_acc"] is None and r["gap"] is None and r["n_cifar10"] == 10
    assert r["time_ratio"] > 0 and r["cifar10_acc_delta"] is None and r["baseline"]["kind"] == "model"
    assert r["flip_tta"] is False and "flip test-time augmentation" not in captured.out
    args = ["eval", str(tmp_path / "model"), "--data-dir", str(data), "--limit", "10", "--timing-repeats", "1", "--timing-batch", "4"]
    assert main([*args, "--flip-tta", "--json", str(out)]) == 0
    assert "flip test-time augmentation (not the paper's protocol)" in capsys.readouterr().out
    assert json.loads(out.read_text())["flip_tta"] is True


def test_eval_command_errors(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    _checkpoint(tmp_path / "model", "resnet_t3", 0)
    assert main(["eval", str(tmp_path / "model"), "--data-dir", str(tmp_path / "empty")]) == 2
    assert "CIFAR-10 not found" in capsys.readouterr().err
    data = _fake_data(tmp_path / "data")
    assert main(["eval", str(tmp_path / "model"), "--data-dir", str(data), "--baseline", "no_such_model_or_path"]) == 2
    assert "neither a checkpoint path nor a model name" in capsys.readouterr().err


def test_eval_command_reports_extra_test_sets(tmp_path, capsys):
    data = _fake_data(tmp_path / "data")
    _checkpoint(tmp_path / "model", "resnet_t3", 0)
    _checkpoint(tmp_path / "base", "resnet_t3", 1)
    rng = np.random.default_rng(2)
    shift = tmp_path / "shift.npz"
    np.savez(shift, x=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, 12))
    out = tmp_path / "r.json"
    args = ["eval", str(tmp_path / "model"), "--data-dir", str(data), "--baseline", str(tmp_path / "base"), "--json", str(out)]
    args += ["--timing-repeats", "1", "--timing-batch", "4", "--test-set", f"fog={shift}", "--test-set", f"same={shift}"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert list(r["test_sets"]) == ["fog", "same"]
    fog = r["test_sets"]["fog"]
    assert fog["n"] == 12 and 0 <= fog["acc"] <= 1 and fog["gap"] == pytest.approx(r["cifar10_acc"] - fog["acc"])
    assert fog["acc_delta"] == pytest.approx(fog["acc"] - fog["baseline_acc"]) and 0 <= fog["mcnemar_p"] <= 1
    assert r["test_sets"]["same"] == fog  # the same file twice: the same numbers
    assert 0 <= r["cifar10_mcnemar_p"] <= 1 and r["cifar10_1_mcnemar_p"] is None  # paired against the trained baseline
    assert "Paired McNemar p against the baseline: C10 " in printed
    assert "| fog | 12 |" in printed
    # a file that is not a test set: one line, exit 2, before any evaluation
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((3, 32, 32), dtype=np.uint8), y=np.zeros(3, dtype=np.int64))
    assert main(["eval", str(tmp_path / "model"), "--data-dir", str(data), "--test-set", f"bad={bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.npz" in err and len(err.splitlines()) == 1


def test_eval_command_ema_evaluates_the_averaged_weights(tmp_path, capsys):
    data = _fake_data(tmp_path / "data")
    torch.manual_seed(0)
    model, ema = resetnet.create_model("resnet_t3"), resetnet.create_model("resnet_t3")
    with torch.no_grad():  # the "average" always answers class 3: its per-class accuracies show which weights were evaluated
        ema.fc.weight.zero_(), ema.fc.bias.copy_(torch.nn.functional.one_hot(torch.tensor(3), 10).float())
    cfg = load_config({"model": {"name": "resnet_t3"}, "data": {"verify": False}})
    save_checkpoint(tmp_path / "run", model, {"config": cfg, "step": 5, "rng": rng_state()}, aux={"ema": ema})
    args = [
        "eval",
        str(tmp_path / "run"),
        "--data-dir",
        str(data),
        "--timing-repeats",
        "1",
        "--timing-batch",
        "4",
        "--json",
        str(tmp_path / "r.json"),
    ]
    loader = DeviceLoader(*resetnet.data.load_cifar10(data, "test", verify=False), 16, train=False)
    for flag, net in (([], model), (["--ema"], ema)):
        assert main([*args, *flag]) == 0
        r = json.loads((tmp_path / "r.json").read_text())
        assert r["ema"] is bool(flag) and r["cifar10_acc"] == evaluate(net.eval(), loader)["acc"]
        assert ("(step 5, EMA)" in capsys.readouterr().out) is bool(flag)
    assert [a for a in r["per_class_acc"].values() if a is not None] == [0.0] * 3 + [1.0] + [0.0] * 6
    _checkpoint(tmp_path / "plain", "resnet_t3", 0)  # no EMA in it: one clear line
    assert main(["eval", str(tmp_path / "plain"), "--ema", "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert "holds no 'aux/ema' weights" in err and "train.ema_decay" in err

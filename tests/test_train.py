"""The trainer on synthetic in-memory data: exact resume, signals, NaN stop, freezing, schedules, metrics, CLI."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import random_arrays
from resetnet.cli import main
from resetnet.nn import GumbelSoftmaxScorer
from resetnet.train import ConfigError, NonFiniteLoss, TrainingInterrupted, load_model, read_checkpoint, train
from resetnet.train.config import merge
from resetnet.train.metrics import read_metrics
from resetnet.train.params import available_groups, freeze, select_named_parameters, select_parameters

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny(**updates):
    base = {
        "model": {"name": "reset_t3_2cu3it", "overrides": {}},
        "regularizers": {
            "entropy": {"lambda_batch": 0.01, "lambda_sample": 0.01, "decay": {"kind": "linear", "begin": "50%", "end": "100%", "final": 0.0}}
        },
        "train": {
            "batch_size": 16,
            "steps": 6,
            "eval_every": 3,
            "eval_batch_size": 32,
            "log_every": 1,
            "route_log_every": 2,
            "checkpoint_every": 3,
            "progress": False,
            "tensorboard": False,
        },
    }
    return merge(base, updates)


def state(run_dir):
    ckpt = read_checkpoint(run_dir)
    return ckpt.tensors, ckpt.meta


class At:
    """Callback running ``fn(trainer)`` after step ``step``."""

    def __init__(self, step, fn):
        self.step, self.fn = step, fn

    def on_step_end(self, trainer, step, stats):
        if step == self.step:
            self.fn(trainer)


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


GUMBEL = {"model": {"overrides": {"scorer": "gumbel_softmax"}}, "train": {"temperature": {"kind": "exponential", "initial": 1.0, "final": 0.5}}}


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_resume_after_sigterm_is_exact(tmp_path, optim):
    # Gumbel noise (RNG), augmentation, entropy decay, temperature schedule and optimizer state all have to resume exactly.
    cfg = tiny(**GUMBEL, optim={"name": optim, "lr": 0.05 if optim == "sgd" else 1e-3})
    data = random_arrays()
    straight = train(cfg, tmp_path / "a", arrays=data)
    assert straight["status"] == "completed" and straight["step"] == 6

    with pytest.raises(TrainingInterrupted, match="SIGTERM received: checkpoint saved at step 3") as info:
        train(cfg, tmp_path / "b", arrays=data, callbacks=[At(3, lambda t: os.kill(os.getpid(), signal.SIGTERM))])
    assert info.value.signum == signal.SIGTERM
    assert state(tmp_path / "b")[1]["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    resumed = train(cfg, tmp_path / "b", arrays=data, resume=True)
    assert resumed["step"] == 6

    (ta, ma), (tb, mb) = state(tmp_path / "a"), state(tmp_path / "b")
    assert_same_tensors(ta, tb)  # model weights, BN buffers and optimizer state
    assert ma["optimizer"] == mb["optimizer"] and ma["rng"] == mb["rng"]
    # metrics rows of the interrupted + resumed run match the straight run's
    rows = lambda d, kind: [(r["step"], r.get("loss"), r.get("acc")) for r in read_metrics(d, kind)]
    for kind in ("train", "eval"):
        assert rows(tmp_path / "a", kind) == rows(tmp_path / "b", kind)


def test_stop_after_pauses_and_resumes_exactly(tmp_path):
    cfg = tiny(train={"checkpoint_every": 0})
    data = random_arrays()
    straight = train(cfg, tmp_path / "a", arrays=data)
    paused = train(merge(cfg, {"train": {"stop_after": 4}}), tmp_path / "b", arrays=data)
    assert paused["status"] == "paused" and paused["step"] == 4
    train(cfg, tmp_path / "b", arrays=data, resume=True)
    assert_same_tensors(state(tmp_path / "a")[0], state(tmp_path / "b")[0])
    assert straight["last_eval"]["acc"] == state(tmp_path / "b")[1]["last_eval"]["acc"]


def test_request_stop_ends_the_run_like_a_spent_budget(tmp_path):
    events = []

    class Early:
        def on_fit_start(self, trainer):
            events.append(("start", trainer.step))

        def on_step_end(self, trainer, step, stats):
            if step == 2:
                trainer.request_stop("converged")

    summary = train(tiny(), tmp_path, arrays=random_arrays(), callbacks=[Early()])
    assert events == [("start", 0)]
    assert summary["status"] == "completed" and summary["step"] == 2 and summary["stop_reason"] == "converged"
    assert summary["last_eval"]["step"] == 2 and state(tmp_path)[1]["stop_reason"] == "converged"
    again = train(tiny(), tmp_path, arrays=random_arrays(), resume=True)  # an early-stopped run stays finished
    assert again["step"] == 2 and again["stop_reason"] == "converged"


def test_existing_run_and_changed_config_are_refused(tmp_path):
    data = random_arrays()
    train(tiny(train={"steps": 2}), tmp_path, arrays=data)
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        train(tiny(train={"steps": 2}), tmp_path, arrays=data)
    with pytest.raises(ConfigError, match="differs from the checkpoint's in optim.lr"):
        train(tiny(train={"steps": 2}, optim={"lr": 0.3}), tmp_path, arrays=data, resume=True)


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    def poison(trainer):
        with torch.no_grad():
            trainer.model.fc.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 5 .*last good checkpoint .* was kept") as info:
        train(tiny(), tmp_path, arrays=random_arrays(), callbacks=[At(4, poison)])
    assert info.value.step == 5
    tensors, meta = state(tmp_path)  # still a valid pair, from step 3
    assert meta["step"] == 3 and all(torch.isfinite(v).all() for k, v in tensors.items() if v.is_floating_point())


def test_nonfinite_loss_from_a_huge_lr(tmp_path):
    with pytest.raises(NonFiniteLoss, match="non-finite loss at step 2") as info:
        train(tiny(optim={"lr": 1e30}), tmp_path, arrays=random_arrays())
    assert info.value.step == 2 and not (tmp_path / "checkpoint.json").exists()


def test_controller_only_training_with_frozen_bn_stats(tmp_path):
    data = random_arrays()
    cfg = tiny(trainable=["controller"], freeze_bn_stats=True, train={"steps": 4, "checkpoint_every": 0})
    # snapshot the initial weights: same seed, same construction as in train()
    from resetnet.train import build_model, load_config

    init = build_model(load_config(cfg)).state_dict()
    train(cfg, tmp_path, arrays=data)
    model, _ = load_model(tmp_path)
    after = model.state_dict()
    controller = {f"{n}" for n, _ in select_named_parameters(model, ["controller"])}
    controller_state = {k for k in after if ".controller." in k}  # its weights and its own (trained) BN statistics
    assert controller <= controller_state
    changed = {k for k in after if not torch.equal(after[k], init[k])}
    assert changed & controller and changed <= controller_state  # only the controllers moved
    frozen_stats = [k for k in after if "running" in k and k not in controller_state]
    assert frozen_stats and not set(frozen_stats) & changed  # every frozen module's BN buffer is untouched

    # without freeze_bn_stats the frozen modules' statistics do move
    train(merge(cfg, {"freeze_bn_stats": False}), tmp_path / "b", arrays=data)
    after_b = load_model(tmp_path / "b")[0].state_dict()
    assert any("running_mean" in k and not torch.equal(after_b[k], init[k]) for k in after_b)


def test_parameter_groups():
    import resetnet

    model = resetnet.create_model("reset38")
    assert available_groups(model) == ["controller", "units", "stem", "stage0", "stage1", "stage2", "head", "all"]
    n = lambda groups: sum(p.numel() for p in select_parameters(model, groups))
    total = n(["all"])
    assert n(["stem", "stage0", "stage1", "stage2", "head"]) == total
    assert n(["controller", "units"]) < total and n(["controller"]) + n(["units"]) == n(["controller", "units"])
    assert n(["stage0"]) < n(["stage0", "controller"]) < n(["stage0"]) + n(["controller"])  # overlapping groups are a union
    freeze(model, ["units", "stem"])
    assert not any(p.requires_grad for p in model.stem.parameters()) and all(p.requires_grad for p in model.fc.parameters())
    with pytest.raises(ValueError, match="valid groups: controller, units, stem, stage0, stage1, stage2, head, all"):
        select_parameters(model, ["stage7"])


def test_temperature_schedule_is_applied(tmp_path):
    seen = []

    class Record:
        def on_step_end(self, trainer, step, stats):
            seen.append([m.temperature for m in trainer.model.modules() if isinstance(m, GumbelSoftmaxScorer)][0])

    cfg = tiny(model=GUMBEL["model"], train={"steps": 5, "temperature": {**GUMBEL["train"]["temperature"], "final": 0.25, "end": "100%"}})
    train(cfg, tmp_path, arrays=random_arrays(), callbacks=[Record()])
    # temperature used for the update at step s (0-based) is 1.0 * 0.25 ** (s / 5)
    assert seen == pytest.approx([0.25 ** (s / 5) for s in range(5)])
    temps = [r["temperature"] for r in read_metrics(tmp_path, "routing")]
    assert temps == sorted(temps, reverse=True) and len(temps) == 2


def test_metrics_rows_and_tensorboard(tmp_path):
    summary = train(tiny(train={"tensorboard": True}), tmp_path, arrays=random_arrays())
    rows = read_metrics(tmp_path)
    kinds = {r["kind"] for r in rows}
    assert {"train", "eval", "routing"} <= kinds
    train_rows = read_metrics(tmp_path, "train")
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "ce", "acc", "lr", "images_per_s", "entropy_batch", "entropy_sample", "entropy_factor"} <= set(train_rows[0])
    routing = read_metrics(tmp_path, "routing")
    assert [r["step"] for r in routing] == [2, 4, 6]
    mw = np.array(routing[0]["mean_weights"])  # [module][iteration][unit], zero unit last
    assert mw.shape == (1, 3, 3) and np.allclose(mw.sum(-1), 1.0, atol=1e-5)
    assert routing[0]["modules"] == ["stages.0"] and len(routing[0]["skip_rate"]) == 1
    evals = read_metrics(tmp_path, "eval")
    assert [r["step"] for r in evals] == [3, 6] and 0 <= evals[-1]["acc"] <= 1
    assert summary["test_acc"] == evals[-1]["acc"] and summary["best"]["acc"] == max(r["acc"] for r in evals)
    assert any((tmp_path / "tb").iterdir())
    assert (tmp_path / "config.yaml").is_file()


def test_routing_is_requested_only_when_needed(tmp_path):
    calls = []

    class Spy:
        def on_step_end(self, trainer, step, stats):
            calls.append("entropy_batch" in stats)

    cfg = tiny(regularizers={"entropy": {"lambda_batch": 0.0, "lambda_sample": 0.0}}, train={"route_log_every": 3})
    train(cfg, tmp_path, arrays=random_arrays(), callbacks=[Spy()])
    assert calls == [False] * 6  # no regularizer: the entropy terms are never computed
    assert [r["step"] for r in read_metrics(tmp_path, "routing")] == [3, 6]


def test_init_from_and_head_only_training(tmp_path):
    data = random_arrays()
    train(tiny(train={"steps": 3}), tmp_path / "a", arrays=data)
    cfg = tiny(init_from=str(tmp_path / "a"), trainable=["head"], freeze_bn_stats=True, train={"steps": 3, "seed": 5})
    train(cfg, tmp_path / "b", arrays=data)
    a, b = load_model(tmp_path / "a")[0].state_dict(), load_model(tmp_path / "b")[0].state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    # the head (and the running statistics of its trainable BatchNorm) moved; everything else is A's
    assert changed == {
        "fc.weight",
        "fc.bias",
        "head_norm.weight",
        "head_norm.bias",
        "head_norm.running_mean",
        "head_norm.running_var",
        "head_norm.num_batches_tracked",
    }


def test_skip_reward_with_a_hard_scorer(tmp_path):
    cfg = tiny(model={"overrides": {"scorer": "gumbel_st"}}, regularizers={"skip_reward": {"enabled": True, "reward": 0.5}}, train={"steps": 3})
    train(cfg, tmp_path, arrays=random_arrays())
    rows = read_metrics(tmp_path, "train")
    assert all("skip_rl" in r and 0 <= r["skip_rate"] <= 1 for r in rows)
    assert "aux/skip_reward/baseline" in read_checkpoint(tmp_path).tensors
    with pytest.raises(ConfigError, match="needs a hard scorer that samples"):
        train(tiny(regularizers={"skip_reward": {"enabled": True}}), tmp_path / "soft", arrays=random_arrays())


def test_batch_repeat_and_config_stop_hooks_are_wired(tmp_path):
    seen = []

    class Batch:
        def on_step_end(self, trainer, step, stats):
            seen.append(float(stats["correct"]))

    from resetnet_experiments.hooks import RouteConvergence

    cfg = tiny(train={"batch_repeat": 4, "steps": 3})
    stop = RouteConvergence(threshold=1.0, window=1, every=1, probe_size=4)
    summary = train(cfg, tmp_path, arrays=random_arrays(), callbacks=[stop, Batch()])
    assert all(0 <= c <= 16 for c in seen)  # correct counts per image of the 16-image batch
    assert summary["step"] == 1 and "route_convergence" in summary["stop_reason"]  # the early stop ran


def test_epoch_budget_and_fraction_milestones(tmp_path):
    seen = []

    class LR:
        def on_step_end(self, trainer, step, stats):
            seen.append(trainer.optimizer.param_groups[0]["lr"])

    cfg = tiny(train={"steps": None, "epochs": 2, "eval_every": 0, "checkpoint_every": 0}, optim={"lr": 0.1})
    summary = train(cfg, tmp_path, arrays=random_arrays(), callbacks=[LR()])
    assert summary["total_steps"] == 8  # 64 images / 16 per batch = 4 steps per epoch
    assert seen == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)


# ----------------------------------------------------------------------------- CLI
def write_fake_cifar(root: Path, n_train=100, n_test=100, seed=0):
    """Small files in the official binary layout (use with data.verify=false)."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    for name, n in [(f"data_batch_{i}.bin", n_train // 5) for i in range(1, 6)] + [("test_batch.bin", n_test)]:
        rec = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3072))], axis=1).astype(np.uint8)
        (d / name).write_bytes(rec.tobytes())
    return root


def test_cli_train_then_eval_on_fake_files(tmp_path, capsys):
    data = write_fake_cifar(tmp_path / "data")
    out = tmp_path / "run"
    sets = [
        "data.verify=false",
        "data.limit_train=null",
        "data.limit_test=null",
        "train.batch_size=20",
        "train.steps=3",
        "train.eval_every=0",
        "train.progress=false",
        "train.tensorboard=false",
        "train.route_log_every=1",
    ]
    args = ["train", "--config", "smoke", "--out", str(out), "--data-dir", str(data)]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["status"] == "completed" and line["step"] == 3
    report = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                str(out),
                "--data-dir",
                str(data),
                "--json",
                str(report),
                "--limit",
                "40",
                "--timing-repeats",
                "1",
                "--timing-batch",
                "8",
                "--baseline",
                "resnet_t3",
                "--batch-size",
                "16",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| reset_t3_2cu3it (step 3) |" in printed and "| resnet_t3 (baseline, untrained) |" in printed
    r = json.loads(report.read_text())
    assert r["n_cifar10"] == 40 and r["cifar10_1_acc"] is None and r["gap"] is None and r["time_ratio"] > 0
    # resume of a finished run is a no-op that still succeeds
    assert main(args + ["--resume"]) == 0


def test_cli_nonfinite_loss_exits_3(tmp_path, capsys):
    data = write_fake_cifar(tmp_path / "data")
    code = main(
        [
            "train",
            "--config",
            "smoke",
            "--out",
            str(tmp_path / "run"),
            "--data-dir",
            str(data),
            "--set",
            "data.verify=false",
            "--set",
            "optim.lr=1e30",
            "--set",
            "train.batch_size=20",
            "--set",
            "train.progress=false",
            "--set",
            "train.tensorboard=false",
        ]
    )
    err = capsys.readouterr().err
    assert code == 3 and "non-finite loss at step 2" in err and "Traceback" not in err


def test_cli_missing_data_fails_fast_with_one_message(tmp_path, capsys, monkeypatch):
    import resetnet.data.cifar10 as c10

    monkeypatch.setattr(c10, "CIFAR10_URL", "http://127.0.0.1:9/cifar-10-binary.tar.gz")  # no network
    start = time.perf_counter()
    code = main(["train", "--config", "reset38", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert code == 2 and time.perf_counter() - start < 60  # a generous bound: catches retries/hangs, not speed
    assert "CIFAR-10 not found" in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_cli_config_errors(tmp_path, capsys):
    assert main(["train", "--config", "smoke", "--out", str(tmp_path), "--set", "optim.lr=-1"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert main(["train", "--config", "nope", "--out", str(tmp_path)]) == 2
    assert "shipped configs" in capsys.readouterr().err


def test_cli_print_config(capsys):
    assert main(["train", "--config", "t2_r6_gsm_entr", "--out", "unused", "--print-config", "--set", "train.seed=4"]) == 0
    out = capsys.readouterr().out
    assert "gumbel_softmax" in out and "seed: 4" in out


@pytest.mark.skipif(not (REAL_DATA / "cifar-10-batches-bin" / "test_batch.bin").is_file(), reason="real CIFAR-10 not available")
def test_cli_smoke_on_real_cifar10(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        "--config",
        "smoke",
        "--out",
        str(out),
        "--data-dir",
        str(REAL_DATA),
        "--set",
        "train.steps=6",
        "--set",
        "train.batch_size=32",
        "--set",
        "data.limit_train=500",
        "--set",
        "data.limit_test=200",
        "--set",
        "train.eval_every=3",
        "--set",
        "train.progress=false",
        "--set",
        "train.tensorboard=false",
    ]
    assert main(args) == 0
    report = tmp_path / "eval.json"
    assert (
        main(
            ["eval", str(out), "--data-dir", str(REAL_DATA), "--limit", "200", "--json", str(report), "--timing-repeats", "1", "--timing-batch", "16"]
        )
        == 0
    )
    r = json.loads(report.read_text())
    assert r["n_cifar10"] == 200 and 0 <= r["cifar10_acc"] <= 1 and r["params"] > 0 and r["macs_per_image"] > 0
    assert set(r["per_class_acc"]) == {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}


@pytest.mark.parametrize(
    "scorer,skip_reward",
    [("softmax", False), ("gumbel_st", False), ("gumbel_st", True)],
    ids=["softmax-fused", "gumbel_st-sparse", "gumbel_st-skip_reward"],
)
def test_bf16_autocast_and_channels_last_training_on_cpu(tmp_path, scorer, skip_reward):
    """The GPU's training numerics (train.amp and channels_last, here forced on the CPU): fused and sparse routing,
    the entropy regularizer and the skip reward run under bf16 autocast, weights stay float32, the loss is finite,
    and the checkpoint reloads."""
    from resetnet.train import load_config, resolve_runtime

    updates = {"model": {"overrides": {"scorer": scorer}}, "train": {"amp": True, "channels_last": True, "steps": 4}}
    if skip_reward:
        updates["regularizers"] = {"skip_reward": {"enabled": True}}
    cfg = tiny(**updates)
    runtime = resolve_runtime(load_config(cfg))
    assert runtime.amp and runtime.channels_last and runtime.device.type == "cpu"

    seen = []  # (output dtype, input is channels_last) of the first convolution, from step 2 on

    def watch(trainer):
        conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, i, o: seen.append((o.dtype, i[0].is_contiguous(memory_format=torch.channels_last))))

    result = train(cfg, tmp_path / "run", arrays=random_arrays(), callbacks=[At(1, watch)])
    assert result["status"] == "completed" and result["step"] == 4
    assert seen and all(dtype == torch.bfloat16 and cl for dtype, cl in seen), seen[:3]
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert rows and all(np.isfinite(r["loss"]) for r in rows)
    model = load_model(tmp_path / "run")[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_amp_auto_is_off_on_cpu():
    from resetnet.train import load_config, resolve_runtime

    runtime = resolve_runtime(load_config(tiny()))
    assert not runtime.amp and not runtime.channels_last


def test_controller_weight_decay_is_a_second_parameter_group():
    import resetnet
    from resetnet.train.config import load_config
    from resetnet.train.trainer import build_optimizer

    model = resetnet.create_model("reset_t3_3cu2it")
    controller = {id(p) for p in select_parameters(model, ["controller"])}
    params = list(model.parameters())
    cfg = load_config({"model": {"name": "reset_t3_3cu2it"}, "optim": {"weight_decay": 5e-4, "controller_weight_decay": 0.0}})
    rest, ctrl = build_optimizer(cfg, params, model).param_groups
    assert {id(p) for p in ctrl["params"]} == controller and ctrl["weight_decay"] == 0.0
    assert not controller & {id(p) for p in rest["params"]} and rest["weight_decay"] == 5e-4
    assert len(rest["params"]) + len(ctrl["params"]) == len(params)
    # only the controller trainable: one group, with the controller's decay
    (only,) = build_optimizer(cfg, select_parameters(model, ["controller"]), model).param_groups
    assert only["weight_decay"] == 0.0
    # unset (the default), or a model without controllers: one group with optim.weight_decay
    default = load_config({"model": {"name": "reset_t3_3cu2it"}, "optim": {"weight_decay": 5e-4}})
    assert [g["weight_decay"] for g in build_optimizer(default, params, model).param_groups] == [5e-4]
    plain = resetnet.create_model("resnet_t3")
    assert [g["weight_decay"] for g in build_optimizer(cfg, plain.parameters(), plain).param_groups] == [5e-4]
    with pytest.raises(ConfigError, match="controller_weight_decay"):
        load_config({"optim": {"controller_weight_decay": -1.0}})


def test_norm_weight_decay_spares_one_dimensional_parameters():
    import resetnet
    from resetnet.train.config import load_config
    from resetnet.train.trainer import build_optimizer

    model = resetnet.create_model("reset_t3_3cu2it")
    controller = {id(p) for p in select_parameters(model, ["controller"])}
    cfg = load_config({"optim": {"weight_decay": 5e-4, "controller_weight_decay": 1e-3, "norm_weight_decay": 0.0}})
    rest, ctrl, norm = build_optimizer(cfg, model.parameters(), model).param_groups
    assert [g["weight_decay"] for g in (rest, ctrl, norm)] == [5e-4, 1e-3, 0.0]
    assert {id(p) for p in ctrl["params"]} == controller  # the controllers' own decay comes first
    assert all(p.ndim <= 1 and id(p) not in controller for p in norm["params"]) and all(p.ndim > 1 for p in rest["params"])
    # a step with zero gradients: decay shrinks the convolutions but leaves the BatchNorm scales alone
    plain = resetnet.create_model("resnet_t3")
    opt = build_optimizer(load_config({"optim": {"lr": 0.1, "weight_decay": 0.1, "norm_weight_decay": 0.0}}), plain.parameters(), plain)
    before = {n: p.detach().clone() for n, p in plain.named_parameters()}
    for p in plain.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    bn = [n for n, p in plain.named_parameters() if p.ndim == 1 and "bn" in n]
    assert bn and all(torch.equal(before[n], dict(plain.named_parameters())[n]) for n in bn)
    assert not torch.equal(before["fc.weight"], plain.fc.weight)
    with pytest.raises(ConfigError, match="norm_weight_decay"):
        load_config({"optim": {"norm_weight_decay": -1.0}})


def test_weight_ema_follows_its_formula_resumes_exactly_and_is_tested_beside(tmp_path):
    cfg, data, seen = tiny(train={"ema_decay": 0.5, "checkpoint_every": 0}), random_arrays(), []

    class Record:  # the weights before training and after every step
        def on_fit_start(self, trainer):
            seen.append({k: v.clone() for k, v in trainer.model.state_dict().items()})

        def on_step_end(self, trainer, step, stats):
            self.on_fit_start(trainer)

    summary = train(cfg, tmp_path / "a", arrays=data, callbacks=[Record()])
    expected = dict(seen[0])
    for t, w in enumerate(seen[1:]):  # d = min(decay, (1 + t) / (10 + t)): 0.1, 0.18, 0.25, 0.31, 0.36, 0.41
        d = min(0.5, (1 + t) / (10 + t))
        expected = {k: d * e + (1 - d) * w[k] if e.is_floating_point() else w[k] for k, e in expected.items()}
    tensors, _ = state(tmp_path / "a")
    for k, v in expected.items():
        torch.testing.assert_close(tensors[f"aux/ema/{k}"], v)
    assert not torch.equal(tensors["aux/ema/fc.weight"], tensors["model/fc.weight"])
    ema_rows = [r for r in read_metrics(tmp_path / "a", "eval") if r["split"] == "test_ema"]
    assert len(ema_rows) == 1 and summary["ema_test_acc"] is not None and ema_rows[0]["acc"] == summary["ema_test_acc"]
    assert summary["last_eval"]["split"] == "test"  # the trained weights' result stays the run's result

    train(merge(cfg, {"train": {"stop_after": 4}}), tmp_path / "b", arrays=data)
    train(cfg, tmp_path / "b", arrays=data, resume=True)
    assert_same_tensors(tensors, state(tmp_path / "b")[0])  # the EMA resumes exactly
    model, _ = load_model(tmp_path / "a", ema=True)
    assert torch.equal(model.fc.weight, tensors["aux/ema/fc.weight"])

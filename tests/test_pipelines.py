"""Staged pipelines: budget-picked values, stage chaining and caching, phase schedules, early stops,
and the stage transitions of each pipeline on a tiny model with synthetic 8x8 data."""

from __future__ import annotations

import pytest
import torch

from helpers import random_arrays
from resetnet.checkpoint import read_checkpoint
from resetnet.models import load_model
from resetnet.nn import SoftmaxScorer, TopKScorer
from resetnet.train.config import ConfigError
from resetnet.train.metrics import read_metrics
from resetnet_experiments.hooks import PhaseSchedule, probe_routes, resolve_groups, route_change_fraction
from resetnet_experiments.pipelines import PIPELINES, Runner, run_pipeline
from resetnet_experiments.tables import BUDGETS

QUIET = {
    "train": {
        "batch_size": 16,
        "eval_every": 0,
        "eval_batch_size": 32,
        "log_every": 1,
        "route_log_every": 0,
        "checkpoint_every": 0,
        "progress": False,
        "tensorboard": False,
    }
}
TINY = {"name": "reset_t3_2cu3it", "overrides": {"controller": "rnn", "scorer": "softmax", "unit_bn": "per_iteration"}}


def runner(tmp_path, **kw) -> Runner:
    kw.setdefault("budget", "smoke")
    return Runner(tmp_path / "stages", overrides=QUIET, arrays=random_arrays(), **kw)


# ----------------------------------------------------------------------------- planning
@pytest.mark.parametrize("name", sorted(PIPELINES))
@pytest.mark.parametrize("budget", ["smoke", "cpu", "full"])
def test_shipped_pipelines_plan_checked_configs(tmp_path, name, budget):
    stages = run_pipeline(name, Runner(tmp_path, budget=budget, overrides=BUDGETS[budget].overrides, dry_run=True))
    assert stages and all(len(s.key) == 64 for s in stages)
    assert stages[0].config.init_from.path is None
    for prev, stage in zip(stages, stages[1:]):
        if stage.config is not None and stage.name != "pretrain":
            assert stage.config.init_from.path == str(prev.out_dir)
    if budget == "smoke":  # minutes: no stage falls back to a config's full budget
        assert all(s.config.train.steps <= 20 for s in stages if s.config is not None), [(s.name, s.config.train.steps) for s in stages if s.config]


def test_budget_values_upto_and_bad_budgets(tmp_path):
    run = Runner(tmp_path, budget="cpu", dry_run=True)
    assert run.pick({"smoke": 1, "cpu": 2, "full": None}) == 2 and run.pick({"x": 1}) == {"x": 1} and run.pick(3) == 3
    stages = run_pipeline("relaxation", Runner(tmp_path, budget="smoke", dry_run=True, upto="gsm"))
    assert [s.name for s in stages] == ["pretrain", "gsm"]
    with pytest.raises(ConfigError, match="no stage 'nope'"):
        run_pipeline("relaxation", Runner(tmp_path, budget="smoke", dry_run=True, upto="nope"))
    trained = []
    with pytest.raises(ConfigError, match="no stage 'nope'"):  # before any stage trains
        run_pipeline("relaxation", Runner(tmp_path, budget="smoke", upto="nope", train_fn=lambda *a, **k: trained.append(a)))
    assert trained == []
    with pytest.raises(ConfigError, match="budget"):
        Runner(tmp_path, budget="huge")
    with pytest.raises(ConfigError, match="unexpected keyword"):
        run_pipeline("scratch", Runner(tmp_path, budget="smoke", dry_run=True), {"wings": 2})


def test_table2_rows_share_the_pretrained_stage(tmp_path):
    from resetnet_experiments.tables import TABLE2

    keys = {}
    for row in TABLE2.rows:
        run = Runner(tmp_path, budget="cpu", overrides=BUDGETS["cpu"].overrides, recipe=BUDGETS["cpu"].recipe, upto=row.upto, dry_run=True)
        keys[row.n] = [s.key for s in run_pipeline(row.pipeline, run, row.vars)]
    assert all(keys[n][0] == keys[2][0] for n in (8, 9, 10, 11, 12, 13, 17, 18, 19, 20))
    assert keys[16][0] == keys[7][0]  # "7 then finetune all"
    assert keys[13][:3] == keys[11]  # HybRL continues the converged GST stage
    assert keys[13][3] != keys[14][3]  # different rewards
    assert keys[11][2] != keys[12][2]  # row 12's GST stage trains everything


def test_the_recipe_applies_to_from_scratch_sgd_stages_only(tmp_path):
    run = Runner(tmp_path, budget="cpu", recipe="fast", dry_run=True)
    scratch = run.config("t2_r2_sm")
    assert (
        scratch.optim.nesterov
        and scratch.optim.schedule.kind == "linear"
        and scratch.train.label_smoothing == 0.2
        and scratch.data.flip == "alternating"
    )
    adam = run.config("t2_r3_sm_adam")  # another optimizer: its own recipe
    assert adam.optim.name == "adam" and adam.optim.schedule.kind == "exponential"
    continued = run.config("table2/row16_finetune_all_sm", init="/a/run")  # continues a model: its own lr
    assert continued.optim.lr == 0.01 and not continued.optim.nesterov


# ----------------------------------------------------------------------------- chaining (fake trainer)
def test_stages_chain_and_are_cached(tmp_path):
    calls = []

    def fake_train(cfg, out_dir, data_dir=None, resume=False, arrays=None, callbacks=()):
        calls.append((cfg, out_dir))
        (out_dir / "marker").write_text("x")
        return {"status": "completed", "step": cfg.train.steps}

    def pipe(run, lr=0.5):
        run.train("a", {"model": TINY}, {"smoke": 2, "cpu": 9}, init=None)
        run.train("b", {"model": TINY, "trainable": ["controller"]}, sets={"optim.lr": lr})

    res = run_pipeline(pipe, runner(tmp_path, seed=3, train_fn=fake_train))
    assert [r.name for r in res] == ["a", "b"] and not any(r.reused for r in res)
    (cfg_a, dir_a), (cfg_b, dir_b) = calls
    assert cfg_a.train.steps == 2 and cfg_a.init_from.path is None
    assert cfg_b.init_from.path == str(dir_a) and cfg_b.optim.lr == 0.5 and cfg_b.trainable == ["controller"]
    assert cfg_a.train.seed == cfg_b.train.seed == 3
    # Again: nothing retrained; a changed variable retrains only the changed stage.
    res2 = run_pipeline(pipe, runner(tmp_path, seed=3, train_fn=fake_train))
    assert len(calls) == 2 and all(r.reused for r in res2)
    run_pipeline(pipe, runner(tmp_path, seed=3, train_fn=fake_train), {"lr": 0.25})
    assert len(calls) == 3 and calls[-1][1] != dir_b and calls[-1][0].init_from.path == str(dir_a)


# ----------------------------------------------------------------------------- phases and stops (pure)
def test_phase_rules_are_pure_functions_of_the_step():
    import resetnet

    model = resetnet.create_model("reset_t3_2cu3it")
    fixed = PhaseSchedule("fixed", [["controller"], ["units"]], length=[2, 1])
    assert [fixed.phase_at(s, model, 100) for s in range(7)] == [0, 0, 1, 0, 0, 1, 0]
    prog = PhaseSchedule("progressive", [["controller"], ["units"]], length=[1, 1], growth=[1.0, 2.0])
    assert [prog.phase_at(s, model, 100) for s in range(10)] == [0, 1, 0, 1, 1, 0, 1, 1, 1, 1]
    inc = PhaseSchedule("incremental", every=2)
    assert inc.phases(model) == [["head"], ["head", "stage2"], ["head", "stage2", "stage1"], ["head", "stage2", "stage1", "stage0"], ["all"]]
    assert [inc.phase_at(s, model, 100) for s in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    with pytest.raises(ConfigError, match="rule"):
        PhaseSchedule("random", [["controller"], ["units"]])
    with pytest.raises(ConfigError, match="group"):
        resolve_groups(model, ["controller", "nope"])
    # "-group" removes a group from the union.
    no_ctrl = {id(p) for p in resolve_groups(model, ["all", "-controller"])}
    ctrl = {id(p) for p in resolve_groups(model, ["controller"])}
    assert no_ctrl and not (no_ctrl & ctrl) and len(no_ctrl) + len(ctrl) == len(list(model.parameters()))


def test_route_change_fraction_and_probe_routes():
    import resetnet

    a = torch.tensor([[0, 1, 2], [1, 1, 1]])
    assert route_change_fraction(a, a) == 0.0
    assert route_change_fraction(a, torch.tensor([[0, 1, 2], [1, 1, 0]])) == pytest.approx(1 / 6)
    model = resetnet.create_model("reset_t3_2cu3it", scorer="gumbel_st").train()
    x = torch.randn(4, 3, 8, 8)
    r = probe_routes(model, x)
    assert r.shape == (4, 3) and model.training
    assert torch.equal(r, probe_routes(model, x))  # eval mode: deterministic


# ----------------------------------------------------------------------------- stage transitions (real trainer)
def _units_and_bn(model):
    return {k: v.clone() for k, v in model.state_dict().items() if ".controller." not in k}


def test_controller_only_pipeline_freezes_units_and_bn(tmp_path):
    """Sec. 5.1 on a tiny ResNet-20: pretrain -> twin (reset_from_resnet) -> controller-only training."""
    stages = run_pipeline("controller_only", runner(tmp_path), {"depth": 20, "pretrain_steps": 2, "steps": 3, "controller": "cnn"})
    assert [s.name for s in stages] == ["pretrain", "twin", "controller"]
    resnet, _ = load_model(stages[0].out_dir)
    twin, twin_meta = load_model(stages[1].out_dir)
    trained, meta = load_model(stages[2].out_dir)
    assert twin.model_name == trained.model_name == "reset_seq20"
    assert meta["config"]["init_from"]["path"] == str(stages[1].out_dir)
    assert meta["config"]["trainable"] == ["controller"] and meta["config"]["freeze_bn_stats"]
    before, after = _units_and_bn(twin), _units_and_bn(trained)
    for k in before:  # units, stem, head: weights AND BatchNorm running statistics unchanged
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(v, trained.state_dict()[k]) for k, v in twin.state_dict().items() if ".controller." in k and v.is_floating_point())
    # The twin holds the ResNet's weights.
    from resetnet.models.transfer import resnet_to_reset_state

    for k, v in resnet_to_reset_state(resnet.state_dict()).items():
        assert torch.equal(twin.state_dict()[k], v), k


def test_relaxation_pipeline_switches_scorers_and_stops(tmp_path):
    """Sec. 5.3 on a tiny ReSet: softmax -> GSM (controller) -> GST until converged -> Hybrid RL to a skip target."""
    from resetnet_experiments.hooks import RouteConvergence, SkipRateTarget

    contr = {
        "trainable": ["controller"],
        "freeze_bn_stats": True,
        "optim": {"name": "adam", "lr": 1e-3, "grad_clip": 1.0, "schedule": {"kind": "constant"}},
    }

    def scorer(name):
        return {"model": {**TINY, "overrides": {**TINY["overrides"], "scorer": name}}, **contr}

    def pipe(run):
        run.train("sm", {"model": TINY}, 2, init=None)
        run.train("gsm", scorer("gumbel_softmax"), 2)
        run.train("gst", scorer("gumbel_st"), 50, callbacks=[RouteConvergence(threshold=1.0, window=2, every=1, probe_size=8)])
        run.train(
            "hybrl",
            {**scorer("gumbel_st"), "regularizers": {"skip_reward": {"enabled": True, "reward": 0.1}}},
            50,
            callbacks=[SkipRateTarget(target=0.0, window=1)],
        )

    stages = run_pipeline(pipe, runner(tmp_path))
    models = [load_model(s.out_dir)[0] for s in stages]
    assert [type(m.reset_modules()[0].scorer).__name__ for m in models] == [
        "SoftmaxScorer",
        "GumbelSoftmaxScorer",
        "GumbelSTScorer",
        "GumbelSTScorer",
    ]
    for prev, nxt in zip(models[1:], models[2:]):  # controller-only stages: units and BN statistics unchanged
        a, b = _units_and_bn(prev), _units_and_bn(nxt)
        assert all(torch.equal(a[k], b[k]) for k in a)
    gst, hyb = stages[2], stages[3]
    assert gst.summary["status"] == "completed" and gst.summary["step"] == 2 and "route_convergence" in gst.summary["stop_reason"]
    rows = [r for r in read_metrics(gst.out_dir / "metrics.jsonl") if r["kind"] == "route_convergence"]
    assert rows and rows[-1]["changed"] <= 1.0
    assert hyb.summary["status"] == "completed" and hyb.summary["step"] == 1 and "skip_rate" in hyb.summary["stop_reason"]
    assert read_checkpoint(gst.out_dir).meta["config"]["init_from"]["path"] == str(stages[1].out_dir)


class Recorder:
    def __init__(self):
        self.trainable = []

    def on_step_end(self, trainer, step, stats):
        m = trainer.model
        self.trainable.append(
            tuple(
                bool(any(p.requires_grad for p in ps))
                for ps in (
                    [p for r in m.reset_modules() for p in r.controller.parameters()],
                    [p for r in m.reset_modules() for p in r.units.parameters()],
                    list(m.stem.parameters()),
                    list(m.fc.parameters()),
                )
            )
        )


def test_two_phase_and_incremental_switch_trainable_groups(tmp_path):
    from resetnet.train.trainer import train

    base = {"model": TINY, **QUIET, "train": {**QUIET["train"], "steps": 6}}
    rec = Recorder()
    phases = PhaseSchedule("fixed", [["controller"], ["all", "-controller"]], length=[1, 2])
    train(base, tmp_path / "a", arrays=random_arrays(), callbacks=[phases, rec])
    # state after step s = the phase of step s (controller, units, stem, head)
    assert rec.trainable == [(False, True, True, True), (False, True, True, True), (True, False, False, False)] * 2
    ckpt = read_checkpoint(tmp_path / "a")
    assert [r["phase"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if r["kind"] == "phase"] == [0, 1, 0, 1, 0]
    assert ckpt.meta["step"] == 6
    rec = Recorder()
    inc = {**base, "train": {**base["train"], "steps": 10}, "freeze_bn_stats": True}
    train(inc, tmp_path / "b", arrays=random_arrays(), callbacks=[PhaseSchedule("incremental", every=2), rec])
    # [head] at 0, +stage2 at 2, +stage1 at 4, +stage0 (the ReSet module) at 6, [all] (the stem too) at 8
    assert [r[3] for r in rec.trainable] == [True] * 10
    assert [r[0] for r in rec.trainable] == [r[1] for r in rec.trainable] == [False] * 5 + [True] * 5
    assert [r[2] for r in rec.trainable] == [False] * 7 + [True] * 3


def test_topk_pipeline_switches_to_topk(tmp_path):
    def pipe(run, k):  # the topk pipeline's two stages on the tiny model
        run.train("sm", {"model": TINY}, 2, init=None)
        run.train("topk", {"model": {**TINY, "overrides": {**TINY["overrides"], "scorer": "topk"}}}, 2, sets={"model.overrides.topk": k})

    stages = run_pipeline(pipe, runner(tmp_path), {"k": 2})
    model, meta = load_model(stages[-1].out_dir)
    scorer = model.reset_modules()[0].scorer
    assert isinstance(scorer, TopKScorer) and scorer.k == 2
    assert isinstance(load_model(stages[0].out_dir)[0].reset_modules()[0].scorer, SoftmaxScorer)


# ----------------------------------------------------------------------------- early stops, rule by rule
class _FakeLogger:
    def __init__(self):
        self.rows = []

    def log(self, kind, step, row):
        self.rows.append((kind, step, row))


class _FakeTrainer:
    def __init__(self):
        self.logger = _FakeLogger()
        self.stopped_at = None
        self.model = None
        self.data = None

    def request_stop(self, reason):
        self.stopped_at = self.reason = reason

    def set_train_mode(self):
        pass


def _route_convergence_run(monkeypatch, routes_at, steps, **spec):
    """Drive RouteConvergence with the hard routes ``routes_at(step)``; returns the step it stopped at."""
    from resetnet_experiments import hooks

    rc = hooks.RouteConvergence(**{"threshold": 0.1, "window": 4, "every": 2, "probe_size": 8, "min_steps": 0, **spec})
    rc.probe = torch.zeros(1)
    trainer = _FakeTrainer()
    current = {"step": 0}
    monkeypatch.setattr(hooks, "probe_routes", lambda model, x: routes_at(current["step"]))
    trainer.step = 0
    rc.on_fit_start(trainer)
    for step in range(1, steps + 1):
        current["step"] = step
        rc.on_step_end(trainer, step, {})
        if trainer.stopped_at is not None:
            return step
    return None


def test_route_convergence_stops_only_once_the_routes_stop_changing(monkeypatch):
    # routes change completely every probe until step 10, then stay fixed
    def routes(step):
        return torch.full((8, 3), min(step, 10) % 2, dtype=torch.long) + (min(step, 10) // 2)

    stop = _route_convergence_run(monkeypatch, routes, 30)
    assert stop == 14  # the first probe whose window (4 steps back, to step 10) saw no change
    assert _route_convergence_run(monkeypatch, lambda s: torch.full((8, 3), s, dtype=torch.long), 30) is None

    # a quarter of the routes keep changing: above a 0.1 threshold, below a 0.5 one
    def quarter(step):
        r = torch.zeros(8, 3, dtype=torch.long)
        r[:2] = step
        return r

    assert _route_convergence_run(monkeypatch, quarter, 30) is None
    assert _route_convergence_run(monkeypatch, quarter, 30, threshold=0.5) == 4
    assert _route_convergence_run(monkeypatch, quarter, 30, threshold=0.5, min_steps=9) == 10


def test_skip_rate_target_stops_only_when_the_window_mean_reaches_it():
    from resetnet_experiments.hooks import SkipRateTarget

    def run(rates, **spec):
        hook = SkipRateTarget(**{"target": 0.5, "window": 3, "min_steps": 0, **spec})
        trainer = _FakeTrainer()
        for step, rate in enumerate(rates, start=1):
            hook.on_step_end(trainer, step, {"skip_rate": torch.tensor(rate)})
            if trainer.stopped_at is not None:
                return step
        return None

    assert run([0.2, 0.3, 0.4, 0.45, 0.49]) is None
    assert run([0.2, 0.6, 0.6, 0.6, 0.6]) == 4  # mean of (0.6, 0.6, 0.6) first reaches 0.5 at step 4
    assert run([0.9, 0.9]) is None  # the window is not full yet
    assert run([0.9, 0.9, 0.9, 0.9], min_steps=4) == 4


# ----------------------------------------------------------------------------- Sec. 5.1 at a tiny scale
def test_rnn_controller_moves_to_the_sequential_policy(tmp_path):
    """Sec. 5.1 in seconds: a ResNet-20 pretrained on learnable synthetic images, its blocks moved into
    the pools of its ReSet twin, 100 controller-only steps: the RNN controller's agreement with the
    sequential policy rises well above the uniform policy's 0.298."""
    from resetnet.checkpoint import save_checkpoint
    from resetnet.data import DeviceLoader
    from resetnet.models.transfer import reset_from_resnet
    from resetnet.train import load_config, train
    from resetnet_experiments.reproduce import routing_summary, synthetic_arrays

    data = synthetic_arrays(512, 256, size=8)
    quiet = {
        "batch_size": 32,
        "eval_every": 0,
        "eval_batch_size": 256,
        "log_every": 10,
        "route_log_every": 0,
        "checkpoint_every": 0,
        "progress": False,
        "tensorboard": False,
    }
    train(
        {"model": {"name": "resnet20"}, "optim": {"lr": 0.05, "schedule": {"kind": "constant"}}, "train": {**quiet, "steps": 60}},
        tmp_path / "pre",
        arrays=data,
    )
    torch.manual_seed(0)
    twin = reset_from_resnet(load_model(tmp_path / "pre")[0], controller="rnn", scorer="softmax")
    cfg = {
        "model": {"name": "reset_seq20", "overrides": {"controller": "rnn", "scorer": "softmax"}},
        "trainable": ["controller"],
        "freeze_bn_stats": True,
        "optim": {"name": "adam", "lr": 0.003, "weight_decay": 1e-4, "grad_clip": 1.0, "schedule": {"kind": "constant"}},
        "train": {**quiet, "steps": 100},
    }
    save_checkpoint(tmp_path / "twin", twin, {"config": load_config(cfg), "step": 0})
    test = DeviceLoader(*data["test"], 256, train=False)
    before = routing_summary(twin, test, 256)["agreement"]
    train({**cfg, "init_from": {"path": str(tmp_path / "twin")}}, tmp_path / "ctrl", arrays=data)
    after = routing_summary(load_model(tmp_path / "ctrl")[0], test, 256)["agreement"]
    assert after > 0.298 + 0.15 and after > before + 0.1, (before, after)

"""Configs (schema, validation, inheritance, --set) and schedules."""
from __future__ import annotations

import math

import pytest

from resetnet.train.config import (
    ConfigError, apply_overrides, defaults, diff_configs, list_configs, load_config, parse_set, resolve_position,
    validate,
)
from resetnet.train.schedules import Schedules, lr_factor, ramp

SHIPPED = ["smoke", "resnet38", "reset38", "t2_r2_sm", "t2_r3_sm_adam", "t2_r4_sm_entr", "t2_r5_sm_entr_adam", "t2_r6_gsm_entr", "t2_r7_gst"]


def test_defaults_validate_and_are_the_paper_sgd_recipe():
    cfg = validate(defaults())
    assert cfg["optim"]["name"] == "sgd" and cfg["optim"]["lr"] == 0.1 and cfg["optim"]["momentum"] == 0.9
    assert cfg["optim"]["weight_decay"] == 1e-4 and cfg["train"]["batch_size"] == 128
    assert cfg["train"]["iterations"] == 64000
    milestones = [resolve_position(m, 64000) for m in cfg["optim"]["schedule"]["milestones"]]
    assert milestones == [32000, 48000]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(name):
    assert name in list_configs()
    cfg = load_config(name)
    assert cfg["model"]["name"]


def test_table2_rows_differ_as_the_paper_says():
    r2, r3, r4 = load_config("t2_r2_sm"), load_config("t2_r3_sm_adam"), load_config("t2_r4_sm_entr")
    r5, r6, r7, main = load_config("t2_r5_sm_entr_adam"), load_config("t2_r6_gsm_entr"), load_config("t2_r7_gst"), load_config("reset38")
    assert r4 == main  # row 4 is the main job
    assert r2["regularizers"]["entropy"]["lambda_batch"] == 0 and r4["regularizers"]["entropy"]["lambda_batch"] > 0
    for adam in (r3, r5):
        assert adam["optim"]["name"] == "adam" and adam["optim"]["lr"] == 1e-3
        assert adam["optim"]["schedule"]["kind"] == "exponential" and adam["optim"]["schedule"]["gamma"] == 0.95
        assert adam["optim"]["schedule"]["every"] == 1000
    assert r5["regularizers"]["entropy"]["lambda_batch"] > 0 and r3["regularizers"]["entropy"]["lambda_batch"] == 0
    assert r6["model"]["overrides"]["scorer"] == "gumbel_softmax" and r6["scorer"]["temperature"] is not None
    assert r7["model"]["overrides"]["scorer"] == "gumbel_st" and r7["regularizers"]["entropy"]["lambda_batch"] == 0
    assert load_config("resnet38")["model"]["name"] == "resnet38"


def test_unknown_key_lists_valid_keys_at_that_level():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate' in 'optim'; valid keys: name, lr, momentum"):
        load_config({"optim": {"learning_rate": 0.1}})
    with pytest.raises(ConfigError, match=r"'bogus' at the top level; valid keys: model, data, optim"):
        load_config({"bogus": 1})
    with pytest.raises(ConfigError, match=r"'regularizers.entropy.decay.shape'.*valid keys: kind, initial, final, begin, end"):
        load_config({"regularizers": {"entropy": {"decay": {"shape": "linear"}}}})


@pytest.mark.parametrize("raw, key", [
    ({"optim": {"lr": -0.1}}, "optim.lr"),
    ({"optim": {"lr": "fast"}}, "optim.lr"),
    ({"optim": {"name": "rmsprop"}}, "optim.name"),
    ({"model": {"name": "resnet9000x"}}, "model.name"),
    ({"model": {"overrides": {"wings": 2}}}, "model.overrides"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"train": {"batch_size": 12.5}}, "train.batch_size"),
    ({"train": {"amp": "yes"}}, "train.amp"),
    ({"trainable": ["controller", "wings"]}, "trainable"),
    ({"optim": {"schedule": {"milestones": [0.75, 0.5]}}}, "optim.schedule.milestones"),
    ({"train": {"epochs": 10}}, "train.iterations"),  # both set
    ({"data": {"augment": "no"}}, "data.augment"),
])
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(raw)


def test_pipeline_hook_sections_validate():
    cfg = load_config({"phases": {"rule": "incremental", "every": 0.2}, "stop": {"skip_rate": {"target": 0.2}}})
    assert cfg["phases"]["rule"] == "incremental" and cfg["stop"]["skip_rate"] == {"target": 0.2, "window": 100, "min_steps": 0}
    assert cfg["stop"]["route_convergence"]["enabled"] is False and load_config("reset38")["phases"] is None
    with pytest.raises(ConfigError, match=r"phases\.rule"):
        load_config({"phases": {"rule": "random"}})
    with pytest.raises(ConfigError, match=r"'stop.skip_rate.target'"):
        load_config({"stop": {"skip_rate": {"target": 2}}})


def test_numbers_in_yaml_1_1_form_are_accepted():
    cfg = load_config({"optim": {"weight_decay": "5e-4", "lr": "1e-3"}})
    assert cfg["optim"]["weight_decay"] == 5e-4 and cfg["optim"]["lr"] == 1e-3


def test_parse_set_values_are_yaml():
    pairs = parse_set(["optim.lr=1e-3", "optim.schedule.milestones=[0.3, 0.6]", "model.overrides.scorer=gumbel_st",
                       "train.epochs=null", "train.compile=true", "data.limit_train=2000"])
    assert pairs == [
        (["optim", "lr"], 1e-3), (["optim", "schedule", "milestones"], [0.3, 0.6]),
        (["model", "overrides", "scorer"], "gumbel_st"), (["train", "epochs"], None), (["train", "compile"], True),
        (["data", "limit_train"], 2000),
    ]
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set(["optim.lr"])


def test_set_overrides_apply_and_validate():
    cfg = load_config("reset38", ["optim.lr=0.05", "train.iterations=null", "train.epochs=2", "model.overrides.scorer=gumbel_softmax",
                                  "scorer.temperature.kind=exponential", "scorer.temperature.final=0.5", "init_from=/x/run"])
    assert cfg["optim"]["lr"] == 0.05 and cfg["train"]["epochs"] == 2.0 and cfg["train"]["iterations"] is None
    assert cfg["model"]["overrides"]["scorer"] == "gumbel_softmax"
    assert cfg["scorer"]["temperature"] == {"kind": "exponential", "initial": 1.0, "final": 0.5, "begin": 0.0, "end": 1.0}
    assert cfg["init_from"] == {"path": "/x/run", "strict": True}
    with pytest.raises(ConfigError, match=r"unknown config key 'train.batchsize'.*valid keys: batch_size"):
        load_config("smoke", ["train.batchsize=3"])
    with pytest.raises(ConfigError, match=r"'optim.lr' is a value, not a section"):
        apply_overrides(defaults(), ["optim.lr.x=1"])


def test_base_inheritance_and_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("base: reset38\noptim: {lr: 0.2}\n")
    (tmp_path / "b.yaml").write_text("base: a\ntrain: {batch_size: 64}\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert cfg["optim"]["lr"] == 0.2 and cfg["train"]["batch_size"] == 64 and cfg["model"]["name"] == "reset38"
    assert cfg["regularizers"]["entropy"]["lambda_batch"] == load_config("reset38")["regularizers"]["entropy"]["lambda_batch"]
    (tmp_path / "c.yaml").write_text("base: d\n")
    (tmp_path / "d.yaml").write_text("base: c\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "c.yaml")


def test_missing_config_lists_available_names():
    with pytest.raises(ConfigError, match=r"available configs: .*reset38.*smoke"):
        load_config("no_such_config")


def test_missing_config_folder_says_where_configs_live(tmp_path, monkeypatch):
    """A non-editable install has no configs/ folder: the error says so and names the fixes."""
    monkeypatch.setenv("RESETNET_CONFIGS", str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match=r"does not exist.*RESETNET_CONFIGS.*YAML path"):
        load_config("reset38")
    monkeypatch.setenv("RESETNET_CONFIGS", str(tmp_path))
    (tmp_path / "mine.yaml").write_text("train:\n  seed: 7\n")
    assert load_config("mine")["train"]["seed"] == 7


def test_shorthands_and_diff():
    a = load_config({"scorer": {"temperature": 0.7}})
    assert a["scorer"]["temperature"]["kind"] == "constant" and a["scorer"]["temperature"]["initial"] == 0.7
    b = load_config({"optim": {"lr": 0.2}, "train": {"seed": 3}})
    assert diff_configs(validate(defaults()), b) == ["optim.lr", "train.seed"]


# ----------------------------------------------------------------------------- schedules
def test_resolve_position():
    assert resolve_position(0.5, 64000) == 32000
    assert resolve_position(1, 100) == 100
    assert resolve_position(32000, 64000) == 32000
    assert resolve_position(None, 10) is None


def test_lr_schedules():
    step = {"kind": "step", "milestones": [0.5, 0.75], "gamma": 0.1, "warmup": 0}
    assert [lr_factor(step, s, 64000) for s in (0, 31999, 32000, 47999, 48000, 63999)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    exp = {"kind": "exponential", "gamma": 0.95, "every": 1000, "warmup": 0}
    assert lr_factor(exp, 999, 10**5) == 1.0 and lr_factor(exp, 1000, 10**5) == pytest.approx(0.95)
    assert lr_factor(exp, 5500, 10**5) == pytest.approx(0.95**5)
    cos = {"kind": "cosine", "final": 0.0, "warmup": 0}
    assert lr_factor(cos, 0, 100) == 1.0 and lr_factor(cos, 50, 100) == pytest.approx(0.5) and lr_factor(cos, 100, 100) == pytest.approx(0.0)
    warm = {"kind": "constant", "warmup": 4}
    assert [lr_factor(warm, s, 100) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_ramps():
    lin = {"kind": "linear", "initial": 1.0, "final": 0.0, "begin": 0.5, "end": 0.75}
    assert [ramp(lin, s, 100) for s in (0, 50, 60, 75, 99)] == pytest.approx([1, 1, 0.6, 0, 0])
    exp = {"kind": "exponential", "initial": 1.0, "final": 0.25, "begin": 0, "end": 1.0}
    assert ramp(exp, 50, 100) == pytest.approx(0.5) and ramp(exp, 200, 100) == pytest.approx(0.25)
    cos = {"kind": "cosine", "initial": 2.0, "final": 0.0, "begin": 0, "end": 10}
    assert ramp(cos, 5, 100) == pytest.approx(1.0)
    assert ramp({"kind": "constant", "initial": 3.0, "final": 0.0, "begin": 0, "end": 1}, 99, 100) == 3.0


def test_schedules_bundle_values():
    cfg = load_config("t2_r6_gsm_entr")
    s = Schedules(cfg, 64000)
    v0, v_end = s.values(0), s.values(63999)
    assert v0["lr"] == 0.1 and v_end["lr"] == pytest.approx(0.001)
    assert v0["entropy_factor"] == 1.0 and v_end["entropy_factor"] == 0.0
    assert v0["temperature"] == cfg["scorer"]["temperature"]["initial"]
    assert v_end["temperature"] < v0["temperature"] and math.isfinite(v_end["temperature"])

"""The typed config (defaults, checks, inheritance, recipes, --set) and the schedules."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from resetnet.train.config import (
    Config,
    ConfigError,
    RampConfig,
    ScheduleConfig,
    apply_sets,
    config_table,
    diff_configs,
    list_configs,
    list_recipes,
    load_config,
    parse_set,
    resolve_position,
)
from resetnet.train.schedules import Schedules, lr_factor, ramp

SHIPPED = [
    "smoke",
    "quickstart",
    "resnet38",
    "reset38",
    "t2_r2_sm",
    "t2_r3_sm_adam",
    "t2_r4_sm_entr",
    "t2_r5_sm_entr_adam",
    "t2_r6_gsm_entr",
    "t2_r7_gst",
]


def test_defaults_are_the_papers_reset38_sm_entr_with_he_sgd():
    cfg = Config()
    assert cfg.model.name == "reset38" and cfg.optim.name == "sgd" and cfg.optim.lr == 0.1 and cfg.optim.momentum == 0.9
    assert cfg.optim.weight_decay == 1e-4 and cfg.train.batch_size == 128 and cfg.train.steps == 64000
    assert [resolve_position(m, 64000) for m in cfg.optim.schedule.milestones] == [32000, 48000]
    assert cfg.regularizers.entropy.lambda_batch > 0 and cfg.regularizers.entropy.decay.kind == "linear"
    assert load_config({}) == cfg == Config.from_dict(cfg.to_dict())


def test_every_knob_has_a_doc_and_a_source_and_the_docs_table_lists_them():
    def fields(cls):
        for f in dataclasses.fields(cls):
            yield f
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                yield from fields(type(default))

    for f in fields(Config):
        assert f.metadata.get("doc") and f.metadata.get("source"), f.name
    table = config_table()
    assert "| `optim.schedule.milestones` | `[50%, 75%]` |" in table and "| `train.steps` | `64000` |" in table
    doc = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text(encoding="utf-8")
    assert table in doc, "docs/training.md's config table is stale: run python tools/gen_docs.py"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(name):
    assert name in list_configs()
    assert load_config(name).model.name


def test_table2_rows_differ_as_the_paper_says():
    r2, r3, r4 = load_config("t2_r2_sm"), load_config("t2_r3_sm_adam"), load_config("t2_r4_sm_entr")
    r5, r6, r7, main = load_config("t2_r5_sm_entr_adam"), load_config("t2_r6_gsm_entr"), load_config("t2_r7_gst"), load_config("reset38")
    assert r4 == main  # row 4 is the main job
    assert r2.regularizers.entropy.lambda_batch == 0 and r4.regularizers.entropy.lambda_batch > 0
    for adam in (r3, r5):
        assert adam.optim.name == "adam" and adam.optim.lr == 1e-3
        assert adam.optim.schedule.kind == "exponential" and adam.optim.schedule.gamma == 0.95 and adam.optim.schedule.every == 1000
    assert r5.regularizers.entropy.lambda_batch > 0 and r3.regularizers.entropy.lambda_batch == 0
    assert r6.model.overrides["scorer"] == "gumbel_softmax" and r6.train.temperature is not None
    assert r7.model.overrides["scorer"] == "gumbel_st" and r7.regularizers.entropy.lambda_batch == 0
    assert load_config("resnet38").model.name == "resnet38"


def test_unknown_key_lists_valid_keys_at_that_level():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate' in 'optim'; valid keys: name, lr, momentum"):
        load_config({"optim": {"learning_rate": 0.1}})
    with pytest.raises(ConfigError, match=r"'bogus' at the top level; valid keys: model, data, optim"):
        load_config({"bogus": 1})
    with pytest.raises(ConfigError, match=r"'regularizers.entropy.decay.shape'.*valid keys: kind, initial, final, begin, end"):
        load_config({"regularizers": {"entropy": {"decay": {"shape": "linear"}}}})


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"optim": {"lr": -0.1}}, "optim.lr"),
        ({"optim": {"lr": "fast"}}, "optim.lr"),
        ({"optim": {"name": "rmsprop"}}, "optim.name"),
        ({"model": {"name": "resnet9000x"}}, "model"),
        ({"model": {"overrides": {"wings": 2}}}, "model"),
        ({"model": {"name": "reset38", "overrides": {"units": 0}}}, "model"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"train": {"batch_size": 12.5}}, "train.batch_size"),
        ({"train": {"amp": "yes"}}, "train.amp"),
        ({"trainable": ["controller", "wings"]}, "trainable"),
        ({"optim": {"schedule": {"milestones": ["75%", "50%"]}}}, "optim.schedule.milestones"),
        ({"optim": {"schedule": {"warmup": 0.5}}}, "optim.schedule.warmup"),  # a share is written "50%"
        ({"optim": {"schedule": {"warmup": "half"}}}, "optim.schedule.warmup"),
        ({"train": {"epochs": 10}}, "train.steps"),  # both set
        ({"data": {"augment": "no"}}, "data.augment"),
        ({"optim": {"betas": [0.9]}}, "optim.betas"),
        ({"regularizers": {"skip_reward": {"enabled": True}}, "model": {"overrides": {"scorer": "topk"}}}, "skip_reward"),
    ],
)
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(raw)


def test_positions_are_steps_or_shares_and_step_one_is_writable():
    cfg = load_config({"optim": {"schedule": {"kind": "step", "milestones": [1, "50%"], "warmup": 1}}})
    assert cfg.optim.schedule.milestones == [1, "50%"] and resolve_position(1, 1000) == 1 and resolve_position("50%", 1000) == 500
    assert [lr_factor(cfg.optim.schedule, s, 10) for s in (0, 1, 5)] == pytest.approx([1.0, 0.1, 0.01])


def test_numbers_in_yaml_1_1_form_are_accepted():
    cfg = load_config({"optim": {"weight_decay": "5e-4", "lr": "1e-3"}})
    assert cfg.optim.weight_decay == 5e-4 and cfg.optim.lr == 1e-3


def test_parse_set_values_are_yaml():
    pairs = parse_set(
        [
            "optim.lr=1e-3",
            "optim.schedule.milestones=[30%, 60%]",
            "model.overrides.scorer=gumbel_st",
            "train.epochs=null",
            "train.compile=true",
            "data.limit_train=2000",
        ]
    )
    assert pairs == [
        (["optim", "lr"], "1e-3"),
        (["optim", "schedule", "milestones"], ["30%", "60%"]),
        (["model", "overrides", "scorer"], "gumbel_st"),
        (["train", "epochs"], None),
        (["train", "compile"], True),
        (["data", "limit_train"], 2000),
    ]
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set(["optim.lr"])


def test_set_overrides_apply_and_are_checked():
    cfg = load_config(
        "reset38",
        [
            "optim.lr=0.05",
            "train.steps=null",
            "train.epochs=2",
            "model.overrides.scorer=gumbel_softmax",
            "train.temperature.kind=exponential",
            "train.temperature.final=0.5",
            "init_from.path=/x/run",
        ],
    )
    assert cfg.optim.lr == 0.05 and cfg.train.epochs == 2.0 and cfg.train.steps is None
    assert cfg.model.overrides["scorer"] == "gumbel_softmax"
    assert cfg.train.temperature == RampConfig(kind="exponential", initial=1.0, final=0.5, begin=0, end="100%")
    assert cfg.init_from.path == "/x/run" and cfg.init_from.strict
    with pytest.raises(ConfigError, match=r"unknown config key 'train.batchsize'.*valid keys: batch_size"):
        load_config("smoke", ["train.batchsize=3"])
    with pytest.raises(ConfigError, match=r"'optim.lr'"):
        load_config("smoke", ["optim.lr.x=1"])
    assert cfg.replace({"train.seed": 3}).train.seed == 3 and cfg.train.seed == 0


def test_base_recipe_inheritance_and_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("base: reset38\noptim: {lr: 0.2}\n")
    (tmp_path / "b.yaml").write_text("base: a\ntrain: {batch_size: 64}\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert cfg.optim.lr == 0.2 and cfg.train.batch_size == 64 and cfg.model.name == "reset38"
    (tmp_path / "r.yaml").write_text("base: reset38\nrecipe: fast\noptim: {weight_decay: 0.0}\n")
    r = load_config(tmp_path / "r.yaml")  # base < recipe < the file
    assert r.optim.nesterov and r.optim.schedule.kind == "linear" and r.train.label_smoothing == 0.2 and r.optim.weight_decay == 0.0
    assert r.data.flip == "alternating"
    assert "fast" in list_recipes()
    (tmp_path / "c.yaml").write_text("base: d\n")
    (tmp_path / "d.yaml").write_text("base: c\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "e.yaml").write_text("recipe: slow\n")
    with pytest.raises(ConfigError, match="recipe 'slow' not found; available recipes: fast"):
        load_config(tmp_path / "e.yaml")


def test_missing_config_lists_available_names():
    with pytest.raises(ConfigError, match=r"shipped configs: .*reset38.*smoke"):
        load_config("no_such_config")


def test_configs_are_package_data_and_can_be_redirected(tmp_path, monkeypatch):
    import resetnet

    assert (Path(resetnet.__file__).parent / "configs" / "reset38.yaml").is_file()
    monkeypatch.setenv("RESETNET_CONFIGS", str(tmp_path))
    (tmp_path / "mine.yaml").write_text("train:\n  seed: 7\n")
    assert load_config("mine").train.seed == 7


def test_diff_and_apply_sets():
    b = load_config({"optim": {"lr": 0.2}, "train": {"seed": 3}})
    assert diff_configs(Config(), b) == ["optim.lr", "train.seed"]
    assert apply_sets({"a": {"b": 1}}, ["a.c=2", "d=[1, 2]"]) == {"a": {"b": 1, "c": 2}, "d": [1, 2]}


# ----------------------------------------------------------------------------- schedules
def test_lr_schedules():
    step = ScheduleConfig(kind="step", milestones=["50%", "75%"], gamma=0.1)
    assert [lr_factor(step, s, 64000) for s in (0, 31999, 32000, 47999, 48000, 63999)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    exp = ScheduleConfig(kind="exponential", gamma=0.95, every=1000)
    assert lr_factor(exp, 999, 10**5) == 1.0 and lr_factor(exp, 1000, 10**5) == pytest.approx(0.95)
    assert lr_factor(exp, 5500, 10**5) == pytest.approx(0.95**5)
    cos = ScheduleConfig(kind="cosine", final=0.0)
    assert lr_factor(cos, 0, 100) == 1.0 and lr_factor(cos, 50, 100) == pytest.approx(0.5) and lr_factor(cos, 100, 100) == pytest.approx(0.0)
    warm = ScheduleConfig(kind="constant", warmup=4)
    assert [lr_factor(warm, s, 100) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    one_cycle = ScheduleConfig(kind="linear", warmup="20%", final=0.0)
    assert [lr_factor(one_cycle, s, 100) for s in (0, 9, 19, 20, 60, 100)] == pytest.approx([0.05, 0.5, 1.0, 1.0, 0.5, 0.0])


def test_ramps():
    lin = RampConfig(kind="linear", initial=1.0, final=0.0, begin="50%", end="75%")
    assert [ramp(lin, s, 100) for s in (0, 50, 60, 75, 99)] == pytest.approx([1, 1, 0.6, 0, 0])
    exp = RampConfig(kind="exponential", initial=1.0, final=0.25, begin=0, end="100%")
    assert ramp(exp, 50, 100) == pytest.approx(0.5) and ramp(exp, 200, 100) == pytest.approx(0.25)
    assert ramp(RampConfig(kind="cosine", initial=2.0, final=0.0, begin=0, end=10), 5, 100) == pytest.approx(1.0)
    assert ramp(RampConfig(kind="constant", initial=3.0, final=0.0), 99, 100) == 3.0


def test_schedules_bundle_values():
    cfg = load_config("t2_r6_gsm_entr")
    s = Schedules(cfg, 64000)
    v0, v_end = s.values(0), s.values(63999)
    assert v0["lr"] == 0.1 and v_end["lr"] == pytest.approx(0.001)
    assert v0["entropy_factor"] == 1.0 and v_end["entropy_factor"] == 0.0
    assert v0["temperature"] == cfg.train.temperature.initial
    assert v_end["temperature"] < v0["temperature"] and math.isfinite(v_end["temperature"])

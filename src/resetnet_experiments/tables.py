"""The paper's tables as data: rows, budgets, paper numbers; aggregation and the md/csv writers.

A :class:`Row` names a pipeline (:mod:`resetnet_experiments.pipelines`) with its variables;
:data:`BUDGETS` say how long and on how much data each budget trains. The writers turn
per-seed row results (``reproduce.py``) into ``table.md`` / ``table.csv`` in the paper's
format: N, Model, C10, C10.1, Gap, Time Δ, ΔC10, ΔC10.1, plus a paired McNemar test
against the row's baseline on per-image correctness.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from resetnet.train.stats import format_p, mcnemar

__all__ = [
    "Row",
    "Table",
    "Budget",
    "BUDGETS",
    "TABLES",
    "get_table",
    "select_rows",
    "aggregate",
    "fmt_mean_std",
    "accuracy_columns",
    "agreement_columns",
    "table_markdown",
    "table_csv",
    "ALPHA",
    "DAGGER",
    "test_set_key",
    "test_set_columns",
]

ALPHA = 0.05
DAGGER = "†"


@dataclass(frozen=True)
class Row:
    """One row of a table.

    Attributes:
        n: the paper's row number.
        label: the paper's model description.
        pipeline: pipeline name (:data:`resetnet_experiments.pipelines.PIPELINES`).
        vars: pipeline variables (values may be ``{smoke, cpu, full}`` mappings).
        upto: run the pipeline only up to this stage.
        baseline: ``n`` of the row this one is compared against (None: a baseline).
        paper: the paper's numbers (``c10``, ``c10_1``, ``gap``, ``time``, ``d_c10``, ``d_c10_1``).
        group: Table 1's "Arc" column.
        note: how this row interprets the paper, where the paper is ambiguous.
    """

    n: int
    label: str
    pipeline: str
    vars: Mapping[str, Any] = field(default_factory=dict)
    upto: str | None = None
    baseline: int | None = 1
    paper: Mapping[str, float | None] = field(default_factory=dict)
    group: str = ""
    note: str = ""


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    rows: tuple[Row, ...]
    kind: str = "accuracy"  # "accuracy" (Tables 1-3) or "agreement" (Sec. 5.1)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Budget:
    """How a budget trains and measures.

    Attributes:
        overrides: config overrides applied to every training stage (nested mapping).
        test_limit: evaluate the final model on the first N test images (None: all 10,000).
        timing_batch / timing_repeats: the paired forward-timing measurement (Time Δ).
        macs_images: images used for the mean MACs under the routing.
        probe_images: images used for routing statistics (agreement, skip rate).
        recipe: the recipe (``configs/recipes/NAME.yaml``) of every stage that trains from
            scratch; None keeps each config's own (the paper's, He et al.'s).
    """

    name: str
    description: str
    overrides: Mapping[str, Any]
    test_limit: int | None
    timing_batch: int
    timing_repeats: int
    macs_images: int
    probe_images: int
    recipe: str | None = None


_QUIET = {"progress": False, "tensorboard": False}
BUDGETS: dict[str, Budget] = {
    "smoke": Budget(
        "smoke",
        "minutes on a CPU: 512 training images, a few steps per stage; checks the machinery, not the paper",
        {
            "data": {"limit_train": 512, "limit_test": 64, "download": False},
            "train": {
                "batch_size": 32,
                "eval_every": 0,
                "checkpoint_every": 0,
                "log_every": 1,
                "route_log_every": 0,
                "eval_batch_size": 64,
                **_QUIET,
            },
        },
        test_limit=256,
        timing_batch=16,
        timing_repeats=2,
        macs_images=8,
        probe_images=64,
        recipe="fast",
    ),
    "cpu": Budget(
        "cpu",
        "2 CPU cores: full CIFAR-10, the fast recipe, epochs sized for real accuracy (docs/reproduction.md)",
        {
            "data": {"limit_test": 1000},
            "train": {"eval_every": 0, "checkpoint_every": 250, "log_every": 50, "route_log_every": 50, "eval_batch_size": 500, **_QUIET},
        },
        test_limit=None,
        timing_batch=128,
        timing_repeats=5,
        macs_images=64,
        probe_images=2000,
        recipe="fast",
    ),
    "full": Budget(
        "full",
        "the paper's schedules (64k steps from scratch, 5k controller batches), for a GPU",
        {"train": {"progress": False}},
        test_limit=None,
        timing_batch=500,
        timing_repeats=20,
        macs_images=500,
        probe_images=10000,
    ),
}


# ----------------------------------------------------------------------------- budgets of the rows
def _iters(smoke: int, cpu: int | None, full: int | None = None) -> dict:
    return {"smoke": smoke, "cpu": cpu, "full": full}


EPOCH = 390  # optimizer steps in one epoch of CIFAR-10 at batch 128 (50,000 // 128, the last partial batch dropped)
SCRATCH_T1 = _iters(3, 12 * EPOCH)  # Table 1: 12 epochs (the fast recipe; sized like Table 3)
SCRATCH_T3 = _iters(3, 12 * EPOCH)  # Table 3: 12 epochs, every row (resnet_t3 at ~80% after 10 epochs, docs/results.md)
T3_BATCH = {"smoke": 32, "cpu": 128, "full": 128}
SCRATCH_T2 = _iters(2, 30 * EPOCH)  # Table 2 rows 1-7: 30 epochs (ResNet-38 to >= 90%)
CONTROLLER = _iters(2, 500, 5000)  # paper: 5,000 controller batches

# ----------------------------------------------------------------------------- Table 1
_T1_NOTE = "Table 1 trains with the Softmax scorer, as Table 3 (the paper does not say)."
TABLE1 = Table(
    "table1",
    "Table 1: shortened ResNet vs ReSet (one 5-unit, 5-iteration ReSet module in the 5-block stage)",
    tuple(
        Row(n, label, "scratch", {"config": f"table1/{model}", "steps": SCRATCH_T1}, baseline=base, paper=paper, group=arc)
        for n, label, model, base, arc, paper in (
            (1, "ResNet", "resnet_1_1_5", None, "1-1-5", {"c10": 88.7, "c10_1": 79.5, "gap": 9.2}),
            (2, "ReSet", "reset_1_1_5", 1, "1-1-5", {"c10": 88.9, "c10_1": 79.5, "gap": 9.4, "d_c10": 0.2, "d_c10_1": 0.0}),
            (3, "ResNet", "resnet_1_5_1", None, "1-5-1", {"c10": 87.0, "c10_1": 78.1, "gap": 8.9}),
            (4, "ReSet", "reset_1_5_1", 3, "1-5-1", {"c10": 88.0, "c10_1": 78.7, "gap": 9.3, "d_c10": 1.0, "d_c10_1": 0.6}),
            (5, "ResNet", "resnet_5_1_1", None, "5-1-1", {"c10": 86.5, "c10_1": 78.0, "gap": 8.5}),
            (6, "ReSet", "reset_5_1_1", 5, "5-1-1", {"c10": 87.1, "c10_1": 78.2, "gap": 8.9, "d_c10": 0.6, "d_c10_1": 0.2}),
        )
    ),
    notes=(_T1_NOTE,),
)

# ----------------------------------------------------------------------------- Table 3
TABLE3 = Table(
    "table3",
    "Table 3: shortened ReSet (stage 1 a ReSet module; one block in stages 2 and 3), Softmax scorer",
    tuple(
        Row(
            n,
            label,
            "scratch",
            {"config": f"table3/{model}", "steps": SCRATCH_T3, "batch_size": T3_BATCH},
            baseline=None if n == 1 else 1,
            paper=paper,
        )
        for n, label, model, paper in (
            (1, "ResNet baseline, 2 CU & 2 iters", "resnet_t3", {"c10": 86.1, "c10_1": 75.0, "gap": 11.1}),
            (2, "ReSet, 6 CU & 2 iter", "reset_t3_6cu2it", {"c10": 87.2, "c10_1": 76.9, "gap": 10.3, "time": 1.0, "d_c10": 1.1, "d_c10_1": 1.9}),
            (3, "ReSet, 3 CU & 2 iters", "reset_t3_3cu2it", {"c10": 86.5, "c10_1": 78.4, "gap": 8.1, "time": 1.0, "d_c10": 0.4, "d_c10_1": 3.4}),
            (4, "ReSet, 2 CU & 3 iters", "reset_t3_2cu3it", {"c10": 86.4, "c10_1": 77.0, "gap": 9.4, "time": 1.08, "d_c10": 0.3, "d_c10_1": 2.0}),
            (5, "SM, 2 CU & 6 iters", "reset_t3_2cu6it", {"c10": 87.3, "c10_1": 77.0, "gap": 10.3, "time": 1.33, "d_c10": 1.2, "d_c10_1": 2.0}),
            (6, "ReSet, 3 CU & 3 iters", "reset_t3_3cu3it", {}),
        )
    ),
    notes=("Row 6 (3 CU & 3 iters) is listed in the paper's Sec. 5.5 but has no row in its Table 3: no paper numbers.",),
)

# ----------------------------------------------------------------------------- Table 2
_P = lambda c10, c10_1, gap, time, d1, d2: {"c10": c10, "c10_1": c10_1, "gap": gap, "time": time, "d_c10": d1, "d_c10_1": d2}  # noqa: E731
_SM = {"pretrained": "t2_r2_sm", "pretrain_steps": SCRATCH_T2}
TABLE2 = Table(
    "table2",
    "Table 2: ReSet-38 on CIFAR-10 / CIFAR-10.1 (rows 1-7 from scratch, 8-17 relaxation, 18-20 top-k)",
    (
        Row(
            1, "ResNet38 (baseline)", "scratch", {"config": "resnet38", "steps": SCRATCH_T2}, baseline=None, paper=_P(92.8, 83.8, 9, None, None, None)
        ),
        Row(2, "SM", "scratch", {"config": "t2_r2_sm", "steps": SCRATCH_T2}, paper=_P(91.9, 83.5, 8.4, 1.92, -0.9, -0.3)),
        Row(3, "SM, Adam", "scratch", {"config": "t2_r3_sm_adam", "steps": SCRATCH_T2}, paper=_P(89.9, 81.8, 8.1, 2, -2.9, -2)),
        Row(4, "SM+ENTR", "scratch", {"config": "t2_r4_sm_entr", "steps": SCRATCH_T2}, paper=_P(92.1, 85.1, 7, 1.92, -0.7, 1.3)),
        Row(5, "SM+ENTR, Adam", "scratch", {"config": "t2_r5_sm_entr_adam", "steps": SCRATCH_T2}, paper=_P(89.3, 79.5, 9.8, 2, -3.5, -4.3)),
        Row(6, "GSM+ENTR", "scratch", {"config": "t2_r6_gsm_entr", "steps": SCRATCH_T2}, paper=_P(89, 80.8, 8.2, 1.92, -3.8, -3)),
        Row(7, "GST", "scratch", {"config": "t2_r7_gst", "steps": SCRATCH_T2}, paper=_P(60.5, 54.1, 6.4, 1.08, -32.3, -29.7)),
        Row(
            8, "SM pretr., Contr.", "finetune", {**_SM, "stage": "table2/row08_contr_sm", "steps": CONTROLLER}, paper=_P(91.8, 81.9, 9.9, 2, -1, -1.9)
        ),
        Row(9, "GSM pretr. SM, Contr.", "relaxation", _SM, upto="gsm", paper=_P(91.8, 83.5, 8.3, 2, -1, -0.3)),
        Row(
            10,
            "GST pretr. SM, Contr.",
            "finetune",
            {**_SM, "stage": "table2/row10_contr_gst", "steps": _iters(3, 1500, 20000), "until_converged": True},
            paper=_P(66.5, 54.1, 12.4, 1, -26.3, -29.7),
            note="until the routes converge (stop.route_convergence), at most the given steps",
        ),
        Row(11, "GST pretr. GSM, Contr.", "relaxation", _SM, upto="gst", paper=_P(70.1, 57.3, 12.8, 1, -22.7, -26.5)),
        Row(
            12,
            "GST pretr. GSM",
            "relaxation",
            {**_SM, "gst_config": "table2/row12_gst_all"},
            upto="gst",
            paper=_P(68.3, 56, 12.3, 1, -24.5, -27.8),
            note="the GST stage trains every parameter (no 'Contr.')",
        ),
        Row(
            13,
            "HybRL pretr GST",
            "relaxation",
            {**_SM, "reward": 0.02, "skip_target": 0.1},
            paper=_P(60.7, 51.3, 9.4, 0.88, -32.1, -32.5),
            note="the paper gives no rewards; ours: R=0.02, stop at a 10% skip rate; every parameter trains (no 'Contr.')",
        ),
        Row(
            14,
            "HybRL pretr GST",
            "relaxation",
            {**_SM, "reward": 0.05, "skip_target": 0.2},
            paper=_P(48.8, 42.2, 6.6, 0.79, -44, -41.6),
            note="R=0.05, stop at a 20% skip rate",
        ),
        Row(
            15,
            "HybRL pretr GST",
            "relaxation",
            {**_SM, "reward": 0.1, "skip_target": 0.3},
            paper=_P(35.3, 30.4, 4.9, 0.71, -57.5, -53.4),
            note="R=0.1, stop at a 30% skip rate",
        ),
        Row(
            16,
            "7 then finetune all",
            "finetune",
            {"pretrained": "t2_r7_gst", "pretrain_steps": SCRATCH_T2, "stage": "table2/row16_finetune_all_sm", "steps": _iters(2, 1000, 10000)},
            paper=_P(89.8, 79.9, 9.9, 2.08, -3, -3.9),
            note="read as: row 7's GST model, scorer switched to Softmax, every parameter fine-tuned (Time Δ 2.08 says the final model is dense)",
        ),
        Row(
            17,
            "GST pretr., batch rep. x4",
            "relaxation",
            {**_SM, "gst_config": "table2/row17_gst_batchrep4"},
            upto="gst",
            paper=_P(72.2, 60.9, 11.3, 1.08, -20.6, -22.9),
            note="every image repeated 4 times per batch (train.batch_repeat: 4); every parameter trains (no 'Contr.')",
        ),
        Row(18, "SM pretr., top-k 1", "topk", {**_SM, "k": 1}, paper=_P(92.6, 83.9, 8.7, 1.31, -0.2, 0.1)),
        Row(19, "SM pretr., top-k 2", "topk", {**_SM, "k": 2}, paper=_P(92.7, 84.1, 8.6, 1.92, -0.1, 0.3)),
        Row(20, "SM pretr., top-k 4", "topk", {**_SM, "k": 4}, paper=_P(92.1, 83.7, 8.4, 1.69, -0.7, -0.1)),
    ),
    notes=(
        "Rows 8-20 start from row 2's Softmax ReSet-38 ('SM pretr.'); the pretrained model is trained once and shared.",
        "Time Δ is measured here as the median paired eval forward time ratio to the baseline on one batch; the paper does not say how it measured time.",
    ),
)

# ----------------------------------------------------------------------------- Sec. 5.1
SEC5_1_DEPTH = {"smoke": 20, "cpu": 20, "full": 38}
# cpu: resnet20 pretrained for 20 epochs with the fast recipe (one model, seed 0, shared by every seed), then
# 2,000 controller batches of 128 per controller and seed (the paper: resnet38, 5,000 batches).
_S51 = {"depth": SEC5_1_DEPTH, "pretrain_steps": _iters(3, 20 * EPOCH, None), "steps": _iters(2, 2000, 5000)}
SEC5_1 = Table(
    "sec5_1",
    "Sec. 5.1: controller-only training on a pretrained ResNet's blocks (sequential-policy agreement)",
    (
        Row(1, "ResNet (pretrained; sequential by construction)", "controller_only", _S51, upto="pretrain", baseline=None),
        Row(2, "CNN controller, Contr.", "controller_only", {**_S51, "controller": "cnn"}, paper={"agreement": "near uniform"}),
        Row(3, "RNN controller, Contr.", "controller_only", {**_S51, "controller": "rnn"}, paper={"agreement": "sequential"}),
    ),
    kind="agreement",
    notes=(
        "Agreement: fraction of (image, controller invocation) pairs whose arg-max unit is the ResNet's block for that iteration, pooled over the three modules.",
        "Chance level of a uniform policy over units + zero unit: for reset_seq20 (pools 3, 2, 2 + zero) 0.298; for reset_seq38 (6, 5, 5 + zero) 0.16.",
        "Row 1 is trained once (seed 0) and shared by every seed: its ± 0.0 is by construction; the seeds vary the controllers (rows 2-3).",
    ),
)

TABLES: dict[str, Table] = {t.name: t for t in (TABLE1, TABLE2, TABLE3, SEC5_1)}


def get_table(name: str) -> Table:
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; valid: {', '.join(TABLES)}")
    return TABLES[name]


def select_rows(table: Table, rows: Sequence[int] | None) -> list[Row]:
    """The rows to run: the requested ones plus the baselines they compare against, in table order."""
    if not rows:
        return list(table.rows)
    by_n = {r.n: r for r in table.rows}
    unknown = sorted(set(rows) - set(by_n))
    if unknown:
        raise ValueError(f"{table.name} has no row(s) {unknown}; rows: {', '.join(str(n) for n in by_n)}")
    wanted = set(rows)
    wanted |= {by_n[n].baseline for n in rows if by_n[n].baseline is not None}
    return [r for r in table.rows if r.n in wanted]


# ----------------------------------------------------------------------------- aggregation
def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    mean = float(np.mean(vals))
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return mean, std


def fmt_mean_std(mean: float | None, std: float | None, digits: int = 1, na: str = "n/a") -> str:
    if mean is None:
        return na
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _paired(results: Mapping[int, Mapping[str, Any]], base: Mapping[int, Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-image correctness of the seeds both rows have, concatenated seed by seed."""
    a, b = [], []
    for seed in sorted(set(results) & set(base)):
        ca, cb = results[seed].get(key), base[seed].get(key)
        if ca is None or cb is None or len(ca) != len(cb):
            continue
        a.append(np.asarray(ca, dtype=bool))
        b.append(np.asarray(cb, dtype=bool))
    if not a:
        return None
    return np.concatenate(a), np.concatenate(b)


def test_set_key(name: str) -> str:
    """The result key of an extra test set's accuracy (``correct_<key>.npy`` holds its per-image correctness)."""
    return f"ts_{name}"


def aggregate(rows: Sequence[Row], results: Mapping[int, Mapping[int, Mapping[str, Any]]], test_sets: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One summary dict per row with results: means/stds over seeds, deltas and McNemar tests.

    ``results[n][seed]`` holds a row's per-seed result: ``c10`` and ``c10_1`` accuracies in
    percent (``c10_1`` None when CIFAR-10.1 is unavailable), ``correct_c10`` /
    ``correct_c10_1`` per-image correctness, ``time_ratio``, ``macs``, and optional
    ``agreement``, ``agreement_per_module``, ``skip_rate``. The McNemar test pools the
    images of the seeds both rows have, paired seed by seed. Each extra test set ``NAME``
    (``--test-set``) adds the same columns as CIFAR-10.1 under the key :func:`test_set_key`.
    """
    shifted = ("c10_1",) + tuple(test_set_key(n) for n in test_sets)
    by_n = {r.n: r for r in rows}
    out = []
    for row in rows:
        per_seed = results.get(row.n) or {}
        if not per_seed:
            continue
        seeds = sorted(per_seed)
        s: dict[str, Any] = {
            "n": row.n,
            "label": row.label,
            "group": row.group,
            "seeds": seeds,
            "baseline": row.baseline,
            "paper": dict(row.paper),
            "note": row.note,
        }
        for key in ("c10", "time_ratio", "macs", "agreement", "skip_rate", "wall_s") + shifted:
            s[key], s[key + "_std"] = _mean_std([per_seed[k].get(key) for k in seeds])
        for key in shifted:  # gap: C10 minus the shifted set (CIFAR-10.1's "Gap")
            gap = "gap" if key == "c10_1" else f"gap_{key}"
            s[gap], s[gap + "_std"] = _mean_std([per_seed[k]["c10"] - per_seed[k][key] if per_seed[k].get(key) is not None else None for k in seeds])
        mods = [per_seed[k].get("agreement_per_module") for k in seeds if per_seed[k].get("agreement_per_module")]
        s["agreement_per_module"] = [float(np.mean(col)) for col in zip(*mods)] if mods else None
        s["agreement_init"], _ = _mean_std([per_seed[k].get("agreement_init") for k in seeds])
        base_row = by_n.get(row.baseline) if row.baseline is not None else None
        base = results.get(row.baseline) if base_row is not None else None
        for key, dkey in [("c10", "d_c10")] + [(k, "d_" + k) for k in shifted]:
            s[dkey] = s[dkey + "_std"] = None
            s["p_" + key] = None
            s["mcnemar_" + key] = None
            if not base:
                continue
            common = sorted(set(per_seed) & set(base))
            diffs = [per_seed[k][key] - base[k][key] for k in common if per_seed[k].get(key) is not None and base[k].get(key) is not None]
            s[dkey], s[dkey + "_std"] = _mean_std(diffs)
            pair = _paired(per_seed, base, "correct_" + key)
            if pair is not None:
                test = mcnemar(*pair)
                s["p_" + key] = test["p_value"]
                s["mcnemar_" + key] = test
        if base:
            s["macs_ratio"], _ = _mean_std(
                [per_seed[k]["macs"] / base[k]["macs"] for k in sorted(set(per_seed) & set(base)) if per_seed[k].get("macs") and base[k].get("macs")]
            )
        else:
            s["macs_ratio"] = None
        out.append(s)
    return out


# ----------------------------------------------------------------------------- formatting
def _fmt(v: float | None, digits: int = 2, na: str = "-") -> str:
    return na if v is None else f"{v:.{digits}f}"


def _delta(s: Mapping[str, Any], key: str) -> str:
    d = s.get("d_" + key)
    if d is None:
        return "-" if s.get("baseline") is None or s.get(key) is not None else "n/a"
    text = f"{d:+.1f}" + (f" ± {s['d_' + key + '_std']:.1f}" if s.get("d_" + key + "_std") is not None else "")
    p = s.get("p_" + key)
    return text + (DAGGER if p is not None and p >= ALPHA else "")


ACCURACY_COLUMNS = (
    "N",
    "Model",
    "C10",
    "C10.1",
    "Gap",
    "Time Δ",
    "ΔC10",
    "ΔC10.1",
    "p (C10)",
    "p (C10.1)",
    "MACs Δ",
    "Seeds",
    "Paper C10",
    "Paper C10.1",
    "Paper ΔC10",
)


def test_set_columns(name: str) -> tuple[str, ...]:
    """The columns an extra test set ``name`` adds: accuracy, gap to C10, delta to the baseline, McNemar p."""
    return (name, f"Gap {name}", f"Δ{name}", f"p ({name})")


def _test_set_cells(s: Mapping[str, Any], name: str) -> dict[str, str]:
    key, is_base = test_set_key(name), s.get("baseline") is None
    return dict(
        zip(
            test_set_columns(name),
            (
                fmt_mean_std(s.get(key), s.get(key + "_std")),
                fmt_mean_std(s.get("gap_" + key), s.get("gap_" + key + "_std")),
                "-" if is_base else _delta(s, key),
                "-" if is_base else format_p(s.get("p_" + key)),
            ),
        )
    )


def accuracy_columns(s: Mapping[str, Any], with_group: bool = False, test_sets: Sequence[str] = ()) -> dict[str, str]:
    paper = s.get("paper") or {}
    is_base = s.get("baseline") is None
    cols = {
        "N": str(s["n"]),
        "Model": (f"{s['group']} " if with_group and s.get("group") else "") + s["label"],
        "C10": fmt_mean_std(s.get("c10"), s.get("c10_std")),
        "C10.1": fmt_mean_std(s.get("c10_1"), s.get("c10_1_std")),
        "Gap": fmt_mean_std(s.get("gap"), s.get("gap_std")),
        "Time Δ": "-" if is_base else _fmt(s.get("time_ratio")),
        "ΔC10": "-" if is_base else _delta(s, "c10"),
        "ΔC10.1": "-" if is_base else _delta(s, "c10_1"),
        "p (C10)": "-" if is_base else format_p(s.get("p_c10")),
        "p (C10.1)": "-" if is_base else format_p(s.get("p_c10_1")),
        "MACs Δ": "-" if is_base else _fmt(s.get("macs_ratio")),
        "Seeds": str(len(s.get("seeds") or [])),
        "Paper C10": _fmt(paper.get("c10"), 1),
        "Paper C10.1": _fmt(paper.get("c10_1"), 1),
        "Paper ΔC10": _fmt(paper.get("d_c10"), 1),
    }
    for name in test_sets:
        cols.update(_test_set_cells(s, name))
    return cols


AGREEMENT_COLUMNS = ("N", "Model", "Agreement", "Agreement per module", "Agreement at init", "C10", "ΔC10", "p (C10)", "Seeds", "Paper")


def agreement_columns(s: Mapping[str, Any], with_group: bool = False, test_sets: Sequence[str] = ()) -> dict[str, str]:
    is_base = s.get("baseline") is None
    per = s.get("agreement_per_module")
    return {
        "N": str(s["n"]),
        "Model": s["label"],
        "Agreement": "1 (by construction)" if is_base else fmt_mean_std(s.get("agreement"), s.get("agreement_std"), digits=3, na="-"),
        "Agreement per module": "-" if not per else " / ".join(f"{v:.2f}" for v in per),
        "Agreement at init": _fmt(s.get("agreement_init"), 3),
        "C10": fmt_mean_std(s.get("c10"), s.get("c10_std")),
        "ΔC10": "-" if is_base else _delta(s, "c10"),
        "p (C10)": "-" if is_base else format_p(s.get("p_c10")),
        "Seeds": str(len(s.get("seeds") or [])),
        "Paper": str((s.get("paper") or {}).get("agreement", "-")),
    } | {k: v for name in test_sets for k, v in _test_set_cells(s, name).items()}


def _columns_for(table: Table, test_sets: Sequence[str] = ()) -> tuple[tuple[str, ...], Any]:
    base, fn = (AGREEMENT_COLUMNS, agreement_columns) if table.kind == "agreement" else (ACCURACY_COLUMNS, accuracy_columns)
    return base + tuple(c for n in test_sets for c in test_set_columns(n)), fn


def _footnotes(table: Table, summaries: Sequence[Mapping[str, Any]], c10_1_available: bool) -> list[str]:
    notes = [
        f"{DAGGER}: the paired McNemar test against the baseline gives p >= {ALPHA}: the difference is within noise.",
        "Mean ± std over seeds (std only with 2+ seeds); McNemar pools the images of all seeds, paired seed by seed.",
    ]
    if not c10_1_available:
        notes.append("C10.1: n/a: the CIFAR-10.1 images are not available (only its labels); Gap and ΔC10.1 need them.")
    notes.append(
        "At n=2000 (CIFAR-10.1) one standard error of an accuracy near 80% is ~0.9 points, so a ~1 point C10.1 difference is within noise; at n=10000 (C10) it is ~0.3 points."
    )
    notes.extend(table.notes)
    for s in summaries:
        if s.get("note"):
            notes.append(f"Row {s['n']}: {s['note']}.")
    return notes


def table_markdown(
    table: Table, summaries: Sequence[Mapping[str, Any]], *, budget: str, c10_1_available: bool, header: str = "", test_sets: Sequence[str] = ()
) -> str:
    columns, fn = _columns_for(table, test_sets)
    with_group = any(s.get("group") for s in summaries)
    lines = [f"# {table.title}", "", f"Budget: `{budget}`. {header}".rstrip(), ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("| " + " | ".join("---" for _ in columns) + " |")
    for s in summaries:
        cells = fn(s, with_group, test_sets)
        lines.append("| " + " | ".join(cells[c].replace("|", "/") for c in columns) + " |")
    lines.append("")
    notes = _footnotes(table, summaries, c10_1_available)
    if test_sets:
        notes.append(
            f"Extra test sets (--test-set): {', '.join(test_sets)}; each with its accuracy, its gap to C10, its Δ to the "
            "baseline and the paired McNemar p, as CIFAR-10.1."
        )
    lines.extend(f"- {n}" for n in notes)
    return "\n".join(lines) + "\n"


def table_csv(table: Table, summaries: Sequence[Mapping[str, Any]], test_sets: Sequence[str] = ()) -> str:
    """CSV with the display columns plus raw numbers (means, stds, p-values) for further analysis."""
    columns, fn = _columns_for(table, test_sets)
    with_group = any(s.get("group") for s in summaries)
    raw = (
        "c10",
        "c10_std",
        "c10_1",
        "c10_1_std",
        "gap",
        "time_ratio",
        "d_c10",
        "d_c10_1",
        "p_c10",
        "p_c10_1",
        "macs",
        "macs_ratio",
        "agreement",
        "agreement_std",
        "skip_rate",
        "wall_s",
    )
    raw += tuple(f"{p}{test_set_key(n)}" for n in test_sets for p in ("", "d_", "p_", "gap_"))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(columns) + [f"raw_{k}" for k in raw])
    for s in summaries:
        cells = fn(s, with_group, test_sets)
        w.writerow(
            [cells[c] for c in columns] + ["" if s.get(k) is None else (f"{s[k]:.6g}" if isinstance(s.get(k), float) else s.get(k)) for k in raw]
        )
    return buf.getvalue()

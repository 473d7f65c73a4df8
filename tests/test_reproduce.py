"""The reproduction harness: McNemar on a hand-made example, aggregation and the table writers,
the harness end to end at the smoke budget (synthetic data; real data under -m slow), resumability, CLI."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from resetnet.cli import main
from resetnet.train.stats import mcnemar
from resetnet_experiments.reproduce import format_duration, reproduce
from resetnet_experiments.tables import (
    ACCURACY_COLUMNS,
    AGREEMENT_COLUMNS,
    DAGGER,
    TABLES,
    Row,
    Table,
    aggregate,
    select_rows,
    table_csv,
    table_markdown,
)

REAL_DATA = Path("/work/shared/data")


# ----------------------------------------------------------------------------- McNemar
def test_mcnemar_hand_made_examples():
    # 8 images right only for A, 2 right only for B, 5 right for both, 5 wrong for both.
    a = np.array([1] * 8 + [0] * 2 + [1] * 5 + [0] * 5, dtype=bool)
    b = np.array([0] * 8 + [1] * 2 + [1] * 5 + [0] * 5, dtype=bool)
    r = mcnemar(a, b)
    assert (r["b"], r["c"]) == (8, 2)
    # b + c = 10 < 25: exact two-sided binomial, 2 * P(X <= 2 | n=10, 1/2) = 2 * (1 + 10 + 45) / 1024
    assert r["p_value"] == pytest.approx(112 / 1024)
    # b = 30, c = 10: chi2 = (|30 - 10| - 1)^2 / 40 = 9.025, p = P(chi2_1 > 9.025) = erfc(sqrt(9.025 / 2))
    a = np.array([1] * 30 + [0] * 10 + [1] * 60, dtype=bool)
    b = np.array([0] * 30 + [1] * 10 + [1] * 60, dtype=bool)
    r = mcnemar(a, b)
    assert r["statistic"] == pytest.approx(9.025)
    assert r["p_value"] == pytest.approx(math.erfc(math.sqrt(9.025 / 2)))
    assert r["p_value"] == pytest.approx(0.00266, abs=1e-4)
    assert mcnemar(a, a)["p_value"] == 1.0


# ----------------------------------------------------------------------------- aggregation / writers
def _result(c10, correct, time_ratio=None, macs=1e6, c10_1=None):
    return {"c10": c10, "c10_1": c10_1, "correct_c10": correct, "correct_c10_1": None, "time_ratio": time_ratio, "macs": macs}


def test_aggregate_means_deltas_and_noise_marks():
    rng = np.random.default_rng(0)
    base0, base1 = rng.random(1000) < 0.8, rng.random(1000) < 0.8
    better0, better1 = base0 | (rng.random(1000) < 0.5), base1 | (rng.random(1000) < 0.5)  # clearly better
    same0 = base0.copy()
    same0[:3] = ~same0[:3]  # 3 flips: within noise
    rows = [Row(1, "Base", "scratch", baseline=None), Row(2, "Better", "scratch"), Row(3, "Same", "scratch")]
    results = {
        1: {0: _result(100 * base0.mean(), base0), 1: _result(100 * base1.mean(), base1)},
        2: {0: _result(100 * better0.mean(), better0, 2.0, 2e6), 1: _result(100 * better1.mean(), better1, 1.8, 2e6)},
        3: {0: _result(100 * same0.mean(), same0, 1.0, 1e6)},
    }
    s = {x["n"]: x for x in aggregate(rows, results)}
    assert s[1]["c10"] == pytest.approx(100 * (base0.mean() + base1.mean()) / 2)
    assert s[1]["c10_std"] == pytest.approx(np.std([100 * base0.mean(), 100 * base1.mean()], ddof=1))
    assert s[2]["d_c10"] == pytest.approx(s[2]["c10"] - s[1]["c10"])
    assert s[2]["p_c10"] < 1e-6 and s[2]["time_ratio"] == pytest.approx(1.9) and s[2]["macs_ratio"] == pytest.approx(2.0)
    assert s[2]["mcnemar_c10"]["b"] + s[2]["mcnemar_c10"]["c"] > 0
    assert s[3]["p_c10"] > 0.05 and s[3]["seeds"] == [0]  # paired on the seed both rows have
    assert s[1]["gap"] is None and s[2]["d_c10_1"] is None  # no CIFAR-10.1

    table = Table("t", "Test table", tuple(rows))
    md = table_markdown(table, list(s.values()), budget="smoke", c10_1_available=False)
    header = next(line for line in md.splitlines() if line.startswith("| N "))
    for col in ("N", "Model", "C10", "C10.1", "Gap", "Time Δ", "ΔC10", "ΔC10.1", "p (C10)"):
        assert f" {col} |" in header
    line3 = next(line for line in md.splitlines() if line.startswith("| 3 "))
    assert DAGGER in line3 and "n/a" in line3
    line2 = next(line for line in md.splitlines() if line.startswith("| 2 "))
    assert DAGGER not in line2 and " ± " in line2 and "<0.001" in line2
    assert "CIFAR-10.1" in md and "n=2000" in md
    parsed = list(csv.DictReader(io.StringIO(table_csv(table, list(s.values())))))
    assert [r["N"] for r in parsed] == ["1", "2", "3"]
    assert set(ACCURACY_COLUMNS) <= set(parsed[0]) and parsed[0]["C10.1"] == "n/a"
    assert float(parsed[1]["raw_d_c10"]) == pytest.approx(s[2]["d_c10"], rel=1e-4)


def test_tables_and_row_selection():
    assert set(TABLES) == {"table1", "table2", "table3", "sec5_1"}
    assert [r.n for r in TABLES["table2"].rows] == list(range(1, 21))
    assert [r.n for r in select_rows(TABLES["table2"], [8])] == [1, 8]  # the baseline comes along
    assert [r.n for r in select_rows(TABLES["table1"], [4])] == [3, 4]  # Table 1: per-architecture baselines
    with pytest.raises(ValueError, match="no row"):
        select_rows(TABLES["table3"], [9])
    assert format_duration(3725) == "1h02m" and format_duration(65) == "1m05s" and format_duration(None) == "unknown"


# ----------------------------------------------------------------------------- end to end
def _check_outputs(out: Path, columns, n_rows: int):
    md = (out / "table.md").read_text(encoding="utf-8")
    header = next(line for line in md.splitlines() if line.startswith("| N "))
    assert [c.strip() for c in header.strip("|").split("|")] == list(columns)
    body = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| N ") and not line.startswith("| ---")]
    assert len(body) == n_rows
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text(encoding="utf-8"))))
    assert len(rows) == n_rows and set(columns) <= set(rows[0])
    return md, rows


def test_reproduce_smoke_synthetic_end_to_end_and_resume(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="resetnet")
    out = tmp_path / "t3"
    summaries = reproduce("table3", budget="smoke", out=out, rows=[4], synthetic=True)
    assert [s["n"] for s in summaries] == [1, 4]
    md, rows = _check_outputs(out, ACCURACY_COLUMNS, 2)
    assert rows[0]["C10.1"] == "n/a" and rows[1]["Time Δ"] not in ("", "-")
    logged = caplog.text
    assert "row 4 seed 0" in logged and "estimated time left" in logged
    result = json.loads((out / "rows" / "04" / "seed0" / "result.json").read_text())
    assert np.load(out / "rows" / "04" / "seed0" / "correct_c10.npy").shape == (result["n_c10"],)
    assert result["stages"][0]["name"] == "scratch" and result["skip_rate"] is not None

    def no_training(*a, **k):
        raise AssertionError("a finished row was retrained")

    again = reproduce("table3", budget="smoke", out=out, rows=[4], synthetic=True, train_fn=no_training)
    assert [s["c10"] for s in again] == [s["c10"] for s in summaries]


needs_cifar = pytest.mark.skipif(not (REAL_DATA / "cifar-10-batches-bin").is_dir(), reason="CIFAR-10 not available")


@needs_cifar
def test_reproduce_smoke_real_data_table3(tmp_path):
    out = tmp_path / "real"
    assert main(["reproduce", "table3", "--budget", "smoke", "--out", str(out), "--data-dir", str(REAL_DATA), "--rows", "3"]) == 0
    _, rows = _check_outputs(out, ACCURACY_COLUMNS, 2)
    assert rows[0]["C10.1"] == "n/a"  # only the CIFAR-10.1 labels are present
    assert json.loads((out / "run.json").read_text())["c10_1_available"] is False


@pytest.mark.slow
@needs_cifar
def test_reproduce_smoke_real_data_sec5_1(tmp_path):
    assert main(["reproduce", "sec5_1", "--budget", "smoke", "--out", str(tmp_path / "s51"), "--data-dir", str(REAL_DATA)]) == 0
    md, rows = _check_outputs(tmp_path / "s51", AGREEMENT_COLUMNS, 3)
    assert rows[0]["Agreement"].startswith("1") and float(rows[2]["Agreement"]) >= 0


def test_cli_errors(tmp_path, capsys):
    assert main(["reproduce", "pipeline", "--out", str(tmp_path)]) == 2
    assert "--pipeline" in capsys.readouterr().err
    assert main(["reproduce", "table3", "--out", str(tmp_path), "--rows", "42", "--synthetic"]) == 2
    assert "no row" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reproduce", "table9", "--out", str(tmp_path)])


# ----------------------------------------------------------------------------- nothing reused that does not match
def test_an_out_dir_belongs_to_one_request(tmp_path, capsys):
    out = tmp_path / "t3"
    reproduce("table3", budget="smoke", out=out, rows=[1], synthetic=True)
    capsys.readouterr()  # its progress lines (logged to stderr once any command has set up logging)
    # another budget, another scale, real data instead of synthetic: refused, nothing written
    before = (out / "table.md").read_text()
    assert main(["reproduce", "table3", "--budget", "cpu", "--out", str(out), "--rows", "1", "--synthetic"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another request" in err and "budget 'smoke' there, 'cpu' asked" in err
    assert main(["reproduce", "table3", "--budget", "smoke", "--out", str(out), "--rows", "1", "--synthetic", "--scale", "2"]) == 2
    assert "scale" in capsys.readouterr().err
    assert (out / "table.md").read_text() == before
    # more seeds into the same request continue it
    assert main(["reproduce", "table3", "--budget", "smoke", "--out", str(out), "--rows", "1", "--synthetic", "--seeds", "2"]) == 0
    assert (out / "rows" / "01" / "seed1" / "result.json").is_file()


def test_a_row_result_of_other_stages_is_not_reused(tmp_path):
    out = tmp_path / "t3"
    reproduce("table3", budget="smoke", out=out, rows=[1], synthetic=True)
    path = out / "rows" / "01" / "seed0" / "result.json"
    result = json.loads(path.read_text())
    result["stage_keys"] = ["0" * 64]  # as if trained from another config or data
    path.write_text(json.dumps(result))
    from resetnet.train.config import ConfigError

    with pytest.raises(ConfigError, match="other stages"):
        reproduce("table3", budget="smoke", out=out, rows=[1], synthetic=True)


def test_stages_trained_on_other_data_are_not_reused(tmp_path):
    from resetnet_experiments.pipelines import Runner, data_fingerprint, run_pipeline
    from resetnet_experiments.reproduce import synthetic_arrays
    from resetnet_experiments.tables import BUDGETS

    a, b = synthetic_arrays(seed=0), synthetic_arrays(seed=1)
    assert data_fingerprint(a) != data_fingerprint(b) and data_fingerprint(a) == data_fingerprint(synthetic_arrays(seed=0))

    def run(arrays):
        runner = Runner(tmp_path, budget="smoke", overrides=BUDGETS["smoke"].overrides, arrays=arrays)
        return run_pipeline("scratch", runner, {"config": "table3/resnet_t3", "steps": 1})

    first, again, other = run(a), run(a), run(b)
    assert again[0].reused and again[0].key == first[0].key
    assert not other[0].reused and other[0].key != first[0].key and other[0].out_dir != first[0].out_dir


def test_reproduce_interrupted_exits_143_with_one_line(tmp_path, capsys, monkeypatch):
    import signal

    import resetnet_experiments.reproduce as R

    def interrupted(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)  # as `kill` would, outside a training stage
        raise AssertionError("the signal did not stop the command")

    monkeypatch.setattr(R, "reproduce", interrupted)
    assert main(["reproduce", "table3", "--budget", "smoke", "--out", str(tmp_path), "--synthetic"]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SIGTERM" in err[0] and "rerun the same command" in err[0] and "--resume" not in err[0]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is restored

    from resetnet.train.trainer import TrainingInterrupted

    def stage_interrupted(*args, **kwargs):
        raise TrainingInterrupted("SIGTERM received: checkpoint saved", signum=signal.SIGTERM)

    monkeypatch.setattr(R, "reproduce", stage_interrupted)
    assert main(["reproduce", "table3", "--budget", "smoke", "--out", str(tmp_path), "--synthetic"]) == 143
    assert "rerun the same command" in capsys.readouterr().err


# ----------------------------------------------------------------------------- extra test sets
def _npz(path, n=40, seed=0, **override):
    rng = np.random.default_rng(seed)
    arrays = {"x": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), "y": rng.integers(0, 10, n)}
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def test_test_set_files_are_validated(tmp_path):
    from resetnet.data import DataError, load_test_set, parse_test_set

    x, y = load_test_set(_npz(tmp_path / "ok.npz"))
    assert x.shape == (40, 32, 32, 3) and y.dtype == np.int64
    assert parse_test_set("fog=~/fog.npz")[0] == "fog"
    bad = {
        "x float": dict(x=np.zeros((4, 32, 32, 3), np.float32), y=np.zeros(4, int)),
        "x shape": dict(x=np.zeros((4, 3, 32, 32), np.uint8), y=np.zeros(4, int)),
        "labels": dict(x=np.zeros((4, 32, 32, 3), np.uint8), y=np.array([0, 1, 10, 2])),
        "count": dict(x=np.zeros((4, 32, 32, 3), np.uint8), y=np.zeros(3, int)),
        "y float": dict(x=np.zeros((4, 32, 32, 3), np.uint8), y=np.zeros(4, np.float32)),
    }
    for what, arrays in bad.items():
        with pytest.raises(DataError, match=r"expected an \.npz"):
            load_test_set(_npz(tmp_path / f"{what}.npz", **arrays))
    np.savez(tmp_path / "keys.npz", images=np.zeros((2, 32, 32, 3), np.uint8))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for name in ("keys.npz", "junk.npz", "missing.npz"):
        with pytest.raises(DataError):
            load_test_set(tmp_path / name)
    for text in ("nopath", "c10_1=x.npz", "1abc=x.npz"):
        with pytest.raises(DataError):
            parse_test_set(text)


def test_reproduce_reports_an_extra_test_set(tmp_path, capsys):
    shift = _npz(tmp_path / "shift.npz", n=30)
    out = tmp_path / "t3"
    assert main(["reproduce", "table3", "--budget", "smoke", "--out", str(out), "--rows", "3", "--synthetic"]) == 0
    # asked for after the rows finished: evaluated on the finished checkpoints, nothing retrained
    assert main(["reproduce", "table3", "--budget", "smoke", "--out", str(out), "--rows", "3", "--synthetic", "--test-set", f"shift={shift}"]) == 0
    md = (out / "table.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| N "))
    for col in ("shift", "Gap shift", "Δshift", "p (shift)"):
        assert f" {col} |" in header
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert rows[0]["shift"] not in ("", "n/a") and rows[0]["Δshift"] == "-" and rows[1]["p (shift)"] not in ("", "-")
    result = json.loads((out / "rows" / "03" / "seed0" / "result.json").read_text())
    assert 0 <= result["ts_shift"] <= 100 and result["n_ts_shift"] == 30
    assert np.load(out / "rows" / "03" / "seed0" / "correct_ts_shift.npy").shape == (30,)
    capsys.readouterr()
    assert main(["reproduce", "table3", "--budget", "smoke", "--out", str(out), "--synthetic", "--test-set", f"x={tmp_path / 'none.npz'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0]


def test_a_stage_another_process_is_training_stops_this_one_with_one_line(tmp_path, capsys):
    # Disjoint --rows may run side by side on one --out (docs/reproduction.md); a stage two of them reach is trained once.
    from resetnet.train.runlock import RunLock
    from resetnet_experiments.pipelines import STAGE_FILE

    out = tmp_path / "t3"
    reproduce("table3", budget="smoke", out=out, rows=[1], synthetic=True)
    result = out / "rows" / "01" / "seed0" / "result.json"
    stage = Path(json.loads(result.read_text())["stages"][0]["dir"])
    (stage / STAGE_FILE).unlink(), result.unlink()  # as if the stage were still training
    capsys.readouterr()
    args = ["reproduce", "table3", "--budget", "smoke", "--out", str(out), "--rows", "1", "--synthetic"]
    lock = RunLock(stage).acquire()  # the other process (flock: a second open file conflicts, in one process too)
    try:
        assert main(args) == 2
    finally:
        lock.release()
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress lines
    assert err.startswith(f"resetnet reproduce: error: {stage} is in use by process") and "another process is training this stage" in err
    assert main(args) == 0 and result.is_file()  # once it is free, the finished checkpoint is read back

"""Smoke test of benchmarks/train_step.py: it runs both loops on the same arithmetic and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train_step"] = module
    spec.loader.exec_module(module)
    return module


def test_train_step_benchmark_runs_and_reports(tmp_path, capsys):
    bench = _load()
    try:
        cfg = bench.config("resnet_t3", "cpu", "fast")
        # the trainer runs at the plain loop's constant peak rate, not a warm-up over the nominal budget
        assert cfg.optim.schedule.kind == "constant" and cfg.optim.schedule.warmup == 0
        out = tmp_path / "r.json"
        args = ["--models", "resnet_t3", "--synthetic", "--steps", "1", "--warmup", "1", "--repeats", "2", "--threads", "1"]
        assert bench.main([*args, "--json", str(out)]) == 0
    finally:
        sys.modules.pop("bench_train_step", None)
    (r,) = json.loads(out.read_text())["results"]
    assert r["model"] == "resnet_t3" and r["batch"] == 128 and len(r["ratios"]) == 2
    assert r["trainer_ms"] > 0 and r["plain_ms"] > 0 and r["ratio"] > 0
    assert "| resnet_t3 | 128 |" in capsys.readouterr().out


def test_plain_loop_accuracy_trains_he_stem_for_the_asked_epochs(capsys):
    path = SCRIPT.with_name("plain_loop_accuracy.py")
    spec = importlib.util.spec_from_file_location("bench_plain_loop_accuracy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # synthetic: 2,048 training images, 16 batches of 128 an epoch, 256 test images
    assert module.main(["--synthetic", "--epochs", "0.5", "--threads", "1"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["steps"] == 8 and r["n_test"] == 256 and r["stem"] == "He et al."
    assert 0.0 <= r["test_acc"] <= 1.0 and r["train_s"] > 0

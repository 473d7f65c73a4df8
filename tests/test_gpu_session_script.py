"""benchmarks/gpu_session.sh, the prepared run for a lent GPU machine: its dry run on the CPU works."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"

pytestmark = pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("sh") is None, reason="needs sh and coreutils timeout")


def run_script(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, **env}
    return subprocess.run(["sh", str(SCRIPT), *args], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600)


def test_dry_run_on_cpu_writes_env_and_routing_json(tmp_path):
    proc = run_script(tmp_path, "--device", "cpu", ROUTING_ARGS="--quick --parts a --batch 4 --repeats 1 --threads 1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out"
    assert "torch:" in (out / "env.txt").read_text()
    result = json.loads((out / "routing_cpu.json").read_text())
    assert result["device"] == "cpu" and result["parts_done"] == "a"
    assert "hard_vs_resnet_ratio" in result
    assert "training runs skipped" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["env.txt", "routing.log", "routing_cpu.json"]


def test_a_failing_step_is_counted_and_the_script_goes_on(tmp_path):
    proc = run_script(tmp_path, "--device", "cpu", "--data-dir", str(tmp_path / "nowhere"), ROUTING_ARGS="--parts z")
    assert proc.returncode == 2, proc.stdout + proc.stderr  # the routing step and the missing data
    assert "routing benchmark failed" in proc.stdout
    assert "training runs skipped" in proc.stdout


@pytest.mark.parametrize("args", [["--bogus"], ["--device", "tpu"]])
def test_bad_arguments_exit_2(tmp_path, args):
    proc = run_script(tmp_path, *args)
    assert proc.returncode == 2
    assert "gpu_session.sh:" in proc.stderr


def test_train_step_comparison_appends_its_json_to_its_log(tmp_path):
    proc = run_script(
        tmp_path,
        "--device",
        "cpu",
        "--train-step",
        ROUTING_ARGS="--quick --parts a --batch 4 --repeats 1 --threads 1",
        TRAIN_STEP_ARGS="--models resnet_t3 --steps 1 --warmup 1 --repeats 2 --threads 1",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = (tmp_path / "out" / "train.log").read_text().splitlines()  # appended: the device tool returns 8 files
    assert any(line.startswith("| resnet_t3 | 128 |") for line in lines)  # the table
    result = json.loads(lines[-1])  # the JSON, on one line
    (r,) = result["results"]
    assert r["model"] == "resnet_t3" and len(r["ratios"]) == 2 and r["ratio"] > 0

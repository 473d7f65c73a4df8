"""Smoke test of benchmarks/routing.py: it runs, writes the documented keys, and its controls are sound."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import resetnet

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "routing.py"


@pytest.fixture(scope="module")
def routing():
    spec = importlib.util.spec_from_file_location("bench_routing", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_routing"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_routing", None)


def test_subbatched_twin_is_the_plain_twin_on_chunks(routing):
    """The (a) control runs the same blocks on the hard model's sub-batch sizes: same function in eval mode."""
    torch.manual_seed(0)
    batch = 10
    reset = resetnet.create_model("reset38", scorer="gumbel_st")
    routed = routing.force_routing(copy.deepcopy(reset), batch, 0.0, seed=1)
    twin = routing.plain_twin(reset).eval()
    sub = routing.subbatched_twin(twin, routed).eval()
    stages = [s for s in sub.stages if isinstance(s, routing.SubBatchedSequence)]
    assert len(stages) == 3
    for stage, m in zip(stages, routed.reset_modules()):
        assert len(stage.sizes) == m.iterations
        assert all(sum(sizes) == batch and len(sizes) <= len(m.units) for sizes in stage.sizes)
    assert any(len(sizes) > 1 for stage in stages for sizes in stage.sizes)  # really split
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(sub(x), twin(x), atol=1e-4, rtol=1e-4)


def test_subbatched_sequence_leaves_its_input_alone(routing):
    """The control updates its chunks in place, but in a copy: the stage input is not written."""
    blocks = torch.nn.ModuleList(resetnet.nn.BasicBlock(4) for _ in range(2)).eval()
    stage = routing.SubBatchedSequence(blocks, [[2, 3], [5]])
    x = torch.randn(5, 4, 6, 6)
    before = x.clone()
    with torch.inference_mode():
        out = stage(x)
        ref = x.clone()
        for block in blocks:
            ref = ref + block(ref)
    assert torch.equal(x, before)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_routing_benchmark_writes_the_documented_keys(routing, tmp_path):
    out = tmp_path / "r.json"
    assert routing.main(["--device", "cpu", "--json", str(out), "--quick", "--repeats", "1", "--parts", "ab", "--batch", "8"]) == 0
    result = json.loads(out.read_text())
    for key in (
        "hard_vs_resnet_ratio",
        "hard_single_unit_vs_resnet_ratio",
        "subbatched_vs_resnet_ratio",
        "hard_vs_subbatched_ratio",
        "hard_naive_vs_sparse_ratio",
        "hard_vs_resnet_macs_ratio",
        "device",
        "torch",
    ):
        assert key in result, key
    assert result["device"] == "cpu" and result["torch"] == torch.__version__
    assert result["parts_done"] == "ab"
    # the hard model's only extra work over the plain 5-5-5 net: the Fig. 2b controllers' conv fronts
    assert 1.0 < result["hard_vs_resnet_macs_ratio"] < 1.1
    sweep = result["zero_share_sweep"]
    assert [row["share"] for row in sweep] == [0.0, 0.25, 0.5, 0.75, 1.0]
    macs = [row["macs_ratio"] for row in sweep]
    assert macs[0] == 1.0 and all(a > b for a, b in zip(macs, macs[1:]))  # MACs fall with the share
    assert all(row["time_ratio"] > 0 for row in sweep)


def test_routing_benchmark_report_reprints_a_saved_result(routing, tmp_path, capsys):
    saved = {
        "device_name": "cpu",
        "torch": "x",
        "date": "d",
        "timer": "t",
        "host_allocator": "a",
        "hard_batch": 8,
        "hard_vs_resnet_ratio": 1.5,
        "hard_single_unit_vs_resnet_ratio": 1.1,
        "subbatched_vs_resnet_ratio": 1.2,
        "hard_vs_subbatched_ratio": 1.25,
        "hard_naive_vs_sparse_ratio": 3.0,
        "hard_vs_resnet_macs_ratio": 1.0,
    }
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(saved))
    assert routing.main(["--report", str(path)]) == 0
    assert "| (a) hard reset38 / plain 5-5-5, inference, batch 8 | 1.500 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        routing.main([])  # neither --json nor --report
    with pytest.raises(SystemExit):
        routing.main(["--json", str(tmp_path / "x.json"), "--parts", "xyz"])  # no valid part


def test_routing_benchmark_cuda_settings_path_runs_on_cpu(routing, tmp_path):
    """bf16 autocast + channels_last (the CUDA settings) through every part, on CPU with tiny sizes."""
    out = tmp_path / "r.json"
    args = [
        "--device",
        "cpu",
        "--json",
        str(out),
        "--quick",
        "--repeats",
        "1",
        "--parts",
        "abcd",
        "--batch",
        "4",
        "--cuda-settings-on-cpu",
        "--allocator",
        "default",
    ]
    assert routing.main(args) == 0
    result = json.loads(out.read_text())
    assert result["amp"] == "bf16 autocast" and result["channels_last"] is True
    assert result["parts_done"] == "abcd"
    assert result["fused_vs_naive_ratio"] > 0 and result["reset_vs_resnet_train_ratio"] > 0


def test_routing_benchmark_batch_sweep_of_a(routing, tmp_path, capsys):
    """Part s: (a) at each batch of --hard-batches, with its control, in the JSON and the table."""
    out = tmp_path / "r.json"
    assert (
        routing.main(["--device", "cpu", "--json", str(out), "--repeats", "1", "--parts", "s", "--hard-batches", "4,6", "--allocator", "default"])
        == 0
    )
    result = json.loads(out.read_text())
    assert result["parts_done"] == "s"
    rows = result["hard_by_batch"]
    assert [row["batch"] for row in rows] == [4, 6]
    for row in rows:
        assert set(row["ms"]) == {"resnet_5x3", "hard_sparse", "resnet_5x3_subbatched"}
        for key in ("hard_vs_resnet_ratio", "subbatched_vs_resnet_ratio", "hard_vs_subbatched_ratio"):
            assert row[key] > 0, key
    assert "| 6 |" in capsys.readouterr().out
    for bad in ("4,x", "0,8"):
        with pytest.raises(SystemExit):
            routing.main(["--device", "cpu", "--json", str(out), "--parts", "s", "--hard-batches", bad])

"""The shape of the code: no import cycle, the library never imports the experiments, a light core import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import import_graph  # noqa: E402


def test_no_import_cycle():
    graph = import_graph.imports()
    assert len(graph) > 40 and "resetnet.train.trainer" in graph
    assert import_graph.cycles(graph) == []


def test_a_planted_cycle_is_found():
    assert import_graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_library_never_imports_the_experiments():
    graph = import_graph.imports()
    offenders = {
        (a, b)
        for a, targets in graph.items()
        if a.startswith("resetnet.") or a == "resetnet"
        for b in targets
        if b.startswith("resetnet_experiments")
    }
    assert offenders == set()
    assert any(b.startswith("resetnet.") for b in graph["resetnet_experiments.pipelines"])  # the other way round is the point


def test_importing_resetnet_is_light_and_imports_no_experiment_code():
    # tqdm is not on the list: torch itself imports it.
    code = (
        "import sys, resetnet, resetnet.nn, resetnet.models; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'resetnet_experiments', 'matplotlib', 'tensorboard', 'safetensors'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_docs_architecture_diagram_is_current():
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert import_graph.diagram(import_graph.imports()) in doc, "docs/architecture.md is stale: run python tools/gen_docs.py"


def test_the_library_stays_small():
    """Issue 16: the library (everything outside the experiments package) stays under 6,000 lines."""
    files = sorted((ROOT / "src" / "resetnet").rglob("*.py"))
    lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in files)
    assert files and lines < 6000, f"src/resetnet holds {lines} lines in {len(files)} files; the budget is 6,000"

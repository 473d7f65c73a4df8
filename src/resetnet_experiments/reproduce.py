"""The reproduction harness: run every row of a paper table, evaluate, write ``table.md``/``table.csv``.

Layout of ``OUT``::

    OUT/run.json                         what was asked (target, budget, seeds, rows) and the machine
    OUT/stages/<name>-<hash>/            one trainer run directory per stage (shared between rows)
    OUT/rows/<NN>/seed<S>/result.json    a finished (row, seed): accuracies, timing, MACs, routing stats
    OUT/rows/<NN>/seed<S>/correct_c10.npy     per-image correctness (bool), for the paired McNemar test
    OUT/table.md, OUT/table.csv          rewritten after every finished (row, seed)

A (row, seed) with a ``result.json`` is never retrained; an interrupted one resumes stage by
stage (finished stages are reused, an unfinished stage resumes from its checkpoint). Reuse is
keyed: ``OUT`` belongs to one request (target, budget, scale, data, code version; ``run.json``),
and a row's result records the keys of the stages it came from. A command that asks for
something else in the same ``OUT`` is refused with a message; nothing is silently reused.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resetnet.errors import ConfigError
from resetnet.train.evaluate import compare_timing, evaluate, iterate_batches, mean_macs

from .pipelines import CODE_VERSION, PIPELINES, Runner, data_fingerprint, run_pipeline
from .tables import BUDGETS, Row, Table, aggregate, get_table, select_rows, table_csv, table_markdown, test_set_key

__all__ = ["reproduce", "run_single_pipeline", "synthetic_arrays", "evaluate_row", "load_results", "format_duration", "Progress"]

RESULT_FILE = "result.json"
_log = logging.getLogger("resetnet.experiments").info


def format_duration(seconds: float | None) -> str:
    if seconds is None or not np.isfinite(seconds):
        return "unknown"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def synthetic_arrays(n_train: int = 512, n_test: int = 256, seed: int = 0, size: int = 16) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random CIFAR-shaped uint8 images whose mean colour depends on the label (learnable, for tests)."""
    rng = np.random.default_rng(seed)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, n).astype(np.int64)
        base = rng.integers(0, 96, (n, size, size, 3))
        x = np.clip(base + (y * 16)[:, None, None, None], 0, 255).astype(np.uint8)
        return x, y

    return {"train": make(n_train), "test": make(n_test)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine() -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _load_test_sets(test_sets: Mapping[str, str | os.PathLike[str]] | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from resetnet.data import load_test_set

    return {name: load_test_set(path) for name, path in (test_sets or {}).items()}


def _load_data(data_dir: str | os.PathLike[str] | None, synthetic: bool) -> tuple[dict, tuple[np.ndarray, np.ndarray] | None]:
    if synthetic:
        return synthetic_arrays(), None
    from resetnet.data import DataNotAvailable, load_cifar10, load_cifar10_1, resolve_data_dir

    root = resolve_data_dir(data_dir)
    arrays = {"train": load_cifar10(root, "train", download=True), "test": load_cifar10(root, "test", download=True)}
    try:
        c10_1 = load_cifar10_1(root, "v6")
    except DataNotAvailable:
        c10_1 = None
    return arrays, c10_1


# ----------------------------------------------------------------------------- cost / progress
_MACS_CACHE: dict[str, float] = {}


def _static_macs(model: Any) -> float:
    """Dense MACs per image of a config's model (the cost unit of the ETA)."""
    key = json.dumps({"name": model.name, "overrides": model.overrides}, sort_keys=True, default=str)
    if key not in _MACS_CACHE:
        from resetnet.models import create_model
        from resetnet.profile import macs_bounds

        with torch.device("meta"):
            net = create_model(model.name, **model.overrides)
        net = net.to_empty(device="cpu")
        with torch.no_grad():
            for t in net.state_dict().values():
                t.zero_()
        _MACS_CACHE[key] = macs_bounds(net)["dense"]
    return _MACS_CACHE[key]


def _stage_cost(cfg: Any) -> float:
    if cfg is None:
        return 0.0
    t = cfg.train
    steps = t.steps if t.steps is not None else 50000 * t.epochs / t.batch_size
    return float(steps) * t.batch_size * _static_macs(cfg.model) * (3.0 if "all" in cfg.trainable else 2.0)


class Progress:
    """Prints which row runs and the estimated time left (cost model: steps x batch x MACs)."""

    def __init__(self, total_cost: float, log: Callable[[str], None]) -> None:
        self.total = max(total_cost, 1e-9)
        self.done = 0.0
        self.train_s = 0.0
        self.start = time.perf_counter()
        self.log = log

    def stage_finished(self, cost: float, wall_s: float, reused: bool) -> None:
        self.done += cost
        if not reused:
            self.train_s += wall_s

    def eta(self) -> float | None:
        trained = self.done
        if self.train_s <= 0 or trained <= 0:
            return None
        return (self.total - self.done) * self.train_s / trained

    def line(self) -> str:
        return f"elapsed {format_duration(time.perf_counter() - self.start)}, estimated time left {format_duration(self.eta())}"


# ----------------------------------------------------------------------------- evaluation
def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _eval_loader(x: np.ndarray, y: np.ndarray, limit: int | None, device: torch.device, batch: int = 500):
    from resetnet.data import DeviceLoader

    return DeviceLoader(x, y, batch, train=False, device=device, limit=limit)


@torch.no_grad()
def routing_summary(model: torch.nn.Module, loader: Any, limit: int) -> dict[str, Any]:
    """Skip rate and sequential-policy agreement (pooled and per module) over the first ``limit`` images."""
    from resetnet_experiments.analysis.agreement import sequential_hits

    if not model.reset_modules():
        return {}
    model.eval()
    hits: list[float] | None = None
    counts: list[int] | None = None
    skips, n = 0.0, 0
    for x, _ in iterate_batches(loader):
        if n >= limit:
            break
        x = x[: limit - n]
        _, routing = model(x, return_routing=True)
        if hits is None:
            hits, counts = [0.0] * len(routing), [0] * len(routing)
        for i, ((h, c), r) in enumerate(zip(sequential_hits(routing), routing)):
            hits[i] += h
            counts[i] += c
            skips += float(r.skip_mask().sum())
        n += int(x.shape[0])
    total = max(sum(counts or [0]), 1)
    return {
        "skip_rate": skips / total,
        "agreement": sum(hits or [0.0]) / total,
        "agreement_per_module": [h / max(c, 1) for h, c in zip(hits or [], counts or [])],
        "probe_images": n,
    }


def evaluate_row(
    final_dir: Path,
    arrays: Mapping[str, tuple[np.ndarray, np.ndarray]],
    c10_1: tuple[np.ndarray, np.ndarray] | None,
    budget_name: str,
    baseline_dir: Path | None = None,
    twin_dir: Path | None = None,
    extra: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Evaluate a row's final checkpoint: ``(scalars, per-image correctness arrays)``.

    ``extra``: ``{NAME: (x, y)}`` test sets (``--test-set``), evaluated like CIFAR-10.1.
    """
    from resetnet.train import load_model

    b = BUDGETS[budget_name]
    device = _device()
    model, meta = load_model(final_dir, device)
    test = _eval_loader(*arrays["test"], b.test_limit, device)
    res = evaluate(model, test)
    out: dict[str, Any] = {"c10": 100.0 * res["acc"], "n_c10": res["n"], "per_class_c10": res["per_class_acc"], "c10_1": None, "n_c10_1": None}
    arrays_out = {"correct_c10": res["correct"]}
    if c10_1 is not None:
        r1 = evaluate(model, _eval_loader(*c10_1, None, device))
        out.update(c10_1=100.0 * r1["acc"], n_c10_1=r1["n"])
        arrays_out["correct_c10_1"] = r1["correct"]
    scalars, correct = evaluate_test_sets(model, extra or {}, device)
    out.update(scalars)
    arrays_out.update(correct)
    out["macs"] = mean_macs(model, test, limit=b.macs_images)
    x = test.get_batch(0, 0)[0][: b.timing_batch]
    if baseline_dir is not None and Path(baseline_dir).resolve() != Path(final_dir).resolve():
        base_model, _ = load_model(baseline_dir, device)
        t = compare_timing(model, base_model, x, repeats=b.timing_repeats)
        out.update(time_ratio=t["ratio"], time_model_s=t["model_s"], time_baseline_s=t["baseline_s"], timing_batch=t["batch"])
    else:
        t = compare_timing(model, None, x, repeats=b.timing_repeats)
        out.update(time_ratio=None, time_model_s=t["model_s"], timing_batch=t["batch"])
    if getattr(model, "reset_modules", lambda: [])():
        out.update(routing_summary(model, test, b.probe_images))
        if twin_dir is not None:
            twin, _ = load_model(twin_dir, device)
            out["agreement_init"] = routing_summary(twin, test, b.probe_images)["agreement"]
    out["model"] = (meta.get("config") or {}).get("model")
    out["checkpoint"] = str(final_dir)
    return out, arrays_out


def evaluate_test_sets(model: torch.nn.Module, sets: Mapping[str, tuple[np.ndarray, np.ndarray]], device: torch.device) -> tuple[dict, dict]:
    """Accuracy (percent) and per-image correctness of ``model`` on each extra test set."""
    scalars, correct = {}, {}
    for name, (x, y) in sets.items():
        res = evaluate(model, _eval_loader(x, y, None, device))
        scalars[test_set_key(name)] = 100.0 * res["acc"]
        scalars[f"n_{test_set_key(name)}"] = res["n"]
        correct[f"correct_{test_set_key(name)}"] = res["correct"]
    return scalars, correct


# ----------------------------------------------------------------------------- results
def _write_json(path: Path, value: Any) -> None:
    from resetnet.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(value, indent=1, default=float).encode("utf-8"))


def _row_dir(out: Path, n: int, seed: int) -> Path:
    return out / "rows" / f"{n:02d}" / f"seed{seed}"


def load_results(out: Path, rows: Sequence[Row], test_sets: Sequence[str] = ()) -> dict[int, dict[int, dict[str, Any]]]:
    """``{n: {seed: result with correctness arrays}}`` for every finished (row, seed) in ``out``."""
    results: dict[int, dict[int, dict[str, Any]]] = {}
    for row in rows:
        base = out / "rows" / f"{row.n:02d}"
        if not base.is_dir():
            continue
        for d in sorted(base.glob("seed*")):
            f = d / RESULT_FILE
            if not f.is_file():
                continue
            r = json.loads(f.read_text(encoding="utf-8"))
            for key in ["correct_c10", "correct_c10_1"] + [f"correct_{test_set_key(n)}" for n in test_sets]:
                p = d / f"{key}.npy"
                r[key] = np.load(p) if p.is_file() else None
            results.setdefault(row.n, {})[int(r["seed"])] = r
    return results


def write_tables(
    table: Table, rows: Sequence[Row], out: Path, budget: str, c10_1_available: bool, header: str = "", test_sets: Sequence[str] = ()
) -> list[dict[str, Any]]:
    summaries = aggregate(rows, load_results(out, rows, test_sets), test_sets)
    md = table_markdown(table, summaries, budget=budget, c10_1_available=c10_1_available, header=header, test_sets=test_sets)
    (out / "table.md").write_text(md, encoding="utf-8")
    (out / "table.csv").write_text(table_csv(table, summaries, test_sets), encoding="utf-8")
    return summaries


def _runner(out: Path, budget: str, seed: int, scale: float, row: Row, **kw: Any) -> Runner:
    b = BUDGETS[budget]
    return Runner(out / "stages", budget=budget, seed=seed, overrides=b.overrides, recipe=b.recipe, scale=scale, upto=row.upto, **kw)


#: run.json fields that must match for a command to continue an existing OUT.
REQUEST_KEYS = ("target", "budget", "scale", "synthetic", "data", "code")


def _check_request(out: Path, request: Mapping[str, Any]) -> dict | None:
    """The previous run.json of ``out`` (None when fresh); a ConfigError when it was another request."""
    path = out / "run.json"
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is unreadable ({err}); it belongs to an earlier run: choose another --out or delete {out}") from None
    differ = [k for k in REQUEST_KEYS if old.get(k) != request.get(k)]
    if differ:
        what = ", ".join(f"{k} {old.get(k)!r} there, {request.get(k)!r} asked" for k in differ)
        raise ConfigError(f"{out} holds results of another request ({what}); choose another --out, or delete {out} to start over")
    return old


def reproduce(
    target: str,
    *,
    budget: str,
    out: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    seeds: int = 1,
    rows: Sequence[int] | None = None,
    scale: float = 1.0,
    synthetic: bool = False,
    test_sets: Mapping[str, str | os.PathLike[str]] | None = None,
    log: Callable[[str], None] | None = None,
    train_fn: Callable[..., dict] | None = None,
) -> list[dict[str, Any]]:
    """Run the rows of ``target`` (table1, table2, table3, sec5_1) for ``seeds`` seeds; returns the row summaries.

    ``test_sets``: ``{NAME: path to an .npz}`` extra test sets, each a column group like CIFAR-10.1's.
    """
    log = log or _log
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; valid: {', '.join(BUDGETS)}")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    table = get_table(target)
    selected = select_rows(table, rows)
    extra = _load_test_sets(test_sets)  # before any work: a bad file fails at once
    names = list(extra)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays, c10_1 = _load_data(data_dir, synthetic)
    fingerprint = data_fingerprint(arrays)
    run_info = {
        "target": target,
        "budget": budget,
        "scale": scale,
        "synthetic": synthetic,
        "data": fingerprint,
        "code": CODE_VERSION,
        "seeds": seeds,
        "rows": [r.n for r in selected],
        "data_dir": None if data_dir is None else str(data_dir),
        "c10_1_available": c10_1 is not None,
        "machine": _machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
    }
    old = _check_request(out, run_info)
    if old is not None:  # a resumed run (more seeds or rows allowed): keep the earlier invocations
        run_info["earlier_invocations"] = old.pop("earlier_invocations", []) + [old]
    _write_json(out / "run.json", run_info)
    header = (
        f"Seeds: {seeds}. Machine: {run_info['machine'].get('gpu') or run_info['machine']['cpu']}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads."
        + (" Synthetic data (a test of the machinery)." if synthetic else "")
    )

    # Cost model for the ETA: every stage not yet finished counts.
    jobs = [(seed, row) for seed in range(seeds) for row in selected]
    plans = {
        (seed, row.n): run_pipeline(row.pipeline, _runner(out, budget, seed, scale, row, fingerprint=fingerprint, dry_run=True), row.vars)
        for seed, row in jobs
    }
    costs: dict[str, float] = {}
    for plan in plans.values():
        for stage in plan:
            costs.setdefault(stage.key, 0.0 if stage.reused else _stage_cost(stage.config))
    progress = Progress(sum(costs.values()), log)
    counted: set[str] = {k for k, c in costs.items() if c == 0.0}
    by_n = {r.n: r for r in selected}
    final_dirs: dict[tuple[int, int], Path] = {}

    log(f"reproduce {target} --budget {budget}: {len(selected)} rows x {seeds} seed(s) -> {out}")
    for i, (seed, row) in enumerate(jobs):
        rdir = _row_dir(out, row.n, seed)
        stage_keys = [stage.key for stage in plans[(seed, row.n)]]
        if (rdir / RESULT_FILE).is_file():
            prev = json.loads((rdir / RESULT_FILE).read_text(encoding="utf-8"))
            if prev.get("stage_keys") != stage_keys:
                raise ConfigError(
                    f"{rdir} holds a result of other stages (another config, budget, data or code version); "
                    f"delete {rdir} to recompute it, or choose another --out"
                )
            final_dirs[(row.n, seed)] = Path(prev["checkpoint"])
            missing = {n: extra[n] for n in names if test_set_key(n) not in prev}
            if missing:  # a test set asked for after the row finished: evaluate only that
                from resetnet.train import load_model

                scalars, correct = evaluate_test_sets(load_model(prev["checkpoint"], _device())[0], missing, _device())
                for key, arr in correct.items():
                    np.save(rdir / f"{key}.npy", np.asarray(arr, dtype=bool))
                _write_json(rdir / RESULT_FILE, {**prev, **scalars})
            log(f"[{i + 1}/{len(jobs)}] row {row.n} seed {seed}: {row.label}: done before")
            continue
        log(
            f"[{i + 1}/{len(jobs)}] row {row.n} seed {seed}: {row.label} ({row.pipeline}{' up to ' + row.upto if row.upto else ''}); {progress.line()}"
        )
        started = time.perf_counter()

        def on_stage_end(result):
            if result.key not in counted:
                counted.add(result.key)
                progress.stage_finished(costs.get(result.key, 0.0), result.wall_s, result.reused)
            if not result.reused:
                log(f"    finished {result.name} in {format_duration(result.wall_s)}; {progress.line()}")

        runner = _runner(
            out,
            budget,
            seed,
            scale,
            row,
            fingerprint=fingerprint,
            arrays=arrays,
            data_dir=data_dir,
            on_stage_end=on_stage_end,
            **({"train_fn": train_fn} if train_fn else {}),
        )
        stages = run_pipeline(row.pipeline, runner, row.vars)
        if [s.key for s in stages] != stage_keys:  # pragma: no cover - planning and running must agree
            raise RuntimeError(f"row {row.n} seed {seed}: the stages run differ from the stages planned")
        final = stages[-1].out_dir
        final_dirs[(row.n, seed)] = final
        base_dir = final_dirs.get((row.baseline, seed)) if row.baseline is not None else None
        if row.baseline is not None and base_dir is None and row.baseline in by_n:
            raise RuntimeError(f"row {row.n}: its baseline row {row.baseline} (seed {seed}) has no result yet")
        twin = next((s.out_dir for s in stages if s.name == "twin"), None)
        scalars, correct = evaluate_row(final, arrays, c10_1, budget, base_dir, twin, extra)
        rdir.mkdir(parents=True, exist_ok=True)
        for key, arr in correct.items():
            np.save(rdir / f"{key}.npy", np.asarray(arr, dtype=bool))
        scalars.update(
            n=row.n,
            label=row.label,
            seed=seed,
            budget=budget,
            scale=scale,
            data=fingerprint,
            code=CODE_VERSION,
            stage_keys=stage_keys,
            pipeline=row.pipeline,
            upto=row.upto,
            stages=[
                {
                    "name": s.name,
                    "dir": str(s.out_dir),
                    "reused": s.reused,
                    "wall_s": s.wall_s,
                    "status": s.summary.get("status"),
                    "stop_reason": s.summary.get("stop_reason"),
                    "step": s.summary.get("step"),
                }
                for s in stages
            ],
            wall_s=sum(s.wall_s for s in stages),
            row_wall_s=time.perf_counter() - started,
        )
        _write_json(rdir / RESULT_FILE, scalars)
        detail = f", agreement {scalars['agreement']:.3f}" if "agreement" in scalars and target == "sec5_1" else ""
        log(
            f"    row {row.n} seed {seed}: C10 {scalars['c10']:.2f}%"
            + (f", C10.1 {scalars['c10_1']:.2f}%" if scalars.get("c10_1") is not None else "")
            + detail
            + f"; {progress.line()}"
        )
        write_tables(table, selected, out, budget, c10_1 is not None, header, names)
    summaries = write_tables(table, selected, out, budget, c10_1 is not None, header, names)
    run_info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    run_info["wall_s"] = time.perf_counter() - progress.start
    _write_json(out / "run.json", run_info)
    log(f"wrote {out / 'table.md'} and {out / 'table.csv'} ({format_duration(run_info['wall_s'])})")
    return summaries


def run_single_pipeline(
    name: str,
    *,
    budget: str,
    out: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    variables: Mapping[str, Any] | None = None,
    upto: str | None = None,
    scale: float = 1.0,
    synthetic: bool = False,
    test_sets: Mapping[str, str | os.PathLike[str]] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run one pipeline (:data:`~resetnet_experiments.pipelines.PIPELINES`) and evaluate its final model into ``OUT/result.json``."""
    log = log or _log
    if name not in PIPELINES:
        raise ConfigError(f"unknown pipeline {name!r}; valid: {', '.join(PIPELINES)}")
    out = Path(out)
    extra = _load_test_sets(test_sets)
    arrays, c10_1 = _load_data(data_dir, synthetic)
    log(f"pipeline {name}: {(PIPELINES[name].__doc__ or '').strip().splitlines()[0]}")
    b = BUDGETS[budget]
    runner = Runner(
        out / "stages", budget=budget, seed=seed, overrides=b.overrides, recipe=b.recipe, scale=scale, upto=upto, arrays=arrays, data_dir=data_dir
    )
    stages = run_pipeline(name, runner, variables)
    twin = next((s.out_dir for s in stages if s.name == "twin"), None)
    scalars, correct = evaluate_row(stages[-1].out_dir, arrays, c10_1, budget, None, twin, extra)
    scalars["stages"] = [
        {
            "name": s.name,
            "dir": str(s.out_dir),
            "wall_s": s.wall_s,
            "status": s.summary.get("status"),
            "stop_reason": s.summary.get("stop_reason"),
            "step": s.summary.get("step"),
        }
        for s in stages
    ]
    out.mkdir(parents=True, exist_ok=True)
    for key, arr in correct.items():
        np.save(out / f"{key}.npy", np.asarray(arr, dtype=bool))
    _write_json(out / RESULT_FILE, scalars)
    detail = ""
    if twin is not None and "agreement" in scalars:  # only a ResNet twin's units have a sequential order
        detail = f", sequential agreement {scalars['agreement']:.3f}"
    elif "skip_rate" in scalars:
        detail = f", skip rate {scalars['skip_rate']:.3f}"
    log(f"final model {stages[-1].out_dir}: C10 {scalars['c10']:.2f}%" + detail)
    return scalars

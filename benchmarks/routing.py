"""Routing benchmarks: does ReSet's dispatch turn skipped work into saved time?

    python benchmarks/routing.py --device cpu --json out/routing_cpu.json --quick
    python benchmarks/routing.py --device cuda --json out/routing_cuda.json [--compile]

Measures, each as a ratio of two timings taken in this process (warm-up first,
the timed calls of the compared configurations interleaved, the median of the
per-repeat ratios reported):

(a) ``hard_vs_resnet_ratio``: hard-routed reset38 inference (eval mode,
    ``gumbel_st`` = arg-max, sparse dispatch, one CU per iteration, samples spread
    uniformly at random over the 5 units) vs a plain residual net with the same
    stem, the same ConvBNReLU transitions and 5 BasicBlocks per stage (the same
    number of blocks as the 5 hard iterations). Target <= 1.10.
(b) ``zero_share_sweep``: inference time and MACs at zero-unit shares 0, .25, .5,
    .75, 1 (relative to share 0). Target: time falls at least 80% as fast as MACs,
    ``efficiency = (1 - time_ratio) / (1 - macs_ratio) >= 0.8``.
(c) ``fused_vs_naive_ratio``: reset38 softmax train step (forward + backward),
    naive time / fused time. Target >= 1.3 on GPU, >= 1.0 on CPU.
(d) ``reset_vs_resnet_train_ratio``: reset38 softmax train step (auto = fused) /
    resnet38 train step. Target <= 1.5 on GPU.
(e) ``throughput``: images/s for resnet38 and reset38 (softmax, fused; and the
    hard-routed gumbel_st model), train step and inference, batch 128 and 1024.

Routes are forced by a controller wrapper that still runs the model's own RNN
controller (so its cost is included) and then overrides the logits with a
precomputed routing. On CUDA: bf16 autocast and channels_last (``--compile`` adds
``torch.compile``). On CPU the default timer is the process CPU time when one
thread is used (robust on a shared machine); see ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import resetnet
from resetnet.nn import BasicBlock, ReSet, ResidualSequence
from resetnet.profile import macs_per_image

SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)
TARGETS = {
    "hard_vs_resnet_ratio": "<= 1.10",
    "zero_share_sweep": "efficiency >= 0.8 at every share",
    "fused_vs_naive_ratio": ">= 1.3 (GPU), >= 1.0 (CPU)",
    "reset_vs_resnet_train_ratio": "<= 1.5 (GPU)",
}


# --------------------------------------------------------------------- routing
class ForcedRouting(nn.Module):
    """Controller protocol wrapper: runs the inner controller (its cost counts), then forces the route.

    ``routes``: (iterations, B) long, values in 0..n_units (n_units = zero unit).
    """

    def __init__(self, inner: nn.Module, routes: torch.Tensor, num_outputs: int) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("forced", F.one_hot(routes, num_outputs).float() * 50.0, persistent=False)

    def initial_state(self, x):
        init = getattr(self.inner, "initial_state", None)
        return init(x) if init is not None else None

    def forward(self, x, iteration, state):
        logits, state = self.inner(x, iteration, state)
        return logits * 0.0 + self.forced[iteration, : x.shape[0]], state


def make_routes(batch: int, iterations: int, n_units: int, zero_share: float, seed: int, spread: str = "random") -> torch.Tensor:
    """Per iteration: round(share * B) random samples take the zero unit; the others a unit.

    ``spread="random"``: each other sample picks a unit uniformly at random (sub-batches of ~B/n).
    ``spread="single"``: all of them take unit ``j % n`` at iteration j (no gather/scatter needed).
    """
    g = torch.Generator().manual_seed(seed)
    routes = torch.empty(iterations, batch, dtype=torch.long)
    skipped = round(zero_share * batch)
    for j in range(iterations):
        if spread == "single":
            routes[j] = j % n_units
        else:
            routes[j] = torch.randint(0, n_units, (batch,), generator=g)
        routes[j, torch.randperm(batch, generator=g)[:skipped]] = n_units
    return routes


def force_routing(model: nn.Module, batch: int, zero_share: float, seed: int, spread: str = "random") -> nn.Module:
    for i, m in enumerate(model.reset_modules()):
        inner = m.controller.inner if isinstance(m.controller, ForcedRouting) else m.controller
        routes = make_routes(batch, m.iterations, len(m.units), zero_share, seed + i, spread)
        device = next(m.parameters()).device
        m.controller = ForcedRouting(inner, routes, m.num_outputs).to(device)
    return model


def set_execution(model: nn.Module, execution: str) -> None:
    for m in model.reset_modules():
        m.execution = execution


def plain_twin(reset_model: nn.Module, blocks: int = 5) -> nn.Module:
    """Same stem, transitions and head as ``reset_model``; each ReSet stage replaced by ``blocks`` BasicBlocks."""
    twin = copy.deepcopy(reset_model)
    stages = []
    for stage in twin.stages:
        if isinstance(stage, ReSet):
            width = stage.units[0].channels
            stage = ResidualSequence([BasicBlock(width) for _ in range(blocks)])
        stages.append(stage)
    twin.stages = nn.ModuleList(stages)
    return twin.to(next(reset_model.parameters()).device)


class SubBatchedSequence(nn.Module):
    """A plain residual stage whose block ``i`` runs on consecutive chunks of the batch (``sizes[i]``).

    The control for (a): the same convolutions on the same sub-batch sizes as the hard
    model, without routing (no controller, no gather, no index_add; each chunk updated in place).
    ``hard / plain`` minus ``subbatched / plain`` is what the dispatch costs; the rest is
    the per-sample cost of small convolutions, which any per-sample routing pays.
    """

    def __init__(self, blocks: nn.ModuleList, sizes: list[list[int]]) -> None:
        super().__init__()
        self.blocks, self.sizes = blocks, sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inference only. One copy of the input, as ReSet's first iteration makes, then each
        # chunk (a contiguous slice of x) is updated in place by its block's output.
        x = x.clone(memory_format=torch.preserve_format)
        for block, sizes in zip(self.blocks, self.sizes):
            for chunk in x.split(sizes):
                chunk.add_(block(chunk))
        return x


def subbatched_twin(twin: nn.Module, routed: nn.Module) -> nn.Module:
    """``twin`` (from :func:`plain_twin`) with block j of each stage run on the sub-batch sizes of iteration j of ``routed``."""
    twin = copy.deepcopy(twin)
    modules = iter(routed.reset_modules())
    stages = []
    for stage in twin.stages:
        if isinstance(stage, ResidualSequence):
            m = next(modules)
            forced = m.controller.forced.argmax(-1)  # (iterations, B) unit of each sample
            sizes = [[s for s in torch.bincount(forced[j], minlength=len(m.units))[: len(m.units)].tolist() if s] for j in range(m.iterations)]
            stage = SubBatchedSequence(stage.blocks, sizes)
        stages.append(stage)
    twin.stages = nn.ModuleList(stages)
    return twin


# ---------------------------------------------------------------------- timing
class Bench:
    def __init__(self, device: torch.device, timer: str, amp: bool, channels_last: bool, compile_: bool, inner: int) -> None:
        self.device, self.amp, self.channels_last, self.compile, self.inner = device, amp, channels_last, compile_, inner
        self.clock = time.process_time if timer == "cpu" else time.perf_counter

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def images(self, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 3, 32, 32, generator=g).to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, torch.randint(0, 10, (batch,), generator=g).to(self.device)

    def maybe_compile(self, fn: Callable) -> Callable:
        return torch.compile(fn) if self.compile else fn

    def train_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
        model.train()
        forward = self.maybe_compile(model)

        def step() -> None:
            with self.autocast():
                out = forward(x)
            F.cross_entropy(out.float(), y).backward()
            for p in model.parameters():
                p.grad = None

        return step

    def infer(self, model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
        model.eval()
        forward = self.maybe_compile(model)

        def run() -> None:
            with torch.inference_mode(), self.autocast():
                forward(x)

        return run

    def time(self, fns: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, list[float]]:
        """Seconds per call of each fn; the fns are interleaved (rotating order) in every repeat."""
        names = list(fns)
        for _ in range(warmup):
            for name in names:
                fns[name]()
        self.sync()
        times: dict[str, list[float]] = {name: [] for name in names}
        for rep in range(repeats):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                self.sync()
                t0 = self.clock()
                for _ in range(self.inner):
                    fns[name]()
                self.sync()
                times[name].append((self.clock() - t0) / self.inner)
        return times


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def med(values: list[float]) -> float:
    return statistics.median(values)


# ----------------------------------------------------------------- experiments
def hard_models(bench: Bench, batch: int) -> tuple[nn.Module, nn.Module, nn.Module, torch.Tensor]:
    """The (a) models at ``batch``: hard reset38 (forced spread routing), its plain twin, the sub-batched twin, and x."""
    torch.manual_seed(0)
    reset = bench.prepare(resetnet.create_model("reset38", scorer="gumbel_st"))
    twin = bench.prepare(plain_twin(reset))
    x, _ = bench.images(batch)
    hard = force_routing(reset, batch, 0.0, seed=1, spread="random")
    assert all(r.resolve_execution() == "sparse" for r in hard.eval().reset_modules())
    return hard, twin, subbatched_twin(twin, hard), x


def hard_ratios(t: dict[str, list[float]]) -> dict[str, float]:
    """The ratios of (a) that need only the hard model, the plain twin and the sub-batched twin."""
    return {
        "hard_vs_resnet_ratio": paired_ratio(t, "hard_sparse", "resnet_5x3"),
        "subbatched_vs_resnet_ratio": paired_ratio(t, "resnet_5x3_subbatched", "resnet_5x3"),
        "hard_vs_subbatched_ratio": paired_ratio(t, "hard_sparse", "resnet_5x3_subbatched"),
    }


def exp_hard(bench: Bench, batch: int, repeats: int, warmup: int) -> dict:
    """(a) hard-routed reset38 (sparse) vs the 5-blocks-per-stage plain twin, eval mode."""
    spread, twin, subbatched, x = hard_models(bench, batch)
    single = force_routing(copy.deepcopy(spread), batch, 0.0, seed=1, spread="single")
    naive = copy.deepcopy(spread)
    set_execution(naive, "naive")
    fns = {
        "resnet_5x3": bench.infer(twin, x),
        "hard_sparse": bench.infer(spread, x),
        "hard_sparse_single_unit": bench.infer(single, x),
        "hard_naive": bench.infer(naive, x),
        "resnet_5x3_subbatched": bench.infer(subbatched, x),
    }
    t = bench.time(fns, repeats, warmup)
    with torch.inference_mode(), bench.autocast():
        x_small = x[: min(batch, 64)]
        macs_hard = macs_per_image(spread.eval(), x_small).mean().item()
        macs_twin = macs_per_image(twin.eval(), x_small).mean().item()
    return {
        **hard_ratios(t),
        "hard_single_unit_vs_resnet_ratio": paired_ratio(t, "hard_sparse_single_unit", "resnet_5x3"),
        "hard_naive_vs_sparse_ratio": paired_ratio(t, "hard_naive", "hard_sparse"),
        "hard_vs_resnet_macs_ratio": macs_hard / macs_twin,
        "hard_ms": {k: 1e3 * med(v) for k, v in t.items()},
        "hard_batch": batch,
    }


def exp_hard_by_batch(bench: Bench, batches: list[int], repeats: int, warmup: int) -> list[dict]:
    """(a) across batch sizes: the hard model, the plain twin and the sub-batched twin at each batch.

    Some of the overhead is paid per iteration (controller calls, routing read), some per
    sample (gather, ``index_add_``, pooling), and convolution speed per image depends on
    the batch, so the ratio is measured at several batches rather than inferred from one.
    """
    rows = []
    for batch in batches:
        hard, twin, subbatched, x = hard_models(bench, batch)
        t = bench.time(
            {"resnet_5x3": bench.infer(twin, x), "hard_sparse": bench.infer(hard, x), "resnet_5x3_subbatched": bench.infer(subbatched, x)},
            repeats,
            warmup,
        )
        rows.append({"batch": batch, **hard_ratios(t), "ms": {k: 1e3 * med(v) for k, v in t.items()}})
        del hard, twin, subbatched, x
    return rows


def exp_zero_share(bench: Bench, batch: int, repeats: int, warmup: int) -> list[dict]:
    """(b) time and MACs vs the zero-unit share (sparse dispatch, eval mode)."""
    torch.manual_seed(0)
    base = bench.prepare(resetnet.create_model("reset38", scorer="gumbel_st"))
    x, _ = bench.images(batch)
    models = {s: force_routing(copy.deepcopy(base), batch, s, seed=2) for s in SHARES}
    t = bench.time({f"share{s}": bench.infer(m, x) for s, m in models.items()}, repeats, warmup)
    macs = {}
    with torch.inference_mode(), bench.autocast():
        for s, m in models.items():
            macs[s] = macs_per_image(m.eval(), x).mean().item()
    rows = []
    for s in SHARES:
        macs_ratio = macs[s] / macs[0.0]
        time_ratio = paired_ratio(t, f"share{s}", "share0.0")
        eff = (1 - time_ratio) / (1 - macs_ratio) if s > 0 else None
        rows.append(
            {
                "share": s,
                "macs_ratio": macs_ratio,
                "time_ratio": time_ratio,
                "efficiency": eff,
                "macs_per_image": macs[s],
                "ms": 1e3 * med(t[f"share{s}"]),
            }
        )
    return rows


def exp_train(bench: Bench, batch: int, repeats: int, warmup: int) -> dict:
    """(c) naive vs fused reset38 softmax train step; (d) reset38 (auto) vs resnet38 train step."""
    torch.manual_seed(0)
    reset = bench.prepare(resetnet.create_model("reset38", scorer="softmax"))
    naive = copy.deepcopy(reset)
    set_execution(naive, "naive")
    assert all(r.resolve_execution() == "fused" for r in reset.reset_modules())
    resnet = bench.prepare(resetnet.create_model("resnet38"))
    x, y = bench.images(batch)
    with torch.inference_mode(), bench.autocast():  # MACs per image (eval mode; the dense softmax pool runs every unit)
        macs_reset = macs_per_image(reset.eval(), x[:8]).mean().item()
        macs_resnet = macs_per_image(resnet.eval(), x[:8]).mean().item()
    t = bench.time(
        {"naive": bench.train_step(naive, x, y), "fused": bench.train_step(reset, x, y), "resnet38": bench.train_step(resnet, x, y)}, repeats, warmup
    )
    return {
        "fused_vs_naive_ratio": paired_ratio(t, "naive", "fused"),
        "reset_vs_resnet_train_ratio": paired_ratio(t, "fused", "resnet38"),
        "reset_vs_resnet_macs_ratio": macs_reset / macs_resnet,
        "train_ms": {k: 1e3 * med(v) for k, v in t.items()},
        "train_batch": batch,
    }


def exp_throughput(bench: Bench, batches: list[int], train_batches: list[int], repeats: int, warmup: int) -> dict:
    """(e) images/s, train step and inference."""
    torch.manual_seed(0)
    resnet = bench.prepare(resetnet.create_model("resnet38"))
    reset = bench.prepare(resetnet.create_model("reset38", scorer="softmax"))
    hard = bench.prepare(resetnet.create_model("reset38", scorer="gumbel_st"))
    out: dict = {"inference": {}, "train": {}}
    for batch in batches:
        x, y = bench.images(batch)
        hard_b = force_routing(copy.deepcopy(hard), batch, 0.0, seed=3)
        t = bench.time(
            {"resnet38": bench.infer(resnet, x), "reset38_softmax_fused": bench.infer(reset, x), "reset38_hard_sparse": bench.infer(hard_b, x)},
            repeats,
            warmup,
        )
        out["inference"][str(batch)] = {k: batch / med(v) for k, v in t.items()}
        if batch in train_batches:
            t = bench.time({"resnet38": bench.train_step(resnet, x, y), "reset38_softmax_fused": bench.train_step(reset, x, y)}, repeats, warmup)
            out["train"][str(batch)] = {k: batch / med(v) for k, v in t.items()}
        else:
            out["train"][str(batch)] = "skipped"
    return out


def tune_allocator() -> str:
    """Keep freed activation buffers in the process (glibc): no page faults on every large allocation.

    glibc's malloc serves large blocks with mmap and returns them to the OS on free, with a
    threshold that adapts to the allocation history, so whether a model pays page faults for
    its activations (a large and, in a VM, very variable cost) depends on what ran before.
    A fixed 32 MiB mmap threshold and a 1 GiB trim threshold make CPU timings reproducible
    (the same effect as jemalloc/tcmalloc, which PyTorch's CPU tuning guides recommend).
    32 MiB is glibc's largest threshold, and a batch-512 activation of the first stage
    (512 x 16 x 32 x 32 floats) is larger, so mmap is also switched off (M_MMAP_MAX = 0):
    otherwise every such tensor is mapped and faulted in again, which a full-batch plain
    net pays and a sub-batched model does not.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4
        ok = (
            libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024) == 1
            and libc.mallopt(m_trim_threshold, 1 << 30) == 1
            and libc.mallopt(m_mmap_max, 0) == 1
        )
        return "glibc mallopt: mmap threshold 32 MiB, trim threshold 1 GiB, mmap off" if ok else "default (mallopt failed)"
    except (OSError, AttributeError):
        return "default (not glibc)"


# ----------------------------------------------------------------------- report
def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown(result: dict) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [
        f"Device: {result['device_name']} | torch {result['torch']} | {result['date']} | timer: {result['timer']} | "
        f"allocator: {result['host_allocator']}",
        "",
        "| figure | value | target |",
        "| --- | --- | --- |",
    ]
    if "hard_vs_resnet_ratio" in result:
        b = result["hard_batch"]
        lines.append(
            f"| (a) hard reset38 / plain 5-5-5, inference, batch {b} | {fmt(result['hard_vs_resnet_ratio'])} | {TARGETS['hard_vs_resnet_ratio']} |"
        )
        lines.append(f"| (a) same, every sample on one unit per iteration | {fmt(result['hard_single_unit_vs_resnet_ratio'])} | - |")
        lines.append(
            f"| (a) plain 5-5-5 on the hard model's sub-batches / plain 5-5-5 (small-batch conv cost) | {fmt(result['subbatched_vs_resnet_ratio'])} | - |"
        )
        lines.append(
            f"| (a) hard reset38 / plain 5-5-5 on the same sub-batches (dispatch + controller cost) | {fmt(result['hard_vs_subbatched_ratio'])} | - |"
        )
        lines.append(f"| (a) naive / sparse, same hard model | {fmt(result['hard_naive_vs_sparse_ratio'])} | - |")
        lines.append(f"| (a) MACs, hard reset38 / plain 5-5-5 | {fmt(result['hard_vs_resnet_macs_ratio'])} | - |")
    if "fused_vs_naive_ratio" in result:
        b = result["train_batch"]
        lines.append(
            f"| (c) naive / fused, reset38 softmax train step, batch {b} | {fmt(result['fused_vs_naive_ratio'])} | {TARGETS['fused_vs_naive_ratio']} |"
        )
        lines.append(
            f"| (d) reset38 softmax / resnet38, train step, batch {b} | {fmt(result['reset_vs_resnet_train_ratio'])} | {TARGETS['reset_vs_resnet_train_ratio']} |"
        )
        lines.append(f"| (d) MACs, reset38 softmax / resnet38 | {fmt(result['reset_vs_resnet_macs_ratio'])} | - |")
    if "zero_share_sweep" in result:
        lines += [
            "",
            f"(b) zero-unit share sweep (inference, batch {result['sweep_batch']}):",
            "",
            "| share | MACs ratio | time ratio | efficiency (target >= 0.8) |",
            "| --- | --- | --- | --- |",
        ]
        for row in result["zero_share_sweep"]:
            eff = fmt(row["efficiency"]) if row["efficiency"] is not None else "-"
            lines.append(f"| {row['share']} | {row['macs_ratio']:.3f} | {row['time_ratio']:.3f} | {eff} |")
    if "hard_by_batch" in result:
        lines += [
            "",
            "(a) across batch sizes (inference; hard = hard reset38, plain = plain 5-5-5, sub-batched = plain "
            "5-5-5 on the hard model's sub-batches):",
            "",
            "| batch | hard / plain (target <= 1.10) | sub-batched / plain | hard / sub-batched |",
            "| --- | --- | --- | --- |",
        ]
        for row in result["hard_by_batch"]:
            lines.append(
                f"| {row['batch']} | {row['hard_vs_resnet_ratio']:.3f} | {row['subbatched_vs_resnet_ratio']:.3f} | "
                f"{row['hard_vs_subbatched_ratio']:.3f} |"
            )
    if "throughput" in result:
        lines += [
            "",
            "(e) throughput, images/s:",
            "",
            "| mode | batch | resnet38 | reset38 softmax (fused) | reset38 hard (sparse) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for mode in ("inference", "train"):
            for batch, row in result["throughput"][mode].items():
                if isinstance(row, str):
                    lines.append(f"| {mode} | {batch} | {row} | {row} | {row} |")
                else:
                    hard = f"{row['reset38_hard_sparse']:.0f}" if "reset38_hard_sparse" in row else "-"
                    lines.append(f"| {mode} | {batch} | {row['resnet38']:.0f} | {row['reset38_softmax_fused']:.0f} | {hard} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, help="where to write the results (rewritten after every part)")
    p.add_argument("--report", type=Path, help="only print the Markdown table of an existing JSON (e.g. of a run cut short)")
    p.add_argument("--quick", action="store_true", help="fewer repeats, smaller batches (CPU: a few minutes)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument(
        "--timer",
        choices=["auto", "wall", "cpu"],
        default="auto",
        help="auto: wall clock on CUDA; on CPU the process CPU time with 1 thread, else wall clock",
    )
    p.add_argument("--batch", type=int, default=None, help="batch for (a)-(d) (default: 128; CPU --quick: 32 train, 64 inference)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument(
        "--parts",
        default="abcdes",
        help="which experiments to run (letters a-e and s; b = the zero-share sweep, c and d run together, s = (a) across batch sizes, run last)",
    )
    p.add_argument(
        "--hard-batches", default=None, help="comma-separated batch sizes for part s (default: 64,128,256,512,1024; CPU --quick: 64,128,256,512)"
    )
    p.add_argument(
        "--allocator",
        choices=["tuned", "default"],
        default="tuned",
        help="CPU: 'tuned' fixes glibc's malloc thresholds (reproducible timings, see tune_allocator)",
    )
    p.add_argument("--no-channels-last", action="store_true", help="CUDA: keep NCHW")
    p.add_argument("--no-amp", action="store_true", help="CUDA: float32 instead of bf16 autocast")
    p.add_argument(
        "--cuda-settings-on-cpu", action="store_true", help="CPU: bf16 autocast and channels_last as on CUDA (checks that code path without a GPU)"
    )
    args = p.parse_args(argv)
    if args.report:
        print(markdown(json.loads(args.report.read_text())))
        return 0
    if args.json is None:
        p.error("--json PATH is required (or --report PATH to print an existing result)")

    parts = set(args.parts.lower())
    if not parts or not parts <= set("abcdes"):
        p.error(f"--parts {args.parts!r}: use letters from 'abcdes' (a, b = the sweep, c and d run together, e, s = (a) across batch sizes)")
    hard_batches = None
    if args.hard_batches:
        try:
            hard_batches = [int(b) for b in args.hard_batches.split(",")]
        except ValueError:
            p.error(f"--hard-batches {args.hard_batches!r}: give comma-separated integers, e.g. 64,128,256")
        if any(b < 1 for b in hard_batches):
            p.error(f"--hard-batches {args.hard_batches!r}: batch sizes must be >= 1")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cuda = device.type == "cuda"
    allocator = tune_allocator() if not cuda and args.allocator == "tuned" else "default"
    timer = args.timer if args.timer != "auto" else ("wall" if cuda or threads > 1 else "cpu")
    like_cuda = cuda or args.cuda_settings_on_cpu
    bench = Bench(
        device,
        timer,
        amp=like_cuda and not args.no_amp,
        channels_last=like_cuda and not args.no_channels_last,
        compile_=args.compile,
        inner=5 if cuda else 1,
    )
    if args.compile:
        # Several models share ReSet.forward's code object; with the default limit (8) dynamo
        # silently falls back to eager for the later ones, which would then be timed uncompiled.
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    if cuda:
        torch.backends.cudnn.benchmark = True
        repeats = args.repeats or (10 if args.quick else 20)
        warmup = 5 if args.compile else 3
        infer_batch = train_batch = args.batch or 128
        tp_batches, tp_train = [128, 1024], [128, 1024]
    else:
        repeats = args.repeats or (5 if args.quick else 9)
        warmup = 1
        infer_batch = args.batch or (64 if args.quick else 128)
        train_batch = args.batch or (32 if args.quick else 128)
        tp_batches = [128, 1024]
        tp_train = [128] if args.quick else [128, 1024]
    tp_repeats = max(3, repeats // 3) if not cuda else repeats
    hard_batches = hard_batches or ([64, 128, 256, 512] if args.quick and not cuda else [64, 128, 256, 512, 1024])
    started = time.perf_counter()
    result: dict = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_model(),
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": threads,
            "python": sys.version.split()[0],
        },
        "torch": torch.__version__,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "timer": "process CPU time" if timer == "cpu" else "wall clock",
        "host_allocator": allocator,
        "repeats": repeats,
        "warmup": warmup,
        "calls_per_timing": bench.inner,
        "throughput_repeats": tp_repeats,
        "amp": "bf16 autocast" if bench.amp else "float32",
        "channels_last": bench.channels_last,
        "compile": args.compile,
        "quick": args.quick,
        "statistic": "median over repeats of the per-repeat ratio (calls interleaved); times are medians",
        "targets": TARGETS,
    }
    print(f"[routing] {result['device_name']}, torch {torch.__version__}, {threads} threads, timer {result['timer']}", flush=True)
    result["parts"] = "".join(sorted(parts))
    result["parts_done"] = ""

    def save(part: str) -> None:
        """Write the JSON after every part (atomically), so a run cut short by a time limit keeps what it measured."""
        result["parts_done"] += part
        result["wall_seconds"] = time.perf_counter() - started
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, args.json)
        print(f"[routing] ({part}) done {result['wall_seconds']:.0f}s, saved {args.json}", flush=True)

    if "a" in parts:
        result.update(exp_hard(bench, infer_batch, repeats, warmup))
        save("a")
    if "b" in parts:
        result["zero_share_sweep"] = exp_zero_share(bench, infer_batch, repeats, warmup)
        result["sweep_batch"] = infer_batch
        save("b")
    if parts & {"c", "d"}:
        result.update(exp_train(bench, train_batch, repeats, warmup))
        save("cd")
    if "e" in parts:
        result["throughput"] = exp_throughput(bench, tp_batches, tp_train, tp_repeats, warmup)
        skipped = [b for b in tp_batches if b not in tp_train]
        note = f"train step at batch {skipped} skipped ({'--quick, ' if args.quick else ''}CPU); " if skipped else ""
        result["throughput_notes"] = f"{note}{tp_repeats} repeats"
        save("e")
    if "s" in parts:
        result["hard_by_batch"] = exp_hard_by_batch(bench, hard_batches, repeats, warmup)
        save("s")
    print(markdown(result))
    print(f"[routing] wrote {args.json} in {result['wall_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

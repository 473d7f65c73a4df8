"""Images/s of data-parallel training on gloo/CPU: 1 vs 2 processes, find_unused_parameters vs the
zero-contribution trick, global vs per-rank entropy marginal.

Each configuration runs in freshly spawned processes (torchrun's environment variables, one
intra-op thread per process unless stated), on synthetic 32x32 images through the
device-resident loader, with the training loss of the trainer (cross-entropy + entropy
regularizer). Configurations are measured in interleaved rounds so that drifting machine
load affects them alike; the median over rounds is reported.

    python benchmarks/bench_distributed.py [--steps 15] [--rounds 3] [--json out.json]
    python benchmarks/bench_distributed.py --paired     # overheads, variants interleaved step by step
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

CONFIGS = [
    # name, scorer, world, threads per process, find_unused, zero_contribution, global_marginal
    ("dense 1 proc x 1 thread", "softmax", 1, 1, None, False, True),
    ("dense 1 proc x 2 threads", "softmax", 1, 2, None, False, True),
    ("dense 2 procs (DDP)", "softmax", 2, 1, False, False, True),
    ("dense 2 procs, find_unused=True", "softmax", 2, 1, True, False, True),
    ("dense 2 procs, zero contribution", "softmax", 2, 1, False, True, True),
    ("dense 2 procs, per-rank marginal", "softmax", 2, 1, False, False, False),
    ("sparse 1 proc x 1 thread", "gumbel_st", 1, 1, None, False, True),
    ("sparse 1 proc x 2 threads", "gumbel_st", 1, 2, None, False, True),
    ("sparse 2 procs, find_unused=True", "gumbel_st", 2, 1, True, False, True),
    ("sparse 2 procs, zero contribution", "gumbel_st", 2, 1, False, True, True),
]


def synthetic_cifar(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n random CIFAR-shaped uint8 images and labels (seeded): timing needs no real data."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, cfg: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(cfg["threads"])
    import resetnet
    from resetnet.data import DeviceLoader
    from resetnet.losses import entropy_regularizer
    from resetnet.train import distributed as D

    ctx = D.init_distributed(timeout_s=120, device="cpu")
    try:
        images, labels = synthetic_cifar(cfg["batch"] * 8)
        torch.manual_seed(0)
        model = resetnet.create_model(cfg["model"], scorer=cfg["scorer"]).train()
        ddp = D.wrap_model(model, ctx, find_unused=cfg["find_unused"])
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        loader = DeviceLoader(images, labels, cfg["batch"], train=True, rank=ctx.rank, world_size=ctx.world_size)
        reduce = D.global_marginal_reduce(ctx) if cfg["global_marginal"] else None
        times = []
        batches = loader.batches()
        for i in range(cfg["warmup"] + cfg["steps"]):
            D.barrier()
            t0 = time.perf_counter()
            _, _, x, y = next(batches)
            logits, routing = ddp(x, return_routing=True)
            loss = F.cross_entropy(logits, y) + entropy_regularizer(routing, 0.1, 0.05, marginal_reduce=reduce)
            if cfg["zero"]:
                loss = loss + D.zero_contribution(ddp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i >= cfg["warmup"]:
                times.append(time.perf_counter() - t0)
        if ctx.is_main:
            Path(out).write_text(json.dumps({"step_s": times}))
    finally:
        D.cleanup()


PAIRED = {
    # variants trained side by side in the same 2 processes, one step each in turn
    "softmax": [
        ("find_unused=False", False, False, True),
        ("find_unused=True", True, False, True),
        ("zero contribution", False, True, True),
        ("per-rank marginal", False, False, False),
    ],
    "gumbel_st": [
        ("find_unused=True", True, False, True),
        ("zero contribution", False, True, True),
        ("find_unused=True, per-rank marginal", True, False, False),
    ],
}


def _paired_worker(rank: int, world: int, port: int, out: str, cfg: dict) -> None:
    """Several DDP variants of one model in the same processes, stepped in turn (paired timing)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import resetnet
    from resetnet.data import DeviceLoader
    from resetnet.losses import entropy_regularizer
    from resetnet.train import distributed as D

    ctx = D.init_distributed(timeout_s=120, device="cpu")
    try:
        images, labels = synthetic_cifar(cfg["batch"] * 8)
        variants = []
        for name, fu, zero, gm in PAIRED[cfg["scorer"]]:
            torch.manual_seed(0)
            model = resetnet.create_model(cfg["model"], scorer=cfg["scorer"]).train()
            ddp = D.wrap_model(model, ctx, find_unused=fu)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
            loader = DeviceLoader(images, labels, cfg["batch"], train=True, rank=ctx.rank, world_size=ctx.world_size)
            variants.append((name, ddp, opt, loader.batches(), zero, D.global_marginal_reduce(ctx) if gm else None))
        times: dict[str, list[float]] = {v[0]: [] for v in variants}
        for i in range(cfg["warmup"] + cfg["steps"]):
            for name, ddp, opt, batches, zero, reduce in variants:
                D.barrier()
                t0 = time.perf_counter()
                _, _, x, y = next(batches)
                logits, routing = ddp(x, return_routing=True)
                loss = F.cross_entropy(logits, y) + entropy_regularizer(routing, 0.1, 0.05, marginal_reduce=reduce)
                loss = loss + (D.zero_contribution(ddp) if zero else D.routing_anchor(routing))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if i >= cfg["warmup"]:
                    times[name].append(time.perf_counter() - t0)
        if ctx.is_main:
            Path(out).write_text(json.dumps(times))
    finally:
        D.cleanup()


def run_paired(cfg: dict) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "r.json")
        mp.start_processes(_paired_worker, args=(2, _free_port(), out, cfg), nprocs=2, start_method="spawn")
        times = json.loads(Path(out).read_text())
    return {k: statistics.median(v) for k, v in times.items()}


def run_config(cfg: dict) -> float:
    """Median images/s (global batch / step time) of one spawned run."""
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "r.json")
        mp.start_processes(_worker, args=(cfg["world"], _free_port(), out, cfg), nprocs=cfg["world"], start_method="spawn")
        step_s = json.loads(Path(out).read_text())["step_s"]
    return cfg["batch"] / statistics.median(step_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="reset_t3_2cu3it")
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default="", help="run only configurations whose name contains this")
    p.add_argument("--json", default=None)
    p.add_argument("--paired", action="store_true", help="instead: DDP variants interleaved step by step in one 2-process job")
    a = p.parse_args(argv)
    if a.paired:
        print(
            f"\n{a.model}, global batch {a.batch}, 2 gloo processes x 1 thread, variants stepped in turn, "
            f"{a.steps} timed steps each after {a.warmup} warm-up; median step time (ms), per round\n"
        )
        print("| model | variant | " + " | ".join(f"round {r}" for r in range(a.rounds)) + " |")
        print("| --- | --- | " + " | ".join("---:" for _ in range(a.rounds)) + " |")
        for scorer in PAIRED:
            rounds = [run_paired(dict(model=a.model, batch=a.batch, steps=a.steps, warmup=a.warmup, scorer=scorer)) for _ in range(a.rounds)]
            for name in rounds[0]:
                print(f"| {scorer} | {name} | " + " | ".join(f"{r[name] * 1e3:.1f}" for r in rounds) + " |", flush=True)
        return 0
    configs = [c for c in CONFIGS if a.only in c[0]]
    results: dict[str, list[float]] = {c[0]: [] for c in configs}
    for r in range(a.rounds):
        for name, scorer, world, threads, fu, zero, gm in configs:
            cfg = dict(
                model=a.model,
                batch=a.batch,
                steps=a.steps,
                warmup=a.warmup,
                scorer=scorer,
                world=world,
                threads=threads,
                find_unused=fu,
                zero=zero,
                global_marginal=gm,
            )
            ips = run_config(cfg)
            results[name].append(ips)
            print(f"round {r}: {name:40s} {ips:8.1f} img/s", file=sys.stderr, flush=True)
    print(f"\n{a.model}, global batch {a.batch}, {a.steps} timed steps after {a.warmup} warm-up, median of {a.rounds} rounds (min-max)\n")
    print("| configuration | images/s | range |")
    print("| --- | ---: | ---: |")
    for name, vals in results.items():
        print(f"| {name} | {statistics.median(vals):.0f} | {min(vals):.0f}-{max(vals):.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Distributed data-parallel training (resetnet.train.distributed): 2 gloo processes on 127.0.0.1.

Every multi-process test starts its ranks with the ``spawn`` start method, each rank
joins the process group through the same environment variables torchrun sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), and the
parent kills the ranks and fails the test if they do not finish within ``JOIN_TIMEOUT_S``
(the process group's own collective timeout, ``DIST_TIMEOUT_S``, is shorter, so a
deadlock surfaces as an error in the ranks first). The single-process reference runs
the same worker function in the test process with a single-process context.
``test_torchrun_cli`` launches the real command line with ``torchrun --standalone``.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import resetnet
from resetnet.data import DeviceLoader
from resetnet.losses import entropy_regularizer, entropy_terms
from resetnet.nn import BasicBlock, ReSet
from resetnet.train import distributed as D

WORLD = 2
DIST_TIMEOUT_S = 30
JOIN_TIMEOUT_S = 55
BIG = 1000.0  # a logit margin no Gumbel noise overcomes: gumbel_st then picks a fixed unit


# --------------------------------------------------------------------------- harness
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(worker, rank: int, world: int, port: int, out: str, kwargs: dict, timeout_s: float) -> None:
    """Body of a spawned rank: torchrun's environment, init, run ``worker(ctx, **kwargs)``, save."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    code = 0
    try:
        ctx = D.init_distributed(timeout_s=timeout_s, device="cpu")
        result = worker(ctx, **kwargs)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    except BaseException:  # noqa: BLE001 - reported to the parent through a file
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        code = 1
    finally:
        D.cleanup()
    os._exit(code)  # skip interpreter teardown (fast, and no atexit surprises in the child)


def run_ranks(worker, tmp_path: Path, world: int = WORLD, timeout_s: float = DIST_TIMEOUT_S, **kwargs) -> list:
    """Run ``worker(ctx, **kwargs)`` on ``world`` gloo ranks; return each rank's result."""
    mpc = mp.get_context("spawn")
    port = _free_port()
    out = tmp_path / f"ranks_{worker.__name__}_{port}"
    out.mkdir()
    procs = [mpc.Process(target=_rank_entry, args=(worker, r, world, port, str(out), kwargs, timeout_s), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    errors = {r: (out / f"rank{r}.err").read_text() for r in range(world) if (out / f"rank{r}.err").exists()}
    if errors:
        pytest.fail("rank(s) failed:\n" + "\n".join(f"--- rank {r}\n{e}" for r, e in errors.items()))
    if hung:
        pytest.fail(f"rank(s) {hung} still running after {JOIN_TIMEOUT_S} s (hang); killed")
    bad = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode != 0}
    if bad:
        pytest.fail(f"rank(s) exited abnormally: {bad}")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _assert_state_close(a: dict, b: dict, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), k


def _params(state: dict) -> dict:
    """The parameter entries of a TinySparseNet state dict (BN buffers excluded)."""
    return {k: v for k, v in state.items() if "running" not in k and "num_batches" not in k}


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in D.unwrap(model).state_dict().items()}


# --------------------------------------------------------------------------- workers
def _synthetic(n: int = 32, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, 10, n)


def _freeze_bn(model: nn.Module) -> None:
    """BatchNorm in eval mode: running statistics, per-sample (no batch statistics in the forward)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def dense_parity_worker(ctx: D.DistContext, steps: int = 3, batch: int = 8) -> dict:
    """Train reset_t3_2cu3it (softmax scorer) a few SGD steps, with and without the global marginal."""
    images, labels = _synthetic()
    results = {}
    for mode in ("global", "per_rank"):
        torch.manual_seed(0)
        model = resetnet.create_model("reset_t3_2cu3it", scorer="softmax").to(ctx.device)
        model.train()
        _freeze_bn(model)  # per-rank BN batch statistics would differ from the global batch's (see docs)
        ddp = D.wrap_model(model, ctx)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        loader = DeviceLoader(images, labels, batch, train=True, seed=1, rank=ctx.rank, world_size=ctx.world_size)
        reduce = D.global_marginal_reduce(ctx) if mode == "global" else None
        losses = []
        for step, _, x, y in loader.batches():
            if step == steps:
                break
            logits, routing = ddp(x, return_routing=True)
            loss = F.cross_entropy(logits, y) + entropy_regularizer(routing, 0.5, 0.1, marginal_reduce=reduce)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        results[mode] = {"state": _cpu_state(ddp), "losses": losses}
    return results


class SignController(nn.Module):
    """Routes every sample by the sign of its mean input at the first iteration: > 0 to unit 0, else
    to ``negative_choice`` (unit 1, or 2: the zero unit).

    The decision is the controller state (taken once per module call), so it holds at every
    iteration; the learnable ``bias`` is small next to ``BIG`` and only gives the controller a
    parameter with a (straight-through) gradient.
    """

    def __init__(self, num_outputs: int = 3, negative_choice: int = 1) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_outputs))
        self.num_outputs = num_outputs
        self.negative_choice = negative_choice

    def initial_state(self, x: torch.Tensor) -> torch.Tensor:
        return (x.mean(dim=(1, 2, 3)) <= 0).long() * self.negative_choice

    def forward(self, x: torch.Tensor, iteration: int, state: torch.Tensor):
        logits = F.one_hot(state, self.num_outputs).to(x.dtype) * BIG + self.bias
        return logits, state


class TinySparseNet(nn.Module):
    """A ReSet module (2 BasicBlock units with per-iteration BN, gumbel_st) and a linear head."""

    def __init__(self, channels: int = 4, iterations: int = 2, classes: int = 3, negative_choice: int = 1) -> None:
        super().__init__()
        self.reset = ReSet(
            [BasicBlock(channels, bn_iterations=iterations) for _ in range(2)],
            iterations,
            controller=SignController(3, negative_choice),
            scorer="gumbel_st",
            channels=channels,
            train_execution="sparse",
        )
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor, return_routing: bool = False):
        x, routing = self.reset(x, return_routing=True)
        logits = self.fc(x.mean(dim=(2, 3)))
        return (logits, [routing]) if return_routing else logits


def _sparse_batch(batch: int = 8, channels: int = 4, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Global batch whose first half has positive mean (unit 0) and second half negative (unit 1)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, channels, size, size, generator=g).abs() + 0.1
    x[batch // 2 :] *= -1
    return x, torch.randint(0, 3, (batch,), generator=g)


def sparse_unused_worker(ctx: D.DistContext, steps: int = 3) -> dict:
    """Sparse routing where rank 0 never calls unit 1 and rank 1 never calls unit 0."""
    xg, yg = _sparse_batch()
    x, y = xg.tensor_split(ctx.world_size)[ctx.rank], yg.tensor_split(ctx.world_size)[ctx.rank]
    results = {}
    for strategy in ("find_unused", "zero_contribution"):
        torch.manual_seed(0)
        model = TinySparseNet().to(ctx.device).train()
        calls = [0, 0]
        for r, unit in enumerate(model.reset.units):
            unit.register_forward_hook(lambda *_, r=r: calls.__setitem__(r, calls[r] + 1))
        ddp = D.wrap_model(model, ctx, find_unused=None if strategy == "find_unused" else False)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        finite = True
        for _ in range(steps):
            logits, routing = ddp(x, return_routing=True)
            loss = F.cross_entropy(logits, y) + entropy_regularizer(routing, 0.1, 0.1)
            if strategy == "zero_contribution":
                loss = loss + D.zero_contribution(ddp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in model.parameters()]
            finite &= all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
            opt.step()
        results[strategy] = {
            "state": _cpu_state(ddp),
            "calls": list(calls),
            "finite": finite,
            "find_unused": bool(getattr(ddp, "find_unused_parameters", False)),
        }
    return results


def all_skip_worker(ctx: D.DistContext, steps: int = 2) -> dict:
    """Rank 1 sends every sample to the zero unit; the routing is returned but not in the loss
    (as at a routing-log step): the controller is reachable from DDP's outputs but not from
    the loss on rank 1. routing_anchor keeps DDP from waiting for its gradient."""
    xg, yg = _sparse_batch()
    x, y = xg.tensor_split(ctx.world_size)[ctx.rank], yg.tensor_split(ctx.world_size)[ctx.rank]
    torch.manual_seed(0)
    model = TinySparseNet(negative_choice=2).to(ctx.device).train()
    ddp = D.wrap_model(model, ctx)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    skips = []
    for _ in range(steps):
        logits, routing = ddp(x, return_routing=True)
        skips.append(float(routing[0].skip_mask().float().mean()))
        loss = F.cross_entropy(logits, y) + D.routing_anchor(routing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    no_grad = sorted(n for n, p in model.named_parameters() if p.grad is None)
    return {"state": _cpu_state(ddp), "skips": skips, "no_grad": no_grad}


def _routing_weights(batch: int = 8, iterations: int = 3, outputs: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.softmax(torch.randn(batch, iterations, outputs, generator=g) * 2, -1) for _ in range(2)]


def marginal_worker(ctx: D.DistContext, lam_b: float = 0.7, lam_s: float = 0.3) -> dict:
    """Entropy regularizer value and gradient on this rank's chunk, global vs per-rank marginal."""
    out = {}
    for mode, reduce in (("global", D.global_marginal_reduce(ctx)), ("per_rank", None)):
        ws = [w.tensor_split(ctx.world_size)[ctx.rank].clone().requires_grad_(True) for w in _routing_weights()]
        h_batch, h_sample = entropy_terms(ws, marginal_reduce=reduce)
        value = entropy_regularizer(ws, lam_b, lam_s, marginal_reduce=reduce)
        value.backward()
        out[mode] = {"value": value.detach(), "h_batch": h_batch.detach(), "h_sample": h_sample.detach(), "grads": [w.grad for w in ws]}
    return out


# --------------------------------------------------------------------------- tests: 2 processes
def test_dense_parity_two_ranks_equal_one_process(tmp_path):
    """2 ranks at global batch B reach the 1-process parameters at batch B (global marginal);
    the per-rank marginal gives a different (valid) model."""
    ranks = run_ranks(dense_parity_worker, tmp_path)
    ref = dense_parity_worker(D.DistContext())
    for r in ranks:
        _assert_state_close(r["global"]["state"], ref["global"]["state"])
    _assert_state_close(ranks[0]["global"]["state"], ranks[1]["global"]["state"], atol=0, rtol=0)
    # Per-rank marginals: the ranks agree with each other (DDP) but not with the global-batch run.
    _assert_state_close(ranks[0]["per_rank"]["state"], ranks[1]["per_rank"]["state"], atol=0, rtol=0)
    ctrl = [k for k in ref["per_rank"]["state"] if "controller" in k and k.endswith("weight")]
    assert ctrl
    diff = max(float((ranks[0]["per_rank"]["state"][k] - ref["per_rank"]["state"][k]).abs().max()) for k in ctrl)
    assert diff > 1e-6


def test_sparse_routing_unused_unit_per_rank(tmp_path):
    """gumbel_st with a unit unused on each rank: DDP completes, gradients are finite and the
    result equals the 1-process run (both with find_unused_parameters and the zero-contribution trick)."""
    ranks = run_ranks(sparse_unused_worker, tmp_path)
    ref = sparse_unused_worker(D.DistContext())
    steps, iterations = 3, 2
    for strategy in ("find_unused", "zero_contribution"):
        # rank 0 only ever ran unit 0, rank 1 only unit 1; the 1-process run used both.
        assert ranks[0][strategy]["calls"] == [steps * iterations, 0]
        assert ranks[1][strategy]["calls"] == [0, steps * iterations]
        assert ref[strategy]["calls"] == [steps * iterations] * 2
        for r in ranks:
            assert r[strategy]["finite"]
            _assert_state_close(_params(r[strategy]["state"]), _params(ref[strategy]["state"]))
        # BN running statistics: DDP broadcasts rank 0's buffers, so the checkpointed ones
        # are rank 0's: unit 0 (run on rank 0 with the same samples) matches the 1-process
        # run; unit 1 (never run on rank 0) keeps its initial statistics (see docs/distributed.md).
        state0, ref_state = ranks[0][strategy]["state"], ref[strategy]["state"]
        for k in state0:
            if k.startswith("reset.units.0.") and "running" in k:
                torch.testing.assert_close(state0[k], ref_state[k], atol=1e-5, rtol=1e-4)
            if k.startswith("reset.units.1.") and "running_mean" in k:
                assert not state0[k].any() and ref_state[k].any()
    assert ranks[0]["find_unused"]["find_unused"] and not ranks[0]["zero_contribution"]["find_unused"]


def test_sparse_routing_rank_that_skips_everything(tmp_path):
    ranks = run_ranks(all_skip_worker, tmp_path)
    ref = all_skip_worker(D.DistContext())
    assert ranks[1]["skips"] == [1.0, 1.0] and ranks[0]["skips"] == [0.0, 0.0]
    # unit 1 was chosen by no rank: grad None everywhere, as in one process; unit 0 (rank 0
    # only) got the averaged gradient on rank 1 too
    assert ranks[0]["no_grad"] == ranks[1]["no_grad"] == ref["no_grad"]
    assert ref["no_grad"] and all(n.startswith("reset.units.1.") for n in ref["no_grad"])
    for r in ranks:
        _assert_state_close(_params(r["state"]), _params(ref["state"]))


def eval_worker(ctx: D.DistContext, steps: int = 2, batch: int = 8, eval_batch: int = 10) -> dict:
    """Train a few DDP steps with BN in training mode (rank buffers diverge), then evaluate:
    sharded (every rank) and rank 0's model as a single process would."""
    from resetnet.train.evaluate import evaluate

    images, labels = _synthetic(n=32)
    test_x, test_y = _synthetic(n=23, seed=1)  # 23 images, eval batch 10: a partial last batch
    torch.manual_seed(0)
    model = resetnet.create_model("reset_t3_2cu3it", scorer="gumbel_st", train_execution="sparse").to(ctx.device).train()
    ddp = D.wrap_model(model, ctx)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    loader = DeviceLoader(images, labels, batch, train=True, seed=1, rank=ctx.rank, world_size=ctx.world_size)
    for step, _, x, y in loader.batches():
        if step == steps:
            break
        logits, routing = ddp(x, return_routing=True)
        loss = F.cross_entropy(logits, y) + entropy_regularizer(routing, 0.1, 0.1) + D.routing_anchor(routing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    test = DeviceLoader(test_x, test_y, eval_batch, train=False)
    local_before = evaluate(model, test)  # this rank's own buffers, unsynchronised
    res = D.evaluate_sharded(ddp, test, ctx)
    return {"sharded": res, "local_before": local_before, "state": _cpu_state(ddp), "training": model.training}


def test_sharded_evaluation_equals_single_process(tmp_path):
    """evaluate_sharded: every rank gets the single-process evaluation of rank 0's model (the one
    that is checkpointed), although the ranks' BN statistics had diverged during training."""
    from resetnet.train.evaluate import evaluate

    ranks = run_ranks(eval_worker, tmp_path)
    model = resetnet.create_model("reset_t3_2cu3it", scorer="gumbel_st", train_execution="sparse")
    model.load_state_dict(ranks[0]["state"])
    test_x, test_y = _synthetic(n=23, seed=1)
    ref = evaluate(model, DeviceLoader(test_x, test_y, 10, train=False))
    for r in ranks:
        res = r["sharded"]
        assert r["training"]  # the training mode is restored
        assert res["n"] == ref["n"] == 23
        assert res["acc"] == ref["acc"]
        assert np.array_equal(res["predictions"], ref["predictions"]) and np.array_equal(res["labels"], ref["labels"])
        assert np.array_equal(res["correct"], ref["correct"])
        assert res["per_class_acc"] == ref["per_class_acc"]
        assert res["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    # rank 1's own (unsynchronised) BN statistics give different logits: sync_buffers matters
    assert ranks[1]["local_before"]["loss"] != pytest.approx(ref["loss"], rel=1e-6)


def test_global_marginal_value_and_gradient(tmp_path):
    """Global marginal: on every rank the batch term H(mean y) is the 1-process term of the global
    batch; the rank values averaged (what DDP optimises) equal the 1-process value, and each rank's
    gradient / world_size (DDP averages gradients) equals the 1-process gradient of its chunk.
    Per-rank marginal: the batch terms, and hence the averaged value, differ."""
    ranks = run_ranks(marginal_worker, tmp_path)
    ws = [w.clone().requires_grad_(True) for w in _routing_weights()]
    h_batch, h_sample = (t.detach() for t in entropy_terms(ws))
    value = entropy_regularizer(ws, 0.7, 0.3)
    value.backward()
    value = value.detach()
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["global"]["h_batch"], h_batch.detach())
        for g_rank, w in zip(r["global"]["grads"], ws):
            torch.testing.assert_close(g_rank / WORLD, w.grad.tensor_split(WORLD)[rank])
        assert abs(float(r["per_rank"]["h_batch"]) - float(h_batch)) > 1e-3

    def mean(mode, key):
        return sum(float(r[mode][key]) for r in ranks) / WORLD

    assert mean("global", "value") == pytest.approx(float(value), abs=1e-5)
    assert mean("per_rank", "h_sample") == pytest.approx(float(h_sample), abs=1e-5)  # the sample term is a plain mean
    assert abs(mean("per_rank", "value") - float(value)) > 1e-3


def straggler_worker(ctx: D.DistContext, wait_s: float) -> tuple[float, str] | None:
    """Rank 0 enters an all-reduce that rank 1 never joins: the collective timeout must end it."""
    if ctx.rank == 0:
        start = time.monotonic()
        try:
            D.all_reduce_sum(torch.ones(1))
        except Exception as err:  # noqa: BLE001 - the error type differs between backends/versions
            return time.monotonic() - start, f"{type(err).__name__}: {err}"
        return None
    time.sleep(wait_s)
    return None


def test_collective_timeout_fails_instead_of_hanging(tmp_path):
    """init_distributed's timeout bounds every collective: a missing rank is an error, not a hang."""
    ranks = run_ranks(straggler_worker, tmp_path, timeout_s=2, wait_s=12)
    assert ranks[0] is not None, "the unmatched all-reduce returned"
    elapsed, message = ranks[0]
    assert elapsed < 12, message  # failed by the 2 s timeout, well before rank 1 even left
    assert ranks[1] is None


# --------------------------------------------------------------------------- trainer integration
def _train_cfg(**train) -> dict:
    return {
        "model": {"name": "reset_t3_2cu3it", "overrides": {"scorer": "gumbel_st", "train_execution": "sparse"}},
        "data": {"download": False, "verify": False},
        "optim": {"lr": 0.05, "schedule": {"kind": "constant"}},
        "train": {
            "batch_size": 8,
            "steps": 6,
            "eval_every": 3,
            "eval_batch_size": 10,
            "log_every": 1,
            "route_log_every": 2,
            "checkpoint_every": 0,
            "device": "cpu",
            "progress": False,
            "tensorboard": False,
            **train,
        },
        "regularizers": {"entropy": {"lambda_batch": 0.1, "lambda_sample": 0.05, "global_marginal": True}},
    }


def _train_arrays() -> dict:
    return {"train": _synthetic(n=48, seed=2), "test": _synthetic(n=23, seed=3)}


def trainer_worker(ctx: D.DistContext, root: str) -> dict:
    """Through resetnet.train.train under torchrun's environment: a run paused at step 3 and
    resumed (2 -> 2 processes), an uninterrupted run, and a copy of the paused run for a
    1-process resume in the parent."""
    import shutil

    from resetnet.train import train

    root = Path(root)
    arrays = _train_arrays()
    paused = train(_train_cfg(stop_after=3), root / "a", arrays=arrays)
    if ctx.is_main:
        shutil.copytree(root / "a", root / "c")
    D.barrier()
    resumed = train(_train_cfg(), root / "a", arrays=arrays, resume=True)
    full = train(_train_cfg(), root / "b", arrays=arrays)
    stopped = train(_train_cfg(eval_every=0), root / "d", arrays=arrays, callbacks=[RankOneStops()])
    try:  # sync_bn with sparse dispatch: a config error on every rank, before any collective
        train(_train_cfg(sync_bn=True), root / "e", arrays=arrays)
        sync_bn_error = None
    except Exception as err:  # noqa: BLE001
        sync_bn_error = f"{type(err).__name__}: {err}"
    return {"paused": paused, "resumed": resumed, "full": full, "stopped": stopped, "sync_bn_error": sync_bn_error}


class RankOneStops:
    """An early-stop callback that fires on rank 1 only (as one deciding from local data would)."""

    def on_step_end(self, trainer, step, stats):
        self.seen = stats
        if step == 2 and trainer.runtime.rank == 1:
            trainer.request_stop("rank 1 says stop")


def _metrics(run: Path, kind: str) -> list[dict]:
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind", r.get("type")) == kind]


def test_trainer_two_ranks_resume_and_eval(tmp_path):
    """train() under torchrun's environment: rank 0 alone writes; 2 -> 2 resume is exact; the
    2-rank checkpoint resumes in 1 process; the 2-rank evaluation equals a 1-process one."""
    from resetnet.train import load_model, read_checkpoint, train
    from resetnet.train.evaluate import evaluate

    ranks = run_ranks(trainer_worker, tmp_path, root=str(tmp_path))
    r0, r1 = ranks
    assert r0["paused"]["status"] == "paused" and r0["paused"]["step"] == 3
    assert r0["resumed"]["status"] == r0["full"]["status"] == "completed"
    # every rank computed the same evaluation
    assert r0["full"]["last_eval"] == r1["full"]["last_eval"]
    # 2 -> 2 resume equals the uninterrupted run
    a, b = read_checkpoint(tmp_path / "a"), read_checkpoint(tmp_path / "b")
    assert a.meta["world_size"] == 2 and a.meta["step"] == 6
    for k, v in b.tensors.items():
        torch.testing.assert_close(a.tensors[k], v, atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # evaluation under DDP == single-process evaluation of the checkpoint
    model, _ = load_model(tmp_path / "b")
    x, y = _train_arrays()["test"]
    ref = evaluate(model, DeviceLoader(x, y, 10, train=False))
    assert r0["full"]["last_eval"]["acc"] == ref["acc"] and r0["full"]["last_eval"]["n"] == 23
    assert r0["full"]["last_eval"]["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    # a checkpoint written by 2 processes resumes in 1
    ckpt = read_checkpoint(tmp_path / "c")
    assert ckpt.meta["world_size"] == 2 and ckpt.meta["step"] == 3
    summary = train(_train_cfg(), tmp_path / "c", arrays=_train_arrays(), resume=True)
    assert summary["status"] == "completed" and summary["step"] == 6
    c = read_checkpoint(tmp_path / "c")
    assert c.meta["world_size"] == 1 and c.meta["step"] == 6
    assert set(c.tensors) == set(b.tensors)
    # rank 0 alone wrote metrics: one train row per step, the first 3 by 2 ranks, then 3 by 1
    steps = [row["step"] for row in _metrics(tmp_path / "c", "train")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [row["step"] for row in _metrics(tmp_path / "b", "train")] == [1, 2, 3, 4, 5, 6]
    for r in ranks:
        assert r["sync_bn_error"].startswith("ConfigError") and "deadlock" in r["sync_bn_error"]
    # a stop requested on rank 1 alone stops both ranks at the same step
    for r in ranks:
        assert r["stopped"]["step"] == 2 and r["stopped"]["stop_reason"] == "rank 1 says stop"


def _fake_cifar10(root: Path, per_file: int = 8) -> None:
    """Official-layout CIFAR-10 binaries with random records (fails MD5: use data.verify=false)."""
    from resetnet.data.cifar10 import CIFAR10_MD5

    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in CIFAR10_MD5:
        records = rng.integers(0, 256, (per_file, 1 + 3 * 32 * 32), dtype=np.uint8)
        records[:, 0] %= 10
        (d / name).write_bytes(records.tobytes())


def test_torchrun_cli(tmp_path):
    """``torchrun --standalone --nproc_per_node 2 -m resetnet train ...``: the unchanged command line."""
    import json
    import subprocess
    import sys

    _fake_cifar10(tmp_path / "data")
    torchrun = Path(sys.executable).parent / "torchrun"
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    sets = [
        "train.device=cpu",
        "train.steps=2",
        "train.batch_size=8",
        "train.eval_batch_size=4",
        "train.progress=false",
        "train.tensorboard=false",
        "train.dist_timeout_s=30",
        "data.verify=false",
        "data.download=false",
        "data.limit_train=null",
        "data.limit_test=null",
    ]
    cmd = launcher + [
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "resetnet",
        "train",
        "--config",
        "smoke",
        "--out",
        str(tmp_path / "run"),
        "--data-dir",
        str(tmp_path / "data"),
    ]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=JOIN_TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # the summary is printed by rank 0 only
    summary = json.loads(lines[0])
    assert summary["status"] == "completed" and summary["step"] == 2
    meta = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 2


# --------------------------------------------------------------------------- tests: one process
def test_single_process_context(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = D.init_distributed(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed, ctx.backend) == (0, 1, True, False, None)
    assert D.global_marginal_reduce(ctx) is None
    model = nn.Linear(2, 2)
    assert D.wrap_model(model, ctx) is model
    t = torch.ones(3)
    assert D.all_reduce_sum(t) is t and torch.equal(t, torch.ones(3))
    D.barrier()
    D.sync_buffers(model)
    assert D.is_main()


def test_init_requires_torchrun_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(RuntimeError, match="RANK"):
        D.init_distributed(device="cpu")
    with pytest.raises(ValueError, match="positive"):
        D.init_distributed(timeout_s=0)


def test_sync_bn_with_sparse_dispatch_is_refused():
    ctx = D.DistContext()
    sparse = resetnet.create_model("reset_t3_2cu3it", scorer="gumbel_st", train_execution="sparse")
    assert D.has_sparse_routing(sparse)
    with pytest.raises(D.SyncBNError, match="deadlock"):
        D.wrap_model(sparse, ctx, sync_bn=True)
    fused = resetnet.create_model("reset_t3_2cu3it", scorer="softmax", train_execution="fused")
    with pytest.raises(D.SyncBNError, match="fused"):
        D.wrap_model(fused, ctx, sync_bn=True)
    dense = resetnet.create_model("reset_t3_2cu3it", scorer="softmax")
    assert not D.has_sparse_routing(dense)
    with pytest.raises(D.SyncBNError, match="CUDA"):  # PyTorch's SyncBatchNorm has no CPU kernels
        D.wrap_model(dense, ctx, sync_bn=True)
    # a hard scorer's default training runs every unit on the whole batch (straight-through): allowed
    default = resetnet.create_model("reset_t3_2cu3it", scorer="gumbel_st")
    assert not D.has_sparse_routing(default)
    naive = resetnet.create_model("reset_t3_2cu3it", scorer="gumbel_st", train_execution="naive")
    assert not D.has_sparse_routing(naive)


def test_sync_bn_conversion_per_iteration_copies():
    """Each per-iteration BN copy becomes its own SyncBatchNorm; keys and eval outputs unchanged;
    the fused path steps aside (auto -> naive)."""
    torch.manual_seed(0)
    model = resetnet.create_model("reset_t3_2cu3it", scorer="softmax").eval()
    x = torch.randn(4, 3, 8, 8)
    ref = model(x)
    keys = list(model.state_dict())
    reset = model.reset_modules()[0]
    assert reset.resolve_execution() == "fused"
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model and list(model.state_dict()) == keys
    unit = reset.units[0]
    assert len(unit.bn1.norms) == 3
    assert all(isinstance(bn, nn.SyncBatchNorm) for bn in unit.bn1.norms)
    assert len({id(bn) for bn in unit.bn1.norms}) == 3
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert reset.resolve_execution() == "naive"
    torch.testing.assert_close(model(x), ref)


def test_sparse_hook_catches_call_time_sparse_dispatch():
    m = ReSet([BasicBlock(4) for _ in range(2)], 2, scorer="gumbel_st", channels=4, execution="naive").train()
    m.register_forward_pre_hook(D._forbid_sparse_hook, with_kwargs=True)
    m(torch.randn(2, 4, 4, 4))  # naive: fine
    with pytest.raises(D.SyncBNError, match="deadlock"):
        m(torch.randn(2, 4, 4, 4), execution="sparse")
    m.eval()
    m(torch.randn(2, 4, 4, 4), execution="sparse")  # eval: SyncBatchNorm does not synchronise


def test_zero_contribution_is_zero_and_touches_every_parameter():
    model = TinySparseNet()
    z = D.zero_contribution(model)
    assert float(z.detach()) == 0.0
    z.backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


# --------------------------------------------------------------------------- CUDA (NCCL, SyncBN)
def sync_bn_parity_worker(ctx: D.DistContext, steps: int = 2, batch: int = 8) -> dict:
    images, labels = _synthetic()
    torch.manual_seed(0)
    model = resetnet.create_model("reset_t3_2cu3it", scorer="softmax").to(ctx.device).train()
    ddp = D.wrap_model(model, ctx, sync_bn=ctx.distributed)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    loader = DeviceLoader(images, labels, batch, train=True, seed=1, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device)
    for step, _, x, y in loader.batches():
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    return _cpu_state(ddp)


def _cuda_rank_entry(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    ctx = D.init_distributed(timeout_s=DIST_TIMEOUT_S, device="cuda")
    try:
        torch.save(sync_bn_parity_worker(ctx), Path(out) / f"rank{rank}.pt")
    finally:
        D.cleanup()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL + SyncBatchNorm)")
def test_sync_bn_parity_nccl(tmp_path):  # pragma: no cover - needs 2 GPUs
    """With SyncBatchNorm and BN in training mode, 2 GPUs at global batch B match 1 GPU at batch B."""
    port = _free_port()
    ctx = mp.start_processes(_cuda_rank_entry, args=(WORLD, port, str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("NCCL ranks hung")
    ref = sync_bn_parity_worker(D.DistContext(device=torch.device("cuda", 0)))
    for r in range(WORLD):
        _assert_state_close(torch.load(tmp_path / f"rank{r}.pt"), ref, atol=1e-4, rtol=1e-3)

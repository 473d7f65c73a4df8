"""The trainer against a minimal hand-written loop: time per training step, same model, batch and data.

``resetnet train`` does per step what :meth:`resetnet.train.Trainer.train_steps` does: the
device-resident loader with its batched augmentation, the learning-rate schedule, forward,
loss (label smoothing, regularizers when configured), backward, optimizer step, the
non-finite check, the statistics window, the progress bar and a metrics row every
``train.log_every`` steps. The plain loop is what a user would write by hand around the same
model, the same loader and the same optimizer: forward, cross-entropy, backward, step. Both train
at the recipe's peak learning rate (a constant schedule): with the recipe's warm-up over this
benchmark's nominal budget the trainer's weights would barely move while the plain loop's do,
and on a CPU the arithmetic on diverging weights (denormals, NaN) costs different time.

Both run in one process, interleaved chunk by chunk (order alternating), several repeats, and
the figure is the median of the per-repeat ratios trainer / plain. On the CPU the timer is the
process's CPU time (user + system), which a busy neighbour on a shared machine does not inflate;
use one thread (``--threads 1``) there. On CUDA it is wall time with device synchronisation. Periodic evaluation and
checkpoints are switched off in both (they are not training steps). Each trainer chunk ends with
a metrics row (one per chunk instead of one per ``log_every`` steps), so the trainer's logging
cost is, if anything, over-counted.

    python benchmarks/train_step.py [--models resnet_t3,resnet38,reset38] [--device cpu]
        [--data-dir ../shared/data | --synthetic] [--steps 20] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from resetnet.train import Config, Trainer, build_data, build_model, load_config, resolve_runtime  # noqa: E402
from resetnet.train.config import load_recipe, merge  # noqa: E402
from resetnet.train.evaluate import autocast  # noqa: E402


def config(name: str, device: str, recipe: str) -> Config:
    raw = merge(
        load_recipe(recipe),
        {
            "model": {"name": name, "overrides": {"scorer": "softmax"} if name.startswith("reset") else {}},
            "train": {"steps": 10**6, "eval_every": 0, "checkpoint_every": 0, "device": device, "progress": True, "tensorboard": True},
            # the plain loop's constant learning rate: both loops do the same arithmetic on similar weights
            "optim": {"schedule": {"kind": "constant", "warmup": 0}},
        },
    )
    return load_config(raw)


def arrays(args: argparse.Namespace):
    if args.synthetic:
        from resetnet_experiments.reproduce import synthetic_arrays

        return synthetic_arrays(2048, 256, size=32)
    from resetnet.data import load_cifar10

    return {split: load_cifar10(args.data_dir, split, download=False) for split in ("train", "test")}


class PlainLoop:
    """forward, cross-entropy, backward, SGD step on the trainer's loader, model copy and optimizer settings."""

    def __init__(self, cfg: Config, loader, device: torch.device, channels_last: bool, amp: bool = False) -> None:
        self.device, self.amp = device, amp
        self.model = build_model(cfg).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        o = cfg.optim
        self.opt = torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
        self.smoothing = cfg.train.label_smoothing
        self.batches = loader.batches(0)
        self.model.train()

    def steps(self, n: int) -> None:
        for _ in range(n):
            _, _, x, y = next(self.batches)
            with autocast(self.device, self.amp):  # the trainer's bf16 autocast on CUDA: the same arithmetic
                logits = self.model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.smoothing)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        float(loss.detach())  # wait for the device, as the trainer's log step does


def bench_model(name: str, args: argparse.Namespace, data) -> dict:
    cfg = config(name, args.device, args.recipe)
    runtime = resolve_runtime(cfg)
    bundle = build_data(cfg, runtime, arrays=data)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, build_model(cfg), bundle, out, runtime)
        trainer.set_train_mode()
        plain = PlainLoop(cfg, bundle.train, runtime.device, runtime.channels_last, runtime.amp)
        sink = open(os.devnull, "w")
        from tqdm.auto import tqdm

        bar = tqdm(total=10**6, file=sink)  # resetnet train's progress bar, drawn nowhere
        cuda = runtime.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        clock = time.perf_counter if cuda else time.process_time

        def run_trainer(n: int) -> None:
            trainer.train_steps(trainer.step + n, bar)

        fns = {"trainer": run_trainer, "plain": plain.steps}
        for fn in fns.values():  # warm-up
            fn(args.warmup)
        times: dict[str, list[float]] = {k: [] for k in fns}
        for rep in range(args.repeats):
            for key in ("trainer", "plain") if rep % 2 == 0 else ("plain", "trainer"):
                sync()
                t0 = clock()
                fns[key](args.steps)
                sync()
                times[key].append((clock() - t0) / args.steps)
        bar.close()
        trainer.logger.close()
    ratio = statistics.median(a / b for a, b in zip(times["trainer"], times["plain"]))
    return {
        "model": name,
        "trainer_ms": 1e3 * statistics.median(times["trainer"]),
        "plain_ms": 1e3 * statistics.median(times["plain"]),
        "ratio": ratio,
        "ratios": [a / b for a, b in zip(times["trainer"], times["plain"])],
        "channels_last": runtime.channels_last,
        "amp": runtime.amp,
        "batch": cfg.train.batch_size,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet_t3,resnet38,reset38")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--synthetic", action="store_true", help="random images instead of CIFAR-10 (timing only)")
    parser.add_argument("--recipe", default="fast", help="the recipe of configs/recipes (optimizer, batch, label smoothing)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed chunk")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = arrays(args)
    print(
        f"[train_step] {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.steps} steps x {args.repeats} repeats per model",
        flush=True,
    )
    print("| model | batch | channels_last | trainer ms/step | plain loop ms/step | trainer / plain |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    results = []
    for name in args.models.split(","):
        r = bench_model(name, args, data)
        results.append(r)
        print(f"| {name} | {r['batch']} | {r['channels_last']} | {r['trainer_ms']:.1f} | {r['plain_ms']:.1f} | {r['ratio']:.3f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

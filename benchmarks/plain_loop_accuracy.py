"""The fast recipe's comparator: a hand-written PyTorch loop trained to accuracy on the same model and data.

Issue 14 set the fast recipe's targets by such a loop ("SGD Nesterov + one-cycle LR + label
smoothing 0.1, channels_last": 72.7% in 3 epochs, 82.9% in 10 on ``resnet_t3`` with He et
al.'s stem, on another machine). This script is that loop, so that the recipe can be compared
with it in a back-to-back run on one machine: the library's model and device-resident loader
(the same crops, flips and batch order as ``resetnet train`` at the same seed), then only
plain PyTorch: ``torch.optim.SGD`` (Nesterov), ``torch.optim.lr_scheduler.OneCycleLR`` (its
defaults: cosine, 30% warm-up, momentum cycled 0.85-0.95), cross-entropy with label smoothing,
channels_last. It prints one JSON line: test accuracy on the 10,000 CIFAR-10 test images (the
library's ``evaluate``, as ``resetnet train`` reports it) and the training wall time.

    python benchmarks/plain_loop_accuracy.py --epochs 3 [--lr 0.4] [--weight-decay 5e-4]
        [--seed 0] [--threads 1] [--data-dir ../shared/data | --synthetic]

Compare with ``resetnet train --config he3.yaml`` (docs/results.md, "The fast recipe").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from resetnet.data import DeviceLoader  # noqa: E402
from resetnet.models import create_model  # noqa: E402
from resetnet.train.evaluate import evaluate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import arrays  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet_t3")
    parser.add_argument("--paper-stem", action="store_true", help="keep the model's max-pool stem (default: He et al.'s stem, as the issue's loop)")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.4, help="OneCycleLR max_lr")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--synthetic", action="store_true", help="random images instead of CIFAR-10 (tests the script only)")
    parser.add_argument("--limit-train", type=int, default=None, help="train on the first N images (tests the script only)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = arrays(args)
    overrides = {} if args.paper_stem else {"stem_maxpool": False}
    model = create_model(args.model, **overrides).to(memory_format=torch.channels_last)
    (x, y), (xt, yt) = data["train"], data["test"]
    train = DeviceLoader(x, y, args.batch_size, train=True, seed=args.seed, channels_last=True, limit=args.limit_train)
    test = DeviceLoader(xt, yt, 500, train=False, channels_last=True)
    steps = math.ceil(args.epochs * len(train))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    t0 = time.perf_counter()
    model.train()
    batches = train.batches(0)
    for _ in range(steps):
        _, _, xb, yb = next(batches)
        loss = F.cross_entropy(model(xb), yb, label_smoothing=args.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    train_s = time.perf_counter() - t0
    res = evaluate(model, test)
    result = {
        "model": args.model,
        "stem": "paper (max-pool)" if args.paper_stem else "He et al.",
        "epochs": args.epochs,
        "steps": steps,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "test_acc": res["acc"],
        "n_test": res["n"],
        "train_s": round(train_s, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How far the truncated estimator (``train_execution: sparse``) is from the paper's straight-through one.

For a hard scorer (``gumbel_st``, ``topk``) the paper's estimator passes the relaxed weights'
gradient to every unit's output, so training evaluates every unit (``train_execution: auto``,
the default). Sparse dispatch in training skips the unselected units: their weights get no
gradient, and each unit's BatchNorm normalises over its own sub-batch. This script measures
the relative difference ``|g_sparse - g_paper| / |g_paper|`` of the gradients of one training
step (same Gumbel noise) w.r.t. the input, the controllers and the units, on a model of the zoo.

    python benchmarks/estimator_gap.py [--model reset38] [--batch 64] [--seeds 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn.functional as F

import resetnet


def gradients(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, execution: str, seed: int) -> dict[str, torch.Tensor]:
    m = copy.deepcopy(model).train()
    for r in m.reset_modules():
        r.train_execution = execution
    xx = x.clone().requires_grad_()
    torch.manual_seed(seed)
    F.cross_entropy(m(xx), y).backward()
    groups = {"input": [xx.grad]}
    groups["controllers"] = [p.grad for r in m.reset_modules() for p in r.controller.parameters() if p.grad is not None]
    groups["units"] = [p.grad if p.grad is not None else torch.zeros_like(p) for r in m.reset_modules() for p in r.units.parameters()]
    groups["rest"] = [p.grad for n, p in m.named_parameters() if ".controller." not in n and ".units." not in n and p.grad is not None]
    return {k: torch.cat([g.flatten() for g in v]) for k, v in groups.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="reset38")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"model {args.model}, batch {args.batch}, {args.seeds} seeds, torch {torch.__version__}")
    print("| scorer | input | controllers | units | stem, transitions, head |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for scorer, options in (("gumbel_st", {}), ("topk", {"topk": 1}), ("topk", {"topk": 2})):
        diffs: dict[str, list[float]] = {}
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = resetnet.create_model(args.model, scorer=scorer, **options)
            x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
            paper, sparse = gradients(model, x, y, "naive", seed), gradients(model, x, y, "sparse", seed)
            for k in paper:
                diffs.setdefault(k, []).append(float((sparse[k] - paper[k]).norm() / paper[k].norm().clamp_min(1e-30)))
        name = scorer + (f" k={options['topk']}" if options else "")
        cells = [f"{statistics.mean(diffs[k]):.2f}" for k in ("input", "controllers", "units", "rest")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

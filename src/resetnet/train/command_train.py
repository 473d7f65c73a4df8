"""``resetnet train``: train a model from a YAML config into a run directory."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "train a model from a config (a shipped config name or a YAML path) into a run directory"

#: Exit codes: 0 done (or paused by train.stop_after), 2 bad input (config, data, checkpoint,
#: run directory not writable or locked by another process), 3 non-finite loss or weights,
#: 128 + signal number when interrupted (checkpoint saved). docs/training.md lists what each leaves on disk.
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a shipped config (quickstart, smoke, reset38, resnet38, table3/..., see --list) or a YAML path")
    parser.add_argument("--out", help="run directory (checkpoint, metrics.jsonl, tb/); locked while training")
    parser.add_argument("--list", action="store_true", help="print the names of the shipped configs and exit")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 root holding cifar-10-batches-bin/ (default: $RESETNET_DATA or ~/.cache/resetnet)")
    parser.add_argument(
        "--download",
        action="store_true",
        help="download CIFAR-10 into the data dir when it is missing (sets data.download=true, the default of the shipped configs)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, YAML-parsed (repeatable), e.g. --set optim.lr=0.05 --set train.steps=1000",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--print-config", action="store_true", help="print the resolved (validated) config and exit")


def run(args: argparse.Namespace) -> int:
    import yaml

    from ..cli import fail
    from ..errors import UserError
    from .config import list_configs, load_config
    from .distributed import cleanup, is_main
    from .trainer import NonFiniteLoss, TrainingInterrupted, train

    if args.list:
        print("\n".join(list_configs()))
        return 0
    missing = [flag for flag, value in (("--config", args.config), ("--out", args.out or args.print_config)) if not value]
    if missing:
        return fail("train", f"{' and '.join(missing)} required (resetnet train --list names the shipped configs)")
    overrides = list(args.overrides) + (["data.download=true"] if args.download else [])
    try:
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        summary = train(cfg, args.out, data_dir=args.data_dir, resume=args.resume)  # torchrun: one rank of DDP
        main = is_main()  # before leaving the process group
    except NonFiniteLoss as err:
        return fail("train", err, EXIT_NONFINITE)
    except TrainingInterrupted as err:
        print(f"resetnet train: {err}", file=sys.stderr)
        return 128 + int(err.signum)
    except UserError as err:  # config, data, checkpoint, run directory (not writable, locked)
        return fail("train", err, EXIT_BAD_INPUT)
    finally:
        cleanup()  # leave the process group (torchrun), a no-op otherwise
    if not main:
        return 0
    line = {k: summary.get(k) for k in ("status", "out_dir", "step", "total_steps", "test_acc", "wall_s", "images_per_s")}
    if summary.get("ema_test_acc") is not None:
        line["ema_test_acc"] = summary["ema_test_acc"]
    line["best_acc"] = (summary.get("best") or {}).get("acc")
    print(json.dumps(line))
    return 0

"""``resetnet reproduce``: run a paper table (or one pipeline) and write table.md / table.csv."""

from __future__ import annotations

import argparse
import sys

HELP = "reproduce a paper table (table1, table2, table3, sec5_1) or run one staged pipeline"


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum, frame) -> None:
    raise _Interrupted(signum)


TARGETS = ("table1", "table2", "table3", "sec5_1", "pipeline")


def _rows(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rows: expected comma-separated row numbers such as 1,4, got {text!r}") from None


def _var(text: str) -> tuple[str, object]:
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--var: expected NAME=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), yaml.safe_load(v)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=TARGETS, help="a paper table, sec5_1 (controller agreement), or 'pipeline' with --pipeline NAME")
    parser.add_argument(
        "--budget",
        choices=("smoke", "cpu", "full"),
        default="smoke",
        help="smoke: minutes on a CPU, a subset (tests); cpu: 2 CPU cores, full CIFAR-10, reduced schedule; full: the paper's schedule (GPU)",
    )
    parser.add_argument("--out", required=True, help="output directory (resumable: finished rows are not retrained)")
    parser.add_argument("--data-dir", default=None, help="directory holding cifar-10-batches-bin/ (and optionally the CIFAR-10.1 .npy files)")
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds per row (0..N-1); mean ± std over them")
    parser.add_argument("--rows", type=_rows, default=None, help="only these rows (comma-separated); their baselines run too")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step budget (e.g. 2 for a longer cpu run)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--synthetic", action="store_true", help="random images instead of CIFAR-10 (tests the machinery only)")
    parser.add_argument(
        "--pipeline",
        default=None,
        help="with target 'pipeline': scratch, controller_only, relaxation, finetune, topk, "
        "two_phase_fixed, two_phase_convergence, two_phase_progressive or incremental",
    )
    parser.add_argument("--var", type=_var, action="append", default=[], help="with target 'pipeline': NAME=VALUE pipeline variable (repeatable)")
    parser.add_argument("--upto", default=None, help="with target 'pipeline': stop after this stage")
    parser.add_argument("--seed", type=int, default=0, help="with target 'pipeline': the seed")
    parser.add_argument(
        "--test-set",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an extra test set (.npz with x: uint8 (N, 32, 32, 3), y: labels) reported like CIFAR-10.1 (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    import signal

    import torch

    from resetnet.data import parse_test_set
    from resetnet.errors import RunDirLocked, UserError
    from resetnet.train import NonFiniteLoss, TrainingInterrupted

    from .reproduce import reproduce, run_single_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.scale <= 0:
        return _fail("--scale must be positive")
    if args.target == "pipeline" and not args.pipeline:
        return _fail("target 'pipeline' needs --pipeline NAME")
    if args.target != "pipeline" and (args.pipeline or args.var or args.upto):
        return _fail("--pipeline/--var/--upto only apply to target 'pipeline'")
    # SIGINT/SIGTERM outside a training stage (evaluation, tables) end the command with one line too;
    # inside a stage the trainer saves a checkpoint first (TrainingInterrupted).
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        test_sets = dict(parse_test_set(t) for t in args.test_set)
        if args.target == "pipeline":
            run_single_pipeline(
                args.pipeline,
                budget=args.budget,
                out=args.out,
                data_dir=args.data_dir,
                seed=args.seed,
                variables=dict(args.var),
                upto=args.upto,
                scale=args.scale,
                synthetic=args.synthetic,
                test_sets=test_sets,
            )
        else:
            reproduce(
                args.target,
                budget=args.budget,
                out=args.out,
                data_dir=args.data_dir,
                seeds=args.seeds,
                rows=args.rows,
                scale=args.scale,
                synthetic=args.synthetic,
                test_sets=test_sets,
            )
    except RunDirLocked as err:  # e.g. two `--rows` selections side by side that share a stage
        return _fail(
            f"{err.where}: another process is training this stage; wait for it to finish, then run this command again (it reads finished stages back)"
        )
    except (UserError, ValueError) as err:
        return _fail(err)
    except NonFiniteLoss as err:
        return _fail(err, 3)
    except (TrainingInterrupted, _Interrupted) as err:
        print(
            f"resetnet reproduce: {signal.Signals(err.signum).name} received; finished stages and rows are kept (an interrupted "
            "stage from its last checkpoint): rerun the same command to continue",
            file=sys.stderr,
        )
        return 128 + int(err.signum)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0


def _fail(message: object, code: int = 2) -> int:
    print(f"resetnet reproduce: error: {' '.join(str(message).split())}", file=sys.stderr)
    return code

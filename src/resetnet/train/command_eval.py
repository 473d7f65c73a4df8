"""``resetnet eval``: CIFAR-10 / 10.1 accuracy, gap, MACs and time ratio (median over alternating passes) vs a baseline (Table 2)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from pathlib import Path
from typing import Any

from .stats import format_p

HELP = "evaluate a checkpoint on CIFAR-10 and CIFAR-10.1 (accuracy, gap, MACs, time vs a baseline)"


def _positive(text: str) -> int:
    with contextlib.suppress(ValueError):
        if int(text) >= 1:
            return int(text)
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="run directory or checkpoint .safetensors file")
    parser.add_argument("--data-dir", default=None, help="data root (default: $RESETNET_DATA or ~/.cache/resetnet)")
    parser.add_argument("--baseline", default=None, help="baseline checkpoint, or a model name (built untrained: timing and MACs only)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON (its directory must exist; checked first)")
    parser.add_argument("--limit", type=_positive, default=None, help="evaluate on the first N images of each test set")
    parser.add_argument("--batch-size", type=_positive, default=500, help="evaluation batch size")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N (checked: it must be on this machine)")
    parser.add_argument("--timing-batch", type=_positive, default=128, help="images in the timed batch")
    parser.add_argument("--timing-repeats", type=_positive, default=10, help="timed forward passes per model")
    parser.add_argument(
        "--flip-tta", action="store_true", help="test-time augmentation: average each image's logits with its mirror's (not the paper's protocol)"
    )
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA of the weights (a run trained with train.ema_decay)")
    parser.add_argument("--cifar10-1-version", default="v6", choices=("v4", "v6"), help="CIFAR-10.1 version")
    parser.add_argument("--download", action="store_true", help="download missing datasets")
    parser.add_argument("--no-verify", action="store_true", help="skip the CIFAR-10 MD5 check")
    parser.add_argument(
        "--test-set", action="append", default=[], metavar="NAME=PATH", help="an extra test set (repeatable): .npz, x uint8 (N, 32, 32, 3), y labels"
    )


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _delta(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:+.2f}"


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _summary(res: dict[str, Any]) -> dict[str, Any]:
    """The Table-2 columns of a :func:`_measure` result (accuracies None where not measured or not available)."""
    c10, c101 = ((res[key] or {}).get("acc") for key in ("cifar10", "cifar10_1"))
    return {"cifar10_acc": c10, "cifar10_1_acc": c101, "gap": _sub(c10, c101), "params": res["params"], "macs_per_image": res["macs_per_image"]}


def _row(*cells: object) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(map(str, cells)) + " |"


def _summary_row(name: str, r: dict[str, Any], ratio: str, delta_c10: str, delta_c101: str) -> str:
    """A Table-2-style row of the report or of its baseline."""
    size = f"{r['params'] / 1e6:.3f}M", f"{r['macs_per_image'] / 1e6:.1f}M"
    return _row(name, *size, _pct(r["cifar10_acc"]), _pct(r["cifar10_1_acc"]), _pct(r["gap"]), ratio, delta_c10, delta_c101)


def _load_sets(args: argparse.Namespace, verify: bool, extra: dict[str, Any]) -> dict[str, Any]:
    from ..data import DataNotAvailable, load_cifar10, load_cifar10_1, load_test_set, resolve_data_dir

    loaded = {name: load_test_set(path) for name, path in extra.items()}  # a bad file fails before CIFAR-10 is read
    root = resolve_data_dir(args.data_dir)
    sets: dict[str, Any] = {"cifar10": load_cifar10(root, "test", download=args.download, verify=verify), "cifar10_1": None}
    try:
        sets["cifar10_1"] = load_cifar10_1(root, args.cifar10_1_version, download=args.download)
    except DataNotAvailable as err:
        print(f"resetnet eval: CIFAR-10.1 not available, reported as n/a ({err})", file=sys.stderr)
    return {**sets, **loaded}


def _measure(model, loaders: dict[str, Any], amp: bool, accuracy: bool = True, flip: bool = False) -> dict[str, Any]:
    from .evaluate import count_parameters, evaluate, mean_macs

    out: dict[str, Any] = {"params": count_parameters(model), "macs_per_image": mean_macs(model, loaders["cifar10"])}
    return out | {name: evaluate(model, loader, amp=amp, flip=flip) if loader is not None and accuracy else None for name, loader in loaders.items()}


def run(args: argparse.Namespace) -> int:
    import torch

    from ..cli import check_output_file, fail, write_output_file
    from ..data import CLASSES, DeviceLoader, parse_test_set
    from ..errors import CheckpointError, UserError
    from ..models import create_model, load_model
    from .evaluate import compare_timing
    from .runtime import resolve_device
    from .stats import mcnemar

    try:
        # Every input is checked before any evaluation work, so a result is never computed and then lost.
        device = resolve_device(args.device)
        json_path = check_output_file(args.json, "--json") if args.json else None
        cuda = device.type == "cuda"
        loader = functools.partial(DeviceLoader, train=False, device=device, channels_last=cuda)
        test_sets = dict(parse_test_set(t) for t in args.test_set)
        model, meta = load_model(args.checkpoint, device, ema=args.ema)
        cfg = meta.get("config") or {}
        verify = bool((cfg.get("data") or {}).get("verify", True)) and not args.no_verify
        amp = cuda and (cfg.get("train") or {}).get("amp", "auto") in ("auto", True)
        baseline, base_name, base_kind = None, args.baseline, None
        if args.baseline and Path(args.baseline).exists():  # the baseline is loaded (checked) before the evaluation too
            baseline, base_meta = load_model(args.baseline, device)
            base_name, base_kind = ((base_meta.get("config") or {}).get("model") or {}).get("name", base_name), "checkpoint"
        elif args.baseline:  # a model name: built untrained
            try:
                baseline, base_kind = create_model(args.baseline).to(device).eval(), "model"
            except ValueError as err:
                raise CheckpointError(f"--baseline {args.baseline!r} is neither a checkpoint path nor a model name ({err})") from None
        if cuda:
            model = model.to(memory_format=torch.channels_last)
            baseline = None if baseline is None else baseline.to(memory_format=torch.channels_last)
        sets = _load_sets(args, verify, test_sets)
        loaders = {k: (loader(*v, args.batch_size, limit=args.limit) if v is not None else None) for k, v in sets.items()}
        results = _measure(model, loaders, amp, flip=args.flip_tta)
        base_res = None if baseline is None else _measure(baseline, loaders, amp, accuracy=base_kind == "checkpoint", flip=args.flip_tta)
        tx = loader(*sets["cifar10"], args.timing_batch, limit=args.timing_batch).get_batch(0, 0)[0]
        timing = compare_timing(model, baseline, tx, repeats=args.timing_repeats, amp=amp)
    except UserError as err:  # device, --json path, checkpoint, baseline, data, test sets
        return fail("eval", err)

    def paired_p(name: str) -> float | None:  # McNemar on per-image correctness against a trained baseline
        a, b = results.get(name), (base_res or {}).get(name)
        return mcnemar(a["correct"], b["correct"])["p_value"] if a and b else None

    summary = _summary(results)
    base = None if base_res is None else {"name": base_name, "kind": base_kind, **_summary(base_res)}
    report = {
        "checkpoint": str(args.checkpoint),
        "model": ((cfg.get("model") or {}).get("name")) or "model",
        "step": meta.get("step"),
        "device": str(device),
        "cifar10_1_version": args.cifar10_1_version,
        "flip_tta": args.flip_tta,
        "ema": args.ema,
        **summary,
        "time_ratio": timing["ratio"],
        "timing": timing,
        "n_cifar10": results["cifar10"]["n"],
        "n_cifar10_1": (results["cifar10_1"] or {}).get("n"),
        "per_class_acc": dict(zip(CLASSES, results["cifar10"]["per_class_acc"])),
        "cifar10_acc_delta": _sub(summary["cifar10_acc"], base and base["cifar10_acc"]),
        "cifar10_1_acc_delta": _sub(summary["cifar10_1_acc"], base and base["cifar10_1_acc"]),
        "cifar10_mcnemar_p": paired_p("cifar10"),
        "cifar10_1_mcnemar_p": paired_p("cifar10_1"),
        "baseline": base,
        "test_sets": {},
    }
    for name in test_sets:
        a, b = results[name], (base_res or {}).get(name)
        b_acc = b["acc"] if b else None
        report["test_sets"][name] = dict(
            n=a["n"],
            acc=a["acc"],
            gap=_sub(summary["cifar10_acc"], a["acc"]),
            baseline_acc=b_acc,
            acc_delta=_sub(a["acc"], b_acc),
            mcnemar_p=paired_p(name),
        )
    print(format_markdown(report, base_res))
    if json_path is not None:
        try:
            write_output_file(json_path, json.dumps(report, indent=1) + "\n", "--json")
        except UserError as err:
            return fail("eval", f"{err} (the results are printed above)")
    return 0


def format_markdown(report: dict[str, Any], base_res: dict[str, Any] | None = None) -> str:
    """The report as Markdown: a Table-2-style summary and per-class accuracies."""
    lines = [_row("model", "params", "MACs/image", "C10 acc", "C10.1 acc", "gap", "time ratio", "C10 Δ", "C10.1 Δ"), _row("---", *["---:"] * 8)]
    if (b := report["baseline"]) is not None:
        lines.append(_summary_row(f"{b['name']} (baseline{', untrained' if b['kind'] == 'model' else ''})", b, "1.00", "-", "-"))
    ratio = "-" if report["time_ratio"] is None else f"{report['time_ratio']:.2f}"
    deltas = _delta(report["cifar10_acc_delta"]), _delta(report["cifar10_1_acc_delta"])
    lines.append(_summary_row(f"{report['model']} (step {report['step']}{', EMA' if report.get('ema') else ''})", report, ratio, *deltas))
    c101 = f"{report['n_cifar10_1']} images" if report["n_cifar10_1"] else "not available"
    tta = "; flip test-time augmentation (not the paper's protocol)" if report.get("flip_tta") else ""
    lines += ["", f"CIFAR-10: {report['n_cifar10']} images; CIFAR-10.1 {report['cifar10_1_version']}: {c101}; device {report['device']}{tta}."]
    t = report["timing"]
    base_time = "" if t["baseline_s"] is None else f", baseline {1e3 * t['baseline_s']:.1f} ms"
    lines.append(f"Forward time of a {t['batch']}-image batch (median of {t['repeats']}): {1e3 * t['model_s']:.1f} ms{base_time}")
    if report.get("cifar10_mcnemar_p") is not None:
        ps = [
            f"{k} {format_p(report[key])}" for k, key in (("C10", "cifar10_mcnemar_p"), ("C10.1", "cifar10_1_mcnemar_p")) if report[key] is not None
        ]
        lines.append("Paired McNemar p against the baseline: " + ", ".join(ps))
    if report.get("test_sets"):
        lines += ["", _row("test set", "images", "acc", "gap to C10", "Δ vs baseline", "McNemar p"), _row("---", *["---:"] * 5)]
        for name, r in report["test_sets"].items():
            lines.append(_row(name, r["n"], _pct(r["acc"]), _pct(r["gap"]), _delta(r["acc_delta"]), format_p(r["mcnemar_p"])))
    base_pc = ((base_res or {}).get("cifar10") or {}).get("per_class_acc")
    columns = [list(report["per_class_acc"].values())] + ([base_pc] if base_pc else [])
    lines += ["", _row("class", "C10 acc", *(["baseline"] if base_pc else [])), _row("---", *["---:"] * len(columns))]
    lines += [_row(name, *map(_pct, accs)) for name, *accs in zip(report["per_class_acc"], *columns)]
    return "\n".join(lines)

"""``resetnet models``: the registry as a table (stem, parameters, MACs per image)."""

from __future__ import annotations

import argparse

HELP = "list the registered models: stem, parameters, MACs per image (dense and per hard route)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--filter", default="", help="only names containing this text")


def model_table(filter: str = "") -> str:
    """The Markdown table ``resetnet models`` prints (docs/model.md holds the full one)."""
    import torch

    from ..profile import macs_bounds
    from . import create_model, list_models

    lines = ["| model | stem | params | MACs/image, dense | MACs/image, one unit per iteration |", "| --- | --- | ---: | ---: | ---: |"]
    for name in list_models(filter):
        with torch.device("meta"):  # no weight initialisation: the values do not matter for counting
            model = create_model(name)
        model = model.to_empty(device="cpu").eval()
        with torch.no_grad():  # zeros, not uninitialised memory (denormals make the convolutions crawl)
            for t in model.state_dict().values():
                t.zero_()
        params = sum(p.numel() for p in model.parameters())
        macs = macs_bounds(model)
        stem = "conv, max-pool (paper)" if getattr(model, "stem_maxpool", False) else "conv (He et al.)"
        route = f"{macs['route'] / 1e6:.1f}M" if model.reset_modules() else "-"
        lines.append(f"| {name} | {stem} | {params / 1e6:.3f}M | {macs['dense'] / 1e6:.1f}M | {route} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    print(model_table(args.filter))
    return 0

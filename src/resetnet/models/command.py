"""``resetnet models``: the registry as a table (name, parameters, MACs per image)."""
from __future__ import annotations

import argparse

HELP = "list the registered models with parameters and MACs per image"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--filter", default="", help="only names containing this text")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..profile import macs_per_image
    from . import create_model, list_models

    print("| model | params | MACs/image (eval routing) |")
    print("| --- | ---: | ---: |")
    x = torch.zeros(1, 3, 32, 32)
    for name in list_models(args.filter):
        model = create_model(name).eval()
        params = sum(p.numel() for p in model.parameters())
        macs = float(macs_per_image(model, x)[0])
        print(f"| {name} | {params / 1e6:.3f}M | {macs / 1e6:.1f}M |")
    return 0

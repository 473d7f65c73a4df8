"""Regenerate the generated parts of docs/: ``python tools/gen_docs.py``.

Each generated block sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers;
tests compare the blocks with what the code produces, so the docs cannot drift.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def replace_block(path: Path, name: str, body: str) -> bool:
    """Put ``body`` between the markers of block ``name`` in ``path``; returns whether the file changed."""
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: no <!-- {name}:begin/end --> markers")
    new = pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text)
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def main() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "tools"))
    import import_graph
    from resetnet.models.command import model_table
    from resetnet.train.config import config_table

    blocks = (
        ("model.md", "models", model_table()),
        ("training.md", "config", config_table()),
        ("architecture.md", "architecture", import_graph.diagram(import_graph.imports())),
    )
    for doc, block, text in blocks:
        changed = replace_block(ROOT / "docs" / doc, block, text)
        print(f"docs/{doc} ({block}): " + ("updated" if changed else "up to date"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

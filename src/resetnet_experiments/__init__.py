"""The experiments that reproduce the ReSet paper, beside the ``resetnet`` library.

``tables`` (the paper's rows, budgets and numbers; aggregation and writers), ``pipelines`` (the
staged training pipelines as Python functions), ``hooks`` (their trainer callbacks), ``reproduce``
(the harness), ``analysis`` (the paper's route figures) and ``command`` (``resetnet reproduce``;
it and ``resetnet analyze`` are registered through the ``resetnet.commands`` entry point).
This package depends on ``resetnet``; the library never imports it.
"""

from importlib import resources
from pathlib import Path


def configs_dir() -> Path:
    """The experiments' configs (Table 1-3 rows and stages), found by name by ``resetnet`` through an entry point."""
    return Path(str(resources.files(__name__) / "configs"))

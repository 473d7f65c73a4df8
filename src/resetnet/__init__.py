"""resetnet: dynamic recurrent routing in ResNet-like networks (ReSet, Kemaev et al. 2018).

The core import is light (torch, numpy, pyyaml): training, plotting and logging dependencies
are imported only where they are used, and the experiments that reproduce the paper
(``resetnet_experiments``) are a separate package that depends on this one.
"""

__version__ = "0.4.0"  # the one version source (pyproject reads it)

from . import losses, profile  # noqa: E402
from .models import create_model, list_models, load_model, register_model  # noqa: E402
from .nn import ReSet, Routing  # noqa: E402

__all__ = ["ReSet", "Routing", "create_model", "list_models", "load_model", "register_model", "losses", "profile", "__version__"]

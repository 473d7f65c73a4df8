"""resetnet: dynamic recurrent routing in ResNet-like networks (ReSet, Kemaev et al. 2018).

The core import is light (torch, numpy, pyyaml): training, plotting and
logging dependencies are imported only where they are used.
"""
from . import losses, profile
from .models import create_model, list_models, register_model
from .nn import ReSet, Routing

__version__ = "0.2.0"
__all__ = ["ReSet", "Routing", "create_model", "list_models", "register_model", "losses", "profile", "__version__"]

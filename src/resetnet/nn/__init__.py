"""Modules, controllers and scorers."""

from .blocks import BasicBlock, ConvBNReLU, DownsampleBlock, ResidualSequence
from .controllers import CONTROLLERS, CNNController, ConvFeatures, PooledRNNController, RNNController, build_controller
from .dispatch import call_unit
from .norm import BN_MODES, IterationBatchNorm2d
from .reset import EXECUTION_MODES, ReSet
from .routing import Routing
from .scorers import SCORERS, GumbelSoftmaxScorer, GumbelSTScorer, Scorer, SoftmaxScorer, TopKScorer, build_scorer, set_temperature

__all__ = ["BasicBlock", "ConvBNReLU", "DownsampleBlock", "ResidualSequence", "CONTROLLERS", "CNNController", "ConvFeatures"]
__all__ += ["PooledRNNController", "RNNController", "build_controller", "BN_MODES", "IterationBatchNorm2d", "EXECUTION_MODES", "ReSet", "call_unit"]
__all__ += ["Routing", "SCORERS", "Scorer", "SoftmaxScorer", "GumbelSoftmaxScorer", "GumbelSTScorer", "TopKScorer", "build_scorer"]
__all__ += ["set_temperature"]

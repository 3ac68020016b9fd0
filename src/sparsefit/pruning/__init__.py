"""One-shot pruning: pure algorithms (magnitude, wanda, sparsegpt, owl) and the layer-by-layer driver."""

from sparsefit.pruning.config import OneShotConfig
from sparsefit.pruning.oneshot import OneShotReport, oneshot
from sparsefit.pruning.structure import Structure

__all__ = ["OneShotConfig", "OneShotReport", "Structure", "oneshot"]

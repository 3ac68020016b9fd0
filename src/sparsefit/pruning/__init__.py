"""One-shot pruning: pure algorithms (magnitude, wanda, sparsegpt, owl) and the layer-by-layer driver."""

from sparsefit.pruning.oneshot import OneShotConfig, oneshot
from sparsefit.pruning.structure import Structure

__all__ = ["OneShotConfig", "Structure", "oneshot"]

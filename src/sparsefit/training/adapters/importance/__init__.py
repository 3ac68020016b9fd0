"""Row-importance criteria for row-delta adapters: one pure function per file, (out, in) weights
(and gradient information) in, one score per output row out; higher is more important."""

from sparsefit.training.adapters.importance.norm import l1_scores, l2_scores
from sparsefit.training.adapters.importance.random_rows import random_scores
from sparsefit.training.adapters.importance.taylor import taylor_scores
from sparsefit.training.adapters.importance.zo_taylor import spsa_coefficient, zo_taylor_scores

__all__ = ["l1_scores", "l2_scores", "random_scores", "spsa_coefficient", "taylor_scores", "zo_taylor_scores"]

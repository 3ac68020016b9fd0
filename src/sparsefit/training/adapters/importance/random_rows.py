"""The random criterion: a baseline whose rows are drawn uniformly, reproducibly from a seed."""

from __future__ import annotations

import torch


def random_scores(out_features: int, generator: torch.Generator) -> torch.Tensor:
    """Independent uniform scores for `out_features` rows: the top R are a uniform random R-subset."""
    return torch.rand(out_features, generator=generator)

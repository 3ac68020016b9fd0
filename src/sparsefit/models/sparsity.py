"""The sparsity of a model, measured over every weight matrix of its decoder blocks.

Whatever sparsefit prints or writes as "the sparsity" comes from here: zeros over every matrix
(2-D or more) inside the decoder blocks, whatever its module type: linears, fused expert tensors
(each expert counted), shared experts, layouts no row describes. What is not counted is named:
routers (kept dense on purpose), norms and biases (vectors), adapters riding on a linear (SLoRB
branches, row deltas: saved in files of their own), and everything outside the blocks
(embeddings, final norm, head). A per-kind breakdown (the name inside a block, block and expert
index dropped) shows which kind of matrix holds which sparsity.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sparsefit.models.layout import decoder_layout, is_prunable, is_router

# A matrix with fewer rows or columns than this (a shared expert's one-output gate) is too small to
# matter to the size or speed of a model: it is counted, but never reported as left dense.
SMALL_SIDE = 8


@dataclass
class BlockMatrix:
    name: str  # module name of a 2-D weight, or the parameter's name of a fused (experts, out, in) one
    param: str  # full parameter name (a state dict's key)
    kind: str  # the name inside its block, e.g. "self_attn.q_proj", "mlp.experts.gate_up_proj"
    tensor: torch.Tensor

    @property
    def small(self) -> bool:
        return min(self.tensor.shape[-2:]) < SMALL_SIDE


def block_matrices(model: nn.Module) -> tuple[list[BlockMatrix], dict[str, str]]:
    """Every counted matrix of the decoder blocks, and what is left out as {name pattern: why}."""
    layout = decoder_layout(model)
    matrices, excluded = [], {}
    for i, block in enumerate(layout.blocks):
        linears = [name for name, module in block.named_modules() if is_prunable(module)]
        for rel, p in block.named_parameters():
            module_rel, _, leaf = rel.rpartition(".")
            pattern = f"{layout.prefix}.*.{rel}"
            if any(module_rel.startswith(f"{lin}.") for lin in linears):
                excluded[pattern] = "adapter riding on a linear (SLoRB branch, row delta; saved apart)"
            elif is_router(layout.arch, module_rel):
                excluded[pattern] = "router (kept dense)"
            elif p.ndim < 2 or leaf.endswith("bias"):  # GPT-OSS's expert biases are (experts, out)
                excluded[pattern] = "norm or bias (a vector)"
            else:
                fused = p.ndim > 2 or leaf != "weight"  # a bare parameter, not a module's weight
                kind = rel if fused else module_rel
                matrices.append(BlockMatrix(f"{layout.prefix}.{i}.{kind}", f"{layout.prefix}.{i}.{rel}", kind, p))
    inside = {id(p) for p in layout.blocks.parameters()}
    outside = [name for name, p in model.named_parameters() if id(p) not in inside]
    if outside:
        excluded["outside the decoder blocks: " + ", ".join(outside)] = "embeddings, final norm, head"
    return matrices, excluded


def _slices(t: torch.Tensor) -> list[torch.Tensor]:
    """A matrix, or each (out, in) slice of a fused (experts, out, in) tensor."""
    return [t] if t.ndim == 2 else list(t.reshape(-1, *t.shape[-2:]))


def measure_sparsity(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict:
    """Zeros over every counted block matrix (of `state_dict` when given), with the breakdowns.

    {"overall", "weights", "per_layer" (by matrix), "per_expert" (fused tensors: one figure per
    expert), "per_kind" ({kind: {"sparsity", "weights"}}), "excluded" ({pattern: why})}.
    """
    matrices, excluded = block_matrices(model)
    zeros = numel = 0
    per_layer, per_expert, kinds = {}, {}, {}
    for m in matrices:
        t = state_dict[m.param] if state_dict is not None else m.tensor
        z = [int((s == 0).sum()) for s in _slices(t.detach())]
        n = t.numel()
        zeros, numel = zeros + sum(z), numel + n
        per_layer[m.name] = sum(z) / n
        if t.ndim > 2:
            per_expert[m.name] = [zi * len(z) / n for zi in z]
        kz, kn = kinds.get(m.kind, (0, 0))
        kinds[m.kind] = (kz + sum(z), kn + n)
    return {
        "overall": zeros / max(numel, 1),
        "weights": numel,
        "measured_over": "every weight matrix of the decoder blocks (each expert included)",
        "per_layer": per_layer,
        "per_expert": per_expert,
        "per_kind": {k: {"sparsity": z / n, "weights": n} for k, (z, n) in kinds.items()},
        "excluded": excluded,
    }


def name_pattern(name: str) -> str:
    """A block matrix's name with its block index as `*`: `model.layers.*.mlp.experts.down_proj`."""
    return re.sub(r"\.\d+\.", ".*.", name, count=1)


def dense_patterns(
    model: nn.Module,
    deliberate: Callable[[str], bool] = lambda name: False,
    measured: dict | None = None,
    below: float = 0.01,
) -> list[str]:
    """Name patterns (block index as `*`, with the experts concerned) of block matrices left dense:
    fewer than `below` of their weights zero. Small matrices are not reported, nor those `deliberate`
    says were excluded on purpose (by the user's --ignore or --targets)."""
    measured = measured or measure_sparsity(model)
    found: dict[str, set[str]] = {}
    for m in block_matrices(model)[0]:
        if m.small or deliberate(m.name):
            continue
        pattern = name_pattern(m.name)
        per = measured["per_expert"].get(m.name)
        if per is None:
            if measured["per_layer"][m.name] < below:
                found.setdefault(pattern, set())
        else:
            dense = [str(e) for e, s in enumerate(per) if s < below]
            if dense:
                found.setdefault(pattern, set()).update(dense)
    out = []
    for pattern, experts in found.items():
        if experts and len(experts) < len(measured["per_expert"].get(pattern.replace("*", "0"), [])):
            out.append(f"{pattern} (experts {', '.join(sorted(experts, key=int))})")
        else:
            out.append(pattern + (" (every expert)" if experts else ""))
    return out

"""Where the decoder blocks of a causal LM are, which of their modules are prunable linears, and
which of those share an input.

The blocks and the input groups come from the family's row in `architectures.ARCHITECTURES`;
prunable layers are `nn.Linear`, GPT-2's `Conv1D` (whose weight is stored transposed, (in, out)) and,
in the mixture-of-experts rows, each expert's slice of the fused expert tensors (`ExpertMatrix`,
named `<experts module>.<parameter>.<expert>`). Routers the row names are never selected.
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparsefit.errors import UsageError
from sparsefit.models.architectures import ARCHITECTURES, Architecture
from sparsefit.models.experts import ExpertMatrix, expert_matrices


@dataclass
class DecoderLayout:
    prefix: str  # module name of the block list, e.g. "model.layers"
    blocks: nn.ModuleList
    groups: tuple[tuple[str, ...], ...] = ()  # linears of a block that share an input (names inside the block)
    arch: Architecture | None = None  # the family's row; None under the generic rule

    def input_groups(self, layers: dict[str, nn.Module], block_name: str) -> list[list[str]]:
        """`layers` (full names, all in block `block_name`) as groups fed one input, in forward order.

        A group keeps the members that are in `layers`; a linear no group names stands alone.
        """
        grouped, placed = [], set()
        for group in self.groups:
            members = [f"{block_name}.{rel}" for rel in group if f"{block_name}.{rel}" in layers]
            if members:
                grouped.append(members)
                placed.update(members)
        return grouped + [[name] for name in layers if name not in placed]


def decoder_layout(model: nn.Module) -> DecoderLayout:
    """The model's decoder blocks and input groups, from its family's row in `ARCHITECTURES`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is not None:
        blocks = model.get_submodule(arch.blocks)
        return DecoderLayout(arch.blocks, blocks, arch.groups, arch)
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise UsageError(
            f"{type(model).__name__} has no list of decoder blocks; only decoder-only causal LMs are supported"
        )
    _warn_generic(str(model_type), best[0])
    return DecoderLayout(best[0], best[1])


@functools.cache
def _warn_generic(model_type: str, prefix: str) -> None:
    """Once per family and process: the generic rule is a guess, and slower where inputs are shared."""
    print(
        f"warning: model type '{model_type}' has no row in sparsefit's architecture table; "
        f"using '{prefix}' (the longest module list) as its blocks and pruning each linear alone",
        file=sys.stderr,
        flush=True,
    )


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def weight_as_out_in(module: nn.Module) -> torch.Tensor:
    """The layer's weight viewed as (out_features, in_features), as every pruning function expects."""
    return module.weight.data.t() if isinstance(module, Conv1D) else module.weight.data


def set_weight_out_in(module: nn.Module, weight: torch.Tensor) -> None:
    target = module.weight.data
    target.copy_(weight.t() if isinstance(module, Conv1D) else weight)


def is_router(arch: Architecture | None, name: str) -> bool:
    """Whether `name` (inside a block) is, or is inside, a router of the family's row."""
    return arch is not None and any(name == r or name.startswith(r + ".") for r in arch.routers)


def selected(name: str, targets: list[str] | None, ignore: list[str] | None) -> bool:
    """Whether the user's `targets` regexes (any; none given: all) and none of `ignore` match `name`."""
    if targets and not any(re.search(t, name) for t in targets):
        return False
    return not (ignore and any(re.search(i, name) for i in ignore))


def select_linears(
    block: nn.Module,
    block_name: str,
    targets: list[str] | None,
    ignore: list[str] | None,
    arch: Architecture | None = None,
) -> dict[str, nn.Module | ExpertMatrix]:
    """Prunable linears of one block by full name: matching any `targets` regex, none of `ignore`.

    With a mixture-of-experts row, every expert matrix too (`<module>.<param>.<expert>`); routers never.
    """
    found = {}
    for name, module in block.named_modules():
        if not is_prunable(module) or is_router(arch, name):
            continue
        full = f"{block_name}.{name}"
        if selected(full, targets, ignore):
            found[full] = module
    experts = arch.experts if arch is not None else None
    module = _submodule(block, experts.module) if experts is not None else None
    if module is not None:  # not every block has experts (DeepSeek's first are dense)
        for full, matrix in expert_matrices(module, arch.experts, f"{block_name}.{arch.experts.module}").items():
            if selected(full, targets, ignore):
                found[full] = matrix
    return found


def _submodule(block: nn.Module, name: str) -> nn.Module | None:
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


def decoder_linears(model: nn.Module) -> dict[str, nn.Module | ExpertMatrix]:
    """Every prunable linear (expert matrices included) of the decoder blocks, by full name, in block order."""
    layout = decoder_layout(model)
    found = {}
    for i, block in enumerate(layout.blocks):
        found.update(select_linears(block, f"{layout.prefix}.{i}", None, None, layout.arch))
    return found


def params_outside_blocks(model: nn.Module, layout: DecoderLayout) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything but the decoder blocks: embeddings, final norm, head (tied ones once)."""
    inside = {id(p) for p in layout.blocks.parameters()}
    return [(name, p) for name, p in model.named_parameters() if id(p) not in inside]


def move_except_blocks(model: nn.Module, layout: DecoderLayout, device: torch.device) -> None:
    """Move everything but the decoder blocks to `device` (embeddings, rotary tables, final norm, head)."""

    def visit(module: nn.Module, path: str) -> None:
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            if child is layout.blocks:
                continue
            if layout.prefix.startswith(child_path + "."):
                visit(child, child_path)
            else:
                child.to(device)
        for p in module.parameters(recurse=False):
            p.data = p.data.to(device)
        for key, buf in module.named_buffers(recurse=False):
            setattr(module, key, buf.to(device))

    visit(model, "")

"""Where the decoder blocks of a causal LM are, and which of their modules are prunable linears.

One generic rule instead of a per-architecture table: the blocks are the longest
`nn.ModuleList` in the model, and prunable layers are `nn.Linear` and GPT-2's `Conv1D`
(whose weight is stored transposed, (in, out)).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparsefit.errors import UsageError


@dataclass
class DecoderLayout:
    prefix: str  # module name of the block list, e.g. "model.layers"
    blocks: nn.ModuleList


def decoder_layout(model: nn.Module) -> DecoderLayout:
    """The model's list of decoder blocks (Llama `model.layers`, GPT-2 `transformer.h`, OPT `model.decoder.layers`)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise UsageError(
            f"{type(model).__name__} has no list of decoder blocks; only decoder-only causal LMs are supported"
        )
    return DecoderLayout(best[0], best[1])


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def weight_as_out_in(module: nn.Module) -> torch.Tensor:
    """The layer's weight viewed as (out_features, in_features), as every pruning function expects."""
    return module.weight.data.t() if isinstance(module, Conv1D) else module.weight.data


def set_weight_out_in(module: nn.Module, weight: torch.Tensor) -> None:
    target = module.weight.data
    target.copy_(weight.t() if isinstance(module, Conv1D) else weight)


def select_linears(
    block: nn.Module, block_name: str, targets: list[str] | None, ignore: list[str] | None
) -> dict[str, nn.Module]:
    """Prunable linears of one block by full module name: matching any `targets` regex, none of `ignore`."""
    found = {}
    for name, module in block.named_modules():
        if not is_prunable(module):
            continue
        full = f"{block_name}.{name}"
        if targets and not any(re.search(t, full) for t in targets):
            continue
        if ignore and any(re.search(i, full) for i in ignore):
            continue
        found[full] = module
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

"""Fused expert tensors as linears: each expert's matrix a weight of its own, and its routed inputs.

transformers 5.x keeps a mixture-of-experts layer's weights as 3-D parameters (experts, out, in)
(`FusedExperts` rows of the architecture table). `ExpertMatrix` presents one expert's slice as a
layer with a `weight` (a view into the parameter: writing it writes the model), so pruning, masks and
accounting treat it like any linear. `routed_inputs` computes what each expert's matrices receive
under the model's own routing, from the call of the experts module (captured by a forward pre-hook;
no transformers class is patched).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from sparsefit.models.architectures import FusedExperts


class ExpertMatrix:
    """One expert's (out, in) matrix of a fused (experts, out, in) parameter of `module`."""

    def __init__(self, module: nn.Module, spec: FusedExperts, param: str, index: int) -> None:
        self.module, self.spec, self.param, self.index = module, spec, param, index

    @property
    def weight(self) -> torch.Tensor:
        """(out, in); for a parameter stored (experts, in, out) a transposed view, writes reaching it all the same."""
        w = getattr(self.module, self.param).data[self.index]
        return w.t() if self.spec.transposed else w

    def __repr__(self) -> str:
        return f"ExpertMatrix({type(self.module).__name__}.{self.param}[{self.index}])"


def expert_count(module: nn.Module, spec: FusedExperts) -> int:
    return getattr(module, spec.gate_up).shape[0]


def expert_matrices(module: nn.Module, spec: FusedExperts, module_name: str) -> dict[str, ExpertMatrix]:
    """`{module_name}.{param}.{e}` -> the matrix, for both fused parameters and every expert."""
    return {
        f"{module_name}.{param}.{e}": ExpertMatrix(module, spec, param, e)
        for param in (spec.gate_up, spec.down)
        for e in range(expert_count(module, spec))
    }


def experts_module_name(name: str) -> str:
    """The experts module of an expert matrix's name `<module>.<param>.<expert>`."""
    return name.rsplit(".", 2)[0]


@torch.no_grad()
def routed_inputs(
    module: nn.Module, spec: FusedExperts, hidden: torch.Tensor, top_k_index: torch.Tensor, every_token: bool = False
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(expert, input of its gate_up (n, hidden), input of its down (n, intermediate)) for every expert
    that receives tokens, as the eager forward of the experts module computes them (current weights).

    `every_token`: every expert takes every token, as if routed to all (llm-compressor's
    `moe_calibrate_all_experts`); the model's own output is unchanged.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    gate_up = getattr(module, spec.gate_up)
    for e in range(gate_up.shape[0]):
        if every_token:
            x = hidden
        else:
            tokens = (top_k_index == e).any(dim=-1).nonzero().squeeze(-1)
            if tokens.numel() == 0:
                continue
            x = hidden[tokens]
        w = gate_up[e].to(x.dtype)
        out = x @ w if spec.transposed else nn.functional.linear(x, w)
        bias = getattr(module, f"{spec.gate_up}_bias", None)
        if bias is not None:
            out = out + bias[e].to(x.dtype)
        if spec.activation == "apply_gate":  # the module's own activation (GPT-OSS)
            yield e, x, module._apply_gate(out)  # noqa: SLF001
        else:
            gate, up = out.chunk(2, dim=-1)
            yield e, x, module.act_fn(gate) * up


class FusedWeight:
    """A whole fused (experts, out, in) parameter as a layer whose `weight` it is: fine-tuning masks
    hold one 3-D mask for it, so gradients and optimizer state (keyed by the parameter) are masked."""

    def __init__(self, module: nn.Module, param: str) -> None:
        self.module, self.param = module, param

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.module, self.param)

    def __repr__(self) -> str:
        return f"FusedWeight({type(self.module).__name__}.{self.param})"


def fuse_expert_matrices(layers: dict) -> dict:
    """`layers` with each fused parameter's expert matrices replaced by one `FusedWeight` of it
    (named `<experts module>.<param>`), in place of its first expert."""
    out = {}
    for name, layer in layers.items():
        if isinstance(layer, ExpertMatrix):
            out.setdefault(name.rsplit(".", 1)[0], FusedWeight(layer.module, layer.param))
        else:
            out[name] = layer
    return out

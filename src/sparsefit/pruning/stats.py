"""Input statistics of the linears of one block, collected by forward hooks.

Wanda needs the squared norm of every input feature; SparseGPT needs X^T X. Linears fed one
input (q/k/v, gate/up: the groups of the architecture table) share one accumulator, owned by the
group's first member, so each distinct input costs one X^T X. The hooks run before each linear,
so the statistics are complete before a linear that is pruned mid-forward runs.

Expert matrices (`ExpertMatrix`, slices of fused expert tensors) have no module to hook: one hook on
their experts module takes its call (the tokens and the routing) and feeds each expert's matrices
the inputs routed to that expert (`models.experts.routed_inputs`). An expert no token reaches has
no statistics (`count` lacks it).
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import nn

from sparsefit.models.experts import ExpertMatrix, experts_module_name, routed_inputs


class InputStats:
    """Accumulate float32 input statistics of `layers` while the block runs forwards.

    `groups` lists names of `layers` that take one input (default: each alone); a group's
    statistics come from whichever member runs first in each forward.
    """

    def __init__(
        self,
        layers: dict[str, nn.Module],
        groups: list[list[str]] | None = None,
        sq_sum: bool = False,
        hessian: bool = False,
        experts_see_every_token: bool = False,
    ) -> None:
        self.layers = layers
        self.groups = groups if groups is not None else [[name] for name in layers]
        self.want_sq, self.want_hessian = sq_sum, hessian
        self.every_token = experts_see_every_token  # expert matrices: all tokens, not the routed ones
        self.count: dict[str, int] = {}
        self.sq: dict[str, torch.Tensor] = {}
        self.xtx: dict[str, torch.Tensor] = {}  # upper triangles of X^T X, until `hessian` mirrors them
        self._hessians: dict[str, torch.Tensor] = {}
        self._released: set[str] = set()  # groups solved and freed: no input may arrive for them
        self.owner = {name: group[0] for group in self.groups for name in group}  # member -> group's first
        # Groups already fed in the current forward, per scope (a forward that may be paused beside others).
        self._seen: dict[Hashable, set[str]] = {}
        self.scope: Hashable = None
        self._handles: list = []

    def hook_points(self) -> dict[str, nn.Module]:
        """Modules the statistics come from, by name: each linear, and each experts module (by its
        name) for its expert matrices."""
        points = {}
        for name, module in self.layers.items():
            if isinstance(module, ExpertMatrix):
                points.setdefault(experts_module_name(name), module.module)
            else:
                points[name] = module
        return points

    def __enter__(self) -> InputStats:
        for name, module in self.hook_points().items():
            if name in self.layers:
                self._handles.append(module.register_forward_pre_hook(self._hook(name)))
            else:
                self._handles.append(module.register_forward_pre_hook(self._experts_hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()

    def end_forward(self) -> None:
        """Forget the inputs of the current scope's forward (call after each block call)."""
        self._seen.pop(self.scope, None)

    def _hook(self, name: str):  # noqa: ANN202
        root = self.root(name)

        def hook(module: nn.Module, args: tuple) -> None:
            seen = self._seen.setdefault(self.scope, set())
            if root in seen:
                return
            seen.add(root)
            x = args[0]
            self._accumulate(root, x.detach().reshape(-1, x.shape[-1]).float())  # (n, in)

        return hook

    def _experts_hook(self, prefix: str):  # noqa: ANN202
        spec = next(
            m.spec for n, m in self.layers.items() if isinstance(m, ExpertMatrix) and n.startswith(prefix + ".")
        )

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            given = dict(zip(("hidden_states", spec.index_arg), args)) | kwargs
            hidden, index = given["hidden_states"], given[spec.index_arg]
            for e, x_gate_up, x_down in routed_inputs(module, spec, hidden, index, self.every_token):
                for param, x in ((spec.gate_up, x_gate_up), (spec.down, x_down)):
                    name = f"{prefix}.{param}.{e}"
                    if name in self.layers:
                        self._accumulate(self.root(name), x.detach().float())

        return hook

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        if name in self._released:
            raise RuntimeError(f"inputs of {name} arrived after its statistics were released")
        self.count[name] = self.count.get(name, 0) + x.shape[0]
        if self.want_sq:
            sq = (x * x).sum(0)
            self.sq[name] = self.sq[name] + sq if name in self.sq else sq
        if self.want_hessian:
            if name in self._hessians:
                raise RuntimeError(f"inputs of {name} arrived after its Hessian was read; read it once all are in")
            if name not in self.xtx:
                self.xtx[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            accumulate_upper(self.xtx[name], x)

    def release(self, name: str) -> None:
        """Free the statistics of `name`'s group once it is solved (its count stays): a block's Hessians
        would otherwise all live until the block ends (in a Mixtral-8x7B block, 7 GB of them)."""
        root = self.root(name)
        self._released.add(root)
        for store in (self._hessians, self.xtx, self.sq):
            store.pop(root, None)

    def root(self, name: str) -> str:
        return self.owner.get(name, name)

    def sq_sum(self, name: str) -> torch.Tensor:
        """Sum over all tokens of x_j^2, shape (in,)."""
        return self.sq[self.root(name)]

    def hessian(self, name: str) -> torch.Tensor:
        """H = 2 X^T X / n in float32, shape (in, in). Ends the accumulation of `name`'s group: its
        accumulator becomes H in place (one buffer of in x in, not four), and later calls return it."""
        root = self.root(name)
        if root not in self._hessians:
            H = self.xtx.pop(root).triu_()
            H += H.t().tril(-1)
            self._hessians[root] = H.mul_(2.0 / self.count[root])
        return self._hessians[root]


def accumulate_upper(xtx: torch.Tensor, x: torch.Tensor, leaf: int = 160) -> None:
    """xtx += X^T X on and above the diagonal (x: (n, d)); the blocks below it are left alone.

    X^T X is symmetric: by halves, [[A, B], [., C]] takes one product for B and recurses into A
    and C, down to diagonal blocks of at most `leaf` columns computed whole. That is a bit over half
    the multiply-adds of the full product, in fewer and squarer products than strips of rows.
    `hessian` mirrors the upper triangle.
    """
    d = x.shape[1]
    if d <= leaf:
        xtx.addmm_(x.t(), x)
        return
    h = d // 2
    xtx[:h, h:].addmm_(x[:, :h].t(), x[:, h:])
    accumulate_upper(xtx[:h, :h], x[:, :h], leaf)
    accumulate_upper(xtx[h:, h:], x[:, h:], leaf)

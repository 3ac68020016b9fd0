"""Adaptive N:M masks for sparse retraining: the Adaptive Sparse Trainer (AST; Huang et al.,
AAAI 2025, "Pruning Large Language Models with Semi-Structural Adaptive Sparse Training").

The weights stay dense (the "shadow" weights); the forward sees W * M and the straight-through
estimator gives every dense weight the gradient of W * M, so a pruned weight whose gradient keeps
pushing it up can win its place back. Per optimizer step:

1. every `mask_every` steps, recompute each layer's N:M mask (along the inputs of each row) from
   the current dense weights, by magnitude or by the Wanda score |W| * ||x|| (input norms gathered
   on the starting model, optionally refreshed), and log the fraction of positions that flipped;
2. before the forward, set the pruned weights' values aside and multiply the weights by the mask;
3. after the backward, put the values back: the gradient now on W is that of W * M (STE);
4. before the optimizer step, add SR-STE's decay to the pruned weights' gradients (`srste`).

At the end the mask is frozen and W *= M: the result is an exact N:M model. The mask is the
`SparsityMasks` of the loop, saved in every checkpoint and restored on resume, so a resumed run
continues with the mask it had (the reference code recomputes it, up to `mask_every - 1` steps stale).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparsefit.errors import SparsefitError, UsageError
from sparsefit.models.layout import weight_as_out_in
from sparsefit.models.slorb import attach_slorb, slorb_init
from sparsefit.pruning.structure import Structure, nm_keep_mask
from sparsefit.pruning.wanda import wanda_scores
from sparsefit.training.config import FinetuneConfig
from sparsefit.training.masks import SparsityMasks, decoder_linears
from sparsefit.training.sharding import full, local
from sparsefit.training.srste import add_srste_decay_, srste_lambda

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def _rows_inputs(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A tensor laid out as `module.weight` viewed as (out, in) (GPT-2's Conv1D stores (in, out))."""
    return t.t() if isinstance(module, Conv1D) else t


def adaptive_keep_mask(
    weight: torch.Tensor, structure: Structure, input_sq_sum: torch.Tensor | None = None
) -> torch.Tensor:
    """The N:M keep mask of `weight` (out, in): magnitude, or Wanda's score when the per-input sum of
    squared activations is given."""
    scores = weight.detach().abs().float() if input_sq_sum is None else wanda_scores(weight, input_sq_sum)
    return nm_keep_mask(scores, structure.n, structure.m)


@torch.no_grad()
def input_sq_sums(
    model: nn.Module, linears: dict[str, nn.Module], batches: Iterable[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Per-input sum of x^2 at each linear over `batches` (padding excluded), summed over all processes."""
    sums = {
        name: torch.zeros(weight_as_out_in(m).shape[1], dtype=torch.float32, device=m.weight.device)
        for name, m in linears.items()
    }
    keep_rows: list[torch.Tensor] = []

    def hook(name: str):  # noqa: ANN202
        def add(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] += x[keep_rows[0]].square().sum(0)

        return add

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        for batch in batches:
            keep_rows[:] = [batch["attention_mask"].reshape(-1).bool()]
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        names = list(sums)
        flat = torch.cat([sums[n] for n in names])
        dist.all_reduce(flat)
        sums = dict(zip(names, flat.split([sums[n].numel() for n in names])))
    return sums


def _check_columns(structure: Structure, linears: dict[str, nn.Module]) -> None:
    """A usage error naming the first layer whose inputs the structure's M does not divide (AST
    groups run along the inputs of every masked layer), before anything is gathered or changed."""
    for name, module in linears.items():
        try:
            structure.check_columns(weight_as_out_in(module).shape[1], name)
        except ValueError as err:
            raise UsageError(f"--structure {structure} for method ast: {err}") from None


class AdaptiveMasks:
    """The AST steps around one optimizer step, over the loop's `SparsityMasks` (see the module doc)."""

    def __init__(
        self,
        masks: SparsityMasks,
        structure: Structure,
        every: int,
        decay: float,
        increase_steps: int,
        input_sq_sum: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.masks = masks
        self.structure = structure
        self.every = every
        self.decay = decay
        self.increase_steps = increase_steps
        self.input_sq_sum = input_sq_sum  # Wanda's statistics; None: magnitude
        self._dense: dict[str, torch.Tensor] = {}  # the dense weights while the forward runs with W * M
        self._masked: set[str] = set()

    @classmethod
    def initial(
        cls,
        linears: dict[str, nn.Module],
        structure: Structure,
        every: int,
        decay: float,
        increase_steps: int,
        input_sq_sum: dict[str, torch.Tensor] | None = None,
        own_mask: bool = False,
    ) -> AdaptiveMasks:
        """Masks of the starting (full, unsharded) weights: by the metric, or with `own_mask` by magnitude
        alone, which keeps an N:M sparse model's own mask (its zeros lose to every kept weight)."""
        if not structure.is_nm:
            raise UsageError(f"adaptive masks need an N:M structure such as 2:4, got '{structure}'")
        _check_columns(structure, linears)
        stats = {} if own_mask else input_sq_sum or {}
        keeps = {
            name: _rows_inputs(m, adaptive_keep_mask(_rows_inputs(m, m.weight), structure, stats.get(name)))
            for name, m in linears.items()
        }
        return cls(SparsityMasks(linears, keeps), structure, every, decay, increase_steps, input_sq_sum)

    @torch.no_grad()
    def update(self) -> float:
        """Recompute every mask from the current dense weights; returns the fraction of positions flipped.
        Under FSDP every rank must call it (each layer's weight is gathered)."""
        flipped = total = 0
        stats = self.input_sq_sum or {}
        for name, module, old in self.masks.items():
            weight, old = full(module.weight.detach()), full(old)
            keep = _rows_inputs(
                module, adaptive_keep_mask(_rows_inputs(module, weight), self.structure, stats.get(name))
            )
            flipped += int((keep != old).sum())
            total += keep.numel()
            self.masks.set(name, keep)
        return flipped / max(total, 1)

    def due(self, step: int) -> bool:
        """A mask update before `step` (the masks of step 0 are the initial ones)."""
        return step > 0 and step % self.every == 0

    @torch.no_grad()
    def mask_weights(self) -> None:
        """Copy the dense weights aside and zero the pruned ones: the forward sees W * M.

        The copies go to buffers kept from step to step (a plain copy is much cheaper than gathering
        just the pruned values, and nothing is allocated per step)."""
        for name, module, keep in self.masks.items():
            w = local(module.weight)
            buf = self._dense.get(name)
            if buf is None or buf.shape != w.shape or buf.dtype != w.dtype or buf.device != w.device:
                buf = self._dense[name] = torch.empty_like(w)
            buf.copy_(w)
            w.mul_(local(keep))
            self._masked.add(name)

    @torch.no_grad()
    def restore_weights(self) -> None:
        """Put the dense weights back; their gradient is now that of W * M (straight-through)."""
        for name, module, _ in self.masks.items():
            if name in self._masked:
                local(module.weight).copy_(self._dense[name])
        self._masked.clear()

    def decay_grads(self, step: int) -> float:
        """SR-STE: add lambda(step) * (1 - M) * W to the gradients of the dense weights; returns lambda."""
        if self._masked:
            raise RuntimeError("SR-STE's decay applies to the dense weights: restore them first")
        lam = srste_lambda(step, self.decay, self.increase_steps)
        for name, module, keep in self.masks.items():
            if module.weight.grad is not None and lam:
                scratch = self._dense.get(name)  # free between restore and the next mask_weights
                add_srste_decay_(local(module.weight.grad), local(module.weight), local(keep), lam, scratch)
        return lam

    @torch.no_grad()
    def finalize(self) -> None:
        """Freeze the mask: W *= M, then check that every layer is an exact N:M layer."""
        self.masks.apply_to_weights()
        for name, module, _ in self.masks.items():
            if not self.structure.holds(_rows_inputs(module, full(module.weight.detach()))):
                raise SparsefitError(f"{name} is not {self.structure} after training; this is a bug, please report it")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint needs besides the masks: Wanda's statistics (empty for magnitude)."""
        return {f"{name}.input_sq_sum": t.cpu() for name, t in (self.input_sq_sum or {}).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.input_sq_sum is not None:
            device = {name: t.device for name, t in self.input_sq_sum.items()}
            self.input_sq_sum = {name: state[f"{name}.input_sq_sum"].to(device[name]) for name in self.input_sq_sum}


@torch.no_grad()
def fill_pruned_from(linears: dict[str, nn.Module], keeps: dict[str, torch.Tensor], source: nn.Module) -> None:
    """Give each pruned weight (keep False) the value of the same weight in `source` (the dense teacher),
    so that a model pruned in one shot starts AST with dense shadow weights behind its own mask."""
    theirs = dict(source.named_modules())
    for name, module in linears.items():
        other = theirs.get(name)
        if other is None or getattr(other, "weight", None) is None or other.weight.shape != module.weight.shape:
            raise UsageError(
                f"the teacher has no weight shaped like {name}'s: starting from its values needs the same architecture"
            )
        pruned = ~keeps[name]
        module.weight[pruned] = other.weight.detach().to(module.weight.device, module.weight.dtype)[pruned]


def cap_pruned_scores(
    weight: torch.Tensor, keep: torch.Tensor, m: int, cap: float, input_sq_sum: torch.Tensor | None = None
) -> torch.Tensor:
    """`weight` (out, in) with each pruned weight (keep False) shrunk, sign kept, until its score (|w|, or
    Wanda's |w| * ||x|| given the per-input sum of x^2) is at most `cap` (< 1) times the smallest kept
    score of its group of `m` inputs. Recomputing the mask by that score then gives `keep` back: a
    pruned weight wins a place only once training has moved it (or the kept ones) past that margin.
    Inputs that never fire score 0 whatever their weight: those weights are left as they are, and where
    a kept weight sits on one, the pruned weights of its group become 0."""
    out, inp = weight.shape
    w = weight.detach().float()
    norms = torch.ones(inp, device=w.device) if input_sq_sum is None else input_sq_sum.detach().float().sqrt()
    scores = w.abs() * norms
    floor = scores.masked_fill(~keep, float("inf")).view(out, inp // m, m).amin(-1, keepdim=True)
    limit = cap * floor.expand(out, inp // m, m).reshape(out, inp) / norms.clamp_min(torch.finfo(torch.float32).tiny)
    limit = torch.where(norms > 0, limit, torch.full_like(limit, float("inf")))
    capped = torch.where(keep, w, w.sign() * torch.minimum(w.abs(), limit))
    return capped.to(weight.dtype)


def setup_adaptive(
    model: PreTrainedModel,
    config: FinetuneConfig,
    steps: int,
    stats_batches: Iterable[dict[str, torch.Tensor]],
    teacher: nn.Module | None = None,
) -> AdaptiveMasks:
    """The initial masks of the (full, unsharded) model for `config.ast`, with Wanda's statistics from
    `stats_batches` when asked, and SLoRB branches initialised from the weights the masks prune.

    With `pruned_start` 'teacher' or 'capped' the model must already be N:M sparse: its mask is the initial
    one and its pruned weights take the teacher's values, 'capped' shrinking them below its group's kept
    scores (`cap_pruned_scores`); the statistics are gathered before, on the sparse model. 'auto' is
    'capped' for an N:M sparse model with a teacher, else 'zero'."""
    ast = config.ast
    linears = decoder_linears(model, config.targets, config.ignore)
    structure = Structure.parse(ast.structure)
    _check_columns(structure, linears)
    not_nm = next((name for name, m in linears.items() if not structure.holds(weight_as_out_in(m))), None)
    start = ast.pruned_start
    if start == "auto":
        start = "capped" if not_nm is None and teacher is not None else "zero"
    own = start != "zero"
    if own:
        if teacher is None:
            raise UsageError(f"ast pruned_start '{start}' needs a teacher: set --teacher")
        if not_nm is not None:
            raise UsageError(
                f"ast pruned_start '{start}' starts from a {structure} model, but {not_nm} is not "
                f"{structure}: prune it first (sparsefit prune --structure {structure})"
            )
    stats = None
    if ast.mask_metric == "wanda":
        was_training = model.training
        stats = input_sq_sums(model.eval(), linears, stats_batches)
        model.train(was_training)
    increase = ast.increase_steps if ast.increase_steps is not None else steps // 4
    adaptive = AdaptiveMasks.initial(linears, structure, ast.mask_every, ast.srste_decay, increase, stats, own)
    if own:
        fill_pruned_from(linears, adaptive.masks.masks, teacher)
    if start == "capped":
        with torch.no_grad():
            for name, module, keep in adaptive.masks.items():
                w = _rows_inputs(module, module.weight)
                sq_sum = (stats or {}).get(name)
                w.copy_(cap_pruned_scores(w, _rows_inputs(module, keep), structure.m, ast.pruned_cap, sq_sum))
    if ast.slorb:
        init = {}
        try:
            for name, module, keep in adaptive.masks.items():
                init[name] = slorb_init(
                    weight_as_out_in(module), _rows_inputs(module, keep), ast.slorb_k, ast.slorb_init
                )
            attach_slorb(linears, ast.slorb_k, init, ast.slorb_trainable_projection)
        except ValueError as err:
            raise UsageError(f"{err}: choose a --slorb-k that divides every layer's inputs") from None
    return adaptive

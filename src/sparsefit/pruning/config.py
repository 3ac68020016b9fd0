"""Every option of one-shot pruning, with its default and help; validated on construction.

Kept free of torch so that the command line can build its flags from it quickly.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from sparsefit.config import MAX_DIM, LayerwiseOptions, check_regexes

# The fields each preset sets, unless they are given explicitly; the one place their values live.
PRESETS: dict[str, dict] = {
    "best": {"sequential": True, "reconstruct_iters": 4, "damp": 0.03},
    "paper": {"sequential": False, "reconstruct_iters": 0, "damp": 0.01},
}
_BEST, _PAPER = PRESETS["best"], PRESETS["paper"]


def preset_settings(preset: str, method: str) -> dict:
    """The fields a preset sets for a method, unless they are given explicitly.

    "best": what measured best on perplexity and time (benchmarks/README.md): the sequential order
    and, for SparseGPT, a 4-step least-squares refit of the kept weights and 3x the paper's dampening
    (fitted to the calibration set less tightly, the pruned model generalises better). "paper": each
    paper's own procedure (SparseGPT, Wanda: every linear of a block from the dense block's
    statistics, no refit; SparseGPT's 1% dampening).
    """
    settings = dict(PRESETS[preset])
    if method != "sparsegpt":
        settings["reconstruct_iters"] = 0  # Wanda stays a cheap method; magnitude has no statistics to refit
    return settings


class OneShotConfig(LayerwiseOptions):
    """Every option of one-shot pruning, with its default; validated on construction."""

    preset: Literal["best", "paper"] = Field(
        "best",
        description="best: the settings that measured best (sequential order; with sparsegpt a "
        f"{_BEST['reconstruct_iters']}-step refit, damp {_BEST['damp']}) | paper: each paper's own procedure "
        f"(two-pass order, no refit, damp {_PAPER['damp']}); explicit options win",
    )
    method: Literal["magnitude", "wanda", "sparsegpt"] = "sparsegpt"
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="target fraction of zeros, in [0, 1)")
    structure: str = Field("unstructured", description="unstructured or N:M (keep N of every M), e.g. 2:4")
    profile: Literal["uniform", "owl"] | dict[str, float] = Field(
        "uniform", description="uniform (default) | owl | file.yaml mapping layer regexes to sparsities"
    )
    owl_m: float = Field(5.0, gt=0, le=1e6, description="OWL outlier threshold M")
    owl_lambda: float = Field(0.08, ge=0, lt=1, description="OWL sparsity spread lambda")
    block_size: int = Field(128, ge=1, le=MAX_DIM, description="SparseGPT column block")
    damp: float = Field(
        _BEST["damp"], gt=0, le=10,
        description="dampening of SparseGPT and the refit, a fraction of the Hessian's mean diagonal "
        f"(default: the preset's, {_BEST['damp']}; paper {_PAPER['damp']})"
    )  # fmt: skip
    magnitude_scope: Literal["layer", "row"] = Field(
        "layer", description="magnitude: rank weights per layer or per row"
    )
    # A least-squares refit (conjugate gradient on the calibration inputs) of the kept weights to the
    # dense layer's outputs, after each mask is chosen.
    reconstruct_iters: int = Field(
        _BEST["reconstruct_iters"], ge=0, le=10_000,
        description="refit steps of the kept weights after each mask (default: "
        f"the preset's, {_BEST['reconstruct_iters']} with sparsegpt, else 0; 0: the method's own weights)"
    )  # fmt: skip
    # Fewer tokens than this give noisy norms and a rank-deficient Hessian: such an expert's matrices are
    # pruned by magnitude (data-free) instead, and the report lists them with their token counts.
    min_expert_tokens: int = Field(
        16, ge=0, description="mixture of experts: an expert routed fewer calibration tokens than this is pruned "
        "by magnitude (data-free), and reported"
    )  # fmt: skip
    expert_calibration: Literal["routed", "all"] = Field(
        "routed", description="mixture of experts: each expert's statistics from the tokens routed to it (routed) "
        "or from every calibration token (all, as llm-compressor's moe_calibrate_all_experts)"
    )  # fmt: skip
    preserve_mask: bool = Field(False, description="keep existing zeros pruned (iterative pruning)")
    # The GPTQ reference code's --true-sequential.
    sequential: bool = Field(
        _BEST["sequential"],
        description="prune each linear with the earlier linears of its block already pruned, one forward per block "
        "instead of two (default: the preset's, on); off: every linear sees the dense block",
    )
    # Resident memory then holds about one block's weights plus the activations; freed heap goes
    # back to the OS after each block. Results are identical with and without it.
    offload_dir: str | None = Field(
        "auto",
        description="low-memory mode: each pruned block's weights (and the paused sequential forwards' MLP "
        "intermediates) move to files here, mapped back lazily (default auto: a temporary folder in the system's "
        "temp directory when that is on a disk, else only when memory would not suffice; none: everything stays "
        "in memory, about a tenth faster for half as much memory again)",
    )

    @field_validator("offload_dir")
    @classmethod
    def _offload_dir(cls, v: str | None) -> str | None:
        return None if v is None or v.strip().lower() in ("", "none") else v

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: object) -> object:
        if not isinstance(data, dict) or data.get("preset", "best") not in ("best", "paper"):
            return data  # the field validators name what is wrong
        method = data.get("method", "sparsegpt")
        settings = preset_settings(data.get("preset", "best"), method)
        return {**settings, **data}

    @field_validator("structure")
    @classmethod
    def _structure(cls, v: str) -> str:
        return str(_parse_structure(v))

    @field_validator("profile")
    @classmethod
    def _profile(cls, v: str | dict[str, float]) -> str | dict[str, float]:
        if isinstance(v, dict):
            check_regexes(list(v))
            for key, s in v.items():
                if not 0.0 <= s < 1.0:
                    raise ValueError(f"sparsity {s} for '{key}' must be in [0, 1)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> OneShotConfig:
        nm = _parse_structure(self.structure)
        if nm.is_nm and self.profile != "uniform":
            raise ValueError("N:M structure fixes the sparsity of every layer; use profile 'uniform'")
        if self.method != "magnitude" and self.calib is None:
            raise ValueError(f"method '{self.method}' needs calibration data: set calib to a dataset or 'self'")
        if self.reconstruct_iters and self.method == "magnitude":
            raise ValueError("reconstruct_iters needs calibration statistics: use method 'wanda' or 'sparsegpt'")
        if self.profile == "owl" and self.calib is None:
            raise ValueError("profile 'owl' needs calibration data (Wanda scores): set calib")
        return self

    @property
    def target_sparsity(self) -> float:
        nm = _parse_structure(self.structure)
        return nm.sparsity if nm.is_nm else self.sparsity


def _parse_structure(text: str):  # noqa: ANN202 - a Structure; imported here because it brings torch
    from sparsefit.pruning.structure import Structure

    return Structure.parse(text)

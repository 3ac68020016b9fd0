"""Every option of mask-preserving quantization, with its default and help; validated on construction.

Kept free of torch so that the command line can build its flags from it quickly.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sparsefit.config import MAX_DIM, LayerwiseOptions

# scheme -> (weight grid kind, bits, per-group by default, activations quantized at inference)
SCHEMES: dict[str, tuple[str, int, bool, bool]] = {
    "w4a16": ("int", 4, True, False),
    "w8a16": ("int", 8, True, False),
    "w8a8-int8": ("int", 8, False, True),
    "w8a8-fp8": ("float", 8, False, True),
}


class QuantizeConfig(LayerwiseOptions):
    """Options of `sparsefit quantize`; pruned weights stay exactly zero whatever they are."""

    scheme: Literal["w4a16", "w8a16", "w8a8-int8", "w8a8-fp8"] = Field(
        "w4a16",
        description="w4a16 | w8a16: integer weights, 16-bit activations | w8a8-int8 | w8a8-fp8: 8-bit weights "
        "(per output channel) and dynamic per-token 8-bit activations",
    )
    method: Literal["gptq", "rtn"] = Field(
        "gptq", description="gptq: error-compensating, needs calibration data | rtn: round to nearest, no data"
    )
    group_size: int | None = Field(
        128,
        ge=1,
        le=MAX_DIM,
        description="input columns per weight scale for w4a16 / w8a16 (default 128, or 64 / 32 when 128 does "
        "not divide a layer's columns; 0: one scale per output channel); w8a8 schemes scale per channel",
    )
    export_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16",
        description="dtype of the export's scales and of the tensors left unquantized (embeddings, norms); "
        "scales are rounded to it before the codes are chosen, so the export dequantizes to the weights found",
    )
    sparse_format: Literal["none", "sparse-bitmask", "sparse-24-bitmask"] = Field(
        "none",
        description="legacy storage for w8a8 schemes: the int8 / float8 codes as bitmask plus values, as "
        "compressed-tensors <= 0.14 wrote them (sparsefit reads these; current transformers and vLLM do not)",
    )
    actorder: Literal["static", "none"] = Field(
        "static",
        description="GPTQ column order: static (act-order: columns visited by descending input energy, diag(H); "
        "groups stay in column order, scales taken up front) | none: left to right",
    )
    observer: Literal["mse", "minmax"] = Field(
        "mse",
        description="how each weight scale is chosen: mse (the clip ratio, 0.8-1.0 of max|w|, that loses least "
        "in the round trip) | minmax (max|w| maps to the top code)",
    )
    block_size: int = Field(128, ge=1, le=MAX_DIM, description="GPTQ column block (lazy batch updates)")
    damp: float = Field(0.01, gt=0, le=10, description="GPTQ dampening, a fraction of the Hessian's mean diagonal")
    # Each expert slice of a fused (experts, out, in) tensor is quantized as its own linear, its GPTQ
    # Hessian from the tokens routed to that expert; too few of them give a rank-deficient Hessian.
    min_expert_tokens: int = Field(
        16, ge=0, description="mixture of experts: an expert routed fewer calibration tokens than this is "
        "quantized by round-to-nearest (data-free) instead of GPTQ, and reported"
    )  # fmt: skip
    sequential: bool = Field(
        True,
        description="quantize each linear with the earlier linears of its block already quantized, one forward "
        "per block; off: every linear sees the block as it was",
    )

    @model_validator(mode="before")
    @classmethod
    def _group_zero(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("group_size") in (0, "0", "none", "None"):
            return {**data, "group_size": None}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> QuantizeConfig:
        if self.sparse_format != "none" and not SCHEMES[self.scheme][3]:
            raise ValueError("sparse_format stores 8-bit codes: use it with scheme w8a8-int8 or w8a8-fp8")
        if self.method == "gptq" and self.calib is None:
            raise ValueError("method 'gptq' needs calibration data: set calib to a dataset or 'self', or use 'rtn'")
        return self

    @property
    def weight_group_size(self) -> int | None:
        """The group size the weights use: None (per channel) for the w8a8 schemes."""
        return self.group_size if SCHEMES[self.scheme][2] else None

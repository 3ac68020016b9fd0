"""A checkpoint's tensors one at a time, as the runtime packs them: never the whole dense model.

Reads every safetensors file of a checkpoint directory through its header (names, shapes) and
fetches a tensor only when asked. A linear's weight comes back as float32, whatever the format:

- plain Hugging Face checkpoints (`sparsefit prune`, `finetune`, `export --format hf`);
- `sparse-bitmask` / `sparse-24-bitmask` exports (bitmask plus kept values, optionally int8 codes
  with scales), decompressed one weight at a time;
- compressed-tensors quantized exports (`sparsefit quantize`): each layer's codes unpacked by
  compressed-tensors' own compressor. Per-channel int8 layers also hand back their scales, so the
  runtime keeps their exact codes; other schemes are dequantized to floats.

Side files (SLoRB branches, unmerged row adapters) change what a layer computes, which the packed
kernels do not do: such checkpoints are refused with the export command that folds them in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsefit.errors import UsageError

SIDE_FILES = {
    "slorb.safetensors": "sparsefit export --slorb merge (or drop)",
    "row_adapters.safetensors": "sparsefit export --row-adapters merge",
}
_BITMASK_PARTS = ("compressed", "bitmask", "row_offsets", "shape")
_QUANT_PARTS = ("weight_scale", "weight_zero_point", "weight_global_scale", "input_scale", "input_zero_point")


@dataclass(frozen=True)
class Weight:
    """A linear's weight as float32 (out, in); `scales` are its per-row int8 scales when the checkpoint
    stores per-channel int8 codes (weight = codes * scales exactly)."""

    weight: torch.Tensor
    scales: torch.Tensor | None = None


class CheckpointTensors:
    """The tensors of the checkpoint in `folder`, read lazily by name."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        try:
            self.config = json.loads((self.folder / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot read {self.folder}/config.json ({err}); pass a checkpoint directory") from None
        for name, fix in SIDE_FILES.items():
            if (self.folder / name).is_file():
                raise UsageError(
                    f"{self.folder} keeps {name} beside its weights, which the sparse runtime does not run; "
                    f"fold it in first with `{fix}`, or use --runtime hf"
                )
        self._where: dict[str, Path] = {}
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise UsageError(f"{self.folder} holds no .safetensors weights")
        for file in files:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    self._where[key] = file
        self._open: dict[Path, object] = {}
        block = self.config.get("quantization_config") or self.config.get("compression_config") or {}
        self.quantization = block if isinstance(block, dict) else {}
        sparsity = self.quantization.get("sparsity_config") or {}
        self.bitmask = sparsity.get("format") if sparsity.get("format") not in (None, "dense") else None
        self._schemes = self._quant_schemes()

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def tensor(self, key: str) -> torch.Tensor:
        """A stored tensor as it is (norms, biases, embeddings)."""
        from safetensors import safe_open

        file = self._where.get(key)
        if file is None:
            raise UsageError(f"{self.folder} lacks the tensor '{key}' its config implies")
        if file not in self._open:
            self._open[file] = safe_open(str(file), "pt")
        return self._open[file].get_tensor(key)

    def has_linear(self, name: str) -> bool:
        return any(f"{name}.{s}" in self._where for s in ("weight", "weight_packed", "bitmask"))

    def linear(self, name: str) -> Weight:
        """The weight of linear `name` (e.g. model.layers.0.mlp.down_proj) as float32, whatever the format."""
        if f"{name}.bitmask" in self._where:
            return self._bitmask_weight(name)
        if f"{name}.weight_packed" in self._where or f"{name}.weight_scale" in self._where:
            return self._quantized_weight(name)
        return Weight(self.tensor(f"{name}.weight").float())

    def _bitmask_weight(self, name: str) -> Weight:
        from sparsefit.export.bitmask import decompress_state_dict

        parts = {f"{name}.{s}": self.tensor(f"{name}.{s}") for s in (*_BITMASK_PARTS, *_QUANT_PARTS)
                 if f"{name}.{s}" in self._where}  # fmt: skip
        try:
            state, _ = decompress_state_dict(parts, self.bitmask)
        except ValueError as err:
            raise UsageError(f"cannot read '{name}' in {self.folder}: {err}") from None
        weight = state[f"{name}.weight"].float()
        scale = parts.get(f"{name}.weight_scale")
        codes = parts[f"{name}.compressed"].dtype == torch.int8
        zero_point = f"{name}.weight_zero_point" in parts
        per_channel = scale is not None and scale.numel() == weight.shape[0] and not zero_point
        return Weight(weight, scale.float().reshape(-1) if per_channel and codes else None)

    def _quant_schemes(self) -> list[tuple[list[str], object]]:
        """(targets, scheme) of each config group of a compressed-tensors quantized checkpoint."""
        groups = self.quantization.get("config_groups")
        if self.quantization.get("quant_method") != "compressed-tensors" or not groups:
            return []
        try:
            from compressed_tensors.quantization import QuantizationScheme
        except ImportError:
            raise UsageError(
                f"{self.folder} is a compressed-tensors quantized checkpoint: pip install 'sparsefit[export]'"
            ) from None
        return [(list(g.get("targets", [])), QuantizationScheme.model_validate(g)) for g in groups.values()]

    def _quantized_weight(self, name: str) -> Weight:
        from compressed_tensors.compressors import BaseCompressor

        fmt = self.quantization.get("format")
        if not self._schemes or fmt is None:
            raise UsageError(f"{self.folder}: '{name}' is quantized but config.json names no scheme for it")
        scheme = self._schemes[0][1]  # sparsefit writes one group (every quantized Linear)
        keys = ("weight", "weight_packed", "weight_shape", *_QUANT_PARTS)
        parts = {k: self.tensor(f"{name}.{k}") for k in keys if f"{name}.{k}" in self._where}
        try:
            compressor = BaseCompressor.get_value_from_registry(fmt)
            weight = compressor.decompress(parts, scheme)["weight"].float()
        except (KeyError, ValueError, RuntimeError) as err:
            raise UsageError(f"cannot unpack '{name}' in {self.folder} ({fmt}): {err}") from None
        w = scheme.weights
        scale = parts.get("weight_scale")
        per_channel_int8 = (
            w is not None and w.num_bits == 8 and w.type == "int" and w.strategy == "channel" and w.symmetric
        )
        return Weight(weight, scale.float().reshape(-1) if per_channel_int8 and scale is not None else None)

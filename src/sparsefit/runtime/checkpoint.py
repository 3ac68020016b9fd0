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
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsefit.errors import UsageError
from sparsefit.models.finite import refuse_non_finite_input

# safetensors' dtype names
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
MAX_HEADER = 100 << 20


class SafetensorsFile:
    """One .safetensors file read with `pread`: its header checked against the file's size before
    anything is allocated, each tensor copied out on request. (Memory-mapping would keep every page
    read so far resident, which is the dense model again.)"""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= min(MAX_HEADER, size - 8):
                raise UsageError(f"{path} is not a safetensors file (header length {n} for a {size}-byte file)")
            try:
                header = json.loads(f.read(n))
            except ValueError:
                raise UsageError(f"{path}: the safetensors header is not JSON; the file is damaged") from None
        if not isinstance(header, dict):
            raise UsageError(f"{path}: the safetensors header is not a mapping; the file is damaged")
        header.pop("__metadata__", None)
        self.start, self.entries = 8 + n, {}
        for key, e in header.items():
            ok = isinstance(e, dict) and e.get("dtype") in DTYPES and isinstance(e.get("shape"), list)
            shape = e.get("shape") if ok else None
            offsets = e.get("data_offsets") if ok else None
            ok = ok and all(isinstance(d, int) and d >= 0 for d in shape)
            ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            if ok:
                numel = 1
                for d in shape:
                    numel *= d
                nbytes = numel * torch.empty(0, dtype=DTYPES[e["dtype"]]).element_size()
                ok = 0 <= offsets[0] <= offsets[1] == offsets[0] + nbytes and self.start + offsets[1] <= size
            if not ok:
                raise UsageError(f"{path}: tensor '{key}' has a header entry that does not fit the file ({e})")
            self.entries[key] = (DTYPES[e["dtype"]], tuple(shape), offsets[0], offsets[1])

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `key`, or only its rows [start, stop) (of the first dimension)."""
        dtype, shape, begin, end = self.entries[key]
        if rows is not None:
            start, stop = max(0, rows[0]), min(shape[0], rows[1])
            row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0
            begin, end, shape = (
                begin + start * row_bytes,
                begin + max(stop, start) * row_bytes,
                (max(stop - start, 0), *shape[1:]),
            )
        data = bytearray(end - begin)
        with open(self.path, "rb", buffering=0) as f:
            view, done = memoryview(data), 0
            while done < len(data):
                got = os.preadv(f.fileno(), [view[done:]], self.start + begin + done)
                if got <= 0:
                    raise UsageError(f"{self.path}: the file ended inside tensor '{key}'")
                done += got
        if not data:
            return torch.empty(shape, dtype=dtype)
        tensor = torch.frombuffer(data, dtype=dtype).reshape(shape)
        refuse_non_finite_input({key: tensor}, self.path)  # each tensor (or run of rows) as it is read
        return tensor


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
        self._where: dict[str, SafetensorsFile] = {}
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise UsageError(f"{self.folder} holds no .safetensors weights")
        for path in files:
            file = SafetensorsFile(path)
            self._where.update(dict.fromkeys(file.entries, file))
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
        file = self._where.get(key)
        if file is None:
            raise UsageError(f"{self.folder} lacks the tensor '{key}' its config implies")
        return file.read(key)

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self._where:
            raise UsageError(f"{self.folder} lacks the tensor '{key}' its config implies")
        return self._where[key].entries[key][1]

    def row_chunks(self, key: str, step: int) -> Iterator[torch.Tensor]:
        """Tensor `key` as float32 runs of `step` rows, read one run at a time."""
        rows = self.shape(key)[0]
        for r in range(0, rows, step):
            yield self._where[key].read(key, (r, r + step)).float()

    def has_linear(self, name: str) -> bool:
        return any(f"{name}.{s}" in self._where for s in ("weight", "weight_packed", "bitmask"))

    def linear_shape(self, name: str) -> tuple[int, ...]:
        """The (out, in) shape of linear `name` as its checkpoint states it, read from headers and the
        tiny shape tensors only; a compressed weight's stated shape must fit the parts it is stored in."""
        for suffix, packed in (("shape", f"{name}.bitmask"), ("weight_shape", f"{name}.weight_packed")):
            key = f"{name}.{suffix}"
            if key not in self._where:
                continue
            stated = self.tensor(key)
            if stated.dtype not in (torch.int64, torch.int32) or stated.numel() != 2:
                raise UsageError(f"{self._where[key].path}: {key} must hold 2 integers, got {tuple(stated.shape)}")
            rows, cols = (int(d) for d in stated.flatten().tolist())
            if packed not in self._where and f"{name}.weight" in self._where:  # unpacked codes beside it
                packed = f"{name}.weight"
                fits = self.shape(packed) == (rows, cols)
            else:  # a bitmask holds a bit per weight; packed int32 words at most 8 weights each
                stored = self.shape(packed) if packed in self._where else ()
                fits = len(stored) == 2 and stored[0] == rows and 0 < cols <= stored[1] * 8
            if not fits:
                stored = self.shape(packed) if packed in self._where else "absent"
                raise UsageError(
                    f"{self._where[key].path}: {key} says ({rows}, {cols}), which {packed} {stored} cannot hold"
                )
            return rows, cols
        return self.shape(f"{name}.weight")

    def linear(self, name: str) -> Weight:
        """The weight of linear `name` (e.g. model.layers.0.mlp.down_proj) as float32, whatever the format."""
        if f"{name}.bitmask" in self._where:
            return self._bitmask_weight(name)
        if f"{name}.weight_packed" in self._where or f"{name}.weight_scale" in self._where:
            return self._quantized_weight(name)
        return Weight(self.tensor(f"{name}.weight").float())

    def _bitmask_weight(self, name: str) -> Weight:
        from sparsefit.models.bitmask import decompress_state_dict

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


class ModelTensors:
    """The same reader over a model already in memory (a model being evaluated), by state-dict name."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.config = model.config.to_dict()
        self.quantization: dict = {}
        self._state = model.state_dict()

    def __contains__(self, key: str) -> bool:
        return key in self._state

    def tensor(self, key: str) -> torch.Tensor:
        if key not in self._state:
            raise UsageError(f"the model lacks the tensor '{key}' its config implies")
        return self._state[key].detach()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensor(key).shape)

    def row_chunks(self, key: str, step: int) -> Iterator[torch.Tensor]:
        t = self.tensor(key)
        for r in range(0, t.shape[0], step):
            yield t[r : r + step].float()

    def has_linear(self, name: str) -> bool:
        return f"{name}.weight" in self._state

    def linear_shape(self, name: str) -> tuple[int, ...]:
        return self.shape(f"{name}.weight")

    def linear(self, name: str) -> Weight:
        return Weight(self.tensor(f"{name}.weight").float())

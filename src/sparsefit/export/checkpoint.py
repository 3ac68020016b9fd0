"""Plain Hugging Face checkpoints (safetensors only), written atomically, with sparsity metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel
from torch import nn

from sparsefit.atomic import staging_dir
from sparsefit.errors import UsageError
from sparsefit.export.bitmask import compress_experts, compress_state_dict, legacy_quantization_config
from sparsefit.export.card import README, model_card
from sparsefit.export.gguf import FORMATS as GGUF_FORMATS
from sparsefit.export.gguf import check_format as check_gguf_format
from sparsefit.models.bitmask import FORMATS as BITMASK_FORMATS
from sparsefit.models.builtin import strip_gguf_quantization
from sparsefit.models.expert_store import EXPERTS_FILE
from sparsefit.models.experts import ExpertMatrix
from sparsefit.models.finite import refuse_non_finite
from sparsefit.models.layout import decoder_linears
from sparsefit.models.row_deltas import merge_row_deltas, row_delta_info, row_delta_state, save_row_deltas
from sparsefit.models.side_modules import save_side_file
from sparsefit.models.slorb import detach_slorb, merge_slorb, save_slorb, slorb_info, slorb_state
from sparsefit.models.sparsity import measure_sparsity

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SPARSITY_FILE = "sparsity.json"


def sparsity_summary(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict:
    """The sparsity measured over every weight matrix of the decoder blocks, with what is not counted
    (`models.sparsity.measure_sparsity`), on the weights of `state_dict` when given (the full weights of
    a sharded model)."""
    return measure_sparsity(model, state_dict)


def save_checkpoint(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | os.PathLike,
    metadata: dict | None = None,
    extra_files: dict[str, str] | None = None,
    carry: tuple[str, ...] = (),
    state_dict: dict[str, torch.Tensor] | None = None,
    label: str = "checkpoint",
    sparsity: dict | None = None,
    source_record: dict | None = None,
    evaluation: dict | None = None,
    experts: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None,
) -> Path:
    """Save model + tokenizer as safetensors, plus `sparsity.json`, as one atomic replacement of `out_dir`.

    `metadata` (method, recipe, ...) is stored beside the measured sparsity so the format of the
    checkpoint is written down, never inferred from names (a pydantic value, such as a
    `OneShotReport`, is stored as its JSON). `extra_files` (name -> text) are written
    with it; `carry` names files of the existing `out_dir` to keep (a training log). `state_dict`
    replaces the model's own tensors (the gathered weights of an FSDP-sharded model). An `out_dir`
    holding files sparsefit did not write is refused. `label` names the publish's crash points.
    `sparsity` replaces the summary measured on the weights (when `state_dict` holds packed ones).
    A model card (`README.md`, `export.card`) is written from the same record, with `source_record`
    (the record of the checkpoint an export came from) and `evaluation` (numbers measured in the run).
    `experts`: the tensors and metadata of `experts.safetensors` (`export.bitmask.compress_experts`),
    written beside the weights (the fused parameters it holds must be absent from `state_dict`).
    """
    strip_gguf_quantization(model)
    if getattr(model, "hf_quantizer", None) is not None:
        # Its modules carry the quantizer's scales and wrappers: saved as they are, the weights and
        # config.json would describe two different models.
        raise UsageError(
            "the model was loaded from a quantized checkpoint, which sparsefit does not save again; "
            "start from its unquantized source (and quantize last, with `sparsefit quantize`)"
        )
    out_dir = Path(out_dir)
    branches = slorb_state(model, state_dict)
    deltas = row_delta_state(model, state_dict)
    if branches or deltas:  # side modules go to their own files (`models.slorb`, `models.row_deltas`)
        whole = state_dict if state_dict is not None else model.state_dict()
        state_dict = {k: v for k, v in whole.items() if k not in branches and k not in deltas}
        if branches:
            metadata = {**(metadata or {}), "slorb": slorb_info(model)}
        if deltas:
            metadata = {**(metadata or {}), "row_adapters": row_delta_info(model)}
    # Every tensor that goes out, checked before the first byte does (the side files' tensors too).
    written = state_dict if state_dict is not None else model.state_dict()
    refuse_non_finite(
        [*written.items(), *branches.items(), *deltas.items()],
        f"cannot write {out_dir}",
        "the model's weights are damaged (a diverged fine-tune, a damaged checkpoint): start from a sound one",
    )
    with staging_dir(out_dir, carry=carry, label=label) as stage:
        info = {"sparsity": sparsity or sparsity_summary(model, state_dict), **(metadata or {})}
        given = None if state_dict is None else dict(state_dict)  # a copy: save_pretrained empties its dict
        model.save_pretrained(stage, safe_serialization=True, state_dict=given)
        if branches:
            save_slorb(branches, stage, metadata["slorb"]["k"])
        if deltas:
            save_row_deltas(deltas, stage)
        if experts is not None:
            save_side_file(experts[0], stage / EXPERTS_FILE, experts[1])
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
        as_json = {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in info.items()}
        (stage / SPARSITY_FILE).write_text(json.dumps(as_json, indent=2) + "\n")
        (stage / README).write_text(model_card(as_json, source_record, evaluation))
        for name, text in (extra_files or {}).items():
            (stage / name).write_text(text)
    return out_dir


def _save_bitmask(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: Path, fmt: str, metadata: dict, **card
) -> None:
    linears = decoder_linears(model)
    for module in linears.values():
        if not isinstance(module, (nn.Linear, ExpertMatrix)):
            raise UsageError(f"{fmt} stores torch Linear weights; {type(module).__name__} layers: use --format hf")
    # Fused expert tensors (experts, out, in) go to experts.safetensors, each expert's slice in the
    # sparse-bitmask layout (`models.expert_store`): the format describes 2-D weights of linears only.
    names = [name for name, module in linears.items() if isinstance(module, nn.Linear)]
    experts = compress_experts(model)
    state = {k: v for k, v in model.state_dict().items() if k not in experts[2]}
    try:
        state = compress_state_dict(state, names, fmt)
    except ValueError as err:
        raise UsageError(f"{err}: prune with --structure 2:4 first, or export as sparse-bitmask") from None
    summary = sparsity_summary(model)
    config = model.config.to_dict()
    config["quantization_config"] = legacy_quantization_config(fmt, names, summary["overall"])
    files = {"config.json": json.dumps(config, indent=2, sort_keys=True) + "\n"}
    save_checkpoint(
        model, tokenizer, out_dir, metadata, extra_files=files, state_dict=state, sparsity=summary,
        experts=experts[:2] if experts[2] else None, **card,
    )  # fmt: skip


def _save_gguf(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    fmt: str,
    source: str,
    metadata: dict,
    source_record: dict | None = None,
    evaluation: dict | None = None,
) -> dict:
    """One .gguf (weights, tokenizer, chat template), an Ollama Modelfile and sparsity.json, published
    together as one atomic replacement of `out_dir`."""
    from sparsefit.export.gguf import FILE_SUFFIX, MODELFILE, modelfile, write_gguf

    strip_gguf_quantization(model)
    if getattr(model, "hf_quantizer", None) is not None:
        raise UsageError(
            "the model was loaded from a quantized checkpoint; export its unquantized source as GGUF instead"
        )
    if tokenizer is None:
        raise UsageError("a GGUF file holds the tokenizer: export a model that has one")
    summary = sparsity_summary(model)
    name = Path(str(source).rstrip("/")).name.removesuffix(".gguf") or "model"
    filename = f"{name}-{FILE_SUFFIX[fmt]}.gguf"
    with staging_dir(out_dir, label="gguf") as stage:
        written = write_gguf(model, tokenizer, stage / filename, fmt, name, summary)
        info = {"file": filename, **written}
        (stage / MODELFILE).write_text(modelfile(filename, tokenizer))
        as_json = {"sparsity": summary, **metadata, "gguf": info}
        (stage / SPARSITY_FILE).write_text(json.dumps(as_json, indent=2) + "\n")
        (stage / README).write_text(model_card(as_json, source_record, evaluation))
    return info


def read_sparsity(checkpoint: str | os.PathLike) -> dict | None:
    """The checkpoint's `sparsity.json` (None when it is missing or does not parse: measure the weights)."""
    try:
        info = json.loads((Path(checkpoint) / SPARSITY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("sparsity"), dict) else None


EXPORT_FORMATS = ("hf", *BITMASK_FORMATS, *GGUF_FORMATS)
SLORB_CHOICES = ("keep", "drop", "merge")


def export_checkpoint(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | os.PathLike,
    source: str,
    fmt: str = "hf",
    slorb: str = "keep",
    row_adapters: str = "keep",
    evaluation: dict | None = None,
) -> dict:
    """Write `model` in format `fmt`; returns files, bytes and sparsity.

    "hf": a plain checkpoint. "sparse-bitmask" / "sparse-24-bitmask": the decoder linears stored as
    bitmask and nonzero values (`sparsefit.models.bitmask`), the layouts compressed-tensors up to
    0.14 wrote; sparsefit loads them back, current transformers and vLLM do not. Fused expert
    tensors go to `experts.safetensors`, each expert's slice in the sparse-bitmask layout
    (`models.expert_store`).

    A model with SLoRB branches: "keep" writes them beside the weights (`slorb.safetensors`, which
    sparsefit restores), "drop" leaves them out (the N:M model alone), "merge" folds them into the
    weights (one plain checkpoint, no longer N:M). Unmerged row adapters: "keep" writes them beside
    the weights (`row_adapters.safetensors`), "merge" folds them in (W[rows] += D * M[rows]: the
    sparsity is kept).

    Every format gets a model card (`README.md`) stating what the source checkpoint's record says
    was done (pruning, fine-tuning, quantization), the sparsity measured now, and `evaluation`
    (name -> number, measured on this model in the same run) when given.
    """
    check_gguf_format(fmt)
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"unknown export format '{fmt}'; use one of: {', '.join(EXPORT_FORMATS)}")
    if slorb not in SLORB_CHOICES:
        raise UsageError(f"unknown --slorb '{slorb}'; use one of: {', '.join(SLORB_CHOICES)}")
    if row_adapters not in ("keep", "merge"):
        raise UsageError(f"unknown --row-adapters '{row_adapters}'; use keep or merge")
    out_dir = Path(out_dir)
    metadata = {"exported_from": source, "format": fmt}
    branches = slorb_info(model)
    if fmt in GGUF_FORMATS and branches is not None and slorb == "keep":
        raise UsageError("a GGUF file holds the plain weights, not SLoRB branches: pass --slorb merge or --slorb drop")
    if branches is not None and slorb != "keep":
        (detach_slorb if slorb == "drop" else merge_slorb)(model)
        metadata["slorb"] = {"dropped" if slorb == "drop" else "merged": branches}
    deltas = row_delta_info(model)
    if fmt in GGUF_FORMATS and deltas is not None and row_adapters == "keep":
        raise UsageError("a GGUF file holds the plain weights, not row adapters: pass --row-adapters merge")
    if deltas is not None and row_adapters == "merge":
        merge_row_deltas(model)
        metadata["row_adapters"] = {"merged": deltas}
    gguf_info = None
    recorded = read_sparsity(source) if Path(source).is_dir() else None
    card = {"source_record": {k: v for k, v in (recorded or {}).items() if k != "sparsity"}, "evaluation": evaluation}
    if fmt == "hf":
        save_checkpoint(model, tokenizer, out_dir, metadata, **card)
    elif fmt in GGUF_FORMATS:
        gguf_info = _save_gguf(model, tokenizer, out_dir, fmt, source, metadata, **card)
    else:
        _save_bitmask(model, tokenizer, out_dir, fmt, metadata, **card)
    files = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith("."))
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    info = {"format": fmt, "files": files, "bytes": size, "sparsity": sparsity_summary(model)["overall"]}
    if gguf_info is not None:
        info["gguf"] = gguf_info
    if branches is not None:
        info["slorb"] = {"keep": "kept", "drop": "dropped", "merge": "merged"}[slorb]
    if deltas is not None:
        info["row_adapters"] = "merged" if row_adapters == "merge" else "kept"
    return info

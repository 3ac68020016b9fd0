"""Resolve a model spec (builtin name, local directory, .gguf file, hub id) and load it."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sparsefit.errors import UsageError, first_line, missing_package
from sparsefit.models.builtin import BUILTIN_MODELS, builtin_path, strip_gguf_quantization

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model lives: `path` is a local directory or a hub id; `gguf_file` names a GGUF inside it."""

    spec: str
    path: str
    source: str  # "builtin" | "local" | "gguf" | "hub"
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_model(spec: str | os.PathLike) -> ResolvedModel:
    """Turn a `--model` value into a loadable location; builtins are fetched and cached on first use."""
    text = str(spec)
    if text in BUILTIN_MODELS:
        return ResolvedModel(text, str(builtin_path(text)), "builtin")
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UsageError(f"model directory '{text}' has no config.json; pass a Hugging Face checkpoint directory")
        return ResolvedModel(text, str(path), "local")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UsageError(f"model file '{text}' is not a .gguf file; pass a .gguf file or a checkpoint directory")
        return ResolvedModel(text, str(path.parent), "gguf", path.name)
    # A hub id is exactly "org/name"; anything else with a path shape is a missing path.
    looks_like_path = text.startswith((".", "/", "~")) or text.endswith(".gguf") or text.count("/") > 1
    if looks_like_path:
        raise UsageError(f"model path '{text}' does not exist; check the path")
    if "/" not in text:
        names = ", ".join(sorted(BUILTIN_MODELS))
        raise UsageError(
            f"unknown model '{text}': not a builtin ({names}), not a local path; "
            "pass a builtin name, a checkpoint directory, a .gguf file or a hub id like 'org/name'"
        )
    return ResolvedModel(text, text, "hub")


def parse_dtype(name: str, device: torch.device) -> torch.dtype:
    """`float32 | bfloat16 | float16 | auto`; auto means bfloat16 on a GPU that supports it, else float32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UsageError(f"unknown dtype '{name}'; use one of: float32, bfloat16, float16, auto")
    return DTYPES[name]


def parse_device(name: str) -> torch.device:
    """`cpu | cuda | cuda:N | auto`; asking for CUDA where there is none is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"device '{name}' requested but CUDA is not available; use --device cpu or auto")
        return torch.device(name)
    raise UsageError(f"unknown device '{name}'; use one of: cpu, cuda, auto")


def _load_error(resolved: ResolvedModel, err: Exception, what: str = "model") -> UsageError:
    """One line that names where the failure is: the hub for a hub id, the files for a local model."""
    missing = missing_package(err)
    if missing is not None:  # not a damaged checkpoint: a package to install
        return UsageError(f"cannot load '{resolved.spec}': {missing}")
    first = first_line(err, 160)
    if resolved.source == "hub":
        return UsageError(
            f"could not load '{resolved.spec}' ({first}); "
            "check the hub id and network access, or pass a local directory, .gguf file or builtin name"
        )
    if resolved.source == "builtin":
        return UsageError(
            f"the cached builtin model '{resolved.spec}' in {resolved.path} cannot be loaded ({first}); "
            "delete that folder and rerun to fetch it again"
        )
    return UsageError(
        f"could not load the {what} in '{resolved.spec}' ({first}); its files look damaged or incomplete: "
        "check or re-create the checkpoint"
    )


def _load_errors() -> tuple[type[BaseException], ...]:
    """What loading a damaged or foreign checkpoint raises, from transformers, safetensors, tokenizers and json."""
    from safetensors import SafetensorError

    return (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, ImportError, SafetensorError)


def load_tokenizer(spec: str | os.PathLike | ResolvedModel, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer (with its chat template); a pad token is set to EOS when missing."""
    from transformers import AutoTokenizer

    resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(spec)
    try:
        tok = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=trust_remote_code, **resolved.kwargs())
    except _load_errors() as err:
        raise _load_error(resolved, err, "tokenizer") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    spec: str | os.PathLike | ResolvedModel,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a causal LM in eval mode on `device`; GGUF files are dequantized on load."""
    from transformers import AutoModelForCausalLM

    device = device if isinstance(device, torch.device) else parse_device(device)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype, device)
    resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(spec)
    fmt = _bitmask_format(resolved)
    if fmt is not None:
        if resolved.source == "hub":  # read from files: only now is the whole checkpoint downloaded
            resolved = ResolvedModel(resolved.spec, _hub_snapshot(resolved), "hub")
        model = _load_bitmask(resolved, fmt, torch_dtype, trust_remote_code)
        _restore_side_modules(model, resolved)
        model.config.name_or_path = resolved.spec
        return model.to(device).eval()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            resolved.path,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            **resolved.kwargs(),
            **({} if resolved.gguf_file else {"use_safetensors": True}),  # never unpickle weights
        )
    except _load_errors() as err:
        raise _load_error(resolved, err) from None
    # transformers fills weights the checkpoint lacks (or holds in another shape) with random values
    # and only warns; a model with random layers must never be evaluated, pruned or saved.
    absent = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
    if absent and resolved.source != "hub":
        absent = _restore_experts(model, resolved, absent)
    if absent:
        more = f" and {len(absent) - 2} more" if len(absent) > 2 else ""
        raise UsageError(
            f"the checkpoint '{resolved.spec}' lacks weights the {type(model).__name__} in its config needs "
            f"({', '.join(absent[:2])}{more}); its config and weights do not belong together"
        )
    _refuse_non_finite_weights(model, resolved)  # packed layers: their codes and scales as stored
    if resolved.gguf_file:
        strip_gguf_quantization(model)
    # A compressed-tensors checkpoint loads packed, to be unpacked by a hook on the first forward;
    # unpacked now, every weight is there to be read (sparsity, export) before any forward.
    compressor = getattr(getattr(model, "hf_quantizer", None), "compressor", None)
    if compressor is not None and hasattr(model, "ct_decompress_hook"):
        compressor.decompress_model(model)
    _restore_side_modules(model, resolved)
    model.config.name_or_path = resolved.spec
    return model.to(device).eval()


def _expert_tensors(resolved: ResolvedModel, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The fused expert parameters of the checkpoint's `experts.safetensors` (`models.expert_store`)."""
    from sparsefit.models.expert_store import read_experts

    try:
        return read_experts(resolved.path, expected)
    except ValueError as err:
        raise UsageError(f"{first_line(err)}; the checkpoint is damaged: re-export it") from None


def _restore_experts(model: PreTrainedModel, resolved: ResolvedModel, absent: list[str]) -> list[str]:
    """Fill the fused expert parameters the main weights lack from `experts.safetensors`; returns what
    is still absent."""
    missing = set(absent)
    params = dict(model.named_parameters())
    stored = _expert_tensors(resolved, {k: tuple(v.shape) for k, v in params.items() if k in missing})
    with torch.no_grad():
        for name, value in stored.items():
            params[name].copy_(value)
    return [k for k in absent if k not in stored]


def _refuse_non_finite_weights(model: PreTrainedModel, resolved: ResolvedModel) -> None:
    """A UsageError naming the file and the tensor when a loaded weight (or scale) is NaN or
    infinite: such a model loads without complaint and computes garbage. Each tensor is tested in
    place, where from_pretrained put it."""
    from sparsefit.models.finite import refuse_non_finite_input

    def file_of(name: str) -> str:
        if resolved.gguf_file:
            return str(Path(resolved.path) / resolved.gguf_file)
        if resolved.source == "hub":
            return resolved.spec
        from safetensors import safe_open

        for file in sorted(Path(resolved.path).glob("*.safetensors")):
            with safe_open(file, "pt") as f:  # headers only
                if name in f.keys():
                    return str(file)
        return resolved.path

    refuse_non_finite_input((*model.named_parameters(), *model.named_buffers()), file_of)


def _restore_side_modules(model: PreTrainedModel, resolved: ResolvedModel) -> None:
    """Re-attach the side modules a local checkpoint keeps beside its weights: SLoRB branches
    (`models.slorb`) and unmerged row adapters (`models.row_deltas`)."""
    from sparsefit.models.row_deltas import ROWS_FILE, load_row_deltas, row_delta_info
    from sparsefit.models.slorb import SLORB_FILE, load_slorb, slorb_info

    if resolved.source not in ("local", "builtin") or not Path(resolved.path).is_dir():
        return
    side = (
        ("row adapters", load_row_deltas, row_delta_info, ROWS_FILE),
        ("SLoRB branches", load_slorb, slorb_info, SLORB_FILE),
    )
    for what, load, info, file in side:
        try:
            restored = load(model, resolved.path)
        except (ValueError, OSError) as err:
            raise UsageError(f"cannot restore the {what} of '{resolved.spec}': {first_line(err)}") from None
        if restored:
            print(
                f"notice: restored {what} on {restored} layers ({info(model)['parameters']} parameters) from {file}",
                file=sys.stderr,
            )


def _bitmask_format(resolved: ResolvedModel) -> str | None:
    """The bitmask format of a checkpoint in one (compressed-tensors <= 0.14), else None. For a hub id
    only its config.json is fetched here."""
    from sparsefit.models.bitmask import sparse_format

    config = Path(resolved.path) / "config.json" if resolved.source != "hub" else _hub_config(resolved.path)
    if config is None or resolved.source == "gguf" or not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None  # a damaged config.json: the regular loading names the problem
    try:
        return sparse_format(data) if isinstance(data, dict) else None
    except ValueError as err:
        raise UsageError(f"cannot read '{resolved.spec}': {first_line(err)}") from None


def _hub_config(repo_id: str) -> Path | None:
    """The hub model's config.json (downloaded, or from the local cache offline); None when it cannot
    be had, so that the regular loading reports the problem."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError):
        return None


def _hub_snapshot(resolved: ResolvedModel) -> str:
    """A local folder with the hub model's configs and safetensors weights (never pickled weights)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(resolved.path, allow_patterns=["*.json", "*.safetensors"])
    except _load_errors() as err:
        raise _load_error(resolved, err) from None


def _load_bitmask(resolved: ResolvedModel, fmt: str, dtype: torch.dtype, trust_remote_code: bool) -> PreTrainedModel:
    """Build the model from its config and load the weights decompressed: current transformers no
    longer opens bitmask-compressed checkpoints, so they are read here (`sparsefit.models.bitmask`).

    Every tensor is checked against the config (built on the meta device: no memory) before the
    model is allocated or any weight decompressed, so a small file whose config claims a large
    model fails at once, naming the file and the tensor."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from sparsefit.models.bitmask import decompress_state_dict
    from sparsefit.models.expert_store import EXPERTS_FILE
    from sparsefit.models.row_deltas import ROWS_FILE
    from sparsefit.models.slorb import SLORB_FILE

    path = Path(resolved.path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        for key in ("quantization_config", "compression_config"):
            if hasattr(config, key):
                delattr(config, key)
        state, where = {}, {}
        side = (SLORB_FILE, ROWS_FILE, EXPERTS_FILE)  # side modules: restored below; experts: read apart
        for file in sorted(f for f in path.glob("*.safetensors") if f.name not in side):
            with safe_open(file, "pt") as f:
                state.update({key: f.get_tensor(key) for key in f.keys()})  # views of the mapped file
                where.update(dict.fromkeys(f.keys(), file))
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (*_load_errors(), SafetensorError) as err:
        raise _load_error(resolved, err) from None
    # Fused expert tensors, stored slice by slice beside the weights: checked against the skeleton first.
    experts = _expert_tensors(resolved, {k: tuple(v.shape) for k, v in skeleton.state_dict().items()})
    state.update(experts)
    where.update(dict.fromkeys(experts, path / EXPERTS_FILE))
    _check_against_config(resolved, skeleton, state, where, fmt)
    from sparsefit.models.finite import refuse_non_finite_input

    refuse_non_finite_input(state, lambda key: where.get(key, path))  # values and scales as stored
    try:
        state, notes = decompress_state_dict(state, fmt)
    except ValueError as err:
        prefix = str(err).split(":", 1)[0]
        file = where.get(f"{prefix}.bitmask") or where.get(f"{prefix}.compressed") or path
        raise UsageError(f"{file}: {first_line(err)}; the checkpoint is damaged: re-export it") from None
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
        if model_class is not None:
            # transformers' own loading maps the checkpoint's names onto the model's: a mixture of experts
            # is saved with one linear per expert and loaded as fused (experts, out, in) tensors.
            model, info = model_class.from_pretrained(
                None, config=config, state_dict=state, dtype=dtype, output_loading_info=True
            )
            missing, unexpected = info["missing_keys"], info["unexpected_keys"]
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
            missing, unexpected = model.load_state_dict(state, strict=False)
    except _load_errors() as err:
        raise _load_error(resolved, err) from None
    for note in notes:
        print(f"notice: {note}", file=sys.stderr)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight  # saved once, under the embedding's name
    absent = sorted(k for k in missing if not (tied and k == "lm_head.weight"))
    if absent or unexpected:
        raise UsageError(
            f"the checkpoint '{resolved.spec}' does not match its config: "
            f"{'missing ' + ', '.join(absent[:2]) if absent else 'unexpected ' + ', '.join(sorted(unexpected)[:2])}"
        )
    return model


def _check_against_config(
    resolved: ResolvedModel, skeleton: torch.nn.Module, state: dict, where: dict, fmt: str
) -> None:
    """A UsageError naming the file and tensor when a stored tensor (or a compressed weight's parts)
    does not have the shape the config implies; the model is still on the meta device."""
    from sparsefit.models.bitmask import check_parts

    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    head, embed = skeleton.get_output_embeddings(), skeleton.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight
    folder = Path(resolved.path)
    matched, unmatched = set(), []
    for key, shape in expected.items():
        prefix = key.removesuffix(".weight")
        if key in state:
            got = tuple(state[key].shape)
            matched.add(key)
        elif key.endswith(".weight") and f"{prefix}.bitmask" in state:
            parts = {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}
            try:
                got = check_parts(fmt, parts)
            except ValueError as err:
                raise UsageError(f"{where[prefix + '.bitmask']}: {prefix}: {first_line(err)}") from None
            matched.update(f"{prefix}.{k}" for k in parts)
            key = f"{prefix}.shape"
        elif tied and key == "lm_head.weight":
            continue
        else:  # perhaps stored under another name (a mixture of experts: one linear per expert)
            unmatched.append((key, shape))
            continue
        if got != shape:
            raise UsageError(
                f"{where.get(key, folder)}: tensor {key} is {got}, but config.json implies {shape}; config and "
                "weights do not belong together"
            )
    if unmatched:
        # transformers' loading maps renamed tensors (and checks their shapes); here only what the
        # file holds under other names must cover what the config implies, so that a small file
        # with a huge config still fails before the model is allocated.
        stored = 0
        for k, v in state.items():
            if k in matched:
                continue
            if k.endswith(".shape"):  # a compressed weight: its dense shape
                stored += math.prod(int(d) for d in v.tolist())
            elif k.rsplit(".", 1)[-1] not in ("bitmask", "compressed", "row_offsets"):
                stored += v.numel()
        if sum(math.prod(shape) for _, shape in unmatched) > stored:
            key, shape = unmatched[0]
            raise UsageError(
                f"{folder}: no tensor {key} (shape {shape}) that its config.json implies; config and weights "
                "do not belong together"
            )


def load_model_and_tokenizer(
    spec: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Resolve once, then load both model and tokenizer."""
    resolved = resolve_model(spec)
    return load_model(resolved, dtype, device, trust_remote_code), load_tokenizer(resolved, trust_remote_code)


def context_length(config: PretrainedConfig) -> int | None:
    """Longest sequence the model's positions allow (None when the config does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None

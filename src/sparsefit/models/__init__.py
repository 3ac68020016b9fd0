"""Model resolution and loading: builtin names, local checkpoints, GGUF files, hub ids."""

from sparsefit.models.builtin import BUILTIN_MODELS
from sparsefit.models.loading import (
    ResolvedModel,
    context_length,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    parse_device,
    parse_dtype,
    resolve_model,
)

__all__ = [
    "BUILTIN_MODELS",
    "ResolvedModel",
    "context_length",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "parse_device",
    "parse_dtype",
    "resolve_model",
]

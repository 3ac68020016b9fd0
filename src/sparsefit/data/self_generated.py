"""Data-free calibration: sequences sampled from the dense model itself.

Temperature sampling from the BOS token gives text drawn from the model's own distribution,
so pruning (and distillation) need no dataset at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from sparsefit.errors import UsageError, first_line
from sparsefit.runtime.hf_cache import SlotCache, with_cache

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def sample_from_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 64,
    progress: bool = True,
) -> torch.Tensor:
    """`num_samples` sequences of exactly `seq_len` tokens (BOS included) sampled from `model`: (N, L).

    Every row draws from its own generator, seeded from `seed`, so a row's text does not depend on
    the batch it shares; the caller's RNG is left alone. Rows decode together over a preallocated
    cache (`SlotCache`): all have the same length, so there is no padding and no mask.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    seeds = torch.randint(0, 2**31 - 1, (num_samples,), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = []
    bar = tqdm(total=num_samples * (seq_len - 1), desc="self-generate", unit="tok", disable=not progress)
    for b in range(0, num_samples, batch_size):
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds[b : b + batch_size]]
        cache = SlotCache(model.config.num_hidden_layers, len(gens), seq_len)
        ids = torch.full((len(gens), seq_len), start, dtype=torch.long, device=device)
        for t in range(seq_len - 1):
            out = model(
                input_ids=ids[:, t : t + 1],
                position_ids=torch.full((len(gens), 1), t, device=device),
                use_cache=True,
                **with_cache(model, cache),
            )
            cache.column = t + 1
            probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1)
            for i, gen in enumerate(gens):
                ids[i, t + 1] = torch.multinomial(probs[i], 1, generator=gen)
            bar.update(len(gens))
        rows.append(ids.cpu())
    bar.close()
    return torch.cat(rows)


def load_or_sample(
    path: Path, sample: Callable[[], torch.Tensor], vocab: int | None = None, shape: tuple[int, int] | None = None
) -> torch.Tensor:
    """The token ids kept in safetensors file `path`, or, when there is none, `sample()`'s, written there
    atomically first: every caller asking for the same text (same file) then trains or calibrates on it.

    A file that is there is checked before use: one integer tensor `input_ids` of `shape`, every id
    in [0, `vocab`) (an id beyond the embedding reads out of bounds); a UsageError names the file."""
    from safetensors import SafetensorError

    from sparsefit.atomic import write_bytes

    if path.is_file():
        try:
            ids = load_file(str(path))["input_ids"]
        except (SafetensorError, OSError, KeyError) as err:
            raise UsageError(
                f"{path} is not a self-generated text file (no readable input_ids: {first_line(err, 80)}); "
                "delete it to sample the text again"
            ) from None
        check_token_ids(ids, path, vocab, shape)
        return ids
    ids = sample().cpu().contiguous()
    write_bytes(path, save({"input_ids": ids}))
    return ids


def check_token_ids(
    ids: torch.Tensor, path: Path | str, vocab: int | None, shape: tuple[int, ...] | None = None
) -> None:
    """A UsageError naming `path` unless `ids` are integers of `shape`, each in [0, `vocab`)."""
    fix = "delete it to sample the text again"
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
        raise UsageError(f"{path}: input_ids are {str(ids.dtype).removeprefix('torch.')}, not token ids; {fix}")
    if shape is not None and tuple(ids.shape) != tuple(shape):
        raise UsageError(f"{path}: input_ids are {tuple(ids.shape)}, expected {tuple(shape)}; {fix}")
    if vocab is not None and ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise UsageError(
                f"{path}: token id {bad} is outside the model's vocabulary [0, {vocab}); "
                f"the file is damaged or from another model: {fix}"
            )

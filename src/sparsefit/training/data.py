"""Fine-tuning data: supervised prompt/answer examples (GSM8K, jsonl) and packed plain text.

An example is token ids plus labels (-100 where no loss is taken). Batches are right-padded.
The order of examples is a pure function of (seed, step), so a resumed run sees the same data:
`run_examples` gathers what a run trains on, `micro_batches` deals it out to the processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from sparsefit.data.calibration import token_stream
from sparsefit.data.sources import load_rows, load_texts, question_prompt, read_jsonl
from sparsefit.errors import UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from sparsefit.training.config import FinetuneConfig
    from sparsefit.training.distributed import DistInfo

Format = Literal["auto", "chat", "plain"]


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def supervised(self) -> int:
        return sum(1 for x in self.labels[1:] if x != -100)


def prompt_and_target(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str, fmt: Format) -> tuple[str, str]:
    """The texts of a supervised pair: the chat template's user/assistant turns, or plain text + EOS.

    The prompt is the same one evaluation uses (`Question: ...\\nAnswer:`), so what the model
    learns is what GSM8K measures.
    """
    use_chat = fmt == "chat" or (fmt == "auto" and bool(getattr(tokenizer, "chat_template", None)))
    if not use_chat:
        return prompt, f" {answer}{tokenizer.eos_token or ''}"
    if not tokenizer.chat_template:
        raise UsageError("format 'chat' needs a tokenizer with a chat template; use --format plain")
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(head):
        raise UsageError("the chat template renders the prompt differently inside a conversation; use --format plain")
    return head, full[len(head) :]


def encode_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, target: str, seq_len: int) -> Example | None:
    """Prompt and target encoded separately (so the loss boundary is exact), truncated to `seq_len`."""
    p = tokenizer(prompt, add_special_tokens=False).input_ids
    t = tokenizer(target, add_special_tokens=False).input_ids
    ids = (p + t)[:seq_len]
    labels = ([-100] * len(p) + t)[:seq_len]
    example = Example(ids, labels)
    return example if example.supervised > 0 else None


def supervised_examples(
    tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], fmt: Format, seq_len: int
) -> list[Example]:
    examples = [encode_pair(tokenizer, *prompt_and_target(tokenizer, p, a, fmt), seq_len) for p, a in pairs]
    kept = [e for e in examples if e is not None]
    if not kept:
        raise UsageError(f"no example keeps an answer token within --seq-len {seq_len}; raise --seq-len")
    return kept


def packed_examples(tokenizer: PreTrainedTokenizerBase, texts: list[str], seq_len: int) -> list[Example]:
    """Plain text concatenated and cut into consecutive windows of `seq_len` tokens, loss on every token."""
    stream = token_stream(tokenizer, texts)
    count = stream.numel() // seq_len
    if count == 0:
        raise UsageError(f"dataset too short: {stream.numel()} tokens, fewer than one sequence of {seq_len}")
    windows = stream[: count * seq_len].view(count, seq_len).tolist()
    return [Example(w, list(w)) for w in windows]


def load_examples(
    tokenizer: PreTrainedTokenizerBase,
    dataset: str,
    split: str = "train",
    fmt: Format = "auto",
    seq_len: int = 512,
    text_field: str = "text",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    limit: int | None = None,
) -> list[Example]:
    """`gsm8k` (question -> answer), a .jsonl with prompt/completion fields (supervised), or any text (packed)."""
    if dataset == "gsm8k":
        rows = load_rows("gsm8k", split)[:limit]
        pairs = [(question_prompt(r["question"]), r["answer"]) for r in rows]
        return supervised_examples(tokenizer, pairs, fmt, seq_len)
    path = Path(dataset).expanduser()
    if path.suffix == ".jsonl" and path.is_file():
        rows = read_jsonl(path)[:limit]
        if rows and prompt_field in rows[0] and completion_field in rows[0]:
            bad = [i for i, r in enumerate(rows) if prompt_field not in r or completion_field not in r]
            if bad:
                raise UsageError(f"{path}: row {bad[0] + 1} lacks '{prompt_field}' or '{completion_field}'")
            pairs = [(str(r[prompt_field]), str(r[completion_field])) for r in rows]
            return supervised_examples(tokenizer, pairs, fmt, seq_len)
    texts = load_texts(dataset, split, text_field)
    examples = packed_examples(tokenizer, texts, seq_len)
    return examples[:limit] if limit else examples


def token_examples(ids: torch.Tensor) -> list[Example]:
    """(N, L) token ids -> N examples trained on every token."""
    return [Example(row, list(row)) for row in ids.tolist()]


def example_order(lengths: list[int], global_batch: int, seed: int, step: int, group: int = 16) -> list[int]:
    """Indices of the examples of global batch `step`, a pure function of (seed, step).

    Each epoch is a seeded permutation (its tail that cannot fill a batch is dropped); within
    windows of `group` batches, examples are sorted by length so a batch pads little, then the
    batches of the epoch are shuffled again so lengths do not drift through the epoch.
    """
    n = len(lengths)
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise UsageError(
            f"{n} examples cannot fill one batch of {global_batch} "
            "(batch size x accumulation x processes); lower them or add data"
        )
    epoch, index = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=gen)[: per_epoch * global_batch].tolist()
    window = group * global_batch
    ordered = []
    for w in range(0, len(perm), window):
        ordered += sorted(perm[w : w + window], key=lambda i: lengths[i])
    batches = torch.randperm(per_epoch, generator=gen).tolist()
    b = batches[index]
    return ordered[b * global_batch : (b + 1) * global_batch]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) input_ids, attention_mask and labels (-100 on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run_examples(
    config: FinetuneConfig,
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
    teacher: PreTrainedModel | None,
    self_text: torch.Tensor | None,
) -> list[Example]:
    """The examples a run trains on: the dataset's, then the sampled text (`config.sampled_rows` rows),
    sampled here from the teacher (or the model) unless `self_text` holds it already."""
    examples = []
    if config.dataset != "self":
        examples = load_examples(
            tokenizer,
            config.dataset,
            config.split,
            config.format,
            config.seq_len,
            config.text_field,
            config.prompt_field,
            config.completion_field,
            config.limit,
        )
    if config.sampled_rows:
        if self_text is None:  # sampled before any training step, from the teacher when there is one
            from sparsefit.data.self_generated import sample_from_model

            was_training = model.training
            source = teacher or model.eval()
            self_text = sample_from_model(source, tokenizer, config.sampled_rows, config.seq_len, config.seed)
            model.train(was_training)
        elif self_text.ndim != 2 or len(self_text) != config.sampled_rows or self_text.shape[1] > config.seq_len:
            raise ValueError(
                f"self_text is {tuple(self_text.shape)}; this run trains on {config.sampled_rows} sampled rows "
                f"of at most seq_len {config.seq_len} tokens"
            )
        examples += token_examples(self_text)
    return examples


def micro_batches(
    config: FinetuneConfig,
    examples: list,
    lengths: list[int],
    info: DistInfo,
    pad_id: int,
    device: torch.device,
    count: int,
    start_step: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """This process's first `count` micro-batches from step `start_step` on, in training order."""
    per_rank = config.batch_size * config.grad_accum
    global_batch = per_rank * info.world
    step, done = start_step, 0
    while done < count:
        ids = example_order(lengths, global_batch, config.seed, step)[info.rank * per_rank : (info.rank + 1) * per_rank]
        for k in range(config.grad_accum):
            if done == count:
                return
            batch = collate([examples[i] for i in ids[k * config.batch_size : (k + 1) * config.batch_size]], pad_id)
            yield {key: v.to(device) for key, v in batch.items()}
            done += 1
        step += 1

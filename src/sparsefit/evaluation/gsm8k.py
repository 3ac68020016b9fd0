"""GSM8K as the seeds report it: greedy accuracy (strict and flexible) and answer perplexity."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from sparsefit.atomic import write_text
from sparsefit.data.sources import load_rows
from sparsefit.errors import UsageError
from sparsefit.evaluation.answers import extract_flexible, extract_strict, is_correct, mean_stderr, reference_answer
from sparsefit.evaluation.generation import generate_greedy
from sparsefit.evaluation.perplexity import nll_sum

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# The harness's gsm8k task: prompt, target delimiter, stop sequences, few-shot separator.
STOPS = ["Question:", "</s>", "<|im_end|>"]
FEWSHOT_SEED = 1234


def question_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def build_prompt(tokenizer: PreTrainedTokenizerBase, question: str, shots: list[dict], chat: bool) -> str:
    """Few-shot examples then the question; with `chat`, each turn goes through the chat template."""
    if not chat:
        parts = [f"{question_prompt(s['question'])} {s['answer']}" for s in shots]
        return "\n\n".join([*parts, question_prompt(question)])
    if not tokenizer.chat_template:
        raise UsageError("--chat needs a tokenizer with a chat template; drop --chat for the plain prompt")
    messages = []
    for s in shots:
        messages += [
            {"role": "user", "content": question_prompt(s["question"])},
            {"role": "assistant", "content": s["answer"]},
        ]
    messages.append({"role": "user", "content": question_prompt(question)})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _rows(limit: int | None, split: str = "test") -> list[dict]:
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {limit})")
    rows = load_rows("gsm8k", split)
    return rows[:limit] if limit else rows


def _check_batch(batch_size: int) -> None:
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")


def fewshot_examples(k: int) -> list[dict]:
    if k < 0:
        raise UsageError(f"--num-fewshot must be >= 0 (got {k})")
    if k == 0:
        return []
    train = load_rows("gsm8k", "train")
    if k > len(train):
        raise UsageError(f"--num-fewshot {k} is more than the {len(train)} GSM8K train rows; use fewer shots")
    return random.Random(FEWSHOT_SEED).sample(train, k)


def evaluate_gsm8k(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    limit: int | None = None,
    num_fewshot: int = 0,
    chat: bool = False,
    batch_size: int = 32,  # decoding slots of continuous batching
    max_new_tokens: int = 256,
    samples_path: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Greedy GSM8K test accuracy with the harness's strict and flexible extraction."""
    _check_batch(batch_size)
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    rows = _rows(limit)
    shots = fewshot_examples(num_fewshot)
    prompts = [build_prompt(tokenizer, r["question"], shots, chat) for r in rows]
    generations, speed = generate_greedy(model, tokenizer, prompts, STOPS, max_new_tokens, batch_size, progress)
    samples = []
    for row, prompt, gen in zip(rows, prompts, generations):
        strict, flexible = extract_strict(gen), extract_flexible(gen)
        samples.append(
            {
                "prompt": prompt,
                "generation": gen,
                "reference": reference_answer(row["answer"]),
                "strict": strict,
                "flexible": flexible,
                "strict_correct": is_correct(strict, row["answer"]),
                "flexible_correct": is_correct(flexible, row["answer"]),
            }
        )
    if samples_path:
        write_text(samples_path, "".join(json.dumps(s) + "\n" for s in samples))
    result = {"task": "gsm8k", "rows": len(rows), "num_fewshot": num_fewshot, "chat": chat, **speed}
    for name in ("strict", "flexible"):
        values = [float(s[f"{name}_correct"]) for s in samples]
        result[f"{name}_match"] = sum(values) / len(values)
        result[f"{name}_match_stderr"] = mean_stderr(values)
    return result


@torch.no_grad()
def evaluate_answer_ppl(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    limit: int | None = 200,
    chat: bool = False,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Teacher-forced perplexity of the reference answers given their questions (0-shot prompt).

    Context and continuation are split as the harness's loglikelihood does: encode the whole
    text, take the continuation as the tokens after the encoded context.
    """
    _check_batch(batch_size)
    rows = _rows(limit)
    device = next(model.parameters()).device
    pairs = []
    for r in rows:
        context = build_prompt(tokenizer, r["question"], [], chat)
        target = (" " if not chat else "") + r["answer"]
        ctx = tokenizer(context, add_special_tokens=False).input_ids
        whole = tokenizer(context + target, add_special_tokens=False).input_ids
        pairs.append((whole, len(ctx)))
    start = time.perf_counter()
    nll, count = 0.0, 0
    for b in tqdm(range(0, len(pairs), batch_size), desc="answer ppl", disable=not progress):
        batch = pairs[b : b + batch_size]
        width = max(len(w) for w, _ in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for i, (whole, n_ctx) in enumerate(batch):  # right padding; loss only on answer tokens
            ids[i, : len(whole)] = torch.tensor(whole)
            mask[i, : len(whole)] = 1
            labels[i, n_ctx : len(whole)] = ids[i, n_ctx : len(whole)]
        total, n = nll_sum(model, ids.to(device), labels.to(device), mask.to(device))
        nll, count = nll + total.item(), count + n
    return {
        "task": "gsm8k-answer-ppl",
        "rows": len(rows),
        "chat": chat,
        "answer_tokens": count,
        "nll": nll / count,
        "ppl": math.exp(nll / count),
        "seconds": time.perf_counter() - start,
    }

"""Evaluation entry points shared by the CLI, recipes and benchmarks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sparsefit.data.sources import load_texts
from sparsefit.errors import UsageError
from sparsefit.evaluation.perplexity import check_seq_len, perplexity

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def tokenize_for_perplexity(
    tokenizer: PreTrainedTokenizerBase, dataset: str, split: str = "test", text_field: str = "text"
) -> torch.Tensor:
    """One 1-D token stream for a dataset; texts are joined by blank lines as in the papers."""
    text = "\n\n".join(load_texts(dataset, split, text_field))
    return tokenizer(text, return_tensors="pt").input_ids[0]


def evaluate_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: str = "wikitext2",
    split: str = "test",
    text_field: str = "text",
    seq_len: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Perplexity of a loaded model on a dataset, as a JSON-ready dict."""
    if batch_size < 1 or (max_windows is not None and max_windows < 1):
        raise UsageError(f"--batch-size and --max-windows must be at least 1 (got {batch_size}, {max_windows})")
    check_seq_len(model, seq_len)  # fail before tokenizing a large corpus
    stream = tokenize_for_perplexity(tokenizer, dataset, split, text_field)
    result = perplexity(model, stream, seq_len, max_windows, batch_size, progress).to_dict()
    return {"task": "perplexity", "dataset": dataset, "split": split, **result}


TASKS = ("perplexity", "gsm8k-answer-ppl", "gsm8k")


def run_task(task: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, **options: object) -> dict:
    """One evaluation task by name, with that task function's options: the CLI's `eval --task` and a
    recipe's evaluate stage both come here."""
    from sparsefit.evaluation import gsm8k

    functions = {
        "perplexity": evaluate_perplexity,
        "gsm8k-answer-ppl": gsm8k.evaluate_answer_ppl,
        "gsm8k": gsm8k.evaluate_gsm8k,
    }
    if task not in functions:
        raise UsageError(f"unknown evaluation task '{task}'; choose one of {', '.join(TASKS)}")
    return functions[task](model, tokenizer, **options)

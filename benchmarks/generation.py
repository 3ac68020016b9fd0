"""Generation speed: sparsefit's continuous batching against plain transformers `generate`.

Greedy: the first N GSM8K test questions (0-shot prompt, 256 new tokens, the harness's stop
strings), through `generate` in batches of 16 (sorted by length, left-padded, stopped per row by
the harness's criterion: the yardstick) and through `sparsefit.evaluation.generation.generate_greedy`
at several slot counts; tokens/s of each and whether every output is identical. Sampling: the
self-generated text of the `quick` recipe (sequences of 256 tokens from BOS, temperature 1) with
`generate(do_sample=True)` in batches of 16 against `sample_from_model`. Run it alone:

    SPARSEFIT_DATA_DIR=../shared/data python benchmarks/generation.py
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from environment import environment
from sparsefit.atomic import write_json
from sparsefit.data.self_generated import sample_from_model
from sparsefit.data.sources import load_rows
from sparsefit.evaluation.generation import generate_greedy, truncate_at_stops
from sparsefit.evaluation.gsm8k import STOPS, build_prompt
from sparsefit.models import load_model_and_tokenizer


class StopOnStrings(StoppingCriteria):
    """The harness's criterion: a row stops once a stop string shows in its last 10 generated tokens."""

    def __init__(self, tokenizer, stops: list[str], prompt_len: int) -> None:
        self.tokenizer, self.stops, self.prompt_len = tokenizer, stops, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        tails = self.tokenizer.batch_decode(input_ids[:, max(self.prompt_len, input_ids.shape[1] - 10) :])
        return torch.tensor([any(s in t for s in self.stops) for t in tails])


@torch.no_grad()
def generate_plain(model, tok, prompts: list[str], max_new: int, batch: int) -> tuple[list[str], dict]:
    """Plain `generate`: batches sorted by length, left padding, per-row stop strings."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs, new_tokens, start = [""] * len(prompts), 0, time.perf_counter()
    tok.padding_side = "left"
    for b in range(0, len(order), batch):
        idx = order[b : b + batch]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc, do_sample=False, max_new_tokens=max_new, pad_token_id=tok.pad_token_id,
            stopping_criteria=StoppingCriteriaList([StopOnStrings(tok, STOPS, enc["input_ids"].shape[1])]),
            temperature=None, top_p=None, top_k=None,
        )  # fmt: skip
        for row, i in zip(out[:, enc["input_ids"].shape[1] :], idx):
            new_tokens += int((row != tok.pad_token_id).sum())
            outputs[i] = truncate_at_stops(tok.decode(row, skip_special_tokens=True), STOPS)
    seconds = time.perf_counter() - start
    return outputs, {"generated_tokens": new_tokens, "seconds": seconds, "tokens_per_second": new_tokens / seconds}


@torch.no_grad()
def sample_plain(model, tok, num: int, seq_len: int, batch: int) -> dict:
    start, tokens = time.perf_counter(), 0
    for b in range(0, num, batch):
        ids = torch.full((min(batch, num - b), 1), tok.bos_token_id)
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            min_new_tokens=seq_len - 1, max_new_tokens=seq_len - 1, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        tokens += out[:, 1:].numel()
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--slots", type=int, nargs="+", default=[32, 64])
    p.add_argument("--samples", type=int, default=32, help="self-generated sequences (the quick recipe's training set)")
    p.add_argument("--sample-len", type=int, default=256)
    p.add_argument("--out", default="benchmarks/results/generation.json")
    args = p.parse_args()

    model, tok = load_model_and_tokenizer(args.model, "float32", "cpu")
    prompts = [build_prompt(tok, r["question"], [], False) for r in load_rows("gsm8k", "test")[: args.questions]]
    result: dict = {"benchmark": "generation", "environment": environment(), "args": vars(args), "greedy": {}}

    reference, plain = generate_plain(model, tok, prompts, args.max_new_tokens, 16)
    result["greedy"]["generate-batch16"] = plain
    print("generate b16", json.dumps(plain), flush=True)
    for slots in args.slots:
        outputs, stats = generate_greedy(model, tok, prompts, STOPS, args.max_new_tokens, slots, progress=False)
        stats["identical"] = sum(a == b for a, b in zip(outputs, reference))
        stats["speedup"] = stats["tokens_per_second"] / plain["tokens_per_second"]
        result["greedy"][f"sparsefit-slots{slots}"] = stats
        print(f"sparsefit slots {slots}", json.dumps(stats), flush=True)

    sampled = sample_plain(model, tok, args.samples, args.sample_len, 16)
    t = time.perf_counter()
    sample_from_model(model, tok, args.samples, args.sample_len, seed=0, progress=False)
    seconds = time.perf_counter() - t
    ours = {"tokens": args.samples * (args.sample_len - 1), "seconds": seconds}
    ours["tokens_per_second"] = ours["tokens"] / seconds
    result["sampling"] = {
        "generate-batch16": sampled,
        "sparsefit": ours,
        "speedup": ours["tokens_per_second"] / sampled["tokens_per_second"],
        "speedup_vs_greedy_yardstick": ours["tokens_per_second"] / plain["tokens_per_second"],
    }
    print("sampling", json.dumps(result["sampling"]), flush=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()

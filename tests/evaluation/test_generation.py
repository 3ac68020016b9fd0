"""Continuous-batching greedy generation gives each prompt what plain `generate` gives it alone."""

import pytest
import torch

from sparsefit.evaluation import generation
from sparsefit.evaluation.generation import generate_greedy, truncate_at_stops
from tests.conftest import CORPUS, tiny_model

PROMPTS = [CORPUS[0], "The", CORPUS[2][:30], "Sparse models keep", CORPUS[1], "Tom has 3", CORPUS[3], "Answer:"]


def alone(model, tokenizer, prompt, max_new, stops, count=False):
    """`generate` on one unpadded prompt, stopped the same way: the reference (text, or tokens made)."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    new = out[0, ids.shape[1] :].tolist()
    for n in range(1, len(new) + 1):  # the first point where a stop string shows in the last 10 tokens
        if any(s in tokenizer.decode(new[max(0, n - 10) : n]) for s in stops):
            new = new[:n]
            break
    if count:
        return sum(t != tokenizer.pad_token_id for t in new)
    return truncate_at_stops(tokenizer.decode(new, skip_special_tokens=True), stops)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
@pytest.mark.parametrize("batch_size, compact", [(3, 64), (2, 1), (16, 64)])
def test_each_row_gets_what_generate_gives_it_alone(arch, batch_size, compact, tokenizer, monkeypatch):
    monkeypatch.setattr(generation, "COMPACT_EVERY", compact)  # 1: the cache compacts every step or so
    model = tiny_model(arch)
    expected = [alone(model, tokenizer, p, 24, []) for p in PROMPTS]
    got, stats = generate_greedy(model, tokenizer, PROMPTS, [], 24, batch_size=batch_size, progress=False)
    assert got == expected
    assert stats["generated_tokens"] == sum(alone(model, tokenizer, p, 24, [], count=True) for p in PROMPTS)


def test_stop_strings_end_a_row_as_the_harness_criterion_does(tokenizer):
    model = tiny_model("llama")
    free = [alone(model, tokenizer, p, 24, []) for p in PROMPTS]
    stop = next(text[5:8] for text in free if len(text) > 10)  # a string some row will emit
    expected = [alone(model, tokenizer, p, 24, [stop]) for p in PROMPTS]
    got, _ = generate_greedy(model, tokenizer, PROMPTS, [stop], 24, batch_size=3, progress=False)
    assert got == expected and any(len(e) < len(f) for e, f in zip(expected, free))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_the_sparse_runtime_gives_what_generate_gives_on_the_same_bf16_weights(arch, tokenizer, monkeypatch):
    from sparsefit.evaluation.generation import generate_texts
    from sparsefit.runtime.kernels import ISA_ENV, ISAS, input_dtype, load_kernels

    kernels = load_kernels()
    if not kernels.available:
        pytest.skip("kernels unavailable")
    # fp32 inputs, as transformers multiplies them: bf16-rounded ones (the avx512bf16 / amx rows)
    # would flip near-tied greedy tokens of a random model.
    fp32 = next(isa for isa in ISAS if kernels.supports(isa) and input_dtype(isa, "bfloat16") == torch.float32)
    monkeypatch.setenv(ISA_ENV, fp32)
    model = tiny_model(arch)
    with torch.no_grad():  # the runtime multiplies by bf16 weights: give transformers the same ones
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    free = [alone(model, tokenizer, p, 24, []) for p in PROMPTS]
    stop = next(text[5:8] for text in free if len(text) > 10)
    expected = [alone(model, tokenizer, p, 24, [stop]) for p in PROMPTS]
    got, stats = generate_texts(model, tokenizer, PROMPTS, [stop], 24, batch_size=3, runtime="sparse", progress=False)
    assert got == expected and stats["runtime"].startswith("sparse")
    _, stats = generate_texts(tiny_model("gpt2"), tokenizer, PROMPTS[:2], [], 4, runtime="auto", progress=False)
    assert stats["runtime"] == "hf"  # a family the fast decoder does not run

"""The packed decoder against transformers on tiny random models of each family it runs, and the
engine's continuous batching, stopping and sampling."""

from __future__ import annotations

import pytest
import torch

from sparsefit.runtime.checkpoint import CheckpointTensors
from sparsefit.runtime.decoder import load_decoder
from sparsefit.runtime.engine import Engine, Request, run_requests
from sparsefit.runtime.kernels import ISAS, input_dtype, load_kernels
from sparsefit.runtime.reference import ReferenceDecoder
from sparsefit.runtime.sampling import Sampling
from tests.conftest import tiny_model

pytestmark = pytest.mark.skipif(not load_kernels().available, reason="kernels unavailable")
FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]
RUNNABLE = [isa for isa in ISAS if load_kernels().supports(isa)]
# The comparisons with transformers' fp32 forward run the kernels that take fp32 inputs; the ones
# that round inputs to bf16 (AMX) are compared with a reference that rounds them the same way.
FP32_ISA = next((isa for isa in RUNNABLE if input_dtype(isa, "bfloat16") == torch.float32), None)
BF16_ISAS = [isa for isa in RUNNABLE if input_dtype(isa, "bfloat16") == torch.bfloat16]


def _bf16_model(arch: str, window: int | None = None, sparsity: float = 0.5):
    """A tiny model with half its block weights pruned and every weight rounded to bf16 (so the
    packed decoder and transformers multiply by the same numbers)."""
    model = tiny_model(arch)
    if window is not None:
        model.config.sliding_window = window
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "layers" in name:
                p.mul_(torch.rand(p.shape, generator=g) >= sparsity)
            p.copy_(p.bfloat16().float())
    return model


@pytest.fixture
def saved(tmp_path, tokenizer):
    def save(model):
        path = tmp_path / model.config.model_type
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    return save


def _prefill(decoder, ids):
    cache = decoder.new_cache(1, 64)
    n = len(ids)
    zeros = torch.zeros(n, dtype=torch.long)
    return decoder.forward(torch.tensor(ids), zeros, torch.arange(n), cache, torch.arange(n))


@pytest.mark.parametrize("arch", FAMILIES)
def test_decoder_and_reference_match_transformers(arch, saved):
    window = 5 if arch == "mistral" else None  # the sliding window shows within a short prompt
    model = _bf16_model(arch, window)
    path = saved(model)
    ids = [1, 17, 43, 99, 5, 250, 12, 7, 64, 3, 200, 31]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    src = CheckpointTensors(path)
    for decoder in (load_decoder(src, isa=FP32_ISA), ReferenceDecoder(src)):
        torch.testing.assert_close(_prefill(decoder, ids), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not BF16_ISAS, reason="this CPU has no kernels that round inputs to bf16 (AVX512-BF16, AMX)")
@pytest.mark.parametrize("values", ["bfloat16", "int8"])
def test_bf16_input_kernels_match_a_reference_that_rounds_the_same(saved, values):
    model = _bf16_model("llama")
    src = CheckpointTensors(saved(model))
    ids = [1, 17, 43, 99, 5, 250, 12, 7, 64, 3, 200, 31]
    fp32 = _prefill(load_decoder(src, values, isa=FP32_ISA), ids)
    for isa in BF16_ISAS:
        got = _prefill(load_decoder(src, values, isa=isa), ids)
        if values == "bfloat16":
            torch.testing.assert_close(got, _prefill(ReferenceDecoder(src, torch.bfloat16), ids), rtol=1e-4, atol=1e-4)
        # Rounding the inputs moves the logits by about bf16's precision, not more.
        assert (got - fp32).abs().max() < 0.05 * fp32.abs().max()


def test_int8_values_run_the_weights_they_report(saved):
    model = _bf16_model("llama")
    decoder = load_decoder(CheckpointTensors(saved(model)), values="int8", isa=FP32_ISA)
    h, kv = model.config.hidden_size, model.config.num_key_value_heads * 16
    with torch.no_grad():
        for layer, block in zip(decoder.layers, model.model.layers):
            q, k, v = layer.qkv.to_dense().split([h, kv, kv])
            attn, mlp = block.self_attn, block.mlp
            for mod, w in ((attn.q_proj, q), (attn.k_proj, k), (attn.v_proj, v), (attn.o_proj, layer.o.to_dense()),
                           (mlp.down_proj, layer.down.to_dense())):  # fmt: skip
                mod.weight.copy_(w)
            gate, up = layer.gate_up.to_dense().chunk(2)
            mlp.gate_proj.weight.copy_(gate)
            mlp.up_proj.weight.copy_(up)
        model.model.embed_tokens.weight.copy_(decoder.embed.to_dense())
    ids = [1, 5, 9, 200, 33]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_prefill(decoder, ids), expected, rtol=1e-4, atol=1e-4)
    assert decoder.weight_bytes < load_decoder(CheckpointTensors(saved(model))).weight_bytes


def _engine(decoder, tokenizer, slots=4, capacity=64):
    return Engine(decoder, tokenizer, slots, capacity, eos={tokenizer.eos_token_id})


def test_greedy_tokens_are_those_of_transformers_generate(saved, tokenizer):
    model = _bf16_model("llama")
    # fp32 inputs, as transformers multiplies them: a random model's near-ties would flip a greedy
    # token under bf16-rounded inputs (those kernels: test_bf16_input_kernels_match_...).
    decoder = load_decoder(CheckpointTensors(saved(model)), isa=FP32_ISA)
    prompt = tokenizer("Question: Tom has 3 apples").input_ids
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                            pad_token_id=tokenizer.eos_token_id)[0, len(prompt):].tolist()  # fmt: skip
    (out,) = run_requests(_engine(decoder, tokenizer), [Request(prompt, 20, ignore_eos=True)])
    assert out["token_ids"] == hf and out["finish_reason"] == "length"


def test_a_request_gets_the_same_tokens_alone_or_among_others(saved, tokenizer):
    decoder = load_decoder(CheckpointTensors(saved(_bf16_model("qwen3"))))
    texts = ["The quick brown", "Sparse models keep", "Answer: 3 + 5", "Tom has", "near the river bank"] * 2
    requests = [Request(tokenizer(t).input_ids, 6 + 3 * i, ignore_eos=True) for i, t in enumerate(texts)]
    alone = [run_requests(_engine(decoder, tokenizer, slots=1), [r])[0]["token_ids"] for r in requests]
    together = run_requests(_engine(decoder, tokenizer, slots=3), requests)  # rows join and leave
    assert [o["token_ids"] for o in together] == alone
    # a prompt prefilled in chunks over several steps gives the same tokens too
    chunked = Engine(decoder, tokenizer, 3, 64, {tokenizer.eos_token_id}, prefill_chunk=2)
    assert [o["token_ids"] for o in run_requests(chunked, requests)] == alone


def test_stop_strings_cut_the_text_and_streaming_never_shows_them(saved, tokenizer):
    decoder = load_decoder(CheckpointTensors(saved(_bf16_model("llama"))))
    prompt = tokenizer("The quick").input_ids
    (free,) = run_requests(_engine(decoder, tokenizer), [Request(prompt, 30, ignore_eos=True)])
    text = free["text"]
    assert len(text) > 6
    stop = text[3:6]
    streamed = []
    (out,) = run_requests(_engine(decoder, tokenizer), [Request(prompt, 30, stop=(stop,), ignore_eos=True)],
                          on_event=lambda e: streamed.append(e.text))  # fmt: skip
    assert out["text"] == text[: text.index(stop)] and out["finish_reason"] == "stop"
    assert "".join(streamed) == out["text"]


def test_sampling_is_seeded_per_request(saved, tokenizer):
    decoder = load_decoder(CheckpointTensors(saved(_bf16_model("llama"))))
    prompt = tokenizer("Tom has").input_ids

    def sample(seed, slots=2, others=0):
        reqs = [Request(prompt, 12, Sampling(1.0, 0.9, 50, seed), ignore_eos=True)]
        reqs += [Request(prompt, 5, Sampling(0.7, seed=seed + 1 + i), ignore_eos=True) for i in range(others)]
        return run_requests(_engine(decoder, tokenizer, slots=slots), reqs)[0]["token_ids"]

    assert sample(3) == sample(3, slots=3, others=2)  # its own generator: the batch does not matter
    assert sample(3) != sample(4)


def test_requests_that_cannot_fit_are_refused(saved, tokenizer):
    engine = _engine(load_decoder(CheckpointTensors(saved(_bf16_model("llama")))), tokenizer, capacity=16)
    with pytest.raises(ValueError, match="exceed the context"):
        engine.submit(Request(list(range(10)), 10))
    with pytest.raises(ValueError, match="empty"):
        engine.submit(Request([], 4))

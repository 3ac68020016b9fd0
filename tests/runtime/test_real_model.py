"""The runtime on the real model (slow): a 50% pruned SmolLM2 on the packed sparse kernels of every
instruction-set row this CPU runs, against torch's dense matmuls over the same bf16 weights (with
the inputs rounded as that row rounds them, `kernels.input_dtype`).

Sums taken in another order than a dense matmul's differ in their last bits. Where a row rounds
its inputs to bf16, such a difference now and then tips one input to the neighbouring bf16 value
(2^-8 apart), so the logits move by a few tenths (measured here: 0.2-0.6 with avx512bf16, 1e-4
with the fp32 rows) and two greedy decodes may part where two tokens are nearly tied. The check:
teacher-forced on the reference's tokens the logits agree within the row's bound; the free-running
greedy tokens are identical (fp32 rows), or identical up to a step where the reference's own top
two logits were within NEAR_TIE (bf16 rows); and the WikiText-2 perplexity is the reference's
within 0.1%."""

from __future__ import annotations

import math

import pytest
import torch

from sparsefit.runtime.kernels import ISAS, input_dtype, load_kernels

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not load_kernels().available, reason="kernels unavailable")]

PROMPTS = [
    "The capital of France is",
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?\nAnswer:",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at",
    "To make a cup of tea, first",
    "The largest planet in the solar system is",
    "Sparse neural networks are",
    "In 1969, the first humans",
]
NEW_TOKENS = 64
# Teacher-forced |sparse - reference| over every generated position, by the inputs' precision.
MAX_LOGIT_DEVIATION = {torch.float32: 0.01, torch.bfloat16: 1.0}
NEAR_TIE = 0.1  # logits: where the greedy decodes part, the reference's margin must be below this
MAX_PARTED = {torch.float32: 0, torch.bfloat16: 4}  # of the 10 prompts: fp32 rows decode the same text


@pytest.fixture(scope="module")
def pruned_builtin(tmp_path_factory):
    from sparsefit.export import save_checkpoint
    from sparsefit.models import load_model_and_tokenizer
    from sparsefit.pruning import OneShotConfig, oneshot

    model, tok = load_model_and_tokenizer("smollm2-135m")
    report = oneshot(model, tok, OneShotConfig(method="magnitude", sparsity=0.5, calib=None), progress=False)
    path = tmp_path_factory.mktemp("runtime") / "smollm2-magnitude50"
    save_checkpoint(model, tok, path, {"pruning": report.to_json()})
    return path


def _logits(decoder, ids: list[int]) -> torch.Tensor:
    """Logits at every position of `ids`, in one prefill."""
    n = len(ids)
    cache = decoder.new_cache(1, n)
    positions = torch.arange(n)
    return decoder.forward(torch.tensor(ids), torch.zeros(n, dtype=torch.long), positions, cache, positions)


def _perplexity(decoder, ids: list[int], windows: int = 2, length: int = 512) -> float:
    nll, count = 0.0, 0
    for w in range(windows):
        chunk = ids[w * length : (w + 1) * length]
        logp = torch.log_softmax(_logits(decoder, chunk)[:-1].double(), -1)
        nll -= logp.gather(1, torch.tensor(chunk[1:])[:, None]).sum().item()
        count += len(chunk) - 1
    return math.exp(nll / count)


# Every row here that rounds its inputs, and the best one that does not (the other fp32 rows are
# held to a float64 reference on tiny models in test_decoder.py).
_RUNNABLE = [isa for isa in ISAS if load_kernels().supports(isa)]
_FP32 = [isa for isa in _RUNNABLE if input_dtype(isa, "bfloat16") == torch.float32]
ROWS = [isa for isa in _RUNNABLE if input_dtype(isa, "bfloat16") == torch.bfloat16] + _FP32[:1]


@pytest.mark.parametrize("isa", ROWS)
def test_each_kernel_row_decodes_the_reference_greedy_tokens(pruned_builtin, shared_data, isa):
    from sparsefit.runtime.model import encode_prompt, generate, load_runtime

    inputs = input_dtype(isa, "bfloat16")
    sparse = load_runtime(str(pruned_builtin), "sparse", isa=isa, progress=False)
    ref = load_runtime(str(pruned_builtin), "dense", isa=isa, progress=False)
    assert sparse.decoder.layers[0].gate_up.layout == "bitmask"  # about half the bytes of the dense bf16 model
    runs = {name: generate(m, PROMPTS, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
            for name, m in (("sparse", sparse), ("ref", ref))}  # fmt: skip
    assert all(len(t) == NEW_TOKENS for t in runs["sparse"])

    parted = []
    for prompt, mine, theirs in zip(PROMPTS, runs["sparse"], runs["ref"], strict=True):
        prompt_ids = encode_prompt(ref.tokenizer, prompt)
        start, ids = len(prompt_ids), prompt_ids + theirs
        r, s = _logits(ref.decoder, ids)[start - 1 : -1], _logits(sparse.decoder, ids)[start - 1 : -1]
        deviation = (r - s).abs().max().item()
        assert deviation < MAX_LOGIT_DEVIATION[inputs], f"{isa}: logits deviate by {deviation:.4f} on {prompt!r}"
        j = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b), None)
        if j is not None:  # the reference's own margin between its token and ours, where they parted
            gap = (r[j, theirs[j]] - r[j, mine[j]]).item()
            assert gap < NEAR_TIE, f"{isa}: parted at step {j} of {prompt!r} on a margin of {gap:.4f}"
            parted.append(prompt)
    assert len(parted) <= MAX_PARTED[inputs], f"{isa}: {len(parted)} prompts parted at near-ties: {parted}"

    from sparsefit.data.sources import wikitext_stream

    text = ref.tokenizer(wikitext_stream()[:20_000])["input_ids"]  # more than the 2 x 512 tokens scored
    ppl = {name: _perplexity(m.decoder, text) for name, m in (("sparse", sparse), ("ref", ref))}
    assert abs(ppl["sparse"] / ppl["ref"] - 1) < 0.001, ppl

"""The runtime on the real model (slow): a 50% pruned SmolLM2 decodes the same greedy tokens on the
packed sparse kernels as on torch's dense matmuls over the same bf16 weights."""

from __future__ import annotations

import pytest

from sparsefit.runtime.kernels import load_kernels

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


def test_sparse_and_dense_runtimes_decode_the_same_greedy_tokens(pruned_builtin):
    from sparsefit.runtime.model import generate, load_runtime

    runs = {}
    for runtime in ("sparse", "dense"):
        model = load_runtime(str(pruned_builtin), runtime, progress=False)
        runs[runtime] = generate(model, PROMPTS, max_new_tokens=64, ignore_eos=True).token_ids
        if runtime == "sparse":  # the packed model holds about half the bytes of the dense bf16 one
            assert model.decoder.layers[0].gate_up.layout == "bitmask"
    assert all(len(t) == 64 for t in runs["sparse"])
    assert runs["sparse"] == runs["dense"]

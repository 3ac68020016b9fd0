"""The compute-device path on a CUDA GPU. Without one these tests are skipped, and `-ra` says why."""

import pytest
import torch

from sparsefit.models.layout import decoder_layout
from sparsefit.pruning import oneshot
from tests.conftest import tiny_model
from tests.pruning.test_pipeline import calib, cfg, linears

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("sequential", [False, True])
def test_gpu_prunes_as_the_cpu_does(method, sequential):
    refit = 4 if method == "sparsegpt" else 0
    config = cfg(method=method, sparsity=0.5, sequential=sequential, reconstruct_iters=refit)
    on_cpu, on_gpu = tiny_model("llama"), tiny_model("llama")
    oneshot(on_cpu, None, config, device="cpu", calib=calib(), progress=False)
    report = oneshot(on_gpu, None, config, device="cuda", calib=calib(), progress=False)
    assert report.peak_gpu_mb > 0
    # One pass (H100, H200): every weight within 6e-6 relative of the CPU's. Sequentially, a near-tie
    # that rounds apart in one linear (SparseGPT on an H200: 2 to 10 of 4096-8192 weights, with the refit)
    # changes the inputs of every later linear, so there the GPU must prune as well, not identically
    # (on a CPU, weights perturbed by 1e-7 flip 44 weights and move that distance by 5e-4).
    exact = not sequential
    for name, module in linears(on_cpu).items():
        w_cpu = module.weight.detach()
        w_gpu = linears(on_gpu)[name].weight.detach().cpu()
        assert ((w_cpu == 0) == (w_gpu == 0)).float().mean().item() > 0.99, name  # a near-tie may round apart
        if exact:
            assert (w_cpu - w_gpu).norm() / w_cpu.norm() < 1e-3, name
    x = calib(4, 32, seed=1)
    with torch.no_grad():
        ref, out = on_cpu(x).logits, on_gpu.to("cpu")(x).logits
        dense = tiny_model("llama")(x).logits
    if exact:
        assert (out - ref).norm() / ref.norm() < 1e-3
    else:  # the pruned outputs' distance from the dense model's, GPU against CPU
        assert abs((out - dense).norm() / (ref - dense).norm() - 1) < 0.05


@needs_cuda
def test_only_the_current_block_is_on_the_gpu():
    model = tiny_model("llama")
    blocks = decoder_layout(model).blocks
    seen: list[tuple[int, list[int]]] = []

    def record(i):
        def hook(module, args):
            seen.append((i, [j for j, b in enumerate(blocks) if next(b.parameters()).is_cuda]))

        return hook

    handles = [b.register_forward_pre_hook(record(i)) for i, b in enumerate(blocks)]
    try:
        config = cfg(method="sparsegpt", sparsity=0.5, compute_dtype="auto")
        report = oneshot(model, None, config, device="cuda", calib=calib(), progress=False)
    finally:
        for h in handles:
            h.remove()
    # Block 0's first calls are the capture, before any block moved; every other call finds its own block alone.
    assert {i for i, on in seen if on == [i]} == set(range(len(blocks)))
    assert all(on in ([], [i]) for i, on in seen)
    assert not any(p.is_cuda for b in blocks for p in b.parameters())
    assert report.compute_dtype == "float32"  # `auto` keeps float32 on GPUs

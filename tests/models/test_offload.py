"""Disk offload: parameters and activations move to a file, come back lazily with the same values,
and nothing stays on disk.

That pruning with offload gives the same model is tested with the pipeline (tests/pruning/test_pipeline.py).
"""

import mmap
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

from sparsefit.errors import UsageError
from sparsefit.models.layout import decoder_layout, params_outside_blocks
from sparsefit.models.offload import (
    HeapCeiling,
    offload_parameters,
    offload_tensor_,
    prefault,
    prepare_offload_dir,
    release_free_heap,
    resident_mb,
)
from tests.conftest import tiny_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offloaded_parameters_keep_their_values_and_stay_parameters(tmp_path, dtype):
    layer = nn.Linear(24, 16).to(dtype)
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    params = dict(layer.named_parameters())
    moved = offload_parameters(layer.named_parameters(), tmp_path)
    assert moved == sum(p.numel() * p.element_size() for p in before.values())
    assert list(tmp_path.iterdir()) == []  # unlinked once mapped
    for name, p in layer.named_parameters():
        assert p is params[name] and isinstance(p, nn.Parameter) and p.requires_grad
        assert p.dtype == dtype and torch.equal(p.detach(), before[name])
    with torch.no_grad():  # still writable, and a write touches only that tensor
        layer.weight[0, 0] = 7.0
    assert layer.weight[0, 0].item() == 7.0 and torch.equal(layer.bias.detach(), before["bias"])
    out = layer(torch.ones(2, 24, dtype=dtype))
    out.float().sum().backward()
    assert layer.weight.grad is not None


def test_offloading_one_view_of_a_storage_leaves_the_others_intact(tmp_path):
    """Checkpoints load as one mapped buffer; releasing a moved tensor's pages must not touch its neighbours."""
    buffer = torch.randn(3 * 4096)  # three page-sized (and larger) tensors side by side
    a, b, c = (nn.Parameter(buffer[i * 4096 : (i + 1) * 4096]) for i in range(3))
    expected = [t.detach().clone() for t in (a, b, c)]
    offload_parameters([("b", b)], tmp_path)
    assert torch.equal(a.detach(), expected[0]) and torch.equal(c.detach(), expected[2])
    assert torch.equal(b.detach(), expected[1])
    release_free_heap()  # safe to call any time


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool])
def test_offloaded_tensor_keeps_its_values_in_place(tmp_path, dtype):
    t = torch.randn(3, 5, 4096) > 0 if dtype == torch.bool else torch.randn(3, 5, 4096).to(dtype)
    same, expected, address = t, t.clone(), t.data_ptr()
    assert offload_tensor_(t, tmp_path) == t.numel() * t.element_size()
    assert same is t and t.data_ptr() != address  # every reference sees the moved bytes
    assert t.dtype == dtype and t.shape == expected.shape and t.stride() == expected.stride()
    assert torch.equal(t, expected)
    assert list(tmp_path.iterdir()) == []  # unlinked once mapped
    t[0] = t[1]  # still writable (privately)
    assert torch.equal(t[0], expected[1]) and torch.equal(t[2], expected[2])


def test_prefault_maps_an_offloaded_tensor_in_without_changing_it(tmp_path):
    t = torch.randn(16 * 2**20 // 4)  # 16 MiB
    expected = t.clone()
    offload_tensor_(t, tmp_path)
    before = resident_mb()
    if not prefault(t):
        pytest.skip("this kernel has no MADV_POPULATE_READ (Linux >= 5.14)")
    assert resident_mb() - before > 12  # the file pages are now mapped, before anything reads them
    assert torch.equal(t, expected)
    assert not prefault(torch.empty(0))


def test_tensors_that_share_their_storage_are_not_offloaded(tmp_path):
    base = torch.randn(4, 6)
    for t in (base[1:], base.t(), base.view(24)):  # a slice, non-contiguous, a view of the whole storage
        address, expected = t.data_ptr(), t.clone()
        assert offload_tensor_(t, tmp_path) == 0
        assert t.data_ptr() == address and torch.equal(t, expected)
    assert offload_tensor_(torch.empty(0), tmp_path) == 0
    assert list(tmp_path.iterdir()) == []


def test_params_outside_blocks():
    model = tiny_model("llama")
    names = [name for name, _ in params_outside_blocks(model, decoder_layout(model))]
    assert names and not any(name.startswith("model.layers.") for name in names)
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names


def test_unwritable_offload_dir_is_a_usage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="not writable.*--offload-dir"):
        prepare_offload_dir(blocker / "sub")
    assert prepare_offload_dir(tmp_path / "a" / "b").is_dir()


def test_heap_ceiling_learns_the_first_block_then_trims_only_above_it(monkeypatch):
    resident, trims = [500.0], []
    monkeypatch.setattr("sparsefit.models.offload.resident_mb", lambda: resident[0])
    monkeypatch.setattr("sparsefit.models.offload.release_free_heap", lambda: trims.append(resident[0]))
    heap = HeapCeiling(slack_mb=64)
    for mb in (500, 900, 700):  # the first block: learned, never trimmed
        resident[0] = mb
        heap.check()
    heap.end_block()
    assert heap.ceiling_mb == 964 and trims == []
    for mb in (950, 964, 980, 600):
        resident[0] = mb
        heap.check()
    heap.end_block()  # the ceiling stays the first block's
    assert trims == [980] and heap.trims == 1 and heap.ceiling_mb == 964


def test_resident_mb_sees_memory_being_touched():
    # A fresh anonymous mapping, not the heap: earlier tests may leave freed, still-resident heap
    # memory that a tensor allocation would reuse without raising the count.
    block = mmap.mmap(-1, 64 * 2**20)
    before = resident_mb()
    block.write(b"\1" * (64 * 2**20))  # every page touched
    assert resident_mb() - before > 60
    block.close()


_REALLOCATE = """
import resource, sys, torch
from sparsefit.models.offload import reuse_freed_memory
tuned = sys.argv[1] == "1" and reuse_freed_memory()
x = torch.ones(32 * 2**20); del x  # 128 MB: above glibc's largest threshold for mapping afresh
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(16 * 2**20)
print(int(tuned), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_reuse_freed_memory_serves_a_large_allocation_again_without_faults():
    """A freed 128 MB tensor's pages serve the next, 64 MB one: far fewer page faults than its 16384
    pages. (The freed block is the larger one: a block of the same size would not take the alignment
    slack of torch's allocations, and the heap would grow instead.)"""

    def faults(tune: bool) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", _REALLOCATE, str(int(tune))], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        tuned, count = map(int, out.stdout.split())
        return tuned, count

    assert faults(False) == (0, pytest.approx(16384, rel=0.2))  # mapped afresh: every page faults
    tuned, count = faults(True)
    assert tuned == 1 and count < 1000

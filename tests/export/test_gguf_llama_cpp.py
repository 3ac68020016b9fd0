"""The GGUF files in a real client: llama.cpp's llama-perplexity loads sparsefit's tiny Llama and
computes on it. Skipped, with the reason, where llama.cpp is not built (benchmarks/llama_cpp.py
builds it; SPARSEFIT_LLAMA_CPP_BIN points at its build/bin). The builtin model's agreement with
llama.cpp's own converter is measured in benchmarks/gguf_export.py."""

from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path

import pytest

from sparsefit.export import export_checkpoint
from tests.conftest import CORPUS
from tests.export.test_gguf import pruned_llama

BIN = Path(
    os.environ.get("SPARSEFIT_LLAMA_CPP_BIN", Path(__file__).resolve().parents[3] / "llamacpp/llama.cpp/build/bin")
)
TOOL = BIN / "llama-perplexity"


def llama_perplexity(gguf: Path, text: Path) -> float:
    """llama.cpp's perplexity over the text's first 4 chunks of 64 tokens: its running estimate after
    chunk 4, read from a run over 8 chunks (the text holds the corpus twice). llama.cpp's logger thread
    may lose the last lines of a run at exit, more often on a busy machine (llama.cpp issue 22142), so
    the value read is printed well before the end."""
    cmd = [str(TOOL), "-m", str(gguf), "-f", str(text), "-c", "64", "-b", "64", "--chunks", "8", "-t", "1"]
    for _ in range(3):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        found = re.search(r"\[4\]([0-9.]+)", proc.stdout + proc.stderr)
        if found:
            return float(found.group(1))
    raise AssertionError((proc.stdout + proc.stderr)[-3000:])


def corpus_file(tmp_path: Path) -> Path:
    text = tmp_path / "text.txt"
    text.write_text(" ".join(CORPUS + CORPUS))
    return text


@pytest.mark.skipif(not TOOL.exists(), reason=f"llama.cpp's llama-perplexity is not built at {BIN}")
def test_llama_cpp_loads_and_runs_every_format(tmp_path, tokenizer):
    text = corpus_file(tmp_path)
    model = pruned_llama()
    ppl = {}
    for fmt in ("gguf-f16", "gguf-bf16", "gguf-q8_0", "gguf-q4_0"):
        info = export_checkpoint(model, tokenizer, tmp_path / fmt, "tiny-llama", fmt)
        ppl[fmt] = llama_perplexity(tmp_path / fmt / info["gguf"]["file"], text)
        assert math.isfinite(ppl[fmt]) and ppl[fmt] > 1
    # the same weights, rounded a little more or less: the same model to llama.cpp
    assert ppl["gguf-bf16"] == pytest.approx(ppl["gguf-f16"], rel=0.02)
    assert ppl["gguf-q8_0"] == pytest.approx(ppl["gguf-f16"], rel=0.02)
    assert ppl["gguf-q4_0"] == pytest.approx(ppl["gguf-f16"], rel=0.25)


@pytest.mark.skipif(not TOOL.exists(), reason=f"llama.cpp's llama-perplexity is not built at {BIN}")
def test_llama_cpp_agrees_with_transformers_on_the_f16_file(tmp_path, tokenizer):
    """llama.cpp's perplexity of the f16 file equals transformers' on the same tokens, chunked as llama.cpp
    does (each 64-token chunk scored on its second half): the Q/K permutation and every hyper-parameter
    are read as meant."""
    import torch

    text = corpus_file(tmp_path)
    model = pruned_llama()
    info = export_checkpoint(model, tokenizer, tmp_path / "f16", "tiny-llama", "gguf-f16")
    theirs = llama_perplexity(tmp_path / "f16" / info["gguf"]["file"], text)
    ids = tokenizer(text.read_text())["input_ids"]
    nll, count = 0.0, 0
    with torch.no_grad():
        model.half().float()  # the f16 weights
        for c in range(4):
            chunk = torch.tensor([ids[c * 64 : (c + 1) * 64]])
            logp = torch.log_softmax(model(chunk).logits[0].double(), -1)
            for i in range(32, 63):  # llama.cpp scores tokens first + n_ctx/2 .. n_ctx-1
                nll -= float(logp[i, chunk[0, i + 1]])
                count += 1
    ours = math.exp(nll / count)
    assert theirs == pytest.approx(ours, rel=0.01)

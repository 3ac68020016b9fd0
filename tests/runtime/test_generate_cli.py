"""`sparsefit generate` end to end on tiny checkpoints: every runtime, every export format the
runtime reads, and the bad inputs a user can give it."""

from __future__ import annotations

import json

import pytest
import torch

from sparsefit.export import export_checkpoint
from sparsefit.runtime.kernels import load_kernels
from tests.conftest import run_cli, tiny_model

pytestmark = pytest.mark.skipif(not load_kernels().available, reason="kernels unavailable")


@pytest.fixture
def pruned_checkpoint(tmp_path, tokenizer):
    """A tiny Llama, half its block weights pruned, all weights bf16-exact, saved as sparsefit does."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "layers" in name:
                p.mul_(torch.rand(p.shape, generator=g) >= 0.5)
            p.copy_(p.bfloat16().float())
    path = tmp_path / "pruned"
    export_checkpoint(model, tokenizer, path, source="tiny")
    return path, model


def _generate(capsys, *argv):
    code, out, err = run_cli(["generate", *argv], capsys)
    assert code == 0, err[-2000:]
    return out, err


def test_generate_streams_text_and_reports_speed_memory_and_kernel(pruned_checkpoint, tmp_path, capsys):
    path, _ = pruned_checkpoint
    report = tmp_path / "g.json"
    out, err = _generate(capsys, "--model", str(path), "--prompt", "Tom has", "--max-new-tokens", "12",
                         "--ignore-eos", "--json", str(report))  # fmt: skip
    r = json.loads(report.read_text())
    assert out.rstrip("\n") == r["text"] and len(r["token_ids"]) == 12
    assert r["runtime"] == "sparse" and r["kernel"] == load_kernels().isa and r["values"] == "bfloat16"
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "weight_bytes", "peak_rss_bytes"):
        assert r[key] > 0, key
    assert "decode" in err and "tok/s" in err


def test_the_runtimes_agree_on_greedy_tokens(pruned_checkpoint, tmp_path, capsys):
    path, _ = pruned_checkpoint
    tokens = {}
    for runtime in ("sparse", "dense", "hf"):
        report = tmp_path / f"{runtime}.json"
        _generate(capsys, "--model", str(path), "--prompt", "The quick brown", "--max-new-tokens", "16",
                  "--ignore-eos", "--runtime", runtime, "--json", str(report))  # fmt: skip
        tokens[runtime] = json.loads(report.read_text())["token_ids"]
    assert tokens["sparse"] == tokens["dense"] == tokens["hf"]


@pytest.mark.parametrize("fmt", ["sparse-bitmask"])
def test_compact_exports_run_and_give_the_same_tokens(pruned_checkpoint, tmp_path, tokenizer, capsys, fmt):
    path, model = pruned_checkpoint
    compact = tmp_path / fmt
    export_checkpoint(model, tokenizer, compact, source="tiny", fmt=fmt)
    runs = []
    for folder in (path, compact):
        report = tmp_path / f"{folder.name}.json"
        _generate(capsys, "--model", str(folder), "--prompt", "Sparse models", "--max-new-tokens", "10",
                  "--ignore-eos", "--json", str(report))  # fmt: skip
        runs.append(json.loads(report.read_text())["token_ids"])
    assert runs[0] == runs[1]


def test_int8_values_and_a_batch_of_prompts_from_a_file(pruned_checkpoint, tmp_path, capsys):
    path, _ = pruned_checkpoint
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Tom has", "The", "Answer: 3"]))
    report = tmp_path / "b.json"
    out, _ = _generate(capsys, "--model", str(path), "--prompt-file", str(prompts), "--values", "int8",
                       "--max-new-tokens", "5", "--ignore-eos", "--json", str(report))  # fmt: skip
    r = json.loads(report.read_text())
    assert r["values"] == "int8" and len(r["texts"]) == 3 and all(len(t) == 5 for t in r["token_ids"])
    assert out.count("=== ") == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "give a prompt"),
        (["--prompt", "x", "--temperature", "-1"], "--temperature"),
        (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["--prompt", "x", "--top-p", "0"], "--top-p"),
        (["--prompt", "x", "--runtime", "fast"], "--runtime"),
        (["--prompt", "x", "--threads", "0"], "--threads"),
        (["--prompt-file", "missing.txt"], "does not exist"),
        (["--prompt", "x", "--max-new-tokens", "100000"], "exceeds the model's context"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, pruned_checkpoint, capsys):
    path, _ = pruned_checkpoint
    code, _, err = run_cli(["generate", "--model", str(path), *argv], capsys)
    errors = [line for line in err.splitlines() if line.startswith("sparsefit: error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err[-1500:]


def test_a_family_without_the_fast_decoder_is_refused_by_the_sparse_runtime(tmp_path, tokenizer, capsys):
    path = tmp_path / "gpt2"
    export_checkpoint(tiny_model("gpt2"), tokenizer, path, source="tiny")
    code, _, err = run_cli(["generate", "--model", str(path), "--prompt", "x", "--runtime", "sparse"], capsys)
    assert code == 2 and "--runtime hf" in err
    out, err = _generate(capsys, "--model", str(path), "--prompt", "x", "--max-new-tokens", "3")  # auto: hf
    assert "plain transformers" in err

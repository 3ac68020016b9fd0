"""The embedded model against the reference figures measured with plain transformers."""

import pytest
from transformers import LlamaForCausalLM

from sparsefit.evaluation.tasks import evaluate_perplexity
from sparsefit.models import resolve_model

pytestmark = pytest.mark.slow


def test_builtin_is_cached_as_plain_safetensors(smollm2):
    import json
    from pathlib import Path

    model, tok = smollm2
    assert isinstance(model, LlamaForCausalLM) and model.config.num_hidden_layers == 30
    path = Path(resolve_model("smollm2-135m").path)
    assert (path / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_wikitext2_perplexity_matches_reference(smollm2):
    model, tok = smollm2
    result = evaluate_perplexity(model, tok, "wikitext2", seq_len=2048, max_windows=8, progress=False)
    assert result["windows"] == 8 and result["tokens"] == 8 * 2047
    assert result["ppl"] == pytest.approx(19.27, rel=0.005)


def test_gsm8k_scorer_agrees_with_harness_on_real_generations(smollm2, monkeypatch, tmp_path):
    """Same model, rows and generations: identical per-sample correctness under both filters."""
    from sparsefit.evaluation.answers import extract_flexible, extract_strict, is_correct
    from sparsefit.evaluation.gsm8k import evaluate_gsm8k
    from sparsefit.evaluation.harness import run_harness

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    model, tok = smollm2
    rows = 4
    out = run_harness(model, tok, ["gsm8k_local"], limit=rows, num_fewshot=0, batch_size=4, chat=True, log_samples=True)
    ours = evaluate_gsm8k(
        model, tok, limit=rows, chat=True, batch_size=4, samples_path=tmp_path / "s.jsonl", progress=False
    )
    import json

    our_samples = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    by_doc: dict[int, dict] = {}
    for s in out["samples"]["gsm8k_local"]:
        by_doc.setdefault(s["doc_id"], {})[s["filter"]] = s
    assert len(by_doc) == rows
    for doc_id, filters in sorted(by_doc.items()):
        theirs = filters["strict-match"]["resps"][0][0]
        answer = filters["strict-match"]["doc"]["answer"]
        assert our_samples[doc_id]["generation"] == theirs
        assert filters["strict-match"]["exact_match"] == float(is_correct(extract_strict(theirs), answer))
        assert filters["flexible-extract"]["exact_match"] == float(is_correct(extract_flexible(theirs), answer))
    harness = out["results"]["gsm8k_local"]
    assert ours["strict_match"] == pytest.approx(harness["exact_match,strict-match"])
    assert ours["flexible_match"] == pytest.approx(harness["exact_match,flexible-extract"])

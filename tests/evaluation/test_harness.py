"""sparsefit's GSM8K scorer against lm-evaluation-harness on the same model, rows and generations."""

import pytest

from sparsefit.evaluation.answers import extract_flexible, extract_strict, is_correct
from sparsefit.evaluation.generation import generate_greedy
from sparsefit.evaluation.gsm8k import STOPS, build_prompt
from sparsefit.evaluation.harness import run_harness
from tests.conftest import tiny_model


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("SPARSEFIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def test_harness_gsm8k_local_agrees_with_our_scorer(tokenizer, data_dir, offline):
    model = tiny_model("llama")
    out = run_harness(model, tokenizer, ["gsm8k_local"], limit=4, num_fewshot=0, batch_size=2, log_samples=True)
    metrics = out["results"]["gsm8k_local"]
    assert "exact_match,strict-match" in metrics and "exact_match,flexible-extract" in metrics
    by_doc: dict[int, dict] = {}
    for s in out["samples"]["gsm8k_local"]:  # one entry per (row, filter)
        by_doc.setdefault(s["doc_id"], {})[s["filter"]] = s
    assert sorted(by_doc) == [0, 1, 2, 3]
    docs = [by_doc[i]["strict-match"]["doc"] for i in range(4)]
    prompts = [build_prompt(tokenizer, d["question"], [], chat=False) for d in docs]
    ours, _ = generate_greedy(model, tokenizer, prompts, STOPS, 256, batch_size=2, progress=False)
    for i, generation in enumerate(ours):
        filters = by_doc[i]
        theirs = filters["strict-match"]["resps"][0][0]
        assert generation == theirs  # same prompt format and greedy decoding, token for token
        answer = docs[i]["answer"]
        assert filters["strict-match"]["exact_match"] == float(is_correct(extract_strict(theirs), answer))
        assert filters["flexible-extract"]["exact_match"] == float(is_correct(extract_flexible(theirs), answer))


def test_unknown_harness_task(tokenizer, data_dir, offline):
    from sparsefit.errors import UsageError

    with pytest.raises(UsageError, match="unknown harness task"):
        run_harness(tiny_model("llama"), tokenizer, ["no_such_task_xyz"])

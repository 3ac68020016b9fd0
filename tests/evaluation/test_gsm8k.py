import json
import math

import pytest
import torch
import torch.nn.functional as F

from sparsefit.cli import main
from sparsefit.data.sources import load_rows
from sparsefit.errors import UsageError
from sparsefit.evaluation.answers import extract_flexible, extract_strict, is_correct, mean_stderr, normalize
from sparsefit.evaluation.generation import generate_greedy, truncate_at_stops
from sparsefit.evaluation.gsm8k import build_prompt, evaluate_answer_ppl, evaluate_gsm8k
from sparsefit.evaluation.recovery import load_baseline, recovery
from tests.conftest import tiny_model, tiny_tokenizer

TRICKY = [
    ("So she has 1,234 apples.\n#### 1,234", "1,234", "1,234", True),  # commas go in normalization
    ("The total is $18.\n#### $18", "[invalid]", "$18", True),  # strict needs a digit right after '#### '
    ("#### 18.", "18.", "18.", True),
    ("Temperature dropped to -5 degrees. #### -5", "-5", "-5", True),
    ("I think the answer is 42.", "[invalid]", "42.", True),
    ("no numbers here", "[invalid]", "[invalid]", False),
    ("#### 7 and then 9", "7", "9", None),
    ("It costs 3.50 dollars\n#### 3.50", "3.50", "3.50", True),
]


@pytest.mark.parametrize("text, strict, flexible, _", TRICKY)
def test_extraction(text, strict, flexible, _):
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


def test_normalization_matches_references():
    assert normalize("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert normalize("$1,234.") == "1234"
    assert is_correct("1,234", "...\n#### 1234") and is_correct("$18.", "#### 18")
    assert not is_correct("[invalid]", "#### 5") and is_correct("-5", "#### -5")


def test_scoring_agrees_with_the_harness_filters_and_metric():
    """Our extraction + comparison gives the harness's exact_match on every tricky string."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    strict = RegexFilter(regex_pattern=r"#### (\-?[0-9\.\,]+)")
    flexible = RegexFilter(regex_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
    ignore = [",", "\\$", "(?s).*#### ", "\\.$"]
    for text, *_ in TRICKY:
        for answer in ("#### 1234", "#### 18", "#### -5", "#### 42", "#### 3.50", "#### 9", "#### 7"):
            for filt, ours in ((strict, extract_strict), (flexible, extract_flexible)):
                theirs = list(filt.apply([[text]], [{}]))[0][0]
                assert theirs == ours(text)
                em = exact_match_hf_evaluate([theirs], [answer], regexes_to_ignore=ignore, ignore_case=True)
                assert bool(em["exact_match"]) == is_correct(ours(text), answer), (text, answer)


def test_stderr_is_the_sample_standard_error():
    values = [1.0, 0.0, 0.0, 1.0, 1.0]
    p = 0.6
    assert mean_stderr(values) == pytest.approx(math.sqrt(p * (1 - p) * 5 / 4 / 5))


def test_truncation_at_stops():
    assert truncate_at_stops("12\n#### 12\n\nQuestion: next", ["Question:", "<|im_end|>"]) == "12\n#### 12\n\n"


def test_batched_left_padded_generation_equals_unbatched(tokenizer):
    model = tiny_model("llama")
    prompts = ["Question: Tom has 3 apples.\nAnswer:", "Question: hi\nAnswer:", "The quick brown fox jumps over"]
    batched, stats = generate_greedy(model, tokenizer, prompts, ["Question:"], 12, batch_size=3, progress=False)
    single = [
        generate_greedy(model, tokenizer, [p], ["Question:"], 12, batch_size=1, progress=False)[0][0] for p in prompts
    ]
    assert batched == single
    assert stats["generated_tokens"] > 0 and stats["tokens_per_second"] > 0


def test_answer_ppl_matches_hand_computation(tokenizer, data_dir):
    model = tiny_model("llama")
    result = evaluate_answer_ppl(model, tokenizer, limit=3, batch_size=2, progress=False)
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in load_rows("gsm8k", "test")[:3]:
            context = f"Question: {row['question']}\nAnswer:"
            ids = tokenizer(context + " " + row["answer"], add_special_tokens=False).input_ids
            n_ctx = len(tokenizer(context, add_special_tokens=False).input_ids)
            logits = model(torch.tensor([ids])).logits[0]
            target = torch.tensor(ids[n_ctx:])
            nll += F.cross_entropy(logits[n_ctx - 1 : len(ids) - 1], target, reduction="sum").item()
            count += len(target)
    assert result["answer_tokens"] == count
    assert result["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_gsm8k_writes_samples(tokenizer, data_dir, tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "s.jsonl"
    result = evaluate_gsm8k(
        model, tokenizer, limit=4, batch_size=2, max_new_tokens=8, samples_path=path, progress=False
    )
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 4 and result["rows"] == 4
    assert {"prompt", "generation", "strict", "flexible", "reference", "strict_correct"} <= set(rows[0])
    assert rows[0]["prompt"].startswith("Question: ") and rows[0]["prompt"].endswith("\nAnswer:")
    assert 0.0 <= result["strict_match"] <= 1.0


def test_chat_prompt_uses_the_template():
    tok = tiny_tokenizer()  # a fresh one: the session fixture has no template and must keep none
    tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert build_prompt(tok, "2+2?", [], chat=True) == "<user>Question: 2+2?\nAnswer:<assistant>"
    with pytest.raises(UsageError, match="chat template"):
        build_prompt(tiny_tokenizer(), "q", [], chat=True)


def test_recovery_ratios(tmp_path):
    assert recovery({"ppl": 30.0}, {"ppl": 20.0}) == {"ppl": 1.5}
    assert recovery({"results": {"t": {"acc,none": 0.3}}}, {"results": {"t": {"acc,none": 0.6}}}) == {"t/acc,none": 0.5}
    with pytest.raises(UsageError, match="shares no metric"):
        recovery({"ppl": 3.0}, {"strict_match": 0.5})
    with pytest.raises(UsageError, match="not found"):
        load_baseline(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--task", "mmlu"], "unknown task 'mmlu'"),
        (["eval", "--task", "gsm8k", "--limit", "0"], "--limit must be at least 1"),
        (["eval", "--baseline", "/no/such/baseline.json"], "baseline file '/no/such/baseline.json' not found"),
    ],
)
def test_eval_bad_input(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_gsm8k_with_baseline(tiny_checkpoint, data_dir, tmp_path, capsys):
    base = tmp_path / "base.json"
    args = ["eval", "--model", str(tiny_checkpoint), "--task", "gsm8k-answer-ppl", "--limit", "3"]
    assert main([*args, "--json", str(base)]) == 0
    out = tmp_path / "again.json"
    assert main([*args, "--baseline", str(base), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["recovery"]["ppl"] == pytest.approx(1.0)

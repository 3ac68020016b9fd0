import json

import pytest
import torch

from sparsefit.data import load_rows, load_texts, sample_calibration, sample_windows, tokenize_stream
from sparsefit.errors import UsageError


def test_wikitext_local_file_is_one_stream(data_dir):
    texts = load_texts("wikitext2")
    assert len(texts) == 1
    assert texts[0] == (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text()


def test_gsm8k_rows_and_format(data_dir):
    rows = load_rows("gsm8k", "train")
    assert set(rows[0]) == {"question", "answer"}
    texts = load_texts("gsm8k", "train")
    assert texts[0] == f"Question: {rows[0]['question']}\nAnswer: {rows[0]['answer']}"


def test_local_txt_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello world")
    assert load_texts(str(txt)) == ["hello world"]
    jl = tmp_path / "a.jsonl"
    jl.write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    assert load_texts(str(jl), text_field="body") == ["one", "two"]
    with pytest.raises(UsageError, match="has no field 'text'.*--text-field"):
        load_texts(str(jl))


def test_missing_named_dataset_names_both_places(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFIT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UsageError) as err:
        load_texts("gsm8k", "train")
    msg = str(err.value)
    assert str(tmp_path / "gsm8k" / "train.jsonl") in msg and "openai/gsm8k" in msg


@pytest.mark.parametrize("spec", ["nope.txt", "./missing.jsonl", "unknownname"])
def test_missing_dataset_paths(spec):
    with pytest.raises(UsageError, match="not found"):
        load_texts(spec)


def test_empty_and_bad_files(tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("  \n")
    with pytest.raises(UsageError, match="is empty"):
        load_texts(str(empty))
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": 1}\n{oops\n')
    with pytest.raises(UsageError, match="b.jsonl:2 is not valid JSON"):
        load_texts(str(bad))
    with pytest.raises(UsageError, match="no split 'dev'"):
        load_rows("gsm8k", "dev")


def test_sampler_is_deterministic_and_shaped(data_dir, tokenizer):
    texts = load_texts("gsm8k", "train")
    a = sample_calibration(tokenizer, texts, num_samples=5, seq_len=16, seed=3)
    b = sample_calibration(tokenizer, texts, num_samples=5, seq_len=16, seed=3)
    c = sample_calibration(tokenizer, texts, num_samples=5, seq_len=16, seed=4)
    assert a.shape == (5, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = tokenize_stream(tokenizer, texts)
    # every window is a contiguous slice of the stream
    for row in a:
        starts = (stream == row[0]).nonzero().flatten().tolist()
        assert any(torch.equal(stream[s : s + 16], row) for s in starts)


def test_stream_puts_a_blank_line_between_texts(tokenizer):
    stream = tokenize_stream(tokenizer, ["Tom has", "apples"], chunk=1)
    expected = tokenizer("Tom has\n\n", add_special_tokens=False).input_ids + tokenizer("apples").input_ids
    assert stream.tolist() == expected


def test_sampler_rejects_short_data():
    with pytest.raises(UsageError, match="dataset too short: 5 tokens"):
        sample_windows(torch.arange(5), 2, 8)

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


def test_the_default_data_folder_is_data_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARSEFIT_DATA_DIR", raising=False)
    monkeypatch.setenv("SPARSEFIT_CACHE", str(tmp_path))
    (tmp_path / "data" / "gsm8k").mkdir(parents=True)
    (tmp_path / "data" / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "q?", "answer": "#### 1"}) + "\n")
    assert load_rows("gsm8k", "test") == [{"question": "q?", "answer": "#### 1"}]


def test_missing_data_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    """Without the data anywhere: one line naming the default folder, SPARSEFIT_DATA_DIR, the hub and
    where the files come from."""
    import builtins

    monkeypatch.delenv("SPARSEFIT_DATA_DIR", raising=False)
    monkeypatch.setenv("SPARSEFIT_CACHE", str(tmp_path))
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(UsageError) as err:
        load_rows("wikitext2", "test")
    msg = str(err.value)
    assert "\n" not in msg
    assert f"not in {tmp_path / 'data' / 'wikitext-2-raw' / 'wiki.test.raw'} (the default data folder)" in msg
    assert "pip install 'sparsefit[data]'" in msg and "set SPARSEFIT_DATA_DIR" in msg
    assert "Salesforce/wikitext, wikitext-2-raw-v1" in msg


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

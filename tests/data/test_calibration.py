import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsefit.data import calibration
from sparsefit.data.calibration import token_stream, tokenize_stream

TEXTS = ["Tom has 3 apples.", "He eats one. How many are left?", "2"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokens"


def entries(folder):
    return sorted(p.name for p in folder.glob("*.safetensors")) if folder.exists() else []


def test_stream_is_tokenized_once_then_read_back(cache, tokenizer, monkeypatch):
    first = token_stream(tokenizer, TEXTS)
    assert torch.equal(first, tokenize_stream(tokenizer, TEXTS)) and first.dtype == torch.long
    assert len(entries(cache)) == 1

    def fail(*args):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(calibration, "tokenize_stream", fail)
    again = token_stream(tokenizer, TEXTS)
    assert torch.equal(again, first) and again.dtype == torch.long


def test_other_texts_or_another_cut_of_them_miss(cache, tokenizer):
    token_stream(tokenizer, TEXTS)
    # The same characters cut into other texts get other blank lines between them: another stream.
    recut = ["Tom has 3 apples.He eats one.", " How many are left?", "2"]
    assert torch.equal(token_stream(tokenizer, recut), tokenize_stream(tokenizer, recut))
    assert torch.equal(token_stream(tokenizer, TEXTS[:2]), tokenize_stream(tokenizer, TEXTS[:2]))
    assert len(entries(cache)) == 3


def test_another_tokenizer_misses(cache, tokenizer):
    from transformers import AutoTokenizer

    token_stream(tokenizer, TEXTS)
    tokenizer.save_pretrained(cache.parent.parent / "tok")
    other = AutoTokenizer.from_pretrained(cache.parent.parent / "tok")
    other.add_tokens(["apples"])  # one token more: the stream changes
    assert torch.equal(token_stream(other, TEXTS), tokenize_stream(other, TEXTS))
    assert not torch.equal(token_stream(other, TEXTS), token_stream(tokenizer, TEXTS))
    assert len(entries(cache)) == 2


def test_damaged_entry_is_tokenized_again_and_replaced(cache, tokenizer):
    expected = token_stream(tokenizer, TEXTS)
    (entry,) = cache.glob("*.safetensors")
    entry.write_bytes(b"not a safetensors file")
    assert torch.equal(token_stream(tokenizer, TEXTS), expected)
    assert torch.equal(token_stream(tokenizer, TEXTS), expected)  # the rewritten entry reads back
    assert entry.read_bytes()[:8] != b"not a sa"


def test_unwritable_cache_only_costs_the_tokenization(tmp_path, tokenizer, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("SPARSEFIT_CACHE", str(blocker))
    assert torch.equal(token_stream(tokenizer, TEXTS), tokenize_stream(tokenizer, TEXTS))


def test_least_recently_used_streams_are_evicted(cache, tokenizer, monkeypatch):
    monkeypatch.setattr(calibration, "CACHED_STREAMS", 2)
    a, b, c = ["text a"], ["text b"], ["text c"]
    token_stream(tokenizer, a)
    token_stream(tokenizer, b)
    for age, path in enumerate(sorted(cache.glob("*.safetensors"), key=lambda p: p.name)):
        os.utime(path, (1000 + age, 1000 + age))  # both long unused
    token_stream(tokenizer, a)  # a read: now the most recent
    token_stream(tokenizer, c)  # a third stream: b, the least recently used, goes
    assert len(entries(cache)) == 2
    tokenized = []
    monkeypatch.setattr(
        calibration, "tokenize_stream", lambda tok, texts: tokenized.append(texts) or tokenize_stream(tok, texts)
    )
    for texts in (a, c, b):
        token_stream(tokenizer, texts)
    assert tokenized == [b]


def test_leftovers_of_killed_writes_go_once_stale(cache, tokenizer):
    cache.mkdir(parents=True)
    old, fresh = cache / ".0123.safetensors.tmp-old", cache / ".4567.safetensors.tmp-new"
    for path in (old, fresh):
        path.write_bytes(b"half a stream")
    os.utime(old, (1000, 1000))  # killed long ago; `fresh` may be a write in progress
    token_stream(tokenizer, TEXTS)
    assert not old.exists() and fresh.exists() and len(entries(cache)) == 1


def test_a_cached_stream_with_ids_beyond_the_vocabulary_is_made_anew(cache, tokenizer):
    first = token_stream(tokenizer, TEXTS)
    (name,) = entries(cache)
    entry = cache / name
    save_file({"ids": torch.full((5,), len(tokenizer) + 7, dtype=torch.int32)}, str(entry))
    assert torch.equal(token_stream(tokenizer, TEXTS), first)
    assert torch.equal(load_file(str(entry))["ids"].long(), first)  # the entry is repaired

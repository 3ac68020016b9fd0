"""Self-generated text: seeded per row, whatever the batch; drawn from the model's own distribution."""

import re

import pytest
import torch
from safetensors.torch import save_file

from sparsefit.data.self_generated import load_or_sample, sample_from_model
from sparsefit.errors import UsageError
from tests.conftest import tiny_model


def test_rows_do_not_depend_on_the_batch_they_share(tokenizer):
    model = tiny_model("llama")
    a = sample_from_model(model, tokenizer, 5, 14, seed=3, batch_size=2, progress=False)
    b = sample_from_model(model, tokenizer, 5, 14, seed=3, batch_size=5, progress=False)
    assert a.shape == (5, 14) and torch.equal(a, b)
    assert not torch.equal(a, sample_from_model(model, tokenizer, 5, 14, seed=4, progress=False))


def test_a_cold_temperature_gives_the_greedy_continuation(tokenizer):
    model = tiny_model("qwen2")
    cold = sample_from_model(model, tokenizer, 2, 10, seed=0, temperature=1e-4, progress=False)
    start = torch.full((1, 1), tokenizer.bos_token_id)
    greedy = model.generate(start, attention_mask=torch.ones_like(start), do_sample=False, max_new_tokens=9,
                            min_new_tokens=9, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    assert torch.equal(cold[0], greedy[0]) and torch.equal(cold[1], greedy[0])


def test_samples_follow_the_model_distribution(tokenizer):
    """First tokens after BOS over many rows: their frequencies match softmax(logits / T), T sharp enough
    to tell from uniform."""
    model = tiny_model("llama")
    rows = sample_from_model(model, tokenizer, 2000, 2, seed=1, temperature=0.05, progress=False)
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([[tokenizer.bos_token_id]])).logits[0, -1] / 0.05, -1)
    freq = torch.bincount(rows[:, 1], minlength=probs.numel()).float() / 2000
    uniform = torch.full_like(probs, 1 / probs.numel())
    distance = (freq - probs).abs().sum() / 2  # total variation
    assert distance < 0.1 < (probs - uniform).abs().sum() / 2


def test_load_or_sample_samples_once_then_reads_the_file(tmp_path):
    path = tmp_path / "text.safetensors"
    ids = torch.arange(12).reshape(3, 4)
    calls = []

    def sample():
        calls.append(1)
        return ids

    assert torch.equal(load_or_sample(path, sample), ids)
    assert torch.equal(load_or_sample(path, sample), ids)  # read back, not sampled again
    assert calls == [1]
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left beside it


@pytest.mark.parametrize(
    "stored, message",
    [
        (torch.tensor([[0, 5], [7, 256]]), r"token id 256 is outside the model's vocabulary \[0, 256\)"),
        (torch.tensor([[0, -1], [7, 3]]), r"token id -1 is outside the model's vocabulary"),
        (torch.zeros(3, 2), r"input_ids are float32, not token ids"),
        (torch.zeros(2, 3, dtype=torch.long), r"input_ids are \(2, 3\), expected \(2, 2\)"),
    ],
)
def test_a_damaged_self_text_file_is_one_line_naming_it(tmp_path, stored, message):
    path = tmp_path / "self-text.safetensors"
    save_file({"input_ids": stored}, str(path))
    with pytest.raises(UsageError, match=rf"^{re.escape(str(path))}: {message}.*delete it") as info:
        load_or_sample(path, lambda: pytest.fail("a file that is there is never sampled again"), 256, (2, 2))
    assert "\n" not in str(info.value)


def test_a_self_text_file_without_input_ids_is_named(tmp_path):
    path = tmp_path / "self-text.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(UsageError, match=rf"^{re.escape(str(path))} is not a self-generated text file"):
        load_or_sample(path, lambda: torch.zeros(1, 1), 256)
    save_file({"other": torch.zeros(2, 2, dtype=torch.long)}, str(path))
    with pytest.raises(UsageError, match=r"is not a self-generated text file \(no readable input_ids"):
        load_or_sample(path, lambda: torch.zeros(1, 1), 256)

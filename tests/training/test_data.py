import json

import pytest

from sparsefit.errors import UsageError
from sparsefit.training.data import collate, example_order, load_examples, prompt_and_target


def test_gsm8k_plain_examples_take_loss_on_the_answer_only(tokenizer, data_dir):
    examples = load_examples(tokenizer, "gsm8k", fmt="plain", seq_len=128)
    e = examples[0]
    prompt = tokenizer("Question: Tom has 0 apples and buys 5 more. How many?\nAnswer:", add_special_tokens=False)
    n = len(prompt.input_ids)
    assert e.input_ids[:n] == prompt.input_ids and e.labels[:n] == [-100] * n
    assert e.labels[n:] == e.input_ids[n:] and e.input_ids[-1] == tokenizer.eos_token_id
    assert e.input_ids[n:] == tokenizer(" 0 + 5 = 5\n#### 5</s>", add_special_tokens=False).input_ids


def test_chat_format_uses_the_template(tokenizer):
    tok = tokenizer
    tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    try:
        prompt, target = prompt_and_target(tok, "Question: q\nAnswer:", "a #### 1", "chat")
        assert prompt == "<user>Question: q\nAnswer:</s><assistant>" and target == "a #### 1</s>"
        assert prompt_and_target(tok, "p", "a", "auto")[0].startswith("<user>")
        assert prompt_and_target(tok, "p", "a", "plain") == ("p", " a</s>")
    finally:
        tok.chat_template = None
    with pytest.raises(UsageError, match="chat template"):
        prompt_and_target(tok, "p", "a", "chat")


def test_jsonl_prompt_completion_and_packed_text(tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Q{i}:", "completion": " the answer"}) for i in range(5)))
    examples = load_examples(tokenizer, str(path), fmt="plain", seq_len=64)
    assert len(examples) == 5 and all(e.labels[0] == -100 and e.supervised > 0 for e in examples)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 50)
    packed = load_examples(tokenizer, str(text), seq_len=16)
    assert all(len(e.input_ids) == 16 and e.labels == e.input_ids for e in packed)


def test_batch_order_is_a_pure_function_of_seed_and_step_and_groups_lengths():
    lengths = [(i * 37) % 101 + 1 for i in range(200)]
    first = [example_order(lengths, 8, seed=1, step=s) for s in range(25)]
    assert first == [example_order(lengths, 8, seed=1, step=s) for s in range(25)]
    assert first != [example_order(lengths, 8, seed=2, step=s) for s in range(25)]
    epoch = sorted(i for batch in first for i in batch)
    assert epoch == sorted(set(epoch)) and len(epoch) == 200  # one epoch: every example once
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in first) / len(first)
    assert spread < 25  # length-grouped: a batch holds similar lengths (random batches spread ~80)
    with pytest.raises(UsageError, match="cannot fill one batch"):
        example_order(lengths[:3], 8, 0, 0)


def test_collate_pads_right_and_masks_labels():
    from sparsefit.training.data import Example

    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]

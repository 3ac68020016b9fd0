"""Model cards: every checkpoint and export carries README.md with hub front matter and the numbers
its record holds; --push-to-hub goes as far as the upload and fails in one line offline."""

from __future__ import annotations

import pytest
import yaml

from sparsefit.errors import SparsefitError, UsageError
from sparsefit.export import export_checkpoint, save_checkpoint
from sparsefit.export.card import base_model_of, model_card
from sparsefit.export.hub import push_to_hub
from sparsefit.pruning import OneShotConfig, oneshot
from tests.conftest import run_cli, tiny_model


def card_of(folder):
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def pruned(sparsity=0.5):
    model = tiny_model("llama")
    report = oneshot(model, None, OneShotConfig(method="magnitude", sparsity=sparsity, calib=None), progress=False)
    return model, report


def test_a_pruned_checkpoint_card_states_method_and_measured_sparsity(tmp_path, tokenizer):
    model, report = pruned()
    report.model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    save_checkpoint(model, tokenizer, tmp_path / "p", {"pruning": report})
    meta, body = card_of(tmp_path / "p")
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"sparse", "pruned", "magnitude", "sparsefit"} <= set(meta["tags"])
    overall = report.sparsity.overall
    assert f"{100 * overall:.2f}% zeros" in body and "**Pruning**: magnitude" in body
    assert "Quantization" not in body and "Evaluation" not in body  # nothing recorded, nothing stated


def test_export_card_carries_the_source_record_and_the_base_model(tmp_path, tokenizer):
    from sparsefit.models import load_model_and_tokenizer

    model, report = pruned()
    report.model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    save_checkpoint(model, tokenizer, tmp_path / "p", {"pruning": report})
    again, tok = load_model_and_tokenizer(str(tmp_path / "p"))
    export_checkpoint(again, tok, tmp_path / "e", str(tmp_path / "p"), "sparse-bitmask", evaluation={"ppl": 12.5})
    meta, body = card_of(tmp_path / "e")
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # read from the source's card
    assert meta["library_name"] == "sparsefit"  # only sparsefit reads the bitmask layout back
    assert "sparse-bitmask" in meta["tags"] and "**Pruning**: magnitude" in body
    assert "| ppl | 12.5 |" in body


def test_a_dense_model_is_not_tagged_pruned(tmp_path, tokenizer):
    export_checkpoint(tiny_model("llama"), tokenizer, tmp_path / "d", "somewhere/else", "hf")
    meta, body = card_of(tmp_path / "d")
    assert "pruned" not in meta["tags"] and "sparse" not in meta["tags"]
    assert meta["base_model"] == "somewhere/else" and "0.00% zeros" in body


def test_gguf_card_and_builtin_base_model(tmp_path, tokenizer):
    model, _ = pruned()
    export_checkpoint(model, tokenizer, tmp_path / "g", "smollm2-135m", "gguf-q8_0")
    meta, body = card_of(tmp_path / "g")
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "gguf" and {"gguf", "q8_0", "pruned"} <= set(meta["tags"])
    assert "smollm2-135m-Q8_0.gguf" in body and "read back nonzero from the file: 0 of" in body


def test_quantization_and_finetune_records_are_stated():
    record = {
        "sparsity": {"overall": 0.5, "weights": 100, "measured_over": "x"},
        "quantization": {"scheme": "w4a16", "method": "gptq", "group_size": 64, "layers": 7, "revived_weights": 0,
                         "calibration": {"source": "gsm8k", "sequences": 4, "tokens": 512}, "model": "a/b"},
        "finetune": {"method": "full", "steps": 10, "tokens": 999, "final_loss": 1.25, "revived_weights": 0},
    }  # fmt: skip
    text = model_card(record)
    assert "w4a16 by gptq, group 64, 7 layers; pruned weights revived: 0" in text
    assert "4 sequences, 512 tokens of gsm8k" in text and "final training loss 1.2500" in text
    assert 'base_model: "a/b"' in text and '- "w4a16"' in text


def test_base_model_of():
    assert base_model_of("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_of("org/name") == "org/name"
    assert base_model_of("/no/such/dir") is None and base_model_of(None) is None


def test_push_uploads_the_folder_without_bookkeeping(tmp_path, tokenizer, monkeypatch):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)) or "https://x/commit")
    export_checkpoint(tiny_model("llama"), tokenizer, tmp_path / "d", "a/b", "hf")
    assert push_to_hub(tmp_path / "d", "me/tiny") == "https://x/commit"
    (_, repo, kw), (_, up) = calls
    assert repo == "me/tiny" and kw["exist_ok"] and kw["repo_type"] == "model"
    assert up["repo_id"] == "me/tiny" and up["folder_path"] == str(tmp_path / "d") and ".*" in up["ignore_patterns"]


def test_push_offline_is_one_clear_line(tmp_path, tokenizer, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the library's own switch
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export_checkpoint(tiny_model("llama"), tokenizer, tmp_path / "d", "a/b", "hf")
    with pytest.raises(SparsefitError, match="offline.*HF_HUB_OFFLINE.*the export is in") as err:
        push_to_hub(tmp_path / "d", "me/tiny")
    assert "\n" not in str(err.value)


def test_push_to_an_unreachable_hub_is_one_clear_line(tmp_path, tokenizer, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    export_checkpoint(tiny_model("llama"), tokenizer, tmp_path / "d", "a/b", "hf")
    with pytest.raises(SparsefitError, match="cannot (reach the Hugging Face hub to )?push") as err:
        push_to_hub(tmp_path / "d", "me/tiny")
    assert "\n" not in str(err.value)


def test_cli_refuses_a_bad_repo_before_any_work(tmp_path, tiny_checkpoint, capsys):
    argv = ["export", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "o"), "--push-to-hub", "no owner"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "--push-to-hub" in err and not (tmp_path / "o").exists()


def test_cli_push_offline_keeps_the_export(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    argv = ["export", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "o"), "--push-to-hub", "me/tiny"]
    code, _, err = run_cli(argv, capsys)
    assert code == 1 and "offline" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "o" / "README.md").is_file() and (tmp_path / "o" / "model.safetensors").is_file()


def test_check_repo_id():
    from sparsefit.export.hub import check_repo_id

    check_repo_id("me/tiny")
    with pytest.raises(UsageError):
        check_repo_id("a/b/c")

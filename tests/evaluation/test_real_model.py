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

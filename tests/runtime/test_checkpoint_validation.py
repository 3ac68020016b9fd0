"""The sparse runtime checks config.json's fields and every tensor's shape against them before it
packs (or allocates) anything: the operator trusts those shapes."""

import json

import pytest
import torch

from sparsefit.errors import UsageError
from sparsefit.runtime.checkpoint import CheckpointTensors
from sparsefit.runtime.decoder import check_tensors, decoder_shape
from tests.conftest import tiny_model


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "m"
    tiny_model("llama").save_pretrained(path)
    return path


def with_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del config[key]
    (folder / "config.json").write_text(json.dumps(config))
    return CheckpointTensors(folder)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_size": None}, r"config.json: hidden_size must be an integer from 1 to \d+, got None"),
        ({"hidden_size": "64"}, r"hidden_size must be an integer .*got '64'"),
        ({"num_hidden_layers": 10**12}, r"num_hidden_layers must be an integer from 1 to"),
        ({"max_position_embeddings": 10**14}, r"max_position_embeddings must be an integer from 1 to"),
        ({"num_key_value_heads": 3}, r"num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
        ({"rms_norm_eps": -1}, r"rms_norm_eps must be a number in \(0, 1\)"),
    ],
)
def test_bad_config_fields_are_named_with_their_range(folder, changes, message):
    with pytest.raises(UsageError, match=message):
        decoder_shape(with_config(folder, **changes).config, 8)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_hidden_layers": 4}, r"num_hidden_layers 4, but the weights lack block 3"),
        ({"intermediate_size": 256}, r"model.layers.0.mlp.gate_proj is \(128, 64\), but .* implies \(256, 64\)"),
        ({"vocab_size": 1 << 19}, r"model.embed_tokens.weight is \(256, 64\), but .* implies \(524288, 64\)"),
        ({"head_dim": 32}, r"self_attn.q_proj is \(64, 64\), but config.json implies \(128, 64\)"),
    ],
)  # fmt: skip
def test_tensors_that_do_not_fit_the_config_are_named(folder, changes, message):
    src = with_config(folder, **changes)
    with pytest.raises(UsageError, match=message):
        check_tensors(decoder_shape(src.config, 8), src)


def test_a_compressed_weight_claiming_more_than_it_stores_is_refused(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    from sparsefit.export import export_checkpoint

    model = tiny_model("llama")
    export_checkpoint(model, tokenizer, tmp_path / "c", "tiny", "sparse-bitmask")
    state = load_file(str(tmp_path / "c" / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.shape"] = torch.tensor([128, 1 << 30])
    save_file(state, str(tmp_path / "c" / "model.safetensors"), metadata={"format": "pt"})
    src = CheckpointTensors(tmp_path / "c")
    with pytest.raises(UsageError, match=r"up_proj.shape says \(128, 1073741824\), which .*up_proj.bitmask \(128, 8\)"):
        check_tensors(decoder_shape(src.config, 8), src)

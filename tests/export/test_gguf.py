"""GGUF export on a tiny random Llama: written, read back with gguf-py, every pruned weight exactly 0,
and reloaded by transformers (`gguf_file=`) to the same logits."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from sparsefit.errors import UsageError
from sparsefit.export import export_checkpoint
from sparsefit.export.gguf import FORMATS, decode, permute_qk, unpermute_qk
from tests.conftest import run_cli, tiny_model

gguf = pytest.importorskip("gguf")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def pruned_llama(sparsity: float = 0.5, seed: int = 0):
    """The tiny Llama with the smallest `sparsity` of each decoder linear's weights set to 0."""
    model = tiny_model("llama", seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                k = int(p.numel() * sparsity)
                idx = p.abs().flatten().argsort()[:k]
                p.view(-1)[idx] = 0
    return model


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {}
    for name, field in reader.fields.items():
        fields[name] = field.contents()
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml lists the fastest axis first
        tensors[t.name] = (t.tensor_type, decode(t.data, t.tensor_type, shape), shape)
    return fields, tensors


@pytest.fixture
def chat_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)  # a copy: the session tokenizer stays as it is
    tok.chat_template = CHATML
    return tok


def test_permutation_is_llama_cpp_and_inverts():
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(32, 3)  # 4 heads of 8 rows
    p = permute_qk(w, 4)
    # llama.cpp's LlamaModel.permute: reshape(n_head, 2, rows/n_head/2, ...).swapaxes(1, 2)
    ref = w.reshape(4, 2, 4, 3).swapaxes(1, 2).reshape(32, 3)
    assert torch.equal(p, ref)
    assert torch.equal(unpermute_qk(p, 4), w)
    assert not torch.equal(p, w)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_zero_is_exact_in_block_quants(qtype):
    """Every 0 comes back 0 from gguf-py's Q8_0 / Q4_0, whatever the block's scale and sign: Q4_0 stores
    q - 8 and 0 rounds to the code 8."""
    q = getattr(gguf.GGMLQuantizationType, qtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-6, 3, 64).unsqueeze(1)
    x[torch.rand(x.shape, generator=g) < 0.5] = 0
    x[0] = 0  # a block of zeros only (scale 0)
    x[1, :32] = torch.linspace(-1, 0, 32)  # largest magnitude negative: positive scale in Q4_0
    x[2, :32] = torch.linspace(0, 1, 32)  # largest positive: negative scale in Q4_0
    back = decode(gguf.quants.quantize(x.numpy(), q), q, tuple(x.shape))
    assert int((back[x == 0] != 0).sum()) == 0
    assert bool(torch.isfinite(back).all())
    # and the other weights are quantized, not zeroed: within half a step (Q8_0) or one step (Q4_0, whose
    # codes reach -8 on the largest weight's side and +7 on the other), plus the scale's f16 rounding
    step = {"Q8_0": 0.5 / 127, "Q4_0": 1 / 8}[qtype]
    blocks, ref = back.reshape(-1, 32), x.reshape(-1, 32)
    scale = ref.abs().amax(1, keepdim=True)
    normal = scale.squeeze(1) > 1e-3  # below, the f16 scale itself is subnormal (as in llama.cpp)
    assert bool(((blocks - ref).abs() <= scale * (step + 2**-9))[normal].all())


@pytest.mark.parametrize("fmt", FORMATS)
def test_gguf_round_trip_keeps_every_zero(tmp_path, chat_tokenizer, fmt):
    model = pruned_llama()
    out = tmp_path / "out"
    info = export_checkpoint(model, chat_tokenizer, out, "tiny-llama", fmt)
    g = info["gguf"]
    assert g["revived"] == 0 and g["zero_weights"] > 0
    assert info["files"] == sorted(["Modelfile", "README.md", g["file"], "sparsity.json"])
    fields, tensors = read(out / g["file"])
    c = model.config
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == c.num_hidden_layers
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.embedding_length"] == 64 and fields["llama.feed_forward_length"] == 128
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == c.vocab_size
    assert fields["tokenizer.chat_template"] == CHATML
    assert fields["tokenizer.ggml.eos_token_id"] == chat_tokenizer.eos_token_id
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd as the output matrix
    assert len(tensors) == 2 + 9 * c.num_hidden_layers

    state = model.state_dict()
    wanted = {"gguf-f16": "F16", "gguf-bf16": "BF16", "gguf-q8_0": "Q8_0", "gguf-q4_0": "Q4_0"}[fmt]
    revived = 0
    for layer in range(c.num_hidden_layers):
        for hf, name, heads in [
            ("self_attn.q_proj", "attn_q", 4),
            ("self_attn.k_proj", "attn_k", 2),
            ("self_attn.v_proj", "attn_v", None),
            ("self_attn.o_proj", "attn_output", None),
            ("mlp.gate_proj", "ffn_gate", None),
            ("mlp.up_proj", "ffn_up", None),
            ("mlp.down_proj", "ffn_down", None),
        ]:
            qtype, back, shape = tensors[f"blk.{layer}.{name}.weight"]
            w = state[f"model.layers.{layer}.{hf}.weight"]
            assert shape == tuple(w.shape) and qtype.name == wanted
            if heads:
                back = unpermute_qk(back, heads)
            revived += int((back[w == 0] != 0).sum())
            if fmt == "gguf-f16":
                assert torch.equal(back, w.half().float())
            elif fmt == "gguf-bf16":
                assert torch.equal(back, w.bfloat16().float())
            else:
                tol = w.abs().max() * (1 / 127 if fmt == "gguf-q8_0" else 1 / 8)
                assert float((back - w).abs().max()) <= float(tol)
        qtype, norm, _ = tensors[f"blk.{layer}.attn_norm.weight"]
        assert qtype.name == "F32"
        assert torch.equal(norm, state[f"model.layers.{layer}.input_layernorm.weight"])
    assert revived == 0
    qtype, _, shape = tensors["token_embd.weight"]
    assert shape == (c.vocab_size, 64)
    assert qtype.name == {"gguf-f16": "F16", "gguf-bf16": "BF16"}.get(fmt, "Q8_0")
    text = (out / "Modelfile").read_text()
    assert text.startswith(f"FROM ./{g['file']}\n") and 'PARAMETER stop "<|im_end|>"' in text
    assert "<|im_start|>{{ .Role }}" in text


@pytest.mark.parametrize("fmt", ["gguf-f16", "gguf-q8_0"])
def test_transformers_reloads_the_gguf(tmp_path, tokenizer, fmt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = pruned_llama()
    out = tmp_path / "out"
    info = export_checkpoint(model, tokenizer, out, "tiny-llama", fmt)
    name = info["gguf"]["file"]
    again = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog")["input_ids"]])
    with torch.no_grad():
        want, got = model(ids).logits, again(ids).logits
    # f16 rounds each weight by <= 2^-11 of itself, Q8_0 by <= 1/254 of its block's largest
    tol = {"gguf-f16": 2e-3, "gguf-q8_0": 5e-2}[fmt]
    assert float((want - got).abs().max()) <= tol * float(want.abs().max())
    # the zeros are there in the model transformers built from the file (it undoes the Q/K permutation)
    for key, w in model.state_dict().items():
        if ".layers." in key and w.dim() == 2:
            assert int((again.state_dict()[key][w == 0] != 0).sum()) == 0, key
    tok = AutoTokenizer.from_pretrained(out, gguf_file=name)
    text = "Sparse models keep most of their accuracy"
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_k_quants_and_affine_quants_are_refused(tmp_path, tokenizer):
    for fmt, words in [("gguf-q4_k_m", "K-quants"), ("gguf-q4_1", "minimum"), ("gguf-q3", "unknown GGUF")]:
        with pytest.raises(UsageError, match=words):
            export_checkpoint(pruned_llama(), tokenizer, tmp_path / "out", "tiny", fmt)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_k_quant_with_one_line(tmp_path, tiny_checkpoint, capsys):
    code, _, err = run_cli(
        ["export", "--model", str(tiny_checkpoint), "--format", "gguf-q4_k_m", "--output", str(tmp_path / "o")], capsys
    )
    assert code == 2 and "K-quants" in err and len(err.strip().splitlines()) == 1


def test_cli_writes_gguf(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "o"
    code, stdout, _ = run_cli(
        ["export", "--model", str(tiny_checkpoint), "--format", "gguf-q4_0", "--output", str(out)], capsys
    )
    assert code == 0 and "read back nonzero: 0 of" in stdout
    assert (out / "tiny-llama-Q4_0.gguf").is_file() and (out / "Modelfile").is_file()


def test_other_architectures_are_refused(tmp_path, tokenizer):
    with pytest.raises(UsageError, match="Llama architecture.*convert_hf_to_gguf"):
        export_checkpoint(tiny_model("qwen2"), tokenizer, tmp_path / "out", "tiny", "gguf-f16")


def test_rows_not_multiple_of_32_are_refused_for_block_quants(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    config = tiny_config("llama")
    config.intermediate_size = 100  # ffn_down rows of 100 weights
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UsageError, match="multiple of 32"):
        export_checkpoint(model, tokenizer, tmp_path / "out", "tiny", "gguf-q8_0")
    assert not (tmp_path / "out").exists()
    export_checkpoint(model, tokenizer, tmp_path / "out", "tiny", "gguf-f16")  # 16-bit floats take any shape


def test_f16_overflow_is_refused(tmp_path, tokenizer):
    model = pruned_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e6
    with pytest.raises(Exception, match="beyond what float16 holds"):
        export_checkpoint(model, tokenizer, tmp_path / "out", "tiny", "gguf-f16")
    info = export_checkpoint(model, tokenizer, tmp_path / "bf", "tiny", "gguf-bf16")
    assert np.isfinite(read(tmp_path / "bf" / info["gguf"]["file"])[1]["blk.0.ffn_up.weight"][1].numpy()).all()

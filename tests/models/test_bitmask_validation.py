"""The compact reader checks every part of a compressed weight against the others before it
allocates the dense weight: a damaged or hostile file gets one ValueError naming the part."""

import os
import resource
import subprocess
import sys

import pytest
import torch

from sparsefit.export.bitmask import compress_24_bitmask, compress_bitmask
from sparsefit.models.bitmask import decompress, decompress_state_dict


def weight(two_four=False):
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    if two_four:
        w.view(6, 4, 4)[..., :2] = 0
    else:
        w[w.abs() < 0.7] = 0
    return w


def broken(parts, **changes):
    out = dict(parts)
    for key, value in changes.items():
        if value is None:
            del out[key]
        else:
            out[key] = value
    return out


BITMASK_CASES = [
    (
        "huge-claimed-shape",
        {"shape": torch.tensor([1 << 20, 1 << 20])},
        r"bitmask is uint8 \(6, 2\); .*\(1048576, 1048576\)",
    ),
    ("shape-out-of-range", {"shape": torch.tensor([0, 16])}, r"shape \(0, 16\) is out of range"),
    ("shape-negative", {"shape": torch.tensor([-6, 16])}, r"out of range"),
    ("shape-float", {"shape": torch.tensor([6.0, 16.0])}, r"shape must hold 2 integers .*float32"),
    ("shape-three-values", {"shape": torch.tensor([6, 16, 1])}, r"shape must hold 2 integers"),
    ("bitmask-dtype", {"bitmask": torch.zeros(6, 2, dtype=torch.int32)}, r"bitmask is int32 \(6, 2\); .*needs uint8"),
    ("bitmask-missing", {"bitmask": None}, r"lacks its bitmask tensor"),
    ("row-offsets-missing", {"row_offsets": None}, r"lacks its row_offsets tensor"),
    ("row-offsets-shape", {"row_offsets": torch.zeros(5, dtype=torch.int64)}, r"row_offsets is int64 \(5,\); expected"),
    ("row-offsets-values", {"row_offsets": torch.arange(6)}, r"row_offsets do not match"),
    ("values-2d", {"compressed": torch.zeros(2, 3)}, r"compressed is float32 \(2, 3\); expected 1-D"),
    ("values-int64", {"compressed": torch.zeros(5, dtype=torch.int64)}, r"compressed holds int64"),
    ("values-count", {"compressed": torch.zeros(3)}, r"3 stored values but the bitmask flags"),
]


@pytest.mark.parametrize("case, changes, message", BITMASK_CASES, ids=[c[0] for c in BITMASK_CASES])
def test_damaged_sparse_bitmask_parts_are_refused_by_name(case, changes, message):
    parts = compress_bitmask(weight())
    with pytest.raises(ValueError, match=message):
        decompress("sparse-bitmask", broken(parts, **changes))


def test_damaged_24_parts_are_refused_by_name():
    parts = compress_24_bitmask(weight(two_four=True))
    with pytest.raises(ValueError, match=r"compressed is float32 \(6, 4\); a 2:4 weight of shape \(6, 16\) stores"):
        decompress("sparse-24-bitmask", broken(parts, compressed=torch.zeros(6, 4)))
    mask = parts["bitmask"].clone()
    mask[0, 0] = 0b11100100  # 1 and 3 of two groups of four: the same count of values, but not 2:4
    with pytest.raises(ValueError, match="exactly 2 of every 4 columns"):
        decompress("sparse-24-bitmask", broken(parts, bitmask=mask))


def test_a_scale_that_does_not_fit_the_weight_is_refused_naming_it():
    parts = compress_bitmask((weight() * 10).round().to(torch.int8))
    state = {f"l.{k}": v for k, v in parts.items()}
    ok, _ = decompress_state_dict({**state, "l.weight_scale": torch.ones(6, 1)}, "sparse-bitmask")
    assert ok["l.weight"].shape == (6, 16)
    for scale in (torch.ones(5, 1), torch.ones(6, 3), torch.ones(6, 1, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"l.weight_scale is .*needs \(6, groups\) values"):
            decompress_state_dict({**state, "l.weight_scale": scale}, "sparse-bitmask")


# ---- whole checkpoints: checked against their config before the model is allocated ------------


@pytest.fixture
def compact(tmp_path, tokenizer):
    from sparsefit.export import export_checkpoint
    from sparsefit.pruning import OneShotConfig, oneshot
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    oneshot(model, None, OneShotConfig(method="magnitude", sparsity=0.5), progress=False)
    export_checkpoint(model, tokenizer, tmp_path / "c", "tiny", "sparse-bitmask")
    return tmp_path / "c"


def edit_config(folder, **changes):
    import json

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def edit_tensors(folder, **changes):
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    for key, value in changes.items():
        state[key.replace("__", ".")] = value
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture
def meta_only(monkeypatch):
    """Fails the test if a model is built anywhere but on the meta device before the check passes."""
    import transformers

    real = transformers.AutoModelForCausalLM.from_config.__func__
    built = []

    def recorded(cls, config, **kwargs):
        built.append(str(torch.get_default_device()))
        if built[-1] != "meta":
            raise AssertionError("a model was allocated before its tensors were checked")
        return real(cls, config, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", classmethod(recorded))
    return built


def test_a_config_claiming_a_huge_model_fails_before_any_allocation(compact, meta_only):
    from sparsefit.errors import UsageError
    from sparsefit.models import load_model

    edit_config(compact, hidden_size=1 << 16, intermediate_size=1 << 18, vocab_size=1 << 20)
    with pytest.raises(UsageError, match=r"model.safetensors: tensor model.embed_tokens.weight is \(256, 64\), but "
                       r"config.json implies \(1048576, 65536\)"):  # fmt: skip
        load_model(compact)
    assert meta_only == ["meta"]


@pytest.mark.parametrize(
    "what, change, message",
    [
        ("more-layers", {"num_hidden_layers": 5}, r"no tensor model.layers.3.\S+ \(shape .*\) that its config.json"),
        ("wider-mlp", {"intermediate_size": 256}, r"model.safetensors: tensor model.layers.0.mlp.gate_proj.shape is "
                                                   r"\(128, 64\), but config.json implies \(256, 64\)"),
    ],
)  # fmt: skip
def test_a_config_that_does_not_fit_the_tensors_names_file_and_tensor(compact, meta_only, what, change, message):
    from sparsefit.errors import UsageError
    from sparsefit.models import load_model

    edit_config(compact, **change)
    with pytest.raises(UsageError, match=message):
        load_model(compact)
    assert set(meta_only) == {"meta"}


def test_a_compressed_weight_whose_parts_disagree_names_file_and_tensor(compact, meta_only):
    from sparsefit.errors import UsageError
    from sparsefit.models import load_model

    edit_tensors(compact, model__layers__1__self_attn__o_proj__row_offsets=torch.zeros(64, dtype=torch.int64))
    with pytest.raises(
        UsageError, match=r"model.safetensors: model.layers.1.self_attn.o_proj: row_offsets do not match"
    ):
        load_model(compact)
    edit_tensors(compact, model__layers__0__mlp__up_proj__shape=torch.tensor([1 << 30, 64]))
    with pytest.raises(UsageError, match=r"model.safetensors: model.layers.0.mlp.up_proj: bitmask is uint8 \(128, 8\)"):
        load_model(compact)


LIMIT_BYTES = 6 << 30  # address space for a child that loads a tiny model: ample for it, not for a bomb


def _limited(argv: list[str]) -> subprocess.CompletedProcess:
    """`sparsefit ...` in a child whose address space is capped: an allocation for what a config
    claims fails there, however lazily the memory would have been touched."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    return subprocess.run([sys.executable, "-m", "sparsefit.cli", *argv], capture_output=True, text=True,
                          env=env, preexec_fn=cap, timeout=300)  # fmt: skip


@pytest.mark.parametrize("command", ["export", "generate"])
def test_a_config_claiming_a_huge_model_is_refused_under_an_address_space_limit(compact, tmp_path, command):
    argv = {
        "export": ["export", "--model", str(compact), "--output", str(tmp_path / "o")],
        "generate": ["generate", "--model", str(compact), "--prompt", "Tom", "--max-new-tokens", "2"],
    }[command]
    fine = _limited(argv)  # the honest checkpoint works under the cap
    assert fine.returncode == 0, fine.stderr[-2000:]
    edit_config(compact, hidden_size=1 << 16, intermediate_size=1 << 18, vocab_size=1 << 20)
    bomb = _limited([a.replace(str(tmp_path / "o"), str(tmp_path / "o2")) for a in argv])
    errors = [line for line in bomb.stderr.splitlines() if line.startswith("sparsefit: error:")]
    assert bomb.returncode == 2 and len(errors) == 1 and "config.json implies" in errors[0], bomb.stderr[-2000:]
    assert "MemoryError" not in bomb.stderr and "Traceback" not in bomb.stderr

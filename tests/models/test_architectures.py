"""The architecture table against the models it describes: tiny random models of every family."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig

from sparsefit.models import layout as layout_module
from sparsefit.models.architectures import ARCHITECTURES
from sparsefit.models.experts import ExpertMatrix
from sparsefit.models.layout import decoder_layout, select_linears
from sparsefit.pruning import OneShotConfig, oneshot
from tests.conftest import ARCHS, tiny_model


def test_every_row_is_tested():
    assert set(ARCHITECTURES) <= set(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_groups_take_equal_inputs_in_forward_order(arch):
    """Each group's linears receive equal inputs, every prunable linear of a block is in one group,
    and the groups' first members run in the table's order."""
    model = tiny_model(arch)
    layout = decoder_layout(model)
    assert layout.prefix == ARCHITECTURES[model.config.model_type].blocks
    assert len(layout.blocks) == model.config.num_hidden_layers
    block_name = f"{layout.prefix}.1"
    # Expert matrices (slices of fused tensors) get their inputs from the experts module, tested apart.
    layers = {
        n: m
        for n, m in select_linears(layout.blocks[1], block_name, None, None, layout.arch).items()
        if not isinstance(m, ExpertMatrix)
    }
    groups = layout.input_groups(layers, block_name)
    assert sorted(n for g in groups for n in g) == sorted(layers)
    rows = [g for g in ARCHITECTURES[model.config.model_type].groups if any(f"{block_name}.{r}" in layers for r in g)]
    assert all(len(g) > 0 for g in groups) and len(groups) == len(rows)
    inputs, order = {}, []

    def record(name):
        def hook(module, args):
            inputs[name] = args[0].detach().clone()
            order.append(name)

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in layers.items()]
    with torch.no_grad():
        model(torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0)))
    for h in handles:
        h.remove()
    for group in groups:
        for name in group[1:]:
            assert torch.equal(inputs[name], inputs[group[0]]), (group[0], name)
        assert not any(torch.equal(inputs[group[0]], inputs[g[0]]) for g in groups if g is not group), group
    firsts = [n for n in order if any(n in g for g in groups)]
    first_call = {g[0]: min(firsts.index(n) for n in g) for g in groups}
    assert sorted(first_call, key=first_call.get) == [g[0] for g in groups]


def test_selected_subsets_keep_their_grouping():
    model = tiny_model("llama")
    layout = decoder_layout(model)
    layers = select_linears(layout.blocks[0], "model.layers.0", [r"k_proj|v_proj|down"], None)
    assert layout.input_groups(layers, "model.layers.0") == [
        ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"],
        ["model.layers.0.mlp.down_proj"],
    ]


def tiny_neox():
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def test_an_unknown_family_falls_back_with_one_warning(capsys):
    layout_module._warn_generic.cache_clear()
    model = tiny_neox()
    assert model.config.model_type not in ARCHITECTURES
    layout = decoder_layout(model)
    decoder_layout(model)
    assert layout.prefix == "gpt_neox.layers" and layout.groups == ()
    err = capsys.readouterr().err
    assert err.count("warning: model type 'gpt_neox' has no row") == 1, err
    layers = select_linears(layout.blocks[0], "b", None, None)
    assert layout.input_groups(layers, "b") == [[n] for n in layers]


@pytest.mark.parametrize("sequential", [False, True])
def test_an_unknown_family_prunes_each_linear_alone(sequential):
    model = tiny_neox()
    calib = torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    config = OneShotConfig(
        method="sparsegpt", calib="unused", batch_size=4, compute_dtype="float32", sequential=sequential
    )
    report = oneshot(model, None, config, calib=calib, progress=False)
    assert report.sparsity.overall == pytest.approx(0.5, abs=0.005)
    assert len(report.sparsity.per_layer) == 8


def test_readme_lists_every_row():
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = [line for line in readme.splitlines() if line.strip().startswith("| `")]
    listed = {name for line in table for name in line.split("|")[1].replace("`", "").replace(",", " ").split()}
    assert listed == set(ARCHITECTURES)

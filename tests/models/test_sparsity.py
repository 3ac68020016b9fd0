"""The sparsity sparsefit reports: measured over every weight matrix of the decoder blocks."""

import pytest
import torch

from sparsefit.models import architectures
from sparsefit.models.layout import decoder_layout
from sparsefit.models.sparsity import block_matrices, dense_patterns, measure_sparsity
from tests.conftest import ARCHS, MOE_ARCHS, tiny_model


def zero_randomly(model, fraction, seed=0):
    """Zero `fraction` of every parameter of the decoder blocks (vectors and routers included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in decoder_layout(model).blocks.parameters():
            p.masked_fill_(torch.rand(p.shape, generator=g) < fraction, 0.0)


def count_zeros(model, skip):
    """Zeros over the 2-D-or-more parameters of the blocks whose names contain none of `skip`."""
    zeros = numel = 0
    for name, p in decoder_layout(model).blocks.named_parameters():
        if p.ndim >= 2 and not name.endswith("bias") and not any(s in name for s in skip):
            zeros, numel = zeros + int((p == 0).sum()), numel + p.numel()
    return zeros / numel, numel


@pytest.mark.parametrize("arch", ARCHS)
def test_overall_is_the_measured_zeros_over_every_block_matrix(arch):
    model = tiny_model(arch)
    zero_randomly(model, 0.3)
    routers = architectures.ARCHITECTURES[model.config.model_type].routers
    expected, numel = count_zeros(model, [f"{r}." for r in routers])
    measured = measure_sparsity(model)
    assert measured["overall"] == pytest.approx(expected, abs=1e-12)
    assert measured["weights"] == numel
    kinds = measured["per_kind"]
    assert sum(k["weights"] for k in kinds.values()) == numel
    assert sum(k["sparsity"] * k["weights"] for k in kinds.values()) / numel == pytest.approx(expected)
    assert any("embeddings" in why for why in measured["excluded"].values())


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_experts_are_counted_each_and_routers_listed_as_excluded(arch):
    model = tiny_model(arch)
    b = next(i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts"))  # DeepSeek: 1
    experts = model.model.layers[b].mlp.experts
    with torch.no_grad():
        experts.gate_up_proj[1].zero_()  # one expert's matrix all zeros, the others dense
    measured = measure_sparsity(model)
    name = f"model.layers.{b}.mlp.experts.gate_up_proj"
    per = measured["per_expert"][name]
    assert per == [0.0, 1.0, 0.0, 0.0]
    assert measured["per_layer"][name] == pytest.approx(0.25)
    assert "mlp.experts.gate_up_proj" in measured["per_kind"]
    router = architectures.ARCHITECTURES[model.config.model_type].routers[0]
    assert measured["excluded"][f"model.layers.*.{router}.weight"] == "router (kept dense)"
    if arch == "qwen2_moe":
        assert "model.layers.*.mlp.shared_expert_gate.weight" in measured["excluded"]
        assert "mlp.shared_expert.down_proj" in measured["per_kind"]


def test_dense_patterns_name_what_was_left_dense():
    model = tiny_model("qwen3_moe")
    with torch.no_grad():
        for name, p in model.model.layers.named_parameters():
            if p.ndim >= 2 and "mlp.gate" not in name:
                p.masked_fill_(torch.rand(p.shape) < 0.5, 0.0)
        for layer in model.model.layers:
            layer.mlp.experts.down_proj[2].normal_()  # expert 2's down projection dense in every block
            layer.self_attn.o_proj.weight.normal_()
    left = dense_patterns(model)
    assert sorted(left) == [
        "model.layers.*.mlp.experts.down_proj (experts 2)",
        "model.layers.*.self_attn.o_proj",
    ]
    assert dense_patterns(model, lambda name: "o_proj" in name or "experts" in name) == []


def test_generic_rule_counts_unknown_fused_tensors(monkeypatch):
    """Without its row, a mixture of experts is still measured whole: its experts count, dense."""
    model = tiny_model("mixtral")
    monkeypatch.delitem(architectures.ARCHITECTURES, "mixtral")
    names = {m.name for m in block_matrices(model)[0]}
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    assert "model.layers.0.mlp.gate" in names  # no row, no router known: counted like any matrix

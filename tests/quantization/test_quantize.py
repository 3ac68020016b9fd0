import pytest
import torch

from sparsefit.errors import UsageError
from sparsefit.models.layout import decoder_linears, weight_as_out_in
from sparsefit.pruning import OneShotConfig, oneshot
from sparsefit.quantization import QuantizeConfig, quantize
from sparsefit.quantization.scheme import group_view
from tests.conftest import ARCHS, tiny_model


def calib(n=8, length=32, seed=0):
    torch.manual_seed(seed)
    return torch.randint(3, 250, (n, length))


def pruned(arch="llama", sparsity=0.5):
    model = tiny_model(arch)
    oneshot(model, None, OneShotConfig(method="magnitude", sparsity=sparsity), progress=False)
    return model


def decoder_weights(model, result):
    layers = decoder_linears(model)  # expert matrices (slices of fused expert tensors) included
    return {name: weight_as_out_in(layers[name]) for name in result.scales}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_quantizing_a_pruned_model_keeps_every_zero_and_puts_weights_on_the_grid(arch, method):
    model = pruned(arch)
    zeros = {n: (w == 0).clone() for n, w in decoder_weights(model, quantize_dry(model)).items()}
    config = QuantizeConfig(method=method, scheme="w4a16", group_size=16, compute_dtype="float32")
    result = quantize(model, None, config, calib=calib(), progress=False)
    assert result.report.revived_weights == 0 and result.report.layers == len(zeros)
    assert not any("experts" in p for p in result.report.not_quantized)  # every expert slice is quantized
    assert result.report.sparsity_after >= result.report.sparsity_before >= 0.49
    for name, w in decoder_weights(model, result).items():
        assert (w[zeros[name]] == 0).all(), name
        codes = group_view(w, 16) / result.scales[name].unsqueeze(-1)
        assert (
            torch.allclose(codes, codes.round(), atol=1e-4) and -8 <= codes.round().min() <= codes.round().max() <= 7
        ), name


def quantize_dry(model):
    """The layer names quantize would change (a result with their scales), without changing them."""
    import copy

    return quantize(copy.deepcopy(model), None, QuantizeConfig(method="rtn", group_size=0), progress=False)


def test_gptq_keeps_the_model_closer_than_round_to_nearest():
    x = calib(n=16, length=48)
    reference = pruned()
    with torch.no_grad():
        target = reference(input_ids=x).logits

    def error(method):
        model = pruned()
        config = QuantizeConfig(method=method, scheme="w4a16", group_size=16, compute_dtype="float32")
        quantize(model, None, config, calib=x, progress=False)
        with torch.no_grad():
            return (model(input_ids=x).logits - target).square().mean().item()

    assert error("gptq") < 0.8 * error("rtn")


def test_w8a8_schemes_scale_per_channel_whatever_the_group_size():
    model = pruned()
    result = quantize(model, None, QuantizeConfig(method="rtn", scheme="w8a8-fp8", group_size=16), progress=False)
    assert result.grid.group_size is None and result.grid.kind == "float"
    assert all(s.shape[1] == 1 for s in result.scales.values())


def test_config_checks_name_the_field():
    with pytest.raises(ValueError, match="gptq' needs calibration data"):
        QuantizeConfig(method="gptq", calib=None)
    assert QuantizeConfig(group_size=0).group_size is None
    with pytest.raises(ValueError, match="scheme"):
        QuantizeConfig(scheme="w3a16")


def test_chosen_group_size_that_does_not_divide_the_columns_is_a_usage_error():
    with pytest.raises(UsageError, match="multiple of --group-size 48"):
        quantize(tiny_model("llama"), None, QuantizeConfig(method="rtn", group_size=48), progress=False)


def test_default_group_size_that_does_not_divide_falls_back_with_a_notice(capsys):
    """The default 128 does not divide 64 columns: 64 is used, and said."""
    result = quantize(tiny_model("llama"), None, QuantizeConfig(method="rtn"), progress=False)
    assert result.grid.group_size == 64 and result.report.group_size == 64
    assert "groups of 64 instead" in capsys.readouterr().err


def test_nan_weights_are_refused_naming_the_layer_before_any_is_changed():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    config = QuantizeConfig(method="rtn", scheme="w4a16", group_size=32)
    with pytest.raises(UsageError, match=r"model.layers.1.mlp.up_proj.weight holds 1 NaN or infinite values"):
        quantize(model, None, config, progress=False)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if "layers.1.mlp.up_proj" not in k)


def test_scales_that_overflow_float16_are_refused_with_the_fix():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = 1e6  # scale 1e6 / 7.5 > 65504
    config = QuantizeConfig(method="rtn", scheme="w4a16", group_size=32, export_dtype="float16")
    with pytest.raises(UsageError, match=r"q_proj: weights up to 1e\+06 need scales beyond float16.*bfloat16"):
        quantize(model, None, config, progress=False)
    result = quantize(model, None, config.model_copy(update={"export_dtype": "bfloat16"}), progress=False)
    assert all(torch.isfinite(s).all() for s in result.scales.values())


def test_the_solver_refuses_a_scale_that_is_inf_in_its_dtype():
    """The backstop behind the check up front: GPTQ's updated weights could outgrow the first scales."""
    from sparsefit.quantization.methods import QuantizeSink, QuantOptions, QuantSolver
    from sparsefit.quantization.scheme import Grid

    options = QuantOptions("rtn", Grid("int", 4, 32), QuantizeSink(), scale_dtype=torch.float16)
    weight = torch.randn(4, 64)
    weight[2, 7] = 1e6
    with pytest.raises(UsageError, match=r"layer: its weight scales overflow float16 .*--export-dtype bfloat16"):
        QuantSolver(options, None).solve_shared(["layer"], [weight], [0.0], [None])
    assert options.sink.scales == {}


MOE = ["mixtral", "qwen3_moe"]


@pytest.mark.parametrize("arch", MOE)
def test_each_expert_is_quantized_by_gptq_from_its_routed_tokens(arch):
    """Paper order (statistics of the dense block): each expert slice equals GPTQ applied to that expert
    alone, its Hessian from the tokens the router sends it; zeros kept, every slice on its grid."""
    from sparsefit.quantization.gptq import gptq
    from sparsefit.quantization.scheme import Grid
    from tests.pruning.test_moe import expert_layers, routed_reference

    model, x = pruned(arch), calib()
    reference = routed_reference(model, x, 0)
    dense = {n: m.weight.clone() for n, m in expert_layers(model).items() if ".layers.0." in n}
    config = QuantizeConfig(
        method="gptq", scheme="w4a16", group_size=16, compute_dtype="float32", sequential=False,
        export_dtype="float32", min_expert_tokens=0,
    )  # fmt: skip
    result = quantize(model, None, config, calib=x, progress=False)
    assert not any("experts" in p for p in result.report.not_quantized) and result.report.revived_weights == 0
    grid = Grid("int", 4, 16)
    for name, w in dense.items():
        param, e = name.rsplit(".", 2)[1:]
        inp = reference[int(e)][0 if param == "gate_up_proj" else 1]
        expected, scale, _ = gptq(w, 2 * inp.t() @ inp / inp.shape[0], grid, w != 0)  # the defaults: act-order, mse
        got = expert_layers(model)[name].weight
        assert (got[w == 0] == 0).all(), name
        # GPTQ rounds column by column: a Hessian equal up to float32 summation order may flip a rare
        # rounding, which the later columns then compensate. So: almost every weight identical, and the
        # same output error on the expert's routed inputs.
        assert (~torch.isclose(got, expected, rtol=1e-4, atol=1e-6)).float().mean() < 0.02, name
        error, reference_error = (float(((q - w) @ inp.t()).norm()) for q in (got, expected))
        assert error == pytest.approx(reference_error, rel=0.02), name
        assert torch.isclose(result.scales[name], scale, rtol=1e-4).float().mean() > 0.98, name


def test_experts_with_too_few_tokens_are_rounded_to_nearest_and_reported():
    from sparsefit.quantization.observer import choose_scale
    from sparsefit.quantization.scheme import Grid, group_view
    from tests.pruning.test_moe import expert_layers, two_starved

    model, x = pruned("mixtral"), calib()
    counts, threshold, starved = two_starved(model, x)
    dense = {n: m.weight.clone() for n, m in expert_layers(model).items()}
    config = QuantizeConfig(method="gptq", scheme="w4a16", group_size=16, min_expert_tokens=threshold, sequential=False)
    result = quantize(model, None, config, calib=x, progress=False)
    for e in starved:
        for param in ("gate_up_proj", "down_proj"):
            name = f"model.layers.0.mlp.experts.{param}.{e}"
            assert result.report.starved_experts[name] == counts[e]
            grid, groups = Grid("int", 4, 16), group_view(dense[name], 16)
            scale = choose_scale(groups, grid, "mse", torch.bfloat16)  # the default observer
            expected = grid.fake_quantize(groups, scale.unsqueeze(-1)).reshape(dense[name].shape)
            assert torch.equal(expert_layers(model)[name].weight, expected), name

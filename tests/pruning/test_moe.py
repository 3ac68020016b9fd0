"""Mixtures of experts: each expert's matrices pruned as linears of their own, from their routed tokens."""

import json
import re

import pytest
import torch
from torch import nn

from sparsefit.errors import UsageError
from sparsefit.models import architectures
from sparsefit.models.experts import ExpertMatrix
from sparsefit.models.sparsity import measure_sparsity
from sparsefit.pruning import OneShotConfig, oneshot
from sparsefit.pruning.magnitude import prune_magnitude
from sparsefit.pruning.sparsegpt import inverse_hessian, prune_sparsegpt
from sparsefit.pruning.stats import InputStats
from sparsefit.pruning.wanda import prune_wanda
from sparsefit.training.masks import SparsityMasks
from tests.conftest import MOE_ARCHS, tiny_model
from tests.pruning.test_pipeline import calib, cfg, linears


def expert_layers(model):
    return {n: m for n, m in linears(model).items() if isinstance(m, ExpertMatrix)}


def moe_block(model):
    """The first block with experts (DeepSeek's first blocks are dense)."""
    return next(i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts"))


def moe_input(model, x, block=0):
    """What the MoE layer of block `block` receives, one row per token."""
    seen = {}

    def grab(module, args):
        seen["hidden"] = args[0].detach().reshape(-1, args[0].shape[-1])

    handle = model.model.layers[block].mlp.register_forward_pre_hook(grab)
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["hidden"]


def routed_reference(model, x, block=0):
    """Per expert of block `block`: the tokens the router sends it and its down input, from the
    routing the MoE layer hands its experts module and the eager formula (not sparsefit's capture)."""
    mlp = model.model.layers[block].mlp
    seen = {}

    def grab(module, args):
        seen["hidden"], seen["index"] = args[0].detach(), args[1]

    handle = mlp.experts.register_forward_pre_hook(grab)
    with torch.no_grad():
        model(x)
    handle.remove()
    hidden, index = seen["hidden"].reshape(-1, seen["hidden"].shape[-1]), seen["index"]
    experts = mlp.experts
    out = {}
    for e in range(experts.gate_up_proj.shape[0]):
        rows = (index == e).any(-1)
        xe = hidden[rows]
        w = experts.gate_up_proj[e].detach()
        if hasattr(experts, "gate_up_proj_bias"):  # GPT-OSS: (in, out), a bias, its own activation
            down_in = experts._apply_gate(xe @ w + experts.gate_up_proj_bias[e].detach())
        else:
            inter = experts.down_proj.shape[-1]
            down_in = experts.act_fn(xe @ w[:inter].t()) * (xe @ w[inter:].t())
        out[e] = (xe, down_in)
    return out


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_statistics_come_from_the_tokens_routed_to_each_expert(arch):
    model, x = tiny_model(arch), calib()
    b = moe_block(model)
    reference = routed_reference(model, x, b)
    layers = {n: m for n, m in expert_layers(model).items() if f".layers.{b}." in n}
    with InputStats(layers, sq_sum=True, hessian=True) as stats, torch.no_grad():
        model(x)
    for e, (xe, down_in) in reference.items():
        for param, inp in (("gate_up_proj", xe), ("down_proj", down_in)):
            name = f"model.layers.{b}.mlp.experts.{param}.{e}"
            assert stats.count[name] == inp.shape[0] > 0
            torch.testing.assert_close(stats.sq_sum(name), (inp * inp).sum(0), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(stats.hessian(name), 2 * inp.t() @ inp / inp.shape[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_each_expert_is_pruned_as_its_own_linear(arch, method):
    """Paper order (statistics of the dense block 0): each expert's matrices equal the method applied
    to that expert alone, with its routed inputs."""
    model, x = tiny_model(arch), calib()
    b = moe_block(model)
    reference = routed_reference(model, x, b)
    dense = {n: m.weight.clone() for n, m in expert_layers(model).items() if f".layers.{b}." in n}
    earlier = [rf"layers\.{i}\." for i in range(b)]  # dense blocks before the first MoE stay dense: same inputs
    config = cfg(method=method, sparsity=0.5, damp=0.01, ignore=earlier)
    report = oneshot(model, None, config, calib=x, progress=False)
    for name, w in dense.items():
        param, e = name.rsplit(".", 2)[1:]
        inp = reference[int(e)][0 if param == "gate_up_proj" else 1]
        if method == "magnitude":
            expected = prune_magnitude(w, 0.5)[0]
        elif method == "wanda":
            expected = prune_wanda(w, (inp * inp).sum(0), 0.5)[0]
        else:
            H = 2 * inp.t() @ inp / inp.shape[0]
            expected = prune_sparsegpt(w, *inverse_hessian(H, 0.01), 0.5)[0]
        got = expert_layers(model)[name].weight
        assert torch.equal(got == 0, expected == 0), name
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert report.sparsity.overall == pytest.approx(measure_sparsity(model)["overall"])
    assert report.sparsity.pruned == pytest.approx(0.5, abs=0.005)
    for per in report.sparsity.per_expert.values():
        assert per == pytest.approx([0.5] * len(per), abs=0.01)


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("sequential", [True, False])
def test_two_four_in_every_expert(arch, sequential):
    model = tiny_model(arch)
    config = cfg(method="sparsegpt", structure="2:4", block_size=4, sequential=sequential)
    oneshot(model, None, config, calib=calib(), progress=False)
    for name, m in linears(model).items():
        assert ((m.weight != 0).reshape(-1, 4).sum(1) == 2).all(), name
    with torch.no_grad():
        assert torch.isfinite(model(calib(2, 16)).logits).all()


def test_routers_stay_dense_and_the_shared_expert_is_pruned():
    model = tiny_model("qwen2_moe")
    router = model.model.layers[0].mlp.gate.weight.clone()
    shared_gate = model.model.layers[0].mlp.shared_expert_gate.weight.clone()
    oneshot(model, None, cfg(method="wanda", sparsity=0.5), calib=calib(), progress=False)
    assert torch.equal(model.model.layers[0].mlp.gate.weight, router)
    assert torch.equal(model.model.layers[0].mlp.shared_expert_gate.weight, shared_gate)
    shared = model.model.layers[0].mlp.shared_expert
    for lin in (shared.gate_proj, shared.up_proj, shared.down_proj):
        assert (lin.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def two_starved(model, x):
    """Block 0's routed token counts, a min_expert_tokens threshold that the two least routed experts
    fall short of, and those experts."""
    counts = {e: xe.shape[0] for e, (xe, _) in routed_reference(model, x).items()}
    threshold = sorted(counts.values())[1] + 1
    return counts, threshold, [e for e, n in counts.items() if n < threshold]


def test_experts_with_too_few_tokens_are_pruned_by_magnitude_and_reported():
    model, x = tiny_model("mixtral"), calib()
    counts, threshold, starved = two_starved(model, x)
    dense = {n: m.weight.clone() for n, m in expert_layers(model).items()}
    report = oneshot(model, None, cfg(method="sparsegpt", min_expert_tokens=threshold), calib=x, progress=False)
    for e in starved:
        for param in ("gate_up_proj", "down_proj"):
            name = f"model.layers.0.mlp.experts.{param}.{e}"
            assert report.sparsity.starved_experts[name] == counts[e]
            assert torch.equal(expert_layers(model)[name].weight, prune_magnitude(dense[name], 0.5)[0])
    assert all(n.startswith("model.layers.") for n in report.sparsity.starved_experts)


def test_a_layout_no_rule_can_prune_is_refused_unless_ignored(monkeypatch):
    """Without its row the generic rule cannot prune fused experts: refused up front, by name; with
    --ignore the experts stay dense on purpose and the sparsity counts them as dense."""
    model = tiny_model("mixtral")
    monkeypatch.delitem(architectures.ARCHITECTURES, "mixtral")
    with pytest.raises(UsageError, match=r"model\.layers\.\*\.mlp\.experts\.gate_up_proj.*--ignore"):
        oneshot(model, None, cfg(method="magnitude"), progress=False)
    report = oneshot(model, None, cfg(method="magnitude", ignore=["experts", r"mlp\.gate"]), progress=False)
    measured = measure_sparsity(model)
    assert report.sparsity.overall == pytest.approx(measured["overall"]) and report.sparsity.overall < 0.2
    assert report.sparsity.per_kind["mlp.experts.gate_up_proj"]["sparsity"] == 0.0
    assert report.sparsity.pruned == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_finetune_masks_keep_every_expert_zero(arch):
    model = tiny_model(arch).train()
    oneshot(model, None, cfg(method="wanda"), calib=calib(), progress=False)
    masks = SparsityMasks.from_zeros(model)
    fused = [n for n in masks.masks if n.endswith("experts.gate_up_proj")]
    assert fused and masks.masks[fused[0]].ndim == 3
    before = measure_sparsity(model)["overall"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = calib(4, 16)
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x).logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        masks.apply_to_grads()
        opt.step()
        opt.zero_grad()
        masks.apply_to_weights()
    assert masks.revived() == 0
    assert measure_sparsity(model)["overall"] == pytest.approx(before)
    experts = model.model.layers[moe_block(model)].mlp.experts
    assert experts.gate_up_proj.grad is None or (experts.gate_up_proj.grad == 0).sum() > 0


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("fmt", ["hf", "sparse-bitmask"])
def test_export_keeps_expert_zeros(tmp_path, fmt, arch):
    """The checkpoint reloads (by sparsefit's loader, which reads the bitmask layout) to the same
    weights; sparse-bitmask stores each expert's slice sparse in experts.safetensors, in fewer bytes."""
    from sparsefit.export import export_checkpoint
    from sparsefit.models.loading import load_model

    model = tiny_model(arch)
    oneshot(model, None, cfg(method="magnitude"), progress=False)
    info = export_checkpoint(model, None, tmp_path / "out", "tiny", fmt=fmt)
    assert info["sparsity"] == pytest.approx(measure_sparsity(model)["overall"])
    recorded = json.loads((tmp_path / "out" / "sparsity.json").read_text())["sparsity"]
    assert recorded["per_expert"][f"model.layers.{moe_block(model)}.mlp.experts.down_proj"] == pytest.approx(
        [0.5] * 4, abs=0.01
    )
    if fmt == "sparse-bitmask":
        from safetensors import safe_open

        fused = {n: p for n, p in model.named_parameters() if p.dim() == 3}
        with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
            # neither fused nor as transformers renames them on save (one linear per expert)
            assert not any(k in fused or k.startswith(tuple(f"{n}." for n in fused)) for k in f.keys())
            assert not any(re.search(r"experts\.\d+\.", k) for k in f.keys())
        stored = (tmp_path / "out" / "experts.safetensors").stat().st_size
        dense = sum(p.numel() * p.element_size() for p in fused.values())
        assert stored < 0.75 * dense  # half the values, one bit each for the mask, a little metadata
    back = load_model(str(tmp_path / "out"))
    for (name, a), b in zip(back.model.layers.named_parameters(), model.model.layers.parameters()):
        assert torch.equal(a, b), name
    assert measure_sparsity(back)["overall"] == pytest.approx(recorded["overall"])


def test_prune_command_reports_the_measured_sparsity(tmp_path, capsys):
    from sparsefit.cli.main import main

    model = tiny_model("olmoe")
    model.save_pretrained(tmp_path / "in")
    _save_tokenizer(tmp_path / "in")
    code = main(
        [
            "prune",
            "--model",
            str(tmp_path / "in"),
            "--method",
            "magnitude",
            "--calib",
            "none",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "mlp.experts.gate_up_proj 0.500" in printed and "router (kept dense)" in printed
    info = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert info["sparsity"]["overall"] == pytest.approx(measure_sparsity(back)["overall"])
    assert info["pruning"]["sparsity"]["overall"] == pytest.approx(info["sparsity"]["overall"])


def _save_tokenizer(path):
    from tests.conftest import tiny_tokenizer

    tiny_tokenizer().save_pretrained(path)


def test_options_validate():
    with pytest.raises(ValueError, match="min_expert_tokens"):
        OneShotConfig(method="magnitude", min_expert_tokens=-1)


def test_quantize_covers_the_experts_and_names_only_what_it_left():
    from sparsefit.quantization import QuantizeConfig, quantize

    model = tiny_model("qwen2_moe")
    oneshot(model, None, cfg(method="magnitude"), progress=False)
    before = measure_sparsity(model)["overall"]
    report = quantize(model, None, QuantizeConfig(method="rtn", calib=None), progress=False).report
    assert report.sparsity_before == pytest.approx(before) and report.sparsity_before == pytest.approx(0.5, abs=0.01)
    assert report.not_quantized == []  # the shared expert's gate is a router: kept in float, not counted
    left = quantize(model, None, QuantizeConfig(method="rtn", calib=None, ignore=["down_proj"]), progress=False)
    assert left.report.not_quantized == [
        "model.layers.*.mlp.experts.down_proj",
        "model.layers.*.mlp.shared_expert.down_proj",
    ]


def test_all_expert_calibration_feeds_every_token_to_every_expert():
    model, x = tiny_model("olmoe"), calib()
    every = moe_input(model, x)
    dense = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    config = cfg(method="wanda", expert_calibration="all")
    report = oneshot(model, None, config, calib=x, progress=False)
    assert not report.sparsity.starved_experts
    for e in range(dense.shape[0]):
        expected = prune_wanda(dense[e], (every * every).sum(0), 0.5)[0]
        torch.testing.assert_close(model.model.layers[0].mlp.experts.gate_up_proj[e], expected)


def test_prune_finetune_export_a_mixture_of_experts(tmp_path, data_dir, tokenizer, capsys):
    """The command line end to end: 2:4 pruning, a few fine-tuning steps (masks on the fused expert
    tensors: no pruned weight revives), a bitmask export that reloads with every expert still 2:4."""
    from sparsefit.models.loading import load_model
    from tests.conftest import run_cli

    src = tmp_path / "moe"
    tiny_model("qwen3_moe").save_pretrained(src)
    tokenizer.save_pretrained(src)
    args = ["prune", "--model", str(src), "--method", "wanda", "--structure", "2:4", "--calib", "gsm8k"]
    code, out, err = run_cli([*args, "--num-samples", "8", "--seq-len", "32", "--output", str(tmp_path / "p")], capsys)
    assert code == 0, err
    ft = tmp_path / "ft"
    code, out, err = run_cli(
        ["finetune", "--model", str(tmp_path / "p"), "--max-steps", "3", "--batch-size", "2", "--seq-len", "64",
         "--format", "plain", "--output", str(ft), "--json", str(tmp_path / "m.json")],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "revived weights 0" in out
    code, out, err = run_cli(
        ["export", "--model", str(ft), "--format", "sparse-bitmask", "--output", str(tmp_path / "e")], capsys
    )
    assert code == 0, err
    back = load_model(str(tmp_path / "e"))
    for layer in back.model.layers:
        for w in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
            assert ((w != 0).reshape(-1, 4).sum(-1) == 2).all()
    assert measure_sparsity(back)["overall"] == pytest.approx(0.5)


def test_a_damaged_experts_file_is_a_one_line_error(tmp_path):
    """experts.safetensors whose metadata claims another shape, or whose slices do not match their
    bitmask, fails to load with the file named, before any expert is allocated."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sparsefit.export import export_checkpoint
    from sparsefit.models.loading import load_model

    model = tiny_model("mixtral")
    oneshot(model, None, cfg(method="magnitude"), progress=False)
    export_checkpoint(model, None, tmp_path / "out", "tiny", fmt="sparse-bitmask")
    path = tmp_path / "out" / "experts.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    shapes = json.loads(meta["experts"])
    name = next(iter(shapes))
    save_file(tensors, str(path), metadata={**meta, "experts": json.dumps({**shapes, name: [4, 7, 7]})})
    with pytest.raises(UsageError, match="experts.safetensors.*re-export"):
        load_model(str(tmp_path / "out"))
    key = next(k for k in tensors if k.endswith(".compressed"))
    save_file({**tensors, key: tensors[key][1:]}, str(path), metadata=meta)
    with pytest.raises(UsageError, match=f"experts.safetensors: expert {key.removesuffix('.compressed')}"):
        load_model(str(tmp_path / "out"))

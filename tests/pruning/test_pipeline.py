"""The layer-by-layer driver on tiny random models of every supported family."""

import json
import sys
import tempfile

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from transformers import AutoModelForCausalLM

from sparsefit.cli import main
from sparsefit.config import validate
from sparsefit.data.self_generated import sample_from_model
from sparsefit.errors import UsageError
from sparsefit.export import save_checkpoint
from sparsefit.models.layout import decoder_layout, select_linears, weight_as_out_in
from sparsefit.models.offload import offload_tensor_, on_ram_filesystem
from sparsefit.models.sparsity import block_matrices
from sparsefit.pruning import OneShotConfig, oneshot
from sparsefit.pruning.oneshot import calibration_batch, cpu_has_bf16, use_bf16
from sparsefit.pruning.pipeline import BlockRunner, capture_block_inputs
from sparsefit.pruning.stats import InputStats
from sparsefit.pruning.wanda import prune_wanda
from tests.conftest import ARCHS, tiny_model


def calib(n=8, length=32, seed=0):
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def cfg(**kw):
    base = {"calib": "unused", "batch_size": 4, "compute_dtype": "float32", "preset": "paper"}
    return OneShotConfig(**{**base, **kw})


def linears(model):
    layout = decoder_layout(model)
    out = {}
    for i, block in enumerate(layout.blocks):
        out.update(select_linears(block, f"{layout.prefix}.{i}", None, None, layout.arch))
    return out  # each expert's matrix of a fused tensor included


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_family_and_method_hits_the_target(arch, method):
    model = tiny_model(arch)
    report = oneshot(model, None, cfg(method=method, sparsity=0.5), calib=calib(), progress=False)
    layers = linears(model)
    assert set(report.sparsity.per_layer) == {m.name for m in block_matrices(model)[0]}
    for name, module in layers.items():  # every expert's matrix included
        w = module.weight
        assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.01), name
    assert report.sparsity.overall == pytest.approx(0.5, abs=0.005)
    with torch.no_grad():
        assert torch.isfinite(model(calib(2, 16)).logits).all()


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_two_four_pattern_in_every_layer(arch, method):
    model = tiny_model(arch)
    # block_size 6 is rounded down to 4 so N:M groups never straddle SparseGPT's column blocks
    oneshot(model, None, cfg(method=method, structure="2:4", block_size=6), calib=calib(), progress=False)
    for name, module in linears(model).items():
        groups = (weight_as_out_in(module) != 0).reshape(-1, 4).sum(1)
        assert (groups == 2).all(), name  # exactly N of every M kept


def test_later_blocks_see_pruned_outputs_of_earlier_blocks():
    """Block 1 is pruned from statistics of the model whose block 0 is already pruned."""
    model = tiny_model("llama")
    dense_q1 = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    x = calib()
    oneshot(model, None, cfg(method="wanda", sparsity=0.5), calib=x, progress=False)
    # In the final model block 1's q_proj input depends only on the (pruned) block 0.
    q1 = model.model.layers[1].self_attn.q_proj
    with InputStats({"q": q1}, sq_sum=True) as stats, torch.no_grad():
        model(x)
    expected, _ = prune_wanda(dense_q1, stats.sq_sum("q"), 0.5)
    assert torch.equal(q1.weight, expected)


@pytest.mark.parametrize("sequential", [False, True])
def test_sequential_prunes_each_linear_from_the_final_models_inputs(sequential):
    """Sequential: every linear was pruned from what it receives in the finished sparse model, since
    all linears before it (earlier blocks and earlier in its own block) were already final. The
    default order differs for linears whose inputs come from pruned linears of the same block."""
    model = tiny_model("llama")
    dense = {n: m.weight.detach().clone() for n, m in linears(model).items()}
    x = calib()
    oneshot(model, None, cfg(method="wanda", sparsity=0.5, sequential=sequential), calib=x, progress=False)
    layers = linears(model)
    with InputStats(layers, sq_sum=True) as stats, torch.no_grad():
        model(x)
    same = {n: torch.equal(m.weight, prune_wanda(dense[n], stats.sq_sum(n), 0.5)[0]) for n, m in layers.items()}
    assert same["model.layers.1.self_attn.q_proj"] and same["model.layers.0.mlp.gate_proj"] == sequential
    assert all(same.values()) == sequential, same


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method, structure", [("wanda", "unstructured"), ("sparsegpt", "2:4")])
def test_reconstruction_refits_weights_under_the_same_masks(arch, method, structure):
    """Block 0's linears are all solved from the dense block's inputs, with or without
    reconstruction: same masks, and the refit weights reproduce the dense outputs better."""
    x = calib()
    dense, plain, refit = tiny_model(arch), tiny_model(arch), tiny_model(arch)
    layout = decoder_layout(dense)
    block0 = select_linears(layout.blocks[0], f"{layout.prefix}.0", None, None, layout.arch)
    with InputStats(block0, hessian=True) as stats, torch.no_grad():
        dense(x)
    options = {"method": method, "structure": structure, "sparsity": 0.5}
    r0 = oneshot(plain, None, cfg(**options), calib=x, progress=False)
    r1 = oneshot(refit, None, cfg(**options, reconstruct_iters=30), calib=x, progress=False)
    assert "reconstruct" in r1.phases and "reconstruct" not in r0.phases
    assert r1.sparsity.per_layer == r0.sparsity.per_layer
    weights = [{n: weight_as_out_in(m) for n, m in linears(model).items()} for model in (dense, plain, refit)]
    for name in block0:
        w, p, r = (ws[name] for ws in weights)
        assert torch.equal(p != 0, r != 0), name
        H = stats.hessian(name)
        loss = [torch.einsum("ij,jk,ik->", w - v, H, w - v).item() for v in (p, r)]
        assert loss[1] < loss[0], (name, loss)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_sequential_sparsegpt_every_family(arch, structure):
    model = tiny_model(arch)
    reference = tiny_model(arch)
    config = cfg(method="sparsegpt", structure=structure, block_size=4, sequential=True)
    report = oneshot(model, None, config, calib=calib(), progress=False)
    assert set(report.phases) >= {"forward", "solve"} and "propagate" not in report.phases
    for name, module in linears(model).items():
        w = weight_as_out_in(module)
        assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.01), name
        if structure == "2:4":
            assert ((w != 0).reshape(-1, 4).sum(1) == 2).all(), name
    # The first linear of block 0 sees the embeddings either way: both orders prune it alike.
    oneshot(reference, None, config.model_copy(update={"sequential": False}), calib=calib(), progress=False)
    layout = decoder_layout(model)
    block0 = linears(model)
    # in forward order (Phi-3 registers o_proj first); DeepSeek-V2 has q_proj, not the q_a/q_b pair
    first = next(f"{layout.prefix}.0.{r}" for r in layout.groups[0] if f"{layout.prefix}.0.{r}" in block0)
    assert torch.allclose(dict(linears(model))[first].weight, dict(linears(reference))[first].weight, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_pruning_with_offload_gives_the_same_model(tmp_path, arch):
    """Weights and, in the sequential order, the paused forwards' MLP intermediates move to files."""
    x = calib()
    plain, offloaded = tiny_model(arch), tiny_model(arch)
    oneshot(plain, None, cfg(method="sparsegpt", sequential=True), calib=x, progress=False)
    config = cfg(method="sparsegpt", sequential=True, offload_dir=str(tmp_path / "off"))
    report = oneshot(offloaded, None, config, calib=x, progress=False)
    assert "offload" in report.phases
    assert len(report.block_seconds) == len(decoder_layout(offloaded).blocks) and min(report.block_seconds) > 0
    assert list((tmp_path / "off").iterdir()) == []
    for (name, p), q in zip(plain.named_parameters(), offloaded.parameters()):
        assert torch.equal(p, q), name
    tied = offloaded.get_output_embeddings().weight is offloaded.get_input_embeddings().weight
    assert tied or not plain.config.tie_word_embeddings
    assert torch.equal(plain(x).logits, offloaded(x).logits)


def test_shared_inputs_share_one_accumulator():
    model = tiny_model("llama")
    block = model.model.layers[0]
    layers = select_linears(block, "b", None, None)
    groups = decoder_layout(model).input_groups(layers, "b")
    with InputStats(layers, groups, hessian=True) as stats, torch.no_grad():
        model(calib(2, 16))
        stats.end_forward()
    assert stats.root("b.self_attn.k_proj") == stats.root("b.self_attn.v_proj") == "b.self_attn.q_proj"
    assert stats.root("b.mlp.up_proj") == "b.mlp.gate_proj"
    assert stats.root("b.self_attn.o_proj") == "b.self_attn.o_proj"
    assert stats.root("b.mlp.down_proj") == "b.mlp.down_proj"
    assert set(stats.xtx) == {"b.self_attn.q_proj", "b.self_attn.o_proj", "b.mlp.gate_proj", "b.mlp.down_proj"}


def test_hessian_is_the_mirrored_average_and_ends_its_accumulation():
    """The accumulator becomes 2 X^T X / n in place: exactly symmetric, read once, and any later
    input of the group is an error rather than a restart from zero."""
    linear = nn.Linear(300, 4)
    x = torch.randn(3, 10, 300, generator=torch.Generator().manual_seed(0))
    with InputStats({"l": linear}, hessian=True) as stats, torch.no_grad():
        linear(x)
        stats.end_forward()
        H = stats.hessian("l")
        xs = x.reshape(-1, 300).double()
        torch.testing.assert_close(H.double(), 2 * xs.t() @ xs / 30, rtol=1e-5, atol=1e-4)
        assert torch.equal(H, H.t())
        assert stats.hessian("l") is H and not stats.xtx
        with pytest.raises(RuntimeError, match="after its Hessian was read"):
            linear(x)


@pytest.mark.parametrize("d, leaf", [(7, 160), (160, 160), (161, 160), (577, 32), (1536, 160)])
def test_accumulated_upper_triangle_is_x_transpose_x(d, leaf):
    from sparsefit.pruning.stats import accumulate_upper

    x = torch.randn(64, d, generator=torch.Generator().manual_seed(d))
    xtx = torch.zeros(d, d)
    accumulate_upper(xtx, x, leaf)
    accumulate_upper(xtx, 2 * x, leaf)  # accumulates
    expected = 5 * x.double().t() @ x.double()
    torch.testing.assert_close(xtx.triu().double(), expected.triu(), rtol=1e-5, atol=1e-3)


def test_owl_profile_mean_equals_target():
    model = tiny_model("llama")
    report = oneshot(
        model, None, cfg(method="wanda", sparsity=0.6, profile="owl", owl_lambda=0.1), calib=calib(), progress=False
    )
    per_block = report.sparsity.per_block
    assert sum(per_block) / len(per_block) == pytest.approx(0.6, abs=1e-9)
    assert len(set(round(s, 6) for s in per_block)) > 1
    assert max(per_block) - min(per_block) == pytest.approx(0.2)  # the spread is 2 * lambda
    for name, s in report.sparsity.per_layer.items():
        block = int(name.split(".")[2])
        assert s == pytest.approx(per_block[block], abs=0.01)


def test_explicit_profile_and_ignore():
    model = tiny_model("llama")
    report = oneshot(
        model,
        None,
        cfg(method="magnitude", profile={r"mlp\.down_proj": 0.7}, ignore=[r"layers\.0\."], sparsity=0.4),
        progress=False,
    )
    per_layer = report.sparsity.per_layer  # measured over every block matrix, the ignored ones too
    assert all(s == 0 for n, s in per_layer.items() if ".layers.0." in n)
    assert report.sparsity.pruned > report.sparsity.overall  # block 0 is dense and counted
    assert per_layer["model.layers.1.mlp.down_proj"] == pytest.approx(0.7, abs=0.01)
    assert per_layer["model.layers.1.mlp.up_proj"] == pytest.approx(0.4, abs=0.01)
    assert (model.model.layers[0].mlp.up_proj.weight != 0).all()


def test_preserve_mask_keeps_earlier_zeros():
    model = tiny_model("llama")
    oneshot(model, None, cfg(method="sparsegpt", sparsity=0.3), calib=calib(), progress=False)
    before = {n: m.weight.detach() == 0 for n, m in linears(model).items()}
    oneshot(model, None, cfg(method="sparsegpt", sparsity=0.5, preserve_mask=True), calib=calib(), progress=False)
    for name, module in linears(model).items():
        assert (module.weight[before[name]] == 0).all(), name
        assert (module.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_self_generated_calibration_is_deterministic(tokenizer):
    model = tiny_model("llama")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = sample_from_model(model, tokenizer, 3, 12, seed=5, batch_size=2, progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    b = sample_from_model(model, tokenizer, 3, 12, seed=5, batch_size=2, progress=False)
    assert a.shape == (3, 12) and torch.equal(a, b)
    assert (a[:, 0] == tokenizer.bos_token_id).all()


def test_bf16_block_forwards_stay_close_to_float32():
    x = calib()
    results = {}
    for dtype in ("float32", "bfloat16"):
        model = tiny_model("llama")
        oneshot(model, None, cfg(method="sparsegpt", compute_dtype=dtype), calib=x, progress=False)
        results[dtype] = torch.cat([m.weight.flatten() for m in linears(model).values()])
    agree = ((results["float32"] == 0) == (results["bfloat16"] == 0)).float().mean().item()
    assert agree > 0.995  # a near-tie may flip in bf16; measured 0.998


@pytest.mark.parametrize("sequential", [False, True])
def test_solves_compute_in_float32_under_bf16_block_forwards(monkeypatch, sequential):
    """The sequential order solves inside the forwards: their bf16 autocast must not reach the
    solver, whose plain matrix products (SparseGPT's inverse, the refit) it would run in bf16."""
    from sparsefit.pruning.methods import BlockSolver

    states = []
    for method in ("solve_shared", "reconstruct"):
        real = getattr(BlockSolver, method)

        def spy(self, *args, _real=real):
            states.append(torch.is_autocast_enabled("cpu"))
            return _real(self, *args)

        monkeypatch.setattr(BlockSolver, method, spy)
    config = cfg(method="sparsegpt", compute_dtype="bfloat16", sequential=sequential, reconstruct_iters=2)
    oneshot(tiny_model("llama"), None, config, calib=calib(), progress=False)
    assert states and not any(states)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"sparsity": 1.5}, r"sparsity: must be at least 0.0 and below 1.0 \(got 1.5\)"),
        ({"sparsity": -0.1}, r"sparsity: must be at least 0.0 and below 1.0 \(got -0.1\)"),
        ({"structure": "2-4"}, "structure"),
        ({"method": "wanda", "calib": None}, "needs calibration data"),
        ({"method": "obc"}, "method"),
        ({"spasity": 0.5}, "spasity: unknown field"),
        ({"structure": "2:4", "profile": "owl"}, "N:M structure fixes"),
        ({"method": "magnitude", "reconstruct_iters": 5}, "reconstruct_iters needs calibration"),
        ({"reconstruct_iters": -1}, r"reconstruct_iters: must be from 0 to 10000 \(got -1\)"),
    ],
)
def test_bad_options_name_the_field(options, message):
    with pytest.raises(UsageError, match=message):
        validate(OneShotConfig, options, "prune options")


def test_targets_matching_nothing():
    with pytest.raises(UsageError, match="no prunable layer matches"):
        oneshot(tiny_model("llama"), None, cfg(method="magnitude", targets=["nothing_like_this"]), progress=False)


@pytest.mark.parametrize(
    "given, sequential, iters, damp",
    [
        ({}, True, 4, 0.03),
        ({"method": "wanda"}, True, 0, 0.03),
        ({"method": "magnitude"}, True, 0, 0.03),
        ({"preset": "paper"}, False, 0, 0.01),
        ({"preset": "paper", "method": "wanda"}, False, 0, 0.01),
        ({"preset": "paper", "reconstruct_iters": 2}, False, 2, 0.01),
        ({"preset": "paper", "damp": 0.05}, False, 0, 0.05),
        ({"sequential": False}, False, 4, 0.03),
        ({"damp": 0.02}, True, 4, 0.02),
        ({"method": "wanda", "reconstruct_iters": 3}, True, 3, 0.03),
    ],
)
def test_presets_fill_only_what_is_not_given(given, sequential, iters, damp):
    config = OneShotConfig(**given)
    assert (config.sequential, config.reconstruct_iters, config.damp) == (sequential, iters, damp)


def test_an_unknown_preset_names_the_field():
    with pytest.raises(UsageError, match="preset"):
        validate(OneShotConfig, {"preset": "fast"}, "prune options")


def test_nm_that_does_not_divide():
    with pytest.raises(UsageError, match="3:5"):
        oneshot(tiny_model("llama"), None, cfg(method="magnitude", structure="3:5"), progress=False)


@pytest.mark.parametrize("sequential", [False, True])
def test_cli_prune_writes_a_loadable_checkpoint(tiny_checkpoint, data_dir, tmp_path, capsys, sequential):
    out, js = tmp_path / "pruned", tmp_path / "prune.json"
    code = main(
        [
            "prune",
            *(
                ["--sequential", "--reconstruct-iters", "5", "--offload-dir", str(tmp_path / "off")]
                if sequential
                else ["--no-sequential", "--offload-dir", "none"]
            ),
            "--model",
            str(tiny_checkpoint),
            "--method",
            "wanda",
            "--sparsity",
            "0.5",
            "--calib",
            "gsm8k",
            "--num-samples",
            "4",
            "--seq-len",
            "32",
            "--output",
            str(out),
            "--json",
            str(js),
        ]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads(js.read_text())
    assert {"seconds", "peak_rss_mb", "method", "structure", "sparsity"} <= set(report)
    assert report["config"]["sequential"] == sequential and ("forward" in report["phases"]) == sequential
    assert ("reconstruct" in report["phases"]) == sequential and ("offload" in report["phases"]) == sequential
    assert report["process_peak_rss_mb"] >= report["peak_rss_mb"]
    assert report["sparsity"]["overall"] == pytest.approx(0.5, abs=0.01)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.model.layers[1].mlp.down_proj.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    meta = json.loads((out / "sparsity.json").read_text())
    assert meta["sparsity"]["overall"] == pytest.approx(0.5, abs=0.01) and meta["pruning"]["method"] == "wanda"
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))
    assert main(["eval", "--model", str(out), "--seq-len", "64", "--max-windows", "2"]) == 0


def test_cli_prune_nm_that_does_not_divide(tiny_checkpoint, tmp_path, capsys):
    code = main(
        [
            "prune",
            "--model",
            str(tiny_checkpoint),
            "--method",
            "magnitude",
            "--structure",
            "3:5",
            "--output",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "divisible by 5" in err and "Traceback" not in err


def test_cli_prune_usage_errors(tiny_checkpoint, tmp_path, capsys):
    code = main(["prune", "--model", str(tiny_checkpoint), "--sparsity", "1.5", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "sparsity" in err and err.count("\n") == 1
    code = main(["prune", "--model", str(tiny_checkpoint), "--method", "wanda", "--calib", "none", "--output", "o"])
    err = capsys.readouterr().err
    assert code == 2 and "needs calibration data" in err
    (tmp_path / "file").write_text("x")
    bad_dir = str(tmp_path / "file" / "off")
    code = main(["prune", "--model", str(tiny_checkpoint), "--offload-dir", bad_dir, "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "not writable" in err and "--offload-dir" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_save_is_atomic_on_failure(tmp_path, tokenizer):
    model = tiny_model("llama")
    target = tmp_path / "ckpt"

    class Boom(Exception):
        pass

    def failing_save(*a, **k):
        raise Boom

    model.save_pretrained = failing_save
    with pytest.raises(Boom):
        save_checkpoint(model, tokenizer, target)
    assert not target.exists() and not list(tmp_path.iterdir())


def test_cli_profile_file(tiny_checkpoint, tmp_path, capsys):
    profile = tmp_path / "profile.yaml"
    profile.write_text("'mlp\\.down_proj': 0.75\n'self_attn': 0.25\n")
    out, js = tmp_path / "p", tmp_path / "p.json"
    args = ["prune", "--model", str(tiny_checkpoint), "--method", "magnitude", "--profile", str(profile)]
    assert main([*args, "--output", str(out), "--json", str(js)]) == 0
    per_layer = json.loads(js.read_text())["sparsity"]["per_layer"]
    assert per_layer["model.layers.0.mlp.down_proj"] == pytest.approx(0.75, abs=0.01)
    assert per_layer["model.layers.0.self_attn.q_proj"] == pytest.approx(0.25, abs=0.01)
    assert per_layer["model.layers.0.mlp.up_proj"] == pytest.approx(0.5, abs=0.01)
    assert main([*args[:-1], str(tmp_path / "missing.yaml"), "--output", str(out)]) == 2
    assert "neither uniform, owl" in capsys.readouterr().err


def test_variable_length_calibration_batches():
    model = tiny_model("llama")
    batches = [calib(1, 20, seed=1), calib(2, 33, seed=2), calib(1, 7, seed=3)]
    report = oneshot(model, None, cfg(method="sparsegpt"), calib=batches, progress=False)
    assert report.calibration.sequences == 4 and report.calibration.tokens == 20 + 66 + 7
    assert report.sparsity.overall == pytest.approx(0.5, abs=0.005)


def test_magnitude_with_owl_profile():
    model = tiny_model("llama")
    report = oneshot(model, None, cfg(method="magnitude", sparsity=0.5, profile="owl"), calib=calib(), progress=False)
    assert sum(report.sparsity.per_block) / 3 == pytest.approx(0.5, abs=1e-9)
    assert "statistics" not in report.phases  # magnitude itself needs no block forwards


def first_block_with_inputs(batch_size):
    """Block 0 of a tiny Llama, its linears, their input groups and its captured calibration inputs."""
    model = tiny_model("llama")
    layout = decoder_layout(model)
    block = layout.blocks[0]
    inputs = capture_block_inputs(model, layout, calib(), batch_size, torch.device("cpu"))
    layers = select_linears(block, "b", None, None)
    return block, layers, layout.input_groups(layers, "b"), inputs


def test_sequential_error_in_a_solve_surfaces_and_leaves_no_hooks():
    block, layers, groups, inputs = first_block_with_inputs(batch_size=4)

    def solve(name):
        if name.endswith("o_proj"):
            raise ValueError("no solution for o_proj")

    with InputStats(layers, groups, sq_sum=True) as stats, pytest.raises(ValueError, match="o_proj"):
        BlockRunner(torch.device("cpu")).run_sequential(block, inputs, stats, solve)
    assert all(not m._forward_pre_hooks for m in layers.values())
    assert stats.scope is None


@pytest.mark.parametrize("offload", [False, True])
def test_sequential_stops_only_where_a_linear_has_a_new_input(tmp_path, monkeypatch, offload):
    """k/v share q's input and up shares gate's: they are pruned with it, so no stop has every
    batch holding q's or gate's output. Low-memory mode moves the inputs wider than the block's,
    the MLP intermediates, to files while their batches wait."""
    moved = []

    def record(tensor, directory):
        moved.append(tuple(tensor.shape))
        return offload_tensor_(tensor, directory)

    monkeypatch.setattr("sparsefit.pruning.pipeline.offload_tensor_", record)
    block, layers, groups, inputs = first_block_with_inputs(batch_size=2)  # 4 batches
    ran = {name: 0 for name in layers}
    handles = [m.register_forward_hook(lambda m, a, o, n=n: ran.__setitem__(n, ran[n] + 1)) for n, m in layers.items()]
    seen = {}  # name -> how many batches had run each linear when it was solved
    runner = BlockRunner(torch.device("cpu"), offload_dir=tmp_path if offload else None)
    with InputStats(layers, groups, sq_sum=True) as stats:
        runner.run_sequential(block, inputs, stats, lambda first: seen.__setitem__(first, dict(ran)))
    for h in handles:
        h.remove()
    assert list(seen) == ["b.self_attn.q_proj", "b.self_attn.o_proj", "b.mlp.gate_proj", "b.mlp.down_proj"]
    assert seen["b.self_attn.q_proj"]["b.self_attn.q_proj"] == 0 and seen["b.mlp.gate_proj"]["b.mlp.gate_proj"] == 0
    assert seen["b.self_attn.o_proj"]["b.self_attn.v_proj"] == 4 and seen["b.mlp.down_proj"]["b.mlp.up_proj"] == 4
    assert all(n == 4 for n in ran.values())
    hidden = inputs[0][0].shape
    assert moved == ([(*hidden[:-1], block.mlp.down_proj.in_features)] * 4 if offload else [])
    # Low-memory mode learned the block's resident peak, the ceiling for the next blocks.
    assert (runner.heap is not None and runner.heap.ceiling_mb is not None) == offload
    assert list(tmp_path.iterdir()) == []


def test_statistics_pass_stops_at_the_last_linear_with_the_same_statistics():
    block, layers, groups, inputs = first_block_with_inputs(batch_size=2)
    runs = []
    handle = block.mlp.down_proj.register_forward_hook(lambda *a: runs.append(1))
    with InputStats(layers, groups, sq_sum=True, hessian=True) as short:
        BlockRunner(torch.device("cpu")).run_statistics(block, inputs, short)
    assert len(runs) == 1  # only the first of 4 batches ran the down projection
    with InputStats(layers, groups, sq_sum=True, hessian=True) as full:
        BlockRunner(torch.device("cpu")).run(block, inputs, full.end_forward)
    handle.remove()
    for name in layers:
        assert torch.equal(short.sq_sum(name), full.sq_sum(name)), name
        assert torch.equal(short.hessian(name), full.hessian(name)), name


@pytest.mark.parametrize("sequential", [False, True])
def test_a_linear_that_never_runs_is_an_error(sequential):
    model = tiny_model("llama")
    model.model.layers[0].mlp.spare = torch.nn.Linear(64, 64)  # registered but never called
    with pytest.raises(UsageError, match="mlp.spare never runs"):
        oneshot(model, None, cfg(method="wanda", sequential=sequential), calib=calib(), progress=False)


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_linears_sharing_an_input_are_solved_together_as_if_alone(monkeypatch, sequential, structure):
    """q/k/v and gate/up go through one stacked SparseGPT solve and refit; the model equals one
    solved layer by layer."""
    from sparsefit.pruning.methods import BlockSolver

    x, config = calib(), cfg(method="sparsegpt", structure=structure, sequential=sequential, reconstruct_iters=3)
    stacked, alone = tiny_model("llama"), tiny_model("llama")
    groups = []  # the stacked calls (every linear goes through solve_shared, most alone)
    real = BlockSolver.solve_shared
    monkeypatch.setattr(
        BlockSolver,
        "solve_shared",
        lambda self, names, ws, *a: (len(ws) > 1 and groups.append((names[0], len(ws)))) or real(self, names, ws, *a),
    )
    oneshot(stacked, None, config, calib=x, progress=False)
    blocks = len(decoder_layout(stacked).blocks)
    expected = [
        (f"model.layers.{i}.{n}", k) for i in range(blocks) for n, k in (("self_attn.q_proj", 3), ("mlp.gate_proj", 2))
    ]
    assert groups == expected
    monkeypatch.setattr(
        BlockSolver, "solve_shared", lambda self, names, ws, s, p: [self.solve(*a) for a in zip(names, ws, s, p)]
    )
    oneshot(alone, None, config, calib=x, progress=False)
    for (name, a), b in zip(linears(stacked).items(), linears(alone).values()):
        assert torch.equal(a.weight != 0, b.weight != 0), name
        assert torch.allclose(a.weight, b.weight, atol=1e-5), name


def unreachable(spec, split="test", text_field="text"):
    raise UsageError(
        f"dataset '{spec}' split '{split}' not found: not in SPARSEFIT_DATA_DIR (unset), and the hub failed"
    )


def test_default_calibration_out_of_reach_falls_back_to_self(tokenizer, monkeypatch, capsys):
    monkeypatch.setattr("sparsefit.data.sources.load_texts", unreachable)
    config = OneShotConfig(method="wanda", num_samples=2, seq_len=16, compute_dtype="float32")
    report = oneshot(tiny_model("llama"), tokenizer, config, progress=False)
    assert report.calibration.source == "self" and report.calibration.tokens == 32
    assert "notice: the default calibration data (gsm8k) is out of reach" in capsys.readouterr().err
    assert report.sparsity.overall == pytest.approx(0.5, abs=0.005)


def test_a_named_calibration_out_of_reach_is_an_error_with_the_fix(tokenizer, monkeypatch):
    monkeypatch.setattr("sparsefit.data.sources.load_texts", unreachable)
    config = OneShotConfig(method="wanda", calib="gsm8k", num_samples=2, seq_len=16)
    with pytest.raises(UsageError, match=r"not found.*or calibrate on text the model writes: --calib self"):
        oneshot(tiny_model("llama"), tokenizer, config, progress=False)


def test_self_mix_appends_sampled_sequences_to_the_dataset_draw(tokenizer, tmp_path):
    texts = tmp_path / "calib.txt"
    texts.write_text("\n\n".join(f"line {i} of a calibration text about pruning and sums" for i in range(40)))
    model = tiny_model("llama")
    plain = OneShotConfig(method="wanda", calib=str(texts), num_samples=3, seq_len=12, seed=5)
    mixed = plain.model_copy(update={"self_mix": 2})
    base, source = calibration_batch(model, tokenizer, plain, progress=False)
    ids, mixed_source = calibration_batch(model, tokenizer, mixed, progress=False)
    assert source == str(texts) and mixed_source == f"{texts}+self"
    assert ids.shape == (5, 12) and torch.equal(ids[:3], base)  # the dataset's draw, unchanged
    assert torch.equal(ids[3:], sample_from_model(model, tokenizer, 2, 12, seed=5, progress=False))
    report = oneshot(model, tokenizer, mixed.model_copy(update={"compute_dtype": "float32"}), progress=False)
    assert report.calibration.source == f"{texts}+self" and report.calibration.tokens == 5 * 12


@pytest.mark.parametrize("calib", ["self", None])
def test_self_mix_needs_a_calibration_dataset(calib):
    with pytest.raises(ValidationError, match="self_mix adds sampled text to a calibration dataset"):
        OneShotConfig(method="wanda" if calib else "magnitude", calib=calib, self_mix=4)


def test_self_mix_is_a_prune_flag(tmp_path, capsys):
    code = main(["prune", "--model", "x", "--output", str(tmp_path / "o"), "--calib", "self", "--self-mix", "4"])
    assert code == 2 and "--self-mix" in capsys.readouterr().err


def test_low_memory_mode_is_the_default_with_a_temp_directory_on_disk(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where tempfile.mkdtemp creates folders
    monkeypatch.setattr(sys.modules["sparsefit.pruning.oneshot"], "on_ram_filesystem", lambda path: False)
    x = calib()
    plain, pruned = tiny_model("llama"), tiny_model("llama")
    kept = oneshot(plain, None, cfg(method="sparsegpt", offload_dir="none"), calib=x, progress=False)
    report = oneshot(pruned, None, cfg(method="sparsegpt"), calib=x, progress=False)
    assert report.config.offload_dir == "auto" and report.low_memory and "offload" in report.phases
    assert not kept.low_memory and "offload" not in kept.phases
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone
    for a, b in zip(linears(plain).values(), linears(pruned).values()):
        assert torch.equal(a.weight, b.weight)  # the same model either way


def test_on_ram_filesystem_reads_the_longest_mount_of_the_path():
    mounts = "/dev/vda / ext4 rw 0 0\ntmpfs /tmp tmpfs rw 0 0\n/dev/vdb /tmp/disk\\040x ext4 rw 0 0\n"
    assert on_ram_filesystem("/tmp/a", mounts) and on_ram_filesystem("/tmp", mounts)
    assert not on_ram_filesystem("/tmp/disk x/a", mounts) and not on_ram_filesystem("/tmpx", mounts)
    assert not on_ram_filesystem("/work", mounts)


@pytest.mark.parametrize("available, engaged", [(10**12, False), (10**4, True)])
def test_low_memory_mode_engages_when_memory_would_not_suffice(monkeypatch, capsys, available, engaged):
    """With the temp directory in RAM, `auto` offloads only when memory would not suffice otherwise."""
    monkeypatch.setattr(sys.modules["sparsefit.pruning.oneshot"], "available_memory_bytes", lambda: available)
    monkeypatch.setattr(sys.modules["sparsefit.pruning.oneshot"], "on_ram_filesystem", lambda path: True)
    x = calib()
    plain, pruned = tiny_model("llama"), tiny_model("llama")
    oneshot(plain, None, cfg(method="sparsegpt", offload_dir=None), calib=x, progress=False)
    report = oneshot(pruned, None, cfg(method="sparsegpt"), calib=x, progress=False)
    err = capsys.readouterr().err
    assert report.low_memory == engaged and ("offload" in report.phases) == engaged
    assert ("notice: pruning needs about" in err) == engaged
    for a, b in zip(linears(plain).values(), linears(pruned).values()):
        assert torch.equal(a.weight, b.weight)  # the same model either way


def test_kernels_limited_to_avx2_count_as_no_native_bf16(monkeypatch):
    # ATEN_CPU_CAPABILITY=avx2 on an AVX512-BF16 CPU: bf16 would be emulated, so auto computes float32.
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not cpu_has_bf16()
    assert not use_bf16("auto", torch.device("cpu"))


def test_a_block_with_nothing_selected_still_feeds_the_next():
    """--ignore of a whole block: the next block is calibrated on that (dense) block's outputs."""
    x = calib()
    model, dense = tiny_model("llama"), tiny_model("llama")
    oneshot(model, None, cfg(method="wanda", ignore=[r"layers\.0\."]), calib=x, progress=False)
    q1 = dense.model.layers[1].self_attn.q_proj
    with InputStats({"q": q1}, sq_sum=True) as stats, torch.no_grad():
        dense(x)
    expected, _ = prune_wanda(q1.weight, stats.sq_sum("q"), 0.5)
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight, expected)


def test_each_group_frees_its_statistics_once_solved(monkeypatch):
    """A block's Hessians (and inverses) do not pile up: when a group is solved, none of the groups
    solved before it holds its statistics any longer, and a late input for a freed group is an error."""
    from sparsefit.pruning import methods
    from sparsefit.pruning.stats import InputStats

    seen = []
    original = methods.BlockSolver.solve_shared

    def spy(self, names, *args):
        held = set(self.stats._hessians) | set(self.stats.xtx)
        seen.append((self.stats.root(names[0]), held, set(self.stats.root(n) for n in self._hinv)))
        return original(self, names, *args)

    monkeypatch.setattr(methods.BlockSolver, "solve_shared", spy)
    model = tiny_model("mixtral")
    oneshot(model, None, cfg(method="sparsegpt", sequential=True), calib=calib(), progress=False)
    assert len(seen) > 8
    solved = set()
    for root, held, inverses in seen:
        assert not held & solved and not inverses & solved, root
        solved.add(root)
    stats = InputStats({"a": torch.nn.Linear(4, 4)}, hessian=True)
    stats._accumulate("a", torch.randn(3, 4))
    stats.release("a")
    with pytest.raises(RuntimeError, match="released"):
        stats._accumulate("a", torch.randn(3, 4))

"""The fine-tuning loop on a tiny Llama: masks, distillation, resume, GMP, NaN handling, errors."""

import json

import pytest
import torch

from sparsefit.errors import SparsefitError, UsageError
from sparsefit.pruning import OneShotConfig, oneshot
from sparsefit.training import FinetuneConfig, GMPConfig, SparsityMasks, finetune
from sparsefit.training.loop import LOG_FILE, METRICS_FILE
from sparsefit.training.schedules import gmp_plan
from tests.conftest import tiny_model

BASE = dict(dataset="gsm8k", format="plain", seq_len=64, batch_size=2, lr=5e-3, bf16="false", seed=3)


def sparse_tiny(tokenizer, sparsity=0.5, arch="llama"):
    model = tiny_model(arch)
    oneshot(model, tokenizer, OneShotConfig(method="magnitude", sparsity=sparsity, calib=None), progress=False)
    return model


def losses(path):
    return [json.loads(line)["loss"] for line in (path / LOG_FILE).read_text().splitlines()]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
def test_sparse_finetune_keeps_every_pruned_weight_at_zero(arch, tokenizer, data_dir, tmp_path):
    model = sparse_tiny(tokenizer, arch=arch)
    before = SparsityMasks.from_zeros(model)
    weights = {n: m.weight.detach().clone() for n, m, _ in before.items()}
    cfg = FinetuneConfig(**BASE, max_steps=4, weight_decay=0.1)
    metrics = finetune(model, tokenizer, cfg, tmp_path / "out", progress=False)
    assert metrics["masks"] and metrics["revived_weights"] == 0
    after = SparsityMasks.from_zeros(model)
    for name, module, keep in before.items():
        assert (module.weight[~keep] == 0).all()
        assert torch.equal(after.masks[name], keep)  # no trained weight landed on exactly 0 either
    assert any(not torch.equal(m.weight, weights[n]) for n, m, _ in before.items())  # it did train
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / METRICS_FILE).is_file()


def test_dense_model_trains_without_masks(tokenizer, data_dir, tmp_path):
    model = tiny_model("llama")
    metrics = finetune(model, tokenizer, FinetuneConfig(**BASE, max_steps=6), tmp_path / "d", progress=False)
    assert not metrics["masks"] and metrics["sparsity"] == 0.0
    trajectory = losses(tmp_path / "d")
    assert len(trajectory) == 6 and trajectory[-1] < trajectory[0]


def test_resume_reproduces_the_uninterrupted_trajectory(tokenizer, data_dir, tmp_path):
    cfg = FinetuneConfig(**BASE, max_steps=6, checkpoint_every=3, weight_decay=0.01)
    full = finetune(sparse_tiny(tokenizer), tokenizer, cfg, tmp_path / "full", progress=False)

    # first half: the same run stopped after step 3 (its checkpoint is what a killed run leaves)
    half = cfg.model_copy(update={"max_steps": 6})
    model = sparse_tiny(tokenizer)
    with pytest.raises(KeyboardInterrupt):
        _interrupt_after(model, tokenizer, half, tmp_path / "resumed", steps=4)
    assert (tmp_path / "resumed" / "checkpoints" / "step-00000003" / "trainer_state.json").is_file()
    with pytest.raises(UsageError, match=r"initial_sparsity \(0.5 -> 0.3"):  # another starting model
        finetune(sparse_tiny(tokenizer, 0.3), tokenizer, cfg, tmp_path / "resumed", resume=True, progress=False)
    resumed = finetune(sparse_tiny(tokenizer), tokenizer, cfg, tmp_path / "resumed", resume=True, progress=False)
    assert resumed["resumed_from"] == 3
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)
    assert resumed["tokens"] == full["tokens"] and resumed["revived_weights"] == 0
    assert not (tmp_path / "resumed" / "checkpoints").exists()  # removed once the run completed


def _interrupt_after(model, tokenizer, cfg, out, steps):
    """Run `finetune` and raise KeyboardInterrupt inside step `steps` (like Ctrl-C / a kill)."""
    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == steps:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    torch.optim.AdamW.step = step
    try:
        finetune(model, tokenizer, cfg, out, progress=False)
    finally:
        torch.optim.AdamW.step = original


def test_gmp_reaches_planned_sparsities_on_planned_steps(tokenizer, data_dir, tmp_path):
    gmp = GMPConfig(initial=0.1, final=0.6, start=1, end=7, every=3)
    cfg = FinetuneConfig(**BASE, max_steps=9, gmp=gmp)
    metrics = finetune(tiny_model("llama"), tokenizer, cfg, tmp_path / "g", progress=False)
    plan = gmp_plan(0.1, 0.6, 1, 7, 3)
    log = {r["step"]: r["sparsity"] for r in map(json.loads, (tmp_path / "g" / LOG_FILE).read_text().splitlines())}
    assert log[0] == 0.0
    current = 0.0
    for step in range(9):
        current = plan.get(step, current)
        assert log[step] == pytest.approx(current, abs=2e-3), step
    assert metrics["sparsity"] == pytest.approx(0.6, abs=2e-3) and metrics["revived_weights"] == 0


def test_distillation_from_identical_teacher_has_zero_kl_and_square_head(tokenizer, data_dir, tmp_path):
    student = tiny_model("llama")
    teacher = tiny_model("llama")
    cfg = FinetuneConfig(**BASE, max_steps=1, teacher="given", kl_weight=1.0, square_head_weight=1.0, temperature=2.0)
    finetune(student, tokenizer, cfg, tmp_path / "kd", teacher=teacher, progress=False)
    first = json.loads((tmp_path / "kd" / LOG_FILE).read_text().splitlines()[0])
    assert first["kl"] == pytest.approx(0.0, abs=1e-6) and first["square_head"] == pytest.approx(0.0, abs=1e-6)
    # a pruned student differs from its dense teacher
    student = sparse_tiny(tokenizer)
    finetune(student, tokenizer, cfg, tmp_path / "kd2", teacher=tiny_model("llama"), progress=False)
    first = json.loads((tmp_path / "kd2" / LOG_FILE).read_text().splitlines()[0])
    assert first["kl"] > 0 and first["square_head"] > 0
    assert first["loss"] == pytest.approx(first["ce"] + first["kl"] + first["square_head"], rel=1e-4)


def test_teacher_with_other_vocabulary_is_rejected(tokenizer, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    teacher = AutoModelForCausalLM.from_config(tiny_config("llama", vocab=300))
    cfg = FinetuneConfig(**BASE, max_steps=1, teacher="given", kl_weight=1.0)
    with pytest.raises(UsageError, match="vocabulary"):
        finetune(tiny_model("llama"), tokenizer, cfg, tmp_path / "x", teacher=teacher, progress=False)


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tokenizer, data_dir, tmp_path):
    cfg = FinetuneConfig(**BASE, max_steps=6, checkpoint_every=2)
    model = sparse_tiny(tokenizer)
    calls = {"n": 0}

    def poison(module, args, output):  # from the 4th training forward (step 3) on, the model emits NaN
        calls["n"] += torch.is_grad_enabled()
        return output * float("nan") if calls["n"] >= 4 else output

    model.model.norm.register_forward_hook(poison)
    with pytest.raises(SparsefitError, match=r"loss became nan at step 3.*last good checkpoint"):
        finetune(model, tokenizer, cfg, tmp_path / "n", progress=False)
    assert [p.name for p in (tmp_path / "n" / "checkpoints").iterdir()] == ["step-00000002"]
    state = json.loads((tmp_path / "n" / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["trainer"]["step"] == 2


def test_non_finite_gradient_stops_before_the_optimizer_step(tokenizer, data_dir, tmp_path):
    cfg = FinetuneConfig(**BASE, max_steps=6)
    model = sparse_tiny(tokenizer)
    weight = model.model.layers[0].mlp.down_proj.weight
    calls = {"n": 0}

    def poison(grad):  # a finite loss whose gradient overflows from step 2 on
        calls["n"] += 1
        return grad * float("inf") if calls["n"] >= 3 else grad

    weight.register_hook(poison)
    with pytest.raises(SparsefitError, match=r"gradient norm became (inf|nan) at step 2.*lower --lr"):
        finetune(model, tokenizer, cfg, tmp_path / "g", progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_options_are_reported_by_field():
    from sparsefit.config import validate

    with pytest.raises(UsageError, match="kl_weight / square_head_weight need a teacher"):
        validate(FinetuneConfig, {"kl_weight": 1.0}, "finetune options")
    with pytest.raises(UsageError, match="only one of max_steps"):
        validate(FinetuneConfig, {"max_steps": 3, "num_epochs": 1}, "finetune options")
    with pytest.raises(UsageError, match="lr"):
        validate(FinetuneConfig, {"lr": -1}, "finetune options")
    with pytest.raises(UsageError, match="gmp"):
        validate(FinetuneConfig, {"gmp": {"start": 5, "end": 2}}, "finetune options")
    with pytest.raises(UsageError, match="teacher is given but every distillation weight is 0"):
        validate(FinetuneConfig, {"teacher": "dense", "kl_weight": 0.0}, "finetune options")
    with pytest.raises(UsageError, match="self_mix adds sampled text to another dataset"):
        validate(FinetuneConfig, {"dataset": "self", "self_mix": 8}, "finetune options")
    # a teacher alone is never ignored: it distills the logits
    assert validate(FinetuneConfig, {"teacher": "dense"}, "finetune options").kl_weight == 1.0
    assert validate(FinetuneConfig, {"teacher": "d", "square_head_weight": 2.0}, "").kl_weight == 0.0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "opt", "gpt2"])
def test_head_path_gives_the_same_losses_as_full_logits(arch, tokenizer, data_dir):
    from sparsefit.training.data import collate, load_examples
    from sparsefit.training.losses import HeadPath, compute_losses

    student, teacher = sparse_tiny(tokenizer, arch=arch), tiny_model(arch)
    batch = collate(load_examples(tokenizer, "gsm8k", fmt="plain", seq_len=64)[:3], tokenizer.pad_token_id)
    cfg = FinetuneConfig(teacher="given", kl_weight=1.0, square_head_weight=1.0, temperature=2.0)
    layers = [0, 1]
    detected = HeadPath.detect(student, batch)
    full = compute_losses(student, teacher, batch, cfg, layers, HeadPath(False), HeadPath(False))
    fast = compute_losses(student, teacher, batch, cfg, layers, detected, HeadPath.detect(teacher, batch))
    if arch in ("llama", "qwen2", "mistral", "gpt2"):
        assert detected.enabled
    for key in full:
        assert fast[key].item() == pytest.approx(full[key].item(), rel=1e-4, abs=1e-6), key


def test_dataset_self_trains_on_text_given_instead_of_sampling(tokenizer, tmp_path, monkeypatch):
    import sparsefit.data.self_generated as self_generated

    monkeypatch.setattr(self_generated, "sample_from_model", lambda *a, **k: pytest.fail("sampled again"))
    ids = torch.randint(5, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = FinetuneConfig(dataset="self", self_samples=4, seq_len=16, max_steps=2, batch_size=2, bf16="false")
    metrics = finetune(tiny_model("llama"), tokenizer, cfg, tmp_path / "a", progress=False, self_text=ids)
    assert metrics["tokens"] == 2 * 2 * 16
    with pytest.raises(ValueError, match=r"self_text is \(3, 16\); this run trains on 4 sampled rows"):
        finetune(tiny_model("llama"), tokenizer, cfg, tmp_path / "b", progress=False, self_text=ids[:3])


def test_self_mix_adds_sampled_rows_to_the_dataset(tokenizer, tmp_path):
    from sparsefit.training.data import load_examples

    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Q{i}:", "completion": " the answer"}) for i in range(4)))
    rows = load_examples(tokenizer, str(path), fmt="plain", seq_len=16)
    ids = torch.randint(5, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    cfg = FinetuneConfig(
        dataset=str(path), format="plain", self_mix=4, seq_len=16, num_epochs=1, batch_size=2, bf16="false"
    )
    metrics = finetune(tiny_model("llama"), tokenizer, cfg, tmp_path / "a", progress=False, self_text=ids)
    # one epoch over the 4 rows and the 4 sampled sequences: every token once
    assert metrics["steps"] == 4
    assert metrics["tokens"] == sum(len(e.input_ids) for e in rows) + ids.numel()
    with pytest.raises(ValueError, match="at most seq_len 16"):
        long = torch.randint(5, 100, (4, 17))
        finetune(tiny_model("llama"), tokenizer, cfg, tmp_path / "b", progress=False, self_text=long)
    # not given: sampled from the model, seq_len tokens each
    sampled = finetune(tiny_model("llama"), tokenizer, cfg, tmp_path / "c", progress=False)
    assert sampled["tokens"] == sum(len(e.input_ids) for e in rows) + 4 * 16

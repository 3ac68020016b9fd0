import pytest

from sparsefit.errors import UsageError
from sparsefit.recipes import builtin_recipes, load_recipe, recipe_from_data
from sparsefit.recipes.schema import FinetuneStage, OneshotStage


def test_builtin_recipes_exist_and_validate():
    assert {"quick", "gsm8k-50", "2of4"} <= set(builtin_recipes())
    for name in builtin_recipes():
        recipe = load_recipe(name)
        assert recipe.stages and recipe.model == "smollm2-135m"
    two_four = next(s for s in load_recipe("2of4").stages if isinstance(s, OneshotStage))
    assert two_four.structure == "2:4"
    sparse_ft = next(s for s in load_recipe("gsm8k-50").stages if s.name == "sparse-ft")
    assert sparse_ft.teacher == "stage:dense-ft" and sparse_ft.square_head_weight == 10.0
    assert (sparse_ft.lr, sparse_ft.kl_weight, sparse_ft.batch_size) == (2e-4, 3.0, 4)  # the measured settings
    for name in ["2of4", "gsm8k-50-w4a16"]:  # the same fine-tuning as gsm8k-50
        stages = {s.name: s for s in load_recipe(name).stages if isinstance(s, FinetuneStage)}
        ours = {s.name: s for s in load_recipe("gsm8k-50").stages if isinstance(s, FinetuneStage)}
        assert stages.keys() == ours.keys() and all(stages[k] == ours[k] for k in ours), name


def test_adaptive_sparse_training_is_a_finetune_field():
    recipe = recipe_from_data(_stages({"kind": "finetune", "method": "ast", "ast": {"slorb": True, "mask_every": 5}}))
    stage = recipe.stages[0]
    assert stage.method == "ast" and stage.ast.slorb and stage.ast.mask_every == 5 and stage.ast.slorb_k == 16


def test_adapters_are_finetune_fields():
    stage = recipe_from_data(
        _stages({"kind": "finetune", "peft": "rows", "adapter": {"rank": 4, "criterion": "taylor"}})
    )
    stage = stage.stages[0]
    assert stage.peft == "rows" and stage.adapter.rank == 4 and stage.adapter.criterion == "taylor"


def test_variables_and_overrides():
    recipe = load_recipe("gsm8k-50", ["sparsity=0.7", "sparse-ft.max_tokens=1000", "2.lr=3e-5"])
    pruning = next(s for s in recipe.stages if isinstance(s, OneshotStage))
    assert pruning.sparsity == 0.7
    sparse_ft = next(s for s in recipe.stages if s.name == "sparse-ft")
    assert sparse_ft.max_tokens == 1000
    assert isinstance(recipe.stages[1], FinetuneStage) and recipe.stages[1].lr == 3e-5


def _stages(*stages):
    return {"model": "m", "stages": list(stages)}


@pytest.mark.parametrize(
    "data, message",
    [
        (_stages({"kind": "prune", "sparsity": 0.5}), "stage 1 (prune): unknown stage kind 'prune'"),
        (_stages({"kind": "oneshot", "sparsty": 0.5}), "stage 1 (oneshot) field 'sparsty': unknown field"),
        (_stages({"kind": "oneshot", "sparsity": 1.5}), "stage 1 (oneshot) field 'sparsity'"),
        (_stages({"kind": "oneshot", "structure": "2-4"}), "field 'structure': structure '2-4' is malformed"),
        (_stages({"kind": "evaluate"}, {"kind": "finetune", "square_head_weight": 1.0}), "stage 2 (finetune)"),
        (_stages({"kind": "finetune", "kl_weight": 1.0}), "need a teacher"),
        (_stages({"kind": "finetune", "max_steps": "many"}), "field 'max_steps'"),
        (_stages({"kind": "finetune", "teacher": "stage:later", "kl_weight": 1}), "names no earlier stage"),
        (_stages({"kind": "oneshot", "sparsity": "${s}"}), "variable '${s}' is not defined"),
        ({"model": "m", "stages": []}, "stages"),
        (_stages({"kind": "finetune", "method": "ast", "ast": {"mask_evry": 5}}), "field 'ast.mask_evry': unknown"),
        (_stages({"kind": "finetune", "method": "ast", "ast": {"structure": "0.5"}}), "field 'ast.structure'"),
        (_stages({"kind": "finetune", "peft": "rows", "adapter": {"criterion": "wanda"}}), "field 'adapter.criterion'"),
    ],
)
def test_bad_recipes_fail_fast_naming_stage_and_field(data, message):
    with pytest.raises(UsageError, match=None) as err:
        recipe_from_data(data)
    assert message in str(err.value), str(err.value)


def test_unknown_override_is_a_usage_error():
    with pytest.raises(UsageError, match="no variable 'sparsityy'"):
        load_recipe("gsm8k-50", ["sparsityy=0.6"])
    with pytest.raises(UsageError, match="no stage 'nope'"):
        load_recipe("gsm8k-50", ["nope.lr=1"])
    with pytest.raises(UsageError, match="neither a builtin"):
        load_recipe("no-such-recipe")


def test_every_builtin_fine_tune_checkpoints_so_a_killed_run_resumes_it():
    from sparsefit.recipes import builtin_recipes, load_recipe

    for name in builtin_recipes():
        stages = [s for s in load_recipe(name).stages if s.kind == "finetune"]
        assert stages and all(s.checkpoint_every > 0 for s in stages), name


def test_report_to_reaches_every_finetune_stage_that_names_none():
    data = {**_stages({"kind": "finetune"}, {"kind": "finetune", "report_to": "mlflow"}), "report_to": "tensorboard"}
    first, second = recipe_from_data(data).stages
    assert (first.report_to, second.report_to) == ("tensorboard", "mlflow")  # a stage's own key wins
    flagged = recipe_from_data(data).with_tracker("wandb")  # `sparsefit run --report-to` wins over both
    assert [s.report_to for s in flagged.stages] == ["wandb", "wandb"]
    assert [s.report_to for s in recipe_from_data(_stages({"kind": "finetune"})).stages] == ["none"]
    with pytest.raises(UsageError, match="report_to"):
        recipe_from_data({**_stages({"kind": "finetune"}), "report_to": "comet"})

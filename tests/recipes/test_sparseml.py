"""The seed guide's SparseML recipes map onto sparsefit stages with the same parameters."""

import yaml

from sparsefit.recipes import recipe_from_data
from sparsefit.recipes.schema import FinetuneStage, OneshotStage

PRUNING = r"""
pruning_stage:
  obcq_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      sequential_update: true
      mask_structure: "0:0"
      targets: ['re:model.layers.\d*$']
"""

OWL = r"""
pruning_stage:
  obcq_modifiers:
    SparseGPTModifier:
      sparsity: 0.7
      sparsity_profile: owl
      owl_m: 5
      owl_lmbda: 0.08
      block_size: 128
      percdamp: 0.01
      mask_structure: "0:0"
      targets: ["re:model.layers.\\d+$"]
"""

FINETUNE = r"""
test_stage:
  pruning_modifiers:
    ConstantPruningModifier:
      targets: [
        're:.*q_proj.weight', 're:.*k_proj.weight', 're:.*v_proj.weight', 're:.*o_proj.weight',
        're:.*gate_proj.weight', 're:.*up_proj.weight', 're:.*down_proj.weight'
      ]
      start: 0
  distillation_modifiers:
    OutputDistillationModifier:
      targets: ['re:model.layers.\d+$']
      comparison: "square_head"
      start: 0
      orig_scale: 1.0
      distill_scale: 1.0
"""


def test_sparsegpt_pruning_stage():
    recipe = recipe_from_data(yaml.safe_load(PRUNING))
    (stage,) = recipe.stages
    assert isinstance(stage, OneshotStage)
    assert (stage.method, stage.sparsity, stage.structure, stage.profile) == (
        "sparsegpt",
        0.5,
        "unstructured",
        "uniform",
    )
    assert stage.targets is None  # every decoder layer = sparsefit's default targets
    assert any("sequential_update" in n for n in recipe.notes)


def test_owl_variant():
    (stage,) = recipe_from_data(yaml.safe_load(OWL)).stages
    assert (stage.profile, stage.owl_m, stage.owl_lambda, stage.block_size, stage.damp) == ("owl", 5, 0.08, 128, 0.01)
    assert stage.sparsity == 0.7


def test_constant_pruning_with_square_head_distillation():
    recipe = recipe_from_data(yaml.safe_load(FINETUNE))
    (stage,) = recipe.stages
    assert isinstance(stage, FinetuneStage)
    assert stage.masks == "zeros" and stage.teacher == "input"
    assert stage.square_head_weight == 1.0 and stage.ce_weight == 1.0 and stage.kl_weight == 0.0
    assert stage.targets == [".*q_proj", ".*k_proj", ".*v_proj", ".*o_proj", ".*gate_proj", ".*up_proj", ".*down_proj"]
    assert any("teacher" in n for n in recipe.notes)


def test_whole_guide_recipe_and_unmapped_fields_are_reported():
    data = {**yaml.safe_load(PRUNING), **yaml.safe_load(FINETUNE)}
    data["pruning_stage"]["obcq_modifiers"]["SparseGPTModifier"]["weird_knob"] = 3
    data["quant_stage"] = {"quantization_modifiers": {"GPTQModifier": {"scheme": "W8A8"}}}
    recipe = recipe_from_data(data)
    assert [s.kind for s in recipe.stages] == ["oneshot", "finetune"]
    assert any("weird_knob" in n for n in recipe.notes)
    assert any("GPTQModifier" in n and "not run" in n for n in recipe.notes)

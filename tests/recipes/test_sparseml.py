"""The seed guide's SparseML recipes map onto sparsefit stages with the same parameters."""

import pytest
import yaml

from sparsefit.errors import UsageError
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
    data["quant_stage"] = {"quantization_modifiers": {"GPTQModifier": {"scheme": "W8A8"}, "SmoothQuantModifier": {}}}
    recipe = recipe_from_data(data)
    assert [s.kind for s in recipe.stages] == ["oneshot", "finetune", "quantize"]
    assert recipe.stages[2].scheme == "w8a8-int8" and recipe.stages[2].method == "gptq"
    assert any("weird_knob" in n for n in recipe.notes)
    assert any("SmoothQuantModifier" in n and "not run" in n for n in recipe.notes)


GPTQ_GROUPS = """
quant_stage:
  quant_modifiers:
    GPTQModifier:
      sequential_update: true
      dampening_frac: 0.05
      ignore: [lm_head]
      actorder: static
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 64}
"""


def test_gptq_with_config_groups_maps_to_a_quantize_stage():
    recipe = recipe_from_data(yaml.safe_load(GPTQ_GROUPS))
    (stage,) = recipe.stages
    assert (stage.kind, stage.method, stage.scheme, stage.group_size, stage.damp) == (
        "quantize",
        "gptq",
        "w4a16",
        64,
        0.05,
    )
    assert stage.targets is None and stage.ignore == []
    assert any("actorder" in n for n in recipe.notes)


@pytest.mark.parametrize("scheme, expected", [("W4A16", "w4a16"), ("FP8_DYNAMIC", "w8a8-fp8"), ("int8", "w8a8-int8")])
def test_quantization_modifier_presets_map_to_rtn(scheme, expected):
    data = {"quant_stage": {"quant_modifiers": {"QuantizationModifier": {"scheme": scheme, "targets": "Linear"}}}}
    (stage,) = recipe_from_data(data).stages
    assert (stage.method, stage.scheme) == ("rtn", expected)


def test_unknown_quantization_scheme_is_a_usage_error():
    data = {"quant_stage": {"quant_modifiers": {"GPTQModifier": {"scheme": "W2A2"}}}}
    with pytest.raises(UsageError, match="scheme 'W2A2'"):
        recipe_from_data(data)

"""The project's models against reference implementations, through the importer.

Deformable DETR: transformers' DeformableDetrForObjectDetection at a small config with random
weights, saved with save_pretrained, imported, run on the same image: logits and boxes must agree
to 1e-4. DINO (not in transformers) and the original Deformable-DETR `.pth` layout: every parameter
name of the official model (tests/fixtures/*_official_params.json, see tests/official_params.py) must
map onto the project model with its shape.
"""
import json
import os

import pytest
import safetensors.torch
import torch

from clock_deploy.convert import deformable, dino
from clock_deploy.convert.importer import Imported, build_imported_model, import_checkpoint
from clock_deploy.errors import UserError
from official_params import DINO_4SCALE_R50, FIXTURES, dino_params, fixture

transformers = pytest.importorskip("transformers")

FIXTURE_DIR = os.path.join(os.path.dirname(__file__), "fixtures")


def max_diffs(hf_model, project_model, image):
    with torch.no_grad():
        ref, own = hf_model(pixel_values=image), project_model(image)
    return ((ref.logits - own.pred_logits).abs().max().item(), (ref.pred_boxes - own.pred_boxes).abs().max().item())


@pytest.mark.parametrize("num_labels", [1, 3])
@pytest.mark.parametrize("box_refine,two_stage", [(False, False), (True, False), (True, True)],
                         ids=["plain", "box_refine", "two_stage"])
def test_deformable_detr_matches_transformers(tmp_path, num_labels, box_refine, two_stage, make_hf_deformable):
    hf_model = make_hf_deformable(tmp_path, num_labels, box_refine, two_stage)
    imported = import_checkpoint(tmp_path)
    cfg, model = build_imported_model(imported, str(tmp_path))
    assert (cfg.model.box_refine, cfg.model.two_stage, cfg.model.num_classes) == (box_refine, two_stage, num_labels)
    image = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    logits_diff, boxes_diff = max_diffs(hf_model, model, image)
    assert logits_diff <= 1e-4 and boxes_diff <= 1e-4, (logits_diff, boxes_diff)


def test_two_stage_ranking_rule_is_what_makes_three_classes_match(tmp_path, make_hf_deformable):
    """DINO's max-over-classes ranking selects other proposals than Deformable DETR's class 0."""
    hf_model = make_hf_deformable(tmp_path, 3, True, True)
    imported = import_checkpoint(tmp_path)
    imported.overrides["proposal_rank"] = "max_class"
    _, model = build_imported_model(imported, str(tmp_path))
    logits_diff, _ = max_diffs(hf_model, model, torch.randn(1, 3, 64, 96))
    assert logits_diff > 1e-2


def official_state(name):
    """Zero tensors under every official name and shape of fixture `name` (aliases are equal)."""
    with open(os.path.join(FIXTURE_DIR, name)) as f:
        data = json.load(f)
    return data, {key: torch.zeros(shape) for key, shape in data["params"]}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_is_what_the_generator_writes(name):
    with open(os.path.join(FIXTURE_DIR, name)) as f:
        assert json.load(f) == json.loads(json.dumps(fixture(FIXTURES[name])))


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_official_name_maps_with_its_shape(name):
    data, state = official_state(name)
    convert = dino.official_to_project if data["config"]["arch"] == "dino" else deformable.official_to_project
    overrides, converted, notes = convert(state, None, name)
    imported = Imported(data["config"]["arch"], "official", overrides, converted, [], len(state), notes)
    cfg, _ = build_imported_model(imported, name)  # raises on any missing, extra or misshaped weight
    m, c = cfg.model, data["config"]
    assert (m.hidden_dim, m.ffn_dim, m.enc_layers, m.dec_layers, m.num_queries, m.num_classes) == \
        (c["hidden_dim"], c["ffn"], c["enc_layers"], c["dec_layers"], c["num_queries"], c["num_classes"])
    assert (m.backbone.depth, m.backbone.return_levels, m.num_feature_levels) == (50, [1, 2, 3], 4)


def test_unknown_and_missing_official_names_are_one_clear_error():
    _, state = official_state("dino_official_params.json")
    with pytest.raises(UserError, match="unknown keys.*transformer.mystery_head.weight"):
        dino.official_to_project({**state, "transformer.mystery_head.weight": torch.zeros(3)}, None, "x.pth")
    del state["transformer.decoder.layers.5.norm3.bias"]
    overrides, converted, notes = dino.official_to_project(state, None, "x.pth")
    with pytest.raises(UserError, match="1 missing weights: .*decoder.5.norm3.bias"):
        build_imported_model(Imported("dino", "official", overrides, converted, [], len(state), notes), "x.pth")


@pytest.mark.slow
def test_deformable_fixture_has_the_parameter_count_of_transformers_at_the_same_config():
    """Cross-check of the hand-written generator: unique tensors of the official two-stage R50 list
    (aliases counted once) hold as many numbers as transformers' model at that config."""
    data, _ = official_state("deformable_official_params.json")
    unique = {name.removeprefix("transformer.decoder.") if "_embed." in name else name: shape
              for name, shape in data["params"]}
    backbone = transformers.ResNetConfig(out_features=["stage2", "stage3", "stage4"])  # ResNet-50
    config = transformers.DeformableDetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone=None,
                                               backbone_config=backbone, with_box_refine=True, two_stage=True,
                                               num_labels=91)
    model = transformers.DeformableDetrForObjectDetection(config)
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    assert sum(t.numel() for t in tensors) == sum(torch.Size(s).numel() for s in unique.values())


@pytest.mark.parametrize("prefix", ["model.backbone.conv_encoder.model.",
                                    "model.backbone.conv_encoder.model._backbone."])
def test_timm_backbone_names_as_the_hub_checkpoints_store_them(tmp_path, prefix, make_hf_deformable):
    """The hub's Deformable DETR folders use a timm ResNet, whose names are torchvision's."""
    make_hf_deformable(tmp_path, 3, True, True)
    reference = import_checkpoint(tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    hf_state = {k: v for k, v in safetensors.torch.load_file(tmp_path / "model.safetensors").items()
                if not k.startswith("model.backbone.")}
    hf_state.update({prefix + k.removeprefix("backbone."): v for k, v in reference.state.items()
                     if k.startswith("backbone.")})
    hf_state[prefix + "bn1.num_batches_tracked"] = torch.tensor(0)
    overrides, state, notes = deformable.hf_to_project(hf_state, {**hf_config, "use_timm_backbone": True})
    assert overrides == reference.overrides and state.keys() == reference.state.keys()
    assert all(torch.equal(state[k], reference.state[k]) for k in state)
    assert any("BatchNorm step counters" in n for n in notes)


def test_incomplete_official_checkpoint_is_one_clear_error(tmp_path):
    small = {**DINO_4SCALE_R50, "hidden_dim": 32, "ffn": 64, "enc_layers": 1, "dec_layers": 1, "depth": 18, "width": 8}
    state = {name: torch.zeros(shape) for name, shape in dino_params(small) if name != "transformer.level_embed"}
    torch.save({"model": state}, tmp_path / "dino.pth")
    with pytest.raises(UserError, match="no weight for 'neck.level_embed': an incomplete dino checkpoint"):
        import_checkpoint(tmp_path / "dino.pth")


def test_foreign_transformers_config_is_one_clear_error():
    with pytest.raises(UserError, match="config.json lacks d_model"):
        deformable.hf_to_project({}, {"model_type": "deformable_detr", "num_queries": 3}, "folder")

"""model.pretrained + model.class_map: everything but the class head loads, class-head rows follow the map."""
import pytest
import torch

from clock_deploy.config import from_dict, load_config, to_dict
from clock_deploy.convert.class_head import CLASS_HEAD, match_classes, transfer_state
from clock_deploy.training.pretrained import load_pretrained
from clock_deploy.checkpoint import save_checkpoint
from clock_deploy.errors import UserError
from clock_deploy.models.build import build_model

COCO_LIKE = ["person", "bicycle", "car", "dog"]
KITTI_LIKE = ["Car", "Pedestrian", "Cyclist", "Tram"]
KITTI_MAP = {"Pedestrian": "person", "Cyclist": "bicycle", "Van": "car"}


def build(cfg):
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model)


def test_match_classes_follows_map_then_names():
    assert match_classes(KITTI_LIKE, COCO_LIKE, KITTI_MAP) == [2, 0, 1, None]
    assert match_classes(["Car", "Dog"], COCO_LIKE, {"Dog": None}) == [2, None]
    with pytest.raises(UserError, match=r"model.class_map.Pedestrian: 'persn' .*did you mean 'person'"):
        match_classes(KITTI_LIKE, COCO_LIKE, {"Pedestrian": "persn"})


@pytest.mark.parametrize("arch", ["dab_detr", "deformable_detr", "dino", "rt_detr"])
def test_class_head_rows_follow_the_map_and_the_rest_loads(arch, make_class_head_config):
    source = build(make_class_head_config(arch, COCO_LIKE)).state_dict()
    fresh = build(make_class_head_config(arch, KITTI_LIKE, seed=1)).state_dict()
    state, lines = transfer_state(fresh, source, KITTI_LIKE, COCO_LIKE, KITTI_MAP)
    heads = [k for k in fresh if CLASS_HEAD.search(k)]
    assert heads and any(k.startswith("class_embed") for k in heads)
    for key, value in state.items():
        assert value.shape == fresh[key].shape
        if key not in heads:
            assert torch.equal(value, source[key]), key
            continue
        for row, src in enumerate([2, 0, 1]):  # Car <- car, Pedestrian <- person, Cyclist <- bicycle
            assert torch.equal(value[row], source[key][src]), key
        assert torch.equal(value[3], fresh[key][3]), key  # Tram: nothing matches, fresh init
    assert "  Pedestrian <- person" in lines and "  Tram <- (random init)" in lines


def test_same_classes_load_unchanged_and_misfits_are_user_errors(make_class_head_config):
    source = build(make_class_head_config("dab_detr", KITTI_LIKE)).state_dict()
    state, lines = transfer_state(source, source, KITTI_LIKE, KITTI_LIKE, KITTI_MAP)
    assert all(torch.equal(state[k], source[k]) for k in source) and "kept" in lines[0]
    other = build(make_class_head_config("dab_detr", COCO_LIKE)).state_dict()
    with pytest.raises(UserError, match="1 missing weights: decoder.layers.0.norm1.bias"):
        transfer_state(other, {k: v for k, v in source.items() if k != "decoder.layers.0.norm1.bias"},
                       COCO_LIKE, KITTI_LIKE, {})


def test_load_pretrained_from_a_checkpoint(tmp_path, make_class_head_config):
    cfg = make_class_head_config("dab_detr", COCO_LIKE)
    pretrained = build(cfg)
    path = str(tmp_path / "coco.pt")
    save_checkpoint(path, pretrained, cfg, COCO_LIKE, epoch=1, iteration=10)

    target = make_class_head_config("dab_detr", KITTI_LIKE, seed=1)
    target.model.pretrained, target.model.class_map = path, KITTI_MAP
    model = build(target)
    lines = load_pretrained(model, target.model, KITTI_LIKE)
    assert lines[0].startswith(f"model.pretrained: {path}") and "  Car <- car" in lines
    assert torch.equal(model.class_embed.weight[1], pretrained.class_embed.weight[0])
    assert torch.equal(model.encoder.query_scale.layers[0].weight, pretrained.encoder.query_scale.layers[0].weight)
    assert not model.backbone.conv1.weight.requires_grad  # stem frozen, as with torchvision weights

    target.model.hidden_dim = 64
    with pytest.raises(UserError, match=r"wrong shapes: .*the checkpoint was built with model.hidden_dim=32"):
        load_pretrained(build(target), target.model, KITTI_LIKE)
    target.model.hidden_dim, target.model.arch = 32, "dino"
    with pytest.raises(UserError, match="holds a dab_detr model but model.arch=dino"):
        load_pretrained(build(target), target.model, KITTI_LIKE)


def test_class_map_is_a_table_in_the_config(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  class_map:\n    Pedestrian: person\n    Van: car\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\nmodel:\n  pretrained: coco.pt\n"
                     "  class_map:\n    Van: null\n    Cyclist: bicycle\n")
    cfg = load_config(str(child), ["model.class_map.Tram=train"])
    assert cfg.model.class_map == {"Pedestrian": "person", "Van": None, "Cyclist": "bicycle", "Tram": "train"}
    assert from_dict(to_dict(cfg)).model.class_map == cfg.model.class_map
    assert load_config(str(child), ["model.class_map={}"]).model.class_map == {}
    with pytest.raises(UserError, match="'model.class_map.Car' must be a name or null"):
        load_config(str(child), ["model.class_map.Car=[1]"])

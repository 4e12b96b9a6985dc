"""Every shipped recipe loads, validates and builds its model."""
import glob
import os

import pytest

from clock_deploy.config import PipelineConfig, load_config
from clock_deploy.models.build import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(os.path.relpath(f, ROOT) for f in glob.glob(os.path.join(ROOT, "configs/*/*.yaml"))
                 if not f.endswith("pipeline.yaml"))


def test_recipes_found():
    assert len(RECIPES) >= 10


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_builds(path):
    cfg = load_config(os.path.join(ROOT, path))
    cfg.model.backbone.weights = None  # torchvision checkpoints are downloaded by the user
    model = build_model(cfg.model)
    assert model.num_classes == cfg.model.num_classes == 3
    if cfg.distill.method not in ("none", "gt_denoise"):  # the gt_denoise control has no teacher
        assert cfg.distill.teacher, path


def test_pipeline_config_points_at_existing_files():
    cfg = load_config(os.path.join(ROOT, "configs/demo/pipeline.yaml"), cls=PipelineConfig)
    for stage in (cfg.teacher, cfg.student, cfg.distill):
        assert os.path.exists(os.path.join(ROOT, "configs/demo", stage))
    assert os.path.exists(os.path.join(ROOT, cfg.calib))


def test_coco_finetune_recipes_start_from_an_imported_checkpoint():
    from clock_deploy.data.kitti import class_names

    paths = [p for p in RECIPES if p.endswith("_coco_finetune.yaml")]
    assert len(paths) >= 2
    for path in paths:
        cfg = load_config(os.path.join(ROOT, path))
        assert cfg.model.pretrained and cfg.model.backbone.weights is None, path
        assert set(class_names("kitti3")) <= set(cfg.model.class_map), path

"""Shared helpers for the export / precision / runtime tests (no tests here).

Tiny untrained students of every family: two decoder layers, 20 queries, a width-8
ResNet-18, 64 x 128 inputs. Their class heads get spread-out random weights so that
scores span (0, 1) as in a trained model instead of all sitting at the focal prior,
which would make every top-k a near-tie.
"""
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch import nn

from clock_deploy.artifact import input_spec
from clock_deploy.config import Config
from clock_deploy.data.kitti import class_names
from clock_deploy.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from clock_deploy.models.build import build_model
from clock_deploy.models.deform_attn import set_sampling

HEIGHT, WIDTH = 64, 128
TOPK = 30
CLASSES = class_names("kitti3")
SPEC = input_spec(HEIGHT, WIDTH, IMAGENET_MEAN, IMAGENET_STD)


def tiny_config(arch, data_root="data/none"):
    cfg = Config()
    m = cfg.model
    m.arch = arch
    m.num_classes = len(CLASSES)
    m.backbone.depth, m.backbone.width = 18, 8
    m.hidden_dim, m.num_queries, m.nheads, m.ffn_dim, m.n_points = 32, 20, 2, 64, 2
    m.enc_layers, m.dec_layers = 1, 2
    m.dn.num_queries = 10
    multi_scale = arch != "dab_detr"
    m.num_feature_levels = 3 if multi_scale else 1
    m.backbone.return_levels = [1, 2, 3] if multi_scale else [3]
    cfg.data.img_size = [HEIGHT, WIDTH]
    cfg.data.root = str(data_root)
    cfg.export.topk = TOPK
    cfg.export.simplify = False
    return cfg


def tiny_model(arch, sampling="grid_sample", seed=0, data_root="data/none"):
    """(model in eval mode, config) with spread class scores."""
    torch.manual_seed(seed)
    cfg = tiny_config(arch, data_root)
    cfg.model.sampling = sampling
    model = build_model(cfg.model).eval()
    set_sampling(model, sampling)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.out_features == len(CLASSES):
                module.weight.normal_(0.0, 0.5, generator=generator)
                module.bias.zero_()
    return model, cfg


def random_images(folder, count, seed=0, size=(100, 300)):
    """`count` random RGB PNG files of `size` (H, W) in `folder`; returns their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


class StandInDetector(nn.Module):
    """A four-layer stand-in with the detector interface (pred_logits / pred_boxes), for fast tests:
    two convolutions, 4 queries pooled from a 2 x 2 grid, a class head and a box head."""

    def __init__(self, num_classes=len(CLASSES)):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.cls = nn.Linear(16, num_classes)
        self.box = nn.Linear(16, 4)

    def forward(self, images):
        features = torch.relu(self.conv2(torch.relu(self.conv1(images))))
        queries = nn.functional.adaptive_avg_pool2d(features, (2, 2)).flatten(2).transpose(1, 2)
        return SimpleNamespace(pred_logits=self.cls(queries), pred_boxes=self.box(queries).sigmoid())

"""Fixtures shared by the tests: tiny configs, models and data.

The factories are session-scoped fixtures that return a plain function (they hold no state), so
module-scoped fixtures can use them too. Ask for them by name; never import this module.
"""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from clock_deploy.artifact import input_spec
from clock_deploy.config import Config, load_config
from clock_deploy.data.kitti import class_names
from clock_deploy.data.synthetic import generate
from clock_deploy.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from clock_deploy.distill.queries import query_group
from clock_deploy.models.build import build_model
from clock_deploy.models.deform_attn import set_sampling

# Test models are tiny and overhead-bound: one intra-op thread is as fast as two, and it does not
# collapse when another process (a DDP rank, a bench job) shares the two cores.
torch.set_num_threads(1)


# ---------------------------------------------------------------- training runs (engine, pipeline)

TINY_MODEL = [
    "model.backbone.depth=18", "model.backbone.width=8", "model.backbone.return_levels=[2, 3]",
    "model.hidden_dim=32", "model.nheads=2", "model.enc_layers=1", "model.dec_layers=2",
    "model.ffn_dim=64", "model.num_queries=10", "model.num_feature_levels=2", "model.dn.num_queries=10",
]


def _synthetic_data(root, num_images=8):
    generate(str(root), num_images, seed=0, height=64, width=192, val_fraction=0.25, progress=False)
    return str(root)


def _train_config(data_root, output_dir, arch="dino", extra=()):
    overrides = TINY_MODEL + [
        f"model.arch={arch}", "model.num_classes=3", f"data.root={data_root}", "data.img_size=[64, 96]",
        f"output_dir={output_dir}", "device=cpu", "train.batch_size=2", "train.epochs=2", "train.log_every=1",
        "train.eval_every=0", "train.lr_drop_epochs=[1]", "train.warmup_iters=2", "export.topk=10",
    ]
    return load_config(None, overrides + list(extra))


@pytest.fixture(scope="session")
def tiny_model_overrides():
    """Config overrides that make any family tiny (a width-8 ResNet-18, 32-wide transformer)."""
    return list(TINY_MODEL)


@pytest.fixture(scope="session")
def make_synthetic_data():
    """make_synthetic_data(root, num_images=8) -> root: a small synthetic KITTI set (64 x 192, seed 0)."""
    return _synthetic_data


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """One 8-image set (6 train, 2 val) for the tests that only read it: never write into it."""
    return _synthetic_data(tmp_path_factory.mktemp("synthetic_data"))


@pytest.fixture(scope="session")
def make_train_config():
    """make_train_config(data_root, output_dir, arch="dino", extra=()): a tiny 2-epoch CPU run."""
    return _train_config


# ---------------------------------------------------------------- tiny students (export, precision, runtime)

# Tiny untrained students of every family: two decoder layers, 20 queries, a width-8 ResNet-18,
# 64 x 128 inputs. Their class heads get spread-out random weights so that scores span (0, 1) as
# in a trained model instead of all sitting at the focal prior, which would make every top-k a near-tie.
STUDENT_IO = SimpleNamespace(height=64, width=128, topk=30, classes=class_names("kitti3"),
                             spec=input_spec(64, 128, IMAGENET_MEAN, IMAGENET_STD))


def _student_config(arch, data_root):
    cfg = Config()
    m = cfg.model
    m.arch = arch
    m.num_classes = len(STUDENT_IO.classes)
    m.backbone.depth, m.backbone.width = 18, 8
    m.hidden_dim, m.num_queries, m.nheads, m.ffn_dim, m.n_points = 32, 20, 2, 64, 2
    m.enc_layers, m.dec_layers = 1, 2
    m.dn.num_queries = 10
    multi_scale = arch != "dab_detr"
    m.num_feature_levels = 3 if multi_scale else 1
    m.backbone.return_levels = [1, 2, 3] if multi_scale else [3]
    cfg.data.img_size = [STUDENT_IO.height, STUDENT_IO.width]
    cfg.data.root = str(data_root)
    cfg.export.topk = STUDENT_IO.topk
    cfg.export.simplify = False
    return cfg


def _tiny_student(arch, sampling="grid_sample", seed=0, data_root="data/none"):
    torch.manual_seed(seed)
    cfg = _student_config(arch, data_root)
    cfg.model.sampling = sampling
    model = build_model(cfg.model).eval()
    set_sampling(model, sampling)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.out_features == len(STUDENT_IO.classes):
                module.weight.normal_(0.0, 0.5, generator=generator)
                module.bias.zero_()
    return model, cfg


def _random_images(folder, count, seed=0, size=(100, 300)):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="session")
def student_io():
    """What the tiny students take and give: height, width, input spec, top-k and class names."""
    return STUDENT_IO


@pytest.fixture(scope="session")
def make_tiny_student():
    """make_tiny_student(arch, sampling="grid_sample", seed=0, data_root="data/none") -> (model in eval
    mode, config) with spread class scores."""
    return _tiny_student


@pytest.fixture(scope="session")
def make_random_images():
    """make_random_images(folder, count, seed=0, size=(100, 300)): random RGB PNG files of `size` (H, W)
    in `folder`; returns their paths."""
    return _random_images


# ---------------------------------------------------------------- class-head transfer

def _class_head_config(arch, classes, seed=0):
    cfg = Config()
    m = cfg.model
    m.arch, m.num_classes, m.hidden_dim, m.nheads, m.ffn_dim = arch, len(classes), 32, 4, 64
    m.enc_layers, m.dec_layers, m.num_queries, m.dn.num_queries = 1, 2, 10, 6
    m.backbone.depth, m.backbone.width, m.backbone.return_levels = 18, 8, [1, 2, 3]
    cfg.seed = seed
    return cfg


@pytest.fixture(scope="session")
def make_class_head_config():
    """make_class_head_config(arch, classes, seed=0): a tiny model config with one output per class name."""
    return _class_head_config


# ---------------------------------------------------------------- distillation (teacher / student pairs)

def _distill_config(arch, hidden=32, dec_layers=2, method="none", enc_layers=2):
    cfg = Config()
    cfg.data.img_size = [64, 96]
    m = cfg.model
    m.arch, m.hidden_dim, m.nheads, m.ffn_dim = arch, hidden, 2, 2 * hidden
    m.enc_layers, m.dec_layers, m.num_queries, m.dn.num_queries = enc_layers, dec_layers, 10, 6
    m.backbone.depth, m.backbone.width = 18, 8
    cfg.distill.method = method
    cfg.distill.logit.random_queries = 5
    cfg.distill.kd_detr.random_queries = 5
    return cfg


def _distill_model(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg.model)


def _distill_batch():
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 96)
    targets = [{"boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.15, 0.2]]), "labels": torch.tensor([0, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    return images, targets


def _distill_losses(distiller, student):
    images, targets = _distill_batch()
    torch.manual_seed(3)  # same random queries / denoising noise every call
    return distiller(student, images, targets)


def _perturb(model, scale=0.05):
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


@pytest.fixture(scope="session")
def perturb():
    """perturb(model, scale=0.05): add scale x N(0, 1) noise (global RNG seeded 2) to every parameter, so that a
    copy of a model differs from it and zero-initialized heads and offsets are not zero."""
    return _perturb


def _assert_group_hides_padding(model, images, targets, spec, with_group):
    """The query group's padded slots (the GT-less second image's) are hidden from its real slots: moving
    their boxes changes none of the real slots' logits."""
    moved_spec = dataclasses.replace(spec, boxes=spec.boxes.masked_fill(spec.pad_mask.unsqueeze(-1), 0.9))
    torch.manual_seed(7)
    moved = model(images, targets, groups=[query_group(model, moved_spec)])
    keep = ~spec.pad_mask
    torch.testing.assert_close(moved.groups[0][-1].logits[keep], with_group.groups[0][-1].logits[keep],
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="session")
def assert_group_hides_padding():
    """assert_group_hides_padding(model, images, targets, spec, with_group): `with_group` is model's output with
    query_group(model, spec) under torch.manual_seed(7); its padded slots must not reach its real slots."""
    return _assert_group_hides_padding


@pytest.fixture(scope="session")
def make_distill_config():
    """make_distill_config(arch, hidden=32, dec_layers=2, method="none", enc_layers=2): a tiny model config
    (64 x 96 inputs, 10 queries, a width-8 ResNet-18) with distill.method and 5 random queries per step."""
    return _distill_config


@pytest.fixture(scope="session")
def make_distill_model():
    """make_distill_model(cfg, seed=0): build_model(cfg.model) after torch.manual_seed(seed)."""
    return _distill_model


@pytest.fixture(scope="session")
def make_distill_batch():
    """make_distill_batch() -> (images, targets): two 64 x 96 images, the first with two boxes, the second with
    none. Seeds the global RNG (1) first, so what a test draws next is the same on every call."""
    return _distill_batch


@pytest.fixture(scope="session")
def distill_losses():
    """distill_losses(distiller, student) -> (student output, losses) on make_distill_batch()'s batch, the global
    RNG seeded (3) before the step: the same random queries and denoising noise on every call."""
    return _distill_losses


# ---------------------------------------------------------------- transformers reference models

def _hf_deformable(folder, num_labels, box_refine, two_stage, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[2, 2, 2, 2],
                                         layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    config = transformers.DeformableDetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone=None, backbone_config=backbone,
        d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=20, two_stage_num_proposals=20,
        num_labels=num_labels, with_box_refine=box_refine, two_stage=two_stage)
    model = transformers.DeformableDetrForObjectDetection(config).eval()
    with torch.no_grad():  # zero-initialized heads and offsets would hide mapping mistakes
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.1)
    model.save_pretrained(folder)
    return model


def _hf_dab(num_labels=3, layer_type="basic", **overrides):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DabDetrForObjectDetection"):
        pytest.skip(f"transformers {transformers.__version__} has no DAB-DETR")
    width, expansion = 8, 4 if layer_type == "bottleneck" else 1
    backbone = transformers.ResNetConfig(
        embedding_size=width, hidden_sizes=[width * expansion * 2 ** i for i in range(4)],
        depths=[2, 2, 2, 2] if layer_type == "basic" else [3, 4, 6, 3], layer_type=layer_type,
        out_features=["stage4"])
    settings = dict(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
                    hidden_size=32, encoder_layers=2, decoder_layers=3, encoder_ffn_dim=64, decoder_ffn_dim=64,
                    encoder_attention_heads=4, decoder_attention_heads=4, num_queries=12, num_labels=num_labels)
    settings.update(overrides)
    torch.manual_seed(0)
    model = transformers.DabDetrForObjectDetection(transformers.DabDetrConfig(**settings)).eval()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point():
                noise = torch.randn_like(t) * 0.1
                t.copy_(t + (noise.abs() if name.endswith("running_var") else noise))
    return model


@pytest.fixture(scope="session")
def make_hf_deformable():
    """make_hf_deformable(folder, num_labels, box_refine, two_stage, seed=0): a small transformers
    Deformable DETR with every weight perturbed, saved to `folder`."""
    return _hf_deformable


@pytest.fixture(scope="session")
def make_hf_dab():
    """make_hf_dab(num_labels=3, layer_type="basic", **config_overrides): a small transformers DAB-DETR on
    transformers' own ResNet (no timm, nothing downloaded), every weight perturbed (zero-initialized box
    heads included) so each term of the forward counts."""
    return _hf_dab


def _hf_rt_detr(folder, num_labels=3, layer_type="basic", method="default", seed=0, version=2):
    """A small transformers RT-DETR(v2) (ResNet-vd 18 / 50 at width 8, 32 wide) with every weight perturbed."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    width, expansion = 8, 4 if layer_type == "bottleneck" else 1
    backbone = transformers.RTDetrResNetConfig(
        embedding_size=width, hidden_sizes=[width * expansion * 2 ** i for i in range(4)],
        depths=[2, 2, 2, 2] if layer_type == "basic" else [3, 4, 6, 3], layer_type=layer_type, out_indices=[2, 3, 4])
    settings = dict(backbone_config=backbone, encoder_in_channels=backbone.hidden_sizes[1:], encoder_hidden_dim=32,
                    d_model=32, decoder_in_channels=[32, 32, 32], encoder_ffn_dim=64, decoder_ffn_dim=64,
                    encoder_attention_heads=4, decoder_attention_heads=4, decoder_layers=3, num_queries=20,
                    num_labels=num_labels, hidden_expansion=0.5 if layer_type == "basic" else 1.0,
                    num_denoising=10)
    if version == 2:
        settings.update(decoder_method=method, decoder_n_points=3)
        model = transformers.RTDetrV2ForObjectDetection(transformers.RTDetrV2Config(**settings))
    else:
        model = transformers.RTDetrForObjectDetection(transformers.RTDetrConfig(**settings))
    model.eval()
    with torch.no_grad():  # zero-initialized heads and offsets, BN scales of 0.01 would hide mapping mistakes
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith("norm.weight") or name.endswith("normalization.weight") or ".norm.weight" in name:
                tensor.uniform_(0.5, 1.5)
            elif tensor.is_floating_point() and not name.endswith("n_points_scale"):
                tensor.add_(torch.randn_like(tensor) * 0.1)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def make_hf_rt_detr():
    """make_hf_rt_detr(folder, num_labels=3, layer_type="basic", method="default", seed=0, version=2): a small
    transformers RT-DETRv2 (or v1) on its ResNet-vd, every weight perturbed, saved to `folder`."""
    return _hf_rt_detr


# ---------------------------------------------------------------- schema growth (studies' run records)

@pytest.fixture
def add_config_key(monkeypatch):
    """add_config_key(section, name, default): add field `name` at `default` to the config dataclass `section`
    (e.g. clock_deploy.config.TcldConfig) for this test, as a new key in config.py would."""
    def add(section, name, default):
        new = dataclasses.field(default=default)
        new.name, new.type, new._field_type = name, type(default), dataclasses._FIELD
        monkeypatch.setitem(section.__dataclass_fields__, name, new)
        monkeypatch.setitem(section.__annotations__, name, type(default))
        monkeypatch.setattr(section, name, default, raising=False)
    return add

"""The DETR model zoo: backbone, position embeddings, the DetrOutput contract, query-group
isolation, DINO denoising, ONNX export parity, post-processing and a tiny overfitting run."""
import io
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from clock_deploy import config
from clock_deploy.config import BackboneConfig, DenoisingConfig, LossConfig, ModelConfig, RtDetrConfig
from clock_deploy.errors import UserError
from clock_deploy.export.onnx import expected_tracing_notes_silenced
from clock_deploy.models import build
from clock_deploy.models.backbone import FrozenBatchNorm2d, ResNetBackbone, build_backbone
from clock_deploy.models.box_ops import box_cxcywh_to_xyxy, box_iou
from clock_deploy.models.build import build_criterion, build_model, param_groups
from clock_deploy.models.contract import QueryGroup
from clock_deploy.models.deform_attn import MSDeformAttn
from clock_deploy.models.deploy import PostProcess
from clock_deploy.models.dino import build_denoising_queries
from clock_deploy.models.position import PositionEmbeddingSine, gen_sineembed_for_position
from clock_deploy.models.transformer_utils import group_attention_blocks, self_attn_mask

ARCHS = ["dab_detr", "deformable_detr", "dino", "rt_detr"]
H, W = 64, 96


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are overhead-bound: one intra-op thread is as fast, and it does not collapse when
    other processes share the cores (the overfitting test under load: 4 s with 1 thread, 100 s with 2)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(arch, **overrides):
    cfg = ModelConfig(arch=arch, num_classes=3, hidden_dim=32, num_queries=10, nheads=4, enc_layers=2,
                      dec_layers=2, ffn_dim=64, num_feature_levels=4,
                      backbone=BackboneConfig(depth=18, width=8, return_levels=[1, 2, 3]),
                      dn=DenoisingConfig(num_queries=12))
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(arch, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_config(arch, **overrides))


def sample_targets():
    return [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
            {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]


def images(batch=2, seed=1):
    return torch.randn(batch, 3, H, W, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ backbone

def torchvision_resnet_keys(depth, with_num_batches_tracked):
    """State-dict keys of torchvision's resnet{depth} without fc, from the architecture definition."""
    blocks, convs = {18: ((2, 2, 2, 2), 2), 34: ((3, 4, 6, 3), 2), 50: ((3, 4, 6, 3), 3)}[depth]
    stats = ["weight", "bias", "running_mean", "running_var"] + (["num_batches_tracked"] * with_num_batches_tracked)
    keys = ["conv1.weight"] + [f"bn1.{s}" for s in stats]
    for layer, count in enumerate(blocks, start=1):
        for b in range(count):
            prefix = f"layer{layer}.{b}."
            for c in range(1, convs + 1):
                keys += [f"{prefix}conv{c}.weight"] + [f"{prefix}bn{c}.{s}" for s in stats]
            # the first block of a stage projects the shortcut when stride or channels change
            if b == 0 and (layer > 1 or depth == 50):
                keys += [f"{prefix}downsample.0.weight"] + [f"{prefix}downsample.1.{s}" for s in stats]
    return set(keys)


@pytest.mark.parametrize("depth,count,sample", [
    (18, 120, ["layer4.1.conv2.weight", "layer2.0.downsample.1.running_var"]),
    (50, 318, ["layer4.2.conv3.weight", "layer1.0.downsample.1.running_var", "layer3.5.bn3.num_batches_tracked"])])
def test_backbone_keys_match_torchvision(depth, count, sample):
    # torchvision's resnet18 / resnet50 state dicts have 122 / 320 keys, 2 of them fc.*
    expected = torchvision_resnet_keys(depth, True)
    assert len(expected) == count
    model = ResNetBackbone(depth, 64, [0, 1, 2, 3], frozen_bn=False)
    assert set(model.state_dict()) == expected
    assert set(sample) <= set(model.state_dict())
    frozen = ResNetBackbone(depth, 64, [0, 1, 2, 3], frozen_bn=True)
    assert set(frozen.state_dict()) == torchvision_resnet_keys(depth, False)
    assert frozen.state_dict()["layer2.0.conv1.weight"].shape == model.state_dict()["layer2.0.conv1.weight"].shape


def test_backbone_channels_strides_and_shapes():
    model = ResNetBackbone(50, 16, [1, 2, 3])
    assert model.num_channels == [128, 256, 512] and model.strides == [8, 16, 32]
    outs = model(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 128, 8, 12), (1, 256, 4, 6), (1, 512, 2, 3)]
    small = ResNetBackbone(18, 8, [0, 2])
    assert small.num_channels == [8, 32] and small.strides == [4, 16]
    assert not hasattr(small, "layer4")  # stages after the last returned level are not built


def test_frozen_bn_has_no_parameters_and_matches_batchnorm():
    frozen = FrozenBatchNorm2d(4)
    assert list(frozen.parameters()) == []
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(frozen(x), bn(x))
    backbone = ResNetBackbone(18, 8, [3], frozen_bn=True)
    assert all(name.endswith("conv1.weight") or name.endswith("conv2.weight") or name.endswith("downsample.0.weight")
               for name, _ in backbone.named_parameters())


def test_load_torchvision_weights(tmp_path):
    source = ResNetBackbone(18, 64, [0, 1, 2, 3], frozen_bn=False)
    with torch.no_grad():
        for t in source.state_dict().values():
            if t.is_floating_point():
                t.normal_()
    state = dict(source.state_dict(), **{"fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)})
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    cfg = BackboneConfig(depth=18, width=64, weights=str(path), return_levels=[1, 2], freeze_stem=True)
    backbone = build_backbone(cfg)
    torch.testing.assert_close(backbone.layer3[1].bn2.running_var, state["layer3.1.bn2.running_var"])
    torch.testing.assert_close(backbone.conv1.weight, state["conv1.weight"])
    assert not backbone.conv1.weight.requires_grad and not backbone.layer1[0].conv1.weight.requires_grad
    assert backbone.layer2[0].conv1.weight.requires_grad

    with pytest.raises(UserError, match="resnet18.pth.*ResNet-50"):
        build_backbone(BackboneConfig(depth=50, width=64, weights=str(path)))
    with pytest.raises(UserError, match="width=64"):
        build_backbone(BackboneConfig(depth=18, width=8, weights=str(path)))
    with pytest.raises(UserError, match="missing.pth.*not found"):
        build_backbone(BackboneConfig(depth=18, width=64, weights=str(tmp_path / "missing.pth")))


def test_backbone_bad_levels():
    with pytest.raises(UserError, match="return_levels"):
        ResNetBackbone(18, 8, [2, 1])


# ------------------------------------------------------------------ position embeddings

def test_position_embedding_sine_hand_values():
    pos = PositionEmbeddingSine(num_pos_feats=2)(torch.zeros(3, 5, 1, 2))
    assert pos.shape == (3, 4, 1, 2) and pos.dtype == torch.float32
    # y = 1 / 1 * 2pi; x = (1/2, 2/2) * 2pi; channels (sin y, cos y, sin x, cos x)
    torch.testing.assert_close(pos[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.0, -1.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(pos[2, :, 0, 1], torch.tensor([0.0, 1.0, 0.0, 1.0]), atol=1e-5, rtol=0)


def test_position_embedding_sine_centred_as_deformable_detr():
    pos = PositionEmbeddingSine(num_pos_feats=2, centred=True)(torch.zeros(1, 5, 1, 2))
    # y = 0.5 / 1 * 2pi = pi; x = (0.5/2, 1.5/2) * 2pi = (pi/2, 3pi/2); channels (sin y, cos y, sin x, cos x)
    torch.testing.assert_close(pos[0, :, 0, 0], torch.tensor([0.0, -1.0, 1.0, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(pos[0, :, 0, 1], torch.tensor([0.0, -1.0, -1.0, 0.0]), atol=1e-5, rtol=0)


def test_gen_sineembed_hand_values():
    emb = gen_sineembed_for_position(torch.tensor([[0.25, 0.5]]), num_feats=2)
    # order (y, x): y = pi -> (0, -1); x = pi / 2 -> (1, 0)
    torch.testing.assert_close(emb, torch.tensor([[0.0, -1.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    boxes = gen_sineembed_for_position(torch.rand(2, 7, 4), num_feats=16)
    assert boxes.shape == (2, 7, 64) and boxes.dtype == torch.float32


# ------------------------------------------------------------------ contract

def test_every_model_arch_choice_has_a_model_class():
    # config.ARCHS is the model.arch choice list; models/build.py must build each of them
    assert sorted(build.ARCHS) == sorted(config.ARCHS) == sorted(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_output_contract(arch):
    model = tiny_model(arch).eval()
    settings = (model.arch, model.hidden_dim, model.num_classes, model.num_queries, model.dec_layers)
    assert settings == (arch, 32, 3, 10, 2)
    assert model.config.arch == arch
    with torch.no_grad():
        out = model(images())
    assert len(out.stages) == 2
    for stage in out.stages:
        assert stage.logits.shape == (2, 10, 3) and stage.boxes.shape == (2, 10, 4)
        assert ((stage.boxes >= 0) & (stage.boxes <= 1)).all()
    assert out.pred_logits is out.stages[-1].logits
    levels = 1 if arch == "dab_detr" else 4
    strides = [32] if arch == "dab_detr" else [8, 16, 32, 64]
    assert model.strides == strides
    expected = [(2, 32, math.ceil(H / s), math.ceil(W / s)) for s in strides]
    for maps in (out.memory, out.memory_pos):
        assert [tuple(m.shape) for m in maps] == expected and len(maps) == levels
    # RT-DETR's features are the backbone levels only; its extra level comes after the hybrid encoder
    feature_levels = 3 if arch == "rt_detr" else levels
    assert [tuple(m.shape) for m in out.features] == expected[:feature_levels]
    assert out.groups == [] and out.denoising is None
    assert (out.encoder is not None) == (arch in ("dino", "rt_detr"))
    if out.encoder is not None:
        assert out.encoder.logits.shape == (2, 10, 3) and out.encoder.boxes.shape == (2, 10, 4)


def test_deformable_two_stage_encoder_output():
    model = tiny_model("deformable_detr", two_stage=True, box_refine=False).eval()
    with torch.no_grad():
        out = model(images())
    assert out.encoder.logits.shape == (2, 10, 3) and out.encoder.boxes.shape == (2, 10, 4)
    # proposals are 0.05 * 2**level squares; box heads start at zero, so every decoder layer
    # (no refinement: both use the same reference) first predicts the selected proposals
    sizes = out.encoder.boxes[..., 2:]
    assert torch.isclose(sizes[..., :, None], torch.tensor([0.05, 0.1, 0.2, 0.4]), rtol=1e-5, atol=0).any(-1).all()
    for stage in out.stages:
        torch.testing.assert_close(stage.boxes, out.encoder.boxes, atol=1e-4, rtol=0)


def make_groups(batch=2):
    g = torch.Generator().manual_seed(5)
    first = QueryGroup(content=torch.randn(batch, 3, 32, generator=g),
                       boxes=torch.rand(batch, 3, 4, generator=g) * 0.5 + 0.25,
                       pad_mask=torch.tensor([[False, False, True], [False, True, True]]))
    second = QueryGroup(content=torch.randn(batch, 2, 32, generator=g),
                        boxes=torch.rand(batch, 2, 4, generator=g) * 0.5 + 0.25,
                        pos=torch.randn(batch, 2, 32, generator=g))
    return [first, second]


def assert_stages_close(a, b, atol=1e-6):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.logits, y.logits, atol=atol, rtol=0)
        torch.testing.assert_close(x.boxes, y.boxes, atol=atol, rtol=0)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("arch,overrides", [("dab_detr", {}), ("deformable_detr", {}),
                                            ("deformable_detr", {"two_stage": True}), ("dino", {}),
                                            ("rt_detr", {})])
def test_groups_are_isolated(arch, overrides, mode):
    model = tiny_model(arch, **overrides)
    getattr(model, mode)()
    x, targets, groups = images(), sample_targets(), make_groups()
    torch.manual_seed(7)
    plain = model(x, targets)
    torch.manual_seed(7)  # same denoising noise (DINO in training)
    both = model(x, targets, groups)
    torch.manual_seed(7)
    only_second = model(x, targets, groups[1:])
    assert_stages_close(plain.stages, both.stages)
    if plain.denoising is not None:
        assert_stages_close(plain.denoising.stages, both.denoising.stages)
    # groups do not see each other either
    assert_stages_close(only_second.groups[0], both.groups[1])
    assert len(both.groups) == 2
    for group, size in zip(both.groups, (3, 2)):
        assert len(group) == 2
        for stage in group:
            assert stage.logits.shape == (2, size, 3) and stage.boxes.shape == (2, size, 4)
            assert torch.isfinite(stage.logits).all() and torch.isfinite(stage.boxes).all()
    # a group does depend on its own content
    changed = [QueryGroup(content=groups[0].content + 1, boxes=groups[0].boxes, pad_mask=groups[0].pad_mask)]
    torch.manual_seed(7)
    moved = model(x, targets, changed)
    assert not torch.allclose(moved.groups[0][-1].logits, both.groups[0][-1].logits)


def test_self_attn_mask_layout():
    pad = torch.tensor([[False, True], [False, False]])
    mask = self_attn_mask(2, 3, None, [2, 1], [pad, None])
    assert mask.shape == (2, 6, 6)
    assert not mask[:, :3, :3].any()                       # matching queries see each other
    assert mask[:, :3, 3:].all()                           # ... and never a group
    assert mask[:, 3:5, :3].all() and mask[:, 3:5, 5].all()  # group 1 sees only itself
    assert mask[0, 3, 4] and not mask[1, 3, 4]             # padded slot hidden as key in image 0
    assert not mask[0, 4, 4]                               # but it still sees itself (no empty row)
    assert mask[:, 5, :5].all() and not mask[:, 5, 5].any()
    assert self_attn_mask(2, 3) is None


def test_segments_of_a_group_are_separate_attention_blocks():
    """TCLD's layout, 2 images with 2 and 1 GT boxes: 3 matching queries, then one group of
    [repeat 0: 2 slots | repeat 1: 2 slots | general: 2 slots]; image 1 pads slot 1 of each repeat."""
    pad = torch.tensor([[False] * 6, [False, True, False, True, False, False]])
    group = QueryGroup(content=torch.zeros(2, 6, 8), boxes=torch.rand(2, 6, 4), pad_mask=pad, segments=(2, 2, 2))
    mask = self_attn_mask(2, 3, None, *group_attention_blocks([group]))
    blocked_image_1 = torch.tensor([  # 1 = may not attend, written out by hand
        [0, 0, 0, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 0, 1, 1, 1, 1, 1],  # repeat 0, GT 0: itself only (slot 1 is padding)
        [1, 1, 1, 0, 0, 1, 1, 1, 1],  # repeat 0, padding: the real slot and itself
        [1, 1, 1, 1, 1, 0, 1, 1, 1],  # repeat 1, GT 0: not its copy in repeat 0
        [1, 1, 1, 1, 1, 0, 0, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 0, 0],  # general queries: each other only, no GT-anchored query
        [1, 1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask[1], blocked_image_1)
    expected_image_0 = blocked_image_1.clone()
    expected_image_0[3:5, 3:5] = expected_image_0[5:7, 5:7] = False  # no padding: both GT of a repeat see each other
    assert torch.equal(mask[0], expected_image_0)
    with pytest.raises(ValueError, match="segments"):
        group_attention_blocks([QueryGroup(content=torch.zeros(2, 6, 8), boxes=group.boxes, segments=(2, 2))])


@pytest.mark.parametrize("arch", ARCHS)
def test_segments_do_not_see_each_other_in_the_decoder(arch):
    model = tiny_model(arch).eval()
    x, targets = images(), sample_targets()
    g = torch.Generator().manual_seed(3)
    content, boxes = torch.randn(2, 6, 32, generator=g), torch.rand(2, 6, 4, generator=g) * 0.5 + 0.25
    moved = boxes.clone()
    moved[:, 2:] = torch.rand(2, 4, 4, generator=g) * 0.5 + 0.25  # other anchors in segments 2 and 3
    out = [model(x, targets, [QueryGroup(content=content, boxes=b, segments=(2, 2, 2))]).groups[0]
           for b in (boxes, moved)]
    first = [type(s)(logits=s.logits[:, :2], boxes=s.boxes[:, :2]) for s in out[0]]
    assert_stages_close(first, [type(s)(logits=s.logits[:, :2], boxes=s.boxes[:, :2]) for s in out[1]])
    assert not torch.allclose(out[0][-1].boxes[:, 2:], out[1][-1].boxes[:, 2:])


def test_dino_denoising_layout_and_mask():
    label_enc = nn.Embedding(3, 8)
    targets = sample_targets()
    cfg = DenoisingConfig(num_queries=9, label_noise=0.0, box_noise=0.4)
    torch.manual_seed(0)
    content, anchors, mask, meta = build_denoising_queries(targets, 3, label_enc, cfg, num_matching=4)
    # max 2 GT -> groups of 4 slots; 9 // 4 = 2 groups
    assert meta["num_groups"] == 2 and meta["max_gt"] == 2
    assert content.shape == (2, 8, 8) and anchors.shape == (2, 8, 4) and mask.shape == (2, 12, 12)
    assert meta["positive"].tolist() == [True, True, False, False] * 2
    assert meta["valid"][1].tolist() == [True, False] * 4 and meta["valid"][0].all()
    assert meta["labels"][0].tolist() == [0, 2] * 4
    # no label noise: content is the label embedding, zero on padding slots
    torch.testing.assert_close(content[0, 1], label_enc.weight[2])
    assert content[1, 1].abs().sum() == 0
    # box noise: positives move each corner by < 0.4 * half the size, negatives by 1-2x that
    noisy = box_cxcywh_to_xyxy(anchors.sigmoid())
    gt = box_cxcywh_to_xyxy(meta["boxes"])
    half = meta["boxes"][..., 2:].repeat(1, 1, 2) / 2 * 0.4
    shift = ((noisy - gt).abs() / half)[meta["valid"]]
    positive = meta["positive"][None].expand_as(meta["valid"])[meta["valid"]]
    # (the sample boxes are far enough from the border that no corner gets clamped)
    assert (shift[positive] <= 1 + 1e-4).all()
    assert (shift[~positive] >= 1 - 1e-4).all() and (shift[~positive] <= 2 + 1e-4).all()
    # mask: matching never sees denoising; denoising groups don't see each other; padding hidden
    assert mask[:, :4, 4:].all() and not mask[:, :4, :4].any()
    assert mask[:, 4:8, 8:].all() and mask[:, 8:, 4:8].all()
    assert not mask[0, 4:8, 4:8].any()
    assert mask[1, 4, 5] and not mask[1, 5, 4]  # slot 5 is padding in image 1
    assert not mask[:, 4:, :4].any()            # denoising queries may look at the matching ones


def test_dino_denoising_only_with_targets_in_training():
    model = tiny_model("dino").train()
    x, targets = images(), sample_targets()
    torch.manual_seed(0)
    with_dn = model(x, targets)
    without = model(x)
    assert without.denoising is None
    assert_stages_close(with_dn.stages, without.stages)
    # 12 // (2 * 2) = 3 groups of 4 slots
    assert with_dn.denoising.meta["num_groups"] == 3
    assert len(with_dn.denoising.stages) == 2 and with_dn.denoising.stages[0].logits.shape == (2, 12, 3)
    assert model.eval()(x, targets).denoising is None
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    assert model.train()(x, empty).denoising is None


# ------------------------------------------------------------------ training pieces

@pytest.mark.parametrize("arch", ARCHS)
def test_losses_backpropagate_to_all_parameters(arch):
    model = tiny_model(arch, **({"two_stage": True} if arch == "deformable_detr" else {})).train()
    criterion = build_criterion(LossConfig(), model.config)
    out = model(images(), sample_targets())
    losses = criterion(out, sample_targets())
    expected = {"loss_cls", "loss_bbox", "loss_giou", "loss_cls_0", "loss_bbox_0", "loss_giou_0"}
    if arch != "dab_detr":
        expected |= {"loss_cls_enc", "loss_bbox_enc", "loss_giou_enc"}
    if arch in ("dino", "rt_detr"):
        expected |= {"loss_cls_dn", "loss_bbox_dn", "loss_giou_dn", "loss_cls_dn_0", "loss_bbox_dn_0", "loss_giou_dn_0"}
    assert set(losses) == expected
    sum(losses.values()).backward()
    # every trainable parameter is used (DDP without find_unused_parameters)
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_param_groups_scale_backbone_lr():
    model = tiny_model("deformable_detr")
    model.backbone.conv1.weight.requires_grad_(False)
    groups = {g["name"]: g for g in param_groups(model, 1e-3, 0.1, 1e-4)}
    assert groups["backbone"]["lr"] == pytest.approx(1e-4) and groups["transformer"]["lr"] == 1e-3
    backbone_ids = {id(p) for p in model.backbone.parameters() if p.requires_grad}
    assert {id(p) for p in groups["backbone"]["params"]} == backbone_ids
    total = sum(p.numel() for g in groups.values() for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters()) - model.backbone.conv1.weight.numel()


@pytest.mark.parametrize("key,value,match", [("hidden_dim", 30, "nheads"),
                                             ("num_feature_levels", 2, "num_feature_levels"),
                                             ("num_queries", 0, "num_queries")])
def test_build_model_rejects_bad_config(key, value, match):
    with pytest.raises(UserError, match=match):
        build_model(tiny_config("dino", **{key: value}))


# ------------------------------------------------------------------ post-processing and export

def test_postprocess_hand_values():
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 2, 1] = 2.0   # best: query 2, class 1
    logits[0, 0, 0] = 0.0   # second: query 0, class 0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.5, 0.5]]])
    scores, labels, out = PostProcess(topk=2)(logits, boxes, torch.tensor([[100.0, 200.0]]))
    torch.testing.assert_close(scores, torch.tensor([[1 / (1 + math.exp(-2)), 0.5]]))
    assert labels.tolist() == [[1, 0]] and labels.dtype == torch.int64
    torch.testing.assert_close(out, torch.tensor([[[0.0, 50.0, 100.0, 100.0], [80.0, 30.0, 120.0, 70.0]]]))
    # k is capped at Q * K; a fixed (H, W) works too
    scores, labels, out = PostProcess(topk=100)(logits, boxes, (100, 200))
    assert scores.shape == (1, 6) and out.shape == (1, 6, 4)


class ExportWrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.post = PostProcess(topk=20)

    def forward(self, x):
        out = self.model(x)
        return (out.pred_logits, out.pred_boxes) + self.post(out.pred_logits, out.pred_boxes, (float(H), float(W)))


@pytest.mark.parametrize("arch,overrides", [("dab_detr", {}), ("deformable_detr", {}),
                                            ("deformable_detr", {"two_stage": True, "sampling": "gather"}),
                                            ("dino", {}), ("dino", {"sampling": "gather"}), ("rt_detr", {}),
                                            ("rt_detr", {"rt_detr": RtDetrConfig(method="discrete")})])
def test_onnx_export_parity(arch, overrides):
    model = tiny_model(arch, **overrides)
    if arch == "rt_detr":
        # untrained, every query samples at anchor centre + a fixed offset: RT-DETRv2's discrete rule
        # floor(x * W + 0.5) puts pixel centres exactly on a rounding boundary, where 1e-7 of runtime
        # difference picks the other pixel; content-dependent offsets make the locations generic
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, MSDeformAttn):
                    m.sampling_offsets.weight.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(3))
    wrapper = ExportWrapper(model).eval()
    names = ["logits", "boxes", "scores", "labels", "pixel_boxes"]
    f = io.BytesIO()
    with expected_tracing_notes_silenced():
        torch.onnx.export(wrapper, (images(1),), f, dynamo=False, opset_version=17, input_names=["images"],
                          output_names=names, dynamic_axes={n: {0: "batch"} for n in ["images"] + names})
    graph = onnx.load_from_string(f.getvalue()).graph
    double = onnx.TensorProto.DOUBLE
    assert all(t.data_type != double for t in graph.initializer)
    assert all(a.t.data_type != double for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR)
    assert all(a.i != double for n in graph.node if n.op_type == "Cast" for a in n.attribute)
    session = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    x = images(3, seed=2)  # another batch size than at export
    got = dict(zip(names, session.run(None, {"images": x.numpy()})))
    with torch.no_grad():
        expected = dict(zip(names, (t.numpy() for t in wrapper(x))))
    for name in ["logits", "boxes", "scores"]:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["pixel_boxes"] / W, expected["pixel_boxes"] / W, atol=1e-4, rtol=0)
    assert got["labels"].dtype == np.int64 and got["scores"].shape == (3, 20)


# ------------------------------------------------------------------ tiny overfitting run

def synthetic_batch():
    """4 noise images with solid rectangles: class 0 red, class 1 blue."""
    g = torch.Generator().manual_seed(0)
    layouts = [[(0, 10, 8, 40, 30), (1, 50, 30, 90, 60)], [(1, 5, 5, 35, 50)],
               [(0, 40, 10, 80, 40), (0, 8, 40, 30, 62)], [(1, 60, 4, 92, 28), (0, 20, 25, 55, 58)]]
    colors = {0: torch.tensor([1.5, -1.5, -1.5]), 1: torch.tensor([-1.5, -1.5, 1.5])}
    batch, targets = [], []
    for objects in layouts:
        image = torch.randn(3, H, W, generator=g) * 0.3
        for cls, x0, y0, x1, y1 in objects:
            image[:, y0:y1, x0:x1] = colors[cls][:, None, None]
        batch.append(image)
        targets.append({"labels": torch.tensor([o[0] for o in objects]),
                        "boxes": torch.tensor([[(x0 + x1) / 2 / W, (y0 + y1) / 2 / H, (x1 - x0) / W, (y1 - y0) / H]
                                               for _, x0, y0, x1, y1 in objects])})
    return torch.stack(batch), targets


def test_tiny_deformable_detr_overfits_synthetic_rectangles():
    cfg = tiny_config("deformable_detr", num_classes=2, box_refine=True)
    cfg.backbone.frozen_bn = False  # trained from scratch
    torch.manual_seed(0)
    model = build_model(cfg)
    criterion = build_criterion(LossConfig(), cfg)
    optimizer = torch.optim.AdamW(param_groups(model, 1e-3, 1.0, 1e-4))
    x, targets = synthetic_batch()
    model.train()
    for step in range(150):
        losses = criterion(model(x, targets), targets)
        loss = sum(losses.values())
        if step == 0:
            first_loss = loss.item()
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
    assert loss.item() < first_loss / 5
    model.eval()
    with torch.no_grad():
        out = model(x)
    for b, target in enumerate(targets):
        prob = out.pred_logits[b].sigmoid()
        iou = box_iou(box_cxcywh_to_xyxy(target["boxes"]), box_cxcywh_to_xyxy(out.pred_boxes[b]))[0]
        for j, cls in enumerate(target["labels"]):
            found = (iou[j] > 0.5) & (prob[:, cls] > 0.3)
            assert found.any(), f"image {b}: object {j} (class {int(cls)}) not detected"


def test_dino_refines_the_next_reference_from_the_un_normed_decoder_output():
    """As DINO's decoder: ref_1 = sigmoid(bbox_embed(out_0) + logit(ref_0)) with the raw layer output;
    the LayerNormed output only gives the reported box."""
    from clock_deploy.models.transformer_utils import inverse_sigmoid

    model = tiny_model("dino").eval()
    with torch.no_grad():  # non-trivial head and norm, so normed and raw outputs predict different boxes
        for p in [*model.bbox_embed.parameters(), *model.decoder_norm.parameters()]:
            p.add_(torch.randn_like(p) * 0.3)
    seen = {}
    model.proposals.register_forward_hook(lambda m, args, out: seen.update(ref0=out[1].sigmoid()))
    model.decoder[0].register_forward_hook(lambda m, args, out: seen.update(out0=out))
    model.decoder[1].cross_attn.register_forward_pre_hook(lambda m, args: seen.update(ref1=args[1][:, :, 0]))
    with torch.no_grad():
        result = model(torch.randn(1, 3, H, W))
        raw = (model.bbox_embed(seen["out0"]) + inverse_sigmoid(seen["ref0"])).sigmoid()
        normed = (model.bbox_embed(model.decoder_norm(seen["out0"])) + inverse_sigmoid(seen["ref0"])).sigmoid()
    torch.testing.assert_close(seen["ref1"], raw)
    torch.testing.assert_close(result.stages[0].boxes, normed)
    assert (raw - normed).abs().max() > 1e-3

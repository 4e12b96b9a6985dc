"""models/fuse.py: folding BatchNorm into convs and RepVGG's branches into one conv keeps the outputs
(with random norm statistics, so the folds do something), leaves no norm behind, and the ONNX export
fuses a copy, never the caller's model."""
import copy

import onnx
import pytest
import torch
from torch import nn

from clock_deploy.export.onnx import export_onnx
from clock_deploy.models.backbone import FrozenBatchNorm2d
from clock_deploy.models.build import build_model
from clock_deploy.models.fuse import fuse_for_inference
from clock_deploy.models.hybrid_encoder import RepVggBlock
from clock_deploy.models.resnet_vd import ConvNorm

NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def randomize_norms(model, seed=0):
    """Random statistics and affine parameters in every norm: at their init (mean 0, var 1, gamma 1,
    beta 0) a fold that ignored the norm would still pass."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NORMS):
                n = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.2)
    return model


def count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


def test_conv_norm_folds_into_one_conv_with_bias():
    torch.manual_seed(0)
    block = randomize_norms(ConvNorm(4, 6, 3, 2, activation="silu")).eval()
    x = torch.randn(2, 4, 9, 11)
    with torch.no_grad():
        expected = block(x)
        fuse_for_inference(block)
        got = block(x)
    assert isinstance(block.norm, nn.Identity) and block.conv.bias is not None
    assert (got - expected).abs().max().item() <= 1e-5


def test_repvgg_block_becomes_one_3x3_conv():
    torch.manual_seed(0)
    block = randomize_norms(RepVggBlock(8, "silu")).eval()
    x = torch.randn(2, 8, 7, 10)
    with torch.no_grad():
        expected = block(x)
        branch_3x3_only = block.act(block.conv1(x))  # the 1x1 branch matters: without it the outputs differ
        fuse_for_inference(block)
        got = block(x)
    assert count(block, nn.Conv2d) == 1 and count(block, NORMS) == 0
    assert block.conv.kernel_size == (3, 3) and block.conv.bias is not None
    assert (got - expected).abs().max().item() <= 1e-5
    assert (branch_3x3_only - expected).abs().max().item() > 1e-2


def test_fusing_needs_an_eval_model():
    with pytest.raises(ValueError, match="eval-mode"):
        fuse_for_inference(RepVggBlock(4, "silu").train())


@pytest.mark.parametrize("arch,frozen_bn", [("rt_detr", True), ("rt_detr", False), ("dino", True),
                                            ("deformable_detr", False), ("dab_detr", True)])
def test_fused_model_gives_the_same_outputs(arch, frozen_bn, make_tiny_student, student_io):
    model, cfg = make_tiny_student(arch)
    cfg.model.backbone.frozen_bn = frozen_bn
    torch.manual_seed(1)
    model = randomize_norms(build_model(cfg.model).eval() if not frozen_bn else model)
    images = torch.randn(2, 3, student_io.height, student_io.width, generator=torch.Generator().manual_seed(2))
    convs, norms = count(model, nn.Conv2d), count(model, NORMS)
    assert norms > 0
    with torch.no_grad():
        expected = model(images)
        fuse_for_inference(model)
        got = model(images)
    assert count(model, NORMS) == 0  # every norm of these models sits right after a conv
    if arch == "rt_detr":  # each RepVGG block: two convs -> one
        blocks = count(model, RepVggBlock)
        assert blocks > 0 and count(model, nn.Conv2d) == convs - blocks
    else:
        assert count(model, nn.Conv2d) == convs
    for name in ("pred_logits", "pred_boxes", "anchors"):  # DetrOutput.anchors (C4) survive the folds too
        diff = (getattr(got, name) - getattr(expected, name)).abs().max().item()
        assert diff <= 1e-5, (name, diff)


def test_export_fuses_a_copy_not_the_callers_model(tmp_path, make_tiny_student, student_io):
    model, _ = make_tiny_student("rt_detr")
    randomize_norms(model)
    before = copy.deepcopy(model.state_dict())
    convs = count(model, nn.Conv2d)
    export_onnx(model, tmp_path / "m.onnx", height=student_io.height, width=student_io.width,
                topk=student_io.topk, simplify=False)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert count(model, nn.Conv2d) == convs and count(model, NORMS) > 0
    # the graph is of the fused model: one Conv per RepVGG block, not two
    graph_convs = sum(node.op_type == "Conv" for node in onnx.load(tmp_path / "m.onnx").graph.node)
    assert graph_convs == convs - count(model, RepVggBlock)

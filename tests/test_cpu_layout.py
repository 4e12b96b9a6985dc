"""runtime/cpu_layout.py: packed channels_last convolutions give the fused model's outputs in every family,
repack when the input size changes, fall back to the plain conv where oneDNN cannot serve, and are what the
torch backend runs a checkpoint with on a CPU."""
import copy

import pytest
import torch
from torch import nn

from clock_deploy.models.fuse import fuse_for_inference
from clock_deploy.runtime import cpu_layout
from clock_deploy.runtime.backend_torch import inference_model
from clock_deploy.runtime.cpu_layout import PackedConv2d, prepare_for_cpu

pytestmark = pytest.mark.skipif(not cpu_layout.packing_available(), reason="this torch build has no oneDNN")


def count(model, kind):
    return sum(type(m) is kind for m in model.modules())


def outputs(model, images):
    with torch.no_grad():
        out = model(images)
    return out.pred_logits, out.pred_boxes


def assert_close(got, expected, tolerance=1e-5):
    for a, b in zip(got, expected):
        assert (a - b).abs().max().item() <= tolerance


@pytest.mark.parametrize("arch", ["rt_detr", "dino", "deformable_detr", "dab_detr"])
def test_packed_model_gives_the_fused_models_outputs(arch, make_tiny_student, student_io):
    model, _ = make_tiny_student(arch)
    fused = fuse_for_inference(model)
    convs = count(fused, nn.Conv2d)
    packed = prepare_for_cpu(copy.deepcopy(fused))
    assert count(packed, PackedConv2d) == convs > 0  # every conv of these models is packed
    generator = torch.Generator().manual_seed(2)
    for height, width in ((student_io.height, student_io.width), (student_io.height + 32, student_io.width - 32)):
        images = torch.randn(2, 3, height, width, generator=generator)
        assert_close(outputs(packed, images), outputs(fused, images))  # the second size repacks
    first = next(m for m in packed.modules() if type(m) is PackedConv2d)
    assert first.packed[0] == (2, 3, student_io.height + 32, student_io.width - 32)


def test_a_conv_that_needs_gradients_runs_unpacked():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).eval()
    packed = PackedConv2d(conv)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    packed(x).sum().backward()  # the packed op has no autograd: this would fail if it ran
    assert packed.packed[0] is None and x.grad is not None
    with torch.no_grad():
        assert (packed(x) - conv(x)).abs().max().item() <= 1e-5
    assert packed.packed[0] == x.shape


def test_without_onednn_only_the_memory_format_changes(monkeypatch, make_tiny_student, student_io):
    monkeypatch.setattr(cpu_layout, "packing_available", lambda: False)
    model, _ = make_tiny_student("rt_detr")
    fused = fuse_for_inference(model)
    plain = prepare_for_cpu(copy.deepcopy(fused))
    assert count(plain, PackedConv2d) == 0
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in plain.parameters() if p.dim() == 4)
    images = torch.randn(1, 3, student_io.height, student_io.width)
    assert_close(outputs(plain, images), outputs(fused, images))


def test_a_training_model_is_refused(make_tiny_student):
    model, _ = make_tiny_student("rt_detr")
    with pytest.raises(ValueError, match="eval-mode"):
        prepare_for_cpu(model.train())


def test_the_torch_backend_packs_on_cpu_only(make_tiny_student):
    model, _ = make_tiny_student("dino")
    on_cpu = inference_model(copy.deepcopy(model), "cpu")
    assert count(on_cpu, PackedConv2d) > 0
    elsewhere = inference_model(copy.deepcopy(model), "meta")  # any non-CPU device: fused only
    assert count(elsewhere, PackedConv2d) == 0 and count(elsewhere, nn.Conv2d) > 0

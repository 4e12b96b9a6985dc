"""Multi-scale deformable attention: grid_sample and gather sampling agree; the gather path exports."""
import io
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from clock_deploy.export.onnx import expected_tracing_notes_silenced
from clock_deploy.models.deform_attn import MSDeformAttn, _sample_gather, ms_deform_attn

SHAPES = [(5, 7), (3, 4), (1, 2)]


def random_inputs(batch=2, queries=6, heads=2, head_dim=4, points=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, total, heads, head_dim, generator=g)
    # spans [-0.3, 1.3]: many points fall (partly) outside the maps
    locations = torch.rand(batch, queries, heads, len(SHAPES), points, 2, generator=g) * 1.6 - 0.3
    weights = torch.rand(batch, queries, heads, len(SHAPES), points, generator=g)
    return value, locations, weights


def test_gather_matches_grid_sample_including_outside_points():
    value, locations, weights = random_inputs()
    assert ((locations < 0) | (locations > 1)).any()
    a = ms_deform_attn(value, SHAPES, locations, weights, "grid_sample")
    b = ms_deform_attn(value, SHAPES, locations, weights, "gather")
    assert a.shape == (2, 6, 8)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_gather_gradients_match_grid_sample():
    grads = []
    for mode in ("grid_sample", "gather"):
        value, locations, weights = random_inputs(seed=1)
        value.requires_grad_(True)
        locations.requires_grad_(True)
        ms_deform_attn(value, SHAPES, locations, weights, mode).pow(2).sum().backward()
        grads.append((value.grad, locations.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-4, rtol=0)


def test_gather_hand_values():
    # 1 x 2 map [[1, 3]]: pixel centres at x = 0.25 and 0.75 (align_corners=False)
    value = torch.tensor([[[[1.0, 3.0]]]])
    points = [[0.25, 0.5], [0.5, 0.5], [0.0, 0.5], [1.5, 0.5]]
    locations = torch.tensor(points)[None, :, None, :]  # 4 queries with one point each
    out = _sample_gather(value, locations, torch.ones(1, 4, 1))  # [1, 1, 4]
    # centre of pixel 0, halfway, half a pixel left of the map (half zero padding), far outside
    assert out.flatten().tolist() == pytest.approx([1.0, 2.0, 0.5, 0.0])
    ref = F.grid_sample(value, 2 * locations - 1, align_corners=False)
    assert ref.flatten().tolist() == pytest.approx([1.0, 2.0, 0.5, 0.0])
    # the attention weight scales each point's sample
    halved = _sample_gather(value, locations, torch.full((1, 4, 1), 0.5))
    assert halved.flatten().tolist() == pytest.approx([0.5, 1.0, 0.25, 0.0])


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_modes_agree(ref_dim):
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=3)
    with torch.no_grad():  # non-trivial offsets / weights (the standard init zeroes their weights)
        module.sampling_offsets.weight.normal_(0, 0.5)
        module.attention_weights.weight.normal_(0, 0.5)
    query = torch.randn(2, 5, 16)
    value = torch.randn(2, sum(h * w for h, w in SHAPES), 16)
    ref = torch.rand(2, 5, 3, ref_dim)
    a = module(query, ref, value, SHAPES)
    module.sampling = "gather"
    b = module(query, ref, value, SHAPES)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_standard_init():
    module = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    bias = module.sampling_offsets.bias.view(4, 2, 3, 2)
    # head h looks along angle h * 90 degrees, point p at distance p + 1
    torch.testing.assert_close(bias[0, 0, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(bias[1, 1, 2], torch.tensor([0.0, 3.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[2, 0, 1], torch.tensor([-2.0, 0.0]), atol=1e-6, rtol=0)
    assert module.sampling_offsets.weight.abs().sum() == 0
    assert module.attention_weights.weight.abs().sum() == 0 and module.attention_weights.bias.abs().sum() == 0


def test_unknown_sampling_mode():
    with pytest.raises(ValueError, match="sampling"):
        MSDeformAttn(16, 1, 2, 2, sampling="nearest")


class _Wrapped(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, query, ref, value):
        return self.module(query, ref, value, SHAPES)


@pytest.mark.parametrize("sampling", ["gather", "grid_sample"])
def test_onnx_export_matches_onnxruntime(sampling):
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=2, sampling=sampling).eval()
    with torch.no_grad():
        module.sampling_offsets.weight.normal_(0, 0.5)
    total = sum(h * w for h, w in SHAPES)
    example = (torch.randn(1, 4, 16), torch.rand(1, 4, 3, 2), torch.randn(1, total, 16))
    f = io.BytesIO()
    names = ["query", "ref", "value"]
    with expected_tracing_notes_silenced():
        torch.onnx.export(_Wrapped(module), example, f, dynamo=False, opset_version=17, input_names=names,
                          output_names=["out"], dynamic_axes={n: {0: "batch"} for n in names + ["out"]})
    ops = {node.op_type for node in __import__("onnx").load_from_string(f.getvalue()).graph.node}
    assert ("GridSample" in ops) == (sampling == "grid_sample")
    session = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    # a different batch size than at export, points partly outside the maps
    inputs = (torch.randn(3, 4, 16), torch.rand(3, 4, 3, 2) * 1.4 - 0.2, torch.randn(3, total, 16))
    got = session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})[0]
    with torch.no_grad():
        expected = module(*inputs, SHAPES).numpy()
    assert got.shape == (3, 4, 16)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert math.isfinite(float(np.abs(got).max()))

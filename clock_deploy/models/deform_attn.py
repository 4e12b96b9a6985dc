"""Multi-scale deformable attention (Zhu et al., Deformable DETR) in pure PyTorch.

Two interchangeable ways to sample the value maps at fractional locations:
- "grid_sample": F.grid_sample (bilinear, zeros padding, align_corners=False) -> ONNX GridSample;
- "gather": the same bilinear interpolation written with an explicit index gather -> ONNX Gather,
  for runtimes that mishandle GridSample (TensorRT has been reported to miscompile it).
Both give the same numbers (tests/test_deform_attn.py). RT-DETRv2's "discrete" method is a third,
different rule (nearest pixel, clamped to the map; also one Gather), chosen by the module's
`discrete` flag rather than by `sampling`, since it changes the outputs.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from clock_deploy.config import SAMPLING_MODES
from clock_deploy.errors import UserError
from clock_deploy.models.transformer_utils import unflatten_dim


def _sample_grid_sample(value, locations, weights):
    """Weighted sum of bilinear samples of one level.

    value [N, C, H, W], locations [N, Lq, P, 2] in [0, 1] (x, y), weights [N, Lq, P] -> [N, C, Lq].
    """
    samples = F.grid_sample(value, 2 * locations - 1, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (samples * weights[:, None]).sum(-1)


def _sample_gather(value, locations, weights):
    """Same as `_sample_grid_sample`, built from one Gather of the four neighbours of every point.

    Pixel centres sit at (i + 0.5) / size (align_corners=False); neighbours outside the map
    contribute zero (padding_mode="zeros"). The flat index is formed in integers, so it stays
    exact in a float16 graph.
    """
    channels, height, width = value.shape[1:]
    num_queries, num_points = locations.shape[1], locations.shape[2]
    x = locations[..., 0] * width - 0.5
    y = locations[..., 1] * height - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    # the four neighbours: (dx, dy, bilinear weight)
    corners = [(0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)]
    indices, corner_weights = [], []
    for dx, dy, weight in corners:
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
        # clamp while still float (integer Clip is poorly supported), then index in integers
        flat = yi.clamp(0, height - 1).long() * width + xi.clamp(0, width - 1).long()
        indices.append(flat)
        corner_weights.append(weight * inside.to(weight.dtype) * weights)
    # offset every map by its position in the batch so one Gather over [N * H * W, C] does it all
    offset = (torch.arange(value.shape[0], device=value.device) * (height * width))[:, None, None, None]
    index = (torch.stack(indices, dim=2) + offset).flatten()                       # [N * Lq * 4 * P]
    table = value.flatten(2).transpose(1, 2).reshape(-1, channels)                  # [N * H * W, C]
    picked = table.index_select(0, index).view(-1, num_queries, 4 * num_points, channels)
    # per query: [1, 4P] bilinear x attention weights @ [4P, C] neighbour values
    total_weights = torch.stack(corner_weights, dim=2).flatten(2)[:, :, None]      # [N, Lq, 1, 4P]
    return (total_weights @ picked).squeeze(2).transpose(1, 2)


def _sample_discrete(value, locations, weights):
    """RT-DETRv2 "discrete" sampling: the pixel at floor(location * size + 0.5), clamped to the map
    (points outside read the border, not zeros), times the attention weight; one Gather.

    value [N, C, H, W], locations [N, Lq, P, 2] (x, y), weights [N, Lq, P] -> [N, C, Lq].
    """
    channels, height, width = value.shape[1:]
    num_queries, num_points = locations.shape[1], locations.shape[2]
    x = (locations[..., 0] * width + 0.5).floor().clamp(0, width - 1)
    y = (locations[..., 1] * height + 0.5).floor().clamp(0, height - 1)
    offset = (torch.arange(value.shape[0], device=value.device) * (height * width))[:, None, None]
    index = (y.long() * width + x.long() + offset).flatten()                        # [N * Lq * P]
    table = value.flatten(2).transpose(1, 2).reshape(-1, channels)                  # [N * H * W, C]
    picked = table.index_select(0, index).view(-1, num_queries, num_points, channels)
    return (weights[:, :, None] @ picked).squeeze(2).transpose(1, 2)


def ms_deform_attn_points(value, spatial_shapes, locations, weights, points_per_level, sampling="grid_sample",
                          discrete=False):
    """ms_deform_attn with a number of points per level (RT-DETRv2), points of all levels in one axis.

    locations: [B, Lq, nH, sum(points_per_level), 2], level by level; weights: [B, Lq, nH, sum(points)];
    `discrete`: RT-DETRv2's nearest-pixel rule instead of bilinear sampling (`sampling` is then unused).
    """
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"unknown deformable attention sampling '{sampling}', expected one of {SAMPLING_MODES}")
    sample = _sample_discrete if discrete else _sample_grid_sample if sampling == "grid_sample" else _sample_gather
    num_heads, head_dim = value.shape[2], value.shape[3]
    num_queries = locations.shape[1]
    per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    level_locations = locations.split(list(points_per_level), dim=3)
    level_weights = weights.split(list(points_per_level), dim=3)
    out = 0
    for level, (height, width) in enumerate(spatial_shapes):
        # heads fold into the batch: [B, HW, nH, Dh] -> [B * nH, Dh, H, W]
        level_value = per_level[level].permute(0, 2, 3, 1).reshape(-1, head_dim, height, width)
        points = points_per_level[level]
        loc = level_locations[level].transpose(1, 2).flatten(0, 1)                            # [B*nH, Lq, P, 2]
        wgt = level_weights[level].transpose(1, 2).reshape(-1, num_queries, points)           # [B*nH, Lq, P]
        # summing level by level avoids materializing all levels' samples at once (2x faster on CPU)
        out = out + sample(level_value, loc, wgt)                                            # [B*nH, Dh, Lq]
    # (no batch size in the reshapes: it stays dynamic in exported graphs)
    return out.reshape(-1, num_heads * head_dim, num_queries).transpose(1, 2)


def ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights, sampling="grid_sample"):
    """Core of deformable attention: weighted sum of bilinear samples over levels and points.

    value: [B, S, nH, Dh] flattened multi-level values, S = sum(H * W)
    spatial_shapes: list of (H, W) Python ints per level (static for a given input size)
    sampling_locations: [B, Lq, nH, nL, nP, 2] normalized (x, y); points outside the map read zeros
    attention_weights: [B, Lq, nH, nL, nP] (softmax over nL * nP)
    returns [B, Lq, nH * Dh]
    """
    levels, points = sampling_locations.shape[3], sampling_locations.shape[4]
    return ms_deform_attn_points(value, spatial_shapes, sampling_locations.flatten(3, 4),
                                 attention_weights.flatten(3, 4), [points] * levels, sampling)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module: each query attends to n_points learned offsets
    around its reference point on each of n_levels maps, per head.

    RT-DETRv2 options: `n_points` may be a list (points per level); `offset_scale` scales the
    offsets of box references (0.5 = Deformable DETR); `discrete` samples the nearest pixel.
    """

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4, sampling="grid_sample",
                 offset_scale=0.5, discrete=False):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"unknown deformable attention sampling '{sampling}', expected one of {SAMPLING_MODES}")
        points = [n_points] * n_levels if isinstance(n_points, int) else list(n_points)
        if len(points) != n_levels:
            raise ValueError(f"{len(points)} point counts for {n_levels} levels")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.points_per_level, self.offset_scale, self.discrete = points, offset_scale, discrete
        self.sampling = sampling
        total = sum(points)
        self.sampling_offsets = nn.Linear(d_model, n_heads * total * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * total)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        # per point: 1 / (points of its level), and its level's index (for pixel offsets)
        self.register_buffer("point_scale", torch.tensor([1.0 / n for n in points for _ in range(n)]),
                             persistent=False)
        self.point_level = [level for level, n in enumerate(points) for _ in range(n)]
        self._reset_parameters()
        if discrete:  # nearest-pixel sampling has no gradient for the offsets: the original freezes them
            self.sampling_offsets.requires_grad_(False)

    def _reset_parameters(self):
        # offsets start on a ring of directions, one per head, growing with the point index in its level
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        steps = torch.cat([torch.arange(1, n + 1, dtype=torch.float32) for n in self.points_per_level])
        grid = directions[:, None, :] * steps[None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query, reference_points, value_input, spatial_shapes):
        """
        query: [B, Lq, D]
        reference_points: [B, Lq, nL, 2] normalized points, or [B, Lq, nL, 4] cxcywh boxes
            (offsets are then relative to the box size)
        value_input: [B, S, D] flattened multi-level maps
        spatial_shapes: list of (H, W) per level
        returns [B, Lq, D]
        """
        heads, total = self.n_heads, len(self.point_level)
        value = unflatten_dim(self.value_proj(value_input), -1, (heads, -1))
        offsets = unflatten_dim(self.sampling_offsets(query), -1, (heads, total, 2))
        weights = unflatten_dim(self.attention_weights(query), -1, (heads, total)).softmax(-1)
        ref = reference_points[:, :, None, self.point_level, :]  # [B, Lq, 1, P, 2 | 4]: each point's level
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level
            normalizer = torch.tensor([[spatial_shapes[lv][1], spatial_shapes[lv][0]] for lv in self.point_level],
                                      dtype=query.dtype, device=query.device)
            locations = ref + offsets / normalizer
        elif reference_points.shape[-1] == 4:
            scale = self.point_scale.to(query.dtype)[:, None] * self.offset_scale
            locations = ref[..., :2] + offsets * scale * ref[..., 2:]
        else:
            raise ValueError(f"reference_points must end in 2 or 4 values, got {reference_points.shape[-1]}")
        out = ms_deform_attn_points(value, spatial_shapes, locations, weights, self.points_per_level,
                                    self.sampling, self.discrete)
        return self.output_proj(out)


def set_sampling(model, mode):
    """Switch every deformable attention of `model` to `mode`; returns how many were switched (0 for DAB-DETR)."""
    if mode not in SAMPLING_MODES:
        raise UserError(f"sampling must be one of {list(SAMPLING_MODES)}, got '{mode}'")
    layers = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    for layer in layers:
        layer.sampling = mode
    return len(layers)


def model_sampling(model):
    """The deformable attention sampling mode of `model`, or None when it has no deformable attention."""
    modes = {m.sampling for m in model.modules() if isinstance(m, MSDeformAttn)}
    return modes.pop() if len(modes) == 1 else None

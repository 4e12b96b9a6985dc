"""Sine position embeddings: of feature-map grids (DETR) and of boxes / points (DAB-DETR, DINO).

Everything is float32 (no float64, no linspace) so the graphs export to ONNX / TensorRT.
"""
import math

import torch
from torch import nn


def _frequencies(num_feats, temperature, device):
    """temperature ** (2 * (i // 2) / num_feats): each frequency is used once for sin and once for cos."""
    i = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / num_feats)


def _interleave_sin_cos(angles):
    """[..., F] angles -> [..., F] with sin on even and cos on odd frequencies."""
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """DETR sine embedding of the (y, x) grid of a [B, C, H, W] map -> [B, 2 * num_pos_feats, H, W].

    Row i of H sits at (i + 1) / H * scale like DETR's normalize=True (also DAB-DETR and DINO),
    or at the cell centre (i + 0.5) / H with `centred` (Deformable DETR). The project feeds
    fixed-size batches without padding, so there is no mask: every image gets the same grid.
    """

    def __init__(self, num_pos_feats=128, temperature=10000, scale=2 * math.pi, centred=False):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale
        self.offset = 0.5 if centred else 1.0

    def forward(self, x):
        batch, _, height, width = x.shape
        eps = 1e-6
        y = (torch.arange(height, dtype=torch.float32, device=x.device) + self.offset) / (height + eps) * self.scale
        x_pos = (torch.arange(width, dtype=torch.float32, device=x.device) + self.offset) / (width + eps) * self.scale
        freqs = _frequencies(self.num_pos_feats, self.temperature, x.device)
        pos_y = _interleave_sin_cos(y[:, None] / freqs)      # [H, F]
        pos_x = _interleave_sin_cos(x_pos[:, None] / freqs)  # [W, F]
        feats = self.num_pos_feats
        pos = torch.cat([pos_y[:, None, :].expand(height, width, feats),
                         pos_x[None, :, :].expand(height, width, feats)], dim=-1)
        return pos.permute(2, 0, 1)[None].expand(batch, -1, -1, -1).to(x.dtype)


def gen_sineembed_for_position(pos, num_feats=128, temperature=10000):
    """Sine embedding of normalized points / boxes [..., 2 or 4] -> [..., num_feats * 2 or 4].

    Coordinate order of the output follows DAB-DETR: (y, x) for points, (y, x, w, h) for
    cxcywh boxes, each coordinate scaled by 2*pi and embedded with `num_feats` channels.
    """
    freqs = _frequencies(num_feats, temperature, pos.device)
    scaled = pos.float() * (2 * math.pi)
    embeds = [_interleave_sin_cos(scaled[..., i, None] / freqs) for i in range(pos.shape[-1])]
    embeds[0], embeds[1] = embeds[1], embeds[0]  # (x, y, ...) -> (y, x, ...)
    return torch.cat(embeds, dim=-1).to(pos.dtype)

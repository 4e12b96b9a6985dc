"""RT-DETR's hybrid encoder (Zhao et al. 2024): AIFI self-attention on the coarsest level only, then
CCFF, a top-down + bottom-up fusion of all levels with CSP blocks of RepVGG convs.

Layer for layer as transformers' RTDetrV2HybridEncoder (convert/rt_detr.py maps its names).
"""
import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clock_deploy.models.resnet_vd import ACTIVATIONS, ConvNorm
from clock_deploy.models.transformer_utils import EncoderLayer, unflatten_dim


@functools.lru_cache(maxsize=32)
def _sine_table(height, width, dim, temperature):
    quarter = dim // 4
    omega = 1.0 / temperature ** (np.arange(quarter, dtype=np.float64) / quarter)
    ys, xs = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    y, x = ys.reshape(-1, 1) * omega, xs.reshape(-1, 1) * omega
    return np.concatenate([np.sin(y), np.cos(y), np.sin(x), np.cos(x)], axis=1).astype(np.float32)


def sine_embedding_2d(height, width, dim, temperature=10000.0, device=None):
    """[H * W, dim] fixed 2-D sine embedding, rows in row-major order: [sin y | cos y | sin x | cos x]
    of the integer grid position (transformers' RT-DETR layout). Computed in float64 outside torch,
    so an exported graph holds it as one float32 constant."""
    return torch.from_numpy(_sine_table(int(height), int(width), int(dim), float(temperature))).to(device)


class RepVggBlock(nn.Module):
    """3x3 conv-BN + 1x1 conv-BN branches, summed, then the activation; fuse() merges them for inference."""

    def __init__(self, channels, activation):
        super().__init__()
        self.conv1 = ConvNorm(channels, channels, 3)
        self.conv2 = ConvNorm(channels, channels, 1)
        self.act = ACTIVATIONS[activation]()
        self.conv = None  # the single 3x3 conv once fused

    def forward(self, x):
        if self.conv is not None:
            return self.act(self.conv(x))
        return self.act(self.conv1(x) + self.conv2(x))

    @torch.no_grad()
    def fuse(self):
        """Inference only (models/fuse.py): both branches are linear once their BN is folded, so their sum is
        one 3x3 conv: the 1x1 kernel sits at the centre of a zero 3x3 kernel (same 'same' padding)."""
        if self.conv is not None:
            return
        self.conv1.fuse()
        self.conv2.fuse()
        conv = self.conv1.conv
        conv.weight += F.pad(self.conv2.conv.weight, [1, 1, 1, 1])
        conv.bias += self.conv2.conv.bias
        del self.conv1, self.conv2
        self.conv = conv


class CSPRepLayer(nn.Module):
    """CSP fusion block: two 1x1 branches of the concatenated input, one through RepVGG blocks, summed."""

    def __init__(self, in_ch, out_ch, num_blocks, expansion, activation):
        super().__init__()
        hidden = int(out_ch * expansion)
        self.conv1 = ConvNorm(in_ch, hidden, 1, activation=activation)
        self.conv2 = ConvNorm(in_ch, hidden, 1, activation=activation)
        self.bottlenecks = nn.Sequential(*[RepVggBlock(hidden, activation) for _ in range(num_blocks)])
        self.conv3 = ConvNorm(hidden, out_ch, 1, activation=activation) if hidden != out_ch else nn.Identity()

    def forward(self, x):
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class HybridEncoder(nn.Module):
    """Projected backbone maps (finest first, `hidden_dim` channels) -> fused maps of the same shapes.

    `num_layers` AIFI layers run on the last level; CCFF fuses top-down (lateral 1x1 conv, nearest
    upsampling to the finer map, CSP block) then bottom-up (stride-2 3x3 conv, CSP block).
    """

    def __init__(self, num_levels, hidden_dim, nheads, ffn_dim, num_layers, dropout=0.0, expansion=1.0,
                 csp_blocks=3, activation="silu", encoder_activation="gelu", temperature=10000.0):
        super().__init__()
        self.hidden_dim, self.temperature = hidden_dim, temperature
        # AIFI: DETR's post-norm encoder layer on the coarsest level's tokens
        self.aifi = nn.ModuleList(EncoderLayer(hidden_dim, nheads, ffn_dim, dropout, encoder_activation)
                                  for _ in range(num_layers))

        def csp():
            return CSPRepLayer(2 * hidden_dim, hidden_dim, csp_blocks, expansion, activation)
        stages = num_levels - 1
        self.lateral_convs = nn.ModuleList(ConvNorm(hidden_dim, hidden_dim, 1, activation=activation)
                                           for _ in range(stages))
        self.fpn_blocks = nn.ModuleList(csp() for _ in range(stages))
        self.downsample_convs = nn.ModuleList(ConvNorm(hidden_dim, hidden_dim, 3, 2, activation=activation)
                                              for _ in range(stages))
        self.pan_blocks = nn.ModuleList(csp() for _ in range(stages))

    def position(self, height, width, device):
        """[H * W, hidden_dim] sine embedding of a level (AIFI's; also the memory_pos of the model)."""
        return sine_embedding_2d(height, width, self.hidden_dim, self.temperature, device)

    def attend_last(self, x):
        """AIFI on one map [B, D, H, W]."""
        height, width = x.shape[-2:]
        tokens = x.flatten(2).transpose(1, 2)
        pos = self.position(height, width, x.device).to(x.dtype)[None]
        for layer in self.aifi:
            tokens = layer(tokens, pos)
        return unflatten_dim(tokens.transpose(1, 2), 2, (height, width))

    def forward(self, maps):
        maps = list(maps)
        if len(self.aifi):
            maps[-1] = self.attend_last(maps[-1])
        # top-down: each coarser map, after its lateral conv, is upsampled onto the next finer one
        inner = [maps[-1]]
        for i, (lateral, block) in enumerate(zip(self.lateral_convs, self.fpn_blocks)):
            top = lateral(inner[0])
            inner[0] = top
            finer = maps[-2 - i]
            # 2x nearest upsampling, written as the finer map's size so odd sizes (e.g. 375 px rows) fit too
            fused = torch.cat([F.interpolate(top, size=finer.shape[-2:], mode="nearest"), finer], dim=1)
            inner.insert(0, block(fused))
        # bottom-up: each finer output, downsampled, is fused with the next coarser top-down map
        outs = [inner[0]]
        for i, (down, block) in enumerate(zip(self.downsample_convs, self.pan_blocks)):
            outs.append(block(torch.cat([down(outs[-1]), inner[i + 1]], dim=1)))
        return outs

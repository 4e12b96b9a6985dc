"""ResNet-18/34/50 backbones with torchvision-compatible parameter names.

Written in-project (torchvision is not a dependency) but with the same module names, so a
torchvision ImageNet state dict loads directly. The base `width` scales every stage; 64 is
the torchvision ResNet, smaller widths give tiny models for tests and CPU demos.
"""
import os

import torch
from torch import nn

from clock_deploy.errors import UserError
from clock_deploy.io import torch_load
from clock_deploy.models.fuse import fold_pairs, fold_sequential

LEVEL_STRIDES = (4, 8, 16, 32)  # layer1..layer4


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all buffers, nothing trains).

    Keys match nn.BatchNorm2d (weight, bias, running_mean, running_var) minus
    num_batches_tracked, which is dropped when loading a regular BN state dict.
    """

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def conv3x3(in_ch, out_ch, stride=1):
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch, out_ch, stride=1):
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch, planes, stride, norm):
        super().__init__()
        self.conv1 = conv3x3(in_ch, planes, stride)
        self.bn1 = norm(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_ch, planes * self.expansion, stride, norm)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)

    def fuse(self):
        """Inference only (models/fuse.py): each BN folded into its conv, the BNs become Identity."""
        fold_pairs(self, ("conv1", "bn1"), ("conv2", "bn2"))
        _fuse_downsample(self.downsample)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv, as torchvision)."""
    expansion = 4

    def __init__(self, in_ch, planes, stride, norm):
        super().__init__()
        self.conv1 = conv1x1(in_ch, planes)
        self.bn1 = norm(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = norm(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_ch, planes * self.expansion, stride, norm)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)

    def fuse(self):
        """Inference only (models/fuse.py): each BN folded into its conv, the BNs become Identity."""
        fold_pairs(self, ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
        _fuse_downsample(self.downsample)


def _downsample(in_ch, out_ch, stride, norm):
    """Projection shortcut (named downsample.0 / downsample.1 like torchvision) when shapes change."""
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(conv1x1(in_ch, out_ch, stride), norm(out_ch))


def _fuse_downsample(downsample):
    if downsample is not None:
        fold_sequential(downsample)


ARCHS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}


class ResNetBackbone(nn.Module):
    """ResNet trunk returning the maps of `return_levels` (0..3 = layer1..layer4).

    Attributes: num_channels / strides of the returned maps, in order. Stages after the
    deepest returned level are not built (they would hold unused parameters).
    """

    def __init__(self, depth=50, width=64, return_levels=(1, 2, 3), frozen_bn=True):
        super().__init__()
        if depth not in ARCHS:
            raise UserError(f"model.backbone.depth must be one of {sorted(ARCHS)}, got {depth}")
        levels = list(return_levels)
        if not levels or levels != sorted(set(levels)) or levels[0] < 0 or levels[-1] > 3:
            raise UserError(f"model.backbone.return_levels must be increasing values in 0..3, got {levels}")
        if width < 1:
            raise UserError(f"model.backbone.width must be positive, got {width}")
        block, counts = ARCHS[depth]
        norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        self.depth, self.width, self.return_levels = depth, width, levels
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = width
        self.num_channels, self.strides = [], []
        for level in range(levels[-1] + 1):
            planes = width * 2 ** level
            stride = 1 if level == 0 else 2
            blocks = []
            for i in range(counts[level]):
                blocks.append(block(in_ch, planes, stride if i == 0 else 1, norm))
                in_ch = planes * block.expansion
            self.add_module(f"layer{level + 1}", nn.Sequential(*blocks))
            if level in levels:
                self.num_channels.append(in_ch)
                self.strides.append(LEVEL_STRIDES[level])
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images):
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        outputs = []
        for level in range(self.return_levels[-1] + 1):
            x = getattr(self, f"layer{level + 1}")(x)
            if level in self.return_levels:
                outputs.append(x)
        return outputs

    def fuse(self):
        """Inference only (models/fuse.py): the stem's BN folded into its conv (the blocks fuse their own)."""
        fold_pairs(self, ("conv1", "bn1"))

    def freeze_stem(self):
        """Stop training conv1 / bn1 / layer1 (DETR practice with pretrained weights)."""
        for module in (self.conv1, self.bn1, self.layer1):
            for p in module.parameters():
                p.requires_grad_(False)

    def load_backbone_weights(self, path):
        """Load a torchvision-format ResNet state dict (fc.* and stages not built are ignored)."""
        if self.width != 64:
            raise UserError(f"{path}: torchvision ResNet weights need model.backbone.width=64, "
                            f"got width {self.width}")
        if not os.path.isfile(path):
            raise UserError(f"{path}: backbone weights file not found (model.backbone.weights)")
        state = torch_load(path, "ResNet state dict (model.backbone.weights)")
        if not isinstance(state, dict):
            raise UserError(f"{path}: expected a ResNet state dict, got {type(state).__name__}")
        built = {f"layer{i + 1}." for i in range(self.return_levels[-1] + 1)}
        state = {k: v for k, v in state.items()
                 if not k.startswith("fc.") and not (k.startswith("layer") and k[:7] not in built)}
        own = self.state_dict()
        optional = {k for k in own if k.endswith("num_batches_tracked")}
        missing = sorted(set(own) - set(state) - optional)
        unexpected = sorted(set(state) - set(own) - {k for k in state if k.endswith("num_batches_tracked")})
        mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or mismatched:
            problems = []
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
                if keys:
                    problems.append(f"{len(keys)} {name} keys (e.g. {', '.join(keys[:3])})")
            raise UserError(f"{path}: not a ResNet-{self.depth} state dict: " + "; ".join(problems))
        self.load_state_dict(state, strict=False)


def build_backbone(cfg):
    """ResNetBackbone from a BackboneConfig; loads `weights` and freezes the stem if asked."""
    backbone = ResNetBackbone(cfg.depth, cfg.width, cfg.return_levels, cfg.frozen_bn)
    if cfg.weights:
        backbone.load_backbone_weights(cfg.weights)
        if cfg.freeze_stem:
            backbone.freeze_stem()
    return backbone

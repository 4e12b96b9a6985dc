"""ResNet-vd backbones (He et al. 2019 "Bag of tricks", as RT-DETR's PResNet): deep 3-conv stem and
average-pool shortcuts on downsampling, depths 18 / 34 (basic blocks) and 50 (bottlenecks).

Follows transformers' RTDetrResNet layer for layer (convert/rt_detr.py maps its names): the first
block of every stage has a projection shortcut, stride-2 shortcuts are AvgPool(2, ceil) + 1x1 conv,
bottlenecks stride on their 3x3 conv. `width` scales the stem and every stage (64 = the original).
"""
from torch import nn

from clock_deploy.errors import UserError
from clock_deploy.models.backbone import LEVEL_STRIDES, FrozenBatchNorm2d
from clock_deploy.models.fuse import fold_pairs

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


class ConvNorm(nn.Module):
    """Conv (no bias, 'same' padding) + norm + optional activation."""

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, activation=None, norm=nn.BatchNorm2d):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding=(kernel_size - 1) // 2, bias=False)
        self.norm = norm(out_ch)
        self.act = ACTIVATIONS[activation]() if activation else nn.Identity()

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))

    def fuse(self):
        """Inference only (models/fuse.py): the norm folded into the conv, which gains a bias."""
        fold_pairs(self, ("conv", "norm"))


def _shortcut(in_ch, out_ch, stride, norm):
    """Projection shortcut of a stage's first block: AvgPool + 1x1 conv when it downsamples (vd)."""
    if stride == 2:
        return nn.Sequential(nn.AvgPool2d(2, 2, 0, ceil_mode=True), ConvNorm(in_ch, out_ch, 1, norm=norm))
    return ConvNorm(in_ch, out_ch, 1, norm=norm)


class BasicBlockVd(nn.Module):
    expansion = 1

    def __init__(self, in_ch, planes, stride, first, norm):
        super().__init__()
        self.convs = nn.Sequential(ConvNorm(in_ch, planes, 3, stride, "relu", norm),
                                   ConvNorm(planes, planes, 3, norm=norm))
        self.shortcut = _shortcut(in_ch, planes, stride, norm) if first else None
        self.act = nn.ReLU()

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.act(self.convs(x) + identity)


class BottleneckVd(nn.Module):
    expansion = 4

    def __init__(self, in_ch, planes, stride, first, norm):
        super().__init__()
        out_ch = planes * self.expansion
        self.convs = nn.Sequential(ConvNorm(in_ch, planes, 1, 1, "relu", norm),
                                   ConvNorm(planes, planes, 3, stride, "relu", norm),
                                   ConvNorm(planes, out_ch, 1, norm=norm))
        self.shortcut = _shortcut(in_ch, out_ch, stride, norm) if first else None
        self.act = nn.ReLU()

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.act(self.convs(x) + identity)


ARCHS = {18: (BasicBlockVd, (2, 2, 2, 2)), 34: (BasicBlockVd, (3, 4, 6, 3)), 50: (BottleneckVd, (3, 4, 6, 3))}


class ResNetVd(nn.Module):
    """ResNet-vd trunk returning the maps of `return_levels` (0..3 = layer1..layer4, strides 4..32).

    Same interface as backbone.ResNetBackbone: num_channels / strides of the returned maps, and
    stages after the deepest returned level are not built.
    """

    def __init__(self, depth=50, width=64, return_levels=(1, 2, 3), frozen_bn=True):
        super().__init__()
        if depth not in ARCHS:
            raise UserError(f"model.backbone.depth must be one of {sorted(ARCHS)}, got {depth}")
        levels = list(return_levels)
        if not levels or levels != sorted(set(levels)) or levels[0] < 0 or levels[-1] > 3:
            raise UserError(f"model.backbone.return_levels must be increasing values in 0..3, got {levels}")
        if width < 2 or width % 2:
            raise UserError(f"model.backbone.width must be a positive even number for ResNet-vd, got {width}")
        block, counts = ARCHS[depth]
        norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        self.depth, self.width, self.return_levels = depth, width, levels
        self.stem = nn.Sequential(ConvNorm(3, width // 2, 3, 2, "relu", norm),
                                  ConvNorm(width // 2, width // 2, 3, 1, "relu", norm),
                                  ConvNorm(width // 2, width, 3, 1, "relu", norm))
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = width
        self.num_channels, self.strides = [], []
        for level in range(levels[-1] + 1):
            planes = width * 2 ** level
            blocks = []
            for i in range(counts[level]):
                blocks.append(block(in_ch, planes, 2 if level > 0 and i == 0 else 1, i == 0, norm))
                in_ch = planes * block.expansion
            self.add_module(f"layer{level + 1}", nn.Sequential(*blocks))
            if level in levels:
                self.num_channels.append(in_ch)
                self.strides.append(LEVEL_STRIDES[level])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images):
        x = self.pool(self.stem(images))
        outputs = []
        for level in range(self.return_levels[-1] + 1):
            x = getattr(self, f"layer{level + 1}")(x)
            if level in self.return_levels:
                outputs.append(x)
        return outputs

    def freeze_stem(self):
        """Stop training the stem and layer1 (RT-DETR freezes its first stage with pretrained weights)."""
        for module in (self.stem, self.layer1):
            for p in module.parameters():
                p.requires_grad_(False)


def build_resnet_vd(cfg):
    """ResNetVd from a BackboneConfig (ImageNet weights come with an imported checkpoint, not `weights`)."""
    if cfg.weights:
        raise UserError("model.backbone.weights (torchvision ResNet) does not fit the ResNet-vd of model.arch "
                        "rt_detr: start from an imported RT-DETR checkpoint with model.pretrained instead")
    return ResNetVd(cfg.depth, cfg.width, cfg.return_levels, cfg.frozen_bn)

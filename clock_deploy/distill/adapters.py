"""Pairing student and teacher feature levels, and the trainable adapters between them.

Student and teacher may have different numbers of levels (DAB-DETR keeps one,
Deformable DETR / DINO keep four) and different widths. Levels are paired by
stride (input size / map size), and a 1x1 conv per pair maps the student's
channels to the teacher's. The adapters are the only trainable weights of a
distiller; they are never part of the exported student.
"""
import math

import torch.nn.functional as F
from torch import nn


def level_stride(image_hw, map_hw):
    """Stride of a feature map as the power of two closest to input / map height."""
    return 2 ** round(math.log2(image_hw[0] / map_hw[0]))


def pair_levels(teacher_maps, student_maps, image_hw):
    """[(stride, teacher_index, student_index)] for every stride both lists have, finest first."""
    teacher = {level_stride(image_hw, m.shape[-2:]): i for i, m in enumerate(teacher_maps)}
    student = {level_stride(image_hw, m.shape[-2:]): i for i, m in enumerate(student_maps)}
    return [(s, teacher[s], student[s]) for s in sorted(teacher) if s in student]


class LevelAdapters(nn.Module):
    """One 1x1 conv per paired stride. When the widths already agree it is the identity, or, with
    `learnable`, a conv that starts as the identity (so a loss term can still shape it)."""

    def __init__(self, strides, student_channels, teacher_channels, learnable=False):
        super().__init__()
        self.strides = list(strides)
        same = student_channels == teacher_channels
        self.convs = nn.ModuleDict({
            str(s): nn.Identity() if same and not learnable else nn.Conv2d(student_channels, teacher_channels, 1)
            for s in self.strides})
        if same:
            for conv in self.convs.values():
                if isinstance(conv, nn.Conv2d):
                    nn.init.dirac_(conv.weight)
                    nn.init.zeros_(conv.bias)

    def forward(self, student_map, stride, teacher_hw):
        """Student map at `stride` in teacher channels and at the teacher's map size."""
        x = self.convs[str(stride)](student_map)
        if x.shape[-2:] != tuple(teacher_hw):
            x = F.interpolate(x, size=tuple(teacher_hw), mode="bilinear", align_corners=False)
        return x

    def pairs(self, teacher_maps, student_maps, image_hw):
        """The level pairs of this batch; only strides with an adapter (fixed when the distiller was built)."""
        return [p for p in pair_levels(teacher_maps, student_maps, image_hw) if p[0] in self.strides]

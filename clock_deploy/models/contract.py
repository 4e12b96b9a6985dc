"""The model contract every detector in clock_deploy follows (see DESIGN.md).

Distillation, training and export only depend on these types, so a new
architecture needs no change outside its own module.
"""
from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor


@dataclass
class StageOutput:
    """Predictions of one decoder layer."""
    logits: Tensor  # [B, Q, K] class logits (sigmoid / focal style, no background class)
    boxes: Tensor   # [B, Q, 4] cxcywh, normalized to [0, 1]


@dataclass
class QueryGroup:
    """Extra decoder queries passed in from outside (e.g. CLoCK target-aware queries).

    The group goes through the decoder next to the matching queries but isolated
    by the self-attention mask: matching queries never see it and it only sees
    itself (or only its own segment, when `segments` splits it), so predictions of
    the matching queries are unchanged.
    """
    content: Tensor                    # [B, G, D] content embeddings in the model's hidden size
    boxes: Tensor                      # [B, G, 4] cxcywh normalized anchors / reference boxes
    pos: Optional[Tensor] = None       # [B, G, D] positional query, for models that do not derive it from boxes
    pad_mask: Optional[Tensor] = None  # [B, G] True where the slot is padding (images with fewer GT boxes)
    # lengths of consecutive blocks of the group that do not see each other (as DN-DETR's denoising
    # groups); None = the whole group is one block
    segments: Optional[tuple] = None


@dataclass
class DenoisingOutput:
    """DINO contrastive denoising predictions and the bookkeeping to build their loss."""
    stages: list       # list[StageOutput], one per decoder layer, queries [B, Gdn, ...]
    meta: dict         # arch-specific: e.g. group count, positive/negative layout, padded targets


@dataclass
class DetrOutput:
    memory: list                  # per level [B, C, H, W]: transformer encoder output
    memory_pos: list              # per level [B, C, H, W]: position embedding of that memory
    stages: list                  # list[StageOutput], one per decoder layer; last is the prediction
    groups: list = field(default_factory=list)  # per extra QueryGroup: list[StageOutput] per layer
    features: list = field(default_factory=list)  # backbone feature maps fed to the encoder (input projections applied)
    encoder: Optional[StageOutput] = None  # two-stage encoder proposals (Deformable two-stage, DINO)
    denoising: Optional[DenoisingOutput] = None
    # [B, Q, 4] cxcywh, detached: the boxes the matching queries start from (their first decoder layer's
    # reference): the selected encoder proposals (DINO, two-stage Deformable DETR, RT-DETR), the learned
    # anchors (DAB-DETR), the learned reference points with the size the first layer gives them (one-stage
    # Deformable DETR, whose 2-D reference has no size). Q = 0 with matching=False
    anchors: Optional[Tensor] = None

    @property
    def pred_logits(self) -> Tensor:
        return self.stages[-1].logits

    @property
    def pred_boxes(self) -> Tensor:
        return self.stages[-1].boxes

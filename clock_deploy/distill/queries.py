"""Extra decoder queries asked of teacher and student (CLoCK target-aware queries, KD-DETR points).

A QuerySpec says *what* to ask (a class hint and an anchor box per slot) independently of
any model; `query_group(model, spec)` turns it into that model's QueryGroup in the model's
own language, so teacher and student get the same boxes and the same class hints and their
answers can be compared slot by slot:

  content  DINO: its own denoising label embedding `label_enc(c)` (the teacher's for the
           teacher, the student's for the student); class-free slots get zero content, as
           DINO's padded denoising slots do. DAB-DETR / Deformable DETR: zero content (their
           matching queries start from zero / learned pattern content, never from a class).
  anchor   the box; DAB-DETR / DINO use it as their 4-D anchor, Deformable DETR takes its
           centre as the reference point and the sine embedding of the whole box (centre
           and size) as the positional query.

`QuerySpec.segments` splits a spec into blocks that do not attend to each other (each noisy
repeat of the GT set, the general queries); it becomes `QueryGroup.segments`.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from clock_deploy.models.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from clock_deploy.models.contract import QueryGroup

# the anchor given to padding slots: any valid box works, padding is masked out of every loss
PAD_BOX = (0.5, 0.5, 0.1, 0.1)
MIN_SIZE = 1e-3  # keeps anchors strictly inside (0, 1) for inverse_sigmoid


@dataclass
class QuerySpec:
    labels: Tensor    # [B, G] class hint; num_classes means "no class" (general queries, padding)
    boxes: Tensor     # [B, G, 4] cxcywh normalized
    pad_mask: Tensor  # [B, G] True where the slot is padding
    segments: Optional[tuple] = None  # lengths of blocks that do not see each other (None: one block)

    @property
    def num_queries(self):
        return self.boxes.shape[1]

    @property
    def blocks(self):
        return tuple(self.segments) if self.segments is not None else (self.num_queries,)


def clip_to_image(boxes):
    """cxcywh boxes cut to the image: corners in [0, 1], sides at least MIN_SIZE."""
    x0, y0, x1, y1 = box_cxcywh_to_xyxy(boxes).unbind(-1)
    x0, y0 = x0.clamp(0.0, 1.0 - MIN_SIZE), y0.clamp(0.0, 1.0 - MIN_SIZE)
    x1, y1 = torch.maximum(x1.clamp(max=1.0), x0 + MIN_SIZE), torch.maximum(y1.clamp(max=1.0), y0 + MIN_SIZE)
    return box_xyxy_to_cxcywh(torch.stack([x0, y0, x1, y1], -1))


def noisy_anchors(boxes, noise):
    """DN-DETR box noise: centre moved by up to noise * size / 2, sides scaled by 1 +- noise (uniform)."""
    if noise <= 0 or boxes.numel() == 0:
        return clip_to_image(boxes)
    wh = boxes[..., 2:]
    shift = (torch.rand_like(boxes[..., :2]) * 2 - 1) * noise * wh / 2
    scale = 1 + (torch.rand_like(wh) * 2 - 1) * noise
    return clip_to_image(torch.cat([boxes[..., :2] + shift, wh * scale], dim=-1))


def ground_truth_layout(targets, num_classes, repeats):
    """Every GT box `repeats` times, laid out as DN-DETR's denoising groups: one block per repeat, each
    padded to the most GT boxes of an image (slots [r * n, (r + 1) * n) hold repeat r).
    Returns exact labels [B, repeats * n] (num_classes on padding), boxes [B, repeats * n, 4]
    (PAD_BOX on padding), pad_mask [B, repeats * n] and n."""
    device = targets[0]["boxes"].device
    size = max(len(t["labels"]) for t in targets)
    labels = torch.full((len(targets), repeats, size), num_classes, dtype=torch.long, device=device)
    boxes = torch.tensor(PAD_BOX, device=device).repeat(len(targets), repeats, size, 1)
    pad_mask = torch.ones(len(targets), repeats, size, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        count = len(t["labels"])
        labels[i, :, :count] = t["labels"]
        boxes[i, :, :count] = t["boxes"].float()
        pad_mask[i, :, :count] = False
    return labels.flatten(1), boxes.flatten(1, 2), pad_mask.flatten(1), size


def ground_truth_queries(targets, num_classes, repeats, box_noise):
    """Every GT box `repeats` times, each copy with its own DN-DETR noise, in ground_truth_layout.
    Each repeat is its own attention segment: the noisy copies of a box never see each other, as no
    inference query can."""
    labels, boxes, pad_mask, size = ground_truth_layout(targets, num_classes, repeats)
    real = ~pad_mask
    boxes = boxes.clone()
    boxes[real] = noisy_anchors(boxes[real], box_noise)
    return QuerySpec(labels, boxes, pad_mask, (size,) * repeats)


def class_free(boxes, num_classes):
    """A spec of class-free anchors [B, G, 4] without padding."""
    labels = torch.full(boxes.shape[:2], num_classes, dtype=torch.long, device=boxes.device)
    return QuerySpec(labels, boxes, torch.zeros(boxes.shape[:2], dtype=torch.bool, device=boxes.device))


def random_queries(batch, count, num_classes, device):
    """CLoCK general sampling: centres uniform in the image, sides uniform in [0.05, 0.5], per image."""
    centre = torch.rand(batch, count, 2, device=device)
    size = 0.05 + 0.45 * torch.rand(batch, count, 2, device=device)
    return class_free(clip_to_image(torch.cat([centre, size], dim=-1)), num_classes)


def embedding_anchors(batch, count, num_classes, device):
    """KD-DETR random points: sigmoid of a freshly drawn nn.Embedding(count, 4) weight (N(0, 1)),
    the same anchors for every image of the batch."""
    boxes = torch.randn(count, 4, device=device).sigmoid()
    return class_free(boxes[None].expand(batch, -1, -1), num_classes)


def concat(*specs):
    """Slots of several specs side by side (same batch)."""
    specs = [s for s in specs if s is not None and s.num_queries > 0]
    if not specs:
        return None
    return QuerySpec(torch.cat([s.labels for s in specs], 1), torch.cat([s.boxes for s in specs], 1),
                     torch.cat([s.pad_mask for s in specs], 1), tuple(b for s in specs for b in s.blocks))


class TargetQuerySampler:
    """CLoCK TCLD queries: GT boxes x repeats with DN-DETR noise + random general anchors, each repeat
    and the general anchors in their own attention segment."""

    def __init__(self, num_classes, repeats=3, box_noise=0.4, random_count=100):
        self.num_classes, self.repeats = num_classes, repeats
        self.box_noise, self.random_count = box_noise, random_count

    def __call__(self, images, targets):
        gt = ground_truth_queries(targets, self.num_classes, self.repeats, self.box_noise) if self.repeats else None
        general = random_queries(len(targets), self.random_count, self.num_classes, images.device)
        return concat(gt, general)


class RandomAnchorSampler:
    """KD-DETR's shared random points (nn.Embedding(n, 4)-style anchors, zero content)."""

    def __init__(self, num_classes, count=100):
        self.num_classes, self.count = num_classes, count

    def __call__(self, images, targets):
        if not self.count:
            return None
        return embedding_anchors(len(images), self.count, self.num_classes, images.device)


def query_group(model, spec, own_content=True):
    """QuerySpec -> the model's QueryGroup: content from the model's own label embedding when it
    has one (`label_enc`, DINO's denoising embedding) and own_content is set, else zero content."""
    batch, count = spec.labels.shape
    label_enc = getattr(model, "label_enc", None) if own_content else None
    if label_enc is None:
        content = spec.boxes.new_zeros(batch, count, model.hidden_dim)
    else:
        has_class = spec.labels < model.num_classes
        content = label_enc(spec.labels.clamp(max=model.num_classes - 1)) * has_class[..., None]
    return QueryGroup(content=content, boxes=spec.boxes, pad_mask=spec.pad_mask, segments=spec.segments)

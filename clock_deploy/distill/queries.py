"""Extra decoder queries shared by teacher and student (CLoCK target-aware queries, KD-DETR sampling).

A QuerySpec says *what* to ask both decoders (a class hint and an anchor box per
slot) independently of any model; a frozen QueryEncoder per model turns it into
that model's QueryGroup (its hidden size). Teacher and student therefore get
the same boxes and the same class hints, so their answers can be compared slot
by slot.
"""
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from clock_deploy.models.contract import QueryGroup

# the anchor given to padding slots: any valid box works, padding is masked out of every loss
PAD_BOX = (0.5, 0.5, 0.1, 0.1)
MIN_SIZE = 1e-3  # keeps anchors strictly inside (0, 1) for inverse_sigmoid


@dataclass
class QuerySpec:
    labels: Tensor    # [B, G] class hint; num_classes means "no class" (general queries, padding)
    boxes: Tensor     # [B, G, 4] cxcywh normalized
    pad_mask: Tensor  # [B, G] True where the slot is padding

    @property
    def num_queries(self):
        return self.boxes.shape[1]


def clamp_boxes(boxes):
    """Keep cxcywh boxes valid: size in [MIN_SIZE, 1], centre inside the image."""
    wh = boxes[..., 2:].clamp(MIN_SIZE, 1.0)
    cxcy = boxes[..., :2].clamp(MIN_SIZE, 1.0 - MIN_SIZE)
    return torch.cat([cxcy, wh], dim=-1)


def jitter_boxes(boxes, noise):
    """Move the centre by up to noise * size / 2 and scale the size by up to 1 +- noise (uniform)."""
    if noise <= 0 or boxes.numel() == 0:
        return boxes
    wh = boxes[..., 2:]
    shift = (torch.rand_like(boxes[..., :2]) * 2 - 1) * noise * wh / 2
    scale = 1 + (torch.rand_like(wh) * 2 - 1) * noise
    return clamp_boxes(torch.cat([boxes[..., :2] + shift, wh * scale], dim=-1))


def ground_truth_queries(targets, num_classes, repeats, box_noise):
    """Every GT box `repeats` times (each copy jittered independently), padded to the largest image."""
    device = targets[0]["boxes"].device
    per_image = [(t["labels"].repeat(repeats), jitter_boxes(t["boxes"].repeat(repeats, 1), box_noise))
                 for t in targets]
    size = max(len(labels) for labels, _ in per_image)
    labels = torch.full((len(targets), size), num_classes, dtype=torch.long, device=device)
    boxes = torch.tensor(PAD_BOX, device=device).repeat(len(targets), size, 1)
    pad_mask = torch.ones(len(targets), size, dtype=torch.bool, device=device)
    for i, (lab, box) in enumerate(per_image):
        labels[i, :len(lab)] = lab
        boxes[i, :len(lab)] = clamp_boxes(box.float())
        pad_mask[i, :len(lab)] = False
    return QuerySpec(labels, boxes, pad_mask)


def random_queries(batch, count, num_classes, device):
    """General sampling: class-free anchors with centres uniform in the image, sides uniform in [0.05, 0.5]."""
    centre = torch.rand(batch, count, 2, device=device)
    size = 0.05 + 0.45 * torch.rand(batch, count, 2, device=device)
    labels = torch.full((batch, count), num_classes, dtype=torch.long, device=device)
    pad_mask = torch.zeros(batch, count, dtype=torch.bool, device=device)
    return QuerySpec(labels, clamp_boxes(torch.cat([centre, size], dim=-1)), pad_mask)


def prediction_queries(stage, count):
    """The `count` most confident predictions of one decoder stage as queries (class hint = predicted class)."""
    scores, labels = stage.logits.detach().sigmoid().max(-1)
    count = min(count, scores.shape[1])
    top = scores.topk(count, dim=1).indices
    boxes = stage.boxes.detach().gather(1, top.unsqueeze(-1).expand(-1, -1, 4))
    pad_mask = torch.zeros_like(top, dtype=torch.bool)
    return QuerySpec(labels.gather(1, top), clamp_boxes(boxes.float()), pad_mask)


def concat(*specs):
    """Slots of several specs side by side (same batch)."""
    specs = [s for s in specs if s is not None and s.num_queries > 0]
    if not specs:
        return None
    return QuerySpec(torch.cat([s.labels for s in specs], 1), torch.cat([s.boxes for s in specs], 1),
                     torch.cat([s.pad_mask for s in specs], 1))


class TargetQuerySampler:
    """CLoCK TCLD queries: GT boxes x repeats (optionally jittered) + random general anchors."""

    def __init__(self, num_classes, repeats=3, box_noise=0.0, random_count=100):
        self.num_classes, self.repeats = num_classes, repeats
        self.box_noise, self.random_count = box_noise, random_count

    def __call__(self, images, targets, teacher=None):
        gt = ground_truth_queries(targets, self.num_classes, self.repeats, self.box_noise) if self.repeats else None
        general = random_queries(len(targets), self.random_count, self.num_classes, images.device)
        return concat(gt, general)


class TeacherQuerySampler:
    """KD-DETR queries: shared random anchors + the teacher's own most confident last-stage predictions."""

    def __init__(self, num_classes, teacher_count=100, random_count=100):
        self.num_classes, self.teacher_count, self.random_count = num_classes, teacher_count, random_count

    @torch.no_grad()
    def __call__(self, images, targets, teacher):
        own = prediction_queries(teacher(images).stages[-1], self.teacher_count) if self.teacher_count else None
        general = random_queries(len(images), self.random_count, self.num_classes, images.device)
        return concat(own, general)


class QueryEncoder(nn.Module):
    """Frozen QuerySpec -> QueryGroup for one model.

    content = [label embedding e(c) (hidden_dim - 1 channels), indicator (1 when the slot carries a class)]
    pos     = MLP(box), used by models whose query position is not derived from the anchor (Deformable DETR).
    Weights come from a fixed seed, so a resumed run rebuilds exactly the same encoder without storing it.
    """

    def __init__(self, num_classes, hidden_dim, seed=0):
        super().__init__()
        self.num_classes = num_classes
        with torch.random.fork_rng(devices=[]):  # building it leaves the training RNG stream unchanged
            self.label_embed = nn.Embedding(num_classes + 1, hidden_dim - 1)
            self.pos_mlp = nn.Sequential(nn.Linear(4, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.label_embed.weight.copy_(torch.randn(self.label_embed.weight.shape, generator=generator))
            for layer in (self.pos_mlp[0], self.pos_mlp[2]):
                bound = layer.in_features ** -0.5
                layer.weight.copy_((torch.rand(layer.weight.shape, generator=generator) * 2 - 1) * bound)
                layer.bias.zero_()
        self.requires_grad_(False)

    def forward(self, spec):
        hint = (spec.labels < self.num_classes).unsqueeze(-1).to(self.label_embed.weight.dtype)
        content = torch.cat([self.label_embed(spec.labels), hint], dim=-1)
        return QueryGroup(content=content, boxes=spec.boxes, pos=self.pos_mlp(spec.boxes), pad_mask=spec.pad_mask)

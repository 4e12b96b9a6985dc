"""`gt_denoise`: the control that separates TCLD's auxiliary task from distillation (issue 42).

The student answers exactly TCLD's extra query group (every GT box `logit.repeats` times with
DN-DETR noise, plus `logit.random_queries` general anchors, in their own attention segments), but
the group learns from the ground truth with the detection loss instead of from a teacher:

  GT-anchored slots  their own GT box and class is known from the slot (DN-DETR / DINO denoising):
                     SetCriterion.denoising_losses (focal class loss, L1 + GIoU), normalized by
                     the GT count x repeats. Keys loss_{cls,bbox,giou}_gtdn[_i].
  general slots      Hungarian matching against the GT, like the matching queries
                     (SetCriterion.matched_losses). Keys loss_{cls,bbox,giou}_gtdn_general[_i].

Every decoder stage when loss.aux (else the last), all scaled by distill.lambda_logit as TCLD is.
There is no teacher: what this gains over the baseline is what the auxiliary task alone gives.
"""
import torch
from torch import nn

from clock_deploy.distill.queries import TargetQuerySampler, ground_truth_layout, query_group
from clock_deploy.distill.sampling import side_rng, side_seed
from clock_deploy.models.criterion import num_boxes_across_processes


class GtDenoiser(nn.Module):
    """Distiller-shaped (forward(student, images, targets) -> (student_out, losses)) but teacher-free."""

    def __init__(self, criterion, sampler: TargetQuerySampler, own_content=False, weight=1.0, seed=0):
        super().__init__()
        self.criterion, self.sampler = criterion, sampler
        self.own_content, self.weight = own_content, weight
        self.seed, self.step_key = seed, (0, 0, 0)

    def begin_step(self, epoch, iteration, rank=0):
        """Which step the next forward is: the queries' seed is (seed, epoch, iteration, rank)."""
        self.step_key = (epoch, iteration, rank)

    def forward(self, student, images, targets):
        with side_rng(side_seed(self.seed, *self.step_key), images.device):
            spec = self.sampler(images, targets)
        groups = [query_group(student, spec, self.own_content)] if spec is not None else None
        out = student(images, targets, groups=groups)
        return out, (self.losses(out.groups[0], targets) if spec is not None else {})

    def losses(self, stages, targets):
        labels, boxes, pad_mask, _ = ground_truth_layout(targets, self.sampler.num_classes, self.sampler.repeats)
        gt_slots = labels.shape[1]
        meta = {"valid": ~pad_mask, "positive": torch.ones(gt_slots, dtype=torch.bool, device=pad_mask.device),
                "labels": labels, "boxes": boxes, "num_groups": self.sampler.repeats}
        num_boxes = num_boxes_across_processes(targets, stages[-1].logits.device)
        losses = {}
        last = len(stages) - 1
        for i, stage in enumerate(stages):
            if i != last and not self.criterion.aux:
                continue
            suffix = "_gtdn" if i == last else f"_gtdn_{i}"
            gt_part = type(stage)(logits=stage.logits[:, :gt_slots], boxes=stage.boxes[:, :gt_slots])
            general = type(stage)(logits=stage.logits[:, gt_slots:], boxes=stage.boxes[:, gt_slots:])
            if gt_slots:
                losses.update(self.criterion.denoising_losses(gt_part, meta, num_boxes, suffix))
            if general.logits.shape[1]:
                losses.update(self.criterion.matched_losses(general, targets, num_boxes, suffix + "_general"))
        return {k: self.weight * v for k, v in losses.items()}

    def trainable_state(self):
        return {}  # no adapters: nothing beside the student is trained

    def load_trainable_state(self, state):
        pass

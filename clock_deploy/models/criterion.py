"""Detection losses of the DETR family (Deformable-DETR / DINO recipe).

Per decoder stage: Hungarian matching, sigmoid focal classification loss over all queries (or
RT-DETR's varifocal loss, whose positive target is the IoU of the matched box), L1 and GIoU on
matched pairs, all normalized by the number of GT boxes (averaged over DDP
processes). Auxiliary stages, two-stage encoder proposals and DINO denoising queries get the
same terms under their own keys.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clock_deploy.models.box_ops import box_cxcywh_to_xyxy, box_iou, elementwise_generalized_box_iou

CLASSIFICATION_LOSSES = ("focal", "vfl")


def sigmoid_focal_loss(logits, targets, weights=None, alpha=0.25, gamma=2.0):
    """Summed focal loss (Lin et al. 2017) of logits vs {0, 1} targets; `weights` [...] masks elements."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    if weights is not None:
        loss = loss * weights
    return loss.sum()


def varifocal_loss(logits, onehot, iou, alpha=0.75, gamma=2.0):
    """Summed varifocal loss (Zhang et al. 2021, as RT-DETR): BCE towards `iou` on the GT class of
    matched queries (onehot [..., K], iou [...]) and towards 0 elsewhere, negatives weighted by
    alpha * p^gamma, positives by their IoU target."""
    target = onehot * iou[..., None]
    weight = alpha * logits.detach().sigmoid().pow(gamma) * (1 - onehot) + target
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")


def matched_iou(pred, gt):
    """IoU of each predicted cxcywh box [N, 4] with its matched GT box [N, 4] (no gradient)."""
    return torch.diag(box_iou(box_cxcywh_to_xyxy(pred.detach()), box_cxcywh_to_xyxy(gt))[0])


def num_boxes_across_processes(targets, device):
    """Average GT count per process (DDP-aware), at least 1: the normalizer of every loss."""
    count = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1).item()


class SetCriterion(nn.Module):
    """forward(outputs: DetrOutput, targets) -> dict of *weighted* loss terms.

    Keys: loss_cls / loss_bbox / loss_giou for the last stage, the same with suffix _{i} for
    earlier decoder stage i (when aux), _enc for two-stage proposals, _dn and _dn_{i} for the
    denoising stages. The total loss is the sum of all values. With `agnostic_encoder` the
    encoder proposals learn every GT as class 0 (Deformable DETR's two-stage objectness).
    `classification` "vfl" (RT-DETR) replaces the focal term by the varifocal loss with `vfl_alpha`;
    its denoising term then treats every slot but the positives as background, as RT-DETR does.
    """

    def __init__(self, num_classes, matcher, weight_cls=2.0, weight_l1=5.0, weight_giou=2.0,
                 focal_alpha=0.25, focal_gamma=2.0, aux=True, agnostic_encoder=False, classification="focal",
                 vfl_alpha=0.75):
        super().__init__()
        if classification not in CLASSIFICATION_LOSSES:
            raise ValueError(f"classification must be one of {CLASSIFICATION_LOSSES}, got '{classification}'")
        self.classification, self.vfl_alpha = classification, vfl_alpha
        self.num_classes, self.matcher, self.aux = num_classes, matcher, aux
        self.agnostic_encoder = agnostic_encoder
        self.weight_cls, self.weight_l1, self.weight_giou = weight_cls, weight_l1, weight_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def forward(self, outputs, targets):
        num_boxes = num_boxes_across_processes(targets, outputs.pred_logits.device)
        losses = {}
        last = len(outputs.stages) - 1
        for i, stage in enumerate(outputs.stages):
            if i == last or self.aux:
                losses.update(self.matched_losses(stage, targets, num_boxes, "" if i == last else f"_{i}"))
        if outputs.encoder is not None:
            enc_targets = targets
            if self.agnostic_encoder:
                enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update(self.matched_losses(outputs.encoder, enc_targets, num_boxes, "_enc"))
        if outputs.denoising is not None:
            dn_stages, meta = outputs.denoising.stages, outputs.denoising.meta
            last = len(dn_stages) - 1
            for i, stage in enumerate(dn_stages):
                if i == last or self.aux:
                    suffix = "_dn" if i == last else f"_dn_{i}"
                    losses.update(self.denoising_losses(stage, meta, num_boxes, suffix))
        return losses

    def _weighted(self, loss_cls, loss_l1, loss_giou, suffix):
        return {f"loss_cls{suffix}": self.weight_cls * loss_cls,
                f"loss_bbox{suffix}": self.weight_l1 * loss_l1,
                f"loss_giou{suffix}": self.weight_giou * loss_giou}

    def _box_losses(self, pred, gt, num_boxes):
        """Summed L1 and (1 - GIoU) of matched cxcywh pairs [N, 4], divided by num_boxes."""
        loss_l1 = F.l1_loss(pred, gt, reduction="sum") / num_boxes
        giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(gt))
        return loss_l1, (1 - giou).sum() / num_boxes

    def matched_losses(self, stage, targets, num_boxes, suffix=""):
        """Losses of one StageOutput against the GT after Hungarian matching."""
        logits, boxes = stage.logits, stage.boxes
        indices = self.matcher(logits, boxes, targets)
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]).to(logits.device)
        query_idx = torch.cat([src for src, _ in indices]).to(logits.device)
        gt_labels = torch.cat([t["labels"][tgt.to(t["labels"].device)] for t, (_, tgt) in zip(targets, indices)])
        gt_boxes = torch.cat([t["boxes"][tgt.to(t["boxes"].device)] for t, (_, tgt) in zip(targets, indices)])

        onehot = torch.zeros_like(logits)
        onehot[batch_idx, query_idx, gt_labels.to(logits.device)] = 1.0
        pred, gt_boxes = boxes[batch_idx, query_idx], gt_boxes.to(boxes)
        if self.classification == "vfl":
            iou = torch.zeros(logits.shape[:2], dtype=logits.dtype, device=logits.device)
            iou[batch_idx, query_idx] = matched_iou(pred, gt_boxes).to(logits.dtype)
            loss_cls = varifocal_loss(logits, onehot, iou, self.vfl_alpha, self.focal_gamma) / num_boxes
        else:
            loss_cls = sigmoid_focal_loss(logits, onehot, None, self.focal_alpha, self.focal_gamma) / num_boxes
        loss_l1, loss_giou = self._box_losses(pred, gt_boxes, num_boxes)
        return self._weighted(loss_cls, loss_l1, loss_giou, suffix)

    def denoising_losses(self, stage, meta, num_boxes, suffix="_dn"):
        """DINO denoising: the GT of every query is known from its slot (see dino.build_denoising_queries).

        Positives must predict their GT class and box, negatives no class; padding slots are
        ignored. Normalized by num_boxes * number of denoising groups.
        """
        logits, boxes = stage.logits, stage.boxes
        valid, positive = meta["valid"], meta["positive"][None].expand_as(meta["valid"])
        matched = valid & positive
        norm = num_boxes * meta["num_groups"]
        onehot = torch.zeros_like(logits)
        onehot[matched] = F.one_hot(meta["labels"][matched], self.num_classes).to(logits.dtype)
        pred, gt_boxes = boxes[matched], meta["boxes"][matched].to(boxes)
        if self.classification == "vfl":
            iou = torch.zeros(logits.shape[:2], dtype=logits.dtype, device=logits.device)
            iou[matched] = matched_iou(pred, gt_boxes).to(logits.dtype)
            loss_cls = varifocal_loss(logits, onehot, iou, self.vfl_alpha, self.focal_gamma) / norm
        else:
            loss_cls = sigmoid_focal_loss(logits, onehot, valid[..., None].to(logits.dtype),
                                          self.focal_alpha, self.focal_gamma) / norm
        loss_l1, loss_giou = self._box_losses(pred, gt_boxes, norm)
        return self._weighted(loss_cls, loss_l1, loss_giou, suffix)

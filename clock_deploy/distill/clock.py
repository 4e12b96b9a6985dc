"""The CLoCK losses (docs clock_method.md): LCMD on encoder memory, TCLD on decoder queries.

LCMD  L_mem = sum_levels mean_batch [ alpha * sum_p M_p S_p e_p + beta * sum_p (1 - M_p) S_p e_p ],
      e_p = sum_c (A_T,pc - phi(A_S)_pc)^2                  (weighting "gt", the default)
      e_p = A^S_p sum_c A^C_c (A_T,pc - phi(A_S)_pc)^2      (weighting "gt_attention")
      (either divided by the teacher's channels C when normalized)
      M_p: pixel p touches a GT box; S_p: 1 / (h*w) of the smallest such box, 1 / N_bg outside boxes.
      A^S [H, W], A^C [C]: the TEACHER memory's FGD spatial and channel attention at that level (detached;
      attention.attention_maps at `attention_temperature`, each averaging 1), as FGD's focal term weighs its
      feature errors; M, S, alpha and beta stay. "gt_attention" is candidate C3 of
      studies/distill_ab_preregistration.md, off by default.
      The location awareness is M and S. A position code added to both memories (removed in issue 42)
      was an affine function of the student's (at equal widths the same sine grid plus a constant level
      embedding per level), which phi absorbs, so it carried no location information.

TCLD  per student stage s, paired with a teacher stage t(s), slot i to slot i (no matching):
      w_i = max_c sigmoid(z^T_i) (detached, 0 for padding)
      L_cls = sum_i w_i * KD(z^T_i, z^S_i) / sum_i w_i
      L_box = sum_i w_i * (w_l1 * |b^S_i - b^T_i|_1 + w_giou * (1 - GIoU(b^S_i, b^T_i))) / sum_i w_i
      (|.|_1 summed over the 4 coordinates as in DETR's box loss; KD-DETR averages them, `l1_mean`)
      KD = the binary KL per class between sigmoid(z^T) and sigmoid(z^S) ("bce", default: the BCE
      with soft targets minus the target's entropy, so the gradient is the BCE's and a perfect copy
      scores 0; it sees objectness, a shift of all logits), or tau^2 KL(softmax(z^T / tau) ||
      softmax(z^S / tau)) ("kl": blind to a shift of all logits).
      L_logit = sum_s (L_cls^s + L_box^s). Stage pairing: "consistent" pairs the student's stage s of
      L_S with the teacher's stage ceil((s + 1) * L_T / L_S) - 1 (identity when depths agree, last with
      last always); "last" pairs every student stage with the teacher's last stage (KD-DETR).
      The student answers its extra query group `student_group`; the teacher its group
      `teacher_group`, or its own matching queries when teacher_group is None (KD-DETR's teacher
      anchors). With `student_matching` the student's matching predictions answer the first slots
      of the teacher's group and its group `student_group` (if any) the rest (C4: the teacher was
      asked the student's matching anchors, then the general queries).
"""
import torch
import torch.nn.functional as F
from torch import nn

from clock_deploy.distill.attention import attention_maps
from clock_deploy.models.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from clock_deploy.models.contract import StageOutput


# ---------------------------------------------------------------- GT location weights

def location_weights(targets, height, width):
    """Foreground mask M [B, H, W] (bool) and scale weights S [B, H, W] on a level's pixel grid.

    A GT box covers the pixels its extent touches (at least one, so a box smaller than a pixel
    still counts); h*w is the number of pixels it covers. Normalized cxcywh boxes are scaled to
    the grid, so this holds for any stride.
    """
    device = targets[0]["boxes"].device
    fg = torch.zeros(len(targets), height, width, dtype=torch.bool, device=device)
    scale = torch.zeros(len(targets), height, width, device=device)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    for i, t in enumerate(targets):
        if len(t["boxes"]):
            x0, y0, x1, y1 = box_cxcywh_to_xyxy(t["boxes"].float()).unbind(-1)
            c0, c1 = _pixel_span(x0 * width, x1 * width, width)
            r0, r1 = _pixel_span(y0 * height, y1 * height, height)
            inside = (((rows >= r0[:, None]) & (rows < r1[:, None]))[:, :, None]
                      & ((cols >= c0[:, None]) & (cols < c1[:, None]))[:, None, :])  # [n, H, W]
            area = ((r1 - r0) * (c1 - c0)).float()
            fg[i] = inside.any(0)
            scale[i] = (inside.float() / area[:, None, None]).amax(0)  # smallest box wins
        background = ~fg[i]
        if background.any():
            scale[i][background] = 1.0 / background.sum()
    return fg, scale


def _pixel_span(start, end, size):
    """[first, last + 1) pixel indices touched by the interval [start, end], at least one pixel."""
    first = start.floor().long().clamp(0, size - 1)
    stop = torch.maximum(end.ceil().long(), first + 1).clamp(max=size)
    return first, stop


def weighted_fg_bg_sum(error, fg, scale, alpha, beta):
    """alpha * sum M S error + beta * sum (1 - M) S error, averaged over the batch; error is [B, H, W]."""
    weighted = error * scale
    return (alpha * weighted[fg].sum() + beta * weighted[~fg].sum()) / error.shape[0]


# ---------------------------------------------------------------- LCMD

class LcmdLoss(nn.Module):
    """Location-and-context-aware memory distillation; `adapters` are the trainable phi."""

    def __init__(self, adapters, alpha=2.0, beta=1.0, normalize=True, weight=1.0, weighting="gt",
                 attention_temperature=0.5):
        super().__init__()
        if weighting not in ("gt", "gt_attention"):
            raise ValueError(f"LCMD weighting must be gt or gt_attention, not {weighting!r}")
        self.adapters = adapters
        self.alpha, self.beta, self.normalize, self.weight = alpha, beta, normalize, weight
        self.weighting, self.attention_temperature = weighting, attention_temperature

    def forward(self, student_out, teacher_out, targets, image_hw):
        total = student_out.memory[0].new_zeros(())
        for stride, ti, si in self.adapters.pairs(teacher_out.memory, student_out.memory, image_hw):
            teacher_map, student_map = teacher_out.memory[ti], student_out.memory[si]
            height, width = teacher_map.shape[-2:]
            adapted = self.adapters(student_map, stride, (height, width))
            error = (teacher_map.float() - adapted.float()).pow(2)  # [B, C, H, W]
            if self.weighting == "gt_attention":  # FGD's focal weighting by the teacher's attention
                spatial, channel = attention_maps(teacher_map.detach().float(), self.attention_temperature)
                error = error * channel[:, :, None, None] * spatial[:, None]
            error = error.sum(1)  # [B, H, W]
            if self.normalize:
                error = error / teacher_map.shape[1]
            fg, scale = location_weights(targets, height, width)
            total = total + weighted_fg_bg_sum(error, fg, scale, self.alpha, self.beta)
        return {"loss_mem": self.weight * total}


# ---------------------------------------------------------------- TCLD

def stage_pairs(student_stages, teacher_stages, mode="consistent"):
    """[(student_stage, teacher_stage)]: same relative depth ("consistent") or the teacher's last ("last")."""
    if mode == "last":
        return [(s, teacher_stages - 1) for s in range(student_stages)]
    return [(s, -(-(s + 1) * teacher_stages // student_stages) - 1) for s in range(student_stages)]


def classification_kd(student_logits, teacher_logits, tau, kind):
    """Per-query distillation of class logits [..., K] -> [...]."""
    if kind == "kl":
        log_p_teacher = F.log_softmax(teacher_logits / tau, dim=-1)
        log_p_student = F.log_softmax(student_logits / tau, dim=-1)
        return tau ** 2 * F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="none").sum(-1)
    target = teacher_logits.sigmoid()
    cross = F.binary_cross_entropy_with_logits(student_logits, target, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(teacher_logits, target, reduction="none")
    return (cross - entropy).sum(-1)


class QueryDistillLoss(nn.Module):
    """Slot-to-slot logit + box distillation over the stages of an extra query group (TCLD, KD-DETR)."""

    def __init__(self, tau=10.0, cls_loss="bce", w_cls=1.0, w_l1=5.0, w_giou=2.0, stages="consistent",
                 weight=1.0, prefix="loss_logit", student_group=0, teacher_group=0, l1_mean=False,
                 student_matching=False):
        super().__init__()
        self.l1_mean = l1_mean  # L1 averaged over the 4 coordinates (KD-DETR's code), else summed (DETR's)
        self.tau, self.cls_loss, self.stages = tau, cls_loss, stages
        self.w_cls, self.w_l1, self.w_giou, self.weight, self.prefix = w_cls, w_l1, w_giou, weight, prefix
        self.student_group, self.teacher_group = student_group, teacher_group
        self.student_matching = student_matching

    def student_stages(self, student_out):
        """Per stage, the student's answers to the slots the term compares (module docstring)."""
        group = student_out.groups[self.student_group] if self.student_group < len(student_out.groups) else []
        if not self.student_matching:
            return group
        if not group:
            return student_out.stages
        return [StageOutput(torch.cat([m.logits, g.logits], 1), torch.cat([m.boxes, g.boxes], 1))
                for m, g in zip(student_out.stages, group)]

    def forward(self, student_out, teacher_out, pad_mask=None):
        """Losses on the student's answers (`student_stages`); zero when there are none (no GT, no random
        queries). pad_mask [B, G] marks the padding slots among them."""
        cls_total = student_out.pred_logits.new_zeros(())
        box_total = cls_total.clone()
        student_stages, teacher_stages = self.student_stages(student_out), []
        if student_stages:
            teacher_stages = (teacher_out.stages if self.teacher_group is None
                              else teacher_out.groups[self.teacher_group])
        for s, t in stage_pairs(len(student_stages), len(teacher_stages), self.stages):
            cls, box = self.stage_loss(student_stages[s], teacher_stages[t], pad_mask)
            cls_total, box_total = cls_total + cls, box_total + box
        return {f"{self.prefix}_cls": self.weight * self.w_cls * cls_total,
                f"{self.prefix}_box": self.weight * box_total}

    def stage_loss(self, student, teacher, pad_mask):
        teacher_logits, student_logits = teacher.logits.float(), student.logits.float()
        weight = teacher_logits.sigmoid().amax(-1)  # teacher confidence, no gradient (teacher is frozen)
        if pad_mask is not None:
            weight = weight.masked_fill(pad_mask, 0.0)
        norm = weight.sum().clamp(min=1e-6)
        cls = (weight * classification_kd(student_logits, teacher_logits, self.tau, self.cls_loss)).sum() / norm
        l1 = (student.boxes.float() - teacher.boxes.float()).abs()
        l1 = l1.mean(-1) if self.l1_mean else l1.sum(-1)
        giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(student.boxes.float()),
                                               box_cxcywh_to_xyxy(teacher.boxes.float()))
        box = (weight * (self.w_l1 * l1 + self.w_giou * (1 - giou))).sum() / norm
        return cls, box

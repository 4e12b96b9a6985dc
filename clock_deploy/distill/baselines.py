"""Baselines the benchmark compares CLoCK with, behind the same Distiller interface.

none     No distiller: `clock-deploy distill` with method none trains the student on GT only.

kd_detr  KD-DETR (Wang et al., CVPR 2024) as in the authors' code (Myleswork/KD-DETR); built by
         distiller.build_distiller from the shared pieces, no class of its own:
         (1) the student answers the teacher's own query anchors (DetrOutput.anchors) with zero
             content; the targets are the teacher's matching predictions from its normal forward;
         (2) `kd_detr.random_queries` random anchors drawn every step like a fresh nn.Embedding(n, 4)
             (sigmoid of N(0, 1), the same for every image; queries.embedding_anchors), answered by
             the teacher in the same single forward (one teacher forward per step).
         Every student stage is supervised by the teacher's LAST stage, slot to slot, with
         clock.QueryDistillLoss(stages="last"): w_cls * tau^2 softmax KL (tau = 10) + w_l1 * L1
         (averaged over the 4 box coordinates, as the official code) + w_giou * (1 - GIoU), weighted
         by the teacher's confidence. No memory / feature term. Losses loss_kd_anchor_{cls,box} and
         loss_kd_random_{cls,box}, scaled by distill.lambda_logit.

fgd      FGD (Yang et al., CVPR 2022) on the projected backbone features (DetrOutput.features),
         levels paired by stride, student adapted by a 1x1 conv to the teacher's width:
         spatial attention A^S(F) = H W softmax(mean_c |F| / T), channel attention
         A^C(F) = C softmax(mean_hw |F| / T) (attention.attention_maps, which LCMD's gt_attention weighting uses too).
         loss_fgd_focal  = alpha_fg * sum M S A^S_T A^C_T (F_T - F_S)^2 + beta_bg * (same over background)
         loss_fgd_attn   = gamma_attn * (|A^S_T - A^S_S|_1 + |A^C_T - A^C_S|_1)
         loss_fgd_global = lambda_rela * ||R(F_T) - R(F_S)||^2, R = GcBlock relation module
         (M, S: the GT location weights of LCMD.) All are summed over levels, averaged over the batch
         and scaled by distill.lambda_mem. Unlike the original, which gives teacher and student their
         own GcBlock, one GcBlock per level is shared by both, so identical features give zero loss
         and the block cannot lower the loss by itself diverging the two relations.
"""
from torch import nn

from clock_deploy.distill.attention import attention_maps
from clock_deploy.distill.clock import location_weights, weighted_fg_bg_sum


class GlobalContext(nn.Module):
    """GcBlock (Cao et al. 2019): F + transform(attention-pooled context of F)."""

    def __init__(self, channels, ratio=0.5):
        super().__init__()
        hidden = max(1, int(channels * ratio))
        self.attend = nn.Conv2d(channels, 1, 1)
        self.transform = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.LayerNorm([hidden, 1, 1]),
                                       nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))
        # start as the identity relation (GcBlock practice): the block only learns what helps
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x):
        batch, channels = x.shape[:2]
        weights = self.attend(x).reshape(batch, 1, -1).softmax(-1)                    # [B, 1, HW]
        context = (x.reshape(batch, channels, -1) * weights).sum(-1)[..., None, None]  # [B, C, 1, 1]
        return x + self.transform(context)


class FgdLoss(nn.Module):
    """Focal + attention + global feature distillation on DetrOutput.features."""

    def __init__(self, adapters, teacher_dim, cfg, weight=1.0):
        super().__init__()
        self.adapters = adapters
        self.relations = nn.ModuleDict({str(s): GlobalContext(teacher_dim) for s in adapters.strides})
        self.cfg, self.weight = cfg, weight

    def forward(self, student_out, teacher_out, targets, image_hw):
        cfg = self.cfg
        focal = student_out.features[0].new_zeros(())
        attention, relation = focal.clone(), focal.clone()
        for stride, ti, si in self.adapters.pairs(teacher_out.features, student_out.features, image_hw):
            teacher_map = teacher_out.features[ti].float()
            height, width = teacher_map.shape[-2:]
            student_map = self.adapters(student_out.features[si], stride, (height, width)).float()
            batch = teacher_map.shape[0]

            spatial_t, channel_t = attention_maps(teacher_map, cfg.temperature)
            spatial_s, channel_s = attention_maps(student_map, cfg.temperature)
            error = ((teacher_map - student_map).pow(2) * channel_t[:, :, None, None]).sum(1) * spatial_t
            fg, scale = location_weights(targets, height, width)
            focal = focal + weighted_fg_bg_sum(error, fg, scale, cfg.alpha_fg, cfg.beta_bg)

            attention = attention + cfg.gamma_attn * ((spatial_t - spatial_s).abs().sum()
                                                      + (channel_t - channel_s).abs().sum()) / batch
            relate = self.relations[str(stride)]
            relation = relation + cfg.lambda_rela * (relate(teacher_map) - relate(student_map)).pow(2).sum() / batch
        return {"loss_fgd_focal": self.weight * focal, "loss_fgd_attn": self.weight * attention,
                "loss_fgd_global": self.weight * relation}

"""The Distiller: runs the frozen teacher next to the student and returns the distillation losses.

    distiller = build_distiller(cfg, teacher, student)          # None for distill.method "none"
    student_out, losses = distiller(student, images, targets)  # losses: weighted "loss_*" terms

The student is passed in at every call and never modified or wrapped, so a distilled
student exports exactly like a plainly trained one. The teacher is a frozen submodule
(eval mode even when the trainer calls .train(), no grad). The only trainable weights
are the adapters (and FGD's relation blocks); `trainable_state()` holds exactly them.
"""
import torch
from torch import nn

from clock_deploy.distill.adapters import LevelAdapters, pair_levels
from clock_deploy.distill.baselines import FgdLoss
from clock_deploy.distill.clock import LcmdLoss, QueryDistillLoss
from clock_deploy.distill.queries import QueryEncoder, TargetQuerySampler, TeacherQuerySampler
from clock_deploy.errors import UserError


class Distiller(nn.Module):
    """Teacher + loss terms on feature maps (`map_terms`) and on an extra query group (`query_terms`).

    `sampler(images, targets, teacher)` returns the QuerySpec both decoders answer (or None);
    `teacher_queries` / `student_queries` are the frozen encoders into each model's hidden size.
    """

    def __init__(self, teacher, map_terms=None, query_terms=None, sampler=None, teacher_queries=None,
                 student_queries=None):
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.map_terms = nn.ModuleDict(map_terms or {})
        self.query_terms = nn.ModuleDict(query_terms or {})
        self.sampler = sampler
        self.teacher_queries, self.student_queries = teacher_queries, student_queries

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()  # the teacher always predicts as at inference
        return self

    def forward(self, student, images, targets):
        image_hw = tuple(images.shape[-2:])
        spec = self.sampler(images, targets, self.teacher) if self.sampler is not None else None
        with torch.no_grad():
            teacher_out = self.teacher(images, groups=[self.teacher_queries(spec)] if spec else None)
        student_out = student(images, targets, groups=[self.student_queries(spec)] if spec else None)

        losses = {}
        for term in self.map_terms.values():
            losses.update(term(student_out, teacher_out, targets, image_hw))
        for term in self.query_terms.values():
            losses.update(term(student_out, teacher_out, spec.pad_mask if spec else None))
        return student_out, losses

    def trainable_state(self):
        """Adapter weights (the teacher and the frozen query encoders are rebuilt, not stored)."""
        return self.map_terms.state_dict()

    def load_trainable_state(self, state):
        try:
            self.map_terms.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"the checkpoint's distiller weights do not fit this distill config "
                            f"(was distill.method or the teacher changed?): {str(e).splitlines()[0]}") from None


@torch.no_grad()
def probe(model, image_hw):
    """One inference pass on a blank image: which levels / widths the model's maps have."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = model(torch.zeros(1, 3, *image_hw, device=device))
    model.train(was_training)
    return out


def level_adapters(teacher_maps, student_maps, image_hw, what):
    """Adapters for every stride both models have; a clear error when they share none."""
    pairs = pair_levels(teacher_maps, student_maps, image_hw)
    if not pairs:
        raise UserError(f"distill: teacher and student {what} share no stride (teacher maps "
                        f"{[tuple(m.shape[-2:]) for m in teacher_maps]}, student maps "
                        f"{[tuple(m.shape[-2:]) for m in student_maps]} for input {image_hw}); "
                        f"align model.backbone.return_levels / model.num_feature_levels")
    return LevelAdapters([s for s, _, _ in pairs], student_maps[0].shape[1], teacher_maps[0].shape[1])


def build_distiller(cfg, teacher, student):
    """The Distiller for cfg.distill.method ("clock", "kd_detr", "fgd"); None for "none"."""
    dc = cfg.distill
    if dc.method == "none":
        return None
    if teacher.num_classes != student.num_classes:
        raise UserError(f"distill: the teacher predicts {teacher.num_classes} classes, the student "
                        f"{student.num_classes} (model.num_classes)")
    image_hw = tuple(cfg.data.img_size)
    teacher_probe, student_probe = probe(teacher, image_hw), probe(student, image_hw)
    num_classes = student.num_classes

    def query_encoders():
        return dict(teacher_queries=QueryEncoder(num_classes, teacher.hidden_dim),
                    student_queries=QueryEncoder(num_classes, student.hidden_dim))

    if dc.method == "clock":
        if not (dc.use_mem or dc.use_logit):
            raise UserError("distill.method=clock with use_mem=false and use_logit=false distills nothing; "
                            "use distill.method=none for plain training")
        map_terms = {}
        if dc.use_mem:
            adapters = level_adapters(teacher_probe.memory, student_probe.memory, image_hw, "encoder memories")
            map_terms["lcmd"] = LcmdLoss(adapters, student_probe.memory[0].shape[1],
                                         teacher_probe.memory[0].shape[1], dc.mem.alpha, dc.mem.beta,
                                         dc.mem.normalize, dc.mem.pos_embed, weight=dc.lambda_mem)
        if not dc.use_logit:
            return Distiller(teacher, map_terms)
        lc = dc.logit
        tcld = QueryDistillLoss(lc.tau, lc.cls_loss, 1.0, lc.w_l1, lc.w_giou, "consistent",
                                weight=dc.lambda_logit, prefix="loss_logit")
        sampler = TargetQuerySampler(num_classes, lc.repeats, lc.box_noise, lc.random_queries)
        return Distiller(teacher, map_terms, {"tcld": tcld}, sampler, **query_encoders())

    if dc.method == "kd_detr":
        kc = dc.kd_detr
        term = QueryDistillLoss(kc.tau, "kl", kc.w_cls, kc.w_l1, kc.w_giou, "last", weight=dc.lambda_logit,
                                prefix="loss_kd")
        sampler = TeacherQuerySampler(num_classes, kc.teacher_queries, kc.random_queries)
        return Distiller(teacher, query_terms={"kd_detr": term}, sampler=sampler, **query_encoders())

    # fgd
    adapters = level_adapters(teacher_probe.features, student_probe.features, image_hw, "backbone features")
    return Distiller(teacher, map_terms={"fgd": FgdLoss(adapters, teacher_probe.features[0].shape[1], dc.fgd,
                                                        weight=dc.lambda_mem)})

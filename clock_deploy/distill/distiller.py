"""The Distiller: runs the frozen teacher next to the student and returns the distillation losses.

    distiller = build_distiller(cfg, teacher, student)          # None for distill.method "none"
    student_out, losses = distiller(student, images, targets)  # losses: weighted "loss_*" terms

The student is passed in at every call and never modified or wrapped, so a distilled
student exports exactly like a plainly trained one. The teacher is a frozen submodule
(eval mode even when the trainer calls .train()) and runs once per step under
torch.inference_mode, optionally in bf16 / fp16 autocast (distill.teacher_dtype). The only
trainable weights are the adapters (and FGD's relation blocks); `trainable_state()` holds
exactly them.
"""
import dataclasses

import torch
from torch import nn

from clock_deploy.distill.adapters import LevelAdapters, pair_levels
from clock_deploy.distill.baselines import FgdLoss
from clock_deploy.distill.clock import LcmdLoss, QueryDistillLoss
from clock_deploy.distill.controls import GtDenoiser
from clock_deploy.distill.queries import RandomAnchorSampler, TargetQuerySampler, class_free, concat, query_group
from clock_deploy.distill.sampling import side_rng, side_seed
from clock_deploy.errors import UserError
from clock_deploy.models.build import build_criterion

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def ordinary_float(x):
    """A copy of a (nested) model output as float32 tensors usable by autograd.

    Tensors made under inference_mode cannot be saved for backward, and the losses save
    the teacher's targets; the copy is cheap next to the teacher forward.
    """
    if torch.is_tensor(x):
        return x.float() if x.is_floating_point() and x.dtype != torch.float32 else x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(ordinary_float(v) for v in x)
    if isinstance(x, dict):
        return {k: ordinary_float(v) for k, v in x.items()}
    if dataclasses.is_dataclass(x):
        return type(x)(**{f.name: ordinary_float(getattr(x, f.name)) for f in dataclasses.fields(x)})
    return x


class Distiller(nn.Module):
    """Teacher + loss terms on feature maps (`map_terms`) and on extra query groups (`query_terms`).

    `sampler(images, targets)` returns the QuerySpec both models answer (or None), encoded per
    model by `query_group` (`own_content`: from the model's own label embedding, else zero).
    `teacher_anchor_queries`: the student also answers the teacher's own query anchors (KD-DETR),
    placed before the shared group; the teacher's matching queries give the targets.
    `student_anchor_queries` (C4) is the mirror image: the student runs first, and the teacher answers the
    anchors the student's matching queries started from (`DetrOutput.anchors`, zero content) followed by
    the shared group, in one group of two attention segments; the student's answers are its own matching
    predictions and its shared group (QueryDistillLoss `student_matching`).
    Query terms get the padding mask of the student group they read.

    The sampler draws from a side stream seeded by (seed, epoch, iteration, rank), which the trainer
    sets before every step with `begin_step`; a caller that never sets it gets the same queries at
    every call.
    """

    def __init__(self, teacher, map_terms=None, query_terms=None, sampler=None, own_content=True,
                 teacher_anchor_queries=False, student_anchor_queries=False, teacher_dtype="fp32", seed=0):
        super().__init__()
        self.seed, self.step_key = seed, (0, 0, 0)
        self.teacher = teacher.eval().requires_grad_(False)
        self.map_terms = nn.ModuleDict(map_terms or {})
        self.query_terms = nn.ModuleDict(query_terms or {})
        self.sampler, self.own_content = sampler, own_content
        self.teacher_anchor_queries, self.teacher_dtype = teacher_anchor_queries, teacher_dtype
        self.student_anchor_queries = student_anchor_queries

    def begin_step(self, epoch, iteration, rank=0):
        """Which step the next forward is: the side stream's seed is (seed, epoch, iteration, rank)."""
        self.step_key = (epoch, iteration, rank)

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()  # the teacher always predicts as at inference
        return self

    def run_teacher(self, images, spec):
        """The teacher's one forward of the step (inference mode, optional autocast) as float32 outputs.

        When no loss reads the teacher's matching predictions (every distiller but KD-DETR's teacher
        anchors) and the model can answer its groups alone, it skips them: the groups are isolated
        from the matching queries, so their answers do not change."""
        device_type = images.device.type
        dtype = AUTOCAST_DTYPES.get(self.teacher_dtype)
        skip = (spec is not None and not self.teacher_anchor_queries
                and getattr(self.teacher, "groups_without_matching", False))
        with torch.inference_mode(), torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            groups = [query_group(self.teacher, spec, self.own_content)] if spec is not None else None
            out = self.teacher(images, groups=groups, matching=False) if skip else self.teacher(images, groups=groups)
        return ordinary_float(out)

    def run_student(self, student, images, targets, specs):
        groups = [query_group(student, s, self.own_content) for s in specs]
        return student(images, targets, groups=groups or None)

    def forward(self, student, images, targets):
        image_hw = tuple(images.shape[-2:])
        spec = None
        if self.sampler is not None:
            with side_rng(side_seed(self.seed, *self.step_key), images.device):
                spec = self.sampler(images, targets)
        specs = [spec] if spec is not None else []
        if self.student_anchor_queries:  # the teacher needs no gradient: it can answer after the student
            student_out = self.run_student(student, images, targets, specs)
            spec = concat(class_free(student_out.anchors.detach(), student.num_classes), spec)
            teacher_out = self.run_teacher(images, spec)
            specs = [spec]  # the slots the term compares: the student's matching queries, then its group
        else:
            teacher_out = self.run_teacher(images, spec)
            if self.teacher_anchor_queries:
                specs.insert(0, class_free(teacher_out.anchors, student.num_classes))
            student_out = self.run_student(student, images, targets, specs)

        losses = {}
        for term in self.map_terms.values():
            losses.update(term(student_out, teacher_out, targets, image_hw))
        for term in self.query_terms.values():
            pad_mask = specs[term.student_group].pad_mask if term.student_group < len(specs) else None
            losses.update(term(student_out, teacher_out, pad_mask))
        return student_out, losses

    def trainable_state(self):
        """Adapter weights (the teacher is rebuilt from its checkpoint, not stored)."""
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


def level_adapters(teacher_maps, student_maps, image_hw, what, learnable=False):
    """Adapters for every stride both models have; a clear error when they share none."""
    pairs = pair_levels(teacher_maps, student_maps, image_hw)
    if not pairs:
        raise UserError(f"distill: teacher and student {what} share no stride (teacher maps "
                        f"{[tuple(m.shape[-2:]) for m in teacher_maps]}, student maps "
                        f"{[tuple(m.shape[-2:]) for m in student_maps]} for input {image_hw}); "
                        f"align model.backbone.return_levels / model.num_feature_levels")
    return LevelAdapters([s for s, _, _ in pairs], student_maps[0].shape[1], teacher_maps[0].shape[1], learnable)


def build_distiller(cfg, teacher, student):
    """The Distiller for cfg.distill.method ("clock", "kd_detr", "fgd"), the teacher-free GtDenoiser for
    "gt_denoise" (teacher may be None), None for "none".

    Built on a forked RNG (adapters seeded by cfg.seed), so building it leaves the training RNG
    stream exactly as in plain training.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        distiller = _build_distiller(cfg, teacher, student)
    if distiller is not None:
        distiller.seed = cfg.seed  # the side stream's queries are a function of (seed, epoch, iteration, rank)
    return distiller


def tcld_sampler(logit_cfg, num_classes):
    """TCLD's query set (also gt_denoise's): GT x repeats with noise + general anchors."""
    if logit_cfg.repeats > 1 and logit_cfg.box_noise <= 0:
        raise UserError(f"distill.logit.repeats={logit_cfg.repeats} with box_noise=0 asks the same query "
                        f"{logit_cfg.repeats} times; set distill.logit.box_noise > 0 (e.g. 0.4) or repeats=1")
    return TargetQuerySampler(num_classes, logit_cfg.repeats, logit_cfg.box_noise, logit_cfg.random_queries)


def gt_denoiser(cfg, student):
    """distill.method=gt_denoise: TCLD's query group trained on the ground truth, no teacher (controls.py)."""
    lc = cfg.distill.logit
    if lc.anchors != "gt":
        raise UserError(f"distill.logit.anchors={lc.anchors} needs a teacher: it is for distill.method=clock")
    if not (lc.repeats or lc.random_queries):
        raise UserError("distill.method=gt_denoise with logit.repeats=0 and logit.random_queries=0 adds no query")
    return GtDenoiser(build_criterion(cfg.loss, cfg.model), tcld_sampler(lc, student.num_classes),
                      own_content=lc.content == "own", weight=cfg.distill.lambda_logit)


def _build_distiller(cfg, teacher, student):
    dc = cfg.distill
    if dc.method == "none":
        return None
    if dc.method == "gt_denoise":
        return gt_denoiser(cfg, student)
    if teacher.num_classes != student.num_classes:
        raise UserError(f"distill: the teacher predicts {teacher.num_classes} classes, the student "
                        f"{student.num_classes} (model.num_classes)")
    if dc.teacher_dtype == "fp16" and next(teacher.parameters()).device.type != "cuda":
        raise UserError("distill.teacher_dtype=fp16 needs a CUDA device; use bf16 on a CPU")
    image_hw = tuple(cfg.data.img_size)
    teacher_probe, student_probe = probe(teacher, image_hw), probe(student, image_hw)
    num_classes = student.num_classes

    if dc.method == "clock":
        if not (dc.use_mem or dc.use_logit):
            raise UserError("distill.method=clock with use_mem=false and use_logit=false distills nothing; "
                            "use distill.method=none for plain training")
        map_terms = {}
        if dc.use_mem:
            mc = dc.mem
            if mc.pos_embed != "none":
                raise UserError(f"distill.mem.pos_embed={mc.pos_embed} was removed: the position code was an affine "
                                f"function of the student's that the adapter absorbs (docs/clock_method.md); "
                                f"set distill.mem.pos_embed=none")
            adapters = level_adapters(teacher_probe.memory, student_probe.memory, image_hw, "encoder memories",
                                      learnable=mc.learn_adapter)
            map_terms["lcmd"] = LcmdLoss(adapters, alpha=mc.alpha, beta=mc.beta, normalize=mc.normalize,
                                         weight=dc.lambda_mem, weighting=mc.weighting,
                                         attention_temperature=mc.attention_temperature)
        if not dc.use_logit:
            return Distiller(teacher, map_terms, teacher_dtype=dc.teacher_dtype)
        lc = dc.logit
        student_anchors = lc.anchors == "student"  # C4: general queries only from the sampler (no GT copies)
        sampler = TargetQuerySampler(num_classes, 0, 0.0, lc.random_queries) if student_anchors \
            else tcld_sampler(lc, num_classes)
        tcld = QueryDistillLoss(tau=lc.tau, cls_loss=lc.cls_loss, w_cls=lc.w_cls, w_l1=lc.w_l1, w_giou=lc.w_giou,
                                stages="consistent", weight=dc.lambda_logit, prefix="loss_logit",
                                student_matching=student_anchors)
        return Distiller(teacher, map_terms, {"tcld": tcld}, sampler, own_content=lc.content == "own",
                         student_anchor_queries=student_anchors, teacher_dtype=dc.teacher_dtype)

    if dc.method == "kd_detr":
        kc = dc.kd_detr
        if not (kc.teacher_anchors or kc.random_queries):
            raise UserError("distill.method=kd_detr with kd_detr.teacher_anchors=false and random_queries=0 "
                            "distills nothing")
        terms = {}

        def term(prefix, student_group, teacher_group):
            return QueryDistillLoss(tau=kc.tau, cls_loss="kl", w_cls=kc.w_cls, w_l1=kc.w_l1, w_giou=kc.w_giou,
                                    stages="last", weight=dc.lambda_logit, prefix=prefix,
                                    student_group=student_group, teacher_group=teacher_group, l1_mean=True)
        if kc.teacher_anchors:
            terms["anchors"] = term("loss_kd_anchor", 0, None)
        if kc.random_queries:
            terms["random"] = term("loss_kd_random", int(kc.teacher_anchors), 0)
        return Distiller(teacher, query_terms=terms, sampler=RandomAnchorSampler(num_classes, kc.random_queries),
                         own_content=False, teacher_anchor_queries=kc.teacher_anchors,
                         teacher_dtype=dc.teacher_dtype)

    # fgd
    adapters = level_adapters(teacher_probe.features, student_probe.features, image_hw, "backbone features")
    return Distiller(teacher, map_terms={"fgd": FgdLoss(adapters, teacher_probe.features[0].shape[1], dc.fgd,
                                                        weight=dc.lambda_mem)}, teacher_dtype=dc.teacher_dtype)

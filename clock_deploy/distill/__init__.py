"""Knowledge distillation of DETR students: CLoCK (LCMD + TCLD), the KD-DETR / FGD baselines and the
teacher-free gt_denoise control."""
from clock_deploy.distill.distiller import Distiller, build_distiller

__all__ = ["Distiller", "build_distiller"]

"""Knowledge distillation of DETR students: CLoCK (LCMD + TCLD) and the KD-DETR / FGD baselines."""
from clock_deploy.distill.distiller import Distiller, build_distiller

__all__ = ["Distiller", "build_distiller"]

"""Model, criterion and optimizer parameter groups from the config."""
from torch import nn

from clock_deploy import config
from clock_deploy.errors import UserError
from clock_deploy.models.criterion import SetCriterion
from clock_deploy.models.dab_detr import DABDETR
from clock_deploy.models.deformable_detr import DeformableDETR
from clock_deploy.models.dino import DINO
from clock_deploy.models.matcher import HungarianMatcher
from clock_deploy.models.rt_detr import RTDETR

# the model class of each model.arch choice (config.ARCHS; tests/test_models.py checks they match)
ARCHS = {"dab_detr": DABDETR, "deformable_detr": DeformableDETR, "dino": DINO, "rt_detr": RTDETR}


def check_model_config(cfg):
    """Raise UserError (naming the config key) for settings the models cannot be built with."""
    if cfg.arch not in ARCHS:
        raise UserError(f"model.arch must be one of {list(config.ARCHS)}, got '{cfg.arch}'")
    positive = {"num_classes": cfg.num_classes, "hidden_dim": cfg.hidden_dim, "num_queries": cfg.num_queries,
                "nheads": cfg.nheads, "dec_layers": cfg.dec_layers, "ffn_dim": cfg.ffn_dim, "n_points": cfg.n_points}
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"model.{key} must be >= 1, got {value}")
    if cfg.enc_layers < 0:
        raise UserError(f"model.enc_layers must be >= 0, got {cfg.enc_layers}")
    if cfg.hidden_dim % cfg.nheads:
        raise UserError(f"model.hidden_dim ({cfg.hidden_dim}) must be divisible by model.nheads ({cfg.nheads})")
    if cfg.hidden_dim % 4:  # sine embeddings give hidden_dim / 4 channels per box coordinate
        raise UserError(f"model.hidden_dim must be a multiple of 4, got {cfg.hidden_dim}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise UserError(f"model.dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.arch != "dab_detr" and cfg.num_feature_levels < len(cfg.backbone.return_levels):
        raise UserError(f"model.num_feature_levels ({cfg.num_feature_levels}) must be >= the number of "
                        f"model.backbone.return_levels ({len(cfg.backbone.return_levels)})")


def build_model(cfg_model: config.ModelConfig) -> nn.Module:
    """nn.Module for ModelConfig `cfg_model`; forward(images, targets=None, groups=None) -> DetrOutput."""
    check_model_config(cfg_model)
    return ARCHS[cfg_model.arch](cfg_model)


def build_criterion(cfg_loss, cfg_model):
    """SetCriterion with the Hungarian matcher, weights from LossConfig."""
    matcher = HungarianMatcher(cfg_loss.match_cls, cfg_loss.match_l1, cfg_loss.match_giou,
                               cfg_loss.focal_alpha, cfg_loss.focal_gamma)
    # Deformable DETR ranks its two-stage proposals by class 0, so it trains them class-agnostic
    agnostic_encoder = cfg_model.arch == "deformable_detr" and cfg_model.proposal_rank == "first_class"
    # RT-DETR trains its classification with the varifocal loss (IoU-aware targets)
    classification = "vfl" if cfg_model.arch == "rt_detr" else "focal"
    return SetCriterion(cfg_model.num_classes, matcher, cfg_loss.cls, cfg_loss.l1, cfg_loss.giou,
                        cfg_loss.focal_alpha, cfg_loss.focal_gamma, cfg_loss.aux, agnostic_encoder,
                        classification, cfg_loss.vfl_alpha)


def param_groups(model, lr, lr_backbone_mult, weight_decay):
    """AdamW parameter groups: trainable backbone parameters at lr * lr_backbone_mult, the rest at lr."""
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (backbone if name.startswith("backbone.") else rest).append(p)
    groups = [{"name": "transformer", "params": rest, "lr": lr, "weight_decay": weight_decay},
              {"name": "backbone", "params": backbone, "lr": lr * lr_backbone_mult, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]

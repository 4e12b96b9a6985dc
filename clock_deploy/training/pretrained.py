"""Start training from a pretrained checkpoint (`model.pretrained`), e.g. a COCO model fine-tuned on KITTI.

Every weight but the class head loads as it is; convert/class_head.py remaps the class head when the
checkpoint's classes differ from the dataset's.
"""
from clock_deploy.checkpoint import read_checkpoint
from clock_deploy.config import to_dict
from clock_deploy.convert.class_head import transfer_state
from clock_deploy.errors import UserError


def load_pretrained(model, cfg_model, target_classes):
    """Load `cfg_model.pretrained` into `model` (built from `cfg_model`); returns report lines."""
    path = cfg_model.pretrained
    ckpt = read_checkpoint(path)
    if ckpt["arch"] != cfg_model.arch:
        raise UserError(f"model.pretrained: {path} holds a {ckpt['arch']} model but model.arch={cfg_model.arch}")
    source = ckpt["ema"] if "ema" in ckpt else ckpt["model"]
    try:
        state, lines = transfer_state(model.state_dict(), source, target_classes, ckpt["classes"],
                                      cfg_model.class_map)
    except UserError as e:
        hint = _config_differences(ckpt.get("config", {}).get("model", {}), cfg_model)
        raise UserError(f"{e} [{path}]" + (f"; the checkpoint was built with {hint}" if hint else "")) from None
    model.load_state_dict(state)
    if cfg_model.backbone.freeze_stem:
        model.backbone.freeze_stem()  # pretrained backbone: keep conv1 / layer1 frozen (DETR practice)
    return [f"model.pretrained: {path} ({ckpt['arch']}, {len(state)} tensors)"] + lines


def _config_differences(saved, cfg_model):
    """'model.hidden_dim=256, ...' for the architecture settings where the checkpoint differs."""
    ignore = {"num_classes", "pretrained", "class_map", "dropout", "backbone.weights", "backbone.freeze_stem"}

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "class_map" else {prefix + k: v})
        return out

    own, theirs = flat(to_dict(cfg_model)), flat(saved)
    diffs = [f"model.{k}={theirs[k]!r}" for k in sorted(theirs) if k not in ignore and k in own and own[k] != theirs[k]]
    return ", ".join(diffs[:6])

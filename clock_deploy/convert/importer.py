"""`clock-deploy import`: a public DETR checkpoint -> a normal clock-deploy checkpoint.

Sources (files the user already has; nothing is downloaded):
- a transformers folder: config.json + model.safetensors (or pytorch_model.bin) of
  DeformableDetrForObjectDetection, DabDetrForObjectDetection or RTDetr(V2)ForObjectDetection;
- an official `.pth`: fundamentalvision/Deformable-DETR, IDEA-Research/DAB-DETR or
  IDEA-Research/DINO (4-scale, ResNet), with its weights under "model", or lyuwenyu/RT-DETR
  (RT-DETRv2), whose EMA weights under "ema" / "module" are taken when present.
The converted weights must fill the project model built from the derived config exactly:
an unknown source key, a missing project weight or a wrong shape is one UserError.
"""
import argparse
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file

from clock_deploy.config import ARCHS, Config, ConfigError, from_dict
from clock_deploy.convert import dab_detr, deformable, dino, rt_detr
from clock_deploy.convert.common import args_dict, fit_problems
from clock_deploy.checkpoint import FORMAT, save_checkpoint
from clock_deploy.errors import UserError, one_line
from clock_deploy.io import read_json, torch_load
from clock_deploy.models.build import build_model

HF_MODEL_TYPES = {"deformable_detr": "deformable_detr", "dab-detr": "dab_detr", "dab_detr": "dab_detr",
                  "rt_detr": "rt_detr", "rt_detr_v2": "rt_detr"}

# COCO as the original DETR-family heads index it (91 slots by category id; "N/A" ids are unused)
COCO91 = [
    "N/A", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A",
    "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "N/A",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "N/A",
    "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush"]
COCO91 = [name if name != "N/A" else f"N/A {i}" for i, name in enumerate(COCO91)]  # unique names


@dataclass
class Imported:
    arch: str
    source: str                 # "transformers" or "official"
    overrides: dict             # the `model` section of the config
    state: dict                 # project state dict
    classes: list
    source_keys: int            # tensors read from the source
    notes: list = field(default_factory=list)


def _dab_hf(state, config, where):
    return (*dab_detr.hf_to_project(state, config), [])  # DAB-DETR's converters report no notes


def _dab_official(state, args, where):
    return (*dab_detr.official_to_project(state, args_dict(args) or None), [])


def _converter(arch, source):
    """(state, config or args, where) -> (overrides, project state, notes)."""
    if arch == "dab_detr":
        return _dab_hf if source == "transformers" else _dab_official
    if arch == "deformable_detr":
        return deformable.hf_to_project if source == "transformers" else deformable.official_to_project
    if arch == "rt_detr":
        return rt_detr.hf_to_project if source == "transformers" else rt_detr.official_to_project
    if source == "transformers":
        raise UserError("DINO has no transformers implementation: import its official .pth")
    return dino.official_to_project


def _load_torch(path):
    return torch_load(path, "PyTorch checkpoint", allowed=[argparse.Namespace])  # official .pth keep their args


def read_hf_folder(folder):
    """-> (config.json dict, state dict) of a transformers model folder."""
    config = read_json(os.path.join(folder, "config.json"))
    weights = os.path.join(folder, "model.safetensors")
    if os.path.isfile(weights):
        try:
            state = load_file(weights)
        except Exception as e:
            raise UserError(f"{weights}: not a readable safetensors file ({one_line(e)})") from None
    elif os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        state = _load_torch(os.path.join(folder, "pytorch_model.bin"))
    else:
        raise UserError(f"{folder}: no model.safetensors or pytorch_model.bin next to config.json "
                        "(sharded checkpoints are not supported)")
    return config, state


def read_official(path):
    """-> (state dict, training args or None) of an official .pth (weights under "model")."""
    ckpt = _load_torch(path)
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: expected a checkpoint dict, got {type(ckpt).__name__}")
    if ckpt.get("format") == FORMAT:
        raise UserError(f"{path}: already a clock-deploy checkpoint: use it directly")
    ema = ckpt.get("ema")
    # RT-DETRv2 saves {"model", "ema": {"module", "updates"}}: the EMA weights are the ones it evaluates
    state = ema["module"] if isinstance(ema, dict) and isinstance(ema.get("module"), dict) else ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path}: no state dict of tensors (under 'model' or at the top level)")
    return state, ckpt.get("args")


def detect_official_arch(state, path):
    """Which original repository wrote these weights, from names only it uses."""
    if "transformer.tgt_embed.weight" in state or "transformer.enc_out_class_embed.weight" in state:
        return "dino"
    if "transformer.decoder.layers.0.cross_attn.sampling_offsets.weight" in state:
        return "deformable_detr"
    if "refpoint_embed.weight" in state and any(k.startswith("transformer.decoder.ref_anchor_head.") for k in state):
        return "dab_detr"
    if "decoder.dec_score_head.0.weight" in state:
        return "rt_detr"
    raise UserError(f"{path}: not a Deformable-DETR, DAB-DETR, DINO or RT-DETRv2 checkpoint (no key of theirs found, "
                    f"e.g. it has {', '.join(list(state)[:3])})")


def import_checkpoint(src, arch=None):
    """Read and convert `src` (transformers folder or official .pth); `arch` skips detection."""
    src = os.fspath(src)
    if arch is not None and arch not in ARCHS:
        raise UserError(f"arch must be one of {list(ARCHS)}, got '{arch}'")
    if os.path.isdir(src):
        config, state = read_hf_folder(src)
        model_type = config.get("model_type")
        found = HF_MODEL_TYPES.get(model_type)
        if found is None:
            raise UserError(f"{src}/config.json: model_type '{model_type}' is not one the project imports "
                            f"({', '.join(sorted(HF_MODEL_TYPES))})")
        if arch is not None and arch != found:
            raise UserError(f"{src}: arch {arch} was asked for but config.json says model_type '{model_type}'")
        arch, source, extra = found, "transformers", config
    elif os.path.isfile(src):
        state, extra = read_official(src)
        arch, source = arch or detect_official_arch(state, src), "official"
    else:
        raise UserError(f"not found: {src} (expected a transformers folder or an official .pth file)")
    try:
        overrides, project_state, notes = _converter(arch, source)(state, extra, src)
    except KeyError as e:  # a weight the model config is read from (names after renaming)
        raise UserError(f"{src}: no weight for '{e.args[0]}': an incomplete {arch} checkpoint") from None
    num_classes = overrides["num_classes"]
    classes = _class_names(extra if source == "transformers" else None, num_classes)
    return Imported(arch, source, overrides, project_state, classes, len(state), notes)


def _class_names(hf_config, num_classes):
    id2label = (hf_config or {}).get("id2label") or {}
    if len(id2label) == num_classes:
        return [str(id2label.get(str(i), id2label.get(i, f"class {i}"))) for i in range(num_classes)]
    if num_classes == len(COCO91):
        return list(COCO91)
    return [f"class {i}" for i in range(num_classes)]


def build_imported_model(imported, where):
    """Config + model with the converted weights loaded strictly (errors name what does not fit)."""
    try:
        cfg = from_dict({"model": imported.overrides}, Config, where=f"{where} (derived config)")
    except ConfigError as e:
        raise UserError(f"{where}: the converted model config is not valid: {e}") from None
    model = build_model(cfg.model)
    problems = fit_problems(model.state_dict(), imported.state)
    if problems:
        raise UserError(f"{where}: converted weights do not fit the {imported.arch} model: {problems}")
    model.load_state_dict(imported.state)
    return cfg, model.eval()


def report(imported, cfg):
    """Lines telling what was mapped, re-initialized and left out, and the derived model config."""
    m = cfg.model
    shape = (f"hidden_dim={m.hidden_dim} enc/dec layers={m.enc_layers}/{m.dec_layers} queries={m.num_queries} "
             f"classes={m.num_classes} backbone=ResNet-{m.backbone.depth}(width {m.backbone.width}, "
             f"levels {m.backbone.return_levels})")
    if m.arch != "dab_detr":  # DAB-DETR is single-scale
        shape += f" levels={m.num_feature_levels}"
    if m.arch == "deformable_detr":
        shape += f" box_refine={m.box_refine} two_stage={m.two_stage}"
    if m.arch == "rt_detr":
        shape = shape.replace("ResNet-", "ResNet-vd-") + f" method={m.rt_detr.method} expansion={m.rt_detr.expansion}"
    return [f"{imported.source} {m.arch}: {shape}",
            (f"mapped: {imported.source_keys} source tensors -> all {len(imported.state)} project tensors "
             "(shared heads stored under several names count once)"),
            "re-initialized: none (every project weight comes from the source)",
            *imported.notes]


def import_to_checkpoint(src, out, arch=None):
    """Convert `src` and write a clock-deploy checkpoint to `out`; returns the report lines."""
    imported = import_checkpoint(src, arch)
    cfg, model = build_imported_model(imported, os.fspath(src))
    save_checkpoint(out, model, cfg, imported.classes, epoch=0, iteration=0,
                    imported={"source": os.path.abspath(os.fspath(src)), "kind": imported.source,
                              "notes": list(imported.notes)})
    return report(imported, cfg)

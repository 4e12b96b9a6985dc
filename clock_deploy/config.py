"""YAML configs -> validated, typed config objects.

A config file may name one or more `_base_` files (paths relative to itself)
that are merged first; its own keys override theirs. Command-line overrides
`key.sub=value` are applied last (value parsed as YAML). Every key is checked
against the dataclass schema below: an unknown key or a wrong type is a
ConfigError naming the key, the file and the line it came from.
"""
import dataclasses
import difflib
import math
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import yaml

from clock_deploy.artifact import PRECISIONS
from clock_deploy.errors import UserError
from clock_deploy.io import write_text


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names key, file and line."""


# ---------------------------------------------------------------- schema

# Choice lists the code that acts on them imports from here (one source for each list)
ARCHS = ("dino", "dab_detr", "deformable_detr")  # model.arch; models/build.py has a class for each
SAMPLING_MODES = ("grid_sample", "gather")       # model.sampling, export --sampling
# export.precision: PRECISIONS of clock_deploy.artifact (the runtime reads it without this module)


def choice(default, *others):
    """A field (string or int) whose value must be `default` or one of `others`."""
    return field(default=default, metadata={"choices": (default,) + others})


def at_least(default, low):
    """A number field that must be >= `low`."""
    return field(default=default, metadata={"min": low})


def positive(default):
    """A number field that must be > 0."""
    return field(default=default, metadata={"min": 0, "exclusive": True})


@dataclass
class SynthConfig:
    num_images: int = 400         # training + validation images generated
    val_fraction: float = 0.25
    height: int = 188             # KITTI aspect ratio (375 x 1242) at half size
    width: int = 620
    seed: int = 0
    max_objects: int = 8


@dataclass
class DataConfig:
    root: str = "data/synth_kitti"
    format: str = choice("kitti", "coco")
    classes: str = choice("kitti3", "kitti8")   # Car/Pedestrian/Cyclist, or all 8 KITTI classes
    train_split: str = "train"
    val_split: str = "val"
    img_size: list = field(default_factory=lambda: [192, 640])  # network input H, W
    hflip: float = 0.5
    num_workers: int = at_least(0, 0)
    synth: SynthConfig = field(default_factory=SynthConfig)  # used when `root` does not exist yet


@dataclass
class BackboneConfig:
    depth: int = choice(50, 18, 34)
    width: int = 64               # channels of the first stage; 64 is the torchvision ResNet
    weights: Optional[str] = None  # torchvision-format ResNet state dict (.pth)
    frozen_bn: bool = True
    freeze_stem: bool = True      # keep conv1 + layer1 frozen (DETR practice) when weights are loaded
    return_levels: list = field(default_factory=lambda: [1, 2, 3])  # 0..3 -> strides 4, 8, 16, 32 (layer1..layer4)


@dataclass
class DenoisingConfig:
    num_queries: int = 100        # total denoising queries (DINO dn_number)
    label_noise: float = 0.5
    box_noise: float = 0.4        # DINO_4scale.py dn_box_noise_scale


@dataclass
class DabConfig:
    """DAB-DETR only; the defaults are IDEA-Research/DAB-DETR's."""
    activation: str = choice("prelu", "relu")  # transformer FFN activation (--transformer_activation)
    pos_temperature: float = 20.0  # sine position embedding of the feature map (--pe_temperatureH/W)


@dataclass
class ModelConfig:
    arch: str = choice(*ARCHS)
    num_classes: int = 3
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    hidden_dim: int = 256
    num_queries: int = 300
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    ffn_dim: int = 1024
    dropout: float = 0.0
    num_feature_levels: int = 4   # multi-scale models; DAB-DETR uses the last level only
    n_points: int = 4             # deformable attention sampling points
    sampling: str = choice(*SAMPLING_MODES)  # deformable attention sampling implementation
    box_refine: bool = True       # Deformable DETR iterative box refinement
    two_stage: bool = False       # Deformable DETR two-stage (DINO is always two-stage)
    # Deformable DETR two-stage query selection: first_class = the original (encoder proposals
    # trained class-agnostic as class 0 and ranked by it); max_class = DINO's rule (trained on the
    # real labels, ranked by the best class). DINO always uses max_class.
    proposal_rank: str = choice("first_class", "max_class")
    dn: DenoisingConfig = field(default_factory=DenoisingConfig)
    dab: DabConfig = field(default_factory=DabConfig)
    pretrained: Optional[str] = None  # checkpoint (.pt from train / distill / import) to start training from
    # target class -> the pretrained checkpoint's class whose class-head row it starts from (null =
    # random); a class not listed takes the source class of the same name (case-insensitive) if any
    class_map: dict = field(default_factory=dict)


@dataclass
class LossConfig:
    cls: float = 2.0
    l1: float = 5.0
    giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    aux: bool = True              # losses on every decoder stage
    match_cls: float = 2.0
    match_l1: float = 5.0
    match_giou: float = 2.0


@dataclass
class TrainConfig:
    epochs: int = positive(12)
    batch_size: int = positive(4)
    lr: float = positive(1e-4)
    lr_backbone_mult: float = at_least(0.1, 0)
    weight_decay: float = at_least(1e-4, 0)
    warmup_iters: int = at_least(0, 0)
    lr_drop_epochs: list = field(default_factory=lambda: [11])
    lr_drop_factor: float = at_least(0.1, 0)
    clip_max_norm: float = at_least(0.1, 0)
    amp: bool = True              # only used on CUDA
    ema: bool = False
    ema_decay: float = at_least(0.9997, 0)
    eval_every: int = at_least(1, -1)  # epochs; 0 = after the last epoch only, -1 = never
    ckpt_every: int = positive(1)      # epochs
    log_every: int = positive(10)      # iterations
    max_iters: int = at_least(0, 0)    # stop after this many iterations (0 = no limit); for smoke tests
    score_threshold: float = 0.0  # detections kept for evaluation


@dataclass
class LcmdConfig:
    alpha: float = 2.0            # weight of foreground (inside GT) pixels, normalized form
    beta: float = 1.0             # weight of background pixels (global context), normalized form
    normalize: bool = True        # squared errors divided by channels (the form alpha / beta above are for)
    # removed (issue 42): the position code added to both memories was an affine function of the student's,
    # which the adapter absorbs; LCMD's location awareness is its GT mask. Only "none" distils; the other
    # values stay readable so that checkpoints written before keep loading
    pos_embed: str = choice("none", "model", "sine")
    learn_adapter: bool = True    # a 1x1 conv adapter even when the widths agree (identity at start)


@dataclass
class TcldConfig:
    tau: float = 10.0             # temperature of the softmax "kl" kind (unused by "bce")
    cls_loss: str = choice("bce", "kl")  # per-class binary KL of sigmoid probabilities, or softmax KL
    w_cls: float = 1.0
    w_l1: float = 5.0
    w_giou: float = 2.0
    repeats: int = 3              # noisy copies of the GT query set
    box_noise: float = 0.4        # DN-DETR noise of the GT anchors: centre shift and scale, relative to the box size
    random_queries: int = 100     # extra uniformly sampled anchors ("general sampling")
    # content of the target-aware queries: "zero" = zero content for every family (DINO asks them as
    # class-free queries, like its matching queries), "own" = the model's own label embedding where it has
    # one (DINO's denoising label_enc: then they are denoising queries). Zero was chosen on the tuning
    # split (benchmarks/results/distill_content.md); DAB-DETR and Deformable DETR get zero content either way.
    content: str = choice("zero", "own")


@dataclass
class KdDetrConfig:
    random_queries: int = 100     # shared random anchors (nn.Embedding(n, 4)-style, redrawn every step)
    teacher_anchors: bool = True  # the teacher's own query anchors with zero content, answered by its matching queries
    tau: float = 10.0
    w_cls: float = 1.0
    w_l1: float = 5.0
    w_giou: float = 2.0


@dataclass
class FgdConfig:
    alpha_fg: float = 1e-3
    beta_bg: float = 5e-4
    gamma_attn: float = 1e-3
    lambda_rela: float = 5e-6
    temperature: float = 0.5


@dataclass
class DistillConfig:
    # gt_denoise: TCLD's query group (distill.logit.repeats / box_noise / random_queries / content) trained on the
    # ground truth with the detection loss, no teacher: the control for TCLD's auxiliary task
    method: str = choice("none", "clock", "kd_detr", "fgd", "gt_denoise")
    teacher: Optional[str] = None  # teacher checkpoint (.pt written by `clock-deploy train`; not used by gt_denoise)
    lambda_mem: float = 1.0
    lambda_logit: float = 1.0
    use_mem: bool = True          # CLoCK ablations: LCMD on/off
    use_logit: bool = True        # CLoCK ablations: TCLD on/off
    teacher_dtype: str = choice("fp32", "bf16", "fp16")  # teacher forward under autocast (bf16: CPU, fp16: CUDA)
    grad_share_every: int = 50    # log each loss term's share of the student gradient norm every N iters (0 = off)
    mem: LcmdConfig = field(default_factory=LcmdConfig)
    logit: TcldConfig = field(default_factory=TcldConfig)
    kd_detr: KdDetrConfig = field(default_factory=KdDetrConfig)
    fgd: FgdConfig = field(default_factory=FgdConfig)


@dataclass
class ExportConfig:
    opset: int = 17
    # detections per image in the graph output; training-time evaluation and the torch runtime keep
    # the same number, so their mAP is the exported model's
    topk: int = 100
    dynamic_batch: bool = True
    simplify: bool = True         # onnxslim
    precision: str = choice(*PRECISIONS)
    calib: Optional[str] = None   # calibration manifest for int8
    calib_images: int = 0         # 0 = all images in the manifest
    parity_tol: float = 1e-4
    exclude_nodes: list = field(default_factory=list)  # nodes kept in float for int8
    workspace_gb: float = 2.0     # TensorRT
    dla_core: int = -1            # -1 = GPU only


@dataclass
class Config:
    """A training / distillation / export run."""
    seed: int = 0
    output_dir: str = "runs/exp"
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


@dataclass
class PipelineBenchConfig:
    device: str = "cpu"           # cpu | cuda | jetson-orin
    backends: list = field(default_factory=lambda: ["torch", "onnx", "onnx-int8", "trt-fp16", "trt-int8"])
    warmup: int = 5
    runs: int = 30
    threads: int = 0              # 0 = physical cores
    max_images: int = 0           # 0 = the whole validation split


@dataclass
class PipelineConfig:
    """`clock-deploy pipeline`: stage configs (paths relative to this file) and where results go."""
    output_dir: str = "runs/demo"
    teacher: str = "teacher.yaml"
    student: str = "student.yaml"
    distill: str = "distill.yaml"
    overrides: list = field(default_factory=list)  # key=value applied to every stage config
    calib: str = "calibration/synth_demo.json"     # INT8 calibration manifest (relative to the working dir)
    bench: PipelineBenchConfig = field(default_factory=PipelineBenchConfig)


# ---------------------------------------------------------------- loading

class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key."""


def _construct_mapping(loader, node, deep=False):
    mapping = yaml.SafeLoader.construct_mapping(loader, node, deep=True)
    lines = {}
    for key_node, _ in node.value:
        if key_node.value in lines:  # YAML keeps the last one silently; a typo'd copy is a bug
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key_node.value}' "
                                                    f"(first on line {lines[key_node.value]})", key_node.start_mark)
        lines[key_node.value] = key_node.start_mark.line + 1
    return _Located(mapping, lines)


class _Located(dict):
    """A dict that also knows the source line of each of its keys."""

    def __init__(self, data, lines):
        super().__init__(data)
        self.lines = lines


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_error(path, e):
    """One line: file:line and what the YAML parser found wrong."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark is not None else path
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return ConfigError(f"{where}: invalid YAML: {problem}")


def _read_yaml(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_LineLoader)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, expected a YAML config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; expected a YAML config") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in a _base_ name
        raise ConfigError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    except yaml.YAMLError as e:
        raise _yaml_error(path, e) from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _flatten(data, path, prefix=""):
    """{'a': {'b': 1}} -> {'a.b': (1, 'file:line')} keeping where every leaf came from."""
    flat = {}
    lines = getattr(data, "lines", {})
    for key, value in data.items():
        name = f"{prefix}{key}"
        where = f"{path}:{lines[key]}" if key in lines else path
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, path, name + "."))
        else:
            flat[name] = (value, where)
    return flat


def load_flat(path, _seen=()):
    """Read a config file and its `_base_` chain into {dotted.key: (value, where)}."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"{path}: circular _base_ chain: {' -> '.join(_seen + (path,))}")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        line = getattr(data, "lines", {}).get("_base_")
        raise ConfigError(f"{path}:{line}: _base_ must be a file name or a list of file names, got {bases!r}")
    flat = {}
    for base in bases:
        base_path = os.path.join(os.path.dirname(path), base)
        flat.update(load_flat(base_path, _seen + (path,)))
    own = _flatten(data, path)
    # a child that sets a whole section to a scalar / list replaces the base's sub-keys
    for key in own:
        for old in [k for k in flat if k.startswith(key + ".")]:
            del flat[old]
    flat.update(own)
    return flat


def parse_overrides(overrides):
    """['train.lr=1e-3', 'model.arch=dino'] -> {dotted.key: (value, where)}."""
    flat = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        flat[key.strip()] = (value, f"command line '{item}'")
    return flat


def _field_types(cls):
    return {f.name: f for f in dataclasses.fields(cls)}


def _check_map_entry(value, key, where):
    """A table entry (e.g. model.class_map.Car): a name, or null."""
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where}: '{key}' must be a name or null, got {value!r}")
    return value


def _check_value(value, ftype, f, key, where):
    """Coerce / validate one leaf against its declared type."""
    origin = typing.get_origin(ftype)
    args = typing.get_args(ftype)
    if origin is typing.Union and type(None) in args:  # Optional[X]
        if value is None:
            return None
        ftype = next(a for a in args if a is not type(None))
    if value is None and ftype in (int, float, str, bool):
        raise ConfigError(f"{where}: '{key}' must be {ftype.__name__}, got null")
    if ftype is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
    elif ftype is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: '{key}' must be an integer, got {value!r}")
    elif ftype is float:
        if isinstance(value, str):  # yaml reads '1e-4' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: '{key}' must be a finite number, got {value!r}")
    elif ftype is str:
        if not isinstance(value, str):
            value = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")
    elif ftype is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
        value = list(value)
    elif ftype is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping of names, got {value!r}")
        value = {str(k): _check_map_entry(v, f"{key}.{k}", where) for k, v in value.items()}
    low = f.metadata.get("min")
    if low is not None and (value < low or (value == low and f.metadata.get("exclusive"))):
        bound = f"greater than {low}" if f.metadata.get("exclusive") else f"at least {low}"
        raise ConfigError(f"{where}: '{key}' must be {bound}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        extra = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"{where}: '{key}' must be one of {list(choices)}, got {value!r}{extra}")
    return value


def _unknown_key(key, known, where):
    """The error for an unknown key, with a suggestion from the key's own section first: a typo of
    `distill.logit.tau` must not be sent to another loss's `distill.fgd.temperature`."""
    section, _, leaf = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in known if section and k.rpartition(".")[0] == section]
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.5)
    if close:
        extra = f"; did you mean '{section}.{close[0]}'?"
    elif siblings:
        extra = f"; the keys of '{section}' are {', '.join(siblings)}"
    else:
        hint = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
        extra = f"; did you mean '{hint[0]}'?" if hint else ""
    return ConfigError(f"{where}: unknown config key '{key}'{extra}")


def _all_keys(cls, prefix=""):
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, type) and dataclasses.is_dataclass(f.type)):
            keys += _all_keys(f.type, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def build(cls, flat):
    """Build dataclass `cls` from {dotted.key: (value, where)}; every key must exist in the schema."""
    known = _all_keys(cls)
    obj = cls()
    for key, (value, where) in flat.items():
        target, parts = obj, key.split(".")
        for i, part in enumerate(parts):
            fields = _field_types(type(target))
            if part not in fields:
                raise _unknown_key(key, known, where)
            ftype = typing.get_type_hints(type(target))[part]
            if ftype is dict and i < len(parts) - 1:  # one entry of a table (flattened from YAML)
                getattr(target, part)[".".join(parts[i + 1:])] = _check_map_entry(value, key, where)
                break
            if i < len(parts) - 1:
                if not dataclasses.is_dataclass(ftype):
                    raise _unknown_key(key, known, where)
                target = getattr(target, part)
                continue
            if dataclasses.is_dataclass(ftype):
                if value == {} or value is None:
                    break
                raise ConfigError(f"{where}: '{key}' is a section; set its keys, e.g. {key}.<name>: value")
            setattr(target, part, _check_value(value, ftype, fields[part], key, where))
    return obj


def load_config(path: Union[str, os.PathLike, None] = None, overrides: Sequence[str] = (), cls: type = Config):
    """Load `path` (with its _base_ chain) and `overrides` into a validated `cls`."""
    flat = load_flat(path) if path else {}
    flat.update(parse_overrides(overrides))
    return build(cls, flat)


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def from_dict(data, cls=Config, where="checkpoint"):
    """Rebuild a config saved with `to_dict` (e.g. inside a checkpoint)."""
    return build(cls, _flatten(data, where))


def dump(cfg, path):
    """Write `cfg` as YAML, atomically (io.write_text), so a crash leaves the old file or the new one."""
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))

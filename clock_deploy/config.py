"""YAML configs -> validated, typed config objects.

A config file may name one or more `_base_` files (paths relative to itself)
that are merged first; its own keys override theirs. Command-line overrides
`key.sub=value` are applied last (value parsed as YAML). Every key is checked
against the dataclass schema below: an unknown key or a wrong type is a
ConfigError naming the key, the file and the line it came from.
"""
import dataclasses
import difflib
import logging
import math
import os
import re
import reprlib
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import yaml

from clock_deploy.artifact import PRECISIONS
from clock_deploy.errors import UserError
from clock_deploy.io import write_text

log = logging.getLogger(__name__)


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names key, file and line."""


# ---------------------------------------------------------------- schema

# Choice lists the code that acts on them imports from here (one source for each list)
ARCHS = ("dino", "dab_detr", "deformable_detr", "rt_detr")  # model.arch; models/build.py has a class for each
SAMPLING_MODES = ("grid_sample", "gather")       # model.sampling, export --sampling
DEFORMABLE_ARCHS = ("dino", "deformable_detr", "rt_detr")  # the families with deformable attention (model.sampling)
# export.precision: PRECISIONS of clock_deploy.artifact (the runtime reads it without this module)


def choice(default, *others):
    """A field (string or int) whose value must be `default` or one of `others`."""
    return field(default=default, metadata={"choices": (default,) + others})


def at_least(default, low, high=None):
    """A number field that must be >= `low` (and <= `high` when given)."""
    return field(default=default, metadata={"min": low, "max": high})


def positive(default, high=None):
    """A number field that must be > 0 (and <= `high` when given)."""
    return field(default=default, metadata={"min": 0, "exclusive": True, "max": high})


def int_list(default, low, high, length=(1, None), unique=False):
    """A list of integers in [low, high] with min..max entries (max None = no limit)."""
    return field(default_factory=lambda: list(default),
                 metadata={"items": (low, high), "length": length, "unique": unique})


def matching(default, pattern, description):
    """A string field that must match regular expression `pattern` (described to the user as `description`)."""
    return field(default=default, metadata={"pattern": pattern, "description": description})


# Upper bounds keep a few bytes of config from asking for gigabytes (issue 40): generous for real
# models (DINO-5scale: 900 queries, 6 layers, 2048 FFN) and far below what fits in memory.
MAX_SIDE = 4096        # pixels, network input height / width
MAX_QUERIES = 10_000
MAX_WIDTH = 65_536     # hidden_dim, ffn_dim
MAX_LAYERS = 64
MAX_SEED = 2**32 - 1   # numpy's seed range
DEVICE_PATTERN = r"auto|cpu|cuda|cuda:\d{1,2}"


@dataclass
class SynthConfig:
    num_images: int = positive(400, 1_000_000)  # training + validation images generated
    val_fraction: float = 0.25
    height: int = at_least(188, 64, MAX_SIDE)  # KITTI aspect ratio (375 x 1242) at half size
    width: int = at_least(620, 64, MAX_SIDE)
    seed: int = at_least(0, 0, MAX_SEED)
    max_objects: int = positive(8, 1000)


@dataclass
class DataConfig:
    root: str = "data/synth_kitti"
    format: str = choice("kitti", "coco")
    classes: str = choice("kitti3", "kitti8")   # Car/Pedestrian/Cyclist, or all 8 KITTI classes
    train_split: str = "train"
    val_split: str = "val"
    img_size: list = int_list([192, 640], 32, MAX_SIDE, length=(2, 2))  # network input H, W
    hflip: float = 0.5
    num_workers: int = at_least(0, 0)  # capped at the CPU count (load_config warns)
    synth: SynthConfig = field(default_factory=SynthConfig)  # used when `root` does not exist yet


@dataclass
class BackboneConfig:
    depth: int = choice(50, 18, 34)
    width: int = 64               # channels of the first stage; 64 is the torchvision ResNet
    weights: Optional[str] = None  # torchvision-format ResNet state dict (.pth)
    frozen_bn: bool = True
    freeze_stem: bool = True      # keep conv1 + layer1 frozen (DETR practice) when weights are loaded
    return_levels: list = int_list([1, 2, 3], 0, 3, length=(1, 4), unique=True)  # 0..3 -> strides 4, 8, 16, 32


@dataclass
class DenoisingConfig:
    num_queries: int = at_least(100, 0, MAX_QUERIES)  # total denoising queries (DINO dn_number)
    label_noise: float = 0.5
    box_noise: float = 0.4        # DINO_4scale.py dn_box_noise_scale


@dataclass
class DabConfig:
    """DAB-DETR only; the defaults are IDEA-Research/DAB-DETR's."""
    activation: str = choice("prelu", "relu")  # transformer FFN activation (--transformer_activation)
    pos_temperature: float = 20.0  # sine position embedding of the feature map (--pe_temperatureH/W)


@dataclass
class RtDetrConfig:
    """RT-DETR(v2) only; the defaults are RT-DETRv2's (lyuwenyu/RT-DETR, transformers RTDetrV2Config)."""
    expansion: float = positive(1.0)      # CCFF hidden width / hidden_dim (R18/R34: 0.5, R50: 1.0)
    csp_blocks: int = positive(3)         # RepVGG blocks per CCFF fusion block
    # deformable sampling rule of the decoder: bilinear ("default", implemented by model.sampling) or
    # RT-DETRv2's "discrete" nearest-pixel Gather (different numbers; TensorRT-safe as well)
    method: str = choice("default", "discrete")
    points_per_level: list = field(default_factory=list)  # decoder points per level; [] = model.n_points at each
    offset_scale: float = positive(0.5)   # decoder sampling offsets relative to the reference box size


@dataclass
class ModelConfig:
    arch: str = choice(*ARCHS)
    num_classes: int = positive(3, 10_000)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    hidden_dim: int = positive(256, MAX_WIDTH)
    num_queries: int = positive(300, MAX_QUERIES)
    nheads: int = positive(8, 256)
    enc_layers: int = at_least(6, 0, MAX_LAYERS)
    dec_layers: int = positive(6, MAX_LAYERS)
    ffn_dim: int = positive(1024, MAX_WIDTH)
    dropout: float = 0.0
    num_feature_levels: int = positive(4, 8)  # multi-scale models; DAB-DETR uses the last level only
    n_points: int = positive(4, 64)  # deformable attention sampling points
    sampling: str = choice(*SAMPLING_MODES)  # deformable attention sampling implementation
    box_refine: bool = True       # Deformable DETR iterative box refinement
    two_stage: bool = False       # Deformable DETR two-stage (DINO is always two-stage)
    # Deformable DETR two-stage query selection: first_class = the original (encoder proposals
    # trained class-agnostic as class 0 and ranked by it); max_class = DINO's rule (trained on the
    # real labels, ranked by the best class). DINO always uses max_class.
    proposal_rank: str = choice("first_class", "max_class")
    dn: DenoisingConfig = field(default_factory=DenoisingConfig)
    dab: DabConfig = field(default_factory=DabConfig)
    rt_detr: RtDetrConfig = field(default_factory=RtDetrConfig)
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
    vfl_alpha: float = 0.75       # RT-DETR's varifocal classification loss (model.arch rt_detr)


@dataclass
class TrainConfig:
    epochs: int = positive(12, 100_000)
    batch_size: int = positive(4, 4096)
    lr: float = positive(1e-4)
    lr_backbone_mult: float = at_least(0.1, 0)
    weight_decay: float = at_least(1e-4, 0)
    warmup_iters: int = at_least(0, 0)
    lr_drop_epochs: list = int_list([11], 0, 100_000, length=(0, 100))
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
    # per-pixel error weights: "gt" = the GT location weights M, S only (shipped CLoCK); "gt_attention" = also
    # the teacher memory's FGD spatial x channel attention at attention_temperature, as FGD's focal term
    # (candidate C3 of studies/distill_ab_preregistration.md)
    weighting: str = choice("gt", "gt_attention")
    attention_temperature: float = positive(0.5)


@dataclass
class TcldConfig:
    tau: float = 10.0             # temperature of the softmax "kl" kind (unused by "bce")
    cls_loss: str = choice("bce", "kl")  # per-class binary KL of sigmoid probabilities, or softmax KL
    w_cls: float = 1.0
    w_l1: float = 5.0
    w_giou: float = 2.0
    repeats: int = at_least(3, 0, 100)  # noisy copies of the GT query set
    box_noise: float = 0.4        # DN-DETR noise of the GT anchors: centre shift and scale, relative to the box size
    random_queries: int = at_least(100, 0, MAX_QUERIES)  # extra uniformly sampled anchors ("general sampling")
    # content of the target-aware queries: "zero" = zero content for every family (DINO asks them as
    # class-free queries, like its matching queries), "own" = the model's own label embedding where it has
    # one (DINO's denoising label_enc: then they are denoising queries). Zero was chosen on the tuning
    # split (studies/archive/distill_content/report.md); DAB-DETR and Deformable DETR get zero content either way.
    content: str = choice("zero", "own")
    # the anchors of the target-aware queries besides the general ones: "gt" = the noisy GT copies above (shipped
    # CLoCK); "student" = candidate C4 of studies/distill_ab_preregistration.md: no GT copies (repeats / box_noise
    # unused), the teacher answers the anchors the student's matching queries started from this step (zero
    # content), compared slot to slot with the student's own matching predictions
    anchors: str = choice("gt", "student")


@dataclass
class KdDetrConfig:
    random_queries: int = at_least(100, 0, MAX_QUERIES)  # shared random anchors (redrawn every step)
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
    topk: int = positive(100, MAX_QUERIES)
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
    seed: int = at_least(0, 0, MAX_SEED)
    output_dir: str = "runs/exp"
    device: str = matching("auto", DEVICE_PATTERN, "auto, cpu, cuda or cuda:N")
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

MAX_ALIASES = 100        # *alias references in one file; a config needs a handful
MAX_EXPANDED_NODES = 100_000  # values once every alias is expanded (a config has a few hundred)


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key and refuses alias bombs: a few hundred
    bytes of nested aliases expand to gigabytes when the config is flattened or printed."""

    def __init__(self, stream):
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise yaml.composer.ComposerError(None, None, f"more than {MAX_ALIASES} aliases (*name)",
                                                  self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_document(self, node):
        if _expanded_size(node, {}) > MAX_EXPANDED_NODES:
            raise yaml.constructor.ConstructorError(None, None, f"its aliases expand to more than "
                                                    f"{MAX_EXPANDED_NODES} values", node.start_mark)
        return super().construct_document(node)


def _expanded_size(node, sizes):
    """How many nodes `node` is once aliases are expanded (each shared node counted once per use,
    computed once per node); a node containing itself counts as too many."""
    if id(node) in sizes:
        return sizes[id(node)] if sizes[id(node)] is not None else MAX_EXPANDED_NODES + 1
    sizes[id(node)] = None  # being counted: meeting it again means it contains itself
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    total = 1
    for child in children:
        total += _expanded_size(child, sizes)
        if total > MAX_EXPANDED_NODES:
            break
    sizes[id(node)] = total
    return total


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
        raise ConfigError(f"{path}:{line}: _base_ must be a file name or a list of file names, got {short(bases)}")
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
            value = yaml.load(text, Loader=_LineLoader) if text != "" else ""  # the alias budget applies here too
        except yaml.YAMLError:
            value = text
        shown = item if len(item) <= 100 else item[:97] + "..."
        flat[key.strip()] = (value, f"command line '{shown}'")
    return flat


def _field_types(cls):
    return {f.name: f for f in dataclasses.fields(cls)}


def _check_map_entry(value, key, where):
    """A table entry (e.g. model.class_map.Car): a name, or null."""
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where}: '{key}' must be a name or null, got {short(value)}")
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
            raise ConfigError(f"{where}: '{key}' must be true or false, got {short(value)}")
    elif ftype is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: '{key}' must be an integer, got {short(value)}")
    elif ftype is float:
        if isinstance(value, str):  # yaml reads '1e-4' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: '{key}' must be a number, got {short(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: '{key}' must be a finite number, got {short(value)}")
    elif ftype is str:
        if not isinstance(value, str):
            value = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {short(value)}")
    elif ftype is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: '{key}' must be a list, got {short(value)}")
        value = list(value)
    elif ftype is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping of names, got {short(value)}")
        value = {str(k): _check_map_entry(v, f"{key}.{k}", where) for k, v in value.items()}
    _check_bounds(value, f.metadata, key, where)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        extra = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"{where}: '{key}' must be one of {list(choices)}, got {short(value)}{extra}")
    return value


def _check_bounds(value, meta, key, where):
    """The range of a number, the entries of an integer list, the form of a string (field metadata)."""
    low, high = meta.get("min"), meta.get("max")
    if low is not None and (value < low or (value == low and meta.get("exclusive"))):
        bound = f"greater than {low}" if meta.get("exclusive") else f"at least {low}"
        raise ConfigError(f"{where}: '{key}' must be {bound}, got {short(value)}")
    if high is not None and value > high:
        raise ConfigError(f"{where}: '{key}' must be at most {high}, got {short(value)}")
    if "items" in meta:
        _check_int_list(value, meta, key, where)
    pattern = meta.get("pattern")
    if pattern and not re.fullmatch(pattern, value):
        raise ConfigError(f"{where}: '{key}' must be {meta['description']}, got {short(value)}")


def _check_int_list(values, meta, key, where):
    (low, high), (fewest, most) = meta["items"], meta["length"]
    if len(values) < fewest or (most is not None and len(values) > most):
        count = f"{fewest}" if fewest == most else f"{fewest} to {most}" if most else f"at least {fewest}"
        raise ConfigError(f"{where}: '{key}' must have {count} entries, got {short(values)}")
    for i, item in enumerate(values):
        if isinstance(item, bool) or not isinstance(item, int) or not low <= item <= high:
            raise ConfigError(f"{where}: '{key}[{i}]' must be an integer from {low} to {high}, got {short(item)} "
                              f"(in {short(values)})")
    if meta.get("unique") and len(set(values)) != len(values):
        raise ConfigError(f"{where}: '{key}' must not repeat an entry, got {short(values)}")


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 80, 80, 8, 8, 3


def short(value, limit=80):
    """repr(value) cut to `limit` characters: an error line stays one readable line whatever the input."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


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


# model keys only one family reads (a prefix ending in "." covers a section) -> the families that read them
FAMILY_KEYS = {"model.dn.": ("dino", "rt_detr"), "model.dab.": ("dab_detr",), "model.rt_detr.": ("rt_detr",),
               "model.box_refine": ("deformable_detr",), "model.two_stage": ("deformable_detr",),
               "model.proposal_rank": ("deformable_detr",), "model.n_points": DEFORMABLE_ARCHS,
               "model.sampling": DEFORMABLE_ARCHS, "model.num_feature_levels": DEFORMABLE_ARCHS}


def foreign_keys(flat, cfg):
    """[(key, where, families)] of the keys set in `flat` that cfg.model.arch does not read, leaving out those
    at their default in `cfg`'s class: a saved config.yaml lists every key, and says nothing by them."""
    arch, now, defaults = cfg.model.arch, _flatten(to_dict(cfg), ""), _flatten(to_dict(type(cfg)()), "")
    found = []
    for key, (_, where) in flat.items():
        for prefix, families in FAMILY_KEYS.items():
            if (key.startswith(prefix) if prefix.endswith(".") else key == prefix) and arch not in families \
                    and now.get(key) != defaults.get(key):
                found.append((key, where, families))
    return found


def load_config(path: Union[str, os.PathLike, None] = None, overrides: Sequence[str] = (), cls: type = Config):
    """Load `path` (with its _base_ chain) and `overrides` into a validated `cls`. A model key that the
    config's model.arch does not read is not an error (a shared base may set it) but is named in a warning."""
    flat = load_flat(path) if path else {}
    flat.update(parse_overrides(overrides))
    cfg = build(cls, flat)
    if isinstance(cfg, Config):
        _cap_workers(cfg.data, flat.get("data.num_workers", (None, "data.num_workers"))[1])
        _check_coarsest_level(cfg, flat.get("data.img_size", (None, "data.img_size"))[1])
        for key, where, families in foreign_keys(flat, cfg):
            readers = " and ".join(filter(None, [", ".join(families[:-1]), families[-1]]))  # "a, b and c"
            log.warning(f"{where}: {key} is read by {readers} models only; this config's model.arch is "
                        f"{cfg.model.arch}, so it is ignored")
    return cfg


def _check_coarsest_level(cfg, where):
    """A multi-scale model's coarsest feature map must have more than one pixel: GroupNorm (input
    projections) cannot normalize a single value per group. Each stride-2 step rounds up."""
    m = cfg.model
    if m.arch == "dab_detr" or not m.backbone.return_levels:
        return
    extra = max(m.num_feature_levels - len(m.backbone.return_levels), 0)
    stride = 2 ** (2 + max(m.backbone.return_levels) + extra)
    height, width = cfg.data.img_size
    if math.ceil(height / stride) * math.ceil(width / stride) < 2:
        raise ConfigError(f"{where}: data.img_size {height}x{width} leaves a 1x1 feature map at stride {stride} "
                          f"(model.backbone.return_levels {m.backbone.return_levels}, model.num_feature_levels "
                          f"{m.num_feature_levels}); use a larger image or fewer levels")


def _cap_workers(data, where):
    """More DataLoader workers than CPUs only costs memory (each is a forked copy of the process)."""
    cpus = os.cpu_count() or 1
    if data.num_workers > cpus:
        log.warning(f"{where}: data.num_workers={data.num_workers} is more than the {cpus} CPUs here; using {cpus}")
        data.num_workers = cpus


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def from_dict(data, cls=Config, where="checkpoint"):
    """Rebuild a config saved with `to_dict` (e.g. inside a checkpoint)."""
    return build(cls, _flatten(data, where))


def dump(cfg, path):
    """Write `cfg` as YAML, atomically (io.write_text), so a crash leaves the old file or the new one."""
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))

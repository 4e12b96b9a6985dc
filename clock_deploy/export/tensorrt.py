"""ONNX -> TensorRT engine with the TensorRT Python API (TensorRT 10 and 11, TensorRT-RTX).

The builder is stock TensorRT (`tensorrt`: data-center, Jetson) or TensorRT-RTX
(`tensorrt_rtx`: RTX GPUs; it also builds ahead of time on a machine without a GPU,
which is how the tests check every exported graph). It is imported only when an
engine is built or run, so everything else works without it. TensorRT-RTX has
TensorRT 11's API (strongly typed only, no precision builder flags, no DLA, timing
cache calls are no-ops). Precision comes from the ONNX wherever possible:

- TensorRT 11 builds strongly typed networks only (the precision builder flags and
  implicit INT8 calibration are gone): the FP16 engine is built from the FP16 ONNX
  (`export --fp16`), the INT8 engine from the Q/DQ + FP16 ONNX (`export --int8`); no network
  creation flag is passed (strong typing is always on, EXPLICIT_BATCH no longer exists).
- TensorRT 10 (JetPack 6): the FP16 / Q/DQ ONNX is built as a STRONGLY_TYPED network too;
  an FP32 ONNX asked to run in FP16 gets the weakly typed BuilderFlag.FP16 instead, and so
  does any DLA build (DLA on TensorRT 10 takes its precision from the builder flags).

`plan_build` makes these choices as plain data so tests can check them without TensorRT.
"""
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Optional, Union

from clock_deploy.artifact import INPUT_NAME, build_metadata, engine_batch, read_metadata, write_metadata
from clock_deploy.errors import UserError
from clock_deploy.export.engine_report import LAYER_LISTING_HEADER, describe, layer_precisions
from clock_deploy.io import atomic_path
from clock_deploy.nvidia import DISPLAY_NAMES, TensorRTUnavailable, import_cudart, import_tensorrt

log = logging.getLogger(__name__)


def builder_name(trt):
    """"tensorrt" or "tensorrt-rtx" for an imported builder module."""
    return "tensorrt-rtx" if getattr(trt, "__name__", "").split(".")[0] == "tensorrt_rtx" else "tensorrt"


def major_version(trt):
    """The TensorRT API generation: TensorRT-RTX (1.x) has TensorRT 11's strongly typed API."""
    if builder_name(trt) == "tensorrt-rtx":
        return 11
    return int(str(trt.__version__).split(".")[0])


@dataclass
class BuildPlan:
    network_flags: list = field(default_factory=list)  # NetworkDefinitionCreationFlag names
    builder_flags: list = field(default_factory=list)  # BuilderFlag names
    strongly_typed: bool = True


def plan_build(trt_major, onnx_precision, precision, dla_core=-1):
    """Network / builder flags for building `precision` from an ONNX of `onnx_precision`."""
    if trt_major < 10:
        raise UserError(f"TensorRT {trt_major}.x is too old: clock-deploy needs TensorRT 10 or 11")
    if precision == "int8" and onnx_precision != "int8":
        raise UserError("an INT8 engine is built from the Q/DQ ONNX written by `clock-deploy export --int8`")
    if onnx_precision != "fp32" and precision != onnx_precision:
        raise UserError(f"cannot build a {precision} engine from a {onnx_precision} ONNX")
    dla = dla_core >= 0
    if dla and precision == "fp32":
        raise UserError("DLA runs FP16 or INT8 only: build an fp16 or int8 engine with dla_core")
    fallback = ["GPU_FALLBACK"] if dla else []
    if trt_major >= 11:
        if onnx_precision != precision:
            raise UserError(f"TensorRT {trt_major} builds strongly typed networks only: a {precision} engine "
                            f"needs the {precision} ONNX (`clock-deploy export --{precision}` writes it)")
        return BuildPlan([], fallback, strongly_typed=True)
    if dla or onnx_precision != precision:
        # weak typing: the builder (and DLA) may use FP16 kernels; INT8 placement comes from the Q/DQ nodes
        flags = ["FP16"] + (["INT8"] if precision == "int8" else [])
        return BuildPlan([], flags + fallback, strongly_typed=False)
    return BuildPlan(["STRONGLY_TYPED"], [], strongly_typed=True)


def profile_shapes(batch, height, width):
    """(min, opt, max) input shapes of the optimization profile for a batch spec (metadata.batch_spec)."""
    return tuple((batch[k], 3, height, width) for k in ("min", "opt", "max"))


def _flag_bits(enum, names):
    bits = 0
    for name in names:
        bits |= 1 << int(getattr(enum, name))
    return bits


def _parser_errors(parser):
    return "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors)) or "unknown error"


def _make_logger(trt):
    """A TensorRT logger that sends the builder's errors to this module's logger as errors and its
    warnings and notes at debug level (e.g. "Make sure output labels has Int64 binding": nothing a
    user can act on), and keeps the verbose layer listing (the precision report's source where the
    engine cannot be deserialized)."""
    if not hasattr(trt, "ILogger"):  # stand-in modules in tests
        return trt.Logger(trt.Logger.WARNING)

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.layer_listing = None
            self.seen = set()

        def log(self, severity, msg):
            if msg.startswith(LAYER_LISTING_HEADER):
                self.layer_listing = msg
            elif int(severity) <= int(trt.ILogger.Severity.ERROR):
                log.error(f"TensorRT: {msg}")
            elif int(severity) <= int(trt.ILogger.Severity.INFO) and msg not in self.seen:
                self.seen.add(msg)  # e.g. one "Converting conv weight scales to fp32" per convolution
                log.debug(f"TensorRT: {msg}")

    logger = Logger()
    logger.min_severity = trt.ILogger.Severity.VERBOSE
    return logger


def _make_builder(trt, logger):
    try:
        builder = trt.Builder(logger)
    except (RuntimeError, TypeError) as e:
        builder, reason = None, str(e)
    else:
        reason = "no CUDA device"
    if builder is None:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is installed but found no usable NVIDIA GPU "
                                  f"({reason}); build engines on the target device")
    return builder


def _load_timing_cache(config, path):
    """Give the build the cache at `path`; a cache from another TensorRT / GPU is dropped with one warning."""
    data = b""
    if path and os.path.isfile(path):
        with open(path, "rb") as f:
            data = f.read()
    if config.set_timing_cache(config.create_timing_cache(data), ignore_mismatch=False):
        return
    log.warning(f"{path}: timing cache was made by another TensorRT version or GPU; starting a fresh one")
    if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        raise UserError(f"TensorRT refused a fresh timing cache; give timing_cache another file than {path}")


def _save_timing_cache(config, path):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(bytes(config.get_timing_cache().serialize()))


def build_engine(onnx_path, engine_path, *, onnx_precision, precision, height, width, batch,
                 workspace_gb=2.0, timing_cache=None, dla_core=-1, trt=None, builder=None):
    """Build and write `engine_path` from `onnx_path`; returns the `tensorrt` sidecar section.

    batch: metadata.batch_spec dict; a dynamic batch gets one optimization profile (min, opt, max).
    timing_cache: file loaded when present and written after the build (speeds up rebuilds;
    TensorRT-RTX has none).
    trt: the builder module (tests pass a stand-in); else imported from `builder`
    ("tensorrt" | "tensorrt-rtx", default the first installed).
    """


    trt = trt or import_tensorrt(builder)
    name = builder_name(trt)
    plan = plan_build(major_version(trt), onnx_precision, precision, dla_core)
    logger = _make_logger(trt)
    trt_builder = _make_builder(trt, logger)
    network = trt_builder.create_network(_flag_bits(trt.NetworkDefinitionCreationFlag, plan.network_flags))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        raise UserError(f"{onnx_path}: {DISPLAY_NAMES[name]} {trt.__version__} cannot parse it: "
                        f"{_parser_errors(parser)}")

    config = trt_builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if hasattr(trt, "ProfilingVerbosity"):  # layer names, types and precisions for the precision report
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if batch["dynamic"]:
        profile = trt_builder.create_optimization_profile()
        profile.set_shape(INPUT_NAME, *profile_shapes(batch, height, width))
        config.add_optimization_profile(profile)
    if dla_core >= 0:
        if name == "tensorrt-rtx":
            raise UserError("dla_core: TensorRT-RTX has no DLA; build Jetson DLA engines with TensorRT")
        if dla_core >= trt_builder.num_DLA_cores:
            raise UserError(f"dla_core {dla_core}: this device has {trt_builder.num_DLA_cores} DLA cores")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
    timing_cache = None if name == "tensorrt-rtx" else timing_cache  # its timing cache calls are no-ops
    if timing_cache:
        _load_timing_cache(config, timing_cache)

    start = time.perf_counter()
    serialized = trt_builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise UserError(f"{onnx_path}: {DISPLAY_NAMES[name]} failed to build an engine (see the TensorRT log above)")
    serialized = bytes(serialized)
    with atomic_path(engine_path) as tmp:
        with open(tmp, "wb") as f:
            f.write(serialized)
    if timing_cache:
        _save_timing_cache(config, timing_cache)
    return {
        "builder": name,
        "version": str(trt.__version__),
        "device": cuda_device_name(),
        "strongly_typed": plan.strongly_typed,
        "network_flags": plan.network_flags,
        "builder_flags": plan.builder_flags,
        "workspace_gb": workspace_gb,
        "dla_core": dla_core,
        "profile": [list(s) for s in profile_shapes(batch, height, width)],
        "onnx": os.path.basename(os.fspath(onnx_path)),
        "build_seconds": round(seconds, 2),
        "layers": layer_precisions(trt, serialized, getattr(logger, "layer_listing", None), onnx_path),
    }


def cuda_device_name(index=0):
    """Name of CUDA device `index` via cuda-python, or a note when it cannot be queried."""
    try:
        cudart = import_cudart()
    except TensorRTUnavailable:
        return "unknown (cuda-python not installed)"
    err, props = cudart.cudaGetDeviceProperties(index)
    if err != cudart.cudaError_t.cudaSuccess:
        return f"unknown ({err})"
    name = props.name
    return (name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)).strip()


def engine_from_onnx(onnx_path: Union[str, os.PathLike], precision: Optional[str] = None,
                     engine_path: Union[str, os.PathLike, None] = None, *, workspace_gb: float = 2.0,
                     timing_cache: Optional[str] = None, dla_core: int = -1, batch=None, builder: Optional[str] = None,
                     trt=None) -> Union[str, os.PathLike]:
    """Build the engine of an exported ONNX and write its sidecar; torch-free, for building on the device.

    Everything the build needs (input size, batch profile, precision, classes, calibration, parity)
    comes from the ONNX's own sidecar (or, without one, the copy embedded in the ONNX). precision:
    defaults to the ONNX's; "fp16" from an FP32 ONNX uses TensorRT 10's FP16 builder flag.
    batch: "MIN,OPT,MAX" or a number overriding the ONNX's profile (metadata.engine_batch).
    builder: "tensorrt" | "tensorrt-rtx" (default the first installed). Returns the engine path.
    """
    onnx_path = os.fspath(onnx_path)
    onnx_meta = read_metadata(onnx_path)
    onnx_precision = onnx_meta["precision"]
    precision = precision or onnx_precision
    if engine_path is None:
        stem = onnx_path[:-len(".onnx")] if onnx_path.endswith(".onnx") else onnx_path
        stem = stem[:-len("." + onnx_precision)] if stem.endswith("." + onnx_precision) else stem
        engine_path = f"{stem}.{precision}.engine"
    height, width = onnx_meta["input"]["height"], onnx_meta["input"]["width"]
    batch = engine_batch(onnx_meta["batch"], batch, onnx_path)
    build = build_engine(onnx_path, engine_path, onnx_precision=onnx_precision, precision=precision,
                         height=height, width=width, batch=batch, workspace_gb=workspace_gb,
                         timing_cache=timing_cache, dla_core=dla_core, trt=trt, builder=builder)
    # parity was measured on the ONNX the engine is built from (engines need a GPU to run)
    write_metadata(engine_path, build_metadata(
        kind="tensorrt", arch=onnx_meta["arch"], classes=onnx_meta["classes"], height=height, width=width,
        mean=onnx_meta["input"]["mean"], std=onnx_meta["input"]["std"], precision=precision,
        topk=onnx_meta["topk"], batch=batch, source=onnx_meta.get("source"),
        opset=onnx_meta.get("opset"), sampling=onnx_meta.get("sampling"),
        calibration=onnx_meta.get("calibration"), tensorrt=build, onnx_parity=onnx_meta.get("parity")))
    return engine_path


def describe_build(engine_path, build):
    """One line for the console: what was built, by which builder, where, how long, in which precisions."""
    lo, opt, hi = (shape[0] for shape in build["profile"])
    name = DISPLAY_NAMES.get(build.get("builder"), "TensorRT")
    return (f"wrote {engine_path} ({name} {build['version']} on {build['device']}, "
            f"batch {lo}/{opt}/{hi}, {build.get('build_seconds', 0):.1f} s): {describe(build.get('layers'))}")

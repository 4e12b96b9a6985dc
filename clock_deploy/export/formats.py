"""Which export options go together: one table, checked before any work starts.

An export writes one precision (fp32, fp16 or int8) as ONNX and, with `trt`, as a TensorRT engine
built by one builder. FORMATS lists each combination and what it needs; OPTIONS lists every
option that only means something for some of them. `check_options` refuses a combination that
cannot work with one line naming the options as the user gave them (naming.option), and
`clock-deploy export --help` prints the same table (`help_table`).
"""
from dataclasses import dataclass
from typing import Optional

from clock_deploy.config import DEFORMABLE_ARCHS
from clock_deploy.errors import UserError
from clock_deploy.naming import API, option



@dataclass(frozen=True)
class Format:
    precision: str
    backend: str            # "onnx" | "engine"
    builder: Optional[str]  # engines: "tensorrt" | "tensorrt-rtx"
    needs: tuple            # what the export needs besides the checkpoint
    files: str


def _formats():
    rows = []
    for precision, suffix in (("fp32", ".onnx"), ("fp16", ".fp16.onnx"), ("int8", ".int8.onnx")):
        calibration = ("calibration manifest",) if precision == "int8" else ()
        rows.append(Format(precision, "onnx", None, calibration, f"<name>{suffix}"))
        for builder, needs in (("tensorrt", ("TensorRT", "NVIDIA GPU")), ("tensorrt-rtx", ("TensorRT-RTX",))):
            rows.append(Format(precision, "engine", builder, calibration + needs,
                               f"<name>{suffix} + <name>.{precision}.engine"))
    return tuple(rows)


FORMATS = _formats()


@dataclass(frozen=True)
class Scope:
    """Where an option applies: a predicate on (precision, trt, builder, arch) and its wording."""
    name: str
    text: str


# option (API argument) -> the exports it applies to
INT8 = Scope("int8", "INT8 only")
CALIBRATED = Scope("calibrated", "INT8 or --sensitivity")
ENGINE = Scope("engine", "engines only (--trt)")
TENSORRT_ENGINE = Scope("tensorrt_engine", "TensorRT engines only (--trt --builder tensorrt)")
DEFORMABLE = Scope("deformable", f"models with deformable attention only ({', '.join(DEFORMABLE_ARCHS)})")
OPTIONS = {"calib": CALIBRATED, "calib_root": CALIBRATED, "calib_images": CALIBRATED, "exclude_nodes": INT8,
           "sensitivity_images": Scope("sensitivity", "--sensitivity only"),
           "builder": ENGINE, "workspace_gb": ENGINE, "timing_cache": ENGINE,
           "dla_core": TENSORRT_ENGINE, "sampling": DEFORMABLE}


def _applies(scope, precision, trt, builder, arch, sensitivity):
    if scope is INT8:
        return precision == "int8"
    if scope is CALIBRATED:
        return precision == "int8" or sensitivity
    if scope is ENGINE:
        return trt
    if scope is TENSORRT_ENGINE:
        return trt and builder != "tensorrt-rtx"
    if scope is DEFORMABLE:
        return arch in DEFORMABLE_ARCHS
    return sensitivity


def applies_text(key):
    """'[INT8 only]' for the help of option `key` ('' when it applies to every export)."""
    return f"[{OPTIONS[key].text}]" if key in OPTIONS else ""


def check_options(precision, trt, builder, given, arch, via=API):
    """Refuse a combination that cannot work, before any work starts.

    given: the API arguments the user set ({name: value}; unset ones left out or None);
    arch: model.arch of the checkpoint. One UserError line naming the options as given (`via`)."""
    given = {k: v for k, v in given.items() if not (v is None or v is False or v == () or v == [])}
    if precision not in ("fp32", "fp16", "int8"):
        raise UserError(f"{option('precision', via=via)} must be fp32, fp16 or int8, got '{precision}'")
    sensitivity = bool(given.get("sensitivity"))
    for key, value in given.items():
        scope = OPTIONS.get(key)
        if scope is None or _applies(scope, precision, trt, builder, arch, sensitivity):
            continue
        if scope is DEFORMABLE:
            raise UserError(f"{option(key, value, via)}: this {arch} checkpoint has no deformable attention "
                            f"({scope.text.split('(')[-1].rstrip(')')} have it); leave it out")
        raise UserError(f"{option(key, value, via)} applies to {scope.text}, not to this export "
                        f"({describe(precision, trt, builder, via)})")


def describe(precision, trt, builder, via=API):
    """An export as the user asked for it: '--fp16 --trt --builder tensorrt-rtx', 'FP32 ONNX'."""
    parts = [option("precision", precision, via)] if precision != "fp32" else ["FP32"]
    if trt:
        parts.append(option("trt", True, via))
        if builder:
            parts.append(option("builder", builder, via))
    return " ".join(parts) if trt or precision != "fp32" else "FP32 ONNX"


def precision_from_flags(fp16, int8, via=API):
    """The precision of `--fp16` / `--int8` (fp32 when neither); both together are refused."""
    if fp16 and int8:
        raise UserError(f"{option('precision', 'fp16', via)} and {option('precision', 'int8', via)} exclude "
                        "each other: export one precision per run")
    return "fp16" if fp16 else "int8" if int8 else "fp32"


def help_table():
    """The FORMATS table as `clock-deploy export --help` prints it (one line per format)."""
    lines = ["Formats (precision, backend, builder: flags; what it needs besides the checkpoint):"]
    for f in FORMATS:
        flags = {"fp32": [], "fp16": ["--fp16"], "int8": ["--int8", "--calib MANIFEST"]}[f.precision]
        if f.backend == "engine":
            flags += ["--trt", "--builder", f.builder]
        lines.append(f"  {f.precision} {f.backend} {f.builder or ''}: {' '.join(flags) or '(no flag)'}; "
                     f"needs {', '.join(f.needs) or 'nothing else'}".replace("  :", ":").replace(" :", ":"))
    return "\n".join(lines)

"""Real engine builds with TensorRT-RTX, which builds ahead of time without a GPU.

Every exported graph family (4 architectures x fp32 / fp16 / int8 x both sampling modes)
goes through the project's own engine_from_onnx and must parse and build; the engines'
precision reports must show INT8 convolutions and GEMMs (INT8), half kernels (FP16) and no
FP32 layer outside the ops deliberately kept in float (engine_report.kept_float_reason).
The default suite builds one family in FP16 and INT8; the full matrix is marked slow.
Skipped where tensorrt_rtx is not installed (it is in the [dev] extra).
"""
import json

import pytest

from clock_deploy.artifact import batch_spec, build_metadata, read_metadata, write_metadata
from clock_deploy.export.onnx import export_onnx
from clock_deploy.export.precision import convert_fp16, quantize_int8
from clock_deploy.export.tensorrt import engine_from_onnx

pytest.importorskip("tensorrt_rtx")

ARCHS = ("dab_detr", "deformable_detr", "dino", "rt_detr")
SAMPLINGS = ("grid_sample", "gather")
DEFAULT = ("deformable_detr", "gather")  # the family the default suite builds


def _onnx(folder, arch, sampling, precision, calibration, make_tiny_student, student_io):
    """The exported ONNX of one family and precision, with its sidecar, as `clock-deploy export` writes it."""
    height, width, topk, spec = student_io.height, student_io.width, student_io.topk, student_io.spec
    model, _ = make_tiny_student(arch, sampling)
    fp32 = folder / f"{arch}-{sampling}.onnx"
    if not fp32.exists():
        export_onnx(model, str(fp32), height=height, width=width, topk=topk, simplify=False)
    path = fp32 if precision == "fp32" else folder / f"{arch}-{sampling}.{precision}.onnx"
    if precision == "fp16":
        convert_fp16(fp32, path)
    elif precision == "int8":
        quantize_int8(fp32, path, calibration, spec)
    write_metadata(path, build_metadata(kind="onnx", arch=arch, classes=student_io.classes, height=height, width=width,
                                        mean=spec["mean"], std=spec["std"], precision=precision, topk=topk,
                                        batch=batch_spec(True), sampling=sampling))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, make_tiny_student, make_random_images, student_io):
    """(arch, sampling, precision) -> ONNX path, exported on first use and shared by the module."""
    folder = tmp_path_factory.mktemp("rtx")
    calibration = make_random_images(folder, 4)
    cache = {}

    def get(arch, sampling, precision):
        key = (arch, sampling, precision)
        if key not in cache:
            cache[key] = _onnx(folder, arch, sampling, precision, calibration, make_tiny_student, student_io)
        return cache[key]
    return get


def _build(onnx_path, precision, **kwargs):
    engine = engine_from_onnx(onnx_path, builder="tensorrt-rtx", **kwargs)
    meta = read_metadata(engine)
    build = meta["tensorrt"]
    assert build["builder"] == "tensorrt-rtx" and build["version"] and meta["precision"] == precision
    layers = build["layers"]
    assert layers["source"] == "builder log" and layers["total"] > 0
    return engine, meta, layers


def _check_precisions(layers, precision):
    if precision == "int8":
        assert layers["int8"] > 0 and layers["fp16"] > 0, layers
        assert layers["fp32_unexplained"] == 0, [l for l in layers["fp32_layers"] if l["reason"] is None]
    elif precision == "fp16":
        assert layers["fp16"] > layers["fp32"] and layers["int8"] == 0, layers
        assert layers["fp32_unexplained"] == 0, [l for l in layers["fp32_layers"] if l["reason"] is None]
    else:
        assert layers["fp32"] > 0 and layers["fp16"] == layers["int8"] == 0, layers


def test_int8_engine_is_int8_with_fp16_remainder(exported):
    path = exported(*DEFAULT, "int8")
    _, _, layers = _build(path, "int8")
    _check_precisions(layers, "int8")
    # INT8 convolutions and GEMMs: the kinds of layer reading int8 tensors
    assert {"correlation", "gemm"} <= set(layers["int8_types"]), layers["int8_types"]
    for layer in layers["fp32_layers"]:  # each FP32 layer is named with the reason it stays float
        assert layer["reason"] and layer["onnx"]


def test_engine_command_builds_a_batch_profile_with_half_kernels(exported, tmp_path, student_io):
    height, width = student_io.height, student_io.width
    from click.testing import CliRunner

    from clock_deploy.export.commands import engine

    path = exported(*DEFAULT, "fp16")
    out = tmp_path / "m.fp16.engine"
    result = CliRunner().invoke(engine, [str(path), "--builder", "tensorrt-rtx", "--batch", "1,4,8",
                                         "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "TensorRT-RTX" in result.output and "batch 1/4/8" in result.output and "fp16" in result.output
    meta = read_metadata(out)
    assert meta["batch"] == {"dynamic": True, "min": 1, "opt": 4, "max": 8}
    assert meta["tensorrt"]["profile"] == [[1, 3, height, width], [4, 3, height, width], [8, 3, height, width]]
    _check_precisions(meta["tensorrt"]["layers"], "fp16")
    json.dumps(meta)  # the sidecar stays plain JSON


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_graph_family_parses_and_builds(exported, arch, sampling, precision):
    if arch == "dab_detr" and sampling == "gather":
        pytest.skip("DAB-DETR has no deformable attention: one graph for both sampling modes")
    _, _, layers = _build(exported(arch, sampling, precision), precision)
    _check_precisions(layers, precision)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_rt_detr_discrete_sampling_graph_builds(tmp_path, make_tiny_student, make_random_images, student_io, precision):
    """RT-DETRv2's discrete (nearest-pixel Gather) decoder sampling: no GridSample, builds in half / int8."""
    import onnx

    from clock_deploy.models.deform_attn import MSDeformAttn

    height, width, topk, spec = student_io.height, student_io.width, student_io.topk, student_io.spec
    model, _ = make_tiny_student("rt_detr", "gather")
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            module.discrete = True
    fp32 = tmp_path / "discrete.onnx"
    export_onnx(model, str(fp32), height=height, width=width, topk=topk, simplify=False)
    assert "GridSample" not in {n.op_type for n in onnx.load(fp32).graph.node}
    path = tmp_path / f"discrete.{precision}.onnx"
    if precision == "fp16":
        convert_fp16(fp32, path)
    else:
        quantize_int8(fp32, path, make_random_images(tmp_path, 4), spec)
    write_metadata(path, build_metadata(kind="onnx", arch="rt_detr", classes=student_io.classes, height=height,
                                        width=width, mean=spec["mean"], std=spec["std"], precision=precision,
                                        topk=topk, batch=batch_spec(True), sampling="gather"))
    _, _, layers = _build(path, precision)
    _check_precisions(layers, precision)

"""TensorRT engine building: flag choices per version / precision, profiles, timing cache, DLA, errors.

Most tests drive build_engine with a stand-in `tensorrt` module that records every call,
so they run without TensorRT or a GPU. Tests marked `trt` build and run real engines and
skip cleanly where TensorRT or an NVIDIA GPU is missing.
"""
import logging
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from clock_deploy.artifact import batch_spec, build_metadata, read_metadata, write_metadata
from clock_deploy.errors import UserError
from clock_deploy.export.tensorrt import (BuildPlan, build_engine, builder_name, engine_from_onnx, major_version,
                                         plan_build)
from clock_deploy.nvidia import TensorRTUnavailable, import_tensorrt

H, W = 64, 128


class FakeTensorRT:
    """Just enough of the tensorrt module for build_engine; `calls` logs what was asked of it."""

    def __init__(self, version="10.3.0", gpu=True, parse_errors=(), build_ok=True, dla_cores=2, name="tensorrt"):
        self.__version__ = version
        self.__name__ = name
        self.calls = []
        major = int(version.split(".")[0])
        fake = self

        # TensorRT 11 removed the weak-typing precision flags: touching them must fail
        flags = {"GPU_FALLBACK": 3} if major >= 11 else {"FP16": 0, "INT8": 1, "GPU_FALLBACK": 3}
        self.BuilderFlag = SimpleNamespace(**flags)
        self.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=1)
        self.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
        self.DeviceType = SimpleNamespace(GPU="GPU", DLA="DLA")

        class Logger:
            WARNING = "warning"

            def __init__(self, level):
                pass

        class Cache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return b"timings:" + self.data

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("pool", pool, size))

            def set_flag(self, flag):
                fake.calls.append(("flag", flag))

            def add_optimization_profile(self, profile):
                fake.calls.append(("profile", profile.shapes))

            def create_timing_cache(self, data):
                fake.calls.append(("cache_in", bytes(data)))
                return Cache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                if cache.data.startswith(b"stale"):  # made by another TensorRT / GPU
                    return False
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

        class Profile:
            def set_shape(self, name, low, opt, high):
                self.shapes = (name, low, opt, high)

        class Builder:
            num_DLA_cores = dla_cores

            def create_network(self, flags):
                fake.calls.append(("network", flags))
                return "network"

            def create_builder_config(self):
                fake.config = Config()
                return fake.config

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"serialized engine" if build_ok else None

        class Error:
            def __init__(self, text):
                self.text = text

            def desc(self):
                return self.text

        class OnnxParser:
            num_errors = len(parse_errors)

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                fake.calls.append(("parse", path))
                return not parse_errors

            def get_error(self, i):
                return Error(parse_errors[i])

        self.Logger = Logger
        self.Builder = (lambda logger: Builder()) if gpu else (lambda logger: None)
        self.OnnxParser = OnnxParser

    def recorded(self, kind):
        return [c[1:] for c in self.calls if c[0] == kind]


@pytest.mark.parametrize("major,onnx_precision,precision,dla,expected", [
    (10, "fp32", "fp32", -1, BuildPlan(["STRONGLY_TYPED"], [], True)),
    (10, "fp32", "fp16", -1, BuildPlan([], ["FP16"], False)),           # JetPack 6 path from the FP32 ONNX
    (10, "fp16", "fp16", -1, BuildPlan(["STRONGLY_TYPED"], [], True)),
    (10, "int8", "int8", -1, BuildPlan(["STRONGLY_TYPED"], [], True)),
    (10, "fp32", "fp16", 0, BuildPlan([], ["FP16", "GPU_FALLBACK"], False)),
    (10, "int8", "int8", 1, BuildPlan([], ["FP16", "INT8", "GPU_FALLBACK"], False)),
    (11, "fp32", "fp32", -1, BuildPlan([], [], True)),
    (11, "fp16", "fp16", -1, BuildPlan([], [], True)),
    (11, "int8", "int8", -1, BuildPlan([], [], True)),
    (11, "fp16", "fp16", 0, BuildPlan([], ["GPU_FALLBACK"], True)),
])
def test_plan_build_per_version_and_precision(major, onnx_precision, precision, dla, expected):
    plan = plan_build(major, onnx_precision, precision, dla)
    assert plan == expected
    if major >= 11:  # never the removed weak-typing flags, never a network creation flag
        assert not {"FP16", "INT8"} & set(plan.builder_flags) and plan.network_flags == []


@pytest.mark.parametrize("major,onnx_precision,precision,dla,message", [
    (11, "fp32", "fp16", -1, "strongly typed networks only.*export --fp16"),
    (10, "fp32", "int8", -1, "Q/DQ ONNX written by `clock-deploy export --int8`"),
    (10, "fp16", "fp32", -1, "cannot build a fp32 engine from a fp16 ONNX"),
    (10, "fp32", "fp32", 0, "DLA runs FP16 or INT8 only"),
    (8, "fp32", "fp32", -1, "needs TensorRT 10 or 11"),
])
def test_plan_build_rejects_impossible_builds(major, onnx_precision, precision, dla, message):
    with pytest.raises(UserError, match=message):
        plan_build(major, onnx_precision, precision, dla)


def _build(tmp_path, trt, onnx_precision="fp32", precision="fp32", batch=None, **kwargs):
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"onnx")
    engine = tmp_path / "model.engine"
    info = build_engine(onnx_path, engine, onnx_precision=onnx_precision, precision=precision, height=H, width=W,
                        batch=batch or batch_spec(True, 4), trt=trt, **kwargs)
    return engine, info


def test_tensorrt10_fp16_from_fp32_onnx_with_profile_workspace_and_timing_cache(tmp_path):
    trt = FakeTensorRT("10.3.0")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    engine, info = _build(tmp_path, trt, "fp32", "fp16", workspace_gb=1.5, timing_cache=str(cache))
    assert trt.recorded("network") == [(0,)]  # weakly typed: no creation flag
    assert trt.recorded("flag") == [(0,)]     # BuilderFlag.FP16
    assert trt.recorded("pool") == [("WORKSPACE", int(1.5 * 2**30))]
    assert trt.recorded("profile") == [(("images", (1, 3, H, W), (4, 3, H, W), (4, 3, H, W)),)]
    assert trt.recorded("cache_in") == [(b"old",)]
    assert cache.read_bytes() == b"timings:old"  # saved after the build
    assert engine.read_bytes() == b"serialized engine"
    assert info["version"] == "10.3.0" and info["builder_flags"] == ["FP16"] and not info["strongly_typed"]
    assert info["profile"] == [[1, 3, H, W], [4, 3, H, W], [4, 3, H, W]] and info["dla_core"] == -1
    assert "device" in info


def test_tensorrt10_qdq_onnx_is_strongly_typed_without_precision_flags(tmp_path):
    trt = FakeTensorRT("10.8.0")
    _build(tmp_path, trt, "int8", "int8")
    assert trt.recorded("network") == [(1 << 1,)]  # 1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert trt.recorded("flag") == []


def test_tensorrt11_never_touches_removed_flags(tmp_path):
    trt = FakeTensorRT("11.1.0")  # its BuilderFlag has no FP16 / INT8: using them would raise
    for precision in ("fp32", "fp16", "int8"):
        trt.calls.clear()
        _build(tmp_path, trt, precision, precision)
        assert trt.recorded("network") == [(0,)] and trt.recorded("flag") == []
    with pytest.raises(UserError, match="export --fp16"):
        _build(tmp_path, trt, "fp32", "fp16")


def test_dla_core_with_gpu_fallback_and_static_batch(tmp_path):
    trt = FakeTensorRT("10.3.0", dla_cores=2)
    _, info = _build(tmp_path, trt, "fp16", "fp16", batch=batch_spec(False, 2), dla_core=1)
    assert trt.config.default_device_type == "DLA" and trt.config.DLA_core == 1
    assert trt.recorded("flag") == [(0,), (3,)]  # FP16, GPU_FALLBACK
    assert trt.recorded("profile") == []         # static batch: no optimization profile
    assert info["profile"] == [[2, 3, H, W]] * 3
    with pytest.raises(UserError, match="dla_core 2: this device has 2 DLA cores"):
        _build(tmp_path, FakeTensorRT("10.3.0", dla_cores=2), "fp16", "fp16", dla_core=2)


def test_build_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match=r"model.onnx: TensorRT 10.3.0 cannot parse it: Unsupported op GridSample"):
        _build(tmp_path, FakeTensorRT(parse_errors=["Unsupported op GridSample"]))
    with pytest.raises(TensorRTUnavailable, match="installed but found no usable NVIDIA GPU"):
        _build(tmp_path, FakeTensorRT(gpu=False))
    with pytest.raises(UserError, match="failed to build an engine"):
        _build(tmp_path, FakeTensorRT(build_ok=False))
    assert not (tmp_path / "model.engine").exists()


def _no_builders(monkeypatch):
    for module in ("tensorrt", "tensorrt_rtx"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import tensorrt` raise ImportError


def test_missing_tensorrt_names_what_to_install(monkeypatch):
    _no_builders(monkeypatch)
    with pytest.raises(TensorRTUnavailable) as e:
        import_tensorrt()
    message = str(e.value)
    assert "\n" not in message and "pip install clock-deploy[trt]" in message and "python3-libnvinfer" in message
    assert "clock-deploy[rtx]" in message


def test_builder_choice_tensorrt_first_then_tensorrt_rtx(monkeypatch):
    stock, rtx = FakeTensorRT("10.3.0"), FakeTensorRT("1.7.1", name="tensorrt_rtx")
    monkeypatch.setitem(sys.modules, "tensorrt", stock)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", rtx)
    assert import_tensorrt() is stock and import_tensorrt("tensorrt-rtx") is rtx
    assert builder_name(stock) == "tensorrt" and builder_name(rtx) == "tensorrt-rtx"
    assert major_version(rtx) == 11  # TensorRT 11's strongly typed API, whatever its own version number
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert import_tensorrt() is rtx
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        import_tensorrt("tensorrt")
    with pytest.raises(UserError, match="builder must be one of"):
        import_tensorrt("tensorrt-llm")


def test_tensorrt_rtx_build_has_no_dla_no_timing_cache_and_records_the_builder(tmp_path):
    rtx = FakeTensorRT("1.7.1", name="tensorrt_rtx")
    cache = tmp_path / "timing.cache"
    _, info = _build(tmp_path, rtx, "int8", "int8", timing_cache=str(cache))
    assert info["builder"] == "tensorrt-rtx" and info["version"] == "1.7.1"
    assert rtx.recorded("network") == [(0,)] and rtx.recorded("flag") == [] and rtx.recorded("cache_in") == []
    assert not cache.exists()  # TensorRT-RTX's timing cache calls are no-ops
    with pytest.raises(UserError, match="TensorRT-RTX has no DLA"):
        _build(tmp_path, rtx, "fp16", "fp16", dla_core=0)


def test_stale_timing_cache_warns_once_and_starts_fresh(tmp_path, caplog):
    trt = FakeTensorRT("10.3.0")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"stale timings")
    with caplog.at_level(logging.WARNING, logger="clock_deploy"):
        _build(tmp_path, trt, "fp16", "fp16", timing_cache=str(cache))
    warned = [r.getMessage() for r in caplog.records if "timing cache was made by another TensorRT" in r.getMessage()]
    assert len(warned) == 1 and str(cache) in warned[0]
    assert trt.recorded("cache_in") == [(b"stale timings",), (b"",)]
    assert cache.read_bytes() == b"timings:"  # the fresh cache replaced the stale one


def test_batch_profiles_from_the_command_line(tmp_path):
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"onnx")
    common = dict(kind="onnx", arch="dino", classes=["Car"], height=H, width=W, mean=[0, 0, 0], std=[1, 1, 1],
                  precision="fp16", topk=10)
    write_metadata(onnx_path, build_metadata(**common, batch=batch_spec(True)))
    assert read_metadata(onnx_path)["batch"] == {"dynamic": True, "min": 1, "opt": 1, "max": 8}  # the default
    trt = FakeTensorRT("10.3.0")
    engine = engine_from_onnx(onnx_path, batch="1,4,8", trt=trt)
    assert trt.recorded("profile") == [(("images", (1, 3, H, W), (4, 3, H, W), (8, 3, H, W)),)]
    meta = read_metadata(engine)
    assert meta["batch"] == {"dynamic": True, "min": 1, "opt": 4, "max": 8}
    assert meta["tensorrt"]["profile"] == [[1, 3, H, W], [4, 3, H, W], [8, 3, H, W]]
    engine_from_onnx(onnx_path, batch="2", trt=FakeTensorRT("10.3.0"))
    assert read_metadata(engine)["batch"] == {"dynamic": True, "min": 1, "opt": 2, "max": 2}
    # a static-batch ONNX builds only its own batch size
    write_metadata(onnx_path, build_metadata(**common, batch=batch_spec(False, 2)))
    with pytest.raises(UserError, match=r"m.onnx: static batch of 2, so batch 4 cannot be built") as e:
        engine_from_onnx(onnx_path, batch="4", trt=FakeTensorRT("10.3.0"))
    assert "\n" not in str(e.value)
    for bad in ("0", "8,4,1", "1,2", "x"):
        with pytest.raises(UserError, match=r"^batch "):
            batch_spec(True, bad)
    with pytest.raises(UserError, match="a static-batch model takes one batch size"):
        batch_spec(False, "1,4,8")
    assert batch_spec(False, "4,4,4") == batch_spec(False, 4) == {"dynamic": False, "min": 4, "opt": 4, "max": 4}


def test_engine_from_onnx_takes_everything_from_the_sidecar(tmp_path):
    onnx_path = tmp_path / "student.int8.onnx"
    onnx_path.write_bytes(b"onnx")
    calibration = {"manifest": "calibration/synth_demo.json"}
    write_metadata(onnx_path, build_metadata(kind="onnx", arch="dino", classes=["Car", "Cyclist"], height=H, width=W,
                                             mean=[0.5] * 3, std=[0.25] * 3, precision="int8", topk=10,
                                             batch=batch_spec(True, 2), source={"sha256": "abc"},
                                             calibration=calibration, parity={"passed": True}))
    trt = FakeTensorRT("10.3.0")
    engine = engine_from_onnx(onnx_path, trt=trt, dla_core=0)
    assert engine == str(tmp_path / "student.int8.engine")
    assert trt.recorded("profile") == [(("images", (1, 3, H, W), (2, 3, H, W), (2, 3, H, W)),)]
    meta = read_metadata(engine)
    assert meta["kind"] == "tensorrt" and meta["precision"] == "int8" and meta["classes"] == ["Car", "Cyclist"]
    assert meta["calibration"] == calibration and meta["source"] == {"sha256": "abc"}
    assert meta["onnx_parity"] == {"passed": True} and meta["parity"] is None
    assert meta["tensorrt"]["dla_core"] == 0 and meta["tensorrt"]["onnx"] == "student.int8.onnx"
    # an FP32 ONNX asked for FP16: TensorRT 10's builder flag, engine named by the precision built
    fp32 = tmp_path / "student.onnx"
    fp32.write_bytes(b"onnx")
    write_metadata(fp32, {**read_metadata(onnx_path), "kind": "onnx", "precision": "fp32"})
    assert engine_from_onnx(fp32, "fp16", trt=FakeTensorRT("10.3.0")) == str(tmp_path / "student.fp16.engine")


def test_engine_command_without_tensorrt_is_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from clock_deploy.export.commands import engine

    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"onnx")
    write_metadata(onnx_path, build_metadata(kind="onnx", arch="dino", classes=["Car"], height=H, width=W,
                                             mean=[0, 0, 0], std=[1, 1, 1], precision="fp32", topk=10,
                                             batch=batch_spec(True, 1)))
    _no_builders(monkeypatch)
    result = CliRunner().invoke(engine, [str(onnx_path), "--fp16"])
    assert isinstance(result.exception, TensorRTUnavailable)
    assert "pip install clock-deploy[trt]" in str(result.exception)


def _engine_with_sidecar(tmp_path, version):
    engine = tmp_path / "model.fp16.engine"
    engine.write_bytes(b"serialized engine")
    write_metadata(engine, build_metadata(kind="tensorrt", arch="dino", classes=["Car"], height=H, width=W,
                                          mean=[0, 0, 0], std=[1, 1, 1], precision="fp16", topk=10,
                                          batch=batch_spec(True, 1), tensorrt={"version": version}))
    return engine


def test_engine_for_another_tensorrt_version_is_refused(tmp_path, monkeypatch):
    from clock_deploy.runtime import Detector
    engine = _engine_with_sidecar(tmp_path, "10.3.0")
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT("10.8.0"))
    with pytest.raises(UserError,
                       match=r"model.fp16.engine: engine built with TensorRT 10.3.0, this is TensorRT 10.8.0"):
        Detector.load(engine)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        Detector.load(engine)


# ---------------------------------------------------------------- real TensorRT + GPU

def _tensorrt_and_gpu():
    try:
        import tensorrt  # noqa: F401
        from cuda.bindings import runtime as cudart
    except ImportError:
        return False
    err, count = cudart.cudaGetDeviceCount()
    return err == cudart.cudaError_t.cudaSuccess and count > 0


needs_gpu = pytest.mark.skipif(not _tensorrt_and_gpu(), reason="needs tensorrt, cuda-python and an NVIDIA GPU")


@pytest.mark.trt
@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_real_engine_matches_onnxruntime(tmp_path, precision, student_io, make_tiny_student, make_random_images):
    from clock_deploy.export.onnx import export_onnx
    from clock_deploy.export.precision import convert_fp16
    from clock_deploy.runtime import Detector

    height, width, topk, spec = student_io.height, student_io.width, student_io.topk, student_io.spec
    model, _ = make_tiny_student("deformable_detr", "gather")
    onnx_path = str(tmp_path / "m.onnx")
    export_onnx(model, onnx_path, height=height, width=width, topk=topk, simplify=True)
    if precision == "fp16":
        convert_fp16(onnx_path, str(tmp_path / "m.fp16.onnx"))
        onnx_path = str(tmp_path / "m.fp16.onnx")
    common = dict(kind="onnx", arch="deformable_detr", classes=student_io.classes, height=height, width=width,
                  mean=spec["mean"], std=spec["std"], precision=precision, topk=topk, batch=batch_spec(True, 2))
    write_metadata(onnx_path, build_metadata(**common))
    engine = str(tmp_path / f"m.{precision}.engine")
    info = build_engine(onnx_path, engine, onnx_precision=precision, precision=precision, height=height,
                        width=width, batch=batch_spec(True, 2), timing_cache=str(tmp_path / "t.cache"))
    write_metadata(engine, build_metadata(**{**common, "kind": "tensorrt"}, tensorrt=info))
    images = make_random_images(tmp_path, 3)
    ref = Detector.load(onnx_path, score_threshold=0.0)(images)
    out = Detector.load(engine, device="cuda", score_threshold=0.0)(images)  # 3 images: batches of 2 + 1
    tol = 1e-3 if precision == "fp32" else 2e-2
    for r, o in zip(ref, out):
        assert len(r) == len(o) == topk
        np.testing.assert_allclose(np.sort(o.scores), np.sort(r.scores), atol=tol)


def test_bench_layers_column_comes_from_the_engine_sidecar(tmp_path):
    from clock_deploy.measure.report import COLUMNS
    from clock_deploy.measure.runner import engine_layers

    engine = _engine_with_sidecar(tmp_path, "10.3.0")
    assert engine_layers(engine) is None  # built before the precision report existed
    meta = read_metadata(engine)
    meta["tensorrt"]["layers"] = {"source": "builder log", "total": 60, "int8": 40, "fp16": 12, "fp32": 5, "other": 3}
    write_metadata(engine, meta)
    assert engine_layers(engine) == "40/12/5"
    assert ("layers", "layers int8/fp16/fp32") in [(key, title) for key, title, _ in COLUMNS]


def test_describing_an_engine_does_not_hash_it_loading_it_does(tmp_path, monkeypatch):
    import clock_deploy.artifact
    from clock_deploy.measure.runner import engine_layers
    from clock_deploy.runtime import Detector

    engine = _engine_with_sidecar(tmp_path, "10.3.0")
    meta = read_metadata(engine)
    meta["tensorrt"]["layers"] = {"int8": 0, "fp16": 12, "fp32": 5}
    write_metadata(engine, meta)
    engine.write_bytes(b"rebuilt engine, stale sidecar")
    hashed = []
    monkeypatch.setattr(clock_deploy.artifact, "file_sha256", lambda path: hashed.append(path) or "other")
    assert read_metadata(engine, verify=False)["precision"] == "fp16" and engine_layers(engine) == "0/12/5"
    assert hashed == []
    with pytest.raises(UserError, match="describes another file than .*model.fp16.engine"):
        Detector.load(engine)  # the stale sidecar is still caught where the engine is loaded
    assert hashed == [str(engine)]

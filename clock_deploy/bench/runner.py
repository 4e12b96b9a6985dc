"""Benchmark orchestration: every model x backend -> artifact, latency, memory, accuracy.

    result = run_bench(["teacher.pt", "student.pt"], ["torch", "onnx", "trt-fp16"], device="cpu",
                       data_root="data/synth_kitti", out_dir="bench_out")
    print_report(result.rows, result.not_run, result.profile)

Each combination is measured in its own Python process (`python -m
clock_deploy.bench.runner JOB RESULT`), so the peak RSS is that of one model
on one backend, and thread settings or a CUDA context do not leak from one
measurement into the next. Inside that process the order matters: the latency
and memory numbers are taken before the evaluation imports the dataset code
(and with it torch), so an onnxruntime / TensorRT row does not carry torch's
memory. Backends that cannot run on the device are listed with the reason.
"""
import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from clock_deploy.bench.devices import detect, load_during, load_sample
from clock_deploy.bench.latency import measure
from clock_deploy.bench.report import BenchRow, NotRun, write_reports
from clock_deploy.errors import UserError
from clock_deploy.io import remove_stale_folders, write_json
from clock_deploy.nvidia import INSTALL_HINT, TensorRTUnavailable, import_cudart

DEFAULT_BACKENDS = ("torch", "onnx", "onnx-fp16", "onnx-int8", "trt-fp16", "trt-int8")
BACKEND_PATTERN = re.compile(r"^(torch|onnx(?:-(fp16|int8))?|trt-(fp32|fp16|int8)(?:-dla(\d))?)$")
WORK_DIR_PREFIX = "clock-deploy-bench-"  # + pid of the bench: a later bench removes those of killed ones


@dataclass(frozen=True)
class Backend:
    """A backend name (e.g. 'trt-int8-dla0') taken apart."""
    name: str
    runtime: str        # torch | onnxruntime | tensorrt
    precision: str      # fp32 | fp16 | int8
    dla_core: int = -1  # -1: GPU only

    @property
    def suffix(self):
        """File name ending of the exported artifact, as the exporter names it: 'onnx', 'fp16.onnx', 'int8.engine'."""
        if self.runtime == "onnxruntime":
            return "onnx" if self.precision == "fp32" else f"{self.precision}.onnx"
        return f"{self.precision}.engine"


def parse_backend(name):
    m = BACKEND_PATTERN.match(name.strip())
    if not m:
        raise UserError(f"backends: unknown backend '{name}'; choose from {', '.join(DEFAULT_BACKENDS)}, "
                        "trt-fp32, or a TensorRT backend with a DLA core such as trt-fp16-dla0")
    if m.group(1) == "torch":
        return Backend("torch", "torch", "fp32")
    if m.group(1).startswith("onnx"):
        return Backend(m.group(1), "onnxruntime", m.group(2) or "fp32")
    dla = int(m.group(4)) if m.group(4) is not None else -1
    if dla >= 0 and m.group(3) == "fp32":
        raise UserError(f"backends: {name}: DLA runs FP16 or INT8 only (trt-fp16-dla{dla}, trt-int8-dla{dla})")
    return Backend(m.group(1), "tensorrt", m.group(3), dla)


def unavailable_reason(backend, profile, calib=None):
    """Why `backend` cannot run on `profile`'s device, or None when it can."""
    if backend.precision == "int8" and not calib:
        return "INT8 needs a calibration manifest: pass --calib (make one with `clock-deploy calibrate`)"
    if backend.runtime == "onnxruntime":
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime not installed (pip install onnxruntime)"
        if profile.kind != "cpu":
            import onnxruntime
            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                return ("CUDA EP not available in onnxruntime (install onnxruntime-gpu: pip install "
                        "clock-deploy[gpu], in a separate environment)")
    if backend.runtime == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            gpu_note = "; it also needs an NVIDIA GPU (--device cuda or jetson-orin)" if profile.kind == "cpu" else ""
            return f"TensorRT not installed: {INSTALL_HINT}{gpu_note}"
        if profile.kind == "cpu":
            return "TensorRT runs on an NVIDIA GPU only: use --device cuda or jetson-orin"
        if backend.dla_core >= 0 and profile.kind != "jetson-orin":
            return "DLA cores exist on Jetson modules only (--device jetson-orin)"
        if backend.dla_core >= profile.dla_cores:
            return f"{profile.name} has {profile.dla_cores} DLA core(s); dla{backend.dla_core} does not exist"
    return None


# ---------------------------------------------------------------- one measurement (in the job process)

def split_image_paths(data):
    """Image files of the split in dataset order (KITTI split file / COCO json), without importing torch."""
    from clock_deploy.data import kitti

    if data["format"] == "kitti":
        return [kitti.image_path(data["root"], f) for f in kitti.read_split(data["root"], data["split"])]
    ann_file = os.path.join(data["root"], "annotations", f"{data['split']}.json")
    try:
        with open(ann_file) as f:
            images = json.load(f)["images"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{ann_file}: cannot list the images of split '{data['split']}' ({e})") from None
    return [os.path.join(data["root"], "images", image["file_name"]) for image in images]


def cuda_free_bytes():
    """Free GPU memory (cudaMemGetInfo) through cuda-python, or torch when only torch has CUDA."""
    try:
        cudart = import_cudart()
    except TensorRTUnavailable:
        import torch
        return torch.cuda.mem_get_info()[0]
    err, free, _ = cudart.cudaMemGetInfo()
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"cudaMemGetInfo failed: {err}")
    return free


class GpuMemory:
    """GPU memory a backend uses: torch's own peak counter, else the drop in free memory since creation."""

    def __init__(self, runtime):
        self.runtime = runtime
        if runtime == "torch":
            import torch
            torch.cuda.reset_peak_memory_stats()
        else:  # the first CUDA call creates the context, so the baseline excludes it
            self.free_before = cuda_free_bytes()

    def used_mb(self):
        if self.runtime == "torch":
            import torch
            return torch.cuda.max_memory_allocated() / 2**20
        return (self.free_before - cuda_free_bytes()) / 2**20


def peak_rss_mb():
    """Peak resident memory of this process (MiB).

    Linux: VmHWM of /proc/self/status. Not ru_maxrss: Linux carries the parent's peak
    across fork + exec into it, so every job would report at least the parent's memory.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere


def load_detector(artifact, runtime, device, threads):
    """A runtime Detector that keeps every detection (score threshold 0, as mAP needs)."""
    from clock_deploy.runtime import Detector

    if runtime == "torch":
        from clock_deploy.bench.devices import apply_threads
        apply_threads(threads)
        return Detector.load(artifact, backend="torch", device=device, score_threshold=0.0)
    if runtime == "onnxruntime":  # built here to pass the thread count to the session
        from clock_deploy.artifact import read_metadata
        from clock_deploy.runtime.backend_onnx import OnnxBackend
        meta = read_metadata(artifact)
        # on a GPU the onnx rows are the CUDA EP: TensorRT is measured natively by the trt-* backends
        providers = None if device == "cpu" else ["CUDAExecutionProvider", "CPUExecutionProvider"]
        backend = OnnxBackend(artifact, meta, device, providers=providers, threads=threads)
        return Detector(backend, meta, score_threshold=0.0)
    return Detector.load(artifact, backend="tensorrt", device=device, score_threshold=0.0)


def evaluate(detector, data, paths, batch, progress=False):
    """COCO + KITTI metrics of `detector` on the images `paths` (the first len(paths) of the split).

    The dataset (and with it torch) is imported only now, after latency and memory were measured."""
    from clock_deploy.config import DataConfig
    from clock_deploy.data.dataset import build_dataset
    from clock_deploy.eval.detector import evaluate_detector

    cfg = DataConfig(root=data["root"], format=data["format"], classes=data["classes"])
    dataset = build_dataset(cfg, data["split"], train=False)
    return evaluate_detector(detector, dataset, limit=len(paths), batch=batch, progress=progress)


def run_job(job):
    """Latency, memory and accuracy of one artifact on one backend, in this process; a JSON-able dict."""
    from clock_deploy.runtime.preprocess import load_image, preprocess

    gpu = job["device"] != "cpu"
    memory = GpuMemory(job["runtime"]) if gpu else None
    detector = load_detector(job["artifact"], job["runtime"], job["device"], job["threads"])
    paths = split_image_paths(job["data"])
    if job["max_images"]:
        paths = paths[:job["max_images"]]
    if not paths:
        raise UserError(f"{job['data']['root']}: split '{job['data']['split']}' has no images")
    # latency: one call on a fixed, already decoded and preprocessed batch
    images = [load_image(paths[i % len(paths)]) for i in range(job["batch"])]
    batch, _ = preprocess(images, detector.meta["input"])
    before = load_sample()
    stats = measure(lambda: detector.infer(batch), job["warmup"], job["runs"], batch=job["batch"],
                    cuda_events=gpu and job["runtime"] == "torch")
    result = {"latency": dataclasses.asdict(stats), "peak_rss_mb": peak_rss_mb(),
              "gpu_mem_mb": memory.used_mb() if memory else None, "load": load_during(before, load_sample())}
    result["metrics"] = evaluate(detector, job["data"], paths, job["batch"], progress=job.get("progress", False))
    result["images"] = len(paths)
    return result


def _die_with_parent():
    """Linux: have the kernel kill this measuring process when the bench that started it dies,
    even by kill -9 (other systems: the parent's SIGTERM handling still stops it)."""
    parent = os.environ.get("CLOCK_DEPLOY_BENCH_PARENT")
    if not sys.platform.startswith("linux") or parent is None:
        return
    import ctypes
    import signal
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the bench died before prctl took effect
        os._exit(1)


def _job_main(argv):
    """`python -m clock_deploy.bench.runner JOB.json RESULT.json`: run one job, write its result."""
    job_path, result_path = argv
    _die_with_parent()
    with open(job_path) as f:
        job = json.load(f)
    try:
        result = run_job(job)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json(result_path, result)
    return 0


# ---------------------------------------------------------------- orchestration (the parent process)

def run_isolated(job, work_dir):
    """Run `job` in a fresh Python process; its result dict, or UserError with the child's last error line."""
    job_path = os.path.join(work_dir, "job.json")
    result_path = os.path.join(work_dir, "result.json")
    write_json(job_path, job)
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]),  # OpenMP / MKL pools follow --threads too
               CLOCK_DEPLOY_BENCH_PARENT=str(os.getpid()))
    done = subprocess.run([sys.executable, "-m", "clock_deploy.bench.runner", job_path, result_path],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit code {done.returncode}"
        raise UserError(last[len("error: "):] if last.startswith("error: ") else last)
    with open(result_path) as f:
        return json.load(f)


def make_row(model, backend, artifact, size_mb, result):
    lat, m = result["latency"], result["metrics"]
    return BenchRow(
        model=model.name, backend=backend.name, artifact=artifact, size_mb=size_mb, images=result["images"],
        runs=lat["runs"], batch=lat["batch"], latency_mean=lat["mean"], latency_p50=lat["p50"],
        latency_p90=lat["p90"], latency_p99=lat["p99"], latency_min=lat["min"], latency_max=lat["max"],
        throughput=lat["throughput"], peak_rss_mb=result["peak_rss_mb"], gpu_mem_mb=result["gpu_mem_mb"],
        mAP=m["mAP"], AP50=m["AP50"], AP75=m["AP75"], kitti_easy=m.get("kitti_easy"),
        kitti_moderate=m.get("kitti_moderate"), kitti_hard=m.get("kitti_hard"), metrics=m,
        arch=model.arch, params=model.params, method=model.method, **result.get("load", {}),
        layers=engine_layers(artifact) if backend.runtime == "tensorrt" else None)


def engine_layers(engine):
    """'int8/fp16/fp32' layer counts of a TensorRT engine from its sidecar, or None when not recorded."""
    from clock_deploy.artifact import read_metadata

    try:
        layers = read_metadata(engine)["tensorrt"]["layers"]
        return "/".join(str(layers[p]) for p in ("int8", "fp16", "fp32"))
    except (UserError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------- artifacts

@dataclass
class Model:
    """A checkpoint to benchmark, with what the parent needs to know about it."""
    name: str
    checkpoint: str
    data: dict          # format / classes of its training data (the root and split come from the bench)
    weights_mb: float   # tensors the torch backend loads (a checkpoint file also holds optimizer state)
    arch: str = ""      # model.arch, for the report's row labels
    params: int = 0     # parameters: the state without normalization statistics (frozen BN affine terms, <0.2%, count)
    method: str = ""    # distill.method the checkpoint was trained with ("none": plain training)


NOT_PARAMETERS = ("running_mean", "running_var", "num_batches_tracked")


def read_model(name, path):
    from clock_deploy.engine.checkpoint import checkpoint_config, read_checkpoint

    ckpt = read_checkpoint(path)
    cfg = checkpoint_config(ckpt, path)
    state = ckpt["ema"] if "ema" in ckpt else ckpt["model"]  # the weights runtime.load_model uses
    size = sum(t.numel() * t.element_size() for t in state.values())
    params = sum(t.numel() for k, t in state.items() if not k.endswith(NOT_PARAMETERS))
    return Model(name, os.fspath(path), {"format": cfg.data.format, "classes": cfg.data.classes}, size / 2**20,
                 cfg.model.arch, params, cfg.distill.method)


def artifact_path(artifacts_dir, model, backend):
    """Where the artifact of `model` on `backend` is cached; a DLA engine gets a folder of its own
    because the exporter names engines by precision only."""
    if backend.runtime == "torch":
        return model.checkpoint
    folder = os.path.join(artifacts_dir, model.name)
    if backend.dla_core >= 0:
        folder = os.path.join(folder, f"dla{backend.dla_core}")
    return os.path.join(folder, f"{model.name}.{backend.suffix}")


def is_fresh(path, inputs, batch):
    """An exported artifact can be reused: it and its sidecar exist, it is newer than every input
    file, and it was exported for this batch size."""
    from clock_deploy.artifact import read_metadata, sidecar_path

    if not (os.path.isfile(path) and os.path.isfile(sidecar_path(path))):
        return False
    if any(os.path.getmtime(p) > os.path.getmtime(path) for p in inputs if p):
        return False
    try:
        return read_metadata(path)["batch"]["max"] == batch
    except (UserError, KeyError, TypeError):
        return False


def export_artifacts(model, backends, artifacts_dir, calib, batch):
    """Export the artifacts of `backends` that are missing or stale; returns {backend name: error}."""
    stale = [b for b in backends if b.runtime != "torch" and not is_fresh(
        artifact_path(artifacts_dir, model, b), [model.checkpoint, calib if b.precision == "int8" else None], batch)]
    folders = {}
    for b in stale:
        folders.setdefault(os.path.dirname(artifact_path(artifacts_dir, model, b)), []).append(b)
    errors = {}
    for folder, group in folders.items():
        errors.update(_export_folder(model, group, folder, calib, batch))
    return errors


def _export_folder(model, backends, folder, calib, batch):
    """One Exporter.run per precision: it writes the FP32 ONNX, the FP16 / INT8 ONNX made from
    it and, when a TensorRT backend of that precision is asked for, its engine."""
    from clock_deploy.export.exporter import Exporter

    try:
        exporter = Exporter(model.checkpoint, folder, model.name)
    except UserError as e:
        return {b.name: f"export failed: {e}" for b in backends}
    exporter.cfg.export.dla_core = backends[0].dla_core  # a folder holds GPU or one DLA core's engines
    runs = {}  # precision of a run -> the backends it provides
    for b in backends:
        runs.setdefault(b.precision, []).append(b)
    if len(runs) > 1 and all(b.runtime == "onnxruntime" for b in runs.get("fp32", [])):
        fp32 = runs.pop("fp32", [])  # every run writes the FP32 ONNX first: no run of its own needed
        runs[next(iter(runs))] += fp32
    errors = {}
    for precision, group in runs.items():
        trt = any(b.runtime == "tensorrt" and b.precision == precision for b in group)
        try:
            exporter.run(precision, trt=trt, calib=calib, batch=batch, dynamic=True, map_images=0)
        except Exception as e:  # one failing precision must not stop the others
            errors.update({b.name: f"export failed: {_one_line(e)}" for b in group})
    return errors


def _one_line(error):
    text = str(error).strip().splitlines()
    return text[0] if isinstance(error, UserError) and text else f"{type(error).__name__}: {text[0] if text else ''}"


# ---------------------------------------------------------------- run_bench

@dataclass
class BenchResult:
    rows: list          # BenchRow per model x backend that ran
    not_run: list       # NotRun with the reason for every combination that did not
    profile: object     # devices.DeviceProfile
    settings: dict
    files: dict         # report kind -> path (md, csv, json, png)


def _check_inputs(models, names, warmup, runs, batch, max_images, data_root):
    if not models:
        raise UserError("models: give at least one checkpoint")
    names = list(names) if names else [os.path.splitext(os.path.basename(m))[0] for m in models]
    if len(names) != len(models):
        raise UserError(f"names has {len(names)} names for {len(models)} models")
    if len(set(names)) != len(names):
        raise UserError(f"model names must differ, got {names}: name them, e.g. teacher,student,...")
    for label, value, low in (("warmup", warmup, 0), ("runs", runs, 1), ("batch", batch, 1)):
        if value < low:
            raise UserError(f"{label} must be at least {low}, got {value}")
    if max_images is not None and max_images < 1:
        raise UserError(f"max_images must be at least 1, got {max_images}")
    if not os.path.isdir(data_root):
        raise UserError(f"data_root: dataset root '{data_root}' does not exist")
    return names


def run_bench(models: Sequence[str], backends: Sequence[str] = DEFAULT_BACKENDS, device: str = "cpu",
              data_root: str = "data/synth_kitti", split: str = "val", out_dir: str = "bench_out",
              names: Optional[Sequence[str]] = None, calib: Optional[str] = None, warmup: int = 10, runs: int = 100,
              batch: int = 1, threads: Optional[int] = None, max_images: Optional[int] = None, isolate: bool = True,
              progress: bool = True, system=None) -> "BenchResult":
    """Benchmark every checkpoint in `models` on every backend; write the reports into out_dir.

    models: checkpoint paths (.pt); names: labels for them (default: file stems).
    backends: names such as "torch", "onnx", "onnx-fp16", "onnx-int8", "trt-fp16", "trt-int8-dla0".
    device: "cpu" | "cuda" | "jetson-orin" (a UserError when this machine is not one).
    isolate: measure each combination in its own process (peak RSS and threads per measurement).
    system: devices.System to read the device from (tests).
    """
    from tqdm import tqdm

    names = _check_inputs(models, names, warmup, runs, batch, max_images, data_root)
    backends = list(dict.fromkeys(parse_backend(b) for b in backends))
    profile = detect(device, threads, system)
    not_run, runnable = [], []
    for b in backends:
        reason = unavailable_reason(b, profile, calib)
        if reason:
            not_run.append(NotRun(b.name, reason))
        else:
            runnable.append(b)
    models = [read_model(n, m) for n, m in zip(names, models)]
    artifacts_dir = os.path.join(out_dir, "artifacts")
    bar = tqdm(total=len(models) * len(runnable), desc="bench", unit="run", disable=not progress)
    rows = []
    for model in models:
        bar.set_description(f"export {model.name}")
        errors = export_artifacts(model, runnable, artifacts_dir, calib, batch)
        for b in runnable:
            bar.set_description(f"{model.name}/{b.name}")
            artifact = artifact_path(artifacts_dir, model, b)
            if b.name in errors:
                not_run.append(NotRun(b.name, errors[b.name], model.name))
                bar.update(1)
                continue
            job = {"artifact": artifact, "runtime": b.runtime, "device": profile.torch_device
                   if b.runtime == "torch" else ("cpu" if profile.kind == "cpu" else "cuda"),
                   "threads": profile.threads, "warmup": warmup, "runs": runs, "batch": batch,
                   "max_images": max_images, "data": {**model.data, "root": os.fspath(data_root), "split": split}}
            try:
                if isolate:
                    remove_stale_folders(tempfile.gettempdir(), WORK_DIR_PREFIX)
                    with tempfile.TemporaryDirectory(prefix=f"{WORK_DIR_PREFIX}{os.getpid()}-") as work_dir:
                        result = run_isolated(job, work_dir)
                else:
                    result = run_job(job)
            except Exception as e:  # a failing combination is reported, the others still run
                not_run.append(NotRun(b.name, f"failed: {_one_line(e)}", model.name))
            else:
                size = model.weights_mb if b.runtime == "torch" else os.path.getsize(artifact) / 2**20
                rows.append(make_row(model, b, artifact, size, result))
            bar.update(1)
    bar.close()
    settings = {"data": os.fspath(data_root), "split": split, "max images": max_images or "all",
                "warmup": warmup, "runs": runs, "batch": batch, "calibration": calib or "none",
                "isolation": "one process per measurement" if isolate else "in-process"}
    files = write_reports(out_dir, rows, not_run, profile, settings)
    return BenchResult(rows, not_run, profile, settings, files)


if __name__ == "__main__":
    sys.exit(_job_main(sys.argv[1:]))

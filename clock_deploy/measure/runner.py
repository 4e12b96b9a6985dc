"""Benchmark orchestration: every model x backend -> artifact, latency, memory, accuracy.

    result = run_bench(["teacher.pt", "student.pt"], ["torch", "onnx", "trt-fp16"], device="cpu",
                       data_root="data/synth_kitti", out_dir="bench_out")
    print_report(result.rows, result.not_run, result.profile)

The parts: backends.py (backend names, what a device can run), exports.py (the checkpoints and
their cached exports), job.py (one measurement: latency, memory, accuracy), isolation.py (each job
in a process of its own, so the peak RSS is that of one model on one backend, and thread settings
or a CUDA context do not leak from one measurement into the next). Backends that cannot run on the
device are listed with the reason.
"""
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from tqdm import tqdm

from clock_deploy.artifact import read_metadata
from clock_deploy.errors import UserError, one_line
from clock_deploy.io import check_inside, remove_stale_folders
from clock_deploy.lock import output_lock
from clock_deploy.measure.exports import artifact_path, export_artifacts, read_model
from clock_deploy.measure.backends import DEFAULT_BACKENDS, parse_backend, unavailable_reason
from clock_deploy.measure.devices import detect
from clock_deploy.measure.isolation import WORK_DIR_PREFIX, run_isolated
from clock_deploy.measure.job import run_job
from clock_deploy.measure.report import BenchRow, NotRun, write_reports
from clock_deploy.naming import API


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
    try:
        layers = read_metadata(engine, verify=False)["tensorrt"]["layers"]
        return "/".join(str(layers[p]) for p in ("int8", "fp16", "fp32"))
    except (UserError, KeyError, TypeError):
        return None


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
              progress: bool = True, system=None, via: str = API,
              failed_exports: Optional[dict] = None) -> "BenchResult":
    """Benchmark every checkpoint in `models` on every backend; write the reports into out_dir.

    models: checkpoint paths (.pt); names: labels for them (default: file stems).
    backends: names such as "torch", "onnx", "onnx-fp16", "onnx-int8", "trt-fp16", "trt-int8-dla0".
    device: "cpu" | "cuda" | "jetson-orin" (a UserError when this machine is not one).
    isolate: measure each combination in its own process (peak RSS and threads per measurement).
    system: devices.System to read the device from (tests).
    via: how messages name the options (naming.CLI for `clock-deploy bench`, CONFIG for the pipeline).
    failed_exports: {(model name, backend name): reason} of artifacts that failed their export gate
    before the bench (the pipeline's export stage): listed as not run with the reason, not exported again.
    """
    names = _check_inputs(models, names, warmup, runs, batch, max_images, data_root)
    with output_lock(out_dir, "bench"):  # one bench per folder: its artifacts and reports are replaced
        return _run_bench(models, backends, device, data_root, split, out_dir, names, calib, warmup, runs, batch,
                          threads, max_images, isolate, progress, system, via, failed_exports or {})


def _run_bench(models, backends, device, data_root, split, out_dir, names, calib, warmup, runs, batch, threads,
               max_images, isolate, progress, system, via, failed_exports):

    backends = list(dict.fromkeys(parse_backend(b) for b in backends))
    profile = detect(device, threads, system, via)
    not_run, runnable = [], []
    for b in backends:
        reason = unavailable_reason(b, profile, calib, via)
        if reason:
            not_run.append(NotRun(b.name, reason))
        else:
            runnable.append(b)
    models = [read_model(n, m) for n, m in zip(names, models)]
    artifacts_dir = os.path.join(out_dir, "artifacts")
    check_inside(out_dir, artifacts_dir)  # stale exports there are replaced
    bar = tqdm(total=len(models) * len(runnable), desc="bench", unit="run", disable=not progress)
    rows = []
    for model in models:
        bar.set_description(f"export {model.name}")
        errors = {b.name: failed_exports[model.name, b.name] for b in runnable
                  if (model.name, b.name) in failed_exports}
        errors.update(export_artifacts(model, [b for b in runnable if b.name not in errors], artifacts_dir, calib,
                                       batch))
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
            report = bar.set_postfix_str  # warm-up / timed runs / accuracy, inside a long measurement
            try:
                if isolate:
                    remove_stale_folders(tempfile.gettempdir(), WORK_DIR_PREFIX)
                    with tempfile.TemporaryDirectory(prefix=f"{WORK_DIR_PREFIX}{os.getpid()}-") as work_dir:
                        result = run_isolated(job, work_dir, report)
                else:
                    result = run_job(job, report)
            except Exception as e:  # a failing combination is reported, the others still run
                not_run.append(NotRun(b.name, f"failed: {one_line(e)}", model.name))
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

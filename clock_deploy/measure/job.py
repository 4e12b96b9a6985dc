"""One measurement, run in a process of its own: latency, memory and accuracy of one artifact on one
backend (`python -m clock_deploy.measure.job JOB.json RESULT.json`, started by measure/isolation.py).

Nothing here imports torch unless the backend is torch: the split is read by the torch-free
readers of data/annotations.py and scored with eval/loop.py, so an onnxruntime / TensorRT row
does not carry torch's memory; the evaluation code (numba, COCO eval) is imported only after the
memory reading.
"""
import ctypes
import dataclasses
import json
import os
import resource
import signal
import sys

from clock_deploy.artifact import read_metadata
from clock_deploy.data.annotations import open_split
from clock_deploy.errors import UserError
from clock_deploy.io import write_json
from clock_deploy.measure.devices import apply_threads, load_during, load_sample
from clock_deploy.measure.latency import Progress, measure
from clock_deploy.nvidia import TensorRTUnavailable, import_cudart
from clock_deploy.runtime import Detector
from clock_deploy.runtime.preprocess import load_image, preprocess


def cuda_free_bytes():
    """Free GPU memory (cudaMemGetInfo) through cuda-python, or torch when only torch has CUDA."""
    try:
        cudart = import_cudart()
    except TensorRTUnavailable:
        import torch  # memory: torch only in the process that measures a torch row
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
            import torch  # memory: torch only in the process that measures a torch row
            torch.cuda.reset_peak_memory_stats()
        else:  # the first CUDA call creates the context, so the baseline excludes it
            self.free_before = cuda_free_bytes()

    def used_mb(self):
        if self.runtime == "torch":
            import torch  # memory: torch only in the process that measures a torch row
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

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere


def load_detector(artifact, runtime, device, threads):
    """A runtime Detector that keeps every detection (score threshold 0, as mAP needs)."""

    if runtime == "torch":
        apply_threads(threads)
        return Detector.load(artifact, backend="torch", device=device, score_threshold=0.0)
    if runtime == "onnxruntime":  # built here to pass the thread count to the session
        from clock_deploy.runtime.backend_onnx import OnnxBackend  # memory: onnxruntime only for an onnx row
        meta = read_metadata(artifact)
        # on a GPU the onnx rows are the CUDA EP: TensorRT is measured natively by the trt-* backends
        providers = None if device == "cpu" else ["CUDAExecutionProvider", "CPUExecutionProvider"]
        backend = OnnxBackend(artifact, meta, device, providers=providers, threads=threads)
        return Detector(backend, meta, score_threshold=0.0)
    return Detector.load(artifact, backend="tensorrt", device=device, score_threshold=0.0)


PROGRESS_PREFIX = "progress: "  # a line the isolated job writes to stderr for the bench's progress bar


def run_job(job, report=None):
    """Latency, memory and accuracy of one artifact on one backend, in this process; a JSON-able dict.

    report: called with a short text ('warm-up 3/10', 'timed 40/100', 'accuracy on 200 images') as
    the measurement goes on, at most every second within a phase."""
    report = report or (lambda text: None)

    gpu = job["device"] != "cpu"
    memory = GpuMemory(job["runtime"]) if gpu else None
    detector = load_detector(job["artifact"], job["runtime"], job["device"], job["threads"])
    data = job["data"]
    split = open_split(data["root"], data["format"], data["split"], data.get("classes", "kitti3"))
    count = min(len(split), job["max_images"]) if job["max_images"] else len(split)
    if count == 0:
        raise UserError(f"{data['root']}: split '{data['split']}' has no images")
    paths = [split.image_path(i) for i in range(count)]
    # latency: one call on a fixed, already decoded and preprocessed batch
    images = [load_image(paths[i % len(paths)]) for i in range(job["batch"])]
    batch, _ = preprocess(images, detector.meta["input"])
    before = load_sample()
    stats = measure(lambda: detector.infer(batch), job["warmup"], job["runs"], batch=job["batch"],
                    cuda_events=gpu and job["runtime"] == "torch", progress=Progress(report))
    result = {"latency": dataclasses.asdict(stats), "peak_rss_mb": peak_rss_mb(),
              "gpu_mem_mb": memory.used_mb() if memory else None, "load": load_during(before, load_sample())}
    # memory: the evaluation code (numba, COCO eval) only after the memory reading
    from clock_deploy.eval.loop import evaluate_detector

    report(f"accuracy on {count} images")
    result["metrics"] = evaluate_detector(detector, split, limit=count, batch=job["batch"],
                                          progress=job.get("progress", False))
    result["images"] = count
    return result


def _die_with_parent():
    """Linux: have the kernel kill this measuring process when the bench that started it dies,
    even by kill -9 (other systems: the parent's SIGTERM handling still stops it)."""
    parent = os.environ.get("CLOCK_DEPLOY_BENCH_PARENT")
    if not sys.platform.startswith("linux") or parent is None:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the bench died before prctl took effect
        os._exit(1)


def _job_main(argv):
    """`python -m clock_deploy.measure.job JOB.json RESULT.json`: run one job, write its result."""
    job_path, result_path = argv
    _die_with_parent()
    with open(job_path) as f:
        job = json.load(f)
    def report(text):
        print(f"{PROGRESS_PREFIX}{text}", file=sys.stderr, flush=True)

    try:
        result = run_job(job, report)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json(result_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(_job_main(sys.argv[1:]))

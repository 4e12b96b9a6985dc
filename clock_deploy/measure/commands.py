"""`clock-deploy bench`: latency, memory and accuracy of models x backends, side by side."""
import click

from clock_deploy.measure.backends import DEFAULT_BACKENDS
from clock_deploy.measure.devices import DEVICES
from clock_deploy.measure.report import print_report
from clock_deploy.measure.runner import run_bench
from clock_deploy.naming import CLI


def comma_list(text):
    return [item.strip() for item in (text or "").split(",") if item.strip()]


@click.command()
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
              help="Device profile; cuda / jetson-orin fail clearly on a machine that is not one.")
@click.option("--models", required=True, help="Comma-separated checkpoints (.pt), e.g. teacher.pt,student.pt.")
@click.option("--names", default=None, help="Comma-separated labels for the models [default: file names].")
@click.option("--backends", default=",".join(DEFAULT_BACKENDS), show_default=True,
              help="Comma-separated; also trt-fp32 and DLA engines such as trt-fp16-dla0 (Jetson). "
                   "Backends this device cannot run are listed in the report with the reason.")
@click.option("--data", "data_root", required=True, type=click.Path(file_okay=False),
              help="Dataset root (KITTI layout or COCO json, as the models were trained on).")
@click.option("--split", default="val", show_default=True, help="Split used for mAP and latency images.")
@click.option("--calib", default=None, type=click.Path(dir_okay=False),
              help="Calibration manifest for the INT8 backends (`clock-deploy calibrate`).")
@click.option("--out", "out_dir", default="bench_out", show_default=True, type=click.Path(file_okay=False),
              help="Reports (bench.md/csv/json, pareto.png) and the exported artifacts (artifacts/).")
@click.option("--warmup", default=10, show_default=True, help="Untimed calls before timing.")
@click.option("--runs", default=100, show_default=True, help="Timed calls.")
@click.option("--batch", default=1, show_default=True, help="Images per call.")
@click.option("--threads", type=int, default=None,
              help="CPU threads for torch / onnxruntime [default: physical cores].")
@click.option("--max-images", type=int, default=None, help="Evaluate on the first N images of the split only.")
@click.option("--in-process", is_flag=True,
              help="Measure in this process instead of one process per model x backend "
                   "(starts faster; peak memory then accumulates over the runs).")
def bench(device, models, names, backends, data_root, split, calib, out_dir, warmup, runs, batch, threads,
          max_images, in_process):
    """Benchmark models x backends: latency percentiles, memory, size, COCO mAP and KITTI AP."""
    result = run_bench(comma_list(models), comma_list(backends), device=device, data_root=data_root, split=split,
                       out_dir=out_dir, names=comma_list(names) or None, calib=calib, warmup=warmup, runs=runs,
                       batch=batch, threads=threads, max_images=max_images, isolate=not in_process, via=CLI)
    print_report(result.rows, result.not_run, result.profile)
    for path in result.files.values():
        click.echo(f"wrote {path}")

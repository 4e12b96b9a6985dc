"""`clock-deploy pipeline`: synthesize -> teacher -> baseline student -> CLoCK student -> export -> bench.

Every stage writes under `output_dir` and is skipped when its output is complete,
so an interrupted pipeline continues where it stopped (a half-trained stage
resumes from its last checkpoint). The bench is skipped when a stamp shows that
its inputs (file hashes of checkpoints, artifacts, calibration and split, and the
bench settings) are those of the reports already written. `--force STAGE` runs a
stage again on purpose.
"""
import dataclasses
import logging
import os
import shutil
import time

import click

from clock_deploy.artifact import sidecar_path
from clock_deploy.checkpoint import read_checkpoint
from clock_deploy.config import PipelineConfig, load_config
from clock_deploy.data.kitti import read_split
from clock_deploy.data.synthetic import MARKER, generate
from clock_deploy.errors import UserError
from clock_deploy.eval.units import ap_text
from clock_deploy.export.exporter import Exporter
from clock_deploy.export.parity import ParityError
from clock_deploy.io import atomic_path, file_sha256, read_json, write_json
from clock_deploy.lock import output_lock
from clock_deploy.measure.exports import artifact_path, is_fresh, read_model
from clock_deploy.measure.backends import parse_backend
from clock_deploy.measure.report import print_report, read_reports
from clock_deploy.measure.runner import BenchResult, run_bench
from clock_deploy.naming import CONFIG
from clock_deploy.training.commands import run_training

log = logging.getLogger(__name__)
STAGES = ("data", "teacher", "student", "distill", "export", "bench")
DEPLOY_BACKENDS = ("onnx", "onnx-int8")  # the bench backends the export stage's files serve


class Pipeline:
    def __init__(self, cfg_path, overrides=(), force=()):
        unknown = sorted(set(force) - set(STAGES))
        if unknown:
            raise UserError(f"force: unknown stage {', '.join(unknown)}; choose from {', '.join(STAGES)}")
        self.cfg_path = cfg_path
        self.cfg = load_config(cfg_path, overrides, cls=PipelineConfig)
        self.force = set(force)
        self.out = self.cfg.output_dir
        self.timings = {}
        self.failed_exports = {}  # (model name, bench backend) -> why its artifact failed its export gate

    # ------------------------------------------------------------------ configs
    def stage_config(self, name, extra=()):
        """The stage's YAML (relative to the pipeline file) + the pipeline's overrides + this run's paths."""
        path = os.path.join(os.path.dirname(os.path.abspath(self.cfg_path)), getattr(self.cfg, name))
        overrides = list(self.cfg.overrides) + [f"output_dir={os.path.join(self.out, name)}"] + list(extra)
        return load_config(path, overrides)

    def checkpoint(self, name):
        return os.path.join(self.out, name, "last.pt")

    # ------------------------------------------------------------------ stages
    def run(self):
        teacher_cfg = self.stage_config("teacher")
        self.timed("data", self.synthesize, teacher_cfg.data)
        self.timed("teacher", self.train, "teacher", teacher_cfg)
        self.timed("student", self.train, "student", self.stage_config("student"))
        distill_cfg = self.stage_config("distill", [f"distill.teacher={self.checkpoint('teacher')}"])
        self.timed("distill", self.train, "distill", distill_cfg)
        self.timed("export", self.export)
        result = self.timed("bench", self.bench, teacher_cfg.data)
        self.summary(result)
        return result

    def timed(self, name, fn, *args):
        start = time.time()
        log.info(f"== {name}")
        result = fn(*args)
        self.timings[name] = time.time() - start
        return result

    def synthesize(self, cfg_data):
        """Generate the synthetic scenes (data.synth) unless data.root exists; existing data is only
        replaced with --force data (and only if the generator wrote it)."""
        s = cfg_data.synth
        params = {"num_images": s.num_images, "seed": s.seed, "height": s.height, "width": s.width,
                  "val_fraction": s.val_fraction, "max_objects": s.max_objects}
        if not os.path.isdir(cfg_data.root) or "data" in self.force:
            summary = generate(cfg_data.root, progress=True, **params)
            log.info(f"wrote {summary['num_images']} scenes to {cfg_data.root} ({self.describe_splits(cfg_data)})")
            return
        marker = os.path.join(cfg_data.root, MARKER)
        written = read_json(marker) if os.path.exists(marker) else {}
        differ = [f"{k} {written[k]} (config: {v})" for k, v in params.items() if k in written and written[k] != v]
        log.info(f"{cfg_data.root} exists (scenes: {self.describe_splits(cfg_data)}): skipped" + (
            f"; it was generated with {', '.join(differ)}: --force data regenerates it" if differ else ""))

    @staticmethod
    def describe_splits(cfg_data):
        """'train 400, val 200' for a KITTI-layout root (COCO data: its format only)."""
        if cfg_data.format != "kitti":
            return f"{cfg_data.format} format"
        counts = []
        for split in (cfg_data.train_split, cfg_data.val_split):
            try:
                counts.append(f"{split} {len(read_split(cfg_data.root, split))}")
            except UserError:
                counts.append(f"no {split} split")
        return ", ".join(counts)

    def train(self, name, cfg):
        last = self.checkpoint(name)
        resume = False
        if os.path.exists(last) and name not in self.force:
            ckpt = read_checkpoint(last)
            if ckpt["epoch"] >= cfg.train.epochs or (0 < cfg.train.max_iters <= ckpt["iteration"]):
                log.info(f"{last} is complete (epoch {ckpt['epoch']}): skipped")
                return
            log.info(f"{last} stopped at epoch {ckpt['epoch']}: resuming")
            resume = True
        run_training(cfg, resume=resume, overwrite=not resume)  # forced, or no last.pt: starts afresh

    @property
    def export_dir(self):
        """Where `clock-deploy export --ckpt <distill>/last.pt` writes: <distill>/export/last.*"""
        return os.path.join(self.out, "distill", "export")

    @property
    def artifacts_dir(self):
        return os.path.join(self.out, "bench", "artifacts")

    def export(self):
        """The deployable artifacts of the distilled student: ONNX FP32 + INT8 Q/DQ with sidecars.

        They are written where `clock-deploy export` puts them (README section 5 loads them from
        there) and copied into the bench's artifact cache, so the bench measures these very files.
        """
        checkpoint = self.checkpoint("distill")
        int8 = os.path.join(self.export_dir, "last.int8.onnx")
        if is_fresh(int8, [checkpoint, self.cfg.calib], batch=1) and "export" not in self.force:
            log.info(f"{int8} is up to date: skipped")
        else:
            exporter = Exporter(checkpoint, self.export_dir, "last", overrides={"calib": self.cfg.calib}, batch=1,
                                via=CONFIG)
            try:
                with output_lock(self.export_dir, "pipeline export"):
                    exporter.run("int8")
            except ParityError as e:  # the demo goes on: the bench table lists this artifact as failed
                self.failed_exports[("distilled", "onnx-int8")] = f"export failed: {e}"
                log.warning(f"{e}: the bench lists onnx-int8 of the distilled model as failed; the pipeline goes on")
                if "fp32" not in exporter.summary:
                    raise  # no FP32 model either: nothing to deploy
        model = read_model("distilled", checkpoint)
        for name in DEPLOY_BACKENDS:
            if ("distilled", name) in self.failed_exports:
                continue
            backend = parse_backend(name)
            source = os.path.join(self.export_dir, f"last.{backend.suffix}")
            target = artifact_path(self.artifacts_dir, model, backend)
            for src, dst in ((source, target), (sidecar_path(source), sidecar_path(target))):
                if not (os.path.exists(dst) and os.path.getmtime(dst) == os.path.getmtime(src)):
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    with atomic_path(dst) as tmp:
                        shutil.copy2(src, tmp)  # keeps the mtime: the bench's freshness check compares it

    @property
    def bench_dir(self):
        return os.path.join(self.out, "bench")

    def bench_inputs(self, cfg_data):
        """What the bench's numbers depend on: its settings and the sha256 of every file it reads."""
        files = [self.checkpoint(n) for n in ("teacher", "student", "distill")] + [self.cfg.calib]
        files += [os.path.join(cfg_data.root, "ImageSets", f"{cfg_data.val_split}.txt"),
                  os.path.join(cfg_data.root, MARKER)]
        for folder, _, names in sorted(os.walk(self.artifacts_dir)):
            files += sorted(os.path.join(folder, n) for n in names)
        settings = {**dataclasses.asdict(self.cfg.bench), "data": cfg_data.root, "split": cfg_data.val_split}
        return {"settings": settings, "files": {f: file_sha256(f) for f in files if os.path.isfile(f)}}

    def bench(self, cfg_data):
        stamp = os.path.join(self.bench_dir, "inputs.json")
        inputs = self.bench_inputs(cfg_data)
        if "bench" not in self.force and os.path.exists(stamp) and read_json(stamp) == inputs:
            result = BenchResult(*read_reports(self.bench_dir))
            if result.files:
                log.info(f"{result.files['md']} measured these models with these settings: skipped "
                         "(--force bench measures again)")
                print_report(result.rows, result.not_run, result.profile)
                return result
        b = self.cfg.bench
        result = run_bench([self.checkpoint("teacher"), self.checkpoint("student"), self.checkpoint("distill")],
                           b.backends, device=b.device, data_root=cfg_data.root, split=cfg_data.val_split,
                           out_dir=self.bench_dir, names=["teacher", "student", "distilled"],
                           calib=self.cfg.calib, warmup=b.warmup, runs=b.runs, threads=b.threads or None,
                           max_images=b.max_images or None, via=CONFIG, failed_exports=self.failed_exports)
        failed = [item for item in result.not_run if item.reason.startswith(("failed", "export failed"))]
        if failed:  # not stamped: the next run measures again
            if os.path.exists(stamp):
                os.remove(stamp)
        else:
            write_json(stamp, self.bench_inputs(cfg_data))  # after the run: it adds the artifacts it exported
        print_report(result.rows, result.not_run, result.profile)
        return result

    def summary(self, result):
        by_name = {(r.model, r.backend): r for r in result.rows}
        student, distilled = by_name.get(("student", "torch")), by_name.get(("distilled", "torch"))
        if student and distilled:
            log.info(f"CLoCK distillation: mAP {ap_text('mAP', student.mAP)} -> {ap_text('mAP', distilled.mAP)} % "
                     f"({100 * (distilled.mAP - student.mAP):+.1f} points), KITTI moderate "
                     f"{ap_text('kitti', student.kitti_moderate)} -> {ap_text('kitti', distilled.kitti_moderate)} %")
        log.info("stage times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in self.timings.items()))
        # this run's minutes per stage (a skipped stage takes seconds), for the README's demo time
        write_json(os.path.join(self.out, "stage_minutes.json"), {k: round(v / 60, 2) for k, v in self.timings.items()})
        log.info(f"reports: {', '.join(result.files.values())}")


@click.command()
@click.option("--cfg", "cfg_path", default="configs/demo/pipeline.yaml", show_default=True,
              type=click.Path(dir_okay=False), help="Pipeline config naming the stage configs.")
@click.option("--force", multiple=True, type=click.Choice(STAGES),
              help="Run this stage again even though its output is up to date (repeatable). Later stages "
                   "follow only where they check their inputs (export, bench): force a training stage's "
                   "successors too.")
@click.argument("overrides", nargs=-1, metavar="[KEY.SUB=VALUE]...")
def pipeline(cfg_path, force, overrides):
    """Synthesize data, train teacher and baseline student, distill, export ONNX + INT8, bench.

    Each stage is skipped when its output exists (the bench when its inputs and settings are
    unchanged), so re-running continues an interrupted pipeline and a finished one takes seconds.
    """
    if not os.path.exists(cfg_path):
        raise UserError(f"pipeline config not found: {cfg_path}")
    Pipeline(cfg_path, overrides, force=force).run()

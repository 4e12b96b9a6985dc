"""`clock-deploy pipeline`: synthesize -> teacher -> baseline student -> CLoCK student -> export -> bench.

Every stage writes under `output_dir` and is skipped when its output is complete,
so an interrupted pipeline continues where it stopped (a half-trained stage
resumes from its last checkpoint).
"""
import os
import time

import click

from clock_deploy.config import PipelineConfig, load_config
from clock_deploy.errors import UserError
from clock_deploy.io import read_json


class Pipeline:
    def __init__(self, cfg_path, overrides=(), echo=click.echo):
        self.cfg_path = cfg_path
        self.cfg = load_config(cfg_path, overrides, cls=PipelineConfig)
        self.echo = echo
        self.out = self.cfg.output_dir
        self.timings = {}

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
        self.echo(click.style(f"== {name}", bold=True))
        result = fn(*args)
        self.timings[name] = time.time() - start
        return result

    def synthesize(self, cfg_data):
        """Generate the synthetic scenes (data.synth) unless data.root exists; existing data is never replaced."""
        from clock_deploy.data.synthetic import MARKER, generate

        s = cfg_data.synth
        params = {"num_images": s.num_images, "seed": s.seed, "height": s.height, "width": s.width,
                  "val_fraction": s.val_fraction, "max_objects": s.max_objects}
        if not os.path.isdir(cfg_data.root):
            generate(cfg_data.root, progress=True, **params)
            return
        marker = os.path.join(cfg_data.root, MARKER)
        written = read_json(marker) if os.path.exists(marker) else {}
        differ = [f"{k} {written[k]} (config: {v})" for k, v in params.items() if k in written and written[k] != v]
        self.echo(f"{cfg_data.root} exists: skipped" + (
            f"; it was generated with {', '.join(differ)}: delete it to regenerate" if differ else ""))

    def train(self, name, cfg):
        from clock_deploy.engine.checkpoint import read_checkpoint
        from clock_deploy.engine.commands import run_training

        last = self.checkpoint(name)
        resume = False
        if os.path.exists(last):
            ckpt = read_checkpoint(last)
            if ckpt["epoch"] >= cfg.train.epochs or (0 < cfg.train.max_iters <= ckpt["iteration"]):
                self.echo(f"{last} is complete (epoch {ckpt['epoch']}): skipped")
                return
            self.echo(f"{last} stopped at epoch {ckpt['epoch']}: resuming")
            resume = True
        run_training(cfg, resume=resume)

    def export(self):
        """The deployable artifacts of the distilled student: ONNX FP32 + INT8 Q/DQ with sidecars.

        They are written where the bench looks for its cached artifacts, so it reuses them.
        """
        from clock_deploy.bench.runner import artifact_path, is_fresh, parse_backend, read_model
        from clock_deploy.export.commands import Exporter

        model = read_model("distilled", self.checkpoint("distill"))
        int8 = artifact_path(self.artifacts_dir, model, parse_backend("onnx-int8"))
        if is_fresh(int8, [model.checkpoint, self.cfg.calib], batch=1):
            self.echo(f"{int8} is up to date: skipped")
            return
        exporter = Exporter(model.checkpoint, os.path.dirname(int8), model.name)
        exporter.run("int8", calib=self.cfg.calib, batch=1, dynamic=True)

    @property
    def artifacts_dir(self):
        return os.path.join(self.out, "bench", "artifacts")

    def bench(self, cfg_data):
        from clock_deploy.bench.report import print_report
        from clock_deploy.bench.runner import run_bench

        b = self.cfg.bench
        result = run_bench([self.checkpoint("teacher"), self.checkpoint("student"), self.checkpoint("distill")],
                           b.backends, device=b.device, data_root=cfg_data.root, split=cfg_data.val_split,
                           out_dir=os.path.join(self.out, "bench"), names=["teacher", "student", "distilled"],
                           calib=self.cfg.calib, warmup=b.warmup, runs=b.runs, threads=b.threads or None,
                           max_images=b.max_images or None)
        print_report(result.rows, result.not_run, result.profile)
        return result

    def summary(self, result):
        by_name = {(r.model, r.backend): r for r in result.rows}
        student, distilled = by_name.get(("student", "torch")), by_name.get(("distilled", "torch"))
        if student and distilled:
            self.echo(f"CLoCK distillation: mAP {student.mAP:.3f} -> {distilled.mAP:.3f} "
                      f"({100 * (distilled.mAP - student.mAP):+.1f} points), KITTI moderate "
                      f"{student.kitti_moderate:.1f} -> {distilled.kitti_moderate:.1f}")
        self.echo("stage times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in self.timings.items()))
        self.echo(f"reports: {', '.join(result.files.values())}")


@click.command()
@click.option("--cfg", "cfg_path", default="configs/demo/pipeline.yaml", show_default=True,
              type=click.Path(dir_okay=False), help="Pipeline config naming the stage configs.")
@click.argument("overrides", nargs=-1, metavar="[KEY.SUB=VALUE]...")
def pipeline(cfg_path, overrides):
    """Synthesize data, train teacher and baseline student, distill, export ONNX + INT8, bench.

    Each stage is skipped when its output exists, so re-running continues an interrupted pipeline.
    """
    if not os.path.exists(cfg_path):
        raise UserError(f"pipeline config not found: {cfg_path}")
    Pipeline(cfg_path, overrides).run()

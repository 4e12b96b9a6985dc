"""`clock-deploy export`, `clock-deploy engine` and `clock-deploy calibrate`: flags -> export/exporter.py,
export/tensorrt.py and export/calibration.py."""
import click

from clock_deploy.artifact import read_metadata
from clock_deploy.config import SAMPLING_MODES
from clock_deploy.errors import UserError
from clock_deploy.export.calibration import choose_calibration_set, write_manifest
from clock_deploy.export.exporter import Exporter
from clock_deploy.export.formats import applies_text, help_table, precision_from_flags
from clock_deploy.export.tensorrt import describe_build, engine_from_onnx
from clock_deploy.lock import output_lock
from clock_deploy.naming import CLI
from clock_deploy.nvidia import BUILDERS

BATCH_HELP = ("Batch sizes: MIN,OPT,MAX (TensorRT profile) or N (1..N, tuned for N; the batch of a static model) "
              "[default: dynamic 1,1,8; static 1].")


def parse_imgsz(text):
    """'192x640' -> [192, 640]."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"--imgsz must look like HEIGHTxWIDTH (e.g. 192x640), got '{text}'")
    return [int(parts[0]), int(parts[1])]


def _help(text, key):
    """An option's help with where it applies, from the formats table (export/formats.py)."""
    return f"{text} {applies_text(key)}".strip()


@click.command(epilog="\b\n" + help_table())
@click.option("--ckpt", required=True, type=click.Path(dir_okay=False), help="Checkpoint (.pt) to export.")
@click.option("--onnx", "onnx_flag", is_flag=True, help="Write ONNX (always done; the default output).")
@click.option("--trt", is_flag=True, help="Also build a TensorRT engine (needs tensorrt and an NVIDIA GPU, "
              "or tensorrt-rtx, which also builds without a GPU).")
@click.option("--builder", type=click.Choice(list(BUILDERS)), default=None,
              help=_help("Engine builder [default: tensorrt if installed, else tensorrt-rtx].", "builder"))
@click.option("--fp16", is_flag=True, help="Also write the FP16 ONNX (and engine); not with --int8.")
@click.option("--int8", is_flag=True, help="Also write the INT8 Q/DQ ONNX (and engine); needs --calib.")
@click.option("--calib", type=click.Path(dir_okay=False), default=None,
              help=_help("Calibration manifest (`clock-deploy calibrate`).", "calib"))
@click.option("--calib-root", default=None, help=_help("Dataset root overriding the one in the manifest.",
                                                       "calib_root"))
@click.option("--calib-images", type=int, default=None,
              help=_help("Use the first N manifest images (0 = all).", "calib_images"))
@click.option("--exclude-node", multiple=True, help=_help("ONNX node kept in float (repeatable).", "exclude_nodes"))
@click.option("--batch", default=None, help=BATCH_HELP)
@click.option("--dynamic/--static", default=None, help="Dynamic batch axis [default: export.dynamic_batch].")
@click.option("--imgsz", default=None, help="Network input HEIGHTxWIDTH [default: the checkpoint's data.img_size].")
@click.option("--opset", type=int, default=None, help="ONNX opset [default: export.opset, 17].")
@click.option("--topk", type=int, default=None, help="Detections per image [default: export.topk].")
@click.option("--simplify/--no-simplify", default=None, help="onnxslim [default: export.simplify].")
@click.option("--sampling", type=click.Choice(SAMPLING_MODES), default=None,
              help=_help("Deformable attention sampling in the graph (gather is safer for TensorRT).", "sampling"))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder [default: <checkpoint folder>/export].")
@click.option("--name", default=None, help="File name stem [default: checkpoint name].")
@click.option("--sensitivity", is_flag=True, help="Per-node INT8 sensitivity report (needs --calib).")
@click.option("--sensitivity-images", type=int, default=None,
              help=_help("Images the sensitivity is measured on [default: 4].", "sensitivity_images"))
@click.option("--parity-images", default=4, show_default=True, help="Images compared with PyTorch.")
@click.option("--map-images", type=int, default=None,
              help="Validation images for the FP16 / INT8 mAP gate [default: the whole split; 0 = off].")
@click.option("--workspace-gb", type=float, default=None,
              help=_help("TensorRT workspace [default: export.workspace_gb].", "workspace_gb"))
@click.option("--dla-core", type=int, default=None,
              help=_help("TensorRT DLA core (Jetson), GPU fallback on.", "dla_core"))
@click.option("--timing-cache", default=None,
              help=_help("TensorRT timing cache file [default: <out>/timing.cache].", "timing_cache"))
def export(ckpt, onnx_flag, trt, builder, fp16, int8, calib, calib_root, calib_images, exclude_node, batch, dynamic,
           imgsz, opset, topk, simplify, sampling, out_dir, name, sensitivity, sensitivity_images, parity_images,
           map_images, workspace_gb, dla_core, timing_cache):
    """Export a checkpoint to ONNX (FP32 + FP16 / INT8) and optionally TensorRT, with parity checks."""
    # the flags override the checkpoint's export settings (ExportConfig); the rest choose what this run does
    overrides = {"opset": opset, "topk": topk, "simplify": simplify, "calib": calib, "calib_images": calib_images,
                 "workspace_gb": workspace_gb, "dla_core": dla_core, "dynamic_batch": dynamic}
    precision = precision_from_flags(fp16, int8, CLI) if fp16 or int8 else None
    exporter = Exporter(ckpt, out_dir, name, overrides=overrides, img_size=parse_imgsz(imgsz) if imgsz else None,
                        sampling=sampling, batch=batch, exclude_nodes=exclude_node, via=CLI)
    exporter.check_options(precision, trt, builder, {  # what this user typed, checked before any work
        "calib": calib, "calib_root": calib_root, "calib_images": calib_images, "exclude_nodes": exclude_node,
        "sensitivity": sensitivity, "sensitivity_images": sensitivity_images, "builder": builder,
        "workspace_gb": workspace_gb, "dla_core": dla_core, "timing_cache": timing_cache, "sampling": sampling})
    with output_lock(exporter.out_dir, "export"):  # one export per folder: parity reads the files it writes
        summary = exporter.run(precision, trt=trt, calib_root=calib_root, sensitivity=sensitivity,
                               sensitivity_images=4 if sensitivity_images is None else sensitivity_images,
                               parity_images=parity_images, map_images=map_images, timing_cache=timing_cache,
                               builder=builder)
    for key, path in summary.items():
        click.echo(f"{key}: {path}")


@click.command()
@click.option("--data", "root", required=True, type=click.Path(file_okay=False), help="KITTI-layout dataset root.")
@click.option("--split", default="train", show_default=True)
@click.option("--num", default=500, show_default=True, help="Images to choose (KITTI default 500).")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Manifest to write (calibration/<name>.json).")
@click.option("--seed", default=0, show_default=True)
def calibrate(root, split, num, out, seed):
    """Choose INT8 calibration images stratified by class and box size; write their manifest."""
    manifest = choose_calibration_set(root, split, num, seed)
    write_manifest(out, manifest)
    click.echo(f"wrote {out}: {manifest['num_selected']} of {split} images, seed {seed}")
    for key, row in manifest["strata"].items():
        click.echo(f"  {key:<22} {row['images_selected']:>5} / {row['images_in_split']:<5} images  "
                   f"{row['objects_selected']:>6} objects")



@click.command()
@click.argument("onnx_path", type=click.Path(dir_okay=False, exists=True))
@click.option("--fp16", "precision", flag_value="fp16",
              help="FP16 engine from an FP32 ONNX (TensorRT 10 builder flag).")
@click.option("--out", "engine_path", default=None,
              help="Engine file [default: next to the ONNX, <stem>.<precision>.engine].")
@click.option("--workspace-gb", default=2.0, show_default=True)
@click.option("--dla-core", default=-1, show_default=True, help="DLA core (Jetson), GPU fallback on; -1 = GPU only.")
@click.option("--timing-cache", default=None, help="Timing cache file, loaded when present and saved after the build.")
@click.option("--batch", default=None, help="Engine profile MIN,OPT,MAX or N [default: the ONNX's sidecar].")
@click.option("--builder", type=click.Choice(list(BUILDERS)), default=None,
              help="tensorrt or tensorrt-rtx [default: tensorrt if installed, else tensorrt-rtx].")
def engine(onnx_path, precision, engine_path, workspace_gb, dla_core, timing_cache, batch, builder):
    """Build a TensorRT engine from an exported ONNX (and its sidecar) on the device that will run it.

    Needs no torch and no checkpoint: copy the .onnx (with its .onnx.json, or alone: the export embeds the
    same metadata in it) to the Jetson and run this there.
    """
    path = engine_from_onnx(onnx_path, precision, engine_path, workspace_gb=workspace_gb, dla_core=dla_core,
                            timing_cache=timing_cache, batch=batch, builder=builder)
    click.echo(describe_build(path, read_metadata(path, verify=False)["tensorrt"]))

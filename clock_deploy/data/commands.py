"""`clock-deploy data`: synthesize, convert and inspect datasets."""
import os

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from clock_deploy.config import SynthConfig
from clock_deploy.data import kitti
from clock_deploy.data.coco import kitti_to_coco
from clock_deploy.data.images import image_size
from clock_deploy.data.synthetic import generate
from clock_deploy.errors import UserError
from clock_deploy.io import write_json

HEIGHT_BINS = [0, 25, 40, 80, 150, np.inf]  # 25 / 40 px are the KITTI difficulty limits


@click.group()
def data():
    """Synthesize, convert and inspect KITTI / COCO data."""


@data.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Dataset root to write.")
@click.option("--num-images", default=SynthConfig.num_images, show_default=True, type=int)
@click.option("--seed", default=SynthConfig.seed, show_default=True, type=int)
@click.option("--height", default=SynthConfig.height, show_default=True, type=int)
@click.option("--width", default=SynthConfig.width, show_default=True, type=int)
@click.option("--val-fraction", default=SynthConfig.val_fraction, show_default=True, type=float)
@click.option("--max-objects", default=SynthConfig.max_objects, show_default=True, type=int)
def synth(out, num_images, seed, height, width, val_fraction, max_objects):
    """Write a synthetic KITTI-format dataset (same seed, same bytes)."""
    summary = generate(out, num_images, seed=seed, height=height, width=width, val_fraction=val_fraction,
                       max_objects=max_objects)
    splits = summary["splits"]
    click.echo(f"wrote {num_images} images to {out} (train {splits['train']}, val {splits['val']})")
    print_stats(summary["stats"], f"{out} (trainval)")


@data.command()
@click.option("--kitti", "kitti_root", required=True, type=click.Path(exists=True, file_okay=False),
              help="KITTI root (training/, ImageSets/).")
@click.option("--split", default="val", show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="COCO json to write.")
@click.option("--classes", default="kitti3", show_default=True, type=click.Choice(sorted(kitti.CLASS_MAPS)))
def convert(kitti_root, split, out, classes):
    """Convert a KITTI split to COCO json (DontCare and neighbour classes become crowd regions)."""
    frames = []
    for frame_id in kitti.read_split(kitti_root, split):
        height, width = image_size(kitti.image_path(kitti_root, frame_id), verify=True)
        frames.append((frame_id, height, width, kitti.read_label(kitti.label_path(kitti_root, frame_id))))
    coco = kitti_to_coco(frames, kitti.class_names(classes))
    write_json(out, coco)
    click.echo(f"wrote {out}: {len(coco['images'])} images, {len(coco['annotations'])} annotations")


@data.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--split", default=None, help="Split to count (default: every label file).")
def stats(root, split):
    """Objects per class and KITTI difficulty, and box heights, of a KITTI dataset."""
    print_stats(kitti.label_stats(_read_labels(root, split)), f"{root} ({split or 'all labels'})")


def _read_labels(root, split):
    if split is not None:
        frame_ids = kitti.read_split(root, split)
    else:
        folder = os.path.join(root, "training", "label_2")
        if not os.path.isdir(folder):
            raise UserError(f"{folder} not found; is {root} a KITTI root?")
        frame_ids = sorted(kitti.check_frame_id(f[:-4], os.path.join(folder, f))
                           for f in os.listdir(folder) if f.endswith(".txt"))
    return [kitti.read_label(kitti.label_path(root, f)) for f in frame_ids]


def print_stats(stats, title):
    """Rich tables of kitti.label_stats: objects per class and difficulty, box height histogram."""
    console = Console()
    click.echo(f"{title}: {stats['images']} images")
    table = Table()
    columns = ["objects", *kitti.DIFFICULTIES, "truncated", "occluded"]
    table.add_column("class")
    for name in columns:
        table.add_column(name + (">0" if name in ("truncated", "occluded") else ""), justify="right")
    for name, row in stats["classes"].items():
        cells = [str(row[c]) for c in columns] if name != "DontCare" else [str(row["objects"])] + [""] * 5
        table.add_row(name, *cells)
    console.print(table)
    heights = stats["heights"]
    if len(heights) == 0:
        return
    counts, _ = np.histogram(heights, bins=HEIGHT_BINS)
    click.echo(f"box heights (px): min {heights.min():.0f}, median {np.median(heights):.0f}, "
               f"max {heights.max():.0f}")
    hist = Table()
    for lo, hi in zip(HEIGHT_BINS[:-1], HEIGHT_BINS[1:]):
        hist.add_column(f"{lo}-{hi:.0f}" if np.isfinite(hi) else f">={lo}", justify="right")
    hist.add_row(*[str(c) for c in counts])
    console.print(hist)

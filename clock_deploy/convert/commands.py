"""`clock-deploy import`: turn a pretrained DETR the user already has into a clock-deploy checkpoint."""
import click


@click.command("import")
@click.argument("src", type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint (.pt) to write.")
@click.option("--arch", default=None, help="deformable_detr | dab_detr | dino [default: detected from SRC].")
def import_cmd(src, out, arch):
    """Convert SRC into a checkpoint that train, distill (as teacher), export and Detector.load accept.

    SRC is a transformers folder (config.json + model.safetensors) of Deformable DETR or DAB-DETR,
    or an original .pth of Deformable-DETR, DAB-DETR or DINO (4-scale, ResNet). Nothing is downloaded.
    """
    from clock_deploy.convert.importer import import_to_checkpoint  # start-up: `import --help` needs no torch

    for line in import_to_checkpoint(src, out, arch):
        click.echo(line)
    click.echo(f"wrote {out}")

"""Tiny configs and data shared by the engine / pipeline tests."""
from clock_deploy.config import load_config
from clock_deploy.data.synthetic import generate

TINY_MODEL = [
    "model.backbone.depth=18", "model.backbone.width=8", "model.backbone.return_levels=[2, 3]",
    "model.hidden_dim=32", "model.nheads=2", "model.enc_layers=1", "model.dec_layers=2",
    "model.ffn_dim=64", "model.num_queries=10", "model.num_feature_levels=2", "model.dn.num_queries=10",
]


def tiny_data(root, num_images=8):
    generate(str(root), num_images, seed=0, height=64, width=192, val_fraction=0.25, progress=False)
    return str(root)


def tiny_config(data_root, output_dir, arch="dino", extra=()):
    overrides = TINY_MODEL + [
        f"model.arch={arch}", "model.num_classes=3", f"data.root={data_root}", "data.img_size=[64, 96]",
        f"output_dir={output_dir}", "device=cpu", "train.batch_size=2", "train.epochs=2", "train.log_every=1",
        "train.eval_every=0", "train.lr_drop_epochs=[1]", "train.warmup_iters=2", "export.topk=10",
    ]
    return load_config(None, overrides + list(extra))

"""The pretrained path end to end at demo scale, on synthetic KITTI-format data: a transformers
DAB-DETR (random init, 'COCO' classes) -> save_pretrained -> import (what `clock-deploy import`
runs) -> fine-tune one epoch with class-head transfer -> distill a student from it for one epoch
-> export ONNX -> Detector.load."""
import logging
import os
from pathlib import Path

import pytest

from clock_deploy.convert.importer import import_to_checkpoint
from clock_deploy.checkpoint import load_model
from clock_deploy.training.commands import run_training
from clock_deploy.export.exporter import Exporter
from clock_deploy.runtime import Detector

pytest.importorskip("transformers")
COCO_LIKE = ["person", "bicycle", "car", "dog"]


def test_hf_checkpoint_fine_tunes_distills_and_exports(tmp_path, caplog, synthetic_data, make_train_config,
                                                       make_hf_dab):
    hf_model = make_hf_dab(num_labels=len(COCO_LIKE), id2label=dict(enumerate(COCO_LIKE)))
    hf_model.save_pretrained(tmp_path / "hf")
    import_to_checkpoint(tmp_path / "hf", tmp_path / "coco.pt")  # what `clock-deploy import` runs
    coco, _, _ = load_model(tmp_path / "coco.pt")

    # fine-tune on Car / Pedestrian / Cyclist: the model settings are the checkpoint's
    teacher_model = ["model.arch=dab_detr", "model.hidden_dim=32", "model.nheads=4", "model.enc_layers=2",
                     "model.dec_layers=3", "model.ffn_dim=64", "model.num_queries=12",
                     "model.backbone.return_levels=[3]", "train.epochs=1", "train.eval_every=-1"]
    finetune = make_train_config(synthetic_data, tmp_path / "finetune", "dab_detr", teacher_model + [
        f"model.pretrained={tmp_path / 'coco.pt'}", "model.class_map.Pedestrian=person",
        "model.class_map.Cyclist=bicycle"])
    with caplog.at_level(logging.INFO, logger="clock_deploy"):  # run_training logs the class-head transfer
        run_training(finetune, progress=False)
    printed = caplog.text
    assert "class head (2 tensors) from 4 to 3 classes:" in printed
    assert "  Car <- car" in printed and "  Pedestrian <- person" in printed and "  Cyclist <- bicycle" in printed

    teacher, _, ckpt = load_model(tmp_path / "finetune" / "last.pt")
    assert ckpt["classes"] == ["Car", "Pedestrian", "Cyclist"] and ckpt["iteration"] == 3
    # one epoch at lr 1e-4 moves the weights, but they started from the import (not from scratch)
    assert (teacher.refpoint_embed.weight - coco.refpoint_embed.weight).abs().max() < 1e-2

    distill = make_train_config(synthetic_data, tmp_path / "distill", "dab_detr", [
        "train.epochs=1", "train.eval_every=-1", "model.backbone.return_levels=[3]", "distill.method=clock",
        f"distill.teacher={tmp_path / 'finetune' / 'last.pt'}", "distill.logit.random_queries=5"])
    run_training(distill, progress=False)

    Exporter(tmp_path / "distill" / "last.pt", tmp_path / "export").run(
        "fp32", parity_images=1, map_images=0)
    onnx_path = tmp_path / "export" / "last.onnx"
    assert onnx_path.exists()
    image = sorted((Path(synthetic_data) / "training" / "image_2").iterdir())[0]
    for path in (onnx_path, tmp_path / "finetune" / "last.pt"):
        detections = Detector.load(path, score_threshold=0.0)(str(image))
        assert len(detections) == 1 and len(detections[0].scores) == 10
        assert set(detections[0].labels.tolist()) <= {0, 1, 2}
    assert os.path.exists(str(onnx_path) + ".json")

"""`clock-deploy import`: transformers folder / official .pth -> checkpoint that exports and loads."""
import argparse

import numpy as np
import pytest
import torch

from clock_deploy.cli import cli, run
from clock_deploy.config import Config, DistillConfig
from clock_deploy.data.kitti import class_names
from clock_deploy.errors import UserError
from clock_deploy.checkpoint import load_model, read_checkpoint
from clock_deploy.training.commands import load_teacher
from clock_deploy.runtime import Detector
from official_params import DEFORMABLE_R50_TWO_STAGE, deformable_params

pytest.importorskip("transformers")


def test_hf_folder_imports_exports_and_loads(tmp_path, capsys, make_hf_deformable):
    hf = tmp_path / "hf"
    hf_model = make_hf_deformable(hf, 3, True, True)
    hf_model.config.id2label = dict(enumerate(class_names("kitti3")))  # as if fine-tuned on KITTI
    hf_model.config.save_pretrained(hf)
    ckpt = tmp_path / "deformable.pt"
    run(cli, ["import", str(hf), "--out", str(ckpt)])
    out = capsys.readouterr().out
    assert "mapped:" in out and "re-initialized: none" in out and f"wrote {ckpt}" in out
    assert read_checkpoint(ckpt)["classes"] == ["Car", "Pedestrian", "Cyclist"]
    teacher = load_teacher(Config(distill=DistillConfig(method="clock", teacher=str(ckpt))), "cpu")
    assert not any(p.requires_grad for p in teacher.parameters())

    model, _, _ = load_model(ckpt)
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert (model(image).pred_logits - hf_model(pixel_values=image).logits).abs().max() <= 1e-4

    run(cli, ["export", "--ckpt", str(ckpt), "--imgsz", "64x96", "--topk", "10", "--parity-images", "1",
              "--map-images", "0", "--no-simplify", "--out", str(tmp_path / "export")])
    pixels = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    for path in (ckpt, tmp_path / "export" / "deformable.onnx"):
        [detections] = Detector.load(path, score_threshold=0.0)(pixels)
        assert len(detections) > 0 and set(detections.labels) <= {0, 1, 2}


def test_official_pth_with_training_args_imports(tmp_path, capsys):
    small = {**DEFORMABLE_R50_TWO_STAGE, "hidden_dim": 32, "ffn": 64, "nheads": 4, "enc_layers": 1, "dec_layers": 2,
             "num_queries": 20, "depth": 18, "width": 8}  # the official layout at a size that saves in a blink
    state = {name: torch.randn(shape) for name, shape in deformable_params(small)}
    for name in [n for n in state if n.startswith("transformer.decoder.") and "_embed." in n]:
        state[name] = state[name.removeprefix("transformer.decoder.")]  # tied heads hold the same tensor
    args = argparse.Namespace(nheads=4, num_queries=20, dropout=0.1, position_embedding="sine", dilation=False)
    src = tmp_path / "checkpoint0049.pth"
    torch.save({"model": state, "args": args, "epoch": 49}, src)
    run(cli, ["import", str(src), "--out", str(tmp_path / "teacher.pt")])
    out = capsys.readouterr().out
    assert "official deformable_detr" in out and "two_stage=True" in out
    model, cfg, ckpt = load_model(tmp_path / "teacher.pt")
    assert cfg.model.proposal_rank == "first_class" and len(ckpt["classes"]) == 91 and ckpt["classes"][3] == "car"
    assert (cfg.model.nheads, cfg.model.num_queries, cfg.model.backbone.depth) == (4, 20, 18)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96)).pred_boxes.shape == (1, 20, 4)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_foreign_or_garbage_file_is_one_clear_line(tmp_path, capsys, content):
    src = tmp_path / "weights.pth"
    src.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        run(cli, ["import", str(src), "--out", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "weights.pth" in err and not (tmp_path / "x.pt").exists()


def test_foreign_state_dict_names_what_is_wrong(tmp_path, capsys):
    src = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}, src)
    with pytest.raises(SystemExit):
        run(cli, ["import", str(src), "--out", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err
    assert "not a Deformable-DETR, DAB-DETR, DINO or RT-DETRv2 checkpoint" in err and len(err.strip().splitlines()) == 1


def test_one_resnet_depth_rule_and_one_fit_check():
    from clock_deploy.convert.common import fit_problems, resnet_depth
    from clock_deploy.errors import UserError

    assert resnet_depth(False, [2, 2, 2, 2], "x") == 18 and resnet_depth(False, [3, 4, 6, 3], "x") == 34
    assert resnet_depth(True, [3, 4, 6, 0], "x") == 50  # stages after the last one used are not stored
    for bottleneck, counts in ((True, [2, 2, 2, 2]), (False, [3, 4, 6, 4]), (False, [0, 0, 0, 0])):
        with pytest.raises(UserError, match=r"x: backbone is not a ResNet-18/34/50"):
            resnet_depth(bottleneck, counts, "x")
    model = {"a": torch.zeros(2), "b": torch.zeros(3, 4), "c": torch.zeros(1)}
    assert fit_problems(model, dict(model)) == ""
    assert fit_problems(model, {"a": torch.zeros(2), "b": torch.zeros(3, 5), "d": torch.zeros(1)}) == (
        "1 missing weights: c; 1 unexpected weights: d; 1 wrong shapes: b (3, 5) instead of (3, 4)")
    assert fit_problems(model, {**model, "b": torch.zeros(9)}, skip_shapes=["b"]) == ""


def _unreadable_files(folder):
    """Files no loader may read, each with a Python object, garbage or nothing in it."""
    import random

    files = {"objects.pth": None, "garbage.pth": b"\x80\x04garbage", "empty.pth": b"", "zip.pth": b"PK\x03\x04x"}
    for name, content in files.items():
        if content is None:  # a pickle holding a class instance: torch refuses it with weights_only=True
            torch.save({"model": random.Random(0)}, folder / name)
        else:
            (folder / name).write_bytes(content)
    return [folder / name for name in files]


@pytest.mark.parametrize("command", ["import", "export", "backbone"])
def test_no_message_suggests_weights_only_false(tmp_path, capsys, command):
    """torch advises re-running with weights_only=False (which runs code from the file): import, export
    and the backbone weights give the project's own one line instead, naming the file."""
    from clock_deploy.models.backbone import ResNetBackbone

    for path in _unreadable_files(tmp_path):
        if command == "backbone":
            with pytest.raises(UserError) as e:
                ResNetBackbone(depth=18, width=64).load_backbone_weights(str(path))
            err = f"error: {e.value}"
        else:
            argv = [str(path)] if command == "import" else ["--ckpt", str(path)]
            with pytest.raises(SystemExit):
                run(cli, [command, *argv, "--out", str(tmp_path / "out")])
            err = capsys.readouterr().err.strip()
        assert "weights_only" not in err and "Traceback" not in err and len(err.splitlines()) == 1, err
        assert err.startswith(f"error: {path}: not a readable "), err

"""Runtime Detector: same detections through torch and onnxruntime, torch-free ONNX path, clear errors."""
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from clock_deploy.artifact import HASH_KEYS, batch_spec, read_metadata, write_metadata
from clock_deploy.data.transforms import Compose, Normalize, Resize, ToTensor
from clock_deploy.checkpoint import save_checkpoint
from clock_deploy.errors import UserError
from clock_deploy.eval.loop import evaluate_artifact
from clock_deploy.export.onnx import export_onnx
from clock_deploy.runtime import Detector
from clock_deploy.runtime.preprocess import preprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, student_io, make_tiny_student):
    """A synthetic dataset, a tiny Deformable DETR checkpoint trained on nothing, and its ONNX export."""
    from clock_deploy.data.synthetic import generate
    from clock_deploy.export.exporter import Exporter

    root = tmp_path_factory.mktemp("data") / "synth"
    generate(root, 12, seed=1, height=94, width=310, progress=False)
    folder = tmp_path_factory.mktemp("model")
    model, cfg = make_tiny_student("deformable_detr", "gather", data_root=root)
    ckpt = folder / "student.pt"
    save_checkpoint(ckpt, model, cfg, student_io.classes, epoch=1, iteration=1)
    Exporter(ckpt, folder).run("fp32", parity_images=2, map_images=0)
    images = sorted(str(p) for p in (root / "training" / "image_2").iterdir())
    return {"root": root, "ckpt": str(ckpt), "onnx": str(folder / "student.onnx"), "images": images, "cfg": cfg}


def test_preprocessing_is_the_evaluation_transform(student_io):
    height, width, spec = student_io.height, student_io.width, student_io.spec
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (93, 311, 3), dtype=np.uint8)
    expected, _ = Compose([Resize(height, width), ToTensor(), Normalize(spec["mean"], spec["std"])])(
        image, {"boxes": torch.zeros(0, 4)})
    batch, sizes = preprocess([image, Image.fromarray(image)], spec)
    assert batch.dtype == np.float32 and batch.shape == (2, 3, height, width) and sizes == [(93, 311)] * 2
    np.testing.assert_array_equal(batch[0], expected.numpy())
    np.testing.assert_array_equal(batch[1], expected.numpy())


def _match(a, b, score_tol=1e-5, box_tol=1e-3):
    """Every detection of `a` has one of the same label in `b` with the same score and box."""
    assert len(a) == len(b)
    for label, score, box in zip(a.labels, a.scores, a.boxes):
        same = (b.labels == label) & (np.abs(b.scores - score) <= score_tol) & (np.abs(b.boxes - box).max(1) <= box_tol)
        assert same.any(), (label, score, box)


def test_torch_and_onnx_backends_detect_the_same(artifacts, student_io):
    height, width, classes = student_io.height, student_io.width, student_io.classes
    path = artifacts["images"][0]
    inputs = [path, Image.open(path), np.asarray(Image.open(path).convert("RGB"))]
    torch_det = Detector.load(artifacts["ckpt"], score_threshold=0.3)
    onnx_det = Detector.load(artifacts["onnx"], score_threshold=0.3)
    assert torch_det.backend.name == "torch" and onnx_det.backend.name == "onnxruntime"
    assert onnx_det.classes == torch_det.classes == classes
    results = torch_det(inputs) + onnx_det(inputs)
    assert len(results) == 6 and len(results[0]) > 0
    for r in results[1:]:
        _match(results[0], r)

    # boxes come back in the original image's pixels: the network's boxes scaled by W0 / W, H0 / H
    batch, ((h0, w0),) = preprocess([path], onnx_det.meta["input"])
    scores, labels, boxes = onnx_det.infer(batch)
    keep = scores[0] >= 0.3
    np.testing.assert_allclose(results[3].boxes, boxes[0][keep] * np.array([w0 / width, h0 / height] * 2), rtol=1e-6)
    assert results[3].names == [classes[i] for i in labels[0][keep]]


def test_threshold_single_image_and_empty_input(artifacts):
    detector = Detector.load(artifacts["onnx"], score_threshold=0.0)
    image = artifacts["images"][1]
    (everything,) = detector(image)
    assert len(everything) == read_metadata(artifacts["onnx"])["topk"]
    threshold = float(np.median(everything.scores))
    (kept,) = detector(image, score_threshold=threshold)
    assert len(kept) == int((everything.scores >= threshold).sum()) and kept.scores.min() >= threshold
    assert detector([]) == []


def test_onnx_runtime_path_imports_neither_torch_nor_the_exporter(artifacts):
    code = ("import sys; from clock_deploy.runtime import Detector; "
            f"d = Detector.load({artifacts['onnx']!r}); r = d([{artifacts['images'][0]!r}]); "
            "assert len(r) == 1; assert 'torch' not in sys.modules, 'torch was imported'; "
            "export = sorted(m for m in sys.modules if m.startswith('clock_deploy.export')); "
            "assert not export, f'imported {export}'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_static_batch_model_is_fed_full_batches(artifacts, tmp_path, student_io):
    height, width = student_io.height, student_io.width
    from clock_deploy.checkpoint import load_model
    model, cfg, _ = load_model(artifacts["ckpt"])
    path = str(tmp_path / "static.onnx")
    export_onnx(model, path, height=height, width=width, topk=cfg.export.topk, dynamic=False, batch=2, simplify=False)
    meta = read_metadata(artifacts["onnx"])
    write_metadata(path, {**meta, "batch": batch_spec(False, 2)})
    static = Detector.load(path, score_threshold=0.0)
    assert static.backend.static and static.backend.max_batch == 2
    images = artifacts["images"][:3]  # one full batch of 2, then 1 padded to 2
    for a, b in zip(Detector.load(artifacts["onnx"], score_threshold=0.0)(images), static(images)):
        _match(a, b)


def test_corrupt_and_mismatched_files_name_the_file(artifacts, tmp_path, student_io):
    height, width = student_io.height, student_io.width
    good = artifacts["onnx"]

    def copy(name, data=None):
        path = tmp_path / name
        if data is None:
            shutil.copy(good, path)
        else:
            path.write_bytes(data)
        write_metadata(path, read_metadata(good))  # a sidecar that records this file's sha256
        return str(path)

    with open(good, "rb") as f:
        truncated = copy("truncated.onnx", f.read()[:5000])
    with pytest.raises(UserError, match="truncated.onnx: onnxruntime cannot load it"):
        Detector.load(truncated)

    # a model beside another model's sidecar (e.g. a re-export killed between the two files)
    swapped = tmp_path / "swapped.onnx"
    swapped.write_bytes(open(truncated, "rb").read())
    shutil.copy(good + ".json", str(swapped) + ".json")
    with pytest.raises(UserError, match=r"swapped.onnx.json: describes another file than .*swapped.onnx"):
        Detector.load(swapped)

    # a lone .onnx loads from the metadata the export embedded in it; without that it names the sidecar
    alone = tmp_path / "alone.onnx"
    shutil.copy(good, alone)
    detector = Detector.load(alone, score_threshold=0.0)
    sidecar = read_metadata(good)
    # the embedded copy is signed with the graph's sha256 (the file cannot hold its own), the sidecar with the file's
    unsigned = {k: v for k, v in sidecar.items() if k not in HASH_KEYS}
    assert {k: v for k, v in detector.meta.items() if k not in HASH_KEYS} == unsigned
    assert len(detector(artifacts["images"][0])[0]) > 0
    stripped = onnx.load(good)
    del stripped.metadata_props[:]
    onnx.save(stripped, str(tmp_path / "stripped.onnx"))
    with pytest.raises(UserError, match="stripped.onnx: metadata sidecar .*stripped.onnx.json is missing"):
        Detector.load(tmp_path / "stripped.onnx")
    engine = tmp_path / "alone.fp16.engine"
    engine.write_bytes(b"serialized engine")
    with pytest.raises(UserError, match=r"alone.fp16.engine: metadata sidecar .* is missing \(an engine has no room"):
        Detector.load(engine)

    broken_json = copy("json.onnx")
    with open(broken_json + ".json", "w") as f:
        f.write("{")
    with pytest.raises(UserError, match=r"json.onnx.json:\d+: not valid JSON"):
        Detector.load(broken_json)

    resized = tmp_path / "resized.onnx"
    onnx.save(stripped, str(resized))  # no embedded copy to disagree with the sidecar
    meta = read_metadata(good)
    meta["input"]["height"] = 96
    write_metadata(resized, meta)
    with pytest.raises(UserError,
                       match=r"resized.onnx: input is \[N, 3, 64, 128\] but its metadata says \[N, 3, 96, 128\]"):
        Detector.load(resized)

    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("ReduceMean", ["images"], ["logits"], keepdims=0)], "classifier",
        [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, ["N", 3, height, width])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, None)])
    foreign = copy("foreign.onnx", onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
                   .SerializeToString())
    with pytest.raises(UserError,
                       match=r"foreign.onnx: outputs are \['logits'\], expected \['scores', 'labels', 'boxes'\]"):
        Detector.load(foreign)

    with pytest.raises(UserError, match="cannot tell the backend from the suffix '.bin'"):
        Detector.load(tmp_path / "model.bin")
    with pytest.raises(UserError, match="model file not found: .*missing.onnx"):
        Detector.load(tmp_path / "missing.onnx")
    bad_ckpt = tmp_path / "bad.pt"
    bad_ckpt.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="bad.pt: not a readable checkpoint"):
        Detector.load(bad_ckpt)


def test_evaluate_artifact_gives_the_same_metrics_for_torch_and_onnx(artifacts):
    from clock_deploy.data.dataset import build_dataset
    dataset = build_dataset(artifacts["cfg"].data, "val", train=False)
    onnx_metrics = evaluate_artifact(artifacts["onnx"], dataset)
    torch_metrics = evaluate_artifact(artifacts["ckpt"], dataset)
    assert set(onnx_metrics) >= {"mAP", "AP50", "kitti_moderate"}
    for key in ("mAP", "AP50", "kitti_moderate"):
        assert onnx_metrics[key] == pytest.approx(torch_metrics[key], abs=1e-9)


def test_training_time_evaluation_is_the_runtime_evaluation_and_leaves_the_run_alone(artifacts):
    # training evaluates its in-memory model through the same loop as export parity and the bench
    from clock_deploy.data.dataset import build_dataset
    from clock_deploy.checkpoint import load_model
    from clock_deploy.eval.loop import evaluate_model
    cfg = artifacts["cfg"]
    dataset = build_dataset(cfg.data, "val", train=False)
    model, _, _ = load_model(artifacts["ckpt"])
    model.train()
    rng = torch.get_rng_state()
    metrics = evaluate_model(model, dataset, cfg.data.img_size, cfg.export.topk, batch=3)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    reference = evaluate_artifact(artifacts["ckpt"], dataset)
    for key in ("mAP", "AP50", "kitti_moderate", "kitti_easy", "kitti_hard"):
        assert metrics[key] == pytest.approx(reference[key], abs=1e-9), key


def test_perception_loop_example_runs(artifacts):
    folder = os.path.dirname(artifacts["images"][0])
    out = subprocess.run([sys.executable, os.path.join(REPO, "examples", "perception_loop.py"), "--model",
                          artifacts["onnx"], "--frames", folder, "--max-frames", "2", "--threshold", "0.3"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("000000.png: ") and " objects in " in lines[0]

"""Property-based fuzzing of every reader of user files: only UserError may escape.

The KITTI label reader, the COCO json reader (with the dataset built on it), the config loader (and
the models built from fuzzed config values), the calibration manifest reader, the artifact sidecar
reader, checkpoints (damaged structure, flipped bits) and ONNX files (flipped bits, damaged embedded
metadata) get thousands of generated files
(a few thousand cases in all, a few seconds per reader): near-valid files with one field broken
as well as random bytes. Any other exception (IndexError, UnicodeDecodeError, TypeError, ...)
would reach the user as a traceback and fails the test.
"""
import collections
import copy
import functools
import json
import os
import tempfile

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clock_deploy.artifact import FORMAT as SIDECAR_FORMAT
from clock_deploy.artifact import read_metadata
from clock_deploy.config import load_config
from clock_deploy.data import kitti
from clock_deploy.data.dataset import CocoDetection
from clock_deploy.errors import UserError
from clock_deploy.export.calibration import FORMAT as MANIFEST_FORMAT
from clock_deploy.export.calibration import manifest_images

# 2,660 cases in the default suite (a few seconds per reader on a quiet machine); CLOCK_DEPLOY_FUZZ_SCALE=20
# runs twenty times as many, e.g. before a release
SCALE = float(os.environ.get("CLOCK_DEPLOY_FUZZ_SCALE", "1"))
FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def examples(n):
    return settings(FUZZ, max_examples=max(1, int(n * SCALE)))


WORK = tempfile.mkdtemp(prefix="clock-deploy-fuzz-")  # one folder, files rewritten per example

# ---------------------------------------------------------------- building blocks

NUMBER_TEXT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-10**30, 10**30).map(str),
    st.sampled_from(["0", "-1", "3", "0.5", "nan", "-inf", "1e300", "1e-400", "1_0", "0x10", "", "+", "1e20", "٣"]),
)
JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
JSON_VALUE = st.recursive(JSON_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                               st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=6)
FRAME_ID = st.one_of(st.sampled_from(["000001", "000002", "../x", "/abs", "..", "", "a/b", "0 1"]),
                     st.text(max_size=10), JSON_VALUE)


def maybe(good):
    """Mostly `good`, sometimes any JSON value: near-valid files reach the deep checks."""
    return st.one_of(good, good, good, JSON_VALUE)


def write(name, data):
    path = os.path.join(WORK, name)
    if os.path.isdir(path):
        os.rmdir(path)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    return path


CASES = collections.Counter()  # examples run per test; benchmarks/reliability_probes.py reports them


def only_user_errors(call):
    """Run `call`; any exception but a UserError fails the test. Returns True when it raised one."""
    test = call.__qualname__.split(".")[0]
    CASES[test] += 1
    try:
        call()
    except UserError:
        CASES[f"{test} refused"] += 1
        return True
    return False


# ---------------------------------------------------------------- KITTI labels

TOKEN = st.one_of(st.sampled_from(kitti.KITTI_CLASSES + ["DontCare", "car", "CYCLIST", "Bus", "\ufeffCar"]),
                  NUMBER_TEXT, st.text(max_size=6))
LINE = st.lists(TOKEN, min_size=0, max_size=17).flatmap(
    lambda tokens: st.sampled_from([" ", "\t", "  "]).map(lambda sep: sep.join(tokens)))
VALID_LINE = st.tuples(st.sampled_from(kitti.KITTI_CLASSES + ["DontCare"]),
                       st.lists(NUMBER_TEXT, min_size=14, max_size=15)).map(lambda t: " ".join([t[0], *t[1]]))
LABEL_FILE = st.one_of(
    st.lists(st.one_of(LINE, VALID_LINE), max_size=6).flatmap(
        lambda lines: st.sampled_from(["\n", "\r\n", "\r"]).map(lambda nl: nl.join(lines))),
    st.binary(max_size=300),
    st.text(max_size=200),
)


@examples(500)
@given(LABEL_FILE, st.booleans())
def test_kitti_label_reader_raises_only_user_errors(content, bom):
    if bom and isinstance(content, str):
        content = "\ufeff" + content
    path = write("label.txt", content)

    def read():
        annos = kitti.read_label(path)
        assert len(annos["bbox"]) == len(annos["name"])
        assert (abs(annos["bbox"]) <= kitti.MAX_COORDINATE).all()
    only_user_errors(read)


@examples(200)
@given(st.lists(st.one_of(FRAME_ID.filter(lambda v: isinstance(v, str)), st.just("000001")), max_size=5))
def test_split_reader_raises_only_user_errors_and_keeps_ids_inside(lines):
    path = write("split.txt", "\n".join(lines))

    def read():
        for frame_id in kitti.read_split_file(path):
            assert os.path.dirname(kitti.label_path(WORK, frame_id)) == os.path.join(WORK, "training", "label_2")
    only_user_errors(read)


# ---------------------------------------------------------------- COCO json

BOX = st.one_of(st.lists(st.floats(-1e7, 1e7), min_size=4, max_size=4), JSON_VALUE)
IMAGE = st.fixed_dictionaries({}, optional={"id": maybe(st.integers(0, 4)), "file_name": maybe(
    st.sampled_from(["000001.png", "000002.jpg", "a/b.png", "../x.png", ".png", ""])),
    "height": maybe(st.integers(-1, 500)), "width": maybe(st.integers(-1, 500))})
ANNOTATION = st.fixed_dictionaries({}, optional={"id": JSON_VALUE, "image_id": maybe(st.integers(0, 4)),
                                                 "category_id": maybe(st.integers(0, 3)), "bbox": BOX,
                                                 "iscrowd": maybe(st.integers(0, 1))})
CATEGORY = st.fixed_dictionaries({}, optional={"id": maybe(st.integers(0, 3)), "name": maybe(st.text(max_size=5))})
COCO = st.one_of(
    st.fixed_dictionaries({}, optional={"images": maybe(st.lists(maybe(IMAGE), max_size=4)),
                                        "annotations": maybe(st.lists(maybe(ANNOTATION), max_size=6)),
                                        "categories": maybe(st.lists(maybe(CATEGORY), max_size=3))}),
    JSON_VALUE,
)


@examples(400)
@given(st.one_of(COCO.map(json.dumps), COCO.map(json.dumps), st.binary(max_size=100)))
def test_coco_reader_and_dataset_raise_only_user_errors(content):
    os.makedirs(os.path.join(WORK, "coco", "annotations"), exist_ok=True)
    write(os.path.join("coco", "annotations", "val.json"), content)

    def read():
        dataset = CocoDetection(os.path.join(WORK, "coco"), "val")
        for i in range(len(dataset)):
            dataset.gt_annos(i)
            dataset.objects(i)
            assert os.path.dirname(dataset.image_path(i)) == os.path.join(WORK, "coco", "images")
    only_user_errors(read)


# ---------------------------------------------------------------- configs

KEYS = ["seed", "output_dir", "device", "data", "data.root", "data.img_size", "data.classes", "model",
        "model.arch", "model.num_queries", "model.backbone.depth", "train", "train.lr", "train.epochs",
        "train.batch_size", "train.eval_every", "train.lr_drop_epochs", "distill.teacher", "_base_", "x"]


def nest(items):
    """{'a.b': v} -> {'a': {'b': v}} (the later key wins on clashes)."""
    root = {}
    for key, value in items:
        node, parts = root, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[parts[-1]] = value
    return root


YAML_SCALARS = st.one_of(JSON_VALUE, st.sampled_from([".nan", "-.inf", "1e-4", "-1", "0", "dino", "[1, 2]",
                                                      "{a: 1}", "!!python/object:os.system", "*a", "&a x"]))
CONFIG = st.one_of(
    st.lists(st.tuples(st.sampled_from(KEYS), YAML_SCALARS), max_size=6).map(
        lambda items: yaml.safe_dump(nest(items), allow_unicode=True)),
    st.lists(st.tuples(st.sampled_from(KEYS), st.text(max_size=8)), max_size=5).map(
        lambda items: "\n".join(f"{k}: {v}" for k, v in items)),  # raw text: duplicates, bad YAML
    st.text(max_size=80),
    st.binary(max_size=80),
)


@examples(500)
@given(CONFIG)
def test_config_loader_raises_only_user_errors(content):
    path = write("config.yaml", content)
    only_user_errors(lambda: load_config(path))


# ---------------------------------------------------------------- calibration manifests

MANIFEST = st.one_of(
    st.fixed_dictionaries({"format": maybe(st.just(MANIFEST_FORMAT))},
                          optional={"dataset_root": maybe(st.sampled_from([WORK, "data", "", "/"])),
                                    "split": JSON_VALUE,
                                    "frame_ids": maybe(st.lists(FRAME_ID, max_size=4))}),
    JSON_VALUE,
)


@examples(300)
@given(st.one_of(MANIFEST.map(json.dumps), MANIFEST.map(json.dumps), st.binary(max_size=100)), st.booleans())
def test_calibration_manifest_reader_raises_only_user_errors(content, override_root):
    path = write("manifest.json", content)

    def read():
        for image in manifest_images(path, root=WORK if override_root else None):
            assert "/training/image_2/" in image and ".." not in image
    only_user_errors(read)


# ---------------------------------------------------------------- artifact sidecars

INPUT = st.fixed_dictionaries({}, optional={
    "height": maybe(st.integers(-1, 100)), "width": maybe(st.integers(-1, 100)),
    "mean": maybe(st.lists(st.floats(allow_nan=True), max_size=4)),
    "std": maybe(st.lists(st.floats(allow_nan=True), max_size=4)), "divisor": maybe(st.floats(allow_nan=True))})
SIDECAR = st.one_of(
    st.fixed_dictionaries({"format": maybe(st.just(SIDECAR_FORMAT))}, optional={
        "classes": maybe(st.lists(st.text(max_size=4), max_size=3)), "input": maybe(INPUT),
        "topk": maybe(st.integers(-1, 100)), "precision": maybe(st.sampled_from(["fp32", "fp16", "int8", "x"])),
        "batch": maybe(st.fixed_dictionaries({k: maybe(st.integers(-1, 4)) for k in ("min", "opt", "max")})),
        "artifact_sha256": maybe(st.text(max_size=4))}),
    JSON_VALUE,
)


@examples(300)
@given(st.one_of(SIDECAR.map(lambda d: json.dumps(d, allow_nan=True)), st.binary(max_size=100)))
def test_sidecar_reader_raises_only_user_errors(content):
    artifact = write("model.onnx", b"model bytes")
    write("model.onnx.json", content)

    def read():
        meta = read_metadata(artifact)
        assert meta["input"]["height"] > 0 and len(meta["classes"]) > 0
    only_user_errors(read)


# ---------------------------------------------------------------- config values through model building

MODEL_KEYS = ["model.arch", "model.hidden_dim", "model.nheads", "model.num_queries", "model.n_points",
              "model.num_feature_levels", "model.enc_layers", "model.dec_layers", "model.ffn_dim",
              "model.backbone.return_levels", "model.backbone.depth", "model.dn.num_queries", "model.two_stage",
              "model.dropout", "model.num_classes", "data.img_size", "export.topk", "seed", "device"]
# small in-range values (so a model that passes the checks is tiny), values just outside and wrong types
MODEL_VALUE = st.one_of(st.sampled_from([-1, 0, 1, 2, 3, 4, 7, 8, 64, 2**63, 1e20, -0.5, 0.5, None, True, "x", "cpu",
                                         "cuda:x", "dino", "dab_detr", "deformable_detr", [1], [2, 3], [[1], 2],
                                         [64, 96], [64], [0, 0], [3, 2, 1, 0], [100000, 100000], {"a": 1}]),
                        JSON_VALUE)
TINY_BASE = ["model.backbone.depth=18", "model.backbone.width=8", "model.backbone.return_levels=[2, 3]",
             "model.hidden_dim=16", "model.nheads=2", "model.enc_layers=1", "model.dec_layers=1",
             "model.ffn_dim=16", "model.num_queries=5", "model.num_feature_levels=2", "model.dn.num_queries=4",
             "data.img_size=[64, 96]", "export.topk=5", "device=cpu"]


IN_RANGE = {  # tiny values each key accepts (combinations may still be refused, e.g. hidden_dim % nheads)
    "model.arch": ["dino", "dab_detr", "deformable_detr"], "model.hidden_dim": [8, 12, 16, 32],
    "model.nheads": [1, 2, 4], "model.num_queries": [1, 3, 10], "model.n_points": [1, 2, 4],
    "model.num_feature_levels": [1, 2, 3, 4], "model.enc_layers": [0, 1, 2], "model.dec_layers": [1, 2],
    "model.ffn_dim": [8, 16], "model.backbone.return_levels": [[3], [2, 3], [1, 2, 3], [0, 1, 2, 3], [3, 2]],
    "model.backbone.depth": [18, 34], "model.dn.num_queries": [0, 1, 4, 10], "model.two_stage": [True, False],
    "model.dropout": [0.0, 0.1], "model.num_classes": [1, 3, 8], "data.img_size": [[64, 96], [32, 32], [33, 47]],
    "export.topk": [1, 5, 50], "seed": [0, 1, 2**32 - 1], "device": ["cpu"],
}
CONFIG_ITEM = st.sampled_from(MODEL_KEYS).flatmap(lambda key: st.tuples(st.just(key), st.one_of(
    *[st.sampled_from(IN_RANGE[key])] * 4, MODEL_VALUE)))


@examples(120)
@given(st.lists(CONFIG_ITEM, min_size=1, max_size=4))
def test_fuzzed_config_values_build_and_run_a_model_or_are_refused(items):
    import numpy as np
    import torch

    from clock_deploy.models.build import build_model
    from clock_deploy.runtime.backend_torch import model_backend

    overrides = TINY_BASE + [f"{key}={json.dumps(value)}" for key, value in items]

    def build_and_run():
        cfg = load_config(None, overrides)
        torch.manual_seed(cfg.seed % 1000)
        model = build_model(cfg.model).eval()
        height, width = cfg.data.img_size
        if height * width * cfg.model.hidden_dim > 64 * 96 * 64:  # in range but not tiny: building was the test
            return
        backend, _ = model_backend(model, ["a"] * cfg.model.num_classes, (height, width), cfg.export.topk)
        scores, labels, boxes = backend(np.zeros((1, 3, height, width), np.float32))
        assert scores.shape == labels.shape == (1, min(cfg.export.topk, cfg.model.num_queries * cfg.model.num_classes))
        CASES["models built and run"] += 1
    only_user_errors(build_and_run)


# ---------------------------------------------------------------- checkpoints

CKPT_DIR = os.path.join(WORK, "ckpt")


@functools.lru_cache(maxsize=None)
def _valid_checkpoint():
    """A tiny DAB-DETR checkpoint (built once): (its path, its bytes, its contents: copy before changing)."""
    import torch

    from clock_deploy.checkpoint import save_checkpoint
    from clock_deploy.models.build import build_model

    path = os.path.join(CKPT_DIR, "valid.pt")
    if not os.path.isfile(path):
        os.makedirs(CKPT_DIR, exist_ok=True)
        cfg = load_config(None, TINY_BASE + ["model.arch=dab_detr", "model.num_feature_levels=1",
                                             "model.backbone.return_levels=[3]"])
        torch.manual_seed(0)
        save_checkpoint(path, build_model(cfg.model), cfg, ["Car", "Pedestrian", "Cyclist"], epoch=1, iteration=1)
    with open(path, "rb") as f:
        data = f.read()
    return path, data, torch.load(path, weights_only=True)


def _mutate(ckpt, path, value):
    """Replace (value is not None) or delete the entry at `path` (a list of keys) of a nested dict."""
    node = ckpt
    for key in path[:-1]:
        if not isinstance(node, dict) or key not in node:
            return
        node = node[key]
    if isinstance(node, dict):
        if value is None:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value


CKPT_PATHS = st.sampled_from([["config"], ["model"], ["classes"], ["arch"], ["epoch"], ["iteration"], ["metrics"],
                              ["format"], ["ema"], ["config", "model"], ["config", "data"],
                              ["config", "model", "arch"], ["config", "model", "hidden_dim"],
                              ["config", "model", "num_queries"], ["config", "data", "img_size"],
                              ["config", "export", "topk"], ["config", "model", "backbone", "return_levels"],
                              ["model", "class_embed.weight"], ["model", "query_embed.weight"]])
TENSOR = st.sampled_from([(0,), (3,), (2, 2), (1, 3, 5)]).map(lambda shape: __import__("torch").zeros(shape))
CKPT_VALUE = st.one_of(st.none(), JSON_VALUE, TENSOR, st.dictionaries(st.text(max_size=4), TENSOR, max_size=2),
                       st.sampled_from([[], ["Car"], ["Car", "Van", "X"], 2**63, -1, "dino", [[1], 2]]))


@examples(80)
@given(st.lists(st.tuples(CKPT_PATHS, CKPT_VALUE), min_size=1, max_size=3), st.booleans())
def test_checkpoints_with_damaged_structure_raise_only_user_errors(changes, fix_checksum):
    import torch

    from clock_deploy.checkpoint import content_sha256
    from clock_deploy.runtime import Detector

    ckpt = copy.deepcopy(_valid_checkpoint()[2])
    for path, value in changes:
        _mutate(ckpt, path, value)
    if fix_checksum:  # a consistent file reaches the structure checks; a stale checksum is refused first
        ckpt["checksum"] = content_sha256(ckpt)
    target = os.path.join(CKPT_DIR, "damaged.pt")
    torch.save(ckpt, target)
    only_user_errors(lambda: Detector.load(target))


@examples(150)
@given(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=3))
def test_bit_flipped_checkpoints_are_refused_or_load_the_same_weights(flips):
    import torch

    from clock_deploy.checkpoint import load_model

    _, data, original = _valid_checkpoint()
    data = bytearray(data)
    for where, bit in flips:
        data[int(where * len(data))] ^= 1 << bit
    target = os.path.join(CKPT_DIR, "flipped.pt")
    with open(target, "wb") as f:
        f.write(bytes(data))

    def load():
        model, _, ckpt = load_model(target)
        # a flip the checks let through (zip bookkeeping torch does not read) changed nothing the model uses
        assert all(torch.equal(ckpt["model"][k], v) for k, v in original["model"].items())
        assert ckpt["config"] == original["config"] and ckpt["classes"] == original["classes"]
    only_user_errors(load)


# ---------------------------------------------------------------- ONNX files

ONNX_DIR = os.path.join(WORK, "onnx")


@functools.lru_cache(maxsize=None)
def _valid_onnx():
    """A tiny exported DAB-DETR ONNX with sidecar and embedded metadata (made once): (path, bytes, outputs)."""
    import numpy as np

    from clock_deploy.export.exporter import Exporter
    from clock_deploy.runtime import Detector

    path = os.path.join(ONNX_DIR, "valid.onnx")
    if not os.path.isfile(path + ".json"):
        Exporter(_valid_checkpoint()[0], ONNX_DIR, "valid").run("fp32", parity_images=1, map_images=0)
    with open(path, "rb") as f:
        data = f.read()
    return path, data, Detector.load(path).infer(np.zeros((1, 3, 64, 96), np.float32))


def _write_onnx(data, sidecar):
    import shutil

    path = os.path.join(ONNX_DIR, "fuzzed.onnx")
    with open(path, "wb") as f:
        f.write(data)
    if sidecar:
        shutil.copy(os.path.join(ONNX_DIR, "valid.onnx.json"), path + ".json")
    elif os.path.exists(path + ".json"):
        os.remove(path + ".json")
    return path


@examples(50)
@given(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=3),
       st.booleans())
def test_bit_flipped_onnx_files_are_refused_or_give_the_same_outputs(flips, sidecar):
    import numpy as np

    from clock_deploy.runtime import Detector

    _, original, expected = _valid_onnx()
    data = bytearray(original)
    for where, bit in flips:
        data[int(where * len(data))] ^= 1 << bit
    path = _write_onnx(bytes(data), sidecar)

    def load_and_run():
        outputs = Detector.load(path).infer(np.zeros((1, 3, 64, 96), np.float32))
        # the sidecar's sha256 covers every byte: a changed file never loads beside it (two flips may cancel)
        assert not sidecar or bytes(data) == original
        for a, b in zip(outputs, expected):
            np.testing.assert_array_equal(a, b)
    only_user_errors(load_and_run)


@examples(60)
@given(st.one_of(SIDECAR.map(lambda d: json.dumps(d, allow_nan=True)), st.text(max_size=40)), st.booleans())
def test_onnx_files_with_damaged_embedded_metadata_raise_only_user_errors(embedded, sidecar):
    import onnx

    from clock_deploy.artifact import EMBEDDED_KEY
    from clock_deploy.runtime import Detector

    path, _, _ = _valid_onnx()
    model = onnx.load(path)
    next(p for p in model.metadata_props if p.key == EMBEDDED_KEY).value = embedded
    target = _write_onnx(model.SerializeToString(), False)
    if sidecar:  # a sidecar of these very bytes: then the embedded copy must agree with it
        from clock_deploy.artifact import read_metadata, write_metadata
        write_metadata(target, read_metadata(path))

    def load():
        detector = Detector.load(target)
        assert sidecar or detector.meta == json.loads(embedded)
    only_user_errors(load)

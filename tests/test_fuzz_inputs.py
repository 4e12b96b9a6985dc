"""Property-based fuzzing of every reader of user files: only UserError may escape.

The KITTI label reader, the COCO json reader (with the dataset built on it), the config loader,
the calibration manifest reader and the artifact sidecar reader get thousands of generated files
(a few thousand cases in all, a few seconds per reader): near-valid files with one field broken
as well as random bytes. Any other exception (IndexError, UnicodeDecodeError, TypeError, ...)
would reach the user as a traceback and fails the test.
"""
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

# 2,200 cases in the default suite (about 4 s per reader on a quiet machine); CLOCK_DEPLOY_FUZZ_SCALE=20
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


def only_user_errors(call):
    try:
        call()
    except UserError:
        pass


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

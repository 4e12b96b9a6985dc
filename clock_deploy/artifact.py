"""The artifact contract: I/O tensor names and the sidecar `<artifact>.json` next to every exported model.

Export produces artifacts with it, the runtime consumes them; it sits below both and imports
neither torch nor either package.

It is everything a runtime needs to use the artifact without the training code: the
input size and normalization, the class names, the precision and batch profile, and
where the file came from (checkpoint sha256, toolkit / opset / onnxruntime / TensorRT
versions, calibration manifest, parity results). An ONNX also carries the same JSON in
its metadata_props, so a lone .onnx still loads; an engine cannot, so its sidecar must
travel with it.
"""
import datetime
import hashlib
import json
import logging
import math
import os

from clock_deploy import __version__
from clock_deploy.errors import UserError
from clock_deploy.io import atomic_path, file_sha256, read_json, write_json

FORMAT = "clock-deploy-artifact-v1"
PRECISIONS = ("fp32", "fp16", "int8")  # also export.precision's choices (config.py imports them from here)

# the ONNX / TensorRT I/O contract (DESIGN.md, "Export contract")
INPUT_NAME = "images"
OUTPUT_NAMES = ("scores", "labels", "boxes")
OUTPUT_DOC = {
    "scores": "[N, K] float32, sorted high to low",
    "labels": "[N, K] int64, index into classes",
    "boxes": "[N, K, 4] float32 x1, y1, x2, y2 in network-input pixels",
}
REQUIRED_KEYS = ("format", "classes", "input", "topk", "batch", "precision")
SIGNED_KEYS = ("classes", "input", "precision", "topk", "batch")  # what the runtime acts on
HASH_KEYS = ("artifact_sha256", "graph_sha256", "metadata_sha256")  # recomputed whenever metadata is written
EMBEDDED_KEY = "clock_deploy"  # ONNX metadata_props key holding the sidecar's JSON
log = logging.getLogger(__name__)


def sidecar_path(artifact):
    return os.fspath(artifact) + ".json"


def package_versions():
    """Versions of the export toolchain that are importable here (absent ones are left out)."""
    versions = {"clock_deploy": __version__}
    for name in ("torch", "onnx", "onnxruntime", "onnxslim", "tensorrt", "tensorrt_rtx"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        versions[name] = getattr(module, "__version__", "unknown")
    return versions


def input_spec(height, width, mean, std):
    """How raw RGB pixels become the network input: (pixel / divisor - mean) / std after resizing."""
    return {
        "name": INPUT_NAME,
        "layout": "NCHW",
        "dtype": "float32",
        "height": int(height),
        "width": int(width),
        "color": "RGB",
        "resize": "PIL bilinear to height x width, aspect ratio not kept",
        "divisor": 255.0,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }


DEFAULT_DYNAMIC_BATCH = (1, 1, 8)  # TensorRT profile (min, opt, max) of a dynamic-batch model


def parse_batch(value):
    """A batch request -> (min, opt, max) or one int: 'MIN,OPT,MAX', 'N', N, a 3-sequence or None."""
    if value is None or isinstance(value, int):
        return value
    parts = str(value).split(",") if isinstance(value, str) else list(value)
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 3) or min(numbers) < 1:
        raise UserError(f"batch must be N or MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, got '{value}'")
    if len(numbers) == 3 and not numbers[0] <= numbers[1] <= numbers[2]:
        raise UserError(f"batch {value}: needs MIN <= OPT <= MAX")
    return numbers[0] if len(numbers) == 1 else tuple(numbers)


def batch_spec(dynamic, batch=None):
    """Batch sizes an artifact accepts, and its TensorRT optimization profile.

    Dynamic: MIN,OPT,MAX as given; N means 1..N tuned for N; none means 1..8 tuned for 1.
    Static: one batch size (default 1).
    """
    batch = parse_batch(batch)
    if not dynamic:
        if isinstance(batch, tuple) and len(set(batch)) > 1:
            raise UserError(f"batch {','.join(map(str, batch))}: a static-batch model takes one batch size "
                            "(export with export.dynamic_batch for a range)")
        size = batch[0] if isinstance(batch, tuple) else (batch or 1)
        return {"dynamic": False, "min": size, "opt": size, "max": size}
    low, opt, high = (DEFAULT_DYNAMIC_BATCH if batch is None else
                      (1, batch, batch) if isinstance(batch, int) else batch)
    return {"dynamic": True, "min": low, "opt": opt, "max": high}


def engine_batch(onnx_batch, request, onnx_path):
    """The engine's batch spec: the ONNX's, or `request` (--batch) where the ONNX's batch axis allows it."""
    if request is None:
        return onnx_batch
    spec = batch_spec(onnx_batch["dynamic"], request)
    if not onnx_batch["dynamic"] and spec["max"] != onnx_batch["max"]:
        raise UserError(f"{onnx_path}: static batch of {onnx_batch['max']}, so batch {request} cannot be built; "
                        "export it with export.dynamic_batch for other batch sizes")
    return spec


def build_metadata(*, kind, arch, classes, height, width, mean, std, precision, topk, batch,
                   source=None, opset=None, sampling=None, calibration=None, parity=None, **extra):
    """The sidecar dict; `extra` adds sections such as `tensorrt` for engines."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {list(PRECISIONS)}, got '{precision}'")
    meta = {
        "format": FORMAT,
        "kind": kind,
        "arch": arch,
        "classes": list(classes),
        "input": input_spec(height, width, mean, std),
        "outputs": dict(OUTPUT_DOC),
        "topk": int(topk),
        "batch": batch,
        "precision": precision,
        "opset": opset,
        "sampling": sampling,
        "source": source,
        "calibration": calibration,
        "parity": parity,
        "versions": package_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(extra)
    return meta


def metadata_sha256(meta, model_sha256):
    """The integrity hash of an artifact: its model's sha256 together with the metadata the runtime acts
    on (SIGNED_KEYS), so neither the weights nor the class names, their order, the normalization, the
    input size or the precision can change without the check noticing. It guards against mistakes
    (edits, mix-ups, bit rot), not against someone who recomputes it."""
    signed = {"model_sha256": model_sha256, **{k: meta.get(k) for k in SIGNED_KEYS}}
    text = json.dumps(signed, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _unsigned(meta):
    return {k: v for k, v in meta.items() if k not in HASH_KEYS}


def write_metadata(artifact, meta):
    """Write the sidecar of `artifact` (written first), with the artifact's own sha256 so the pair
    cannot silently come apart (a re-export that crashed between the two files, a copy mix-up), and
    the integrity hash over that sha256 and the metadata the runtime acts on."""
    meta, model = _unsigned(meta), file_sha256(artifact)
    write_json(sidecar_path(artifact), {**meta, "artifact_sha256": model,
                                        "metadata_sha256": metadata_sha256(meta, model)})


def _is_number(value, low=None):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return ok and (low is None or value > low)


def _check_fields(meta, path):
    """Types of the fields a runtime uses, so a damaged sidecar fails here and not mid-inference."""
    inp, batch = meta["input"], meta["batch"]
    checks = {
        "classes": (isinstance(meta["classes"], list) and meta["classes"]
                    and all(isinstance(c, str) for c in meta["classes"])),
        "input": isinstance(inp, dict) and all(k in inp for k in ("height", "width", "mean", "std", "divisor")),
        "topk": isinstance(meta["topk"], int) and not isinstance(meta["topk"], bool) and meta["topk"] > 0,
        "batch": isinstance(batch, dict) and all(isinstance(batch.get(k), int) and batch.get(k) > 0
                                                for k in ("min", "opt", "max")),
        "precision": meta["precision"] in PRECISIONS,
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise UserError(f"{path}: invalid '{bad[0]}' entry: {meta[bad[0]]!r}"[:300])
    for key in ("height", "width"):
        if not (isinstance(inp[key], int) and not isinstance(inp[key], bool) and 0 < inp[key] <= 1 << 16):
            raise UserError(f"{path}: input.{key} must be a positive integer, got {inp[key]!r}")
    if not _is_number(inp["divisor"], 0):
        raise UserError(f"{path}: input.divisor must be a positive number, got {inp['divisor']!r}")
    for key in ("mean", "std"):
        values = inp[key]
        if not (isinstance(values, list) and len(values) == 3 and all(_is_number(v, 0 if key == "std" else None)
                                                                     for v in values)):
            raise UserError(f"{path}: input.{key} must be 3 numbers, got {values!r}"[:300])


def graph_sha256(model):
    """sha256 of an ONNX model's graph (nodes and weights), which its metadata_props do not change."""
    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()


def embed_metadata(onnx_path, meta):
    """Store `meta` as JSON under metadata_props[EMBEDDED_KEY] of the ONNX file (rewritten atomically),
    signed with the graph's sha256: the file cannot hold its own sha256, so a lone .onnx is checked by
    its graph."""
    import onnx  # start-up: onnx only when an ONNX file is opened

    model = onnx.load(os.fspath(onnx_path))
    meta, graph = _unsigned(meta), graph_sha256(model)
    meta.update(graph_sha256=graph, metadata_sha256=metadata_sha256(meta, graph))
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        EMBEDDED_KEY: json.dumps(meta, default=str)})
    with atomic_path(onnx_path) as tmp:
        onnx.save(model, tmp)


def _load_onnx(onnx_path):
    import onnx  # start-up: onnx only when an ONNX file is opened

    try:
        return onnx.load(os.fspath(onnx_path), load_external_data=False)
    except Exception as e:  # not an ONNX file: say so rather than pretending the metadata is absent
        raise UserError(f"{onnx_path}: cannot be read as ONNX ({type(e).__name__})") from None


def _embedded(model, onnx_path):
    props = {p.key: p.value for p in model.metadata_props}
    if EMBEDDED_KEY not in props:
        return None
    try:
        return json.loads(props[EMBEDDED_KEY])
    except ValueError:
        raise UserError(f"{onnx_path}: its embedded metadata is not valid JSON") from None


def embedded_metadata(onnx_path):
    """The metadata embedded in an ONNX file, or None."""
    return _embedded(_load_onnx(onnx_path), onnx_path)


def read_metadata(artifact, verify=True):
    """Read and check the sidecar of `artifact` (for an ONNX without one, the copy embedded in it);
    every problem is a UserError naming the file. verify: also check that the sidecar describes this
    very file (its sha256, which reads the whole file); a caller that only describes an artifact it
    has just written can skip that."""
    path = sidecar_path(artifact)
    is_onnx = os.fspath(artifact).endswith(".onnx")
    if os.path.isfile(path):
        meta = _checked(read_json(path), path)
        if verify and os.path.isfile(artifact):
            _verify(meta, path, file_sha256(artifact), "artifact_sha256",
                    f"describes another file than {artifact} (sha256 differs); the model was replaced or "
                    "re-exported without its sidecar")
            if is_onnx:
                _compare_embedded(meta, path, artifact)
        return meta
    model = _load_onnx(artifact) if is_onnx and os.path.isfile(artifact) else None
    embedded = _embedded(model, artifact) if model is not None else None
    if embedded is None:
        room = "" if is_onnx else " (an engine has no room for embedded metadata)"
        raise UserError(f"{artifact}: metadata sidecar {path} is missing{room}; it is written by "
                        "`clock-deploy export` next to the model and must travel with it")
    where = f"{artifact} (embedded metadata)"
    meta = _checked(embedded, where)
    if verify:
        _verify(meta, where, graph_sha256(model), "graph_sha256",
                "does not describe this graph (its sha256 differs); the weights or nodes were changed after export")
    return meta


def _checked(meta, path):
    """The fields a runtime uses are there and well-formed."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a clock-deploy metadata file (expected format '{FORMAT}')")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise UserError(f"{path}: missing keys {missing}")
    _check_fields(meta, path)
    return meta


_warned = set()  # metadata files already reported as unsigned in this process


def _verify(meta, path, model_sha256, model_key, mismatch):
    """The recorded model hash is this model's, and the integrity hash covers these model bytes and this
    metadata. Metadata written before the hashes existed loads with one warning per file."""
    missing = [k for k in (model_key, "metadata_sha256") if not isinstance(meta.get(k), str)]
    if missing:
        if path not in _warned:
            _warned.add(path)
            log.warning(f"{path}: no {' or '.join(missing)} (written by an older clock-deploy): the model and "
                        "its classes, normalization, input size and precision cannot be checked; export again "
                        "to sign them")
        if model_key in missing:
            return
    if meta[model_key] != model_sha256:
        raise UserError(f"{path}: {mismatch}: export again")
    if "metadata_sha256" not in missing and meta["metadata_sha256"] != metadata_sha256(meta, model_sha256):
        raise UserError(f"{path}: was changed after export (its classes, input, precision, topk or batch no "
                        "longer match metadata_sha256): export again rather than editing it")


def _compare_embedded(meta, path, artifact):
    """An ONNX's sidecar and embedded copy must agree on what the runtime acts on."""
    try:
        model = _load_onnx(artifact)
    except UserError:  # not readable as ONNX: the backend names the problem when it loads the file
        return
    embedded = _embedded(model, artifact)
    if embedded is None:  # exported without an embedded copy (or stripped): the sidecar alone describes it
        return
    if not isinstance(embedded, dict):
        raise UserError(f"{artifact}: its embedded metadata is not a metadata mapping (sidecar: {path}); export again")
    for key in SIGNED_KEYS:
        if embedded.get(key) != meta.get(key):
            raise UserError(f"{artifact}: its sidecar and its embedded metadata disagree on '{key}': sidecar "
                            f"{_short(meta.get(key))}, embedded {_short(embedded.get(key))}; export again")


def _short(value, limit=120):
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."

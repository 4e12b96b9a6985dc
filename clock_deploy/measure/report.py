"""Benchmark results -> terminal table, bench.md, bench.csv, bench.json and a Pareto plot.

One row per model x backend that ran; backends that could not run are listed
with the reason, so a missing number is never mistaken for a silent skip.
COCO AP is stored as the evaluator returns it (0..1) and shown in percent,
like KITTI AP (R40), so both read on one scale (clock_deploy/eval/units.py).
The first table (terminal and bench.md) is the README's; bench.md then lists
every column, with the latency spread and the machine load around each
measurement, and warns when the machine was busy.
"""
import csv
import dataclasses
import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from clock_deploy.errors import UserError
from clock_deploy.eval.units import ap_text
from clock_deploy.io import atomic_path, read_json, write_text
from clock_deploy.measure.devices import DeviceProfile


@dataclass
class BenchRow:
    """Measurements of one model on one backend (latency in ms, memory in MiB)."""
    model: str
    backend: str
    artifact: str
    size_mb: float
    images: int                   # images evaluated
    runs: int
    batch: int
    latency_mean: float
    latency_p50: float
    latency_p90: float
    latency_p99: float
    latency_min: float
    latency_max: float
    throughput: float             # images / s
    peak_rss_mb: float            # peak resident memory of the measuring process
    gpu_mem_mb: Optional[float]   # torch: max allocated; TensorRT / onnxruntime: cudaMemGetInfo delta
    mAP: float
    AP50: float
    AP75: float
    kitti_easy: Optional[float]   # mean over the KITTI classes present (R40, percent)
    kitti_moderate: Optional[float]
    kitti_hard: Optional[float]
    metrics: dict = field(default_factory=dict)  # everything the evaluator returned
    arch: str = ""                # model.arch and learnable parameters, for the row label
    params: int = 0
    method: str = ""              # distill.method the model was trained with ("none": not distilled)
    load_before: Optional[float] = None  # 1-minute load average before / after the timed runs
    load_after: Optional[float] = None
    steal_pct: Optional[float] = None    # CPU time the hypervisor took during them (%; None: unknown)
    cpus: Optional[int] = None           # logical CPUs of the machine (what the load is relative to)
    layers: Optional[str] = None  # TensorRT engines: layers per precision "int8/fp16/fp32" (engine_report)


@dataclass
class NotRun:
    """A model x backend combination that did not run; model None = every model."""
    backend: str
    reason: str
    model: Optional[str] = None


def _text(v):
    return str(v)


def _fixed(digits):
    return lambda v: f"{v:.{digits}f}"


def _ap(key):
    return lambda v: ap_text(key, v)


# (row key, title, display format); CSV and JSON keep the raw values. "label" and "latency_spread"
# are derived from the row (see values()).
COLUMNS = [
    ("label", "model", _text),
    ("backend", "backend", _text),
    ("size_mb", "size MB", _fixed(1)),
    ("latency_mean", "mean ms", _fixed(2)),
    ("latency_p50", "p50 ms", _fixed(2)),
    ("latency_p90", "p90 ms", _fixed(2)),
    ("latency_p99", "p99 ms", _fixed(2)),
    ("latency_spread", "p99/p50", _fixed(2)),
    ("throughput", "img/s", _fixed(1)),
    ("peak_rss_mb", "peak RSS MB", _fixed(0)),
    ("gpu_mem_mb", "GPU MB", _fixed(0)),
    ("mAP", "mAP", _ap("mAP")),
    ("AP50", "AP50", _ap("AP50")),
    ("AP75", "AP75", _ap("AP75")),
    ("kitti_easy", "KITTI easy", _ap("kitti")),
    ("kitti_moderate", "KITTI mod", _ap("kitti")),
    ("kitti_hard", "KITTI hard", _ap("kitti")),
    ("load_before", "load before", _fixed(1)),
    ("load_after", "load after", _fixed(1)),
    ("steal_pct", "steal %", _fixed(1)),
    ("layers", "layers int8/fp16/fp32", _text),
]
# the summary: the terminal's table and the first one of bench.md, in the README's layout;
# GPU memory joins it when it was measured
SUMMARY_KEYS = ("label", "backend", "size_mb", "latency_p50", "latency_p99", "throughput", "peak_rss_mb",
                "gpu_mem_mb", "mAP", "AP50", "kitti_easy", "kitti_moderate", "kitti_hard")
SUMMARY_FORMATS = {"latency_p50": _fixed(1), "latency_p99": _fixed(1)}
TEXT_KEYS = ("label", "backend")  # left-aligned; every other column is a number
CSV_FIELDS = (["model"] + [key for key, _, _ in COLUMNS if key != "label"]
              + ["cpus", "latency_min", "latency_max", "runs", "batch", "images", "artifact", "arch", "params",
                 "method"])
UNITS_NOTE = ("Latency: one forward of a preprocessed batch of `--batch` images (ms); mAP / AP50 / AP75: "
              "COCO AP in %; KITTI: AP R40 in %, mean over the KITTI classes with ground truth; "
              "layers: a TensorRT engine's layers running in INT8 / FP16 / FP32 (its sidecar's precision report); "
              "-: not measured (GPU memory on a CPU), no ground truth at that difficulty, or not an engine.")
LOAD_NOTE = ("p99/p50: latency spread (1.0 = every run alike); load before / after: the machine's 1-minute "
             "load average around the timed runs (the bench itself adds up to its thread count); steal %: "
             "CPU time a hypervisor took from this machine during them.")
ARCH_NAMES = {"dino": "DINO", "deformable_detr": "Deformable DETR", "dab_detr": "DAB-DETR", "rt_detr": "RT-DETR"}
METHOD_NAMES = {"clock": "CLoCK", "kd_detr": "KD-DETR", "fgd": "FGD", "gt_denoise": "GT denoising"}
BUSY_STEAL_PCT = 5.0   # more stolen CPU time than this: a noisy virtual machine
UNSTEADY_SPREAD = 2.0  # p99 above this multiple of p50: latency was unsteady


def as_dict(row):
    return dataclasses.asdict(row) if dataclasses.is_dataclass(row) else dict(row)


def _missing(value):
    return value is None or (isinstance(value, float) and math.isnan(value))


def _json_safe(value):
    """NaN (e.g. KITTI AP of a difficulty without ground truth) -> None: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def model_label(row):
    """'teacher (DINO, 4.4 M params)', '+ CLoCK' for a distilled model; the name alone when unknown."""
    row = as_dict(row)
    if not row.get("arch"):
        return row["model"]
    parts = [ARCH_NAMES.get(row["arch"], row["arch"]), f"{row.get('params', 0) / 1e6:.1f} M params"]
    if row.get("method") not in (None, "", "none"):
        parts.append(METHOD_NAMES.get(row["method"], row["method"]))
    return f"{row['model']} ({', '.join(parts)})"


def values(rows):
    """The rows as dicts with the derived display values: `label` (the model's description on its
    first row, its name on the next ones) and `latency_spread` (p99 / p50)."""
    out, seen = [], set()
    for row in map(as_dict, rows):
        p50, p99 = row.get("latency_p50"), row.get("latency_p99")
        spread = p99 / p50 if not _missing(p50) and not _missing(p99) and p50 > 0 else None
        out.append({**row, "label": row["model"] if row["model"] in seen else model_label(row),
                    "latency_spread": spread})
        seen.add(row["model"])
    return out


def summary_columns(rows):
    """The README's columns (+ GPU MB when some row measured it), one decimal for latency."""
    gpu = any(not _missing(as_dict(r).get("gpu_mem_mb")) for r in rows)
    return [(key, title, SUMMARY_FORMATS.get(key, fmt)) for key, title, fmt in COLUMNS
            if key in SUMMARY_KEYS and (gpu or key != "gpu_mem_mb")]


def cells(row, columns=None):
    """Display strings of one row (a dict from values(), or a BenchRow), '-' where a value is missing
    (GPU memory on a CPU, KITTI AP of a difficulty without ground truth)."""
    row = as_dict(row)
    if "label" not in row:
        row = values([row])[0]
    return [("-" if _missing(row.get(key)) else fmt(row[key])) for key, _, fmt in columns or COLUMNS]


def load_warnings(rows):
    """Warnings for measurements taken on a busy machine or with unsteady latency, for the reader
    to judge the numbers by."""
    rows = values(rows)
    warnings = []
    busy = [r for r in rows if _busy(r)]
    if busy:
        loads = [v for r in busy for v in (r.get("load_before"), r.get("load_after")) if not _missing(v)]
        steals = [r["steal_pct"] for r in busy if not _missing(r.get("steal_pct"))]
        cpus = max((r["cpus"] for r in busy if r.get("cpus")), default="?")
        detail = f"1-minute load average up to {max(loads, default=0):.1f} on {cpus} CPUs"
        if steals and max(steals) >= BUSY_STEAL_PCT:
            detail += f", CPU steal up to {max(steals):.0f}%"
        warnings.append(f"the machine was not quiet during {len(busy)} of {len(rows)} measurements ({detail}): "
                        "their latencies are likely inflated; measure again on an idle machine")
    unsteady = [r for r in rows if not _missing(r["latency_spread"]) and r["latency_spread"] > UNSTEADY_SPREAD]
    if unsteady:
        worst = max(r["latency_spread"] for r in unsteady)
        warnings.append(f"p99 latency is more than {UNSTEADY_SPREAD:g}x p50 in {len(unsteady)} of {len(rows)} "
                        f"measurements (up to {worst:.1f}x): latency was unsteady")
    return warnings


def _busy(row):
    """Other work ran beside the measurement: a load average above the CPU count (the bench's own
    threads never exceed it) or a hypervisor stealing CPU time."""
    loads = [v for v in (row.get("load_before"), row.get("load_after")) if not _missing(v)]
    overloaded = bool(loads and row.get("cpus") and max(loads) > row["cpus"])
    return overloaded or (not _missing(row.get("steal_pct")) and row["steal_pct"] >= BUSY_STEAL_PCT)


def describe_not_run(item):
    item = as_dict(item)
    who = "all models" if item.get("model") is None else item["model"]
    return f"{item['backend']} ({who}): {item['reason']}"


# ---------------------------------------------------------------- markdown / csv / json

def _md_table(header, body):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def _results_table(rows, columns):
    """A results table with its numbers right-aligned, as in the README."""
    lines = _md_table([title for _, title, _ in columns], [cells(r, columns) for r in rows]).split("\n")
    lines[1] = "|" + "|".join("---" if key in TEXT_KEYS else "---:" for key, _, _ in columns) + "|"
    return "\n".join(lines)


def markdown(rows, not_run, profile, settings, plot_name=None):
    parts = ["# clock-deploy bench", "", "## Device", "",
             _md_table(["", ""], profile.header()), ""]
    parts += [f"> **warning:** {w}" for w in profile.warnings]
    if profile.warnings:
        parts.append("")
    parts += ["## Settings", "", _md_table(["", ""], [(k, v) for k, v in settings.items()]), "",
              "## Results", ""]
    if rows:
        shown, summary = values(rows), summary_columns(rows)
        parts += [_results_table(shown, summary), "",
                  UNITS_NOTE, ""]
        warnings = load_warnings(rows)
        parts += [f"> **warning:** {w}" for w in warnings] + ([""] if warnings else [])
        parts += ["### Every measurement", "",
                  _results_table(shown, COLUMNS), "", LOAD_NOTE, ""]
    else:
        parts += ["No model x backend combination ran.", ""]
    parts += ["## Not run", ""]
    parts += [f"- {describe_not_run(item)}" for item in not_run] or ["Every requested combination ran."]
    parts.append("")
    if plot_name and rows:
        parts += ["## Latency vs accuracy", "", f"![Pareto plot: p50 latency vs mAP]({plot_name})", ""]
    return "\n".join(parts)


def csv_text(rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in values(rows):
        writer.writerow({k: ("" if _missing(v) else v) for k, v in row.items()})
    return buffer.getvalue()


def json_data(rows, not_run, profile, settings):
    return _json_safe({
        "device": dataclasses.asdict(profile),
        "settings": dict(settings),
        "results": [as_dict(r) for r in rows],
        "not_run": [as_dict(item) for item in not_run],
    })


# ---------------------------------------------------------------- Pareto plot

def pareto_front(points):
    """Indices of the (latency, accuracy) points no other point beats on both, by rising latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


PLOT_SIZE_IN = (8, 5)
PLOT_DPI = 100
MARKERS = "osD^vPX*<>"


def write_pareto_png(path, rows, title="latency vs accuracy"):
    """Scatter of p50 latency (log axis) vs COCO mAP with the Pareto front.

    Colour = model, marker = backend, keyed by a legend outside the axes: points of one model
    cluster (torch / onnx often within a few percent), where text labels would overlap.
    """
    # start-up: matplotlib takes over a second to import, and only the plot needs it
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed (before pyplot is imported)
    # start-up: as matplotlib above
    from matplotlib import pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    # COCO reports -1 when the split has no ground truth: such a row has no place on the accuracy axis
    rows = [r for r in map(as_dict, rows) if not _missing(r["mAP"]) and r["mAP"] >= 0]
    models = list(dict.fromkeys(r["model"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    colours = plt.get_cmap("tab10")
    points = [(r["latency_p50"], 100 * r["mAP"]) for r in rows]

    fig, ax = plt.subplots(figsize=PLOT_SIZE_IN, dpi=PLOT_DPI)
    front = [points[i] for i in pareto_front(points)]
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="grey", linestyle="--",
                linewidth=1, zorder=2)
    for r, (x, y) in zip(rows, points):
        ax.scatter(x, y, s=70, color=colours(models.index(r["model"]) % 10), edgecolors="white", linewidths=0.8,
                   marker=MARKERS[backends.index(r["backend"]) % len(MARKERS)], alpha=0.9, zorder=3)
    # latency spans orders of magnitude (TensorRT INT8 vs a PyTorch teacher): a log axis keeps every
    # point readable; plain numbers on the ticks, not 10^x
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(4.0, 6.0, 7.0, 8.0, 9.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.08, y=0.1)
    handles = [Patch(color=colours(i % 10), label=m) for i, m in enumerate(models)]
    handles += [Line2D([], [], color="dimgrey", marker=MARKERS[i % len(MARKERS)], linestyle="", markersize=8, label=b)
                for i, b in enumerate(backends)]
    handles.append(Line2D([], [], color="grey", linestyle="--", label="Pareto front"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
              title="colour: model\nmarker: backend", title_fontsize=8, alignment="left")
    ax.set_xlabel("latency p50 (ms, log scale)")
    ax.set_ylabel("COCO mAP (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a fixed canvas size: no bbox_inches="tight"
        fig.savefig(tmp, format="png", dpi=PLOT_DPI)
    plt.close(fig)


# ---------------------------------------------------------------- terminal + all files

def rich_table(rows, title=None):
    """The summary table (README layout) for the terminal; bench.md / bench.csv have every column."""
    table = Table(title=Text(title) if title else None)
    columns = summary_columns(rows)
    for key, header, _ in columns:
        table.add_column(header, justify="left" if key in TEXT_KEYS else "right", no_wrap=True)
    for row in values(rows):
        table.add_row(*(Text(c) for c in cells(row, columns)))  # Text: "a[b]" is not rich markup
    return table


def print_report(rows, not_run, profile, console=None):
    """The results table, device warnings and the not-run list in the terminal."""
    console = console or Console()
    table = rich_table(rows, title=f"bench on {profile.kind}: {profile.name} ({profile.threads} threads)")
    # numbers cut to "1…" are useless: a table wider than the terminal wraps instead
    needed = Measurement.get(console, console.options.update_width(10_000), table).maximum
    width = console.width
    console.width = max(width, needed)
    try:
        console.print(table)
    finally:
        console.width = width
    console.print(UNITS_NOTE, style="dim", markup=False)
    for warning in profile.warnings + load_warnings(rows):
        console.print(f"warning: {warning}", style="bold yellow", markup=False)
    for item in not_run:  # reasons hold "[trt]" etc.: print them as plain text, not markup
        console.print(f"not run: {describe_not_run(item)}", style="yellow", markup=False)


REPORT_FILES = {"md": "bench.md", "csv": "bench.csv", "json": "bench.json", "png": "pareto.png"}


def write_reports(out_dir, rows, not_run, profile, settings):
    """Write every report file into out_dir (each atomically); returns {kind: path}."""
    paths = {kind: os.path.join(out_dir, name) for kind, name in REPORT_FILES.items()}
    if rows:
        write_pareto_png(paths["png"], rows, title=f"{profile.kind}: {profile.name}")
    else:  # nothing to plot; a plot left by an earlier run would describe other results
        if os.path.exists(paths["png"]):
            os.remove(paths["png"])
        del paths["png"]
    write_text(paths["md"], markdown(rows, not_run, profile, settings, REPORT_FILES["png"]))
    write_text(paths["csv"], csv_text(rows))
    write_text(paths["json"], json.dumps(json_data(rows, not_run, profile, settings), indent=2, allow_nan=False) + "\n")
    return paths


def read_reports(out_dir):
    """(rows, not_run, profile, settings, files) of the reports write_reports left in out_dir, as
    BenchResult takes them; files is {} when they are missing or unreadable (written by another version)."""
    paths = {kind: os.path.join(out_dir, name) for kind, name in REPORT_FILES.items()}
    paths = {kind: path for kind, path in paths.items() if os.path.exists(path)}
    try:
        data = read_json(paths["json"]) if "md" in paths else {}
        rows = [BenchRow(**row) for row in data["results"]]
        not_run = [NotRun(**item) for item in data["not_run"]]
        return rows, not_run, DeviceProfile(**data["device"]), data["settings"], paths
    except (KeyError, TypeError, UserError):
        return [], [], None, {}, {}

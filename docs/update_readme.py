"""Write the README's result tables from the results files they quote.

    python docs/update_readme.py           # rewrite the tables between the README's markers
    python docs/update_readme.py --check   # exit 1 when the README and the results files disagree (a test runs this)

The demo table is the Results table of docs/demo/bench.md (the bench report of `clock-deploy pipeline --cfg
configs/demo/pipeline.yaml`, copied from runs/demo/bench/); the gains table is read from the distillation
A/B's summary (studies/results/distill_ab.json) for the families it has finished, else from the archived study's
report; the export table is clock_deploy/export/formats.py's, which `clock-deploy export` checks.
"""
import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DEMO_REPORT = "docs/demo/bench.md"
DEMO_MINUTES = "docs/demo/stage_minutes.json"  # runs/demo/stage_minutes.json of the same run
DEMO_AVX2 = "docs/demo/avx2/bench.md"  # the same demo rerun with AVX2-only CPU kernels (KERNELS_AVX2)
KERNELS_AVX2 = "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2"
GAINS_SUMMARY = "studies/results/distill_ab.json"  # the A/B of the current code (studies/distill_ab.py)
GAINS_REPORT = "studies/results/distill_ab.md"
ARCHIVED_REPORT = "studies/archive/distill_ab/report.md"  # quoted for a family until the A/B has finished it
# each demo's distill stage against its baseline at the demo's budget, paired seeds (studies/distill_demo.py)
DEMO_GAIN_REPORTS = {"dino": ("configs/demo/pipeline.yaml", "studies/results/distill_demo.md"),
                     "rt_detr": ("configs/demo/rt_detr_pipeline.yaml", "studies/results/distill_demo_rt_detr.md")}
FAMILY_NAMES = {"rt_detr": "RT-DETR", "dino": "DINO", "deformable_detr": "Deformable DETR", "dab_detr": "DAB-DETR"}
# the archived report's row of each distiller; FGD ran on DINO only, under its second teacher (row suffix -t1)
ARCHIVED_ROWS = {"clock": "clock", "kd_detr": "kd_detr", "fgd": "fgd-t1"}


def _read(relpath):
    with open(os.path.join(ROOT, relpath)) as f:
        return f.read()


def _section(text, heading):
    """The text of a markdown section from `heading` up to the next heading of the same level."""
    level = heading.split(" ")[0]
    match = re.search(rf"^{re.escape(heading)}\n(.*?)(?=^{level} |\Z)", text, re.S | re.M)
    if not match:
        raise SystemExit(f"no section '{heading}'")
    return match.group(1)


def _table_rows(text):
    return [line for line in text.splitlines() if line.startswith("|")]


def _cells(row):
    """'| a | b |' -> ['a', 'b']."""
    return [c.strip() for c in row.strip("|").split("|")]


def demo_time():
    """The demo's minutes per stage, from the run whose bench report is docs/demo/bench.md."""
    minutes = json.loads(_read(DEMO_MINUTES))
    stages = ", ".join(f"{name} {value:.1f}" for name, value in minutes.items())
    return [f"On the machine of the table below the demo took {sum(minutes.values()):.0f} minutes ({stages}; "
            f"[{DEMO_MINUTES}]({DEMO_MINUTES})). A loaded machine takes longer, about in proportion to the load."]


def demo_table():
    report = _read(DEMO_REPORT)
    rows = _table_rows(_section(report, "## Results").split("\n\n###")[0])
    device = dict(re.findall(r"^\| (name|threads) \| (.*?) \|$", report, re.M))
    lines = [f"The table `clock-deploy pipeline --cfg configs/demo/pipeline.yaml` printed on {device.get('name', '?')}"
             f" (threads: {device.get('threads', '?')}); every column, the latency spread and the machine's load are in"
             f" [{DEMO_REPORT}]({DEMO_REPORT}).", ""] + rows
    not_run = _section(report, "## Not run").strip()
    if not_run:
        names = [line.split(" (")[0].lstrip("- ") for line in not_run.splitlines() if line.startswith("- ")]
        lines += ["", f"Not run on a CPU: {', '.join(names)} (they need an NVIDIA GPU and TensorRT)."]
    return lines + ["", "mAP / AP50: COCO AP in %; KITTI: AP R40 in %, mean over Car / Pedestrian / Cyclist; latency: "
                        "one forward of a preprocessed 128x416 image.", ""] + kernel_spread()


def _accuracy_rows(report):
    """{(model, backend): (mAP, KITTI mod)} of a bench report's Results table (model names without details)."""
    rows, model = {}, None
    for line in _table_rows(_section(report, "## Results").split("\n\n###")[0])[2:]:
        cells = _cells(line)
        model = cells[0].split(" (")[0] or model
        rows[model, cells[1]] = (float(cells[7]), float(cells[10]))
    return rows


def kernel_spread():
    """How far the demo's accuracy moved when rerun with another CPU kernel set (DEMO_AVX2)."""
    if not os.path.exists(os.path.join(ROOT, DEMO_AVX2)):
        return ["How much these numbers move on another CPU was not measured."]
    base, other = _accuracy_rows(_read(DEMO_REPORT)), _accuracy_rows(_read(DEMO_AVX2))
    moved = {key: (other[key][0] - v[0], other[key][1] - v[1]) for key, v in base.items() if key in other}
    per_model = {}
    for (model, _), (d_map, d_mod) in moved.items():
        m = per_model.setdefault(model, [0.0, 0.0])
        m[0], m[1] = max(m[0], abs(d_map)), max(m[1], abs(d_mod))
    text = "; ".join(f"{model} up to {m[0]:.1f} mAP / {m[1]:.1f} KITTI Mod points" for model, m in per_model.items())
    return [f"Between CPUs the trained weights, and so the accuracy columns, move: the same demo rerun with AVX2-only "
            f"kernels (`{KERNELS_AVX2}`, as a CPU without AVX-512 runs it; [{DEMO_AVX2}]({DEMO_AVX2})) moved {text}. "
            "Latency columns are this machine's."]


def _gain_cell(stat, scale=100.0):
    """'+4.8 [+2.9, +6.7]' of a summary's paired gain (scaled to points); '-' where nothing was measured."""
    if not stat:
        return "-"
    return f"{scale * stat['mean']:+.1f} [{scale * stat['ci'][0]:+.1f}, {scale * stat['ci'][1]:+.1f}]"


def _current_row(family, entry):
    """A family's row from the A/B of the current code (its summary json)."""
    gain = {variant: entry["gain"].get(variant, {}) for variant in ("clock", "kd_detr", "fgd")}
    return [FAMILY_NAMES[family], _gain_cell(gain["clock"].get("mAP")),
            _gain_cell(gain["clock"].get("kitti_moderate"), 1.0), _gain_cell(entry["clock_minus"].get("gt_denoise")),
            _gain_cell(gain["kd_detr"].get("mAP")), _gain_cell(gain["fgd"].get("mAP")), str(entry["seeds"]),
            f"[A/B]({GAINS_REPORT})"]


def _archived_row(family, report):
    """A family's row from the archived study (its CLoCK predates the A/B's; no no-teacher control)."""
    rows = {cells[0]: cells for cells in map(_cells, _table_rows(_section(report, f"### {family}")))}

    def cell(variant, column=4, scale=100.0):
        cells = rows.get(ARCHIVED_ROWS[variant])
        if cells is None:
            return "-"
        return f"{scale * float(cells[column].split(' +- ')[0]):+.1f} {_interval(cells[column + 1], scale)}"
    return [FAMILY_NAMES[family], cell("clock"), cell("clock", 8, 1.0), "-", cell("kd_detr"), cell("fgd"),
            rows["clock"][1], f"[archived]({ARCHIVED_REPORT})"]


def gains_table():
    """One row per family: from the A/B of the current code where it has finished the family (every variant at
    the family's seeds), else from the archived study."""
    summary = json.loads(_read(GAINS_SUMMARY))
    archived = _read(ARCHIVED_REPORT)
    budget = summary["budget"]
    lines = ["| student | CLoCK, mAP | CLoCK, KITTI Mod | CLoCK minus its no-teacher control, mAP | KD-DETR, mAP | "
             "FGD, mAP | seeds | study |", "|---|---|---|---|---|---|---:|---|"]
    for family in FAMILY_NAMES:
        entry = summary["families"].get(family)
        if entry and entry["complete"]:
            lines.append("| " + " | ".join(_current_row(family, entry)) + " |")
        elif f"### {family}" in archived:
            lines.append("| " + " | ".join(_archived_row(family, archived)) + " |")
    slow = ", ".join(f"{FAMILY_NAMES[f]} {n}x" for f, n in budget["schedule"].items())
    clock = summary.get("clock") or {}  # absent in a summary written before the study recorded it
    unshipped = _unshipped(clock.get("overrides") or [])
    return lines + ["", f"Gain over the baseline student in points, 95% CI in brackets. Budget: "
                        f"{budget['train_images']} synthetic training images x {budget['epochs']} epochs per student "
                        f"({slow} the epochs), test split of {budget['test_images']} new scenes. The no-teacher "
                        "control trains CLoCK's extra query group on the ground truth alone, so CLoCK minus it is "
                        "what the teacher adds. `A/B`: the current code ([studies/results/distill_ab.md]"
                        "(studies/results/distill_ab.md): pass rule, every variant; `python -m studies.distill_ab`, "
                        "hours of CPU, resumable); `archived`: the CLoCK of an earlier study, before the changes "
                        "its findings led to, quoted until the A/B has finished that family."
                        + (f" The A/B's CLoCK is candidate {clock['candidate']}, chosen on a tuning split: "
                           f"{', '.join(f'`{o}`' for o in unshipped)} on top of the shipped distill config, which "
                           "becomes the default when the A/B is finished; add it to get the measured CLoCK."
                           if unshipped else "")]


def _unshipped(overrides):
    """The overrides of the A/B's CLoCK that the shipped CLoCK config (configs/demo/distill.yaml) does not hold."""
    from clock_deploy.config import load_config  # torch-free, but only this table needs the config schema

    path = os.path.join(ROOT, "configs/demo/distill.yaml")
    shipped = load_config(path)
    return [o for o in overrides if load_config(path, [o]) != shipped]


def demo_gain():
    """What each demo's distill stage gains at the demo's budget, from its paired-seed study."""
    lines = []
    for family, paths in DEMO_GAIN_REPORTS.items():
        lines += ([""] if lines else []) + [_demo_gain_line(family, *paths)]
    return lines


def _demo_gain_line(family, pipeline, path):
    name = FAMILY_NAMES[family]
    report = _read(path) if os.path.isfile(os.path.join(ROOT, path)) else ""
    verdict = re.search(r"^Verdict on (\d+) paired seeds: .*$", report, re.M)
    rows = [_cells(r) for r in _table_rows(_section(report, f"### {family}"))] if verdict else []
    clock = next((cells for cells in rows if cells[0] == "clock"), None)
    if clock is None:
        return (f"At the {name} demo's budget (`{pipeline}`) no paired measurement has finished yet: its distilled "
                f"row is one seed and can land below its baseline (`python -m studies.distill_demo --family "
                f"{family}`).")
    gain, mod = float(clock[3].split(" +- ")[0]), float(clock[7].split(" +- ")[0])
    gains = "distillation gains at the demo's budget" in verdict.group(0)
    losses = [what for what, ci in (("mAP", clock[4]), ("KITTI Moderate AP", clock[8]))
              if float(ci.strip("[]").split(",")[1]) < 0]  # the whole interval below 0
    return (f"At the {name} demo's own budget (`{pipeline}`: its student and shipped CLoCK config, "
            f"{verdict.group(1)} paired seeds, scored on 400 new scenes) CLoCK minus the baseline is "
            f"{100 * gain:+.1f} mAP points, 95% CI {_interval(clock[4], 100)}, and {mod:+.1f} KITTI Mod points, CI "
            f"{_interval(clock[8])}: "
            + ("distillation gains there." if gains else "**distillation is not shown to gain there**"
               + (f" and it costs {' and '.join(losses)}" if losses else "")
               + "; its distilled row (one seed) can land below its baseline.")
            + f" [{path}]({path})")


def export_table():
    """clock_deploy.export.formats.FORMATS, the table `clock-deploy export` checks its flags against."""
    from clock_deploy.export.formats import FORMATS, OPTIONS
    from clock_deploy.naming import CLI, option

    flags = {"fp32": "", "fp16": "--fp16", "int8": "--int8 --calib MANIFEST"}
    lines = ["| precision | writes | flags | needs besides the checkpoint |", "|---|---|---|---|"]
    for f in FORMATS:
        flag = " ".join(x for x in (flags[f.precision], f"--trt --builder {f.builder}" if f.builder else "") if x)
        lines.append(f"| {f.precision} | {f.files} | `{flag or '(none)'}` | {', '.join(f.needs) or '-'} |")
    scoped = sorted({(scope.text, key) for key, scope in OPTIONS.items()})
    by_scope = {}
    for text, key in scoped:
        by_scope.setdefault(text, []).append(f"`{option(key, via=CLI)}`")
    return lines + ["", "Options that only some exports take (any other combination is refused before any work): "
                    + "; ".join(f"{', '.join(keys)}: {text}" for text, keys in by_scope.items()) + "."]


def _interval(ci, scale=1.0):
    """'[0.0585, 0.0768]' -> '[+5.9, +7.7]' with scale 100 (fractions to points)."""
    low, high = (scale * float(v) for v in ci.strip("[]").split(","))
    return f"[{low:+.1f}, {high:+.1f}]"


TABLES = {"demo-time": demo_time, "demo-table": demo_table, "demo-gain": demo_gain, "gains-table": gains_table,
          "export-table": export_table}


def updated(readme):
    for name, build in TABLES.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start not in readme or end not in readme:
            raise SystemExit(f"README.md has no {start} ... {end} markers")
        head, rest = readme.split(start, 1)
        readme = head + start + "\n" + "\n".join(build()) + "\n" + end + rest.split(end, 1)[1]
    return readme


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if the README is stale")
    args = parser.parse_args(argv)
    with open(README) as f:
        readme = f.read()
    new = updated(readme)
    if args.check:
        if new != readme:
            print("README.md's tables differ from the results files: run python docs/update_readme.py")
            return 1
        return 0
    with open(README, "w") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())

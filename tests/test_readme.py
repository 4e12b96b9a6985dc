"""The README is a user's guide: short, and every table it quotes is the one its results file holds."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _update_readme():
    spec = importlib.util.spec_from_file_location("update_readme", os.path.join(ROOT, "docs", "update_readme.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_are_the_results_files_tables():
    update = _update_readme()
    with open(update.README) as f:
        readme = f.read()
    assert update.updated(readme) == readme  # python docs/update_readme.py rewrites them


def test_a_changed_number_is_noticed():
    update = _update_readme()
    with open(update.README) as f:
        readme = f.read()
    start = readme.index("<!-- gains-table:start -->")
    row = readme.index("| DINO | ", start)
    tampered = readme[:row] + readme[row:].replace("| DINO | ", "| DINO | 9", 1)
    assert update.updated(tampered) == readme


def test_the_gains_table_quotes_a_family_from_the_ab_once_every_variant_has_its_seeds(monkeypatch):
    update = _update_readme()
    stat = {"n": 6, "mean": 0.048, "ci": [0.029, 0.067], "p": 0.004}
    entry = {"seeds": 6, "complete": True, "machine": "AMD EPYC / AVX512",
             "gain": {"clock": {"mAP": stat, "kitti_moderate": {**stat, "mean": 6.4, "ci": [3.3, 9.4]}},
                      "kd_detr": {"mAP": {**stat, "mean": 0.012, "ci": [-0.012, 0.036]}, "kitti_moderate": stat}},
             "clock_minus": {"gt_denoise": {**stat, "mean": 0.075, "ci": [0.047, 0.103]}}}
    summary = {"budget": {"train_images": 800, "epochs": 12, "test_images": 400, "schedule": {"dab_detr": 4}},
               "clock": {"candidate": "C3", "overrides": ["distill.mem.weighting=gt_attention"]},
               "families": {"rt_detr": entry, "dino": {**entry, "seeds": 8, "complete": False}}}
    read = update._read
    monkeypatch.setattr(update, "_read", lambda path: json.dumps(summary) if path == update.GAINS_SUMMARY
                        else read(path))
    rows = {line.split(" | ")[0][2:]: line for line in update.gains_table() if line.startswith("| ")}
    assert rows["RT-DETR"] == ("| RT-DETR | +4.8 [+2.9, +6.7] | +6.4 [+3.3, +9.4] | +7.5 [+4.7, +10.3] | "
                               "+1.2 [-1.2, +3.6] | - | 6 | [A/B](studies/results/distill_ab.md) |")
    assert rows["DINO"].endswith("| 8 | [archived](studies/archive/distill_ab/report.md) |")  # not finished yet
    assert rows["DINO"].startswith("| DINO | +0.8 [-0.6, +2.2] | -1.2 [-3.1, +0.7] | - |")
    # the measured CLoCK's settings are named while the shipped config lacks them, and not once it holds them
    assert "`distill.mem.weighting=gt_attention` on top of the shipped distill config" in update.gains_table()[-1]
    summary["clock"]["overrides"] = ["distill.mem.weighting=gt"]  # the shipped default
    assert "on top of the shipped distill config" not in update.gains_table()[-1]


def test_readme_is_a_guide_not_a_notebook():
    with open(os.path.join(ROOT, "README.md")) as f:
        lines = f.read().splitlines()
    assert len(lines) <= 300


@pytest.mark.parametrize("minutes_file,config", [("docs/demo/stage_minutes.json", "configs/demo/pipeline.yaml"),
                                                 ("docs/demo/rt_detr/stage_minutes.json",
                                                  "configs/demo/rt_detr_pipeline.yaml")])
def test_a_demo_config_gives_its_measured_time(minutes_file, config):
    import re

    with open(os.path.join(ROOT, minutes_file)) as f:
        minutes = round(sum(json.load(f).values()))
    with open(os.path.join(ROOT, config)) as f:
        said = re.search(r"about (\d+) minutes", f.read())
    assert said and int(said.group(1)) == minutes

"""The README is a user's guide: short, and every table it quotes is the one its results file holds."""
import importlib.util
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
    row = readme.index("| DINO | CLoCK |", start)
    tampered = readme[:row] + readme[row:].replace("| DINO | CLoCK | ", "| DINO | CLoCK | 9", 1)
    assert update.updated(tampered) == readme


def test_readme_is_a_guide_not_a_notebook():
    with open(os.path.join(ROOT, "README.md")) as f:
        lines = f.read().splitlines()
    assert len(lines) <= 300


@pytest.mark.parametrize("minutes_file,config", [("docs/demo/stage_minutes.json", "configs/demo/pipeline.yaml"),
                                                 ("docs/demo/rt_detr/stage_minutes.json",
                                                  "configs/demo/rt_detr_pipeline.yaml")])
def test_a_demo_config_gives_its_measured_time(minutes_file, config):
    import json
    import re

    with open(os.path.join(ROOT, minutes_file)) as f:
        minutes = round(sum(json.load(f).values()))
    with open(os.path.join(ROOT, config)) as f:
        said = re.search(r"about (\d+) minutes", f.read())
    assert said and int(said.group(1)) == minutes

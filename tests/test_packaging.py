"""Packaging: metadata in pyproject.toml only, torch as a range with the tested wheel pinned in
constraints.txt, and CI running the README's test command verbatim."""
import os
import re

import pytest

import clock_deploy

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_metadata_lives_in_pyproject_with_torch_as_a_range():
    assert not os.path.exists(os.path.join(ROOT, "setup.cfg"))
    project = tomllib.loads(_read("pyproject.toml"))
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "clock_deploy.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", clock_deploy.__version__)
    torch = [d for d in project["project"]["dependencies"] if re.match(r"torch\b", d)]
    assert torch == ["torch>=2.4"]  # never an exact pin: it would replace a CUDA / JetPack torch
    assert "torch==" in _read("constraints.txt")


def test_ci_runs_the_readme_commands_with_the_constraints():
    readme, ci = _read("README.md"), _read(".ci/run")
    commands = [line for line in readme.splitlines() if line.startswith("pip install -e ")][:2]
    assert len(commands) == 2 and all("-c constraints.txt" in c for c in commands)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in ci.splitlines() and "ruff check" in ci


def test_only_the_product_is_installed_and_tests_find_the_studies_from_the_root():
    project = tomllib.loads(_read("pyproject.toml"))
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["clock_deploy*"]
    assert project["tool"]["pytest"]["ini_options"]["pythonpath"] == ["."]

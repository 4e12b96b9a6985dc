"""docs/DESIGN.md is the map of the code: every module of clock_deploy/ has its line in the Layout block."""
import os
import re

import clock_deploy

PACKAGE = os.path.dirname(clock_deploy.__file__)
ROOT = os.path.dirname(PACKAGE)


def _layout_block():
    with open(os.path.join(ROOT, "docs", "DESIGN.md")) as f:
        text = f.read()
    return re.search(r"## Layout\n.*?```\n(.*?)```", text, re.S).group(1)


def _listed(block):
    """Module paths the block names at the start of a line ('training/trainer.py', 'cli.py')."""
    return {line.split()[0] for line in block.splitlines() if line.strip() and line.split()[0].endswith(".py")}


def _modules():
    found = set()
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        rel = os.path.relpath(folder, PACKAGE)
        for name in files:
            if name.endswith(".py") and not (rel != "." and name == "__init__.py"):
                found.add(name if rel == "." else f"{rel}/{name}")
    return found


def test_design_lists_every_module_and_no_ghost():
    listed, modules = _listed(_layout_block()), _modules()
    assert "training/trainer.py" in modules  # the walk sees the package
    assert sorted(modules - listed) == []  # a module without its line in DESIGN.md
    assert sorted(listed - modules) == []  # a line for a module that is gone


def test_the_layout_reader_reads_lines():
    assert _listed("cli.py   the command line\ntraining/\n  training/ema.py  EMA\n") == {"cli.py", "training/ema.py"}

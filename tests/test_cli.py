import subprocess
import sys

import click
import pytest

from clock_deploy.cli import COMMANDS, run
from clock_deploy.config import load_config


def test_help_lists_every_command_without_importing_torch():
    # the runtime path must stay torch-free: the CLI itself must not pull it in
    code = ("import sys; from clock_deploy.cli import cli; "
            "cli.main(['--help'], standalone_mode=False); "
            "assert 'torch' not in sys.modules, 'cli imported torch'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in COMMANDS:
        assert name in out.stdout


def test_user_error_is_one_line_not_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epocs: 1\n")

    @click.command()
    def broken():
        load_config(str(bad))

    with pytest.raises(SystemExit) as e:
        run(broken, [])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "bad.yaml:2" in err and "train.epocs" in err and "Traceback" not in err

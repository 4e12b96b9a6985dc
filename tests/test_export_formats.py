"""The export options table (export/formats.py): `export --help` prints it, every combination that
cannot work is refused before any work with one line in the user's terms, and config keys of
another model family are named in a warning."""
import logging

import pytest
from click.testing import CliRunner

from clock_deploy.checkpoint import save_checkpoint
from clock_deploy.cli import cli, run
from clock_deploy.config import dump, load_config
from clock_deploy.errors import UserError
from clock_deploy.export.commands import export
from clock_deploy.export.formats import FORMATS, OPTIONS, applies_text, check_options, help_table
from clock_deploy.naming import CLI, CONFIG, option
from clock_deploy.nvidia import BUILDERS


def test_help_prints_the_table_and_each_option_says_where_it_applies():
    text = CliRunner().invoke(export, ["--help"], terminal_width=200).output
    for line in help_table().splitlines():
        assert line.strip() in text
    assert len(FORMATS) == 9 and {f.builder for f in FORMATS} == {None, *BUILDERS}
    helps = {opt: param.help for param in export.params for opt in param.opts}
    for key in OPTIONS:
        flag = option(key, via=CLI)
        assert flag in helps, flag
        assert helps[flag].endswith(applies_text(key)), (flag, helps[flag])


@pytest.mark.parametrize("precision,trt,builder,given,arch,message", [
    ("fp16", False, None, {"workspace_gb": 4.0}, "dino",
     "--workspace-gb 4.0 applies to engines only (--trt), not to this export (--fp16)"),
    ("fp16", False, None, {"exclude_nodes": ["/a/Conv"]}, "dino",
     "--exclude-node /a/Conv applies to INT8 only, not to this export (--fp16)"),
    ("int8", True, "tensorrt-rtx", {"dla_core": 0}, "dino", "--dla-core 0 applies to TensorRT engines only"),
    ("fp32", False, None, {"calib": "c.json"}, "dino", "--calib c.json applies to INT8 or --sensitivity"),
    ("fp32", False, None, {"sampling": "gather"}, "dab_detr",
     "--sampling gather: this dab_detr checkpoint has no deformable attention"),
])
def test_combinations_that_cannot_work_are_one_line_in_cli_terms(precision, trt, builder, given, arch, message):
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        check_options(precision, trt, builder, given, arch, via=CLI)


def test_options_that_fit_pass_and_api_callers_get_argument_names():
    check_options("int8", True, "tensorrt-rtx", {"calib": "c.json", "exclude_nodes": ["n"], "workspace_gb": 1.0,
                                                 "sampling": "gather", "sensitivity": True}, "dino", via=CLI)
    check_options("fp32", False, None, {"calib": "c.json", "sensitivity": True}, "deformable_detr", via=CLI)
    check_options("fp16", False, None, {"sampling": "gather"}, "rt_detr", via=CLI)  # RT-DETR's deformable decoder
    with pytest.raises(UserError, match=r"^sampling='gather': this dab_detr"):
        check_options("fp32", False, None, {"sampling": "gather"}, "dab_detr")
    assert option("sampling", "gather", CONFIG) == "model.sampling=gather"


@pytest.fixture(scope="module")
def dab_checkpoint(tmp_path_factory, make_tiny_student, student_io):
    model, cfg = make_tiny_student("dab_detr")
    path = tmp_path_factory.mktemp("dab") / "dab.pt"
    save_checkpoint(path, model, cfg, student_io.classes, epoch=1, iteration=1)
    return path


@pytest.mark.parametrize("argv,message", [
    (["--fp16", "--int8"], "error: --fp16 and --int8 exclude each other: export one precision per run"),
    (["--sampling", "gather"], "error: --sampling gather: this dab_detr checkpoint has no deformable attention"),
    (["--fp16", "--builder", "tensorrt-rtx"], "error: --builder tensorrt-rtx applies to engines only (--trt)"),
])
def test_cli_refuses_before_writing_anything(dab_checkpoint, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        run(cli, ["export", "--ckpt", str(dab_checkpoint), "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(message) and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_config_keys_of_another_family_are_named_in_a_warning(tmp_path, caplog):
    path = tmp_path / "dab.yaml"
    path.write_text("model:\n  arch: dab_detr\n  dn: {num_queries: 50}\n  dab: {activation: relu}\n")
    with caplog.at_level(logging.WARNING, logger="clock_deploy"):
        cfg = load_config(path, ["model.sampling=gather"])
    warned = [r.getMessage() for r in caplog.records]
    assert cfg.model.arch == "dab_detr" and len(warned) == 2
    assert warned[0] == (f"{path}:3: model.dn.num_queries is read by dino and rt_detr models only; this config's "
                         "model.arch is dab_detr, so it is ignored")
    assert warned[1].startswith("command line 'model.sampling=gather': model.sampling is read by dino, "
                                "deformable_detr and rt_detr models only")


def test_a_saved_config_loads_without_warnings(tmp_path, caplog):
    """config.yaml (as training writes it) lists every key, other families' at their defaults: reading it back,
    as a resumed run does, names nothing; a key of another family set away from its default still warns."""
    path = tmp_path / "config.yaml"
    dump(load_config(None, ["model.arch=dino", "model.dab.activation=relu"]), path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clock_deploy"):
        load_config(path)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "model.dab.activation is read by dab_detr models only" in warned[0]

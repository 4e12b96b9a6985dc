import textwrap

import pytest

from clock_deploy.config import Config, ConfigError, from_dict, load_config, to_dict


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", """
        model:
          arch: dab_detr
          hidden_dim: 128
        train:
          lr: 2.0e-4
    """)
    child = write(tmp_path / "child.yaml", """
        _base_: base.yaml
        model:
          hidden_dim: 64
    """)
    cfg = load_config(child, ["train.epochs=3", "model.backbone.depth=18"])
    assert cfg.model.arch == "dab_detr"       # from the base
    assert cfg.model.hidden_dim == 64         # child wins
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.train.epochs == 3              # command line
    assert cfg.model.backbone.depth == 18


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path / "bad.yaml", """
        train:
          lr: 1.0e-4
          epocs: 3
    """)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert f"{path}:4" in msg and "train.epocs" in msg and "train.epochs" in msg


def test_unknown_key_suggestions_come_from_its_own_section_first():
    with pytest.raises(ConfigError, match=r"'distill.logit.w_clss'; did you mean 'distill.logit.w_cls'\?"):
        load_config(None, ["distill.logit.w_clss=1"])
    # distill.fgd.temperature exists, but the logit loss calls its temperature tau: list its own keys
    with pytest.raises(ConfigError) as e:
        load_config(None, ["distill.logit.temperature=2"])
    assert "the keys of 'distill.logit' are tau, cls_loss" in str(e.value) and "fgd" not in str(e.value)
    with pytest.raises(ConfigError, match="did you mean 'model.arch'"):  # no such section: any close key
        load_config(None, ["modle.arch=dino"])


def test_wrong_type_and_choice(tmp_path):
    path = write(tmp_path / "bad.yaml", "model:\n  hidden_dim: wide\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2: 'model.hidden_dim' must be an integer"):
        load_config(path)
    with pytest.raises(ConfigError, match="did you mean 'dino'"):
        load_config(None, ["model.arch=dnio"])
    with pytest.raises(ConfigError, match="must be true or false"):
        load_config(None, ["train.ema=maybe"])


def test_section_set_to_scalar_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="is a section"):
        load_config(None, ["model.backbone=18"])


def test_missing_base_and_cycle(tmp_path):
    path = write(tmp_path / "a.yaml", "_base_: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(path)
    write(tmp_path / "x.yaml", "_base_: y.yaml\n")
    write(tmp_path / "y.yaml", "_base_: x.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(str(tmp_path / "x.yaml"))


def test_round_trip_through_dict():
    cfg = load_config(None, ["model.arch=deformable_detr", "train.lr_drop_epochs=[3, 5]"])
    assert from_dict(to_dict(cfg)) == cfg
    assert from_dict(to_dict(Config())) == Config()

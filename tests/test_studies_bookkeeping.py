"""studies/bookkeeping.py: run keys that survive schema growth, the machine record, paired statistics."""
import logging
import math

import pytest
import torch

from clock_deploy import config as config_module
from clock_deploy.config import load_config
from clock_deploy.io import write_json
from studies import bookkeeping as bk


def test_a_key_added_at_its_default_is_not_among_a_runs_explicit_settings(add_config_key):
    cfg = load_config(None, ["distill.method=clock", "train.epochs=3", "output_dir=x", "distill.teacher=t.pt"])
    before = bk.explicit_settings(cfg)
    assert before == {"distill.method": "clock", "train.epochs": 3}  # where it is written or its teacher lies: not
    add_config_key(config_module.TcldConfig, "new_knob", 0.0)
    grown = load_config(None, ["distill.method=clock", "train.epochs=3", "output_dir=x"])
    assert bk.resolved_settings(grown)["distill.logit.new_knob"] == 0.0  # the key is really in the config
    assert bk.explicit_settings(grown) == before
    assert bk.run_key(bk.explicit_settings(grown), {}, "c0de") == bk.run_key(before, {}, "c0de")
    moved = load_config(None, ["distill.method=clock", "train.epochs=3", "distill.logit.new_knob=0.5"])
    assert bk.explicit_settings(moved) == {**before, "distill.logit.new_knob": 0.5}


def test_a_recorded_run_is_found_under_the_code_now_and_read_as_recorded_after_a_code_change(monkeypatch, tmp_path):
    registry = bk.RunRegistry(str(tmp_path))
    cfg = load_config(None, ["train.epochs=3"])
    written = registry.record("run-0", cfg, {"teacher": "abc"}, ("models",), metrics={"test": {"mAP": 0.5}})
    assert registry.find("run-0", cfg, {"teacher": "abc"}, ("models",)) == (written, "current")
    assert registry.find("run-0", cfg, {"teacher": "other"}, ("models",))[0] is None
    assert registry.find("run-0", load_config(None, ["train.epochs=4"]), {"teacher": "abc"}, ("models",))[0] is None
    monkeypatch.setattr(bk, "code_hash", lambda folders: "edited")
    assert registry.find("run-0", cfg, {"teacher": "abc"}, ("models",))[0] is None  # a training run trains it again
    assert registry.find("run-0", cfg, {"teacher": "abc"}, ("models",), as_recorded=True) == (written, "as recorded")
    assert registry.find("run-0", cfg, {"teacher": "other"}, ("models",), as_recorded=True)[0] is None
    assert bk.as_recorded_lines([written], {"edited"})[0].startswith(f"Run files read as recorded, written by older "
                                                                     f"code (code hash {written['code']['hash']}")
    assert bk.as_recorded_lines([written], {written["code"]["hash"]}) == []


def test_a_changed_default_makes_a_record_stale_but_a_new_or_removed_key_does_not(tmp_path):
    registry = bk.RunRegistry(str(tmp_path))
    cfg = load_config(None, [])
    record = registry.record("run", cfg, {}, ("models",))
    record["config"]["train.lr"] = 1e-3  # trained when lr's default was 1e-3
    write_json(registry.path("run"), record)
    found, why = registry.find("run", cfg, {}, ("models",))
    assert found is None and "train.lr" in why
    record["config"]["train.lr"] = cfg.train.lr
    del record["config"]["train.amp"]                  # a key the schema had not yet
    record["config"]["train.gone_knob"] = 7            # a key removed since
    write_json(registry.path("run"), record)
    assert registry.find("run", cfg, {}, ("models",))[1] == "current"


def test_a_report_reads_a_run_trained_under_an_older_default_and_names_the_default(tmp_path):
    registry = bk.RunRegistry(str(tmp_path))
    cfg = load_config(None, ["train.epochs=3"])
    lr = cfg.train.lr
    # "plain" left lr at its default when that was 1e-3; "set" chose today's default when it was not one
    plain = registry.record("plain", cfg, {}, ("models",))
    plain["config"]["train.lr"] = 1e-3
    write_json(registry.path("plain"), plain)
    chose = registry.record("set", cfg, {}, ("models",))
    chose["settings"]["train.lr"] = lr
    chose["key"] = bk.run_key(chose["settings"], {}, chose["code"]["hash"])
    write_json(registry.path("set"), chose)
    # a training run trains both again: one under another default, the other under other explicit settings
    assert "train.lr" in registry.find("plain", cfg, {}, ("models",))[1]
    assert registry.find("set", cfg, {}, ("models",))[0] is None
    # a report reads both as recorded, and says which default the first was trained under
    assert registry.find("plain", cfg, {}, ("models",), as_recorded=True) == (plain, "as recorded")
    assert registry.find("set", cfg, {}, ("models",), as_recorded=True) == (chose, "as recorded")
    defaults = bk.resolved_settings(config_module.Config(), ())
    assert bk.older_defaults(plain, defaults) == {"train.lr": 1e-3} and bk.older_defaults(chose, defaults) == {}
    assert bk.as_recorded_lines([plain, chose], {plain["code"]["hash"]})[0].startswith(
        "1 of the run files read as recorded were trained when the default was train.lr=0.001")
    # asking for the value it ran with by name is the same run; another value of a key set on either side is not
    same = load_config(None, ["train.epochs=3", "train.lr=1e-3"])
    assert registry.find("plain", same, {}, ("models",), as_recorded=True) == (plain, "as recorded")
    for other in (["train.epochs=4"], ["train.epochs=3", "train.lr=5e-4"]):
        assert registry.find("plain", load_config(None, other), {}, ("models",), as_recorded=True)[0] is None
    assert registry.find("set", load_config(None, ["train.epochs=3", "train.lr=5e-4"]), {}, ("models",),
                         as_recorded=True)[0] is None


def test_an_unreadable_run_file_is_reported_not_raised(tmp_path):
    (tmp_path / "run.json").write_text('{"name": "run"}\n')
    found, why = bk.RunRegistry(str(tmp_path)).find("run", load_config(None, []), {}, ("models",))
    assert found is None and "not a run record" in why


def test_the_machine_record_names_the_cpu_its_kernel_set_and_threads():
    m = bk.machine()
    assert m["capability"] == torch.backends.cpu.get_cpu_capability() and m["threads"] == torch.get_num_threads()
    with open("/proc/cpuinfo") as f:
        assert f"model name\t: {m['cpu']}" in f.read()
    a = {"cpu": "Intel Xeon", "capability": "AVX512", "threads": 2}
    b = {"cpu": "AMD EPYC", "capability": "AVX2", "threads": 1}
    assert bk.machine_type({"parts": [a, {**a, "threads": 1}]}) == "Intel Xeon / AVX512"
    assert bk.machine_type({"parts": [a, b]}) == "mixed: Intel Xeon / AVX512 + AMD EPYC / AVX2"


def test_a_resumed_run_lists_each_parts_machine_and_a_fresh_start_forgets_them(tmp_path):
    assert len(bk.start_part(str(tmp_path), resuming=False)) == 1
    parts = bk.start_part(str(tmp_path), resuming=True)
    assert len(parts) == 2 and parts[0] == parts[1] == bk.machine()
    assert len(bk.start_part(str(tmp_path), resuming=False)) == 1


def test_paired_stats_by_hand():
    st = bk.paired_stats([1.0, 2.0, 3.0])
    # sd 1, t(0.975, 2) = 4.302653, half width 4.302653 / sqrt(3); t = 2 sqrt(3), p = 1 - t / sqrt(t^2 + 2) (df 2)
    assert st["n"] == 3 and st["mean"] == 2.0 and st["sd"] == 1.0
    assert st["ci"] == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-6)
    assert st["p"] == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14), abs=1e-9)
    one = bk.paired_stats([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["p"]) and bk.delta_cells(one, "{:+.2f}") == ["+0.50", "-", "-"]


def test_holm_adjusts_in_the_given_order_and_keeps_it_monotone():
    adjusted = bk.holm([0.01, 0.04, 0.03, math.nan])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adjusted[3])
    assert bk.holm([0.5, 0.9]) == [1.0, 1.0]


def test_paired_delta_uses_only_the_seeds_both_have():
    st = bk.paired_delta({0: 1.0, 1: 2.0, 2: 5.0}, {0: 2.0, 1: 4.0, 3: 9.0})
    assert st["n"] == 2 and st["mean"] == 1.5
    assert bk.paired_delta({0: 1.0}, {1: 1.0}) is None


def test_report_rendering():
    assert bk.markdown_table(["a", "b"], [[1, "x"]]) == ["| a | b |", "|---|---|", "| 1 | x |"]
    assert bk.mean_sd_text([1.0, 3.0], "{:.1f}") == "2.0 +- 1.4" and bk.mean_sd_text([1.0], "{:.1f}") == "1.0"
    assert [bk.p_text(p) for p in (0.0123, 0.0004, math.nan)] == ["0.012", "< 0.001", "-"]


def test_a_study_logs_each_config_warning_once(caplog):
    logger = logging.getLogger("clock_deploy.config.test_once")
    bk.log_each_message_once(logger.name)
    bk.log_each_message_once(logger.name)  # a second call adds no second filter
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for text in ("a", "b", "a", "a"):
            logger.warning(text)
    assert [r.getMessage() for r in caplog.records] == ["a", "b"] and len(logger.filters) == 1

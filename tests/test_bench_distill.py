"""The A/B statistics and run bookkeeping of benchmarks/bench_distill.py (no training here)."""
import os
import sys
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_distill  # noqa: E402

from clock_deploy.config import load_config  # noqa: E402


def test_paired_stats_by_hand():
    st = bench_distill.paired_stats([1.0, 2.0, 3.0])
    # mean 2, sd 1, t(0.975, 2) = 4.3027, half width 4.3027 / sqrt(3); t = 2 / (1 / sqrt(3)) = 3.464 -> p = 0.0742
    assert st["n"] == 3 and st["mean"] == 2 and st["sd"] == 1
    assert st["ci"] == pytest.approx((2 - 4.3027 / 3 ** 0.5, 2 + 4.3027 / 3 ** 0.5), abs=1e-3)
    assert st["p"] == pytest.approx(0.0742, abs=1e-3)
    assert bench_distill.paired_stats([0.5])["sd"] != bench_distill.paired_stats([0.5])["sd"]  # nan: one seed


def test_a_single_pair_is_printed_as_a_difference_without_spread_ci_or_p():
    record = lambda m: {"metrics": {"test": {"mAP": m, "kitti_moderate": 70.0}}, "resumed": True}  # noqa: E731
    (row,) = bench_distill.variant_table({0: record(0.40)}, {"clock": {0: record(0.43)}})[2:]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4:7] == ["0.0300", "-", "-"] and "nan" not in row and "< 0.001" not in row
    assert bench_distill.p_text(float("nan")) == "-" and bench_distill.p_text(0.0004) == "< 0.001"


def test_config_hash_ignores_where_a_run_is_written_but_not_what_it_runs():
    a = load_config("configs/demo/distill.yaml", ["output_dir=/tmp/a", "seed=1"])
    b = load_config("configs/demo/distill.yaml", ["output_dir=/tmp/b", "seed=1", "device=cpu"])
    c = load_config("configs/demo/distill.yaml", ["output_dir=/tmp/a", "seed=2"])
    d = load_config("configs/demo/distill.yaml", ["output_dir=/tmp/a", "seed=1", "distill.lambda_mem=3"])
    assert bench_distill.config_hash(a, "t1") == bench_distill.config_hash(b, "t1")
    assert len({bench_distill.config_hash(x, "t1") for x in (a, c, d)}) == 3
    assert bench_distill.config_hash(a, "t1") != bench_distill.config_hash(a, "t2")  # another teacher


def test_stale_run_file_is_not_trained_on_but_a_report_reads_a_run_of_older_code_with_the_same_config(tmp_path):
    from clock_deploy.io import write_json
    cfg = load_config("configs/demo/distill.yaml", ["output_dir=/tmp/a"])
    other = load_config("configs/demo/distill.yaml", ["output_dir=/tmp/a", "distill.lambda_mem=3"])
    path = tmp_path / "dino-clock-0.json"
    write_json(path, {"config_hash": bench_distill.config_hash(cfg, "t1"), "metrics": {}})
    assert bench_distill.finished_run(str(path), cfg, "t1")["metrics"] == {}
    assert bench_distill.finished_run(str(path), other, "t1") is None
    assert bench_distill.finished_run(str(path), cfg, "t2") is None
    assert bench_distill.finished_run(str(tmp_path / "missing.json"), cfg, "t1") is None

    old_code = {"config_hash": bench_distill.config_hash(cfg, "t1", code="0ld"), "versions": {"code_hash": "0ld"}}
    write_json(path, old_code)
    assert bench_distill.finished_run(str(path), cfg, "t1") is None             # training: trained again
    assert bench_distill.finished_run(str(path), cfg, "t1", older_code=True) == old_code  # a report reads it
    assert bench_distill.finished_run(str(path), other, "t1", older_code=True) is None    # not another config
    assert "0ld" in bench_distill.recorded_code([old_code])[0]
    assert bench_distill.recorded_code([{"versions": {"code_hash": bench_distill.code_hash()}}, None]) == []


def test_a_run_that_trains_trains_a_run_of_older_code_again_and_a_report_reads_it(monkeypatch, tmp_path):
    from clock_deploy.io import write_json
    args = SimpleNamespace(**vars(teacher_args(tmp_path)), jobs=1)
    call = ("baseline", "dino", "student.yaml", [], 0, 12, 8, None)
    cfg = load_config("configs/demo/student.yaml", bench_distill.base_overrides(args, "dino", 12, 8)
                      + ["seed=0", f"output_dir={tmp_path / 'runs' / 'dino-baseline-0'}"])
    old_code = {"config_hash": bench_distill.config_hash(cfg, code="0ld"), "versions": {"code_hash": "0ld"}}
    write_json(tmp_path / "dino-baseline-0.json", old_code)

    def train(cfg):
        raise RuntimeError("trained")
    monkeypatch.setattr(bench_distill, "train", train)
    with pytest.raises(RuntimeError, match="trained"):
        bench_distill.run_all(args, [call])
    report = SimpleNamespace(**{**vars(args), "report_only": True})
    assert bench_distill.run_all(report, [call]) == [old_code]


def test_a_later_config_key_at_its_old_value_keeps_the_hash_of_runs_recorded_before_it(monkeypatch):
    cfg = load_config("configs/demo/distill.yaml", ["output_dir=/tmp/a"])
    before = bench_distill.config_hash(cfg)
    # as if distill.mem.beta had been added after the runs, with the value the older code used
    monkeypatch.setitem(bench_distill.LATER_KEYS, "distill.mem.beta", cfg.distill.mem.beta)
    assert "beta" not in bench_distill.run_settings(cfg)["distill"]["mem"]
    assert bench_distill.config_hash(cfg) != before  # the key is gone from the settings...
    changed = load_config("configs/demo/distill.yaml", ["output_dir=/tmp/a", "distill.mem.beta=4.0"])
    assert bench_distill.run_settings(changed)["distill"]["mem"]["beta"] == 4.0  # ...unless it does something new
    assert bench_distill.config_hash(changed) != bench_distill.config_hash(cfg)


def test_resumed_runs_are_left_out_of_minutes_per_run():
    whole = {"seconds": 600.0}
    assert bench_distill.minutes_per_run([whole, {"seconds": 60.0, "resumed": True}, {"seconds": 1200.0}]) == "15.0"
    assert bench_distill.minutes_per_run([{"seconds": 60.0, "resumed": True}]) == "-"


def test_coefficients_are_chosen_only_from_a_finished_tuning_grid(monkeypatch):
    missing = {("clock_tune4", 101)}

    def fake_run_once(args, name, family, config, overrides, seed, *rest):
        if (name, seed) in missing:
            return None  # --report-only: that tuning run has not finished
        return {"metrics": {"tuning": {"mAP": 0.1 * int(name.removeprefix("clock_tune"))}}}

    monkeypatch.setattr(bench_distill, "run_once", fake_run_once)
    args = SimpleNamespace(epochs=12, report_only=True, jobs=1)
    chosen, scores = bench_distill.choose_coefficients(args, teacher={})
    assert chosen is None and len(scores) == len(bench_distill.TUNING_GRID)
    missing.clear()
    chosen, _ = bench_distill.choose_coefficients(args, teacher={})
    assert chosen == bench_distill.TUNING_GRID[-1]  # the best mean tuning mAP


def test_run_all_reads_finished_runs_and_trains_the_others_in_order(monkeypatch):
    trained = []

    def fake_run_once(args, name, seed, teacher):
        if name == "done":
            return {"seed": seed}
        if args.report_only:
            return None
        trained.append(seed)
        return {"seed": seed, "trained": True}

    monkeypatch.setattr(bench_distill, "run_once", fake_run_once)
    calls = [("new", 0, None), ("done", 1, None), ("new", 2, None)]
    records = bench_distill.run_all(SimpleNamespace(report_only=False, jobs=1), calls)
    assert [r["seed"] for r in records] == [0, 1, 2] and trained == [0, 2] and "trained" not in records[1]
    assert bench_distill.run_all(SimpleNamespace(report_only=True, jobs=2), calls)[::2] == [None, None]


def test_a_missing_teacher_checkpoint_is_retrained_only_when_a_run_left_to_train_needs_it(monkeypatch, tmp_path):
    retrained = []
    monkeypatch.setattr(bench_distill, "run_once",
                        lambda args, name, seed, teacher: {"seed": seed} if name == "done" or not args.report_only
                        else None)
    monkeypatch.setattr(bench_distill, "family_teacher",
                        lambda args, family, retrain=False: retrained.append((family, retrain)))
    teacher = {"family": "dab_detr", "checkpoint": str(tmp_path / "last.pt")}  # not on disk (another machine)
    args = SimpleNamespace(report_only=False, jobs=1)
    bench_distill.run_all(args, [("done", 0, teacher), ("done", 1, teacher)])
    assert retrained == []  # every student finished: the teacher is not needed
    bench_distill.run_all(args, [("done", 0, teacher), ("new", 1, teacher), ("new", 2, teacher)])
    assert retrained == [("dab_detr", True)]  # once, before the runs that load it
    (tmp_path / "last.pt").write_bytes(b"")
    bench_distill.run_all(args, [("new", 3, teacher)])
    assert retrained == [("dab_detr", True)]  # on disk: reused


def test_report_pairs_each_variant_with_the_baseline_of_its_seed():
    def record(m_ap, moderate):
        return {"metrics": {"test": {"mAP": m_ap, "kitti_moderate": moderate}}, "seconds": 600.0}
    results = {"dino": {"baseline": {0: record(0.30, 50.0), 1: record(0.40, 60.0)},
                        "clock": {0: record(0.33, 52.0), 1: record(0.42, 61.0), 2: record(0.9, 90.0)}}}
    args = SimpleNamespace(train_images=800, tuning_images=200, test_images=400, epochs=12, max_iters=0,
                           configs="configs/demo", teacher_epochs=16, families=["dino"], runs_dir="runs",
                           seeds=None)
    text = bench_distill.report_b(args, {}, results, [], [], {"dino comparison": [5, 56]})
    assert "dino comparison 5 of 56" in text
    clock = next(line for line in text.splitlines() if line.startswith("| clock |"))
    cells = [c.strip() for c in clock.strip("|").split("|")]
    # seed 2 has no baseline: the deltas pair seeds 0 and 1 only (+0.03, +0.02 mAP; +2, +1 Mod)
    assert cells[:3] == ["clock", "3", "10.0"] and cells[4] == "0.0250 +- 0.0071"
    assert cells[3] == f"{(0.33 + 0.42 + 0.9) / 3:.4f} +- 0.3064"  # the variant's own seed spread, all its seeds
    assert cells[8] == "1.50 +- 0.71"


def test_pass_rule_needs_dino_and_another_family_above_zero_and_clock_at_least_kd_detr():
    def runs(clock_deltas, kd_deltas):
        record = lambda m_ap: {"metrics": {"test": {"mAP": m_ap}}}  # noqa: E731
        return {"baseline": {s: record(0.4) for s in range(3)},
                "clock": {s: record(0.4 + d) for s, d in enumerate(clock_deltas)},
                "kd_detr": {s: record(0.4 + d) for s, d in enumerate(kd_deltas)}}
    args = SimpleNamespace(families=["dino", "dab_detr"], seeds=3)
    wins, noisy = [0.03, 0.04, 0.05], [0.06, -0.05, 0.02]
    met = bench_distill.criterion_text(args, {"dino": runs(wins, noisy), "dab_detr": runs(wins, noisy)})
    assert ": met on" in met and "dino (3 of 3 seeds): CLoCK's 95% CI lower bound +0.0152 (above 0)" in met
    # CLoCK minus KD-DETR per seed: -0.03, +0.09, +0.03 (mean +0.03, sd 0.06)
    assert "CLoCK minus KD-DETR, paired (3 seeds): +0.0300, 95% CI [-0.1190, +0.1790], p 0.48" in met
    # DINO's lower bound not above 0, the other family winning is not enough
    dino_noisy = {"dino": runs(noisy, noisy), "dab_detr": runs(wins, noisy)}
    assert "**not met**" in bench_distill.criterion_text(args, dino_noisy)
    # both above 0, but KD-DETR's mean gain is larger in one family
    larger = [0.05, 0.06, 0.07]
    text = bench_distill.criterion_text(args, {"dino": runs(wins, noisy), "dab_detr": runs(wins, larger)})
    assert "**not met**" in text and "below KD-DETR's" in text
    # one family only: DINO alone cannot meet the rule
    assert "**not met**" in bench_distill.criterion_text(SimpleNamespace(families=["dino"], seeds=3),
                                                         {"dino": runs(wins, noisy)})


def test_a_family_whose_teacher_did_not_learn_trains_no_student():
    def teacher(tuning_map):
        return {"metrics": {"tuning": {"mAP": tuning_map}, "test": {"mAP": tuning_map, "kitti_moderate": 1.0}}}
    assert not bench_distill.teacher_learned(teacher(0.002))
    assert bench_distill.teacher_learned(teacher(0.5)) and bench_distill.teacher_learned(None)  # None: unfinished
    args = SimpleNamespace(train_images=800, tuning_images=200, test_images=400, epochs=12, max_iters=0,
                           configs="configs/demo", teacher_epochs=16, families=["dab_detr"], runs_dir="runs",
                           seeds=None)
    text = bench_distill.report_b(args, {"dab_detr": teacher(0.002)}, {}, [], [])
    assert "The teacher did not learn at this budget (tuning-split mAP 0.0020 < 0.1)" in text
    assert "DAB-DETR trains 4x the epochs at lr 1e-4" in text  # its recipe is stated with the probes behind it


def test_dab_detr_trains_four_times_the_epochs_at_its_own_rate_and_the_others_keep_the_shared_recipe(tmp_path):
    args = SimpleNamespace(epochs=12, teacher_epochs=16, out=str(tmp_path), train_images=800, tuning_images=200,
                           test_images=400, max_iters=0)
    assert bench_distill.schedule(args, "dino") == (12, 11)
    assert bench_distill.schedule(args, "deformable_detr", teacher=True) == (16, 13)
    assert bench_distill.schedule(args, "dab_detr") == (48, 44)              # the last 1/12 at the lowered rate
    assert bench_distill.schedule(args, "dab_detr", teacher=True) == (64, 53)
    for family, lr in (("dino", 4e-4), ("dab_detr", 1e-4)):
        epochs, drop = bench_distill.schedule(args, family)
        cfg = load_config("configs/demo/student.yaml", bench_distill.base_overrides(args, family, epochs, drop))
        assert (cfg.train.lr, cfg.train.epochs, cfg.train.lr_drop_epochs) == (lr, epochs, [drop])


def test_a_run_folder_of_other_settings_is_set_aside_not_resumed(tmp_path):
    from clock_deploy.config import dump
    run_dir = tmp_path / "dab_detr-teacher"
    run_dir.mkdir()
    old = load_config("configs/demo/teacher.yaml", [f"output_dir={run_dir}", "train.epochs=16"])
    dump(old, str(run_dir / "config.yaml"))
    (run_dir / "last.pt").write_bytes(b"old run")
    same = load_config("configs/demo/teacher.yaml", [f"output_dir={run_dir}", "train.epochs=16", "device=cpu"])
    bench_distill.set_aside_other_run(same)           # same settings: an interrupted run, continued
    assert (run_dir / "last.pt").is_file()
    new = load_config("configs/demo/teacher.yaml", [f"output_dir={run_dir}", "train.epochs=64"])
    bench_distill.set_aside_other_run(new)            # another recipe: moved away, kept
    assert not run_dir.exists()
    (kept,) = tmp_path.glob("dab_detr-teacher.old-*")
    assert (kept / "last.pt").read_bytes() == b"old run"


def teacher_args(tmp_path):
    """The A/B's default budget, with data, runs and run files under tmp_path."""
    return SimpleNamespace(epochs=12, teacher_epochs=16, out=str(tmp_path), train_images=800, tuning_images=200,
                           test_images=400, max_iters=0, configs="configs/demo", runs_dir=str(tmp_path),
                           report_only=False)


def test_a_finished_teacher_is_reused_without_its_checkpoint_until_a_run_needs_it(monkeypatch, tmp_path):
    record = {"family": "dab_detr", "metrics": {"tuning": {"mAP": 0.2}, "test": {"mAP": 0.2}}}
    monkeypatch.setattr(bench_distill, "finished_run", lambda *args, **kwargs: record)
    monkeypatch.setattr(bench_distill, "train", lambda cfg: pytest.fail("a finished teacher was retrained"))
    args = teacher_args(tmp_path)
    teacher = bench_distill.family_teacher(args, "dab_detr")
    assert teacher["metrics"] == record["metrics"] and not os.path.isfile(teacher["checkpoint"])
    with pytest.raises(pytest.fail.Exception):  # a student run needs the missing checkpoint: trained again
        bench_distill.family_teacher(args, "dab_detr", retrain=True)


def test_a_retrained_teacher_that_differs_stops_the_ab_instead_of_pairing_its_students_with_the_old_ones(
        monkeypatch, tmp_path):
    recorded = {"family": "dab_detr", "metrics": {"tuning": {"mAP": 0.175}, "test": {"mAP": 0.180}}}
    monkeypatch.setattr(bench_distill, "finished_run", lambda *args, **kwargs: recorded)
    def fake_train(cfg):  # the checkpoint was missing (another machine): trained again, other weights
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "last.pt"), "wb") as f:
            f.write(b"other weights")
        return {"mAP": 0.111}, False
    monkeypatch.setattr(bench_distill, "train", fake_train)
    monkeypatch.setattr(bench_distill, "test_metrics", lambda args, checkpoint, cfg: {"mAP": 0.122})
    monkeypatch.setattr(bench_distill, "write_json", lambda *a: pytest.fail("the differing teacher was recorded"))
    args = teacher_args(tmp_path)
    run_dir = tmp_path / "runs" / "dab_detr-teacher"
    with pytest.raises(SystemExit, match="differs from the recorded one"):
        bench_distill.family_teacher(args, "dab_detr", retrain=True)
    assert not run_dir.exists()  # kept aside: a later call does not load it as the recorded teacher
    (aside,) = (tmp_path / "runs").glob("dab_detr-teacher.retrained-differs-*")
    assert (aside / "last.pt").read_bytes() == b"other weights"


def test_teacher_seed_0_keeps_the_first_teachers_key_and_its_committed_weights_make_another_key():
    first = load_config("configs/demo/teacher.yaml", ["output_dir=/tmp/a"])
    assert bench_distill.config_hash(first) == bench_distill.config_hash(
        load_config("configs/demo/teacher.yaml", ["seed=0", "output_dir=/tmp/b"]))  # records before seeds stay valid
    assert bench_distill.config_hash(first) != bench_distill.config_hash(
        load_config("configs/demo/teacher.yaml", ["seed=1", "output_dir=/tmp/a"]))
    recorded = {"config_hash": "abc"}
    assert bench_distill.teacher_key(recorded) == "abc"
    assert bench_distill.teacher_key({**recorded, "weights": {"sha256": "f" * 64}}) == "abc-" + "f" * 16


def test_a_new_teachers_weights_are_committed_and_another_machine_loads_them_without_training(monkeypatch, tmp_path):
    import torch
    from clock_deploy.checkpoint import load_model, save_checkpoint
    from clock_deploy.models.build import build_model
    trained = {}

    def fake_train(cfg):  # a real checkpoint of the teacher's model, with an optimizer state and RNG
        trained["model"] = build_model(cfg.model)
        save_checkpoint(os.path.join(cfg.output_dir, "last.pt"), trained["model"], cfg, ["Car"], 16, 100,
                        optimizer={"state": torch.zeros(2)})
        return {"mAP": 0.5}, False
    os.makedirs(tmp_path / "runs" / "dino-teacher-s1")
    monkeypatch.setattr(bench_distill, "train", fake_train)
    monkeypatch.setattr(bench_distill, "test_metrics", lambda args, checkpoint, cfg: {"mAP": 0.4})
    args = teacher_args(tmp_path)
    args.teachers_dir = str(tmp_path / "teachers")
    teacher = bench_distill.family_teacher(args, "dino", seed=1)
    weights = tmp_path / "teachers" / "dino-teacher-s1.pt"
    assert teacher["checkpoint"] == str(weights) and teacher["weights"]["file"] == "dino-teacher-s1.pt"
    assert not {"optimizer", "rng"} & set(torch.load(weights, weights_only=True))
    model, cfg, _ = load_model(str(weights))  # what a student's distill.teacher loads
    assert cfg.seed == 1 and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                     trained["model"].state_dict().values()))

    import shutil
    shutil.rmtree(tmp_path / "runs")  # another machine: no run folder, only the committed files
    monkeypatch.setattr(bench_distill, "train", lambda cfg: pytest.fail("a committed teacher was retrained"))
    again = bench_distill.family_teacher(args, "dino", retrain=True, seed=1)
    assert again["checkpoint"] == str(weights)
    assert bench_distill.teacher_key(again) == bench_distill.teacher_key(teacher)  # its students' runs still match
    weights.write_bytes(weights.read_bytes() + b"x")
    with pytest.raises(SystemExit, match="dino-teacher-s1.pt: not the weights recorded in .*dino-teacher-s1.json"):
        bench_distill.family_teacher(args, "dino", seed=1)
    weights.unlink()
    with pytest.raises(SystemExit, match="weights .*dino-teacher-s1.pt are missing"):
        bench_distill.family_teacher(args, "dino", seed=1)


def test_the_ablation_rows_train_under_the_second_teacher_and_the_main_comparison_under_the_first(monkeypatch):
    def fake_teacher(args, family, retrain=False, seed=0):
        return {"family": family, "seed": seed, "config_hash": f"t{seed}",
                "metrics": {"tuning": {"mAP": 0.5}, "test": {"mAP": 0.5, "kitti_moderate": 50.0}}}
    calls = []
    monkeypatch.setattr(bench_distill, "family_teacher", fake_teacher)
    monkeypatch.setattr(bench_distill, "ensure_data", lambda args, cfg: None)
    monkeypatch.setattr(bench_distill, "run_all", lambda args, todo: calls.extend(todo) or [None] * len(todo))
    monkeypatch.setattr(bench_distill, "report_b", lambda *a: a[-1])
    args = SimpleNamespace(families=["dino", "deformable_detr"], seeds=2, variants=list(bench_distill.VARIANTS),
                           tune=False, report_only=False, configs="configs/demo", epochs=12, out="/tmp/unused",
                           train_images=800, tuning_images=200, max_iters=0)
    ablation_teachers = bench_distill.part_b(args)
    assert list(ablation_teachers) == ["dino"] and ablation_teachers["dino"]["seed"] == 1
    runs = [(family, name, seed, teacher and teacher["seed"]) for name, family, _, _, seed, *_, teacher in calls]
    main = [(n, None if n == "baseline" else 0) for n in ("baseline", "clock", "kd_detr")]
    ablations = [(f"{n}-t1", 1) for n in ("clock", "tcld_only", "lcmd_only", "fgd", "clock_kl")]
    assert runs == ([("dino", n, s, t) for s in (0, 1) for n, t in main]
                    + [("dino", n, s, t) for s in (0, 1) for n, t in ablations]
                    + [("deformable_detr", n, s, t) for s in (0, 1) for n, t in main])  # no ablation rows there


def test_the_ablation_rows_are_a_table_of_their_own_under_the_second_teachers_line():
    def record(m_ap):
        return {"metrics": {"test": {"mAP": m_ap, "kitti_moderate": 50.0}}, "seconds": 600.0}
    results = {"dino": {"baseline": {0: record(0.30), 1: record(0.40)}, "clock": {0: record(0.33), 1: record(0.42)},
                        "clock-t1": {0: record(0.20), 1: record(0.30)}}}
    args = SimpleNamespace(train_images=800, tuning_images=200, test_images=400, epochs=12, max_iters=0,
                           configs="configs/demo", teacher_epochs=16, families=["dino"], runs_dir="runs", seeds=None)
    second = {"metrics": {"test": {"mAP": 0.6, "kitti_moderate": 88.0}}}
    lines = bench_distill.report_b(args, {}, results, [], [], None, {"dino": second}).splitlines()
    heading = next(i for i, line in enumerate(lines) if line.startswith("Ablation rows, under the second teacher"))
    assert "(seed 1; mAP 0.6000, KITTI Mod 88.00)" in lines[heading]
    rows = [i for i, line in enumerate(lines) if line.startswith("| clock")]
    assert [lines[i].split("|")[1].strip() for i in rows] == ["clock", "clock-t1"] and rows[0] < heading < rows[1]
    assert "| -0.1000 +- 0.0000 |" in lines[rows[1]]  # paired with the same baseline seeds
    # the pass rule reads the first teacher's CLoCK row only (+0.03, +0.02: mean +0.025, half width 0.0635)
    assert "dino (2 of 8 seeds): CLoCK's 95% CI lower bound -0.0385" in next(
        line for line in lines if line.startswith("Pass rule"))


def test_each_ablation_row_is_paired_with_clock_under_the_same_teacher():
    def record(m_ap):
        return {"metrics": {"test": {"mAP": m_ap, "kitti_moderate": 50.0}}}
    ablations = {"clock-t1": {0: record(0.40), 1: record(0.50), 2: record(0.45)},
                 "lcmd_only-t1": {0: record(0.43), 1: record(0.51), 3: record(0.9)},  # seed 3: no CLoCK to pair
                 "fgd-t1": {0: record(0.41)}}  # one paired seed: no statistics yet
    lines = bench_distill.ablation_text(ablations, "clock-t1")
    assert lines[1].startswith("Each row minus clock-t1 of the same seed (test mAP, paired): lcmd_only-t1 +0.0200 ")
    assert "2 seeds" in lines[1] and "fgd-t1" not in lines[1]
    assert bench_distill.ablation_text({"fgd-t1": ablations["fgd-t1"]}, "clock-t1") == []


def test_the_ab_keeps_the_query_content_its_runs_trained_with_and_a_variant_can_still_set_it():
    args = SimpleNamespace(out="o", configs=bench_distill.DEMO, train_images=8, tuning_images=2, test_images=4,
                           max_iters=0)
    recorded, _ = bench_distill.run_config(args, "clock", "dino", "distill.yaml", [], 0, 2, 1)
    assert recorded.distill.logit.content == "own"  # the default then: its run files keep their hash
    zero, _ = bench_distill.run_config(args, "clock_zero", "dino", "distill.yaml", ["distill.logit.content=zero"],
                                       0, 2, 1)
    assert zero.distill.logit.content == "zero"
    assert bench_distill.config_hash(recorded) != bench_distill.config_hash(zero)


def test_the_report_quotes_each_follow_ups_pass_rule_line_and_skips_a_follow_up_not_run(tmp_path):
    (tmp_path / "distill_content.md").write_text("# x\n\nPass rule (...): **not met**: clock_zero-t1 +0.0117.\n")
    lines = bench_distill.follow_up_lines(str(tmp_path))
    assert "- distill_content.md (" in lines[-1] and lines[-1].endswith("**not met**: clock_zero-t1 +0.0117.")
    assert not any("distill_confirm.md" in line for line in lines)
    assert bench_distill.follow_up_lines(str(tmp_path / "none")) == []


def test_the_report_quotes_the_kernel_noise_reading_when_it_exists(tmp_path):
    (tmp_path / "numeric_noise.md").write_text("# x\n\nAVX2 minus default, 8 seeds: +0.0035 +- 0.0072.\n")
    lines = bench_distill.follow_up_lines(str(tmp_path))
    assert lines[-1].startswith("Run-to-run noise (numeric_noise.md, ")
    assert lines[-1].endswith(": AVX2 minus default, 8 seeds: +0.0035 +- 0.0072.")
    assert not any("follow-ups" in line for line in lines)  # no follow-up file here

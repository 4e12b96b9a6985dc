"""studies/distill_ab.py: the live A/B trains and scores runs resumably, reads its run files, pairs only runs
of one machine type, and its records survive a config key added at its default."""
import glob
import os

import pytest

from clock_deploy import config as config_module
from clock_deploy.checkpoint import content_sha256, read_checkpoint
from clock_deploy.io import file_sha256, read_json
from studies import bookkeeping as bk
from studies import distill_ab

pytestmark = pytest.mark.filterwarnings("ignore:Precision loss occurred:RuntimeWarning")  # near-equal deltas
XEON = {"cpu": "Intel Xeon", "capability": "AVX512", "threads": 2, "torch": "2.13"}
EPYC = {"cpu": "AMD EPYC", "capability": "AVX2", "threads": 1, "torch": "2.13"}
# a stand-in for the gt_denoise control until this code has it: any variant that loads and differs
STAND_IN = ("distill.yaml", ["distill.use_mem=false"])


def args_for(tmp_path, *extra):
    return distill_ab.parse_args(["--runs-dir", str(tmp_path / "runs"), "--teachers-dir", str(tmp_path / "teachers"),
                                  "--results", str(tmp_path / "report.md"), "--out", str(tmp_path / "out"), *extra])


@pytest.fixture
def only_c1(monkeypatch):
    """One DINO candidate, C1 (the shipped CLoCK): write_runs records its tuning runs, so it is the choice."""
    monkeypatch.setattr(distill_ab, "CANDIDATES", {"C1": []})


def write_tuning(args, teacher, maps, machine=XEON):
    """Tuning records as the A/B writes them: maps {candidate: [tuning mAP per tuning seed]}; every run
    logged a TCLD class share of 0.02 (so C2's weight is 6)."""
    candidates = {"runs": {"C1": {distill_ab.TUNING_SEEDS[0]: {"class_share": 0.02}}}, "not_run": {}, "choice": None}
    for name, values in maps.items():
        for seed, value in zip(distill_ab.TUNING_SEEDS, values):
            run, cfg = distill_ab.tuning_run(args, name, seed, teacher, candidates)
            record = distill_ab.registry(args).record(
                run, cfg, distill_ab.distilled_inputs(args, teacher), distill_ab.code_folders(cfg), family="dino",
                variant=f"tune-{name}", candidate=name, seed=seed, class_share=0.02,
                metrics={"tuning": {"mAP": value}}, machine=machine, parts=[machine], resumed=False)
            candidates["runs"].setdefault(name, {})[seed] = record


def write_runs(args, maps, machine=XEON, seeds=None, parts=None):
    """Records as a finished A/B writes them: maps {family: {variant: [test mAP per seed]}}; DINO's with
    the tuning runs of C1 (use the only_c1 fixture)."""
    registry = distill_ab.registry(args)
    for family, per_variant in maps.items():
        tcfg = distill_ab.run_config(args, family, "teacher.yaml", [], 0, f"{family}-teacher")
        teacher = registry.record(f"{family}-teacher", tcfg, distill_ab.data_inputs(args),
                                  distill_ab.code_folders(tcfg), metrics={"test": {"mAP": 0.4, "kitti_moderate": 70.0}},
                                  parts=[XEON], machine=XEON, resumed=False,
                                  weights={"file": "t.pt", "sha256": "0" * 64})
        teacher["checkpoint"] = "t.pt"
        if family == "dino" and seeds is None and parts is None:
            write_tuning(args, teacher, {"C1": [0.3, 0.3]}, machine)
        for variant, maps_per_seed in per_variant.items():
            for seed, value in zip(seeds or range(len(maps_per_seed)), maps_per_seed):
                name, cfg, inputs = distill_ab.student(args, family, variant, seed, teacher)
                registry.record(name, cfg, inputs, distill_ab.code_folders(cfg), family=family, variant=variant,
                                seed=seed, metrics={"test": {"mAP": value, "kitti_moderate": 100 * value}},
                                machine=machine, parts=parts or [machine], resumed=bool(parts))


def report(args):
    distill_ab.main(["--report-only", "--runs-dir", args.runs_dir, "--teachers-dir", args.teachers_dir,
                     "--results", args.results, "--out", args.out, "--families", *args.families])
    return open(args.results).read()


AB = {"dino": {"baseline": [0.20, 0.22, 0.24], "clock": [0.23, 0.26, 0.27], "gt_denoise": [0.21, 0.23, 0.25],
               "kd_detr": [0.22, 0.23, 0.25], "fgd": [0.24, 0.25, 0.28]},
      "deformable_detr": {"baseline": [0.10, 0.12, 0.11], "clock": [0.15, 0.16, 0.16],
                          "gt_denoise": [0.12, 0.13, 0.12], "kd_detr": [0.11, 0.14, 0.12]}}


def test_the_report_pairs_by_seed_and_reads_the_pass_rule_off_the_runs(monkeypatch, tmp_path, only_c1):
    monkeypatch.setitem(distill_ab.VARIANTS, "gt_denoise", STAND_IN)
    args = args_for(tmp_path, "--families", "dino", "deformable_detr")
    write_runs(args, AB)
    text = report(args)
    # dino CLoCK - baseline: deltas 0.03, 0.04, 0.03 -> mean 0.0333, sd 0.0058
    assert "| clock | 3 | 0.2533 +- 0.0208 | +0.0333 +- +0.0058 |" in text
    assert "clock minus fgd (test mAP, 3 paired seeds): -0.0033" in text
    assert "Paired on one machine type: Intel Xeon / AVX512 (threads 2)." in text
    # both lower bounds above 0 in both families, CLoCK's gain above KD-DETR's in both
    assert "Pass rule: met on the runs finished so far (both lower bounds above 0 in: dino, deformable_detr" in text
    assert text.count("Holm p") == 5  # 4 tests and the legend


def test_the_summary_the_readme_quotes_marks_a_family_complete_only_with_every_variant_at_its_seeds(
        monkeypatch, tmp_path, only_c1):
    monkeypatch.setitem(distill_ab.VARIANTS, "gt_denoise", STAND_IN)
    args = args_for(tmp_path, "--families", "dino", "deformable_detr", "--seeds", "3")
    ab = {family: dict(runs) for family, runs in AB.items()}
    ab["deformable_detr"]["fgd"] = [0.12, 0.15, 0.13]
    ab["dino"]["fgd"] = ab["dino"]["fgd"][:2]  # one seed short
    write_runs(args, ab)
    distill_ab.main(["--report-only", "--runs-dir", args.runs_dir, "--teachers-dir", args.teachers_dir, "--results",
                     args.results, "--out", args.out, "--families", "dino", "deformable_detr", "--seeds", "3"])
    summary = read_json(str(tmp_path / "report.json"))
    assert [summary["families"][f]["complete"] for f in ("dino", "deformable_detr")] == [False, True]
    deformable = summary["families"]["deformable_detr"]
    assert deformable["machine"] == "Intel Xeon / AVX512"
    assert deformable["gain"]["clock"]["mAP"]["mean"] == pytest.approx(0.0467, abs=1e-4)  # 0.05, 0.04, 0.05
    assert deformable["clock_minus"]["gt_denoise"]["mean"] == pytest.approx(0.0333, abs=1e-4)  # 0.03, 0.03, 0.04
    assert summary["families"]["dino"]["gain"]["fgd"]["mAP"]["n"] == 2


def test_the_pass_rule_fails_when_clock_gains_less_than_kd_detr(monkeypatch, tmp_path, only_c1):
    monkeypatch.setitem(distill_ab.VARIANTS, "gt_denoise", STAND_IN)
    args = args_for(tmp_path, "--families", "dino", "deformable_detr")
    ab = {family: dict(runs) for family, runs in AB.items()}
    ab["deformable_detr"]["kd_detr"] = [0.16, 0.17, 0.17]
    write_runs(args, ab)
    assert "**not met** on the runs finished so far (both lower bounds above 0 in: dino, deformable_detr; " \
           "CLoCK's mean gain below KD-DETR's in: deformable_detr)" in report(args)


def test_only_runs_of_one_machine_type_pair_and_the_report_says_which(monkeypatch, tmp_path, only_c1):
    args = args_for(tmp_path, "--families", "dino")
    write_runs(args, {"dino": {"baseline": [0.20, 0.22], "clock": [0.23, 0.26]}})
    write_runs(args, {"dino": {"baseline": [0.5], "clock": [0.1]}}, machine=EPYC, seeds=[2])
    write_runs(args, {"dino": {"clock": [0.9]}}, seeds=[3], parts=[XEON, EPYC])  # resumed on another CPU
    text = report(args)
    assert "Paired on one machine type: Intel Xeon / AVX512 (threads 2); left out: 2 runs on AMD EPYC / AVX2, " \
           "1 runs on mixed: Intel Xeon / AVX512 + AMD EPYC / AVX2." in text
    assert "| clock | 2 | 0.2450 +- 0.0212 | +0.0350 +- +0.0071 |" in text  # seeds 0 and 1 only
    args.machine = "AMD EPYC / AVX2"
    distill_ab.main(["--report-only", "--runs-dir", args.runs_dir, "--results", args.results, "--out", args.out,
                     "--families", "dino", "--machine", "AMD EPYC / AVX2"])
    assert "| clock | 1 | 0.1000 | -0.4000 |" in open(args.results).read()


def test_a_config_key_added_at_its_default_keeps_every_record_read_and_the_report_unchanged(
        monkeypatch, tmp_path, add_config_key, only_c1):
    monkeypatch.setitem(distill_ab.VARIANTS, "gt_denoise", STAND_IN)
    args = args_for(tmp_path, "--families", "dino", "deformable_detr")
    write_runs(args, AB)
    before = report(args)
    add_config_key(config_module.TcldConfig, "new_knob", 0.0)
    add_config_key(config_module.TrainConfig, "new_schedule", "cosine")
    assert bk.resolved_settings(config_module.Config())["distill.logit.new_knob"] == 0.0
    # read from another --out (another machine's disk): the data are the same, so are the keys
    read = distill_ab.collect(distill_ab.parse_args(["--report-only", "--runs-dir", args.runs_dir,
                                                     "--families", "dino", "deformable_detr", "--out", "elsewhere"]))
    runs = len(glob.glob(args.runs_dir + "/*")) - 2 - len(distill_ab.TUNING_SEEDS)  # teachers, tuning runs
    assert sum(len(s) for e in read.values() for s in e["runs"].values()) == runs
    assert report(args) == before


def test_a_variant_this_code_does_not_train_is_listed_not_run(tmp_path, monkeypatch, only_c1):
    monkeypatch.setitem(distill_ab.VARIANTS, "future", ("distill.yaml", ["distill.method=future"]))
    args = args_for(tmp_path, "--families", "dino")
    write_runs(args, {"dino": {"baseline": [0.2]}})
    text = report(args)
    assert "Not run: future: this code does not train it (" in text  # distill.method=future: unknown here
    assert "Not run: gt_denoise" not in text  # the control this code does train


def test_a_family_whose_teacher_is_below_its_floor_trains_no_student(tmp_path, monkeypatch, only_c1):
    monkeypatch.setitem(distill_ab.MIN_TEACHER_MAP, "dino", 0.5)  # the generated teachers reach 0.4
    args = args_for(tmp_path, "--families", "dino")
    write_runs(args, {"dino": {"baseline": [0.2, 0.3], "clock": [0.3, 0.4]}})
    text = report(args)
    assert "Not run: students: the teacher's test mAP 0.4000 is below 0.5 (MIN_TEACHER_MAP)" in text
    assert "| clock |" not in text


def test_each_familys_students_train_before_the_next_teacher(tmp_path, monkeypatch):
    """Family by family: a family's run files land before the next (perhaps long) teacher trains."""
    calls = []
    teacher = {"metrics": {"test": {"mAP": 0.5}}, "checkpoint": "t.pt", "key": "k"}
    monkeypatch.setattr(distill_ab, "family_teacher", lambda args, family: calls.append(("teacher", family)) or teacher)
    monkeypatch.setattr(distill_ab, "student", lambda args, family, variant, seed, teacher, variants: (
        f"{family}-{variant}-{seed}", None, {}))
    monkeypatch.setattr(distill_ab, "code_folders", lambda cfg: ())
    monkeypatch.setattr(distill_ab.bk.RunRegistry, "find", lambda *a, **k: (None, "not run"))
    monkeypatch.setattr(distill_ab, "in_workers", lambda jobs, function, argument_lists: [
        calls.append(("student", arguments[1])) or {} for arguments in argument_lists])
    args = args_for(tmp_path, "--families", "rt_detr", "deformable_detr", "--seeds", "1", "--variants", "baseline")
    distill_ab.collect(args, {"baseline": distill_ab.VARIANTS["baseline"]})
    assert calls == [("teacher", "rt_detr"), ("student", "rt_detr"), ("teacher", "deformable_detr"),
                     ("student", "deformable_detr")]


def test_every_committed_run_file_is_read_by_report_only_on_the_current_code():
    committed = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(distill_ab.RUNS, "*.json")))
    args = distill_ab.parse_args(["--report-only"])
    candidates = distill_ab.dino_candidates(args)
    results = distill_ab.collect(args, distill_ab.chosen_variants(candidates))
    read = [r["name"] for e in results.values() for s in e["runs"].values() for r in s.values()]
    read += [r["name"] for s in candidates["runs"].values() for r in s.values()]
    read += [e["teacher"]["name"] for e in results.values() if e["teacher"]]
    assert sorted(read) == committed  # no committed run file is left unread (stale key, renamed run, ...)


TINY = """seed: 0
device: cpu
data: {img_size: [64, 96], synth: {height: 64, width: 192, max_objects: 4}}
model: {arch: dino, num_classes: 3, backbone: {depth: 18, width: 8, return_levels: [2, 3]}, hidden_dim: 32,
        nheads: 2, enc_layers: 1, dec_layers: 2, ffn_dim: 64, num_queries: 10, num_feature_levels: 2,
        dn: {num_queries: 10}}
train: {batch_size: 2, log_every: 1, warmup_iters: 2}
export: {topk: 10}
"""


@pytest.fixture(scope="module")
def tiny_ab(tmp_path_factory):
    """A finished tiny A/B (DINO teacher, candidates C1 and C2 on the tuning seeds, baseline and CLoCK of one
    seed, 2 iterations each)."""
    root = tmp_path_factory.mktemp("ab")
    configs = root / "configs"
    configs.mkdir()
    (configs / "student.yaml").write_text(TINY)
    (configs / "teacher.yaml").write_text("_base_: student.yaml\n")
    (configs / "distill.yaml").write_text("_base_: student.yaml\ndistill: {method: clock, logit: "
                                          "{random_queries: 10}, grad_share_every: 1}\n")
    argv = ["--configs", str(configs), "--families", "dino", "--variants", "baseline", "clock", "--seeds", "1",
            "--epochs", "1", "--teacher-epochs", "1", "--train-images", "6", "--tuning-images", "2",
            "--test-images", "2", "--max-iters", "2", "--out", str(root / "out"), "--runs-dir", str(root / "runs"),
            "--teachers-dir", str(root / "teachers"), "--results", str(root / "report.md")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distill_ab, "CANDIDATES", {"C1": [], "C2": None})
        distill_ab.main(argv)
    return root, argv


def test_a_tiny_ab_trains_records_its_machine_and_reports(tiny_ab):
    root, _ = tiny_ab
    runs = root / "runs"
    tuning = [f"dino-tune-{c}-{s}.json" for c in ("C1", "C2") for s in distill_ab.TUNING_SEEDS]
    assert sorted(os.listdir(runs)) == ["dino-baseline-0.json", "dino-clock-0.json", "dino-teacher.json", *tuning]
    teacher = read_json(runs / "dino-teacher.json")
    assert teacher["weights"]["sha256"] == file_sha256(root / "teachers" / "dino-teacher.pt")
    weights = read_checkpoint(root / "teachers" / "dino-teacher.pt")  # verified on read: it carries a checksum
    assert weights["checksum"] == content_sha256(weights) and "optimizer" not in weights
    clock = read_json(runs / "dino-clock-0.json")
    assert clock["inputs"] == {"data": ["synth_train6_val2_s0", "synth_test2_s1"],
                               "teacher": teacher["key"] + "-" + teacher["weights"]["sha256"][:16]}
    assert clock["machine"] == bk.machine() and clock["parts"] == [bk.machine()] and clock["resumed"] is False
    assert clock["code"]["folders"] == ["models", "data", "training", "eval", "distill"]
    assert "distill" not in read_json(runs / "dino-baseline-0.json")["code"]["folders"]
    text = open(root / "report.md").read()
    assert f"Paired on one machine type: {bk.machine_type(clock)} (threads 1)." in text
    # tuning runs are scored on the tuning split only; C2's class weight comes from C1's first run's log
    c1, c2 = (read_json(runs / f"dino-tune-{c}-100.json") for c in ("C1", "C2"))
    assert set(c1["metrics"]) == {"tuning"} and 0 < c1["class_share"] < 1
    weight = float(distill_ab.class_weight_overrides(c1["class_share"])[0].split("=")[1])
    assert c2["config"]["distill.logit.w_cls"] == weight
    choice = max(("C1", "C2"), key=lambda c: (sum(read_json(runs / f"dino-tune-{c}-{s}.json")["metrics"]["tuning"]
                                                  ["mAP"] for s in distill_ab.TUNING_SEEDS), c == "C1"))
    assert f"Choice (highest mean tuning mAP, a tie keeps the earlier): **{choice}**" in text
    assert clock["config"]["distill.logit.w_cls"] == (weight if choice == "C2" else 1.0)


def test_a_rerun_reads_finished_runs_and_resumes_an_interrupted_one(tiny_ab, monkeypatch):
    root, argv = tiny_ab
    before = read_json(root / "runs" / "dino-baseline-0.json")
    os.remove(root / "runs" / "dino-baseline-0.json")  # stopped after its last checkpoint, before its record
    trained = []
    from clock_deploy.training import commands
    real = commands.run_training
    monkeypatch.setattr(commands, "run_training", lambda cfg, **kw: trained.append(cfg.output_dir) or real(cfg, **kw))
    monkeypatch.setattr(distill_ab, "CANDIDATES", {"C1": [], "C2": None})  # as tiny_ab ran
    distill_ab.main(argv)
    assert [os.path.basename(d) for d in trained] == ["dino-baseline-0"]  # the others read, not retrained
    after = read_json(root / "runs" / "dino-baseline-0.json")
    assert after["resumed"] is True and after["parts"] == [bk.machine(), bk.machine()]
    assert after["key"] == before["key"] and after["metrics"]["test"] == before["metrics"]["test"]


def test_runs_side_by_side_come_back_in_order():
    assert list(distill_ab.in_workers(2, pow, [(2, 3), (3, 2), (2, 1)])) == [8, 9, 2]
    assert list(distill_ab.in_workers(1, pow, [(2, 3)])) == [8]


def test_rt_detr_rows_use_the_real_time_family_recipes(tmp_path):
    # RT-DETR's teacher and students come from configs/demo/rt_detr_*.yaml (pre-registration, amendment 1)
    args = args_for(tmp_path)
    teacher = distill_ab.run_config(args, "rt_detr", "teacher.yaml", [], 0, "rt_detr-teacher")
    assert (teacher.model.enc_layers, teacher.loss.cls) == (1, 1.0)
    for variant, (config, overrides) in distill_ab.VARIANTS.items():
        cfg = distill_ab.run_config(args, "rt_detr", config, overrides, 0, f"rt_detr-{variant}-0")
        assert (cfg.model.arch, cfg.model.rt_detr.expansion, cfg.loss.cls, cfg.model.dn.box_noise) == \
            ("rt_detr", 0.5, 1.0, 1.0)
        assert cfg.distill.method == {"baseline": "none"}.get(variant, variant)
    dino = distill_ab.run_config(args, "dino", "student.yaml", [], 0, "dino-baseline-0")
    assert dino.loss.cls == 2.0


def test_c2_weight_gives_the_class_term_its_share():
    # s = 0.02: W = ceil(0.1 / 0.9 x 0.98 / 0.02) = ceil(5.44) = 6; scaled, the share is 6n / (6n + rest) >= 0.1
    assert distill_ab.class_weight_overrides(0.02) == ["distill.logit.w_cls=6"]
    share = 0.02
    assert 6 * share / (6 * share + 1 - share) >= 0.1 > 5 * share / (5 * share + 1 - share)


def test_the_choice_is_the_best_tuning_mean_and_sets_the_clock_and_gt_denoise_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(distill_ab, "CANDIDATES", {"C1": [], "C2": None, "C3": ["distill.mem.weighting=gt_attention"]})
    args = args_for(tmp_path, "--families", "dino")
    write_runs(args, {"dino": {"baseline": [0.2, 0.3]}}, seeds=[0, 1])
    teacher = distill_ab.family_teacher(distill_ab.parse_args(["--report-only", "--runs-dir", args.runs_dir,
                                                               "--out", args.out]), "dino")
    write_tuning(args, teacher, {"C1": [0.30, 0.32]})
    candidates = distill_ab.tune(distill_ab.parse_args(["--report-only", "--runs-dir", args.runs_dir,
                                                        "--out", args.out]), teacher)
    assert candidates["choice"] is None  # C2 and C3 have no runs yet
    assert distill_ab.candidate_overrides(candidates, "C2") == ["distill.logit.w_cls=6"]  # C1 logged 0.02
    assert set(distill_ab.chosen_variants(candidates)) == {"baseline", "kd_detr", "fgd"}  # the two rows wait
    write_tuning(args, teacher, {"C2": [0.33, 0.31], "C3": [0.36, 0.28]})  # C2 and C3 tie at 0.32 with ...
    args2 = distill_ab.parse_args(["--report-only", "--runs-dir", args.runs_dir, "--out", args.out])
    candidates = distill_ab.tune(args2, teacher)
    assert candidates["choice"] == "C2"  # ... each other (0.32 > C1's 0.31): the tie keeps the earlier
    variants = distill_ab.chosen_variants(candidates)
    assert variants["clock"] == ("distill.yaml", ["distill.logit.w_cls=6"])
    assert variants["gt_denoise"] == ("distill.yaml", ["distill.logit.w_cls=6", "distill.method=gt_denoise"])
    text = "\n".join(distill_ab.tuning_lines(candidates))
    assert "| C2 | distill.logit.w_cls=6 | 0.3300, 0.3100 | 0.3200 | 0.020 |" in text
    assert "**C2**" in text


def test_c4_s_control_is_its_general_group_alone():
    candidates = {"runs": {}, "not_run": {}, "choice": "C4"}
    variants = distill_ab.chosen_variants(candidates)
    assert variants["clock"][1] == ["distill.logit.anchors=student"]
    assert variants["gt_denoise"][1] == ["distill.logit.repeats=0", "distill.method=gt_denoise"]

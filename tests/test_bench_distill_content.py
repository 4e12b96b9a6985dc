"""The second DINO follow-up's choice rule (benchmarks/bench_distill_content.py; no training here)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_distill_content as content  # noqa: E402


def runs(*tuning_maps):
    return [{"metrics": {"tuning": {"mAP": m}, "test": {"mAP": 0.0}}} for m in tuning_maps]


def test_the_candidate_replaces_the_current_clock_only_when_its_tuning_map_is_higher():
    assert content.choose(runs(0.4, 0.5), runs(0.5, 0.5))[0] == content.CANDIDATE
    assert content.choose(runs(0.4, 0.5), runs(0.45, 0.45))[0] == content.CURRENT  # a tie keeps the current
    chosen, means = content.choose(runs(0.5, 0.5), runs(0.4, 0.5))
    assert chosen == content.CURRENT and means == {content.CURRENT: 0.5, content.CANDIDATE: 0.45}


def test_the_candidate_is_the_current_clock_with_zero_content_and_is_scored_on_an_unused_split():
    import bench_distill_confirm as confirm
    assert content.CANDIDATE_OVERRIDES == ["distill.logit.content=zero"]
    assert content.FRESH_SEED not in (0, 1, confirm.FRESH_SEED)


def scored_runs(*pairs):
    return {name: [{"name": content.ab.run_name(name, 0 if name == "baseline" else 1), "seed": seed}]
            for name, seed in pairs}


def test_lost_checkpoints_train_again_seed_by_seed_with_the_pass_rules_rows_first():
    calls = {name: [(content.ab.run_name(name, 0 if name == "baseline" else 1), "dino", "x.yaml", [], seed)
                    for seed in range(2)] for name in content.ROWS}
    order = content.restore_order(content.CANDIDATE, calls, scored_runs(("kd_detr", 0)), seeds=2)
    names = [(name, call[4]) for name, call in order]
    assert names[:5] == [("baseline", 0), (content.CANDIDATE, 0), ("baseline", 1), ("kd_detr", 1),
                         (content.CANDIDATE, 1)]  # kd_detr seed 0 is scored already
    assert [n for n, _ in names[5:]] == ["clock", "lcmd_only", "fgd"] * 2
    unchosen = content.restore_order(None, calls, {}, seeds=1)  # no choice yet: both CLoCK rows first
    assert [n for n, _ in unchosen][:4] == ["baseline", "kd_detr", content.CURRENT, content.CANDIDATE]


def test_a_retrained_run_counts_whether_or_not_it_reproduces_and_the_report_says_by_how_much():
    score = {"name": "clock-t1", "seed": 3, "test_again": {"mAP": 0.45}, "test_recorded": {"mAP": 0.44}}
    assert not content.counts(score)  # a reused checkpoint that does not reproduce is left out
    again = {**score, "trained_again": True, "cpu": "Some CPU"}
    assert content.counts(again)
    assert "clock-t1 3 +0.0100" in content.retrained_text({"clock": [again]})[1]
    assert "Some CPU" in content.retrained_text({"clock": [again]})[1]
    assert content.retrained_text({"clock": [score]}) == []


def test_the_report_names_the_seeds_whose_runs_were_trained_on_different_cpus():
    scored = {"baseline": [{"seed": 0, "cpu": "A"}, {"seed": 1, "cpu": "A"}],
              "kd_detr": [{"seed": 0, "cpu": "B"}, {"seed": 1, "cpu": "A"}]}
    assert content.mixed_cpu_text(scored)[1].endswith("CPUs: 0 (A, B).")
    assert content.mixed_cpu_text({"baseline": [{"seed": 0, "cpu": "A"}]})[1].endswith("CPUs: none.")


def test_the_drift_table_pairs_each_retrained_row_with_its_retrained_baseline_seed_by_seed():
    def run(name, seed, again, recorded, trained_again=True):
        return {"name": name, "seed": seed, "trained_again": trained_again,
                "test_again": {"mAP": again}, "test_recorded": {"mAP": recorded}}
    scored = {"baseline": [run("baseline", 0, 0.40, 0.41), run("baseline", 1, 0.42, 0.42),
                           run("baseline", 2, 0.40, 0.40, trained_again=False)],
              "clock": [run("clock-t1", 0, 0.45, 0.43), run("clock-t1", 1, 0.46, 0.44), run("clock-t1", 2, 0.9, 0.1)]}
    table = "\n".join(content.gain_drift_lines(scored))
    # seed 0: (0.45 - 0.40) - (0.43 - 0.41) = +0.03; seed 1: +0.02; seed 2 is left out (its baseline is recorded)
    assert "| clock-t1 | 2 | +0.0250 +- 0.0071 |" in table and "| baseline |" not in table
    assert content.gain_drift_lines({"baseline": scored["baseline"]}) == []

"""The choice, the bookkeeping and the pass rule of benchmarks/bench_distill_confirm.py (no training here)."""
import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_distill_confirm as confirm  # noqa: E402

from clock_deploy.io import read_json  # noqa: E402


def tuning(*maps):
    return [{"metrics": {"tuning": {"mAP": m}}} for m in maps]


def test_the_choice_reads_only_the_tuning_split_and_a_tie_goes_to_the_full_clock():
    records = {name: tuning(0.40, 0.42) for name in confirm.CANDIDATES}
    records["lcmd_only"] = tuning(0.42, 0.44)
    # a test number far above the others must not sway the choice
    records["tcld_only"] = [{"metrics": {"tuning": {"mAP": 0.41}, "test": {"mAP": 0.9}}}] * 2
    chosen, means = confirm.choose(records)
    assert chosen == "lcmd_only" and means["lcmd_only"] == 0.43
    records["lcmd_only"] = tuning(0.40, 0.42)
    records["clock_kl"] = tuning(0.40, 0.42)
    assert confirm.choose(records)[0] == "clock"


def fresh_rows(deltas, kd_deltas):
    record = lambda m: {"metrics": {"test": {"mAP": m}}}  # noqa: E731
    return ({s: record(0.4) for s in range(len(deltas))},
            {"lcmd_only-t1": {s: record(0.4 + d) for s, d in enumerate(deltas)},
             "kd_detr-t1": {s: record(0.4 + d) for s, d in enumerate(kd_deltas)}})


def test_the_pass_rule_waits_for_every_seed_and_needs_the_bound_above_zero_and_at_least_kd_detr():
    baseline, rows = fresh_rows([0.03, 0.04, 0.05], [0.01, 0.02, 0.03])
    assert ": met:" in confirm.verdict(baseline, rows, "lcmd_only", seeds=3)
    assert "not read yet" in confirm.verdict(baseline, rows, "lcmd_only", seeds=4)
    baseline, rows = fresh_rows([0.03, 0.04, 0.05], [0.05, 0.06, 0.07])  # KD-DETR ahead
    assert "**not met**" in confirm.verdict(baseline, rows, "lcmd_only", seeds=3)
    baseline, rows = fresh_rows([0.06, -0.05, 0.02], [0.0, 0.0, 0.0])   # lower bound below 0
    assert "**not met**" in confirm.verdict(baseline, rows, "lcmd_only", seeds=3)


def test_holm_adjusts_in_step_down_order_and_keeps_the_order_given():
    adjusted = confirm.holm([0.046, 0.002, 0.022])
    assert [round(p, 3) for p in adjusted] == [0.046, 0.006, 0.044]
    assert confirm.holm([0.04, 0.03]) == [0.06, 0.06]  # monotone: a larger p never gets a smaller adjusted one


def test_a_row_not_chosen_that_clears_the_bar_is_named_with_its_holm_p_and_the_chosen_row_is_not():
    baseline, rows = fresh_rows([0.03, 0.04, 0.05], [0.01, 0.02, 0.03])
    record = lambda m: {"metrics": {"test": {"mAP": m}}}  # noqa: E731
    rows["clock-t1"] = {s: record(0.4 + d) for s, d in enumerate([0.06, -0.05, 0.02])}  # bound below 0
    line = "\n".join(confirm.unchosen_at_bar(baseline, rows, "clock", seeds=3))
    assert "lcmd_only-t1 +0.0400" in line and "Holm" in line and "3 rows compared" in line
    assert "clock-t1 " not in line and "kd_detr-t1 " not in line  # both bounds below 0
    line = "\n".join(confirm.unchosen_at_bar(baseline, rows, "lcmd_only", seeds=3))
    assert line.endswith("they decide nothing): none.")
    assert confirm.unchosen_at_bar(baseline, rows, "clock", seeds=4) == []  # not every seed scored yet


def test_a_run_is_scored_once_and_a_checkpoint_trained_again_later_never_replaces_its_score(
        monkeypatch, tmp_path):
    run_dir = tmp_path / "runs" / "dino-clock-t1-0"
    run_dir.mkdir(parents=True)
    torch.save({"w": 1}, run_dir / "last.pt")
    (run_dir / "config.yaml").write_text("seed: 0\n")
    (run_dir / "log.jsonl").write_text('{"event": "done", "epochs": 12}\n')
    calls = []

    def fake_metrics(args, checkpoint, cfg, root=None):
        calls.append((root, torch.get_num_threads()))
        return {"mAP": 0.5 if root else 0.44}
    monkeypatch.setattr(confirm.ab, "test_metrics", fake_metrics)
    args = SimpleNamespace(out=str(tmp_path), runs_dir=str(tmp_path / "files"), report_only=False, test_images=400)
    call = ("clock-t1", "dino", "distill.yaml", [], 0, 12, 11, None)
    threads = torch.get_num_threads()
    record = {"config_hash": "h", "metrics": {"test": {"mAP": 0.44}}, "threads": threads + 1}
    first = confirm.evaluate(args, call, record)
    assert first["fresh"]["mAP"] == 0.5 and confirm.reproduces(first) and len(calls) == 2
    # the record's own test split is scored again at the thread count that scored it (the sums' order moves
    # the mAP by ~3e-5), the fresh split at this process's, which is restored
    assert calls[1] == (None, threads + 1) and calls[0][1] == threads == torch.get_num_threads()
    assert confirm.evaluate(args, call, record) == first and len(calls) == 2  # reused, not scored again
    torch.save({"w": 2}, run_dir / "last.pt")  # the same run trained again, e.g. by a later follow-up
    assert confirm.evaluate(args, call, record) == first and len(calls) == 2
    (run_dir / "last.pt").unlink()  # another machine: the committed score is still read
    assert confirm.evaluate(args, call, record) == first
    torch.save({"w": 2}, run_dir / "last.pt")
    changed = {**record, "config_hash": "h2", "metrics": {"test": {"mAP": 0.40}}}  # another run: scored anew
    assert confirm.evaluate(SimpleNamespace(**{**vars(args), "report_only": True}), call, changed) is None
    assert not confirm.reproduces(confirm.evaluate(args, call, changed))
    stored = read_json(tmp_path / "files" / "fresh-dino-clock-t1-0.json")
    assert len(calls) == 4 and stored["test_recorded"]["mAP"] == 0.40 and stored["config_hash"] == "h2"


def test_the_fresh_split_is_laid_out_like_the_ab_test_split_and_made_once(tmp_path):
    from clock_deploy.data import kitti
    synth = SimpleNamespace(height=64, width=96, max_objects=2)
    args = SimpleNamespace(out=str(tmp_path), test_images=3)
    confirm.ensure_fresh_split(args, SimpleNamespace(data=SimpleNamespace(synth=synth)))
    root = confirm.fresh_root(args)
    assert root.endswith(f"synth_test3_s{confirm.FRESH_SEED}")
    assert len(kitti.read_split(root, "val")) == 3 and len(kitti.read_split(root, "train")) == 1
    marker = os.path.join(root, "kept")
    open(marker, "w").close()
    confirm.ensure_fresh_split(args, SimpleNamespace(data=SimpleNamespace(synth=synth)))
    assert os.path.exists(marker)  # an existing split is reused, never regenerated


def test_the_exploratory_table_pairs_the_chosen_row_with_kd_detr_seed_by_seed():
    record = lambda m: {"metrics": {"test": {k: m for k in ("mAP", "AP50", "AP75", "kitti_moderate")}}}  # noqa: E731
    baseline = {s: record(0.4) for s in range(3)}
    rows = {"baseline": baseline, "lcmd_only-t1": {s: record(0.4 + d) for s, d in enumerate([0.03, 0.05, 0.04])},
            "kd_detr-t1": {s: record(0.4 + d) for s, d in enumerate([0.01, 0.04, 0.04])}}
    lines = "\n".join(confirm.exploratory(baseline, rows, "lcmd_only"))
    # per seed +0.02, +0.01, 0.00 against KD-DETR: mean +0.01, sd 0.01
    assert "| lcmd_only-t1 minus KD-DETR | mAP | 3 | +0.0100 +- 0.0100 |" in lines
    assert "| kd_detr-t1 minus baseline | AP75 | 3 | +0.0300 +- 0.0173 |" in lines
    assert "baseline minus baseline" not in lines


def test_a_run_stopped_partway_is_not_scored_and_a_restore_trains_it_at_its_records_thread_count(
        monkeypatch, tmp_path):
    run_dir = tmp_path / "runs" / "dino-clock-t1-0"
    run_dir.mkdir(parents=True)
    torch.save({"w": 1}, run_dir / "last.pt")
    (run_dir / "config.yaml").write_text("seed: 0\n")
    (run_dir / "log.jsonl").write_text('{"epoch": 3, "iteration": 30, "loss": 1.0}\n')
    monkeypatch.setattr(confirm.ab, "test_metrics", lambda args, checkpoint, cfg, root=None: {"mAP": 0.5})
    args = SimpleNamespace(out=str(tmp_path), runs_dir=str(tmp_path / "files"), report_only=False, test_images=400)
    call = ("clock-t1", "dino", "distill.yaml", [], 0, 12, 11, None)
    threads = torch.get_num_threads()
    record = {"config_hash": "h", "metrics": {"test": {"mAP": 0.44}}, "threads": threads + 1}
    assert confirm.evaluate(args, call, record) is None  # its last.pt is not the end of training
    trained = []

    def fake_train(cfg):
        trained.append(torch.get_num_threads())
        with open(run_dir / "log.jsonl", "a") as f:
            f.write('{"event": "done", "epochs": 12}\n')
    monkeypatch.setattr(confirm.ab, "train", fake_train)
    monkeypatch.setattr(confirm.ab, "run_config", lambda args, *call: (SimpleNamespace(), None))
    result = confirm.restore(args, call, record)
    assert trained == [threads + 1] and torch.get_num_threads() == threads
    assert result["trained_again"] and result["fresh"]["mAP"] == 0.5 and not confirm.reproduces(result)
    assert read_json(tmp_path / "files" / "fresh-dino-clock-t1-0.json")["trained_again"]

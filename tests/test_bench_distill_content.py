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

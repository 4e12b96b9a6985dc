"""studies/distill_demo.py: the demo-budget study reads its verdict off paired run files."""
import pytest

from studies import distill_ab, distill_demo

pytestmark = pytest.mark.filterwarnings("ignore:Precision loss occurred:RuntimeWarning")
EPYC = {"cpu": "AMD EPYC", "capability": "AVX512", "threads": 2, "torch": "2.13"}


def demo_report(tmp_path, baseline, clock, family="dino"):
    """Write run records as the study writes them, then its report from them (--report-only)."""
    paths = ["--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs"),
             "--teachers-dir", str(tmp_path / "teachers")]
    args = distill_ab.parse_args(distill_demo.DEMO_BUDGET + paths + ["--families", family])
    registry = distill_ab.registry(args)
    tcfg = distill_ab.run_config(args, family, "teacher.yaml", [], 0, f"{family}-teacher")
    teacher = registry.record(f"{family}-teacher", tcfg, distill_ab.data_inputs(args), distill_ab.code_folders(tcfg),
                              metrics={"test": {"mAP": 0.45, "kitti_moderate": 80.0}}, parts=[EPYC], machine=EPYC,
                              resumed=False, weights={"file": "t.pt", "sha256": "0" * 64})
    teacher["checkpoint"] = "t.pt"
    for variant, values in (("baseline", baseline), ("clock", clock)):
        for seed, value in enumerate(values):
            name, cfg, inputs = distill_ab.student(args, family, variant, seed, teacher)
            registry.record(name, cfg, inputs, distill_ab.code_folders(cfg), family=family, variant=variant,
                            seed=seed, metrics={"test": {"mAP": value, "kitti_moderate": 100 * value}},
                            machine=EPYC, parts=[EPYC], resumed=False)
    results = tmp_path / "report.md"
    distill_demo.main(["--report-only", "--family", family, "--seeds", str(len(baseline)), "--results", str(results),
                       *paths])
    return results.read_text()


def test_the_demo_verdict_says_gains_only_when_the_lower_bound_is_above_zero(tmp_path):
    text = demo_report(tmp_path / "a", [0.20, 0.22, 0.24, 0.21], [0.23, 0.24, 0.27, 0.23])
    assert "Rule (written before the runs)" in text
    assert "Verdict on 4 paired seeds: CLoCK - baseline test mAP +0.0250" in text
    assert "distillation gains at the demo's budget" in text

    text = demo_report(tmp_path / "b", [0.20, 0.22, 0.24, 0.21], [0.23, 0.20, 0.25, 0.20])
    assert "Verdict on 4 paired seeds: CLoCK - baseline test mAP +0.0025" in text
    assert "**not shown to gain**" in text


def test_the_demo_verdict_waits_for_two_pairs(tmp_path):
    text = demo_report(tmp_path, [0.20], [0.25])
    assert "Verdict: nothing to read yet" in text


def test_the_rt_detr_demo_is_measured_with_its_own_configs(tmp_path):
    text = demo_report(tmp_path, [0.20, 0.22, 0.24], [0.25, 0.26, 0.30], family="rt_detr")
    assert "configs/demo/rt_detr_pipeline.yaml's configs (rt_detr)" in text
    assert "the demo pipeline keeps CLoCK (configs/demo/rt_detr_distill.yaml)" in text
    assert "### rt_detr" in text and "Verdict on 3 paired seeds: CLoCK - baseline test mAP +0.0500" in text

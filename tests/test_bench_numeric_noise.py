"""The reading of benchmarks/bench_numeric_noise.py (no training here)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_numeric_noise as noise  # noqa: E402


def run(m):
    return {"metrics": {"test": {"mAP": m, "kitti_moderate": 70.0}}}


def test_the_table_pairs_each_seeds_two_kernel_sets_and_reads_nothing_from_a_seed_with_one_run():
    runs = {("default", 0): run(0.40), ("avx2", 0): run(0.43), ("default", 1): run(0.50), ("avx2", 1): run(0.49),
            ("default", 2): run(0.9)}  # seed 2 has no AVX2 run yet
    text = "\n".join(noise.stats_lines(runs))
    assert "| 0 | 0.4000 | 0.4300 | +0.0300 |" in text and "| 1 | 0.5000 | 0.4900 | -0.0100 |" in text
    assert "| 2 |" not in text
    assert "2 seeds: +0.0100 +- 0.0283" in text and "root mean square 0.0224" in text  # sqrt((0.03² + 0.01²) / 2)
    assert "sd 0.0707" in text  # the default runs of seeds 0-1
    assert "not yet" in "\n".join(noise.stats_lines({("default", 0): run(0.4), ("avx2", 0): run(0.4)}))


def test_seeds_for_is_the_first_n_whose_t_interval_is_narrow_enough():
    from scipy import stats
    n = noise.seeds_for(0.02, 0.01)
    assert stats.t.ppf(0.975, n - 1) * 0.02 / n ** 0.5 <= 0.01 < stats.t.ppf(0.975, n - 2) * 0.02 / (n - 1) ** 0.5
    assert noise.seeds_for(0.0, 0.01) == 2


def test_each_kernel_set_is_named_by_the_environment_that_selects_it():
    assert noise.KERNELS["default"] == {}
    assert noise.KERNELS["avx2"]["ATEN_CPU_CAPABILITY"] == "avx2"


def test_repeatability_counts_seeds_whose_run_equals_the_earlier_one_on_the_same_cpu():
    def mine(m, cpu="Xeon"):
        return {"cpu": cpu, "metrics": {"test": {"mAP": m}}}

    def earlier(m, cpu="Xeon"):
        return {"cpu": cpu, "trained_again": True, "test_again": {"mAP": m}}
    runs = {("default", 0): mine(0.43833468), ("default", 1): mine(0.5), ("default", 2): mine(0.6, "EPYC")}
    text = "\n".join(noise.repeat_lines(runs, {0: earlier(0.438335), 1: earlier(0.500001), 2: earlier(0.6)}))
    assert "on 1 of 2 seeds (seeds 1 differ)" in text  # seed 2 trained on another CPU: not compared
    assert noise.repeat_lines(runs, {2: earlier(0.6)}) == []
    assert noise.repeat_lines(runs, {0: {**earlier(0.438335), "trained_again": False}}) == []

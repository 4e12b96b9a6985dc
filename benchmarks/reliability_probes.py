"""Run the test suite's reliability probes and write benchmarks/results/reliability.md.

The probes are the tests in tests/test_reliability.py (hostile paths, crashes, concurrent writers,
bounds, tampering, one-line errors) and the property-based fuzz tests in tests/test_fuzz_inputs.py.
This script runs them with pytest in this process, groups them into probe classes and lists, per
class, how many cases ran (a parametrization is a case, a fuzz test counts its generated examples)
and the outcome. A few minutes on two CPU cores.

    OMP_NUM_THREADS=1 python benchmarks/reliability_probes.py [--fuzz-scale 1] [--out benchmarks/results/reliability.md]
"""
import argparse
import datetime
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_FILES = ("tests/test_reliability.py", "tests/test_fuzz_inputs.py")

# probe class -> the test functions (name prefixes) that probe it, in report order
PROBE_CLASSES = {
    "Paths: nothing written outside the output, no dataset overwritten (split ids, manifests, symlinked folders, "
    "--name, --det inside --gt)": [
        "test_split_ids_that_leave", "test_eval_with_a_hostile_split", "test_calibration_manifest_ids",
        "test_synth_does_not_delete", "test_export_name_must_be", "test_eval_refuses_to_write"],
    "Atomic, world-readable writes; temporary files of killed writers": [
        "test_atomic_writes", "test_synthetic_dataset_and_checkpoints_are_world", "test_tmp_files_of_killed"],
    "Crash safety: kill -9 during training, evaluation errors, resume": [
        "test_kill_at_a_random_moment", "test_an_evaluation_error", "test_resume_of_a_finished",
        "test_resume_with_another_width"],
    "No silent overwrite (train into a finished run; pipeline skip / resume / force)": [
        "test_training_into_a_finished_run", "test_pipeline_skips"],
    "One writer per output: lock held by a second real process; stale lock of a killed one; symlinked lock": [
        "test_a_second_writer", "test_the_stale_lock", "test_a_symlinked_lock_file"],
    "Bounded inputs: config ranges, YAML alias bombs (in a 1 GiB setrlimit child), num_workers, short values": [
        "test_out_of_range_training", "test_each_bound", "test_bounded_values_reach", "test_values_in_errors",
        "test_num_workers_is_capped", "test_yaml_alias_bombs"],
    "Integrity: signed sidecars and embedded metadata, checkpoint checksums, stale artifacts": [
        "test_an_edited_sidecar", "test_a_sidecar_without_hashes", "test_a_lone_onnx", "test_sidecar_and_embedded",
        "test_a_bit_flipped_checkpoint", "test_a_checkpoint_without_checksum", "test_bench_freshness"],
    "One-line errors: broken configs, labels, images, checkpoints, sidecars; disk full; unwritable output": [
        "test_unwritable_output_and_full_disk", "test_broken_configs", "test_broken_label_files",
        "test_label_reader_accepts", "test_detections_are_read", "test_broken_images", "test_corrupt_checkpoints",
        "test_a_checkpoint_with_python_objects", "test_a_sidecar_with_fewer_classes",
        "test_checkpoints_with_the_right_tag", "test_resuming_an_imported", "test_a_full_disk",
        "test_export_out_under"],
    "Killed benches: measuring children and work folders": [
        "test_a_measuring_child_dies", "test_work_folders_of_killed"],
    "Fuzz: KITTI label files": ["test_kitti_label_reader"],
    "Fuzz: split files": ["test_split_reader"],
    "Fuzz: COCO json and dataset": ["test_coco_reader"],
    "Fuzz: config files": ["test_config_loader"],
    "Fuzz: config values through model building and a forward pass": ["test_fuzzed_config_values"],
    "Fuzz: calibration manifests": ["test_calibration_manifest_reader"],
    "Fuzz: artifact sidecars": ["test_sidecar_reader"],
    "Fuzz: checkpoints with damaged structure": ["test_checkpoints_with_damaged_structure"],
    "Fuzz: bit-flipped checkpoints": ["test_bit_flipped_checkpoints"],
    "Fuzz: bit-flipped ONNX files (lone and with sidecar)": ["test_bit_flipped_onnx"],
    "Fuzz: ONNX files with damaged embedded metadata": ["test_onnx_files_with_damaged"],
}
OTHER = "Other reliability probes"


class Recorder:
    """pytest plugin: the outcome of every test (a failed setup counts as failed)."""

    def __init__(self):
        self.outcomes = {}  # nodeid -> passed | failed | skipped

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            if self.outcomes.get(report.nodeid) != "failed":
                self.outcomes[report.nodeid] = report.outcome


def probe_class(test_name):
    return next((label for label, prefixes in PROBE_CLASSES.items()
                 if any(test_name.startswith(p) for p in prefixes)), OTHER)


def fuzz_cases():
    """Examples each fuzz test ran ({test name: count}), read from the test module pytest imported."""
    module = next((m for m in list(sys.modules.values())
                   if (getattr(m, "__file__", None) or "").endswith("test_fuzz_inputs.py")), None)
    return dict(getattr(module, "CASES", {}))


def summarize(outcomes, fuzz):
    """[(class, cases, tests, failed names, skipped)] in PROBE_CLASSES order."""
    rows = {}
    for nodeid, outcome in outcomes.items():
        name = nodeid.split("::")[-1].split("[")[0]
        row = rows.setdefault(probe_class(name), {"tests": set(), "cases": 0, "failed": [], "skipped": 0})
        if name not in row["tests"] and name in fuzz:
            row["cases"] += fuzz[name]
            row["refused"] = row.get("refused", 0) + fuzz.get(f"{name} refused", 0)
        elif name not in fuzz:
            row["cases"] += 1
        row["tests"].add(name)
        if outcome == "failed":
            row["failed"].append(nodeid.split("::")[-1])
        elif outcome == "skipped":
            row["skipped"] += 1
    order = list(PROBE_CLASSES) + [OTHER]
    return [(label, rows[label]) for label in order if label in rows]


def machine():
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    import torch
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}; 1-minute load average at the end {load:.1f} "
            "(a shared machine)")


def report(rows, fuzz, command, seconds, exit_code):
    total = sum(row["cases"] for _, row in rows)
    failed = sum(len(row["failed"]) for _, row in rows)
    lines = [
        "# Reliability probes",
        "",
        "The test suite's reliability probes (tests/test_reliability.py) and property-based fuzz tests "
        "(tests/test_fuzz_inputs.py), grouped by what they probe. A case is one parametrization of a probe, "
        "or one generated input of a fuzz test. A probe passes when the behaviour is correct or the input is "
        "refused with one `UserError` line naming the file or key (no traceback, no file touched outside the "
        "output).",
        "",
        f"Command: `{command}` ({datetime.date.today().isoformat()}, {seconds / 60:.1f} min, pytest exit code "
        f"{exit_code}).",
        f"Machine: {machine()}.",
        "",
        "| probe class | cases | outcome |",
        "|---|---:|---|",
    ]
    for label, row in rows:
        outcome = ("all passed" if not row["failed"] else
                   f"{len(row['failed'])} failed: {', '.join(row['failed'])}")
        if "refused" in row:  # a fuzz test: how its inputs were handled
            outcome += (f" ({row['refused']} refused with one line, {row['cases'] - row['refused']} accepted as "
                        "valid or unchanged)")
        if row["skipped"]:
            outcome += f" ({row['skipped']} skipped)"
        lines.append(f"| {label} | {row['cases']} | {outcome} |")
    lines += ["", f"**{total} cases in {len(rows)} probe classes; "
                  f"{'all passed' if not failed else f'{failed} tests failed'}.**"]
    if "models built and run" in fuzz:
        lines += ["", f"Of the fuzzed model configs, {fuzz['models built and run']} were valid and built a model "
                      "that ran a forward pass; the others were refused with one line."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fuzz-scale", type=float, default=1.0, help="Multiply the fuzz tests' example counts.")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "reliability.md"))
    args = parser.parse_args()
    os.environ["CLOCK_DEPLOY_FUZZ_SCALE"] = str(args.fuzz_scale)  # read when the fuzz module is imported
    sys.path.insert(0, REPO)
    import pytest

    from clock_deploy.io import write_text

    recorder = Recorder()
    start = time.time()
    exit_code = pytest.main(["-q", "-p", "no:cacheprovider", *[os.path.join(REPO, f) for f in PROBE_FILES]],
                            plugins=[recorder])
    fuzz = fuzz_cases()
    command = "OMP_NUM_THREADS=1 python benchmarks/reliability_probes.py" + (
        f" --fuzz-scale {args.fuzz_scale:g}" if args.fuzz_scale != 1 else "")
    write_text(args.out, report(summarize(recorder.outcomes, fuzz), fuzz, command, time.time() - start,
                                int(exit_code)))
    print(f"wrote {args.out}")
    return int(exit_code)


if __name__ == "__main__":
    sys.exit(main())

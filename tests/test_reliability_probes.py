"""benchmarks/reliability_probes.py: every probe has a class, and the note counts cases and failures."""
import ast
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import reliability_probes as probes  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_probe_test_belongs_to_a_probe_class():
    for name in probes.PROBE_FILES:
        with open(os.path.join(REPO, name)) as f:
            tests = [n.name for n in ast.parse(f.read()).body
                     if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
        assert tests and [t for t in tests if probes.probe_class(t) == probes.OTHER] == [], name


def test_the_note_counts_parametrizations_and_fuzz_examples_and_names_failures():
    outcomes = {"tests/test_reliability.py::test_each_bound_is_one_line_naming_the_key[a]": "passed",
                "tests/test_reliability.py::test_each_bound_is_one_line_naming_the_key[b]": "failed",
                "tests/test_reliability.py::test_num_workers_is_capped_at_the_cpu_count_with_a_warning": "passed",
                "tests/test_fuzz_inputs.py::test_sidecar_reader_raises_only_user_errors": "passed"}
    fuzz = {"test_sidecar_reader_raises_only_user_errors": 300,
            "test_sidecar_reader_raises_only_user_errors refused": 280}
    rows = dict(probes.summarize(outcomes, fuzz))
    bounds = rows[probes.probe_class("test_each_bound")]
    assert bounds["cases"] == 3 and bounds["failed"] == ["test_each_bound_is_one_line_naming_the_key[b]"]
    assert rows["Fuzz: artifact sidecars"]["cases"] == 300
    text = probes.report(list(rows.items()), fuzz, "cmd", 60, 1)
    assert ("| Fuzz: artifact sidecars | 300 | all passed (280 refused with one line, 20 accepted as valid or "
            "unchanged) |") in text
    assert "| 3 | 1 failed: test_each_bound_is_one_line_naming_the_key[b] |" in text
    assert "**303 cases in 2 probe classes; 1 tests failed.**" in text

"""benchmarks/gpu_check.py in its CPU smoke mode: every family trains, distils and is timed; the report
says it did not run on a GPU."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gpu_check  # noqa: E402

from clock_deploy.errors import UserError  # noqa: E402


def test_cpu_tiny_run_trains_distils_and_times_every_family(tmp_path):
    out = tmp_path / "gpu_check.md"
    families = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out)])
    assert list(families) == ["dab_detr", "deformable_detr", "dino", "rt_detr"]
    for family, result in families.items():
        teacher, student = result["teacher_train"], result["student_distill"]
        assert teacher["iterations"] == 2 and student["iterations"] == 2, family
        assert student["teacher_dtype"] == "bf16"
        # the student's loss holds CLoCK's terms, the teacher's none
        assert "loss_mem" in student["loss_terms"] and any(t.startswith("loss_logit") for t in student["loss_terms"])
        assert not any(t.startswith(("loss_mem", "loss_logit")) for t in teacher["loss_terms"])
        latency = result["latency_ms"]
        assert latency["fp32"]["runs"] == 2 and latency["fp32"]["p50"] > 0 and latency["half"]["p50"] > 0
        assert latency["half_finite"]
    text = out.read_text()
    assert "Not run on a GPU yet" in text
    assert all(sum(line.startswith(f"| {family} |") for line in text.splitlines()) == 1 for family in families)
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["device"] == "cpu" and set(data["families"]) == set(families)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="no CUDA GPU"):
        gpu_check.main(["--out", str(tmp_path / "g.md")])

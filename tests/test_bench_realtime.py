"""benchmarks/bench_realtime.py at a tiny size: the tables have the expected rows, the students are
matched in size, and the outputs-equal check catches a difference."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_realtime  # noqa: E402


def table_rows(markdown, first_cell):
    return [line for line in markdown.splitlines() if line.startswith(f"| {first_cell}")]


def test_tiny_run_writes_both_tables(tmp_path):
    out = tmp_path / "realtime.md"
    markdown, data = bench_realtime.main(["--tiny", "--runs", "2", "--steps", "1", "--ref-runs", "1",
                                          "--threads", "1", "--out", str(out)])
    assert out.read_text() == markdown
    students = data["students"]
    assert list(students)[0] == "rt_detr" and len(data["matched"]) == 2
    assert [name.rsplit("_enc", 1)[0] for name in data["matched"]] == ["dino", "deformable_detr"]
    target = students["rt_detr"]["parameters"]
    for name in data["matched"]:  # the matched depth brings them within a few percent of the RT-DETR student
        assert abs(students[name]["parameters"] - target) / target < 0.05, (name, students[name]["parameters"])
    for name, row in students.items():
        assert len(table_rows(markdown, f"{name} |")) == 1
        assert row["onnx_ms"]["runs"] == 2 and row["onnx_ms"]["p50"] > 0 and row["train_step_ms"]["p50"] > 0
    assert tuple(students["rt_detr"]["rt_detr_faster_by"]) == (1.0, 1.0)
    assert "At comparable parameter count: ONNX Runtime latency: RT-DETR is" in markdown
    (ref,) = data["reference"]["rows"]
    assert ref["outputs_equal"] and max(ref["max_abs_diff"]["paired"]) <= 1e-4
    assert all(ref["memory_mb"][impl] > 0 for impl in ("project", "transformers"))
    assert set(ref["latency_ms"]) == {"project", "project fused", "transformers", "transformers channels_last"}
    (line,) = table_rows(markdown, "64x96 |")
    assert "| yes |" in line
    assert json.loads((tmp_path / "realtime.json").read_text())["matched"] == data["matched"]


def test_outputs_equal_check_catches_a_difference(tmp_path):
    hf_model, _, model, _ = bench_realtime.build_reference_pair(tmp_path, small=True)
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    diffs = bench_realtime.output_differences(hf_model, model, images)
    assert bench_realtime.outputs_equal(diffs) and diffs["pairing_distance"] < 1e-4
    with torch.no_grad():
        model.class_embed[-1].bias.add_(1e-3)  # a change far below anything visible in detections
    diffs = bench_realtime.output_differences(hf_model, model, images)
    assert not bench_realtime.outputs_equal(diffs) and abs(diffs["paired"][0] - 1e-3) < 1e-4
    row = {"size": (64, 96), "diffs": diffs, "memory_mb": None,
           "latency": {impl: bench_realtime.summarize([1.0]) for impl in
                       ("project", "project fused", "transformers", "transformers channels_last")}}
    assert "| NO |" in bench_realtime.reference_table([row])[-1]


def test_verdict_says_whether_rt_detr_is_fastest():
    ratios = {"rt_detr": (1.0, 1.0), "dino_enc6": (1.5, 0.8), "deformable_detr_enc6": (1.2, 1.1)}
    text = bench_realtime.verdict(ratios, ["dino_enc6", "deformable_detr_enc6"])
    assert "ONNX Runtime latency: RT-DETR is the fastest of dino_enc6, deformable_detr_enc6; the next, " \
           "deformable_detr_enc6, takes 1.20x" in text
    assert "training step time: RT-DETR is NOT faster than dino_enc6, which takes 0.80x" in text

import csv
import json
import os
import struct

from rich.console import Console

from clock_deploy.measure.devices import DeviceProfile
from clock_deploy.measure.report import (BenchRow, NotRun, PLOT_DPI, PLOT_SIZE_IN, csv_text, load_warnings,
                                       pareto_front, print_report, read_reports, write_reports)


def make_row(model, backend, p50, mAP, gpu=None, kitti=(81.25, 70.0, 65.5)):
    return BenchRow(model=model, backend=backend, artifact=f"/tmp/{model}.{backend}", size_mb=12.345, images=20,
                    runs=100, batch=1, latency_mean=p50 + 0.5, latency_p50=p50, latency_p90=p50 + 1,
                    latency_p99=p50 + 2, latency_min=p50 - 1, latency_max=p50 + 3, throughput=1000 / (p50 + 0.5),
                    peak_rss_mb=512.4, gpu_mem_mb=gpu, mAP=mAP, AP50=0.6, AP75=0.25,
                    kitti_easy=kitti[0], kitti_moderate=kitti[1], kitti_hard=kitti[2],
                    metrics={"mAP": mAP, "kitti_Car_Easy": kitti[0]})


PROFILE = DeviceProfile(kind="jetson-orin", name="NVIDIA Jetson AGX Orin Developer Kit", threads=8,
                        threads_source="--threads", cuda=True,
                        facts={"power mode": "MAXN (mode 0)", "GPU clock": "306 MHz (scaling, 306-1300.5)"},
                        warnings=["clocks are NOT locked: latency will vary"])
ROWS = [make_row("teacher", "torch", 40.0, 0.5), make_row("student", "onnx", 10.0, 0.3, gpu=250.0),
        make_row("student", "onnx-int8", 12.0, 0.25, kitti=(None, None, None))]
NOT_RUN = [NotRun("trt-fp16", "TensorRT not installed (pip install clock-deploy[trt])"),
           NotRun("onnx-int8", "failed: bad calibration manifest", model="teacher")]
SETTINGS = {"split": "val", "images": 20, "warmup": 10, "runs": 100, "batch": 1}


def test_pareto_front_keeps_only_undominated_points():
    points = [(40, 50), (10, 30), (12, 25), (10, 20), (20, 50), (5, 10)]
    # (12,25) is beaten by (10,30); (10,20) by (10,30); (40,50) by (20,50)
    assert pareto_front(points) == [5, 1, 4]
    assert pareto_front([]) == []


def test_markdown_has_device_header_results_and_not_run_reasons(tmp_path):
    paths = write_reports(tmp_path, ROWS, NOT_RUN, PROFILE, SETTINGS)
    md = open(paths["md"]).read()
    assert "| device | jetson-orin |" in md
    assert "| threads | 8 (--threads) |" in md
    assert "| power mode | MAXN (mode 0) |" in md
    assert "| GPU clock | 306 MHz (scaling, 306-1300.5) |" in md
    assert "> **warning:** clocks are NOT locked" in md
    assert "| split | val |" in md
    # the summary, in the README's layout (GPU MB because one row measured it)
    assert ("| model | backend | size MB | p50 ms | p99 ms | img/s | peak RSS MB | GPU MB | mAP | AP50 "
            "| KITTI easy | KITTI mod | KITTI hard |\n|---|---|" + "|".join(["---:"] * 11) + "|") in md
    assert "| teacher | torch | 12.3 | 40.0 | 42.0 | 24.7 | 512 | - | 50.0 | 60.0 | 81.2 | 70.0 | 65.5 |" in md
    # every column: mAP 0.5 -> 50.0 %, missing GPU memory / KITTI / load -> '-'
    assert ("| model | backend | size MB | mean ms | p50 ms | p90 ms | p99 ms | p99/p50 | img/s | peak RSS MB "
            "| GPU MB | mAP | AP50 | AP75 | KITTI easy | KITTI mod | KITTI hard | load before | load after "
            "| steal % |") in md
    assert ("| teacher | torch | 12.3 | 40.50 | 40.00 | 41.00 | 42.00 | 1.05 | 24.7 | 512 | - | 50.0 | 60.0 | 25.0 "
            "| 81.2 | 70.0 | 65.5 | - | - | - |") in md
    assert "| student | onnx | 12.3 | 10.50 | 10.00 | 11.00 | 12.00 | 1.20 | 95.2 | 512 | 250 | 30.0 |" in md
    assert "| 25.0 | 60.0 | 25.0 | - | - | - | - | - | - | - |" in md  # onnx-int8: no KITTI, no load, not an engine
    assert md.count("| - | - | - | - |\n") == 3  # no load and no engine layers: 3 rows
    assert "not quiet" not in md
    not_run = md.split("## Not run")[1]
    assert "- trt-fp16 (all models): TensorRT not installed (pip install clock-deploy[trt])" in not_run
    assert "- onnx-int8 (teacher): failed: bad calibration manifest" in not_run
    assert "![Pareto plot: p50 latency vs mAP](pareto.png)" in md


def test_csv_and_json_keep_raw_values(tmp_path):
    paths = write_reports(tmp_path, ROWS, NOT_RUN, PROFILE, SETTINGS)
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [(r["model"], r["backend"]) for r in table] == [("teacher", "torch"), ("student", "onnx"),
                                                           ("student", "onnx-int8")]
    assert float(table[0]["mAP"]) == 0.5 and float(table[0]["latency_p99"]) == 42.0
    assert table[0]["gpu_mem_mb"] == "" and float(table[1]["gpu_mem_mb"]) == 250.0
    assert table[2]["kitti_moderate"] == ""
    assert table[0]["artifact"] == "/tmp/teacher.torch" and "metrics" not in table[0]

    data = json.load(open(paths["json"]))
    assert data["device"]["kind"] == "jetson-orin" and data["device"]["threads"] == 8
    assert data["device"]["warnings"] == PROFILE.warnings
    assert data["settings"] == SETTINGS
    assert data["results"][0]["metrics"] == {"mAP": 0.5, "kitti_Car_Easy": 81.25}
    assert data["results"][1]["gpu_mem_mb"] == 250.0
    assert data["not_run"] == [
        {"backend": "trt-fp16", "reason": "TensorRT not installed (pip install clock-deploy[trt])", "model": None},
        {"backend": "onnx-int8", "reason": "failed: bad calibration manifest", "model": "teacher"}]
    # dict rows work as well as dataclasses
    assert csv_text([{"model": "m", "backend": "torch", "mAP": 0.1}]).splitlines()[1].startswith("m,torch,")


def test_pareto_png_is_a_png_of_the_expected_size(tmp_path):
    paths = write_reports(tmp_path, ROWS, NOT_RUN, PROFILE, SETTINGS)
    with open(paths["png"], "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    assert (width, height) == (PLOT_SIZE_IN[0] * PLOT_DPI, PLOT_SIZE_IN[1] * PLOT_DPI)
    # atomic writes leave no temporary files behind
    assert sorted(os.listdir(tmp_path)) == ["bench.csv", "bench.json", "bench.md", "pareto.png"]


def test_no_results_writes_reasons_and_drops_a_stale_plot(tmp_path):
    write_reports(tmp_path, ROWS, [], PROFILE, SETTINGS)
    paths = write_reports(tmp_path, [], NOT_RUN, PROFILE, SETTINGS)
    assert "png" not in paths and not os.path.exists(tmp_path / "pareto.png")
    md = open(paths["md"]).read()
    assert "No model x backend combination ran." in md
    assert "trt-fp16 (all models): TensorRT not installed" in md
    assert open(paths["csv"]).read().count("\n") == 1  # header only


def test_terminal_table_lists_rows_warnings_and_not_run():
    console = Console(record=True, width=250)
    print_report(ROWS, NOT_RUN, PROFILE, console=console)
    text = console.export_text()
    assert "bench on jetson-orin: NVIDIA Jetson AGX Orin Developer Kit (8 threads)" in text
    assert "p50 ms" in text and "onnx-int8" in text and "40.0" in text and "KITTI easy" in text
    assert "warning: clocks are NOT locked" in text
    assert "not run: trt-fp16 (all models): TensorRT not installed (pip install clock-deploy[trt])" in text


def test_nan_metrics_show_as_missing_and_stay_valid_json(tmp_path):
    # KITTI AP of a difficulty without ground truth is nan: '-' in the table, empty in CSV, null in JSON
    row = make_row("student", "onnx", 10.0, 0.3, kitti=(float("nan"), 55.0, float("nan")))
    row.metrics = {"kitti_easy": float("nan"), "kitti_moderate": 55.0}
    paths = write_reports(tmp_path, [row], [], PROFILE, SETTINGS)
    md = open(paths["md"]).read()
    assert "| 30.0 | 60.0 | 25.0 | - | 55.0 | - |" in md
    assert "Every requested combination ran." in md
    table = list(csv.DictReader(open(paths["csv"])))
    assert table[0]["kitti_easy"] == "" and float(table[0]["kitti_moderate"]) == 55.0
    text = open(paths["json"]).read()
    assert "NaN" not in text
    data = json.loads(text)
    assert data["results"][0]["kitti_easy"] is None
    assert data["results"][0]["metrics"] == {"kitti_easy": None, "kitti_moderate": 55.0}


def test_rows_are_labelled_with_architecture_parameters_and_method(tmp_path):
    rows = [make_row("teacher", "torch", 40.0, 0.5), make_row("teacher", "onnx", 20.0, 0.5),
            make_row("distilled", "torch", 10.0, 0.3)]
    for row, arch, params, method in zip(rows, ("dino", "dino", "dab_detr"), (4_412_345, 4_412_345, 987_654),
                                         ("none", "none", "clock")):
        row.arch, row.params, row.method = arch, params, method
    md = open(write_reports(tmp_path, rows, [], PROFILE, SETTINGS)["md"]).read()
    assert "| teacher (DINO, 4.4 M params) | torch |" in md
    assert "| teacher | onnx |" in md  # the description once per model, as in the README
    assert "| distilled (DAB-DETR, 1.0 M params, CLoCK) | torch |" in md


def test_a_busy_machine_is_recorded_and_warned_about(tmp_path):
    quiet, busy, stolen = (make_row("student", b, 10.0, 0.3) for b in ("torch", "onnx", "onnx-int8"))
    quiet.load_before, quiet.load_after, quiet.steal_pct, quiet.cpus = 0.2, 1.9, 0.0, 2
    busy.load_before, busy.load_after, busy.steal_pct, busy.cpus = 3.5, 4.2, 0.0, 2
    stolen.load_before, stolen.load_after, stolen.steal_pct, stolen.cpus = 0.5, 0.6, 12.0, 2
    assert load_warnings([quiet]) == []
    (warning,) = load_warnings([quiet, busy, stolen])
    assert "not quiet during 2 of 3 measurements" in warning
    assert "load average up to 4.2 on 2 CPUs" in warning and "CPU steal up to 12%" in warning
    md = open(write_reports(tmp_path, [quiet, busy], [], PROFILE, SETTINGS)["md"]).read()
    assert "> **warning:** the machine was not quiet during 1 of 2 measurements" in md
    assert "| 3.5 | 4.2 | 0.0 |" in md  # load before / after, steal, per measurement


def test_unsteady_latency_is_warned_about():
    row = make_row("student", "onnx", 10.0, 0.3)
    row.latency_p99 = 35.0
    (warning,) = load_warnings([row, make_row("student", "torch", 10.0, 0.3)])
    assert "more than 2x p50 in 1 of 2 measurements (up to 3.5x)" in warning


def test_reports_read_back_as_written(tmp_path):
    write_reports(tmp_path, ROWS, NOT_RUN, PROFILE, SETTINGS)
    rows, not_run, profile, settings, files = read_reports(tmp_path)
    assert rows == ROWS and not_run == NOT_RUN and profile == PROFILE and settings == SETTINGS
    assert set(files) == {"md", "csv", "json", "png"}
    os.remove(tmp_path / "bench.md")
    assert read_reports(tmp_path)[4] == {}  # incomplete reports: measure again

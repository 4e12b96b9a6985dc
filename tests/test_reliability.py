"""Reliability: no path escapes, readable artifacts, crash-safe training, one-line errors.

Each test is a probe a careful user or a QA engineer ran against an earlier version (issue 14):
hostile split files and manifests, umask 022, kill -9 during training, broken images, labels,
configs, checkpoints and sidecars. They must give correct behaviour or one UserError line naming
the file. The property-based fuzz tests of the readers are in test_fuzz_inputs.py.
"""
import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from clock_deploy import io
from clock_deploy.cli import cli, run
from clock_deploy.config import dump, load_config
from clock_deploy.data import kitti
from clock_deploy.checkpoint import read_checkpoint
from clock_deploy.training.commands import run_training
from clock_deploy.errors import UserError
from clock_deploy.eval.commands import eval_cmd
from clock_deploy.eval.evaluator import write_kitti_detections
from clock_deploy.export.calibration import read_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAR = "Car 0.00 0 -1.58 587.01 173.33 614.12 200.12 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59"


def one_line(e):
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# ---------------------------------------------------------------- path traversal

@pytest.mark.parametrize("bad", ["../../x", "/abs/path", "..", ".hidden", "a/b", "a\\b", "x\x00y", "$(rm)"])
def test_split_ids_that_leave_the_dataset_are_refused_with_file_and_line(tmp_path, bad):
    root = tmp_path / "kitti"
    (root / "ImageSets").mkdir(parents=True)
    (root / "ImageSets" / "val.txt").write_text(f"000001\n{bad}\n")
    with pytest.raises(UserError) as e:
        kitti.read_split(root, "val")
    assert one_line(e).startswith(f"{root / 'ImageSets' / 'val.txt'}:2: invalid frame id")


def test_eval_with_a_hostile_split_file_writes_nothing_outside_det(tmp_path, synthetic_data):
    victim = tmp_path / "notes"
    victim.with_suffix(".txt").write_text("my notes\n")
    split = tmp_path / "split.txt"
    split.write_text(f"000000\n{victim}\n")
    det = tmp_path / "det"
    result = CliRunner().invoke(eval_cmd, ["--gt", synthetic_data, "--det", str(det), "--split", str(split),
                                           "--model", __file__])  # never run: the split fails first
    assert isinstance(result.exception, UserError)
    assert f"{split}:2: invalid frame id" in str(result.exception)
    assert victim.with_suffix(".txt").read_text() == "my notes\n"
    with pytest.raises(UserError, match="invalid frame id '../x'"):
        write_kitti_detections(str(det), ["../x"], [None], ["Car"])
    assert not (tmp_path / "x.txt").exists()


@pytest.mark.parametrize("frame_ids, message", [
    (["000001", "../../etc/passwd"], r"frame_ids\[1\]: invalid frame id"),
    (["/abs/path"], r"frame_ids\[0\]: invalid frame id"),
    ("000001", "frame_ids must be a list"),  # a string would be read letter by letter
    ([1, 2], r"frame_ids\[0\]: invalid frame id 1"),
])
def test_calibration_manifest_ids_are_checked(tmp_path, frame_ids, message):
    path = tmp_path / "calib.json"
    path.write_text(json.dumps({"format": "clock-deploy-calibration-v1", "dataset_root": "data",
                                "split": "train", "frame_ids": frame_ids}))
    with pytest.raises(UserError, match=f"{path}: {message}"):
        read_manifest(path)


# ---------------------------------------------------------------- atomic writes

def test_atomic_writes_follow_the_umask_and_fsync(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    old = os.umask(0o022)
    try:
        io.write_json(tmp_path / "a.json", {"a": 1})
        io.torch_save({"x": torch.zeros(2)}, tmp_path / "b.pt")
        with io.atomic_path(tmp_path / "sub" / "c.onnx") as tmp:
            with open(tmp, "wb") as f:
                f.write(b"model")
        os.umask(0o077)
        io.write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(old)
    for name in ("a.json", "b.pt", "sub/c.onnx"):
        assert oct(os.stat(tmp_path / name).st_mode & 0o777) == oct(0o644), name
    assert os.stat(tmp_path / "private.txt").st_mode & 0o777 == 0o600
    assert len(synced) >= 8  # each of the 4 files and its folder
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_synthetic_dataset_and_checkpoints_are_world_readable(tmp_path, make_synthetic_data):
    old = os.umask(0o022)
    try:
        root = make_synthetic_data(tmp_path / "synth", num_images=2)
    finally:
        os.umask(old)
    for folder, _, files in os.walk(root):
        for name in files:
            assert os.stat(os.path.join(folder, name)).st_mode & 0o777 == 0o644, name


def test_tmp_files_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "last.pt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"last.pt.{int(dead.stdout)}-0123abcd.tmp"
    live = tmp_path / f"last.pt.{os.getppid()}-0123abcd.tmp"  # a concurrent writer that is still running
    stale.write_bytes(b"x" * 1000)
    live.write_bytes(b"x")
    io.write_text(target, "new")
    assert target.read_text() == "new" and not stale.exists() and live.exists()


def test_unwritable_output_and_full_disk_are_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError) as e:
        io.write_json(blocker / "out" / "report.json", {})
    assert one_line(e).startswith(f"cannot write {blocker / 'out' / 'report.json'}: ")

    def full_disk(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing "
                           "file data/0: file write failed")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError,
                       match=r"cannot write .*last.pt: writing the checkpoint failed \(is the disk full\?\)"):
        io.torch_save({}, tmp_path / "last.pt")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


# ---------------------------------------------------------------- training crash windows

def _train_script(config):
    return (f"import sys; sys.path.insert(0, {REPO!r})\n"
            "import torch; torch.set_num_threads(1)\n"
            "from clock_deploy.config import load_config\n"
            "from clock_deploy.training.commands import run_training\n"
            f"run_training(load_config({str(config)!r}), progress=False)\n")


KILL_RUN = ["train.epochs=4", "train.eval_every=1", "train.lr_drop_epochs=[3]"]


def _json(metrics):
    return json.dumps(metrics, sort_keys=True)  # NaN (no ground truth) compares equal as text


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_at_a_random_moment_then_resume_matches_an_uninterrupted_run(tmp_path, synthetic_data,
                                                                          make_train_config):
    straight = tmp_path / "straight"
    run_training(make_train_config(synthetic_data, str(straight), extra=KILL_RUN), progress=False)

    # kill -9 a training process at a random moment after its training started (a new moment on
    # every run of the suite: epochs, evaluations and checkpoint writes all get hit over time)
    killed = tmp_path / "killed"
    config = tmp_path / "killed.yaml"  # what the child trains
    dump(make_train_config(synthetic_data, str(killed), extra=KILL_RUN), config)
    proc = subprocess.Popen([sys.executable, "-c", _train_script(config)],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (killed / "log.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    delay = random.uniform(0.0, 1.5)
    time.sleep(delay)
    proc.kill()
    proc.wait()
    resumed = os.path.isfile(killed / "last.pt")
    run_training(make_train_config(synthetic_data, str(killed), extra=KILL_RUN), resume=resumed, progress=False)

    why = f"killed {delay:.2f} s after training started, exit code {proc.returncode}"
    for name in ("last.pt", "best.pt"):
        a, b = read_checkpoint(straight / name), read_checkpoint(killed / name)
        assert (a["epoch"], a["iteration"], _json(a["metrics"])) == (b["epoch"], b["iteration"], _json(b["metrics"])), \
            (name, why)
        assert _same_weights(a["model"], b["model"]), (name, why)
    assert (straight / "metrics.json").read_text() == (killed / "metrics.json").read_text(), why
    assert not [f for f in os.listdir(killed) if f.endswith(".tmp")], why


def test_an_evaluation_error_keeps_the_trained_epoch_and_resume_evaluates_it(tmp_path, synthetic_data,
                                                                             make_train_config, monkeypatch):
    from clock_deploy.training import trainer
    out = tmp_path / "run"
    cfg = make_train_config(synthetic_data, str(out), extra=["train.epochs=1", "train.eval_every=1"])
    real = trainer.evaluate_model
    monkeypatch.setattr(trainer, "evaluate_model", lambda *a, **k: (_ for _ in ()).throw(OSError("eval crashed")))
    with pytest.raises(OSError):
        run_training(cfg, progress=False)
    assert read_checkpoint(out / "last.pt")["epoch"] == 1  # the epoch was saved before evaluating
    assert not (out / "best.pt").exists() and not (out / "metrics.json").exists()
    monkeypatch.setattr(trainer, "evaluate_model", real)
    run_training(cfg, resume=True, progress=False)
    assert read_checkpoint(out / "best.pt")["epoch"] == 1
    assert json.loads((out / "metrics.json").read_text())["epoch"] == 1
    assert read_checkpoint(out / "last.pt")["metrics"]["epoch"] == 1


def test_resume_of_a_finished_run_repairs_missing_best_and_metrics(tmp_path, synthetic_data, make_train_config):
    out = tmp_path / "run"
    cfg = make_train_config(synthetic_data, str(out), extra=["train.epochs=1", "train.eval_every=1"])
    run_training(cfg, progress=False)
    expected = (out / "metrics.json").read_text()
    os.remove(out / "best.pt")
    (out / "metrics.json").write_text("{}")  # stale
    run_training(cfg, resume=True, progress=False)
    assert read_checkpoint(out / "best.pt")["epoch"] == 1
    assert (out / "metrics.json").read_text() == expected


def test_resume_with_another_width_is_one_line_and_keeps_config_yaml(tmp_path, synthetic_data, make_train_config):
    out = tmp_path / "run"
    run_training(make_train_config(synthetic_data, str(out), extra=["train.epochs=1", "train.eval_every=-1"]),
                 progress=False)
    saved = (out / "config.yaml").read_text()
    wider = make_train_config(synthetic_data, str(out),
                              extra=["train.epochs=2", "train.eval_every=-1", "model.ffn_dim=128"])
    with pytest.raises(UserError) as e:
        run_training(wider, resume=True, progress=False)
    assert one_line(e).startswith(f"resume: {out / 'last.pt'} does not fit the configured dino model")
    assert (out / "config.yaml").read_text() == saved


@pytest.mark.parametrize("value, message", [
    ("train.epochs=-2", "'train.epochs' must be greater than 0, got -2"),
    ("train.batch_size=-4", "'train.batch_size' must be greater than 0, got -4"),
    ("train.lr=-1", "'train.lr' must be greater than 0"),
    ("train.lr=.nan", "'train.lr' must be a finite number"),
])
def test_out_of_range_training_numbers_are_refused(value, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [value])


# ---------------------------------------------------------------- configs

@pytest.mark.parametrize("text, message", [
    ("train:\n  lr: 1.0\n  lr: 2.0\n", r"c.yaml:3: invalid YAML: duplicate key 'lr' \(first on line 2\)"),
    ("_base_: [x.yaml, 5]\n", r"c.yaml:1: _base_ must be a file name or a list of file names"),
    ("_base_: sub\n", r"sub: is a folder, expected a YAML config file"),
    (b"\xff\xfe\x00binary\x00", r"c.yaml: not a UTF-8 text file"),
])
def test_broken_configs_are_one_line(tmp_path, text, message):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UserError) as e:
        load_config(str(path))
    assert re.search(message, one_line(e))


# ---------------------------------------------------------------- labels

@pytest.mark.parametrize("content, message", [
    (b"\xff\xd8\xff\xe0 binary", "not a UTF-8 text file"),
    ((CAR.replace("587.01", "1e30") + "\n").encode(), r":1: value out of range"),
    ((CAR.replace("587.01", "1e300") + "\n").encode(), r":1: value out of range"),
    ((CAR.replace(" 0 -1.58", " 1e20 -1.58") + "\n").encode(), r":1: value out of range .*: 1e20"),
    ((CAR.replace(" 0 -1.58", " 7 -1.58") + "\n").encode(), r":1: occluded must be an integer level -1..3"),
])
def test_broken_label_files_are_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "000001.txt"
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        kitti.read_label(path)
    assert str(path) in one_line(e) and re.search(message, str(e.value))


def test_label_reader_accepts_a_bom_and_names_a_folder(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(("\ufeff" + CAR + "\n").encode())
    assert list(kitti.read_label(path)["name"]) == ["Car"]
    with pytest.raises(UserError, match=f"{tmp_path}: is a folder, expected a label file"):
        kitti.read_label(tmp_path)


def test_detections_are_read_as_the_devkit_does_but_ground_truth_stays_strict(tmp_path, synthetic_data):
    det = tmp_path / "det"
    det.mkdir()
    gt = kitti.read_label(kitti.label_path(synthetic_data, "000000"))
    flipped = gt["bbox"][:1].copy()
    flipped[:, [1, 3]] = flipped[:, [3, 1]]  # y2 < y1
    lines = kitti.format_label({**{k: v[:1] for k, v in gt.items()}, "bbox": flipped, "score": np.ones(1)})
    lower = kitti.format_label({**gt, "score": np.ones(len(gt["name"]))}).replace(gt["name"][0], gt["name"][0].lower())
    (det / "000000.txt").write_text(lines + lower)
    split = tmp_path / "split.txt"
    split.write_text("000000\n")
    result = CliRunner().invoke(eval_cmd, ["--gt", synthetic_data, "--det", str(det), "--split", str(split),
                                           "--coco", "--json", str(tmp_path / "lower.json")])
    assert result.exit_code == 0, result.output
    count = 1 + sum(n == gt["name"][0] for n in gt["name"])
    assert f"warning: {count} detections in {det} have a lowercase class name or y2 < y1" in result.output
    # case is ignored: the same detections with KITTI's capitalization give the same metrics
    proper = tmp_path / "proper"
    proper.mkdir()
    (proper / "000000.txt").write_text(lines + kitti.format_label({**gt, "score": np.ones(len(gt["name"]))}))
    result = CliRunner().invoke(eval_cmd, ["--gt", synthetic_data, "--det", str(proper), "--split", str(split),
                                           "--coco", "--json", str(tmp_path / "proper.json")])
    assert "warning: 1 detections" in result.output
    assert (tmp_path / "lower.json").read_text() == (tmp_path / "proper.json").read_text()
    with pytest.raises(UserError, match="negative box size"):
        path = tmp_path / "gt.txt"
        path.write_text(lines.rsplit(" ", 1)[0] + "\n")  # the same line as ground truth (15 columns)
        kitti.read_label(path)


# ---------------------------------------------------------------- images

def _break_image(path, kind):
    data = open(path, "rb").read()
    os.remove(path)
    if kind == "truncated":
        open(path, "wb").write(data[:len(data) // 2])
    elif kind == "garbage":
        open(path, "wb").write(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    else:
        os.mkdir(path)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "directory"])
def test_broken_images_are_one_line_in_train_convert_and_calibrate(tmp_path, kind, capsys, make_synthetic_data,
                                                                   make_train_config):
    root = make_synthetic_data(tmp_path / "synth")  # its own copy: an image gets broken
    image = kitti.image_path(root, kitti.read_split(root, "train")[0])
    _break_image(image, kind)
    expected = f"{image}: " if kind != "directory" else f"{image}"
    for argv in (["data", "convert", "--kitti", root, "--split", "train", "--out", str(tmp_path / "c.json")],
                 ["calibrate", "--data", root, "--split", "train", "--num", "2", "--out", str(tmp_path / "m.json")]):
        with pytest.raises(SystemExit) as e:
            run(cli, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {expected}") and err.count("\n") == 1, err
    cfg = make_train_config(root, str(tmp_path / "run"), extra=["train.epochs=1", "train.eval_every=-1"])
    with pytest.raises(UserError) as e:
        run_training(cfg, progress=False)
    assert expected in one_line(e)
    # with DataLoader workers the error travels through a worker process and still ends as one line
    cfg.data.num_workers = 1
    dump(cfg, tmp_path / "workers.yaml")
    with pytest.raises(SystemExit):
        run(cli, ["train", "--cfg", str(tmp_path / "workers.yaml")])
    err = capsys.readouterr().err  # the progress bar, then the error
    assert err.splitlines()[-1].startswith(f"error: {expected}") and "Traceback" not in err, err


# ---------------------------------------------------------------- checkpoints and sidecars

@pytest.mark.parametrize("content, message", [
    (b"", r"not a readable checkpoint \(empty file\)"),
    (os.urandom(64), r"not a readable checkpoint"),
])
def test_corrupt_checkpoints_are_one_line_without_the_weights_only_hint(tmp_path, content, message):
    path = tmp_path / "last.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as e:
        read_checkpoint(path)
    assert "weights_only" not in one_line(e)


def test_a_checkpoint_with_python_objects_is_refused_without_the_weights_only_hint(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "clock-deploy-checkpoint-v1", "obj": random.Random()}, path)
    with pytest.raises(UserError, match="refused because loading them could run code") as e:
        read_checkpoint(path)
    assert "weights_only" not in one_line(e)


def test_a_sidecar_with_fewer_classes_than_the_model_outputs_is_one_line():
    from clock_deploy.runtime.detector import Detector

    class TwoLabels:  # a backend whose model predicts class 2
        max_batch, static = 1, False

        def __call__(self, batch):
            return np.ones((1, 1), np.float32), np.full((1, 1), 2), np.zeros((1, 1, 4), np.float32)

    meta = {"classes": ["Car", "Pedestrian"], "input": {"height": 8, "width": 8, "mean": [0, 0, 0],
                                                       "std": [1, 1, 1], "divisor": 255.0}}
    with pytest.raises(UserError, match=r"returned class 2 but its metadata lists only 2 classes"):
        Detector(TwoLabels(), meta)(np.zeros((8, 8, 3), np.uint8))


def test_bench_freshness_rejects_an_artifact_that_differs_from_its_sidecar(tmp_path):
    from clock_deploy.artifact import batch_spec, build_metadata, write_metadata
    from clock_deploy.measure.exports import is_fresh

    artifact = tmp_path / "m.onnx"
    artifact.write_bytes(b"old model")
    write_metadata(artifact, build_metadata(kind="onnx", arch="dino", classes=["Car"], height=8, width=8,
                                            mean=[0, 0, 0], std=[1, 1, 1], precision="fp32", topk=10,
                                            batch=batch_spec(True, 1)))
    assert is_fresh(str(artifact), [], batch=1)
    artifact.write_bytes(b"new model, crash before its sidecar")
    assert not is_fresh(str(artifact), [], batch=1)


# ---------------------------------------------------------------- leftovers of a killed bench

def test_a_measuring_child_dies_with_its_killed_bench(tmp_path):
    pid_file = tmp_path / "child.pid"
    child = (f"import sys, os, time; sys.path.insert(0, {REPO!r}); "
             "from clock_deploy.measure.job import _die_with_parent; _die_with_parent(); "
             f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    parent = ("import os, subprocess, sys, time; "
              "env = dict(os.environ, CLOCK_DEPLOY_BENCH_PARENT=str(os.getpid())); "
              f"subprocess.Popen([sys.executable, '-c', {child!r}], env=env); time.sleep(60)")
    bench = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.time() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    child_pid = int(pid_file.read_text())
    bench.kill()
    bench.wait()
    deadline = time.time() + 10
    while io.pid_alive(child_pid) and time.time() < deadline:
        time.sleep(0.05)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child_pid, os.WNOHANG)  # not our child: only reaped by init
    assert not io.pid_alive(child_pid) or _is_zombie(child_pid)


def _is_zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_work_folders_of_killed_benches_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"clock-deploy-bench-{int(dead.stdout)}-abc"
    mine = tmp_path / f"clock-deploy-bench-{os.getpid()}-abc"
    for folder in (stale, mine):
        folder.mkdir()
        (folder / "job.json").write_text("{}")
    io.remove_stale_folders(str(tmp_path), "clock-deploy-bench-")
    assert not stale.exists() and mine.exists()
    shutil.rmtree(mine)


# ---------------------------------------------------------------- issue 40: nothing outside the output is touched

def cli_error(capsys, argv):
    """Run the CLI, expect exit code 2 and one error line; return that line."""
    with pytest.raises(SystemExit) as e:
        run(cli, argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, make_tiny_student, student_io):
    from clock_deploy.checkpoint import save_checkpoint
    model, cfg = make_tiny_student("deformable_detr", "gather")
    path = tmp_path_factory.mktemp("ckpt") / "student.pt"
    save_checkpoint(path, model, cfg, student_io.classes, epoch=1, iteration=1)
    return path


def test_synth_does_not_delete_through_a_symlinked_label_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the reproducer, as typed
    victim, out = tmp_path / "victim", tmp_path / "out"
    victim.mkdir()
    (out / "training").mkdir(parents=True)
    (victim / "notes.txt").write_text("precious\n")
    (out / "synthetic.json").write_text("{}")
    os.symlink(victim, out / "training" / "label_2")
    line = cli_error(capsys, ["data", "synth", "--out", "out", "--num-images", "2"])
    assert line == (f"error: out/training/label_2 leads outside the output folder out (a symlink to {victim}); "
                    "refusing to write through it")
    assert os.listdir(victim) == ["notes.txt"] and (victim / "notes.txt").read_text() == "precious\n"


@pytest.mark.parametrize("name", ["../escaped", "/abs/x", "a/b", "..", ""])
def test_export_name_must_be_a_plain_file_name(tmp_path, capsys, tiny_checkpoint, name):
    out = tmp_path / "out"
    line = cli_error(capsys, ["export", "--ckpt", str(tiny_checkpoint), "--out", str(out), "--name", name])
    assert line == f"error: --name must be a plain file name (no folders, '..' or absolute path), got {name!r}"
    assert not out.exists() and not (tmp_path / "escaped.onnx").exists()


@pytest.mark.parametrize("where", ["training/label_2", "training", "."])
def test_eval_refuses_to_write_detections_into_the_dataset(tmp_path, capsys, make_synthetic_data, tiny_checkpoint,
                                                            where):
    root = make_synthetic_data(tmp_path / "data", 4)
    labels = {f: (tmp_path / "data" / "training" / "label_2" / f).read_text()
              for f in os.listdir(tmp_path / "data" / "training" / "label_2")}
    det = os.path.join(root, where, "det") if where != "training/label_2" else os.path.join(root, where)
    # a label folder as --gt protects its dataset's training/ folder; a root as --gt protects all of it
    for gt in (root, os.path.join(root, "training", "label_2"))[:1 if where == "." else 2]:
        line = cli_error(capsys, ["eval", "--gt", gt, "--det", det, "--model", str(tiny_checkpoint)])
        assert line.startswith(f"error: --det {det} is inside the dataset folder ") and "that --gt reads" in line
    assert {f: (tmp_path / "data" / "training" / "label_2" / f).read_text()
            for f in os.listdir(tmp_path / "data" / "training" / "label_2")} == labels


# ---------------------------------------------------------------- issue 40: no silent overwrite

def test_training_into_a_finished_run_needs_resume_or_overwrite(tmp_path, capsys, synthetic_data, make_train_config):
    out = tmp_path / "run"
    cfg = make_train_config(synthetic_data, str(out), extra=["train.epochs=1", "train.eval_every=0"])
    run_training(cfg, progress=False)
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.json")}
    dump(cfg, tmp_path / "run.yaml")
    line = cli_error(capsys, ["train", "--cfg", str(tmp_path / "run.yaml")])
    assert line == (f"error: {out} holds a run (last.pt, metrics.json): pass --resume to continue it or "
                    "--overwrite to replace it (or choose another --output-dir)")
    assert {name: (out / name).read_bytes() for name in before} == before
    assert cli_error(capsys, ["train", "--cfg", str(tmp_path / "run.yaml"), "--resume", "--overwrite"]) == \
        "error: --resume and --overwrite exclude each other: continue the run or replace it"

    (out / "log.jsonl").write_text('{"event": "from the old run"}\n')
    run(cli, ["train", "--cfg", str(tmp_path / "run.yaml"), "--overwrite", "train.eval_every=-1"])
    assert not (out / "best.pt").exists() and not (out / "metrics.json").exists()  # nothing of the old run stays
    assert "old run" not in (out / "log.jsonl").read_text()
    assert read_checkpoint(out / "last.pt")["epoch"] == 1 and (out / "last.pt").read_bytes() != before["last.pt"]


def test_pipeline_skips_finished_stages_resumes_stopped_ones_and_replaces_forced_ones(tmp_path, monkeypatch,
                                                                                       tiny_checkpoint):
    from clock_deploy import pipeline
    from clock_deploy.pipeline import Pipeline
    calls = []
    monkeypatch.setattr(pipeline, "run_training", lambda cfg, **kw: calls.append(kw))
    pipe = object.__new__(Pipeline)  # only what Pipeline.train reads
    pipe.out, pipe.force = str(tmp_path), set()
    (tmp_path / "teacher").mkdir()
    shutil.copy(tiny_checkpoint, tmp_path / "teacher" / "last.pt")  # epoch 1
    cfg = load_config(None, ["train.epochs=1"])
    pipe.train("teacher", cfg)
    assert calls == []
    pipe.train("teacher", load_config(None, ["train.epochs=3"]))
    assert calls == [{"resume": True, "overwrite": False}]
    pipe.force = {"teacher"}
    pipe.train("teacher", cfg)
    assert calls[-1] == {"resume": False, "overwrite": True}


# ---------------------------------------------------------------- issue 40: one writer per output

HOLD_LOCK = ("import sys; sys.path.insert(0, {repo!r})\n"
             "from clock_deploy.lock import output_lock\n"
             "with output_lock({folder!r}, 'train'):\n"
             "    print('locked', flush=True)\n"
             "    sys.stdin.read()\n")


@contextlib.contextmanager
def lock_holder(folder):
    """Another process holding the lock of `folder` until the block ends (or it is killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(repo=REPO, folder=str(folder))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait(timeout=30)


def test_a_second_writer_of_a_folder_is_refused_naming_the_holder(tmp_path, capsys, synthetic_data,
                                                                   make_train_config, tiny_checkpoint):
    import socket
    out = tmp_path / "out"
    cfg = make_train_config(synthetic_data, str(out), extra=["train.epochs=1", "train.eval_every=-1"])
    dump(cfg, tmp_path / "train.yaml")
    distill = make_train_config(synthetic_data, str(out), extra=["distill.method=clock", "distill.teacher=t.pt"])
    dump(distill, tmp_path / "distill.yaml")
    commands = {
        "train": ["train", "--cfg", str(tmp_path / "train.yaml")],
        "distill": ["distill", "--cfg", str(tmp_path / "distill.yaml")],
        "export": ["export", "--ckpt", str(tiny_checkpoint), "--out", str(out)],
        "bench": ["bench", "--models", str(tiny_checkpoint), "--data", synthetic_data, "--out", str(out),
                  "--backends", "torch", "--runs", "1", "--warmup", "0", "--max-images", "1"],
    }
    with lock_holder(out) as holder:
        for name, argv in commands.items():
            line = cli_error(capsys, argv)
            assert line.startswith(f"error: {out} is being written by `train` (pid {holder.pid} on host "
                                   f"{socket.gethostname()}, started "), (name, line)
        assert os.listdir(out) == [".clock-deploy.lock"]  # none of them wrote anything
    assert not out.joinpath(".clock-deploy.lock").exists()  # released on exit
    run_training(cfg, progress=False)  # the folder is free again
    assert read_checkpoint(out / "last.pt")["epoch"] == 1


def test_the_stale_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
    from clock_deploy.lock import LOCK_NAME, output_lock
    with lock_holder(tmp_path) as holder:
        holder.kill()
        holder.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid  # left behind by kill -9
    with output_lock(tmp_path, "export"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        with output_lock(tmp_path, "export"):  # nested in one process: allowed
            pass
        assert (tmp_path / LOCK_NAME).exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"taking over the lock of `train` (pid {holder.pid} on host" in warnings[0]
    assert not (tmp_path / LOCK_NAME).exists()

    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "train"}))
    with pytest.raises(UserError) as e:
        with output_lock(tmp_path, "train"):
            pass
    assert one_line(e).startswith(f"{tmp_path} is locked by `train` (pid 1 on host elsewhere")


# ---------------------------------------------------------------- issue 40: bounded inputs

@pytest.mark.parametrize("override, message", [
    ("data.img_size=[100000, 100000]", r"'data.img_size\[0\]' must be an integer from 32 to 4096, got 100000"),
    ("data.img_size=[64]", "'data.img_size' must have 2 entries, got \\[64\\]"),
    ("data.img_size=[64, 8]", r"'data.img_size\[1\]' must be an integer from 32 to 4096, got 8"),
    ("data.img_size=[32, 32]", r"data.img_size 32x32 leaves a 1x1 feature map at stride 64 "
                               r"\(model.backbone.return_levels \[1, 2, 3\], model.num_feature_levels 4\)"),
    ("train.batch_size=100000", "'train.batch_size' must be at most 4096, got 100000"),
    ("model.num_queries=1000000", "'model.num_queries' must be at most 10000, got 1000000"),
    ("model.dn.num_queries=-1", "'model.dn.num_queries' must be at least 0, got -1"),
    (f"model.n_points={2**63}", f"'model.n_points' must be at most 64, got {2**63}"),
    ("model.num_feature_levels=9", "'model.num_feature_levels' must be at most 8, got 9"),
    ("model.hidden_dim=1000000", "'model.hidden_dim' must be at most 65536, got 1000000"),
    ("model.dec_layers=1000", "'model.dec_layers' must be at most 64, got 1000"),
    ("model.backbone.return_levels=[[1], 2, 3]",
     r"'model.backbone.return_levels\[0\]' must be an integer from 0 to 3, got \[1\]"),
    ("model.backbone.return_levels=[1, 4]", r"'model.backbone.return_levels\[1\]' must be an integer from 0 to 3"),
    ("model.backbone.return_levels=[]", "'model.backbone.return_levels' must have 1 to 4 entries, got \\[\\]"),
    ("model.backbone.return_levels=[2, 2]", "'model.backbone.return_levels' must not repeat an entry"),
    ("train.lr_drop_epochs=[null]", r"'train.lr_drop_epochs\[0\]' must be an integer from 0 to 100000, got None"),
    ("train.lr_drop_epochs=[-3]", r"'train.lr_drop_epochs\[0\]' must be an integer from 0 to 100000, got -3"),
    ("seed=-1", "'seed' must be at least 0, got -1"),
    ("seed=1e20", "'seed' must be an integer, got '1e20'"),
    ("seed=1.0e+20", "'seed' must be an integer, got 1e\\+20"),
    (f"seed={2**32}", f"'seed' must be at most {2**32 - 1}, got {2**32}"),
    ("data.synth.seed=-5", "'data.synth.seed' must be at least 0, got -5"),
    ("device=tpu", "'device' must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("device=cuda:x", "'device' must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    ("export.topk=0", "'export.topk' must be greater than 0, got 0"),
])
def test_each_bound_is_one_line_naming_the_key(override, message):
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    assert re.fullmatch(f"command line '{re.escape(override)}': {message}.*", one_line(e))


def test_bounded_values_reach_the_cli_as_one_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("seed: -1\n")
    assert cli_error(capsys, ["train", "--cfg", str(tmp_path / "c.yaml")]) == \
        f"error: {tmp_path / 'c.yaml'}:1: 'seed' must be at least 0, got -1"


def test_values_in_errors_are_shortened(tmp_path):
    (tmp_path / "c.yaml").write_text(f"seed: [{', '.join(['123456789'] * 5000)}]\noutput_dir: {{a: 1}}\n")
    with pytest.raises(UserError) as e:
        load_config(str(tmp_path / "c.yaml"))
    assert one_line(e) == (f"{tmp_path / 'c.yaml'}:1: 'seed' must be an integer, got [123456789, 123456789, "
                           "123456789, 123456789, 123456789, 123456789, 123456789,...")


def test_num_workers_is_capped_at_the_cpu_count_with_a_warning(caplog):
    cfg = load_config(None, ["data.num_workers=1000000"])
    assert cfg.data.num_workers == os.cpu_count()
    assert [r.getMessage() for r in caplog.records] == [
        f"command line 'data.num_workers=1000000': data.num_workers=1000000 is more than the {os.cpu_count()} "
        f"CPUs here; using {os.cpu_count()}"]
    assert load_config(None, ["data.num_workers=1"]).data.num_workers == 1


BOMB = "a: &a [" + ",".join(["lol"] * 9) + "]\n" + "".join(
    f"{b}: &{b} [{','.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("text, message", [
    (BOMB, r"c.yaml:1: invalid YAML: its aliases expand to more than 100000 values"),
    ("x: &x [1, *x]\n", r"c.yaml:1: invalid YAML: its aliases expand to more than 100000 values"),
    ("a: &a 1\nb: [" + ", ".join(["*a"] * 101) + "]\n", r"c.yaml:2: invalid YAML: more than 100 aliases \(\*name\)"),
])
def test_yaml_alias_bombs_are_refused_fast_within_a_memory_limit(tmp_path, text, message):
    """The probe runs in a child limited to 1 GiB of address space and 20 s (the issue's bomb took ~4.9 GB)."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    code = (f"import resource, sys; sys.path.insert(0, {REPO!r})\n"
            "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
            "from clock_deploy.config import load_config\n"
            "from clock_deploy.errors import UserError\n"
            "try:\n"
            f"    load_config({str(path)!r})\n"
            "except UserError as e:\n"
            "    print(e)\n")
    start = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0 and time.time() - start < 20, out.stderr[-500:]
    assert re.fullmatch(f"{re.escape(str(tmp_path))}/{message}\n", out.stdout), out.stdout
    # a config that uses a few aliases still loads
    path.write_text("seed: &s 3\ntrain: {epochs: *s}\n")
    assert load_config(str(path)).train.epochs == 3


# ---------------------------------------------------------------- issue 40: signed metadata and checksums

@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_checkpoint):
    from clock_deploy.export.exporter import Exporter
    folder = tmp_path_factory.mktemp("export")
    Exporter(tiny_checkpoint, folder, "m").run("fp32", parity_images=1, map_images=0)
    return folder / "m.onnx"


def _copy_artifact(exported, folder, sidecar=True):
    path = folder / "m.onnx"
    shutil.copy(exported, path)
    if sidecar:
        shutil.copy(str(exported) + ".json", str(path) + ".json")
    return path


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change", [
    lambda m: m["classes"].reverse(),                      # class order
    lambda m: m["classes"].__setitem__(0, "Truck"),        # class name
    lambda m: m["input"]["mean"].__setitem__(0, 0.5),      # normalization
    lambda m: m["input"].__setitem__("width", 96),         # input size
    lambda m: m.__setitem__("precision", "fp16"),          # precision
])
def test_an_edited_sidecar_is_refused(tmp_path, exported, change):
    from clock_deploy.runtime import Detector
    path = _copy_artifact(exported, tmp_path)
    _edit_json(tmp_path / "m.onnx.json", change)
    with pytest.raises(UserError) as e:
        Detector.load(path)
    assert one_line(e) == (f"{path}.json: was changed after export (its classes, input, precision, topk or batch no "
                           "longer match metadata_sha256): export again rather than editing it")


def test_a_sidecar_without_hashes_loads_with_one_warning(tmp_path, exported, caplog):
    from clock_deploy.runtime import Detector
    path = _copy_artifact(exported, tmp_path)
    _edit_json(tmp_path / "m.onnx.json", lambda m: [m.pop("artifact_sha256"), m.pop("metadata_sha256")])
    for _ in range(2):
        assert Detector.load(path).classes == ["Car", "Pedestrian", "Cyclist"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{path}.json: no artifact_sha256 or metadata_sha256 (written by an older clock-deploy): the "
                        "model and its classes, normalization, input size and precision cannot be checked; export "
                        "again to sign them"]


def _rewrite_onnx(path, change):
    import onnx
    model = onnx.load(str(path))
    change(model)
    onnx.save(model, str(path))


def _embedded_edit(change):
    def edit(model):
        from clock_deploy.artifact import EMBEDDED_KEY
        prop = next(p for p in model.metadata_props if p.key == EMBEDDED_KEY)
        meta = json.loads(prop.value)
        change(meta)
        prop.value = json.dumps(meta)
    return edit


def test_a_lone_onnx_is_checked_by_its_embedded_metadata(tmp_path, exported, caplog):
    import onnx.numpy_helper
    from clock_deploy.runtime import Detector
    path = _copy_artifact(exported, tmp_path, sidecar=False)
    assert Detector.load(path).classes == ["Car", "Pedestrian", "Cyclist"]
    _rewrite_onnx(path, _embedded_edit(lambda m: m["classes"].reverse()))
    with pytest.raises(UserError) as e:
        Detector.load(path)
    assert one_line(e).startswith(f"{path} (embedded metadata): was changed after export")

    def change_a_weight(model):
        init = max(model.graph.initializer, key=lambda t: len(t.raw_data) or len(t.float_data))
        array = onnx.numpy_helper.to_array(init).copy()
        array.flat[0] += 1.0
        init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
    path = _copy_artifact(exported, tmp_path, sidecar=False)
    _rewrite_onnx(path, change_a_weight)
    with pytest.raises(UserError) as e:
        Detector.load(path)
    assert one_line(e) == (f"{path} (embedded metadata): does not describe this graph (its sha256 differs); the "
                           "weights or nodes were changed after export: export again")

    path = _copy_artifact(exported, tmp_path, sidecar=False)
    _rewrite_onnx(path, _embedded_edit(lambda m: [m.pop("graph_sha256"), m.pop("metadata_sha256")]))
    Detector.load(path)
    Detector.load(path)
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1


def test_sidecar_and_embedded_metadata_must_agree(tmp_path, exported):
    from clock_deploy.artifact import read_metadata, write_metadata
    from clock_deploy.runtime import Detector
    path = _copy_artifact(exported, tmp_path)
    meta = read_metadata(path)
    write_metadata(path, {**meta, "classes": ["Car", "Van", "Cyclist"]})  # a validly signed sidecar
    with pytest.raises(UserError) as e:
        Detector.load(path)
    assert one_line(e) == (f"{path}: its sidecar and its embedded metadata disagree on 'classes': sidecar "
                           '["Car", "Van", "Cyclist"], embedded ["Car", "Pedestrian", "Cyclist"]; export again')


def _tensor_offset(path):
    """Offset of the middle of the largest tensor's bytes inside a checkpoint (a zip archive)."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


def test_a_bit_flipped_checkpoint_is_one_line_in_detector_export_and_resume(tmp_path, tiny_checkpoint, capsys,
                                                                             synthetic_data, make_train_config):
    from clock_deploy.runtime import Detector
    out = tmp_path / "run"
    cfg = make_train_config(synthetic_data, str(out), extra=["train.epochs=2", "train.max_iters=1",
                                                             "train.eval_every=-1"])
    run_training(cfg, progress=False)
    for path in (tiny_checkpoint, out / "last.pt"):
        flipped = tmp_path / "flipped.pt" if path == tiny_checkpoint else path
        data = bytearray(path.read_bytes())
        data[_tensor_offset(path)] ^= 0x10
        flipped.write_bytes(bytes(data))
        expected = f"{flipped}: checksum mismatch: the file changed after it was written"
        if path == tiny_checkpoint:
            with pytest.raises(UserError) as e:
                Detector.load(flipped)
            assert one_line(e).startswith(expected)
            assert cli_error(capsys, ["export", "--ckpt", str(flipped), "--out", str(tmp_path / "x")]).startswith(
                f"error: {expected}")
        else:
            with pytest.raises(UserError) as e:
                run_training(make_train_config(synthetic_data, str(out), extra=["train.epochs=2"]), resume=True,
                             progress=False)
            assert one_line(e).startswith(expected)


def test_a_checkpoint_without_checksum_loads_with_one_warning(tmp_path, tiny_checkpoint, caplog):
    from clock_deploy.runtime import Detector
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    del ckpt["checksum"]
    torch.save(ckpt, tmp_path / "old.pt")
    for _ in range(2):
        assert Detector.load(tmp_path / "old.pt").classes == ["Car", "Pedestrian", "Cyclist"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{tmp_path / 'old.pt'}: no checksum (written by an older clock-deploy): its contents cannot be checked"]


# ---------------------------------------------------------------- issue 40: one line everywhere

@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("config"), "damaged checkpoint: key 'config' is missing"),
    (lambda c: c.pop("model"), "damaged checkpoint: key 'model' is missing"),
    (lambda c: c.pop("classes"), "damaged checkpoint: key 'classes' is missing"),
    (lambda c: c.__setitem__("model", "weights"), "damaged checkpoint: 'model' must be a mapping of tensor names to "
                                                  "tensors, got str"),
    (lambda c: c["model"].__setitem__("extra", 3), "damaged checkpoint: 'model' must be a mapping of tensor names"),
    (lambda c: c.__setitem__("classes", 3), "damaged checkpoint: 'classes' must be a list of class names, got int"),
    (lambda c: c.__setitem__("config", []), "damaged checkpoint: 'config' must be a config mapping, got list"),
    (lambda c: c.__setitem__("epoch", None), "damaged checkpoint: 'epoch' must be a count, got NoneType"),
    (lambda c: c["config"]["model"].__setitem__("n_points", 2**63), "its saved config does not match this version"),
    (lambda c: c["config"]["data"].__setitem__("img_size", [1]), "its saved config does not match this version"),
])
def test_checkpoints_with_the_right_tag_but_wrong_keys_are_one_line(tmp_path, capsys, tiny_checkpoint, change,
                                                                    message):
    from clock_deploy.checkpoint import content_sha256
    from clock_deploy.runtime import Detector
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    change(ckpt)
    ckpt["checksum"] = content_sha256(ckpt)  # consistent, so the structure check is what refuses it
    path = tmp_path / "bad.pt"
    torch.save(ckpt, path)
    with pytest.raises(UserError) as e:
        Detector.load(path)
    assert one_line(e).startswith(f"{path}: {message}")
    assert cli_error(capsys, ["export", "--ckpt", str(path), "--out", str(tmp_path / "out")]).startswith(
        f"error: {path}: {message}")


def test_resuming_an_imported_checkpoint_is_one_line(tmp_path, synthetic_data, make_train_config, tiny_checkpoint):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(tiny_checkpoint, out / "last.pt")  # saved without optimizer state, as `import` writes
    cfg = make_train_config(synthetic_data, str(out), extra=["train.epochs=2"])
    with pytest.raises(UserError) as e:
        run_training(cfg, resume=True, progress=False)
    assert one_line(e).startswith(f"resume: {out / 'last.pt'} ")


class _FullDisk:
    """A file whose writes fail with ENOSPC after `room` bytes, as on a full disk."""

    def __init__(self, path, room):
        self.file, self.room = open(path, "wb"), room

    def write(self, data):
        import errno
        if self.file.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


@pytest.mark.parametrize("room", [0, 100, 5000])
def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_keeps_the_old_one(tmp_path, monkeypatch, room,
                                                                                  make_tiny_student, student_io):
    from clock_deploy.checkpoint import save_checkpoint
    model, cfg = make_tiny_student("dab_detr")
    path = tmp_path / "last.pt"
    save_checkpoint(path, model, cfg, student_io.classes, epoch=1, iteration=1)
    old = path.read_bytes()
    monkeypatch.setattr(io, "open", lambda p, mode="r", *a, **k: _FullDisk(p, room) if "w" in mode
                        else open(p, mode, *a, **k), raising=False)
    with pytest.raises(UserError) as e:
        save_checkpoint(path, model, cfg, student_io.classes, epoch=2, iteration=2)
    assert one_line(e) == f"cannot write {path}: No space left on device (is the disk full?)"
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["last.pt"]


def test_a_full_disk_during_training_is_one_line_on_the_cli(tmp_path, monkeypatch, capsys, synthetic_data,
                                                           make_train_config):
    out = tmp_path / "run"
    cfg = make_train_config(synthetic_data, str(out), extra=["train.epochs=1", "train.eval_every=-1"])
    dump(cfg, tmp_path / "c.yaml")
    monkeypatch.setattr(io, "open", lambda p, mode="r", *a, **k: _FullDisk(p, 1000) if "last.pt" in str(p)
                        else open(p, mode, *a, **k), raising=False)  # config.yaml still fits
    assert cli_error(capsys, ["train", "--cfg", str(tmp_path / "c.yaml")]) == \
        f"error: cannot write {out / 'last.pt'}: No space left on device (is the disk full?)"
    assert not (out / "last.pt").exists()


def test_export_out_under_an_unwritable_parent_is_one_line(tmp_path, monkeypatch, capsys, tiny_checkpoint):
    import errno
    parent = tmp_path / "readonly"
    parent.mkdir()
    real = os.makedirs

    def makedirs(name, *args, **kwargs):  # what a folder without write permission does (the tests may run as root)
        if str(name).startswith(str(parent)):
            raise PermissionError(errno.EACCES, "Permission denied", str(name))
        return real(name, *args, **kwargs)
    monkeypatch.setattr(os, "makedirs", makedirs)
    out = parent / "out"
    assert cli_error(capsys, ["export", "--ckpt", str(tiny_checkpoint), "--out", str(out)]) == \
        f"error: cannot write {out}: Permission denied"


def test_a_symlinked_lock_file_is_not_followed(tmp_path):
    from clock_deploy.lock import LOCK_NAME, output_lock
    victim = tmp_path / "notes.txt"
    victim.write_text("precious\n")
    (tmp_path / "out").mkdir()
    os.symlink(victim, tmp_path / "out" / LOCK_NAME)
    with pytest.raises(UserError) as e:
        with output_lock(tmp_path / "out", "export"):
            pass
    assert one_line(e).startswith(f"cannot write {tmp_path / 'out' / LOCK_NAME}: ")
    assert victim.read_text() == "precious\n"

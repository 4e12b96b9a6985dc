"""Calibration manifests: strata, greedy coverage, determinism, validation, the committed demo manifest."""
import json
import os

import numpy as np
import pytest

from clock_deploy.cli import cli, run
from clock_deploy.data import kitti
from clock_deploy.errors import UserError
from clock_deploy.export.calibration import (choose_calibration_set, frame_strata, greedy_select, manifest_images,
                                             read_manifest, write_manifest)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _annos(names, heights):
    annos = kitti.empty_annos()
    annos["name"] = np.array(names)
    annos["bbox"] = np.array([[0.0, 10.0, 5.0, 10.0 + h] for h in heights]).reshape(-1, 4)
    return annos


def test_frame_strata_bins_by_relative_height():
    # image 200 px high: 19.9 px = 0.0995 -> small, 20 px = 0.10 -> medium, 50 px = 0.25 -> large
    annos = _annos(["Car", "Car", "Pedestrian", "Cyclist", "DontCare"], [19.9, 20.0, 49.9, 50.0, 80.0])
    assert frame_strata(annos, 200) == {"Car/small": 1, "Car/medium": 1, "Pedestrian/medium": 1,
                                        "Cyclist/large": 1}


def test_greedy_select_fills_rare_strata_first_and_empty_images_last():
    strata = [{"Car/small": 3}, {"Car/small": 1}, {"Cyclist/large": 1}, {}, {"Car/small": 1, "Cyclist/large": 1}]
    # step 1: frame 4 covers two new strata (gain 2); step 2: frames 0, 1, 2 all gain 1/2;
    # the empty frame 3 gains nothing and comes last
    picked = greedy_select(strata, 5, seed=0)
    assert picked[0] == 4 and picked[-1] == 3 and sorted(picked) == [0, 1, 2, 3, 4]
    assert greedy_select(strata, 5, seed=0) == picked
    orders = {tuple(greedy_select(strata, 5, seed=s)) for s in range(10)}
    assert len(orders) > 1 and all(o[0] == 4 and o[-1] == 3 for o in orders)  # the seed only breaks ties
    # the rare stratum is not starved: two frames hold Cyclist/large and both come before a third Car-only frame
    strata = [{"Car/small": 1}] * 6 + [{"Cyclist/large": 1}] * 2
    picked = greedy_select(strata, 4, seed=1)
    assert sum(p >= 6 for p in picked) == 2


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from clock_deploy.data.synthetic import generate

    root = tmp_path_factory.mktemp("calib") / "synth"
    generate(root, 40, seed=0, height=94, width=310, progress=False)
    return str(root)


def test_manifest_is_deterministic_and_its_counts_match_the_labels(synth, tmp_path):
    manifest = choose_calibration_set(synth, "train", 12, seed=3)
    assert manifest == choose_calibration_set(synth, "train", 12, seed=3)
    assert manifest["frame_ids"] != choose_calibration_set(synth, "train", 12, seed=4)["frame_ids"]
    train = kitti.read_split(synth, "train")
    assert manifest["num_selected"] == 12 and len(set(manifest["frame_ids"])) == 12
    assert set(manifest["frame_ids"]) <= set(train)
    assert manifest["dataset_root"] == synth and manifest["split"] == "train" and manifest["seed"] == 3

    # recount every stratum from the label files
    selected, available = {}, {}
    for frame_id in train:
        counts = frame_strata(kitti.read_label(kitti.label_path(synth, frame_id)), 94)
        for key, n in counts.items():
            available[key] = available.get(key, 0) + 1
            if frame_id in manifest["frame_ids"]:
                row = selected.setdefault(key, [0, 0])
                row[0] += 1
                row[1] += n
    assert set(manifest["strata"]) == set(available)
    for key, row in manifest["strata"].items():
        assert row["images_in_split"] == available[key]
        assert [row["images_selected"], row["objects_selected"]] == selected.get(key, [0, 0])
    # on this data 12 images (several objects each) already represent all 16 strata of the split
    assert len(manifest["strata"]) == 16
    assert all(row["images_selected"] > 0 for row in manifest["strata"].values())

    path = tmp_path / "m.json"
    write_manifest(path, manifest)
    assert read_manifest(path) == manifest
    paths = manifest_images(path, limit=5)
    assert paths == [kitti.image_path(synth, f) for f in manifest["frame_ids"][:5]]


def test_manifest_problems_are_user_errors_naming_the_file(synth, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match=r"bad.json:\d+: not valid JSON"):
        read_manifest(bad)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(UserError, match="bad.json: not a calibration manifest"):
        read_manifest(bad)
    moved = tmp_path / "moved.json"
    write_manifest(moved, {**choose_calibration_set(synth, "train", 3), "dataset_root": str(tmp_path / "gone")})
    with pytest.raises(UserError, match="moved.json: 3 of its 3 images are missing .*calib_root"):
        manifest_images(moved)
    assert len(manifest_images(moved, root=synth)) == 3
    with pytest.raises(UserError, match="num must be at least 1"):
        choose_calibration_set(synth, "train", 0)


def test_calibrate_cli_writes_the_manifest(synth, tmp_path, capsys):
    out = tmp_path / "calib.json"
    run(cli, ["calibrate", "--data", synth, "--split", "train", "--num", "6", "--out", str(out), "--seed", "2"])
    assert read_manifest(out)["frame_ids"] == choose_calibration_set(synth, "train", 6, seed=2)["frame_ids"]
    assert f"wrote {out}: 6 of train images" in capsys.readouterr().out


def test_committed_demo_manifest_is_valid():
    manifest = read_manifest(os.path.join(REPO, "calibration", "synth_demo.json"))
    assert manifest["dataset_root"] == "data/synth_kitti" and manifest["split"] == "train"
    assert manifest["num_selected"] == len(manifest["frame_ids"]) == 64


@pytest.mark.slow
def test_committed_demo_manifest_is_reproducible(tmp_path):
    """Regenerate the demo's synthetic dataset (configs/demo/base.yaml) and choose again: the same 64 frames."""
    from clock_deploy.config import load_config
    from clock_deploy.data.synthetic import generate

    s = load_config(os.path.join(REPO, "configs", "demo", "base.yaml")).data.synth
    root = tmp_path / "synth_kitti"
    generate(root, s.num_images, seed=s.seed, height=s.height, width=s.width, val_fraction=s.val_fraction,
             max_objects=s.max_objects, progress=False)
    committed = read_manifest(os.path.join(REPO, "calibration", "synth_demo.json"))
    again = choose_calibration_set(str(root), "train", 64, seed=committed["seed"])
    assert again["frame_ids"] == committed["frame_ids"] and again["strata"] == committed["strata"]
    assert not set(committed["frame_ids"]) & set(kitti.read_split(root, "val"))  # no validation image

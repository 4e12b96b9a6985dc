"""Accuracy on screen: every AP in percent with one decimal, whatever scale the evaluator keeps."""
import pytest

from clock_deploy.eval.units import ap_percent, ap_text, metrics_text


def test_coco_fractions_and_kitti_percent_read_on_one_scale():
    assert ap_percent("mAP", 0.464) == pytest.approx(46.4) and ap_percent("kitti_moderate", 77.2041) == 77.2041
    assert ap_text("mAP", 0.46404) == "46.4" and ap_text("AP50", 0.714) == "71.4"
    assert ap_text("kitti_moderate", 77.2041) == "77.2"
    assert ap_text("kitti_easy", float("nan")) == "-" and ap_text("mAP", None) == "-"


def test_metrics_line_as_the_trainer_prints_it():
    metrics = {"mAP": 0.464, "AP50": 0.7141, "AP75": 0.5, "kitti_moderate": 77.2041, "epoch": 12}
    assert metrics_text(metrics) == "mAP 46.4, AP50 71.4, KITTI mod 77.2 (%)"
    assert metrics_text({"epoch": 1}) == ""

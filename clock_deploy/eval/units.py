"""How accuracy numbers are shown to people: every AP in percent, one decimal.

The evaluators keep their native scales (COCO AP 0..1 as pycocotools returns it, KITTI AP
in percent as the devkit prints it) and JSON / CSV files store those raw values; everything
a person reads (log lines, command output, report tables) goes through `ap_text`, so the two
never appear side by side on different scales.
"""
import math

COCO_FRACTIONS = ("mAP", "AP", "AP50", "AP75", "APs", "APm", "APl")  # metric keys stored as 0..1
SHORT_NAMES = {"kitti_easy": "KITTI easy", "kitti_moderate": "KITTI mod", "kitti_hard": "KITTI hard"}


def ap_percent(key, value):
    """The metric `key`'s value on the percent scale (COCO keys are stored as fractions)."""
    return 100 * value if key in COCO_FRACTIONS else value


def ap_text(key, value):
    """'46.4' for an AP in percent after conversion; '-' when it is missing (None / NaN: no ground truth)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{ap_percent(key, value):.1f}"


def metrics_text(metrics, keys=("mAP", "AP50", "kitti_moderate")):
    """'mAP 46.4, AP50 71.4, KITTI mod 77.2 (%)' for the keys present in `metrics`."""
    shown = [f"{SHORT_NAMES.get(k, k)} {ap_text(k, metrics[k])}" for k in keys if k in metrics]
    return ", ".join(shown) + " (%)" if shown else ""

"""The counting rules of benchmarks/probe_distill_dino.py (no checkpoints here)."""
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import probe_distill_dino as probe  # noqa: E402

from clock_deploy.distill.queries import QuerySpec  # noqa: E402
from clock_deploy.io import read_json  # noqa: E402


def annos(names, boxes, scores=None):
    out = {"name": np.array(names, dtype=str), "bbox": np.array(boxes, dtype=np.float64).reshape(-1, 4),
           "truncated": np.zeros(len(names)), "occluded": np.zeros(len(names), np.int64)}
    if scores is not None:
        out["score"] = np.array(scores, dtype=np.float64)
    return out


def test_each_car_detection_above_the_score_lands_in_one_bin():
    gt = annos(["Car", "Car", "Van", "Pedestrian"],
               [[0, 0, 100, 50], [200, 0, 300, 50], [400, 0, 500, 50], [600, 0, 620, 60]])
    det = annos(["Car", "Car", "Car", "Car", "Car", "Car", "Pedestrian"],
                [[0, 0, 100, 50],      # true positive (the higher score takes the car)
                 [2, 0, 100, 50],      # duplicate of the same car
                 [230, 0, 330, 50],    # IoU 0.54 with the second car: poorly placed
                 [400, 0, 500, 50],    # on the van
                 [700, 100, 760, 150],  # background
                 [200, 0, 300, 50],    # a perfect box, but under the score threshold
                 [600, 0, 620, 60]],   # not a Car detection
                [0.9, 0.8, 0.7, 0.6, 0.5, 0.1, 0.95])
    assert probe.car_bins(gt, det) == dict.fromkeys(probe.BINS, 1)


def test_the_higher_score_is_the_true_positive_and_a_frame_without_cars_is_all_background():
    gt = annos(["Car"], [[0, 0, 100, 50]])
    det = annos(["Car", "Car"], [[0, 0, 100, 50], [1, 0, 100, 50]], [0.4, 0.9])
    assert probe.car_bins(gt, det)["true_positive"] == 1 and probe.car_bins(gt, det)["duplicate"] == 1
    assert probe.car_bins(annos([], []), det)["background"] == 2


def test_gt_query_stats_skip_padding_and_an_unmoved_anchor_scores_the_anchor_iou():
    gt_boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]])
    anchors = torch.tensor([[[0.55, 0.5, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1]]])  # the second slot is padding
    pad = torch.tensor([[False, True]])
    labels = torch.tensor([[1, 3]])
    batches = [(None, QuerySpec(labels, anchors, pad), QuerySpec(labels, gt_boxes, pad))]
    logits = torch.tensor([[[-5.0, 2.0, -5.0], [9.0, -9.0, -9.0]]])
    stats = probe.gt_query_stats([(logits, anchors)], batches, teacher_answers=[(logits, gt_boxes)])
    assert stats["queries"] == 1
    assert abs(stats["anchor_iou"] - 0.15 / 0.25) < 1e-6  # 0.15 x 0.2 overlap over a 0.05 union
    assert stats["iou"] == stats["anchor_iou"] == stats["iou_to_teacher"]
    assert stats["class_accuracy"] == 1.0 and abs(stats["confidence"] - torch.tensor(2.0).sigmoid().item()) < 1e-6


def test_deltas_pair_seed_with_seed_and_need_two_seeds():
    baseline = {0: 1.0, 1: 2.0}
    cell = probe.delta_cell(baseline, {0: 2.0, 1: 4.0, 2: 100.0}, lambda r: r, "+.1f")
    assert cell.startswith("+1.5 [")  # seed 2 has no baseline and is left out
    assert probe.delta_cell(baseline, {0: 2.0}, lambda r: r, "+.1f") == "n/a"


class FixedTeacher(torch.nn.Module):
    """Answers a class-hinted slot (non-zero content) with logits 0 and a class-free one with -2."""
    num_classes, hidden_dim = 3, 4

    def __init__(self):
        super().__init__()
        self.label_enc = torch.nn.Embedding(3, 4)
        torch.nn.init.ones_(self.label_enc.weight)

    def forward(self, images, groups):
        hinted = groups[0].content.abs().sum(-1) > 0
        logits = torch.where(hinted, 0.0, -2.0)[..., None].expand(-1, -1, self.num_classes)
        return SimpleNamespace(groups=[[SimpleNamespace(logits=logits)]])


def test_tcld_weight_split_counts_gt_and_general_slots_and_skips_padding():
    def item(boxes):
        return torch.zeros(3, 8, 8), {"boxes": torch.tensor(boxes), "labels": torch.zeros(len(boxes), dtype=torch.long)}
    dataset = [item([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]), item([[0.6, 0.6, 0.2, 0.2]])]
    cfg = SimpleNamespace(repeats=3, box_noise=0.4, random_queries=4)
    split = probe.tcld_weight_split(FixedTeacher(), dataset, cfg)
    gt_w, general_w = 0.5, torch.tensor(-2.0).sigmoid().item()
    assert (split["gt_slots"], split["general_slots"]) == (9, 8)  # 3 padding slots of the second image left out
    assert abs(split["general_share"] - 8 * general_w / (8 * general_w + 9 * gt_w)) < 1e-6
    assert abs(split["mean_w_gt"] - gt_w) < 1e-6 and abs(split["mean_w_general"] - general_w) < 1e-6


def test_lcmd_class_weights_give_each_box_the_same_weight_whatever_its_area():
    class Grid(torch.nn.Module):
        def forward(self, images):
            return SimpleNamespace(memory=[torch.zeros(1, 4, 10, 10)])
    items = [(torch.zeros(3, 10, 10), {"boxes": torch.tensor([[0.3, 0.3, 0.4, 0.4], [0.8, 0.8, 0.2, 0.2]]),
                                       "labels": torch.tensor([0, 1])})]
    shares = probe.class_weight_shares(Grid(), ListDataset(items, ["Car", "Pedestrian", "Cyclist"]))
    assert abs(shares["Car"]["weight_share"] - 0.5) < 1e-6 and abs(shares["Pedestrian"]["weight_share"] - 0.5) < 1e-6
    assert abs(shares["Car"]["pixels_share"] - 16 / 20) < 1e-6  # 4x4 pixels against 2x2
    assert shares["Cyclist"] == {"weight_share": 0.0, "pixels_share": 0.0, "objects_share": 0.0}


def test_fgd_class_weights_follow_the_teachers_spatial_attention():
    items = [(torch.zeros(3, 10, 10), {"boxes": torch.tensor([[0.3, 0.3, 0.4, 0.4], [0.8, 0.8, 0.2, 0.2]]),
                                       "labels": torch.tensor([0, 1])})]
    dataset = ListDataset(items, ["Car", "Pedestrian", "Cyclist"])

    class Features(torch.nn.Module):
        def __init__(self, hot):
            super().__init__()
            self.hot = hot

        def forward(self, images):
            features = torch.ones(len(images), 4, 10, 10)
            features[:, :, self.hot[0], self.hot[1]] = 3.0  # where the teacher's features are strong
            return SimpleNamespace(features=[features])
    flat = probe.class_weight_shares(Features((slice(0, 0), slice(0, 0))), dataset, fgd_temperature=0.5)
    assert abs(flat["Car"]["weight_share"] - 0.5) < 1e-6  # uniform attention: LCMD's split
    on_car = probe.class_weight_shares(Features((slice(1, 5), slice(1, 5))), dataset, fgd_temperature=0.5)
    assert on_car["Car"]["weight_share"] > 0.95 and on_car["Car"]["pixels_share"] == flat["Car"]["pixels_share"]


class ListDataset(list):
    def __init__(self, items, classes):
        super().__init__(items)
        self.classes = classes


def test_the_run_file_check_reads_each_split_from_the_files_that_scored_it(monkeypatch):
    monkeypatch.chdir(os.path.join(os.path.dirname(__file__), ".."))  # the committed run files are repo-relative
    assert probe.recorded_map("clock-t1", 0, "fresh") == 0.462533  # the follow-up's fresh-split score
    assert probe.recorded_map("clock-t1", 0, "tuning") == 0.483793  # the A/B's run file
    assert probe.recorded_map("baseline", 0, "tuning") == read_json(
        "benchmarks/results/distill_confirm_runs/dino-baseline-0.json")["metrics"]["tuning"]["mAP"]  # retrained
    assert probe.recorded_map("clock-t1", 99, "tuning") is None


def test_a_stored_probe_is_reused_reprobed_for_a_new_version_and_never_replaced_by_another_checkpoint(tmp_path):
    checkpoint, stored = tmp_path / "last.pt", str(tmp_path / "row-0.json")
    checkpoint.write_bytes(b"weights")
    calls = []

    def probe_once():
        calls.append(1)
        return {"metrics": {"mAP": 0.5}}
    first = probe.reused_or_probed(str(checkpoint), stored, probe_once, version=1)
    assert probe.reused_or_probed(str(checkpoint), stored, probe_once, version=1) == first and len(calls) == 1
    probe.reused_or_probed(str(checkpoint), stored, probe_once, version=2)  # a newer probe of the same file
    assert len(calls) == 2
    checkpoint.write_bytes(b"weights trained again")
    with pytest.raises(SystemExit, match="probes another checkpoint"):
        probe.reused_or_probed(str(checkpoint), stored, probe_once, version=2)
    assert read_json(stored)["probe_version"] == 2 and len(calls) == 2  # the record is kept

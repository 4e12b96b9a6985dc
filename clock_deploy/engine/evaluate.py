"""COCO mAP + KITTI AP of a torch detector on a dataset split."""
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from clock_deploy.data.dataset import collate_fn
from clock_deploy.eval.evaluator import DetectionEvaluator
from clock_deploy.models.deploy import PostProcess


def build_evaluator(dataset):
    return DetectionEvaluator(
        dataset.classes,
        [dataset.gt_annos(i) for i in range(len(dataset))],
        [dataset.image_size(i) for i in range(len(dataset))],
        dataset.frame_ids,
    )


@torch.no_grad()
def evaluate(model, dataset, device="cpu", batch_size=8, topk=100, num_workers=0, progress=True):
    """Run `model` over `dataset` and return the evaluator's flat metrics dict.

    The global RNG is left as it was, so evaluating during training does not change the run.
    """
    with torch.random.fork_rng(devices=[]):
        return _evaluate(model, dataset, device, batch_size, topk, num_workers, progress)


def _evaluate(model, dataset, device, batch_size, topk, num_workers, progress):
    was_training = model.training
    model.eval()
    postprocess = PostProcess(topk)
    evaluator = build_evaluator(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                        num_workers=num_workers)
    for images, targets in tqdm(loader, desc="eval", leave=False, disable=not progress):
        out = model(images.to(device))
        orig_hw = torch.stack([t["orig_size"] for t in targets]).to(device).float()
        scores, labels, boxes = postprocess(out.pred_logits, out.pred_boxes, orig_hw)
        for t, s, l, b in zip(targets, scores.cpu(), labels.cpu(), boxes.cpu()):
            evaluator.update(t["image_id"], b.numpy(), s.numpy(), l.numpy())
    model.train(was_training)
    return evaluator.summarize()

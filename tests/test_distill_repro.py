"""Distillation runs repeat across thread counts: the query sampler is seeded from integers only."""
import pytest
import torch

from clock_deploy.distill import build_distiller
from clock_deploy.distill.sampling import side_seed
from clock_deploy.models.build import build_criterion, build_model
from clock_deploy.training.commands import _datasets, seed_everything
from clock_deploy.training.trainer import Trainer

DISTILL = ["distill.logit.random_queries=5", "distill.kd_detr.random_queries=5", "distill.grad_share_every=0",
           "train.epochs=1", "train.eval_every=-1"]


def test_side_seed_is_a_function_of_integers_only():
    assert side_seed(0, 1, 2, 0) == side_seed(0, 1, 2, 0)
    keys = [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (0, 0, 10, 0), (0, 1, 0, 0)]
    assert len({side_seed(*k) for k in keys}) == len(set(keys))


def train_three_steps(data, out, make_train_config, method, threads):
    """3 training steps (6 images, batch 2) of a tiny DINO at `threads` intra-op threads: the boxes of
    every query set the distiller drew, and the student's final weights."""
    cfg = make_train_config(data, out, extra=DISTILL + [f"distill.method={method}"])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seed_everything(cfg.seed)
        train_set, _ = _datasets(cfg)
        model = build_model(cfg.model)
        drawn = []
        distiller = None
        if method != "none":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(5)
                teacher = build_model(cfg.model)
            distiller = build_distiller(cfg, teacher, model)
            sampler = distiller.sampler

            def recording(images, targets):
                spec = sampler(images, targets)
                drawn.append(spec.boxes.clone())
                return spec
            distiller.sampler = recording
        Trainer(cfg, model, build_criterion(cfg.loss, cfg.model), train_set, distiller=distiller,
                progress=False).fit()
        return drawn, {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(previous)


def largest_difference(a, b):
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.parametrize("method", ["clock", "kd_detr"])
def test_same_queries_and_weights_at_one_and_two_threads(tmp_path, synthetic_data, make_train_config, method):
    """The same run draws bit-identical TCLD / KD-DETR queries at 1 and 2 threads, and its weights
    differ across thread counts no more than the plain student's.

    The queries used to be seeded from float(images.sum()), which splits its reduction by thread count:
    on this data it differs in the last digits between 1 and 2 threads on all 3 batches, so the old
    stream drew other queries. The weights: even the baseline (no sampler) does not repeat bit for bit
    across thread counts, since CPU kernels split their sums differently (after 3 steps its largest
    weight difference measured 2.0e-6 on a 2-core AMD EPYC VM, AVX512 kernels). So the assertion is:
    where the baseline's weights are bit-identical across thread counts, the distilled run's are too;
    where they are not, the distilled run's largest difference stays within 10x the baseline's, i.e.
    float rounding (measured 3.4e-6 for CLoCK), not different queries (the old float-seeded stream
    gave 2.8e-4 at commit f1a6184, 140x the baseline's).
    """
    runs = {(m, t): train_three_steps(synthetic_data, tmp_path / f"{m}{t}", make_train_config, m, t)
            for m in ("none", method) for t in (1, 2)}
    one, two = runs[(method, 1)][0], runs[(method, 2)][0]
    assert len(one) == len(two) == 3
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert not torch.equal(one[0][:, -5:], one[1][:, -5:])  # each step draws new general queries

    baseline = largest_difference(runs[("none", 1)][1], runs[("none", 2)][1])
    distilled = largest_difference(runs[(method, 1)][1], runs[(method, 2)][1])
    if baseline == 0:
        assert distilled == 0
    else:
        assert distilled <= 10 * baseline, (distilled, baseline)

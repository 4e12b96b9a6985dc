"""The training loop shared by `train` (teacher / baseline student) and `distill`.

One iteration: TrainStep computes a dict of weighted loss terms (detection
criterion + optional distillation terms), their sum is back-propagated.
Checkpoints are written atomically at epoch ends and hold everything needed
to continue exactly: weights, optimizer, scheduler, AMP scaler, EMA, RNG states.
"""
import json
import logging
import os
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from clock_deploy.data.dataset import collate_fn
from clock_deploy.training import distributed as dist
from clock_deploy.checkpoint import read_checkpoint, save_checkpoint, set_rng_state
from clock_deploy.training.ema import ModelEMA
from clock_deploy.errors import UserError
from clock_deploy.eval.loop import evaluate_model
from clock_deploy.eval.units import metrics_text
from clock_deploy.io import write_error, write_json
from clock_deploy.models.build import param_groups

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss became NaN / inf; the last good checkpoint is left untouched."""


class TrainStep(nn.Module):
    """Everything with trainable weights in one module, so DDP syncs all of it."""

    def __init__(self, model, criterion, distiller=None):
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.distiller = distiller

    def forward(self, images, targets):
        if self.distiller is None:
            outputs, extra = self.model(images, targets), {}
        else:
            outputs, extra = self.distiller(self.model, images, targets)
        losses = self.criterion(outputs, targets)
        self.distill_keys = tuple(extra)  # which terms came from the distiller (gradient shares)
        losses.update(extra)
        return losses


def gradient_shares(losses, distill_keys, params):
    """Each distillation term's and the detection loss's gradient norm over `params`, and its share
    of their sum: {"grad_norm_<term>": ..., "grad_share_<term>": ...} ("detection" = all other terms).

    One extra backward pass per term (the graph is kept for the real backward), so it runs every
    distill.grad_share_every iterations only.
    """
    terms = {"detection": sum(v for k, v in losses.items() if k.startswith("loss") and k not in distill_keys)}
    terms.update({k: losses[k] for k in distill_keys})
    norms = {}
    for name, loss in terms.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) if loss.requires_grad else []
        norms[name] = float(sum(g.pow(2).sum() for g in grads if g is not None) ** 0.5) if grads else 0.0
    total = sum(norms.values()) or 1.0
    return {**{f"grad_norm_{k}": round(v, 6) for k, v in norms.items()},
            **{f"grad_share_{k}": round(v / total, 4) for k, v in norms.items()}}


def lr_factor(iteration, iters_per_epoch, cfg_train):
    """Linear warm-up, then step decay at the configured epochs (a pure function of the iteration)."""
    warmup = min(1.0, (iteration + 1) / cfg_train.warmup_iters) if cfg_train.warmup_iters > 0 else 1.0
    epoch = iteration // max(iters_per_epoch, 1)
    drops = sum(epoch >= e for e in cfg_train.lr_drop_epochs)
    return warmup * cfg_train.lr_drop_factor ** drops


class Trainer:
    def __init__(self, cfg, model, criterion, train_set, val_set=None, distiller=None, device="cpu",
                 resume=False, progress=True):
        self.cfg = cfg
        self.device = torch.device(device)
        self.train_set, self.val_set = train_set, val_set
        self.classes = train_set.classes
        self.output_dir = cfg.output_dir
        self.progress = progress and dist.is_main()
        self.model = model.to(self.device)
        self.step_module = TrainStep(self.model, criterion, distiller).to(self.device)

        tc = cfg.train
        groups = param_groups(self.model, tc.lr, tc.lr_backbone_mult, tc.weight_decay)
        if distiller is not None:
            extra = [p for p in distiller.parameters() if p.requires_grad]
            if extra:
                groups.append({"params": extra, "lr": tc.lr, "weight_decay": tc.weight_decay})
        self.optimizer = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)
        self.loader = self._train_loader()
        self.iters_per_epoch = len(self.loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: lr_factor(it, self.iters_per_epoch, tc))
        self.use_amp = tc.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.ema = ModelEMA(self.model, tc.ema_decay) if tc.ema else None

        self.epoch, self.iteration, self.best_map, self.best_epoch = 0, 0, -1.0, None
        self.metrics = {}
        if resume:
            self._resume(resume if isinstance(resume, str) else self.last_path)

        self.runner = self.step_module
        if dist.is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            # DINO / two-stage / distillation leave some parameters unused in some steps
            self.runner = nn.parallel.DistributedDataParallel(self.step_module, device_ids=ids,
                                                              find_unused_parameters=True)

    # ------------------------------------------------------------------ paths
    @property
    def last_path(self):
        return os.path.join(self.output_dir, "last.pt")

    @property
    def best_path(self):
        return os.path.join(self.output_dir, "best.pt")

    # ------------------------------------------------------------------ setup
    def _train_loader(self):
        tc = self.cfg.train
        if dist.is_distributed():
            self.sampler = DistributedSampler(self.train_set, shuffle=True, seed=self.cfg.seed, drop_last=True)
        else:
            self.generator = torch.Generator()
            self.sampler = RandomSampler(self.train_set, generator=self.generator)
        batch = min(tc.batch_size, len(self.train_set) // dist.world_size())
        if batch < 1:
            raise UserError(f"training split has {len(self.train_set)} images, fewer than the "
                            f"{dist.world_size()} processes")
        return DataLoader(self.train_set, batch_size=batch, sampler=self.sampler, collate_fn=collate_fn,
                          num_workers=self.cfg.data.num_workers, drop_last=True)

    def _set_epoch(self, epoch):
        # the data order of an epoch depends only on (seed, epoch): resuming replays it exactly
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        else:
            self.generator.manual_seed(self.cfg.seed * 1000 + epoch)

    def _resume(self, path):
        if not os.path.isfile(path):
            raise UserError(f"resume: no checkpoint at {path} (train without resuming to start)")
        ckpt = read_checkpoint(path, map_location=self.device)
        if ckpt["arch"] != self.cfg.model.arch:
            raise UserError(f"resume: {path} holds a {ckpt['arch']} model but the config builds "
                            f"{self.cfg.model.arch}")
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as e:  # same architecture, other sizes (hidden_dim, queries, layers ...)
            first = (str(e).splitlines()[1:] or [str(e)])[0].strip()[:200]  # line 0 only names the class
            raise UserError(f"resume: {path} does not fit the configured {self.cfg.model.arch} model "
                            f"({first}); resume with the config it was trained with") from None
        missing = [k for k in ("optimizer", "scheduler", "rng") if k not in ckpt]
        if missing:
            raise UserError(f"resume: {path} holds no training state ({', '.join(missing)} missing: written by "
                            "`clock-deploy import` or hand-made); start from it with model.pretrained instead")
        try:
            self._restore_state(ckpt)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            key = f"key {e}" if isinstance(e, KeyError) else (str(e).splitlines() or [""])[0][:200]
            raise UserError(f"resume: {path}: its training state does not fit this run "
                            f"({type(e).__name__}: {key})") from None
        self.log({"event": "resume", "from": path, "epoch": self.epoch, "iteration": self.iteration})

    def _restore_state(self, ckpt):
        if self.step_module.distiller is not None and "distiller" in ckpt:
            self.step_module.distiller.load_trainable_state(ckpt["distiller"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and "ema" in ckpt:
            self.ema.load_state_dict(ckpt["ema"], ckpt.get("ema_updates", 0))
        self.epoch, self.iteration = ckpt["epoch"], ckpt["iteration"]
        self.metrics = ckpt.get("metrics", {})
        self.best_map = ckpt.get("best_map", -1.0)
        # checkpoints written before best_epoch existed: the saved epoch was the best if its mAP is
        self.best_epoch = ckpt.get("best_epoch", self.epoch if self.metrics.get("mAP") == self.best_map else None)
        set_rng_state(ckpt["rng"])

    # ------------------------------------------------------------------ loop
    def fit(self):
        """Train until cfg.train.epochs (or max_iters); return the last evaluation metrics.

        Crash safety: an epoch is saved to last.pt before it is evaluated, and last.pt records an
        evaluation only after best.pt and metrics.json are written. A resumed run therefore finds
        any evaluation a crash (or an evaluation error) left undone and finishes it first.
        """
        tc = self.cfg.train
        start = time.time()
        if self.epoch > 0:  # resumed: redo what a crash interrupted, repair missing outputs
            self._finish_epoch(resumed=True)
        while self.epoch < tc.epochs and not self._reached_max_iters():
            self._train_one_epoch()
            self.epoch += 1
            if self._is_last_epoch() or self.epoch % tc.ckpt_every == 0:
                self._save_last()
            self._finish_epoch()
        self.log({"event": "done", "epochs": self.epoch, "iterations": self.iteration,
                  "seconds": round(time.time() - start, 1), **self.metrics})
        return self.metrics

    def _is_last_epoch(self):
        return self.epoch == self.cfg.train.epochs or self._reached_max_iters()

    def _eval_due(self):
        tc = self.cfg.train
        return self.val_set is not None and (
            self._is_last_epoch() or (tc.eval_every > 0 and self.epoch % tc.eval_every == 0))

    def _finish_epoch(self, resumed=False):
        """Evaluate the epoch if due, then write best.pt, metrics.json and last.pt, in that order.
        On resume the evaluation runs only if a crash interrupted it, and missing outputs are rewritten."""
        evaluated = self._eval_due() and self.metrics.get("epoch") != self.epoch
        if evaluated:
            self._evaluate()
        if not (evaluated or resumed):
            return
        if dist.is_main():
            self._write_best(check_existing=not evaluated)
            if self.metrics:
                write_json(os.path.join(self.output_dir, "metrics.json"), {"epoch": self.epoch, **self.metrics})
        dist.barrier()
        if evaluated and (self._is_last_epoch() or self.epoch % self.cfg.train.ckpt_every == 0):
            self._save_last()  # now last.pt records the evaluation

    def _reached_max_iters(self):
        return 0 < self.cfg.train.max_iters <= self.iteration

    def _train_one_epoch(self):
        tc = self.cfg.train
        self.step_module.train()
        self._set_epoch(self.epoch)
        bar = tqdm(self.loader, desc=f"epoch {self.epoch + 1}/{tc.epochs}", disable=not self.progress,
                   dynamic_ncols=True)
        for images, targets in bar:
            if self._reached_max_iters():
                break
            images = images.to(self.device, non_blocking=True)
            targets = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            if self.step_module.distiller is not None:
                self.step_module.distiller.begin_step(self.epoch, self.iteration, dist.rank())
            with torch.autocast(self.device.type, enabled=self.use_amp):
                losses = self.runner(images, targets)
            total = sum(v for k, v in losses.items() if k.startswith("loss"))
            self._check_finite(total, losses)
            if self._log_gradient_shares():
                params = [p for p in self.model.parameters() if p.requires_grad]
                self.log({"epoch": self.epoch, "iteration": self.iteration + 1,
                          **gradient_shares(losses, self.step_module.distill_keys, params)})

            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            if tc.clip_max_norm > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.step_module.parameters(), tc.clip_max_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model)
            self.iteration += 1

            loss_value = float(dist.all_reduce_mean(total.detach()))
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.1e}")
            if self.iteration % tc.log_every == 0 or self.iteration == 1:
                self.log({"epoch": self.epoch, "iteration": self.iteration, "loss": loss_value,
                          "lr": self.optimizer.param_groups[0]["lr"],
                          **{k: round(float(v.detach()), 6) for k, v in losses.items()}})

    def _log_gradient_shares(self):
        """Every distill.grad_share_every iterations (first one included) when distilling, single process."""
        every = self.cfg.distill.grad_share_every
        return (self.step_module.distiller is not None and every > 0 and self.iteration % every == 0
                and not dist.is_distributed())

    def _check_finite(self, total, losses):
        bad = torch.tensor(0.0 if torch.isfinite(total) else 1.0, device=self.device)
        if float(dist.all_reduce_mean(bad)) > 0:
            terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
            kept = self.last_path if os.path.exists(self.last_path) else "none written yet"
            raise TrainingDiverged(
                f"loss is not finite at epoch {self.epoch + 1}, iteration {self.iteration + 1} ({terms}). "
                f"Lower train.lr or check the data; last good checkpoint kept: {kept}")

    def _evaluate(self):
        if dist.is_main():
            model = self.ema.module if self.ema is not None else self.model
            self.metrics = evaluate_model(model, self.val_set, self.cfg.data.img_size, self.cfg.export.topk,
                                          self.device, batch=self.cfg.train.batch_size, progress=self.progress)
            self.metrics["epoch"] = self.epoch
            self.log({"event": "eval", **self.metrics})
        self.metrics = dist.broadcast_object(self.metrics)
        if self.metrics.get("mAP", -1.0) > self.best_map:
            self.best_map, self.best_epoch = self.metrics["mAP"], self.epoch

    def _state(self):
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.use_amp else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "ema_updates": self.ema.updates if self.ema is not None else None,
            "distiller": (self.step_module.distiller.trainable_state()
                          if self.step_module.distiller is not None else None),
        }

    def _save_last(self):
        if dist.is_main():
            save_checkpoint(self.last_path, self.model, self.cfg, self.classes, self.epoch, self.iteration,
                            self.metrics, best_map=self.best_map, best_epoch=self.best_epoch, **self._state())
        dist.barrier()

    def _write_best(self, check_existing=False):
        """best.pt when this epoch is the best so far; on resume only if best.pt is missing or older."""
        if self.best_epoch != self.epoch:
            if check_existing and self.best_epoch is not None and not os.path.isfile(self.best_path):
                self.log({"event": "warning", "message": f"best.pt of epoch {self.best_epoch} is missing"})
            return
        if check_existing and os.path.isfile(self.best_path):
            try:
                if read_checkpoint(self.best_path)["epoch"] == self.epoch:
                    return
            except UserError:
                pass  # unreadable: rewrite it
        ema = self.ema  # best.pt carries the EMA weights it was evaluated with, not the optimizer state
        save_checkpoint(self.best_path, self.model, self.cfg, self.classes, self.epoch, self.iteration,
                        self.metrics, best_map=self.best_map, best_epoch=self.best_epoch,
                        ema=ema.state_dict() if ema is not None else None,
                        ema_updates=ema.updates if ema is not None else None)

    def log(self, record):
        """Append one JSON line to <output_dir>/log.jsonl (rank 0 only)."""
        if not dist.is_main():
            return
        path = os.path.join(self.output_dir, "log.jsonl")
        try:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(record, default=str) + "\n")
        except OSError as e:
            raise write_error(path, e) from None
        if record.get("event") == "eval" and self.progress:
            log.info(f"eval epoch {record['epoch']}: {metrics_text(record)}")

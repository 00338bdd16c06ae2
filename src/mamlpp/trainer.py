"""The outer loop: Adam over the meta-parameters, CA, gradient clamp, epochs x iterations, run files.

Run directory contract (read by later tools):
  config.json   the resolved config
  metrics.csv   one row per logged step: iteration, epoch, phase (train/val/test), loss, accuracy, lr, seconds
  summary.json  at the end: {"preset", "iterations", "seconds", "final": {metric: value}}
"""
from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path

import torch

from .config import Config
from .files import atomic_write_json
from .inner import init_rates
from .loop import evaluate_loop, meta_loss_loop
from .network import build_model
from .objective import evaluate, meta_loss
from .schedules import cosine_lr
from .tasks import TaskSource

Tree = dict[str, torch.Tensor]
METRIC_FIELDS = ["iteration", "epoch", "phase", "loss", "accuracy", "lr", "seconds"]


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
    return torch.device(name)


def init_learner(cfg: Config, input_shape: tuple[int, ...], num_outputs: int, device, dtype, seed: int):
    """(model, params, state): the network's static description and its explicit tensors."""
    model = build_model(cfg.model, input_shape, num_outputs, bn_slots=cfg.inner.steps)
    generator = torch.Generator().manual_seed(seed)
    params, state = model.init(generator, dtype, device)
    params["lr"] = init_rates(params["net"], cfg.inner)
    for tree in params.values():
        for tensor in tree.values():
            tensor.requires_grad_(True)
    return model, params, state


def flatten(params: dict[str, Tree]) -> dict[str, torch.Tensor]:
    """{'net.conv0.weight': tensor, 'bn.bn0.weight': ..., 'lr.conv0.weight': ...}"""
    return {f"{group}.{name}": t for group, tree in params.items() for name, t in tree.items()}


class Trainer:
    """Holds the explicit training state (params, BN state, Adam) and runs meta-updates."""

    def __init__(self, cfg: Config, tasks: TaskSource, device: torch.device):
        self.cfg, self.tasks, self.device = cfg, tasks, device
        self.dtype = getattr(torch, cfg.train.dtype)
        self.model, self.params, self.state = init_learner(
            cfg, tasks.input_shape, tasks.num_outputs, device, self.dtype, cfg.train.seed)
        trainable = list(self.params["net"].values()) + list(self.params["bn"].values())
        if cfg.inner.lr_mode != "fixed":
            trainable += list(self.params["lr"].values())
        self.optimizer = torch.optim.Adam(trainable, lr=cfg.outer.lr, betas=tuple(cfg.outer.betas))
        # The reference clamps the classifier's gradients (conv, linear, BN), not the LSLR rates.
        self.clamped = list(self.params["net"].values()) + list(self.params["bn"].values())
        loop = cfg.train.impl == "loop"
        self._meta_loss = meta_loss_loop if loop else meta_loss
        self._evaluate = evaluate_loop if loop else evaluate

    def meta_step(self, episodes: dict, epoch: int) -> dict[str, torch.Tensor]:
        """One meta-update on a batch of tasks. Metrics stay on the device (no host sync)."""
        lr = cosine_lr(self.cfg, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics, self.state = self._meta_loss(self.model, self.params, self.state, episodes,
                                                    self.cfg, epoch, self.tasks.kind)
        loss.backward()
        if self.cfg.outer.grad_clamp is not None:
            c = self.cfg.outer.grad_clamp
            for p in self.clamped:
                if p.grad is not None:
                    p.grad.clamp_(-c, c)
        self.optimizer.step()
        metrics["meta_loss"] = loss.detach()
        return metrics

    def evaluate(self, split: str, num_tasks: int | None = None, steps: int | None = None) -> dict[str, float]:
        """Mean loss/accuracy and 95% CI over the fixed tasks of a split, many tasks at a time."""
        num_tasks = num_tasks or self.cfg.train.eval_tasks
        chunk = self.cfg.train.eval_chunk
        losses, accs = [], []
        for first in range(0, num_tasks, chunk):
            episodes = self.tasks.eval_batch(split, first, min(chunk, num_tasks - first))
            result = self._evaluate(self.model, self.params, self.state, episodes, self.cfg,
                                    self.tasks.kind, steps)
            losses.append(result["loss"])
            if "accuracy" in result:
                accs.append(result["accuracy"])
        out = summarise("loss", torch.cat(losses))
        if accs:
            out.update(summarise("accuracy", torch.cat(accs)))
        return out


def summarise(name: str, per_task: torch.Tensor) -> dict[str, float]:
    per_task = per_task.double().cpu()
    n = per_task.numel()
    std = per_task.std().item() if n > 1 else 0.0
    return {name: per_task.mean().item(), f"{name}_ci95": 1.96 * std / math.sqrt(n), "num_tasks": n}


class MetricsLog:
    """Appends rows to RUN_DIR/metrics.csv (flushed per row, so a killed run keeps its history)."""

    def __init__(self, path: Path):
        new = not path.exists()
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=METRIC_FIELDS)
        if new:
            self.writer.writeheader()

    def write(self, **row) -> None:
        self.writer.writerow({k: row.get(k, "") for k in METRIC_FIELDS})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def train(cfg: Config, tasks: TaskSource, run_dir: str | os.PathLike, device: torch.device,
          progress: bool = True) -> dict:
    """Meta-train for cfg.train.epochs x iters_per_epoch, validating after every epoch.

    Writes config.json, metrics.csv and summary.json into run_dir and returns the summary.
    """
    from tqdm import tqdm

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", cfg.to_dict())
    trainer = Trainer(cfg, tasks, device)
    log = MetricsLog(run_dir / "metrics.csv")
    t = cfg.train
    total = t.epochs * t.iters_per_epoch
    start = time.perf_counter()
    bar = tqdm(total=total, disable=not progress, dynamic_ncols=True, desc=cfg.name)
    try:
        for epoch in range(t.epochs):
            for it in range(t.iters_per_epoch):
                iteration = epoch * t.iters_per_epoch + it
                metrics = trainer.meta_step(tasks.train_batch(iteration, cfg.outer.meta_batch), epoch)
                if (iteration + 1) % t.log_every == 0 or iteration + 1 == total:
                    values = {k: v.item() for k, v in metrics.items()}
                    if not math.isfinite(values["meta_loss"]):
                        raise FloatingPointError(
                            f"meta-loss became {values['meta_loss']} at iteration {iteration} (epoch {epoch}); "
                            "lower outer.lr or set outer.grad_clamp")
                    lr = cosine_lr(cfg, epoch)
                    log.write(iteration=iteration + 1, epoch=epoch, phase="train", loss=values["loss"],
                              accuracy=values.get("accuracy", ""), lr=lr,
                              seconds=round(time.perf_counter() - start, 3))
                    bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}",
                                    **({"acc": f"{values['accuracy']:.3f}"} if "accuracy" in values else {}))
                bar.update(1)
            val = trainer.evaluate("val")
            log.write(iteration=(epoch + 1) * t.iters_per_epoch, epoch=epoch, phase="val", loss=val["loss"],
                      accuracy=val.get("accuracy", ""), seconds=round(time.perf_counter() - start, 3))
        final = final_metrics(trainer)
    finally:
        bar.close()
        log.close()
    summary = {"preset": cfg.name, "iterations": total, "seconds": round(time.perf_counter() - start, 3),
               "final": final}
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def final_metrics(trainer: Trainer) -> dict[str, float]:
    """Held-out (test split) results of the final model."""
    test = trainer.evaluate("test")
    if trainer.tasks.kind == "regression":
        before = trainer.evaluate("test", steps=0)
        return {"mse_before_adaptation": before["loss"], "mse_after_adaptation": test["loss"],
                "mse_after_adaptation_ci95": test["loss_ci95"], "num_tasks": test["num_tasks"],
                "adaptation_steps": trainer.cfg.inner.test_steps}
    return {"accuracy": test["accuracy"], "accuracy_ci95": test["accuracy_ci95"], "loss": test["loss"],
            "num_tasks": test["num_tasks"]}

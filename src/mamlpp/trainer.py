"""The outer loop: Adam over the meta-parameters, CA, gradient clamp, epochs x iterations, run files.

Run directory contract (read by later tools):
  config.json   the resolved config
  metrics.csv   one row per logged step: iteration, epoch, phase (train/val), loss, accuracy, lr, seconds
  checkpoints/  latest.pt and the top-k epochs by validation score (checkpoint.py)
  tensorboard/  the same metrics as TensorBoard events
  test.json     the test protocol's result (evaluation.py)
  summary.json  at the end: {"preset", "iterations", "seconds", "final": {metric: value}}
"""
from __future__ import annotations

import csv
import io
import math
import os
import time
from pathlib import Path

import torch

from .config import Config, ConfigError
from .distributed import Dist, Shard
from .files import atomic_write_bytes, atomic_write_json
from .inner import init_rates
from .loop import evaluate_loop, meta_loss_loop
from .network import build_model
from .objective import evaluate, meta_loss
from .schedules import cosine_lr
from .tasks import TaskSource

Tree = dict[str, torch.Tensor]
# Auto chunks (BENCHMARKS.md). On a CPU, passes over few tasks keep activations near the caches:
# training passes of about 4M first-layer activations (2 tasks of Omniglot 20-way 1-shot, 1 of
# Mini-ImageNet) cut peak memory by 2.5-4x and were as fast or faster than the whole meta-batch, and
# evaluating 4 tasks per pass was twice as fast as 200. On a GPU (or for the sinusoid MLP) big passes win.
CPU_CHUNK_ACTIVATIONS, CPU_EVAL_CHUNK, GPU_EVAL_CHUNK = 2**22, 4, 200
METRIC_FIELDS = ["iteration", "epoch", "phase", "loss", "accuracy", "lr", "seconds"]


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
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
    """Holds the explicit training state (params, BN state, Adam) and runs meta-updates.

    Under torchrun (`dist`), each process takes its share of every meta-batch's tasks and of the
    evaluation tasks; gradients and running statistics are all-reduced, results gathered.
    """

    def __init__(self, cfg: Config, tasks: TaskSource, device: torch.device, dist: Dist = Dist()):
        if dist.world > cfg.outer.meta_batch:
            raise ConfigError(f"outer.meta_batch={cfg.outer.meta_batch} is smaller than the {dist.world} processes; "
                              "every process needs at least one task")
        if dist.active and cfg.train.chunk:
            raise ConfigError("train.chunk splits the meta-batch within one process; under torchrun leave it at 0 "
                              "(each process already holds only its share of the tasks)")
        self.cfg, self.tasks, self.device, self.dist = cfg, tasks, device, dist
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
        shard = Shard()
        if self.dist.active:
            total = self.cfg.outer.meta_batch
            lo, hi = self.dist.share(total)
            episodes = {k: v[lo:hi] for k, v in episodes.items()}
            shard = Shard(offset=lo, total=total, all_reduce=self.dist.all_reduce)
        tasks = episodes["xs"].shape[0]
        chunk = self.cfg.train.chunk or self._auto_chunk(tasks)
        if chunk >= tasks:
            loss, metrics, self.state = self._meta_loss(self.model, self.params, self.state, episodes,
                                                        self.cfg, epoch, self.tasks.kind, shard)
            loss.backward()
        else:  # chunked meta-batch: one graph alive at a time, the same gradients
            loss, metrics = self._chunked_backward(episodes, epoch, chunk)
        if self.dist.active:
            self.dist.all_reduce_grads(self.optimizer.param_groups[0]["params"])
            share = (hi - lo) / total  # metrics are local means: weight them by the share of tasks
            for k in metrics:
                metrics[k] = metrics[k] * share
                self.dist.all_reduce(metrics[k])
            loss = loss.detach().clone()
            self.dist.all_reduce(loss)
        if self.cfg.outer.grad_clamp is not None:
            c = self.cfg.outer.grad_clamp
            for p in self.clamped:
                if p.grad is not None:
                    p.grad.clamp_(-c, c)
        self.optimizer.step()
        metrics["meta_loss"] = loss.detach()
        return metrics

    def _auto_chunk(self, tasks: int) -> int:
        if self.dist.active or self.device.type == "cuda" or self.cfg.model.arch != "conv4":
            return tasks
        d = self.cfg.data
        per_task = d.ways * (d.shots + d.queries) * self.cfg.model.filters * math.prod(self.tasks.input_shape[1:])
        return max(1, CPU_CHUNK_ACTIVATIONS // per_task)

    def _chunked_backward(self, episodes: dict, epoch: int, chunk: int):
        """Backward over `chunk` tasks at a time, gradients accumulating. A mean over tasks becomes a
        sum of chunk means weighted by their share; the BNRS state threads through the chunks in
        task order, which is exactly the reference's sequential update."""
        tasks = episodes["xs"].shape[0]
        mean = self.cfg.outer.task_reduction == "mean"
        loss, metrics = 0.0, {}
        for lo in range(0, tasks, chunk):
            part = {k: v[lo:lo + chunk] for k, v in episodes.items()}
            share = part["xs"].shape[0] / tasks
            part_loss, part_metrics, self.state = self._meta_loss(self.model, self.params, self.state, part,
                                                                  self.cfg, epoch, self.tasks.kind)
            part_loss = part_loss * share if mean else part_loss
            part_loss.backward()
            loss = loss + part_loss.detach()
            for k, v in part_metrics.items():
                metrics[k] = metrics.get(k, 0.0) + v * share
        return loss, metrics

    def state_dict(self) -> dict:
        """Everything a resumed run needs, as tensors and plain numbers (loads with weights_only)."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"params": {k: v.detach().clone() for k, v in flatten(self.params).items()},
                "state": {k: v.clone() for k, v in self.state.items()},
                "optimizer": self.optimizer.state_dict(), "rng": rng}

    def load_state_dict(self, ckpt: dict) -> None:
        flat = flatten(self.params)
        if set(ckpt["params"]) != set(flat):
            raise RuntimeError(f"checkpoint parameters {sorted(ckpt['params'])} do not match the model's {sorted(flat)}")
        with torch.no_grad():
            for k, v in flat.items():
                v.copy_(ckpt["params"][k])
        self.state = {k: v.to(self.device) for k, v in ckpt["state"].items()}
        self.optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["cpu"].cpu())
        if "cuda" in ckpt["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu(), self.device)

    def evaluate_tasks(self, split: str, num_tasks: int | None = None, steps: int | None = None) -> dict:
        """Per-task results on the fixed tasks of a split, `eval_chunk` tasks per batched pass:
        {"loss": [T], "accuracy": [T] (classification), "output": [T, n, ...], "target": [T, n, ...]}."""
        num_tasks = num_tasks or self.cfg.train.eval_tasks
        big = self.device.type == "cuda" or self.cfg.model.arch != "conv4"
        chunk = self.cfg.train.eval_chunk or (GPU_EVAL_CHUNK if big else CPU_EVAL_CHUNK)
        lo, hi = self.dist.share(num_tasks)
        parts = []
        for first in range(lo, hi, chunk):
            episodes = self.tasks.eval_batch(split, first, min(chunk, hi - first))
            result = self._evaluate(self.model, self.params, self.state, episodes, self.cfg,
                                    self.tasks.kind, steps)
            result["target"] = episodes["yq"]
            parts.append(result)
        local = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return {k: self.dist.gather(v, num_tasks) for k, v in local.items()}

    def evaluate(self, split: str, num_tasks: int | None = None, steps: int | None = None) -> dict[str, float]:
        """Mean loss/accuracy and 95% CI over the fixed tasks of a split."""
        result = self.evaluate_tasks(split, num_tasks, steps)
        out = summarise("loss", result["loss"])
        if "accuracy" in result:
            out.update(summarise("accuracy", result["accuracy"]))
        return out


def summarise(name: str, per_task: torch.Tensor) -> dict[str, float]:
    per_task = per_task.double().cpu()
    n = per_task.numel()
    std = per_task.std().item() if n > 1 else 0.0
    return {name: per_task.mean().item(), f"{name}_ci95": 1.96 * std / math.sqrt(n), "num_tasks": n}




class NonFiniteLossError(FloatingPointError):
    """The meta-loss or the parameters stopped being finite; the last good checkpoint is kept."""


class MetricsLog:
    """RUN_DIR/metrics.csv, flushed per row so a killed run keeps its history, plus TensorBoard."""

    def __init__(self, run_dir: Path, resume_iteration: int | None, tensorboard: bool):
        path = run_dir / "metrics.csv"
        if resume_iteration is not None and path.exists():  # drop rows the resumed run will redo
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= resume_iteration]
            self._rewrite(path, rows)
        new = not path.exists()
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=METRIC_FIELDS)
        if new:
            self.writer.writeheader()
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_iteration or None)

    @staticmethod
    def _rewrite(path: Path, rows: list[dict]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(path, buffer.getvalue().encode())

    def write(self, **row) -> None:
        self.writer.writerow({k: row.get(k, "") for k in METRIC_FIELDS})
        self.file.flush()
        if self.tb is not None:
            for key in ("loss", "accuracy", "lr"):
                if row.get(key, "") != "":
                    self.tb.add_scalar(f"{row['phase']}/{key}", row[key], row["iteration"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _finite(trainer: Trainer) -> bool:
    return all(torch.isfinite(p).all() for p in flatten(trainer.params).values())


def train(cfg: Config, tasks: TaskSource, run_dir: str | os.PathLike, device: torch.device,
          progress: bool = True, resume: bool = False, run_test: bool = True, dist: Dist = Dist()) -> dict:
    """Meta-train cfg.train.epochs x iters_per_epoch, validating and checkpointing after every epoch.

    With resume, continues from RUN_DIR/checkpoints/latest.pt: parameters, optimiser, BN state, RNG
    and the position in the (index-addressed) task stream, so a killed run ends where an
    uninterrupted one would. Runs the test protocol at the end unless run_test is False.
    Under torchrun every rank trains its share; only rank 0 writes to run_dir.
    """
    from tqdm import tqdm

    from . import checkpoint
    from .evaluation import evaluate_run

    run_dir = Path(run_dir)
    t = cfg.train
    trainer = Trainer(cfg, tasks, device, dist)
    start_epoch, elapsed = 0, 0.0
    latest = checkpoint.checkpoint_dir(run_dir) / checkpoint.LATEST
    if resume and latest.exists():
        ckpt = checkpoint.load(latest, device)
        trainer.load_state_dict(ckpt)
        start_epoch, elapsed = ckpt["epoch"] + 1, ckpt["seconds"]
    elif not resume and (run_dir / "config.json").exists():
        raise FileExistsError(f"{run_dir} already holds a run: resume it with --resume {run_dir} or pick another --out")
    dist.barrier()  # every rank has checked run_dir before rank 0 writes into it
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            atomic_write_json(run_dir / "config.json", cfg.to_dict())
    total = t.epochs * t.iters_per_epoch
    done = start_epoch * t.iters_per_epoch
    log = MetricsLog(run_dir, done if resume else None, t.tensorboard) if dist.main else None
    bar = tqdm(total=total, initial=done, disable=not (progress and dist.main), dynamic_ncols=True, desc=cfg.name)
    start = time.perf_counter() - elapsed
    higher_is_better = tasks.kind == "classification"
    try:
        for epoch in range(start_epoch, t.epochs):
            lr = cosine_lr(cfg, epoch)
            bad = torch.zeros((), dtype=torch.bool, device=device)
            for it in range(t.iters_per_epoch):
                iteration = epoch * t.iters_per_epoch + it
                metrics = trainer.meta_step(tasks.train_batch(iteration, cfg.outer.meta_batch), epoch)
                bad |= ~torch.isfinite(metrics["meta_loss"])
                if (iteration + 1) % t.log_every == 0 or it + 1 == t.iters_per_epoch:
                    if bad.item():  # the only host sync, once per log interval
                        raise NonFiniteLossError(
                            f"meta-loss is not finite at iteration {iteration + 1} (epoch {epoch}); the run stopped "
                            f"and keeps its last good checkpoint in {latest.parent}. Lower outer.lr, set "
                            "outer.grad_clamp, or check the data")
                    values = {k: v.item() for k, v in metrics.items()}
                    log and log.write(iteration=iteration + 1, epoch=epoch, phase="train", loss=values["loss"],
                              accuracy=values.get("accuracy", ""), lr=lr,
                              seconds=round(time.perf_counter() - start, 3))
                    shown = {"loss": f"{values['loss']:.4f}", "lr": f"{lr:.2e}"}
                    if "accuracy" in values:
                        shown["acc"] = f"{values['accuracy']:.3f}"
                    bar.set_postfix(shown)
                bar.update(1)
            if not _finite(trainer):
                raise NonFiniteLossError(f"parameters are not finite after epoch {epoch}; the run keeps its last "
                                         f"good checkpoint in {latest.parent}")
            val = trainer.evaluate("val")
            score = val["accuracy"] if higher_is_better else -val["loss"]
            iteration = (epoch + 1) * t.iters_per_epoch
            seconds = time.perf_counter() - start
            if dist.main:
                log.write(iteration=iteration, epoch=epoch, phase="val", loss=val["loss"],
                          accuracy=val.get("accuracy", ""), lr=lr, seconds=round(seconds, 3))
                payload = {**trainer.state_dict(), "epoch": epoch, "iteration": iteration, "seconds": seconds,
                           "val": val}
                checkpoint.update_top_k(run_dir, payload, epoch, score, t.top_k)
                checkpoint.save(latest, payload)  # written last: the resume point
    finally:
        bar.close()
        if log:
            log.close()
    seconds = time.perf_counter() - start
    dist.barrier()  # rank 0's checkpoints are on disk before anyone reads them
    final = evaluate_run(run_dir, device=device, tasks=tasks, dist=dist) if run_test else {}
    summary = {"preset": cfg.name, "iterations": total, "seconds": round(seconds, 3), "final": final}
    if dist.main:
        atomic_write_json(run_dir / "summary.json", summary)
    return summary

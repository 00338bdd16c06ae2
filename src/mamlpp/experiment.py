"""A run from start to end: epochs of meta-updates, validation and checkpoints after every epoch,
exact resume after a kill, then the test protocol (evaluation.py). Writes the run folder (rundir.py).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

import torch

from .config import Config
from .distributed import Dist
from .evaluation import evaluate_run
from .methods import flatten
from .rundir import MetricsLog, RunDir
from .schedules import meta_lr
from .tasks import TaskSource
from .trainer import Trainer


class NonFiniteLossError(FloatingPointError):
    """The meta-loss or the parameters stopped being finite; the last good checkpoint is kept."""


def _kept(run: RunDir) -> str:
    if run.latest.exists():
        return f"keeps its last good checkpoint in {run.checkpoints}"
    return "has no checkpoint yet (it stopped in its first epoch)"


def _finite(trainer: Trainer) -> bool:
    return all(torch.isfinite(p).all() for p in flatten(trainer.params).values())


def train(cfg: Config, tasks: TaskSource, run_dir: str | os.PathLike, device: torch.device,
          progress: bool = True, resume: bool = False, run_test: bool = True, dist: Dist = Dist(),
          backbone=None) -> dict:
    """Meta-train cfg.train.epochs x iters_per_epoch, validating and checkpointing after every epoch.

    With resume, continues from RUN_DIR/checkpoints/latest.pt: parameters, optimiser, method state,
    RNG and the position in the (index-addressed) task stream, so a killed run ends where an
    uninterrupted one would. Runs the test protocol at the end unless run_test is False.
    Under torchrun every rank trains its share; only rank 0 writes to run_dir. backbone: a custom
    backbone factory (usermodule.ModuleBackbone) for model.arch=module.
    """
    run = RunDir(run_dir)
    if dist.main and not resume:
        run.prepare_new()
    with run.lock() if dist.main else contextlib.nullcontext():  # one writer per run folder (rank 0)
        return _train(cfg, tasks, run, device, progress, resume, run_test, dist, backbone)


def _train(cfg: Config, tasks: TaskSource, run: RunDir, device: torch.device, progress: bool, resume: bool,
           run_test: bool, dist: Dist, backbone) -> dict:
    t = cfg.train
    # Randomness beyond the task stream and the initialisation (Matching Nets' support shuffles) comes
    # from the global generator: seeded here, saved in every checkpoint, restored on resume.
    torch.manual_seed(t.seed)
    trainer = Trainer(cfg, tasks, device, dist, backbone)
    with trainer.threads() as threads:
        if dist.main:  # the run's first line: where it runs
            precision = ", bf16 convolutions and matrix products" if cfg.train.precision == "bf16" else ""
            processes, why = trainer.processes()
            if processes != dist.world:  # only `mamlpp train` and torchrun start processes
                why = f"{why}, {processes} wanted: only `mamlpp train` as a program or torchrun starts processes"
            print(f"mamlpp: {cfg.name} ({cfg.method.name}) on {device}, processes {dist.world} ({why}), "
                  f"intra-op threads {threads}{precision}", file=sys.stderr)
        return _run(cfg, tasks, run, device, progress, resume, run_test, dist, backbone, trainer)


def _run(cfg: Config, tasks: TaskSource, run: RunDir, device: torch.device, progress: bool, resume: bool,
         run_test: bool, dist: Dist, backbone, trainer: Trainer) -> dict:
    from tqdm import tqdm

    t = cfg.train
    start_epoch, elapsed = 0, 0.0
    if resume and not run.is_run():
        raise FileNotFoundError(f"{run} is not a run directory (no config.json): nothing to resume")
    if not resume and run.is_run():
        raise FileExistsError(f"{run} already holds a run: resume it with --resume {run} or pick another --out")
    if dist.main:
        run.remove_temporaries()  # of writes a kill interrupted; nobody else writes here (we hold the lock)
    if resume and run.latest.exists():
        ckpt, warning = run.load_resume_point(device)
        if warning and dist.main:
            print(f"mamlpp: {warning}", file=sys.stderr)
            run.save_checkpoint(run.latest, ckpt)  # the intact one becomes the resume point
        trainer.load_state_dict(ckpt)
        start_epoch, elapsed = ckpt["epoch"] + 1, ckpt["seconds"]
    dist.barrier()  # every rank has checked run_dir before rank 0 writes into it
    if dist.main and not resume:
        run.write_config(cfg)
    total = t.epochs * t.iters_per_epoch
    done = start_epoch * t.iters_per_epoch
    log = MetricsLog(run, done if resume else None, t.tensorboard) if dist.main else None
    bar = tqdm(total=total, initial=done, disable=not (progress and dist.main), dynamic_ncols=True, desc=cfg.name)
    start = time.perf_counter() - elapsed
    higher_is_better = tasks.kind == "classification"
    try:
        for epoch in range(start_epoch, t.epochs):
            lr = meta_lr(cfg, epoch)
            bad = torch.zeros((), dtype=torch.bool, device=device)
            for it in range(t.iters_per_epoch):
                iteration = epoch * t.iters_per_epoch + it
                metrics = trainer.meta_step(tasks.train_batch(iteration, cfg.outer.meta_batch), epoch)
                bad |= ~torch.isfinite(metrics["meta_loss"])
                if (iteration + 1) % t.log_every == 0 or it + 1 == t.iters_per_epoch:
                    if bad.item():  # the only host sync, once per log interval
                        raise NonFiniteLossError(
                            f"meta-loss is not finite at iteration {iteration + 1} (epoch {epoch}); the run stopped "
                            f"and {_kept(run)}. Lower outer.lr, set outer.grad_clamp, or check the data")
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
                raise NonFiniteLossError(f"parameters are not finite after epoch {epoch}; the run stopped and "
                                         f"{_kept(run)}")
            val = trainer.evaluate("val")
            score = val["accuracy"] if higher_is_better else -val["loss"]
            iteration = (epoch + 1) * t.iters_per_epoch
            seconds = time.perf_counter() - start
            if dist.main:
                log.write(iteration=iteration, epoch=epoch, phase="val", loss=val["loss"],
                          accuracy=val.get("accuracy", ""), lr=lr, seconds=round(seconds, 3))
                payload = {**trainer.state_dict(), "epoch": epoch, "iteration": iteration, "seconds": seconds,
                           "val": val, "tasks": {"kind": tasks.kind, "input_shape": list(tasks.input_shape),
                                                 "num_outputs": tasks.num_outputs}}
                run.update_top_k(payload, epoch, score, t.top_k)
                run.save_checkpoint(run.latest, payload)  # written last: the resume point
    finally:
        bar.close()
        if log:
            log.close()
    seconds = time.perf_counter() - start
    dist.barrier()  # rank 0's checkpoints are on disk before anyone reads them
    final = evaluate_run(run.path, device=device, tasks=tasks, dist=dist, backbone=backbone).to_dict() if run_test else {}
    summary = {"preset": cfg.name, "iterations": total, "seconds": round(seconds, 3), "final": final}
    if dist.main:
        run.write_summary(summary)
    return summary

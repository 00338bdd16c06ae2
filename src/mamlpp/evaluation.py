"""The paper's test protocol (spec 7), for every method: the top-k validation checkpoints, ensembled by
averaging their logits (each method's "output") on the fixed test tasks, reported beside the single
best model.

Accuracy is the mean over tasks of each task's query accuracy, with a 95% confidence interval over
tasks (1.96 * std / sqrt(tasks)). The paper's own "+/-" is the standard deviation over three runs,
which `mamlpp report` computes across run directories.
"""
from __future__ import annotations

import contextlib

import torch

from .config import ConfigError
from .distributed import Dist, select_device
from .rundir import RunDir, TestResult
from .trainer import Trainer, summarise


def evaluate_run(run_dir, device: torch.device | None = None, tasks=None, top_k: int | None = None,
                 data_dir: str | None = None, split: str = "test", dist: Dist = Dist(), backbone=None) -> TestResult:
    """Evaluate a run's top-k checkpoints on the fixed test tasks; writes RUN_DIR/test.json, or
    RUN_DIR/test_top{k}.json for a top_k other than the run's train.top_k (a result of another
    protocol never replaces the run's own). Under torchrun the tasks are split across ranks and rank
    0 writes the file, holding the run folder's lock."""
    run = RunDir(run_dir)
    with run.lock() if dist.main else contextlib.nullcontext():
        return _evaluate_run(run, device, tasks, top_k, data_dir, split, dist, backbone)


def _evaluate_run(run: RunDir, device, tasks, top_k, data_dir, split, dist, backbone) -> TestResult:
    from .data import build_tasks

    cfg = run.read_config()
    index = run.read_index()
    if not index:
        raise FileNotFoundError(f"no checkpoints in {run.checkpoints}: train the run first")
    if top_k is not None and not 1 <= top_k <= len(index):
        raise ConfigError(f"--top-k {top_k}: expected 1 to {len(index)} (the checkpoints {run.checkpoints} holds)")
    device = device or select_device(cfg.train.device)
    tasks = tasks or build_tasks(cfg, device, data_dir=data_dir)
    entries = index[: top_k or cfg.train.top_k]
    trainer = Trainer(cfg, tasks, device, dist, backbone)
    outputs, singles = [], []
    for entry in entries:
        trainer.load_state_dict(run.load_checkpoint(run.checkpoints / entry["file"], device))
        result = trainer.evaluate_tasks(split)
        outputs.append(result["output"])
        singles.append(result)
        target = result["target"]
    ensemble = torch.stack(outputs).mean(0)  # average raw logits (or predictions) over models
    best = singles[0]  # index is best first
    common = {"preset": cfg.name, "method": cfg.method.name, "split": split, "kind": tasks.kind,
              "ensemble_size": len(entries), "checkpoint_epochs": [e["epoch"] for e in entries]}
    extra = {"inner_steps": cfg.inner.test_steps} if cfg.method.name == "maml" else {}
    if tasks.kind == "classification":
        key, per_task = "accuracy", (ensemble.argmax(-1) == target).double().mean(1)
    else:  # regression: MSE, and the meta-initialisation's own before adaptation (MAML's sinusoid)
        key, per_task = "loss", (ensemble - target).pow(2).flatten(1).mean(1)
        trainer.load_state_dict(run.load_checkpoint(run.checkpoints / entries[0]["file"], device))
        extra["mse_before_adaptation"] = summarise("m", trainer.evaluate_tasks(split, steps=0)["loss"])["m"]
    ens, single = summarise("m", per_task), summarise("m", best[key])
    per_model = [summarise("m", s[key])["m"] for s in singles]
    result = TestResult(**common, num_tasks=ens["num_tasks"], metric=ens["m"], ci95=ens["m_ci95"],
                        single_model=single["m"], single_model_ci95=single["m_ci95"], per_model=per_model, **extra)
    if dist.main:
        run.write_test(result, path=run.test_path(split, None if top_k in (None, cfg.train.top_k) else top_k))
    return result

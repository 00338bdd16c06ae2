"""The paper's test protocol (spec 7): the top-k validation checkpoints, ensembled by averaging their
final-step logits on the fixed test tasks, reported beside the single best model.

Accuracy is the mean over tasks of each task's query accuracy, with a 95% confidence interval over
tasks (1.96 * std / sqrt(tasks)). The paper's own "+/-" is the standard deviation over three runs,
which `mamlpp report` computes across run directories.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import checkpoint
from .config import Config
from .distributed import Dist
from .files import atomic_write_json
from .trainer import Trainer, select_device, summarise


def load_run_config(run_dir) -> Config:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a run directory")
    return Config.from_dict(json.loads(path.read_text()))


def evaluate_run(run_dir, device: torch.device | None = None, tasks=None, top_k: int | None = None,
                 data_dir: str | None = None, split: str = "test", dist: Dist = Dist()) -> dict:
    """Evaluate a run's top-k checkpoints on the fixed test tasks; writes RUN_DIR/test.json.
    Under torchrun the tasks are split across ranks and rank 0 writes the file."""
    from .tasks import build_tasks

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    device = device or select_device(cfg.train.device)
    tasks = tasks or build_tasks(cfg, device, data_dir=data_dir)
    index = checkpoint.read_index(run_dir)
    if not index:
        raise FileNotFoundError(f"no checkpoints in {checkpoint.checkpoint_dir(run_dir)}: train the run first")
    entries = index[: top_k or cfg.train.top_k]
    trainer = Trainer(cfg, tasks, device, dist)
    outputs, singles = [], []
    for entry in entries:
        trainer.load_state_dict(checkpoint.load(checkpoint.checkpoint_dir(run_dir) / entry["file"], device))
        result = trainer.evaluate_tasks(split)
        outputs.append(result["output"])
        singles.append(result)
        target = result["target"]
    ensemble = torch.stack(outputs).mean(0)  # average raw logits (or predictions) over models
    best = singles[0]  # index is best first
    common = {"preset": cfg.name, "split": split, "ensemble_size": len(entries),
              "checkpoint_epochs": [e["epoch"] for e in entries], "inner_steps": cfg.inner.test_steps}
    if tasks.kind == "classification":
        per_task = (ensemble.argmax(-1) == target).double().mean(1)
        ens, single = summarise("accuracy", per_task), summarise("accuracy", best["accuracy"])
        out = {"accuracy": ens["accuracy"], "ci95": ens["accuracy_ci95"], "num_tasks": ens["num_tasks"],
               "single_model_accuracy": single["accuracy"], "single_model_ci95": single["accuracy_ci95"],
               "per_model_accuracy": [summarise("accuracy", s["accuracy"])["accuracy"] for s in singles], **common}
    else:
        per_task = (ensemble - target).pow(2).flatten(1).mean(1)
        ens, single = summarise("mse", per_task), summarise("mse", best["loss"])
        trainer.load_state_dict(checkpoint.load(checkpoint.checkpoint_dir(run_dir) / entries[0]["file"], device))
        before = summarise("mse", trainer.evaluate_tasks(split, steps=0)["loss"])
        out = {"mse_after_adaptation": ens["mse"], "ci95": ens["mse_ci95"], "num_tasks": ens["num_tasks"],
               "mse_before_adaptation": before["mse"], "single_model_mse_after_adaptation": single["mse"],
               "single_model_ci95": single["mse_ci95"], **common}
    if dist.main:
        atomic_write_json(run_dir / f"{split}.json", out)
    return out

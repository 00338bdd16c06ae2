"""Sinusoid regression: a real learning check, and the run-directory contract through the CLI."""
import csv
import json

import torch

from mamlpp.cli import main
from mamlpp.presets import get_preset
from mamlpp.sinusoid import SinusoidTasks
from mamlpp.trainer import Trainer


def test_maml_learns_to_adapt_to_sinusoids():
    cfg = get_preset("sinusoid-maml")
    cfg.train.eval_tasks, cfg.train.eval_chunk = 300, 300
    tasks = SinusoidTasks(cfg.data, seed=0, device=torch.device("cpu"), dtype=torch.float32)
    trainer = Trainer(cfg, tasks, torch.device("cpu"))
    untrained = trainer.evaluate("test")["loss"]
    for it in range(1500):
        trainer.meta_step(tasks.train_batch(it, cfg.outer.meta_batch), epoch=0)
    before = trainer.evaluate("test", steps=0)["loss"]
    after = trainer.evaluate("test")["loss"]
    # Pre-adaptation MSE of any fixed function is about E[A^2]/2 ~ 4; adaptation must beat it widely.
    assert after < 0.4 * before, (before, after)
    assert after < 0.5 * untrained


def test_sinusoid_tasks_are_deterministic_and_held_out():
    cfg = get_preset("sinusoid-maml")
    a = SinusoidTasks(cfg.data, seed=0, device=torch.device("cpu"), dtype=torch.float32)
    b = SinusoidTasks(cfg.data, seed=1, device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(a.train_batch(3, 5)["xs"], a.train_batch(3, 5)["xs"])
    assert torch.equal(a.train_batch(1, 4)["ys"][2], a.eval_batch("train", 6, 1)["ys"][0])  # task index 6
    assert not torch.equal(a.train_batch(0, 5)["ys"], b.train_batch(0, 5)["ys"])  # seed drives training
    assert torch.equal(a.eval_batch("test", 10, 3)["yq"], b.eval_batch("test", 10, 3)["yq"])  # fixed test set
    assert torch.equal(a.eval_batch("test", 0, 20)["yq"][10:13], a.eval_batch("test", 10, 3)["yq"])
    assert not torch.equal(a.eval_batch("test", 0, 5)["yq"], a.eval_batch("val", 0, 5)["yq"])


def test_train_cli_writes_the_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "sinusoid-maml", "train.epochs=2", "train.iters_per_epoch=10", "train.log_every=5",
                 "train.eval_tasks=20", "--out", str(out), "--no-progress"])
    assert code == 0
    assert "before adaptation" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["epochs"] == 2 and config["name"] == "sinusoid-maml"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["phase"] for r in rows] == ["train", "train", "val"] * 2
    assert all(float(r["loss"]) > 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"] == "sinusoid-maml" and summary["iterations"] == 20 and summary["seconds"] > 0
    assert summary["final"]["mse_before_adaptation"] > 0 and summary["final"]["mse_after_adaptation"] > 0

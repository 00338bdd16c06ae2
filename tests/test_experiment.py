"""Runs end to end on sinusoid: checkpoints, kill-and-resume, the test protocol, failures, budget."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mamlpp.rundir import RunDir
from mamlpp.cli import main
from mamlpp.config import apply_budget
from mamlpp.evaluation import evaluate_run
from mamlpp.presets import get_preset
from mamlpp.data import build_tasks
from mamlpp.experiment import NonFiniteLossError, train
from mamlpp.presets import resolve as resolve_config

QUICK = ["train.epochs=4", "train.iters_per_epoch=40", "train.eval_tasks=40", "train.log_every=10",
         "model.hidden=16,16", "outer.meta_batch=5"]


def quick_cfg(*extra):
    return resolve_config("sinusoid-maml", QUICK + list(extra))


def run(cfg, out, **kw):
    return train(cfg, build_tasks(cfg, torch.device("cpu")), out, torch.device("cpu"), progress=False, **kw)


def final_params(run_dir):
    return RunDir(run_dir).load_checkpoint(RunDir(run_dir).latest)["params"]


def test_checkpoints_keep_latest_and_top_k(tmp_path):
    cfg = quick_cfg("train.top_k=2")
    summary = run(cfg, tmp_path / "r")
    folder = tmp_path / "r" / "checkpoints"
    index = json.loads((folder / "index.json").read_text())
    assert len(index) == 2 and index[0]["score"] >= index[1]["score"]
    assert sorted(p.name for p in folder.glob("*.pt")) == sorted([e["file"] for e in index] + ["latest.pt"])
    for p in folder.glob("*.pt"):
        torch.load(p, weights_only=True)  # loads without pickled objects
    assert summary["final"]["ensemble_size"] == 2


def test_refuses_to_overwrite_a_run(tmp_path):
    run(quick_cfg("train.epochs=1"), tmp_path / "r", run_test=False)
    with pytest.raises(FileExistsError, match="--resume"):
        run(quick_cfg("train.epochs=1"), tmp_path / "r")


def test_kill_mid_epoch_and_resume_matches_uninterrupted(tmp_path):
    overrides = ["train.epochs=3", "train.iters_per_epoch=400", "train.eval_tasks=20", "train.log_every=20",
                 "model.hidden=16,16", "outer.meta_batch=5", "train.tensorboard=false"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    cmd = [sys.executable, "-m", "mamlpp", "train", "sinusoid-maml", *overrides, "--no-test", "--no-progress"]
    subprocess.run(cmd + ["--out", str(full)], check=True, capture_output=True)
    proc = subprocess.Popen(cmd + ["--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the run is inside its second epoch, past a checkpoint
        text = metrics.read_text() if metrics.exists() else ""
        rows = [line.split(",") for line in text.splitlines()[1:]]
        if any(r[2] == "train" and 500 <= int(r[0]) <= 700 for r in rows):
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert RunDir(killed).load_checkpoint(RunDir(killed).latest)["epoch"] == 0
    subprocess.run([sys.executable, "-m", "mamlpp", "train", "--resume", str(killed), "--no-test", "--no-progress"],
                   check=True, capture_output=True)
    a, b = final_params(full), final_params(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = (killed / "metrics.csv").read_text().splitlines()[1:]
    iterations = [int(r.split(",")[0]) for r in rows if ",train," in r]
    assert iterations == sorted(set(iterations)) and iterations[-1] == 1200  # no duplicated rows


def test_eval_writes_test_json_with_the_ensemble(tmp_path, capsys):
    run(quick_cfg("train.top_k=3"), tmp_path / "r", run_test=False)
    assert main(["eval", str(tmp_path / "r"), "--top-k", "2"]) == 0
    # another ensemble size than the run's own is another protocol: written beside test.json
    assert not (tmp_path / "r" / "test.json").exists()
    result = json.loads((tmp_path / "r" / "test_top2.json").read_text())
    assert result["ensemble_size"] == 2 and result["num_tasks"] == 40
    index = json.loads((tmp_path / "r" / "checkpoints" / "index.json").read_text())
    assert result["checkpoint_epochs"] == [e["epoch"] for e in index[:2]]
    assert result["mse_after_adaptation"] > 0 and result["single_model_mse_after_adaptation"] > 0
    assert "held-out MSE" in capsys.readouterr().out


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = quick_cfg()
    tasks = build_tasks(cfg, torch.device("cpu"))
    clean = tasks.train_batch

    def poisoned(iteration, batch_size):  # NaN targets in the third epoch
        batch = clean(iteration, batch_size)
        if iteration == 2 * cfg.train.iters_per_epoch + 5:
            batch["yq"] = batch["yq"] * float("nan")
        return batch

    tasks.train_batch = poisoned
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        train(cfg, tasks, tmp_path / "r", torch.device("cpu"), progress=False)
    latest = RunDir(tmp_path / "r").load_checkpoint(RunDir(tmp_path / "r").latest)
    assert latest["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in latest["params"].values())
    assert not (tmp_path / "r" / "summary.json").exists()


def test_budget_keeps_schedules_proportional():
    cfg = apply_budget(resolve_config("omniglot-20w1s-maml+da", ["train.budget=0.1"]))
    assert cfg.train.epochs == 10 and cfg.outer.msl_epochs == 1 and cfg.inner.da_epochs == 4  # 51 -> 5 FO epochs
    pp = resolve_config("mini-5w1s-mamlpp", ["budget=0.2"])
    assert (pp.train.epochs, pp.outer.msl_epochs, pp.inner.da_epochs) == (20, 3, 1)
    assert resolve_config("omniglot-20w1s-mamlpp", []).train.epochs == 100
    with pytest.raises(Exception, match="train.budget"):
        resolve_config("omniglot-20w1s-mamlpp", ["budget=2"])


def test_full_disk_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    """A write that fails half-way (ENOSPC) keeps the last complete files and no temporary ones."""
    import errno

    from mamlpp import files

    cfg = quick_cfg("train.epochs=1")
    run(cfg, tmp_path / "r", run_test=False)
    folder = tmp_path / "r" / "checkpoints"
    before = (folder / "latest.pt").read_bytes()
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space left on device while writing .*latest.pt; the previous latest.pt"):
        RunDir(folder.parent).save_checkpoint(folder / "latest.pt", {"params": {"x": torch.ones(1000)}})
    assert (folder / "latest.pt").read_bytes() == before
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert RunDir(folder.parent).load_checkpoint(folder / "latest.pt")["epoch"] == 0

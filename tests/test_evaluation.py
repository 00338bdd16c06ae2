"""The test protocol recomputed by hand from a run's files: each top-k checkpoint evaluated alone,
their logits averaged (not their probabilities, not their votes), the single best model chosen by
validation score, and the 95% confidence interval over tasks."""
import csv
import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from conftest import write_images
from mamlpp.cli import main
from mamlpp.config import Config
from mamlpp.data import build_tasks
from mamlpp.trainer import Trainer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-epoch MAML run keeping all three epochs (top_k=3) on a generated folder of 15 classes."""
    root = tmp_path_factory.mktemp("evaluation")
    for c in range(15):
        write_images(root / "images" / f"class{c:02d}", 6, seed=c)
    out = root / "run"
    args = ["data.dataset=folder", f"data.data_dir={root / 'images'}", "data.split_fractions=0.34,0.33,0.33",
            "data.image_size=16", "data.channels=1", "data.queries=3", "model.filters=8", "inner.steps=1",
            "outer.meta_batch=2", "outer.lr=0.01", "train.epochs=3", "train.iters_per_epoch=3",
            "train.eval_tasks=20", "train.top_k=3", "train.device=cpu", "train.tensorboard=false"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAMLPP_CACHE", str(root / "cache"))
        assert main(["train", "omniglot-5w1s-maml", *args, "--out", str(out), "--no-progress"]) == 0
        yield out


@pytest.fixture(scope="module")
def recomputed(run):
    """test.json, the validation accuracy of each epoch (metrics.csv), and by hand: the test-task logits
    of each checkpoint loaded alone into a fresh Trainer, ordered by validation score, best first."""
    with open(run / "metrics.csv") as f:
        val = {int(r["epoch"]): float(r["accuracy"]) for r in csv.DictReader(f) if r["phase"] == "val"}
    ranked = sorted(val, key=lambda e: (-val[e], e))  # ties: the earlier epoch first
    files = {e["epoch"]: e["file"] for e in json.loads((run / "checkpoints" / "index.json").read_text())}
    cfg = Config.from_dict(json.loads((run / "config.json").read_text()))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAMLPP_CACHE", str(run.parent / "cache"))
        tasks = build_tasks(cfg, CPU)
    logits = []
    for epoch in ranked:
        trainer = Trainer(cfg, tasks, CPU)
        trainer.load_state_dict(torch.load(run / "checkpoints" / files[epoch], weights_only=True))
        alone = trainer.evaluate_tasks("test")
        logits.append(alone["output"])
    return {"result": json.loads((run / "test.json").read_text()), "val": val, "ranked": ranked,
            "logits": torch.stack(logits), "target": alone["target"]}  # logits [models, tasks, queries, ways]


def per_task_accuracy(predictions, target) -> torch.Tensor:
    return (predictions == target).double().mean(1)


def mean(per_task: torch.Tensor) -> float:
    return statistics.fmean(per_task.tolist())


def test_the_top_k_checkpoints_are_ranked_by_validation_score(recomputed):
    result, val = recomputed["result"], recomputed["val"]
    assert len(val) == 3 and len(set(val.values())) == 3  # three epochs with distinct scores: the ranking matters
    assert result["checkpoint_epochs"] == recomputed["ranked"] and result["ensemble_size"] == 3
    assert result["num_tasks"] == 20 and result["split"] == "test"


def test_each_checkpoint_is_loaded_and_the_single_model_is_the_best_by_validation(recomputed):
    result, logits, target = recomputed["result"], recomputed["logits"], recomputed["target"]
    assert logits.shape == (3, 20, 15, 5)
    alone = [mean(per_task_accuracy(out.argmax(-1), target)) for out in logits]
    assert len(set(alone)) == 3  # the checkpoints differ, so a checkpoint that is not loaded shows
    # per-task accuracies are float32 in the run (steps of 1/15 per task): 1e-6 is exact enough
    assert result["per_model_accuracy"] == pytest.approx(alone, rel=1e-6)
    assert result["single_model_accuracy"] == pytest.approx(alone[0], rel=1e-6)  # not the last, nor the best on test


def test_the_ensemble_averages_logits_not_probabilities_or_votes(recomputed):
    result, logits, target = recomputed["result"], recomputed["logits"], recomputed["target"]
    by_logits = per_task_accuracy(logits.mean(0).argmax(-1), target)
    by_probabilities = per_task_accuracy(logits.softmax(-1).mean(0).argmax(-1), target)
    by_votes = per_task_accuracy(F.one_hot(logits.argmax(-1), 5).sum(0).argmax(-1), target)
    assert result["accuracy"] == pytest.approx(mean(by_logits), rel=1e-12)
    # On these tasks the other ways of ensembling score otherwise, so the check above tells them apart.
    assert mean(by_probabilities) != pytest.approx(mean(by_logits), rel=1e-9)
    assert mean(by_votes) != pytest.approx(mean(by_logits), rel=1e-9)


def test_ci95_is_1_96_sample_standard_deviations_over_root_tasks(recomputed):
    result, logits, target = recomputed["result"], recomputed["logits"], recomputed["target"]
    for ci, per_task, rel in ((result["ci95"], per_task_accuracy(logits.mean(0).argmax(-1), target), 1e-12),
                              (result["single_model_ci95"], per_task_accuracy(logits[0].argmax(-1), target), 1e-6)):
        x, n = per_task.tolist(), per_task.numel()
        m = sum(x) / n
        std = math.sqrt(sum((v - m) ** 2 for v in x) / (n - 1))
        assert ci == pytest.approx(1.96 * std / math.sqrt(n), rel=rel)

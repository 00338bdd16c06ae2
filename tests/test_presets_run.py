"""A representative subset of presets trains a few iterations on real Omniglot and on generated
Mini-ImageNet images, then goes through eval and report; configurations that cannot run fail early."""
import json

import pytest

from conftest import write_images
from mamlpp.cli import main

TINY = ["model.filters=8", "inner.steps=2", "outer.meta_batch=2", "train.epochs=2", "train.iters_per_epoch=2",
        "train.eval_tasks=12", "train.eval_chunk=5", "train.log_every=1", "train.device=cpu"]


@pytest.fixture
def omniglot_env(monkeypatch, shared_data_root, data_cache_dir, omniglot_set):
    monkeypatch.setenv("MAMLPP_DATA", str(shared_data_root))
    monkeypatch.setenv("MAMLPP_CACHE", str(data_cache_dir))


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory):
    """Mini-ImageNet's pre-split layout with 6/5/5 classes of 12 small JPEGs (resized to 84 on load)."""
    root = tmp_path_factory.mktemp("mini")
    for i, (s, count) in enumerate((("train", 6), ("val", 5), ("test", 5))):
        for c in range(count):
            write_images(root / "mini_imagenet" / s / f"n{s}{c:03d}", 12, size=(30, 26), seed=100 * i + c)
    return root


@pytest.mark.parametrize("preset", ["omniglot-20w1s-mamlpp", "omniglot-5w5s-maml", "omniglot-20w1s-maml+lslr",
                                    "omniglot-5w1s-mamlpp-reference", "omniglot-20w1s-protonet",
                                    "omniglot-5w5s-matchingnet", "omniglot-20w1s-metasgd",
                                    "omniglot-20w1s-mamlpp-strided"])
def test_omniglot_presets_train_and_test(preset, tmp_path, omniglot_env):
    out = tmp_path / "run"
    assert main(["train", preset, *TINY, "train.top_k=2", "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "test.json").read_text())
    assert result["num_tasks"] == 12 and result["ensemble_size"] == 2 and 0 <= result["accuracy"] <= 1
    assert set(result) >= {"accuracy", "ci95", "num_tasks", "ensemble_size", "single_model_accuracy",
                           "single_model_ci95"}


def test_mini_imagenet_presets_on_generated_images(tmp_path, mini_root, monkeypatch, data_cache_dir):
    monkeypatch.setenv("MAMLPP_CACHE", str(data_cache_dir))
    for preset in ("mini-5w1s-mamlpp", "mini-5w1s-mamlpp-2steps", "mini-5w5s-maml", "mini-5w1s-matchingnet",
                   "mini-5w1s-protonet"):
        out = tmp_path / preset
        # 12 images per generated class: K + T must fit; 6 training classes for the higher training way
        extra = ["data.queries=3", "data.train_queries=3"] + (["data.train_ways=6"] if "protonet" in preset else [])
        assert main(["train", preset, *TINY, *extra, "--out", str(out), "--data-dir", str(mini_root),
                     "--no-progress"]) == 0
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["data"]["dataset"] == "mini_imagenet" and cfg["model"]["filters"] == 8
        assert (out / "test.json").exists()


@pytest.mark.parametrize("preset", ["mini-5w1s-mamlpp-resnet12", "mini-5w1s-protonet-resnet12"])
def test_resnet12_presets_on_generated_images(preset, tmp_path, mini_root, monkeypatch, data_cache_dir):
    """ResNet-12 at a tiny width through train, validation and test; MAML++ with its inner loop
    checkpointed (the preset's setting), Prototypical Networks with DropBlock."""
    monkeypatch.setenv("MAMLPP_CACHE", str(data_cache_dir))
    out = tmp_path / preset
    extra = ["model.widths=4,6,8,8", "data.queries=3", "data.train_queries=3"]
    extra += ["data.train_ways=6"] if "protonet" in preset else []
    assert main(["train", preset, *TINY, *extra, "--out", str(out), "--data-dir", str(mini_root), "--no-progress"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["arch"] == "resnet12" and cfg["model"]["widths"] == [4, 6, 8, 8]
    assert cfg["train"]["checkpoint_inner"] == ("mamlpp" in preset)
    assert cfg["model"]["dropblock"] == (0.0 if "mamlpp" in preset else 0.1)
    result = json.loads((out / "test.json").read_text())
    assert result["num_tasks"] == 12 and 0 <= result["accuracy"] <= 1


def test_eval_and_report_on_a_classification_run(tmp_path, omniglot_env):
    runs = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        assert main(["train", "omniglot-20w1s-mamlpp", *TINY, f"train.seed={seed}", "train.top_k=3",
                     "--out", str(out), "--no-progress", "--no-test"]) == 0
        runs.append(str(out))
    assert main(["eval", runs[0]]) == 0
    result = json.loads((tmp_path / "seed0" / "test.json").read_text())
    assert result["ensemble_size"] == 2  # two epochs, top_k 3: every checkpoint there is
    assert main(["eval", runs[1]]) == 0
    assert main(["report", *runs, "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "97.65" in text  # the paper's number beside ours
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert any(p.startswith("learning_curves_") for p in pngs) and any(p.startswith("lslr_") for p in pngs)
    assert any(p.startswith("msl_weights_") for p in pngs)


@pytest.mark.parametrize("override, message", [
    ("data.ways=60", "val"),  # 50 validation characters: says which split is too small
    ("data.shots=19", "has 20 images"),  # with 2 queries: K + T = 21 > the 20 drawings of a character
])
def test_configs_that_cannot_run_fail_before_training(override, message, tmp_path, omniglot_env, capsys):
    shots_case = override.startswith("data.shots")
    extra = ["data.queries=2"] if shots_case else []
    out = tmp_path / "run"
    assert main(["train", "omniglot-5w1s-mamlpp", *TINY, override, *extra, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and not (out / "config.json").exists()


def test_missing_data_set_says_where_to_put_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MAMLPP_CACHE", str(tmp_path / "cache"))
    code = main(["train", "mini-5w1s-mamlpp", *TINY, "--out", str(tmp_path / "run"), "--data-dir",
                 str(tmp_path / "empty"), "--no-progress"])
    assert code == 2
    assert "Mini-ImageNet not found" in capsys.readouterr().err


def test_mamlpp_learns_omniglot(omniglot_env):
    """A real learning check: a small MAML++ learner gains far beyond its untrained adaptation in 60 meta-updates."""
    import torch

    from mamlpp.data import build_tasks
    from mamlpp.presets import resolve as resolve_config
    from mamlpp.trainer import Trainer

    cfg = resolve_config("omniglot-5w1s-mamlpp", ["model.filters=32", "inner.steps=3", "outer.meta_batch=8",
                                                  "train.eval_tasks=100", "train.eval_chunk=100"])
    tasks = build_tasks(cfg, torch.device("cpu"))
    trainer = Trainer(cfg, tasks, torch.device("cpu"))
    before = trainer.evaluate("test")  # an untrained init adapted for 3 steps: already well above 20%
    for it in range(60):
        trainer.meta_step(tasks.train_batch(it, 8), epoch=0)
    after = trainer.evaluate("test")
    assert after["accuracy"] > 0.65 and after["accuracy"] > before["accuracy"] + 0.08, (before, after)
    assert after["loss"] < 0.85 * before["loss"]

"""`mamlpp report`: tables in the paper's layout (mean ± std over seeds beside the paper) and the plots."""
import argparse
import csv
import json
import random
import statistics
from pathlib import Path

import pytest
import torch
from PIL import Image

from mamlpp import report
from mamlpp.cli import main
from mamlpp.presets import get_preset

SINUSOID = ["train.epochs=2", "train.iters_per_epoch=10", "train.eval_tasks=10", "model.hidden=8,8",
            "inner.lr_mode=lslr", "outer.msl=true", "inner.steps=2", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def sinusoid_runs(tmp_path_factory):
    """Two really trained tiny sinusoid runs (seeds 0 and 1) with LSLR and MSL."""
    root = tmp_path_factory.mktemp("sinusoid")
    dirs = []
    for seed in (0, 1):
        out = root / f"seed{seed}"
        assert main(["train", "sinusoid-maml", *SINUSOID, f"train.seed={seed}", "--out", str(out),
                     "--no-progress"]) == 0
        dirs.append(str(out))
    return dirs


def fake_run(folder: Path, preset: str, seed: int, accuracy: float | None, checkpoint: bool = False) -> str:
    """A hand-written classification run directory: config.json, metrics.csv, test.json (unless accuracy
    is None) and, optionally, a checkpoint holding LSLR rates in scrambled order."""
    folder.mkdir(parents=True)
    cfg = get_preset(preset).to_dict()
    cfg["train"]["seed"] = seed
    (folder / "config.json").write_text(json.dumps(cfg))
    with open(folder / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration", "epoch", "phase", "loss", "accuracy", "lr", "seconds"])
        for epoch in range(5):
            it = (epoch + 1) * 500
            w.writerow([it - 250, epoch, "train", 2.0 / (epoch + 1), 0.5 + 0.05 * epoch, 0.001, epoch])
            w.writerow([it, epoch, "train", 1.9 / (epoch + 1), 0.52 + 0.05 * epoch, 0.001, epoch])
            w.writerow([it, epoch, "val", 1.5 / (epoch + 1), 0.6 + 0.05 * epoch + 0.01 * seed, 0.001, epoch])
    if accuracy is not None:
        (folder / "test.json").write_text(json.dumps({
            "accuracy": accuracy, "ci95": 0.003, "num_tasks": 600, "ensemble_size": 3,
            "single_model_accuracy": accuracy - 0.01, "single_model_ci95": 0.004, "preset": preset, "split": "test",
            "checkpoint_epochs": [4, 3, 2], "inner_steps": 5}))
    if checkpoint:
        steps = cfg["inner"]["steps"]
        names = [f"conv{i}.{p}" for i in range(4) for p in ("weight", "bias")] + ["linear.weight", "linear.bias"]
        scrambled = names[:]
        random.Random(seed).shuffle(scrambled)
        params = {f"lr.{n}": torch.full((steps,), 0.1) + 0.01 * names.index(n) + 0.001 * torch.arange(steps)
                  for n in scrambled}
        params["net.conv0.weight"] = torch.zeros(2, 2)
        (folder / "checkpoints").mkdir()
        torch.save({"params": params, "epoch": 3}, folder / "checkpoints" / "epoch_003.pt")
        (folder / "checkpoints" / "index.json").write_text(json.dumps([{"epoch": 3, "score": 0.9,
                                                                         "file": "epoch_003.pt"}]))
    return str(folder)


def assert_png(path) -> None:
    path = Path(path)
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        im.verify()


def section(md: str, title: str) -> str:
    start = md.index(f"## {title}\n")
    end = md.find("\n## ", start + 1)
    return md[start:end if end >= 0 else None]


def row(text: str, first_cell: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in\n{text}")


def cell(values: list[float], decimals: int = 2) -> str:
    mean, std = statistics.mean(values), statistics.stdev(values)
    return f"{mean:.{decimals}f} ± {std:.{decimals}f} ({len(values)} runs)"


def test_sinusoid_lslr_msl_report(sinusoid_runs, tmp_path):
    written = report.make_report(sinusoid_runs, str(tmp_path / "out"))
    md = Path(written["report"]).read_text()
    mses = [json.loads((Path(d) / "test.json").read_text())["mse_after_adaptation"] for d in sinusoid_runs]
    cells = row(section(md, "Other presets"), "sinusoid-maml")
    assert cells[1:4] == ["sinusoid", "2", "test MSE after adaptation (lower is better)"]
    assert cells[4] == cell(mses, 4) and cells[5] == "–"
    runs = section(md, "Runs")
    assert "inner.lr_mode=lslr" in runs and "outer.msl=true" in runs
    out = tmp_path / "out"
    expected = {"learning_curves": [out / "learning_curves_sinusoid-maml.png"],
                "lslr": [out / "lslr_sinusoid-maml_seed0.png", out / "lslr_sinusoid-maml_seed1.png"],
                "msl_weights": [out / "msl_weights_sinusoid-maml.png"]}
    for key, paths in expected.items():
        assert sorted(map(Path, written[key])) == paths
        for p in paths:
            assert_png(p)
            assert f"]({p.name})" in md  # linked from report.md
    # The heatmap shows the best checkpoint's rates, one row per MLP tensor in network order.
    names, values, what = report.lslr_rates(report.load_run(sinusoid_runs[0]))
    assert names == ["fc0.weight", "fc0.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert all(len(v) == 2 for v in values) and "best validation checkpoint" in what


def test_omniglot_table_mean_std_and_paper(tmp_path):
    accs = {"omniglot-20w1s-mamlpp": [0.970, 0.9755, 0.968], "omniglot-5w1s-maml": [0.985, 0.990],
            "omniglot-20w1s-maml": [0.91, 0.925, 0.92], "omniglot-20w1s-maml+lslr": [0.955, 0.96]}
    dirs = [fake_run(tmp_path / f"{p}-{s}", p, s, a, checkpoint=(p == "omniglot-20w1s-mamlpp" and s == 0))
            for p, values in accs.items() for s, a in enumerate(values)]
    dirs.append(fake_run(tmp_path / "untested", "omniglot-20w5s-mamlpp", 0, None))
    written = report.make_report(dirs, str(tmp_path / "out"))
    md = Path(written["report"]).read_text()
    omniglot = section(md, "Omniglot")
    # columns: approach, then (ours, paper) for 5w1s, 5w5s, 20w1s, 20w5s
    mamlpp = row(omniglot, "MAML++")
    assert mamlpp[5] == cell([97.0, 97.55, 96.8]) and mamlpp[6].startswith("97.65 ± 0.05")
    assert mamlpp[1] == "–" and mamlpp[2].startswith("99.47") and mamlpp[8].startswith("99.33 ± 0.03")
    assert mamlpp[7] == "–"  # the 20-way 5-shot run has no test.json
    maml = row(omniglot, "MAML")
    assert maml[1] == cell([98.5, 99.0]) and maml[2].startswith("98.7 ± 0.4")
    assert maml[5] == cell([91.0, 92.5, 92.0])
    assert "95.8 ± 0.3" in maml[6] and "91.27 ± 1.07" in maml[6]  # original paper / authors' replication
    lslr = row(omniglot, "MAML + LSLR")
    assert lslr[5] == cell([95.5, 96.0]) and lslr[6].startswith("95.77 ± 0.38") and lslr[1] == "–"
    assert "MAML + MSL" not in omniglot  # ablations only when present
    assert "standard deviation over runs (seeds)" in omniglot and "standard deviation over 3 runs" in omniglot
    assert "Mini-ImageNet" not in md and "## Other presets" not in md
    runs = section(md, "Runs")
    assert "97.55% ± 0.30" in runs and "96.55% ± 0.40" in runs  # ensemble ± CI, single model
    assert "no test.json" in row(runs, f"`{dirs[-1]}`")[3]
    assert "Left out of the tables (no test.json" in md and dirs[-1] in section(md, "Notes")
    # LSLR heatmap only for the run with a checkpoint, rows in network order whatever the file's order.
    out = tmp_path / "out"
    assert written["lslr"] == [str(out / "lslr_omniglot-20w1s-mamlpp_seed0.png")]
    names, values, what = report.lslr_rates(report.load_run(dirs[0]))
    assert names == [f"conv{i}.{p}" for i in range(4) for p in ("weight", "bias")] + ["linear.weight", "linear.bias"]
    assert values[2] == pytest.approx([0.12, 0.121, 0.122, 0.123, 0.124]) and "epoch 3" in what
    # MSL weights for the presets with outer.msl (MAML++), not for MAML or MAML + LSLR.
    assert sorted(Path(p).name for p in written["msl_weights"]) == [
        "msl_weights_omniglot-20w1s-mamlpp.png", "msl_weights_omniglot-20w5s-mamlpp.png"]
    assert len(written["learning_curves"]) == 5
    for p in written["learning_curves"] + written["lslr"] + written["msl_weights"]:
        assert_png(p)


def test_mini_table_and_reference_presets(tmp_path):
    dirs = [fake_run(tmp_path / f"m{s}", "mini-5w1s-mamlpp-2steps", s, a) for s, a in enumerate([0.51, 0.52, 0.5])]
    dirs += [fake_run(tmp_path / f"r{s}", "omniglot-20w1s-mamlpp-reference", s, a)
             for s, a in enumerate([0.965, 0.966])]
    md = Path(report.make_report(dirs, str(tmp_path / "out"))["report"]).read_text()
    mini = section(md, "Mini-ImageNet 5-way")
    steps2 = [line for line in mini.splitlines() if line.startswith("| MAML++ | 2 |")][0]
    assert cell([51.0, 52.0, 50.0]) in steps2 and "51.49 ± 0.25" in steps2
    assert "52.15 ± 0.26" in mini and "68.32 ± 0.44" in mini and "48.7 ± 1.84" in mini
    ref = row(section(md, "Other presets"), "omniglot-20w1s-mamlpp-reference")
    assert ref[4] == cell([96.5, 96.6]) and ref[5].startswith("97.65 ± 0.05")
    assert "## Omniglot" not in md


def test_paper_results_lookup():
    assert report.paper_result("omniglot-20w5s-mamlpp").text() == "99.33 ± 0.03"
    assert report.paper_result("mini-5w5s-mamlpp-reference") == report.PAPER_RESULTS["mini-5w5s-mamlpp"]
    assert report.paper_result("sinusoid-maml") is None
    assert report.PAPER_RESULTS["omniglot-20w1s-maml+da"].text() == "92.3 ± 0.55"
    assert [report.PAPER_RESULTS[f"mini-5w1s-mamlpp-{s}steps"].mean for s in (1, 2, 3, 4)] == [
        51.05, 51.49, 51.11, 51.65]


def test_not_a_run_directory(tmp_path, sinusoid_runs):
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(FileNotFoundError, match=str(bad)):
            report.make_report([sinusoid_runs[0], str(bad)], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_register_adds_the_report_subcommand(tmp_path, sinusoid_runs, capsys, monkeypatch):
    parser = argparse.ArgumentParser(prog="mamlpp")
    sub = parser.add_subparsers(dest="command", required=True)
    report.register(sub)
    monkeypatch.chdir(tmp_path)
    args = parser.parse_args(["report", *sinusoid_runs])
    assert args.run_dirs == sinusoid_runs and args.out == "report"
    assert args.func(args) == 0
    assert (tmp_path / "report" / "report.md").is_file()
    assert "report/report.md" in capsys.readouterr().out
    args = parser.parse_args(["report", sinusoid_runs[1], "--out", str(tmp_path / "elsewhere")])
    assert args.func(args) == 0 and (tmp_path / "elsewhere" / "lslr_sinusoid-maml_seed1.png").is_file()
    with pytest.raises(SystemExit):
        parser.parse_args(["report"])  # at least one RUN_DIR


def test_comparison_rows_for_every_method_and_published_only_rows(tmp_path, monkeypatch):
    from mamlpp import presets

    # Every row of the paper's tables is a method now; a published-only row is marked, never measured.
    monkeypatch.setitem(presets.PUBLISHED, ("Some Method", "omniglot", 20, 1, None),
                        presets.PaperResult(90.5, None, "a test's source"))
    monkeypatch.setattr(report, "APPROACH_ORDER", report.APPROACH_ORDER + ["Some Method"])
    dirs = [fake_run(tmp_path / f"p{s}", "omniglot-20w1s-protonet", s, a) for s, a in enumerate([0.95, 0.96])]
    dirs += [fake_run(tmp_path / "m0", "mini-5w1s-matchingnet", 0, 0.44)]
    dirs += [fake_run(tmp_path / "s0", "omniglot-20w1s-siamese", 0, 0.88)]
    md = Path(report.make_report(dirs, str(tmp_path / "out"))["report"]).read_text()
    omniglot = section(md, "Omniglot")
    proto = row(omniglot, "Prototypical Networks")
    assert proto[5] == cell([95.0, 96.0]) and proto[6].startswith("96 [") and proto[1] == "–"
    other = row(omniglot, "Some Method †")
    assert other[5] == "–" and other[6].startswith("90.5") and "Published number only" in omniglot
    assert omniglot.count("†") == 2  # that row and its note: every paper row is measured here
    siamese = row(omniglot, "Siamese Nets")  # a method of mamlpp: measured beside the published number
    assert siamese[5] == "88.00 (1 run)" and siamese[6].startswith("88.2") and siamese[1] == "–"
    assert row(omniglot, "Memory Module")[5] == "–" and row(omniglot, "Memory Module")[6].startswith("95")
    assert row(omniglot, "Meta-Networks")[6].startswith("97") and row(omniglot, "Neural Statistician")[6].startswith("93.2")
    assert row(omniglot, "Meta-SGD")[6].startswith("95.93 ± 0.38") and row(omniglot, "Matching Nets")[5] == "–"
    mini = section(md, "Mini-ImageNet 5-way")
    matching = row(mini, "Matching Nets")
    assert matching[1] == "–" and matching[2] == "44.00 (1 run)" and matching[3].startswith("43.56 ± 0.84")
    assert row(mini, "Meta-Networks")[3].startswith("49.21") and row(mini, "Meta-SGD")[1] == "1"
    assert row(mini, "Meta-LSTM")[3].startswith("43.44 ± 0.77")


def test_stability_figure_overlays_the_strided_seeds(tmp_path):
    dirs = [fake_run(tmp_path / f"{m}{s}", f"omniglot-20w1s-{m}-strided", s, 0.9) for m in ("maml", "mamlpp")
            for s in range(3)]
    written = report.make_report(dirs, str(tmp_path / "out"))
    assert written["stability"] == [str(tmp_path / "out" / "stability.png")]
    assert_png(written["stability"][0])
    md = Path(written["report"]).read_text()
    assert "](stability.png)" in md and "## Omniglot" not in md  # strided runs are not the paper's table rows
    assert row(section(md, "Other presets"), "omniglot-20w1s-mamlpp-strided")[5] == "–"  # no published number

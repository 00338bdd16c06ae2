"""`mamlpp report RUN_DIR... [--out DIR]`: tables in the paper's layout and plots, across runs.

Runs are grouped by preset name (config.json "name"); the seeds of one preset are its repeats. Each
table cell holds our mean +/- standard deviation over runs of the ensemble test accuracy (test.json)
beside the paper's number (PAPER_RESULTS, spec section 9). The paper's MAML++ +/- is the standard
deviation over 3 runs; the original MAML paper's +/- are 95% confidence intervals over tasks.

Written to the output folder:
  report.md                        tables (Omniglot, Mini-ImageNet, other presets, per run) and notes
  learning_curves_<preset>.png     validation accuracy (loss for regression) and training loss
  lslr_<preset>_seed<S>.png        learned LSLR rates, layer x step, from the best checkpoint
  msl_weights_<preset>.png         MSL loss weights per inner step over the epochs

Only the standard library, config and presets are imported at module level, so `mamlpp --help`
stays fast; torch and matplotlib load when a report is made.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config, ConfigError, flat_keys
from .presets import PRESETS, get_preset


# ---- the paper's numbers (spec section 9), in percent ---------------------------------------------
@dataclass(frozen=True)
class PaperResult:
    mean: float
    std: float | None  # None: the paper gives no +/-
    source: str  # short label, used in the footnotes

    def text(self) -> str:
        return f"{self.mean:g}" if self.std is None else f"{self.mean:g} ± {self.std:g}"


_MAML_ORIG = "MAML paper (Finn et al. 2017); its ± is a 95% CI over tasks"
_MAMLPP = "MAML++ paper (ICLR 2019); ± is the std over 3 runs"
_ABLATION = "MAML++ paper ablation (20-way 1-shot); ± is the std over 3 runs"
_BLOG_STEPS = "MAML++ inner-step sweep (Nov-2018 blog); ± is the std over 3 runs"
_TNAS = "MAML++ (ICLR) as cited by T-NAS, no ± given"

PAPER_RESULTS: dict[str, PaperResult] = {
    # Omniglot: MAML as in the original MAML paper (its ± are 95% CIs over tasks, not std over runs).
    "omniglot-5w1s-maml": PaperResult(98.7, 0.4, _MAML_ORIG),
    "omniglot-5w5s-maml": PaperResult(99.9, 0.1, _MAML_ORIG),
    "omniglot-20w1s-maml": PaperResult(95.8, 0.3, _MAML_ORIG),
    "omniglot-20w5s-maml": PaperResult(98.9, 0.2, _MAML_ORIG),
    "omniglot-5w1s-mamlpp": PaperResult(99.47, None, _TNAS),
    "omniglot-5w5s-mamlpp": PaperResult(99.93, None, _TNAS),  # Papers-with-Code lists 99.85
    "omniglot-20w1s-mamlpp": PaperResult(97.65, 0.05, _MAMLPP),
    "omniglot-20w5s-mamlpp": PaperResult(99.33, 0.03, _MAMLPP),
    "omniglot-20w1s-maml+msl": PaperResult(91.53, 0.69, _ABLATION),
    "omniglot-20w1s-maml+lslr": PaperResult(95.77, 0.38, _ABLATION),
    "omniglot-20w1s-maml+bn": PaperResult(95.35, 0.23, _ABLATION),
    "omniglot-20w1s-maml+ca": PaperResult(93.03, 0.44, _ABLATION),
    "omniglot-20w1s-maml+da": PaperResult(92.3, 0.55, _ABLATION),
    # Mini-ImageNet 5-way.
    "mini-5w1s-maml": PaperResult(48.70, 1.84, _MAML_ORIG),
    "mini-5w5s-maml": PaperResult(63.11, 0.92, _MAML_ORIG),
    "mini-5w1s-mamlpp": PaperResult(52.15, 0.26, _MAMLPP),
    "mini-5w5s-mamlpp": PaperResult(68.32, 0.44, _MAMLPP),
    "mini-5w1s-mamlpp-1steps": PaperResult(51.05, 0.31, _BLOG_STEPS),
    "mini-5w1s-mamlpp-2steps": PaperResult(51.49, 0.25, _BLOG_STEPS),
    "mini-5w1s-mamlpp-3steps": PaperResult(51.11, 0.11, _BLOG_STEPS),
    "mini-5w1s-mamlpp-4steps": PaperResult(51.65, 0.34, _BLOG_STEPS),
}

# The MAML++ authors' own replication of MAML, shown beside the original-paper MAML number
# (the baseline of the ablation table: MAML 20-way 1-shot 91.27 +/- 1.07).
PAPER_MAML_REPLICATION: dict[str, PaperResult] = {
    "omniglot-20w1s-maml": PaperResult(91.27, 1.07, "MAML++ authors' replication of MAML; std over 3 runs"),
    "omniglot-20w5s-maml": PaperResult(98.78, None, "MAML++ authors' replication of MAML"),
    "mini-5w1s-maml": PaperResult(48.64, None, "MAML++ authors' replication of MAML"),
    "mini-5w5s-maml": PaperResult(64.78, None, "MAML++ authors' replication of MAML"),
}

REFERENCE_SUFFIX = "-reference"


def paper_result(preset: str) -> PaperResult | None:
    """The paper's number for a preset; `-reference` presets share their unsuffixed name's."""
    if preset.endswith(REFERENCE_SUFFIX):
        preset = preset[: -len(REFERENCE_SUFFIX)]
    return PAPER_RESULTS.get(preset)


# ---- table layouts ------------------------------------------------------------------------------------
OMNIGLOT_COLUMNS = [("5-way 1-shot", "5w1s"), ("5-way 5-shot", "5w5s"), ("20-way 1-shot", "20w1s"),
                    ("20-way 5-shot", "20w5s")]
OMNIGLOT_ROWS = [("MAML", "maml"), ("MAML++", "mamlpp")]
OMNIGLOT_ABLATIONS = [("MAML + MSL", "omniglot-20w1s-maml+msl"), ("MAML + LSLR", "omniglot-20w1s-maml+lslr"),
                      ("MAML + BNWB + BNRS", "omniglot-20w1s-maml+bn"), ("MAML + CA", "omniglot-20w1s-maml+ca"),
                      ("MAML + DA", "omniglot-20w1s-maml+da")]
MINI_COLUMNS = [("1-shot", "1"), ("5-shot", "5")]
# (label, inner steps, {column key: preset})
MINI_ROWS = [("MAML", 5, {"1": "mini-5w1s-maml", "5": "mini-5w5s-maml"})] + \
            [("MAML++", s, {"1": f"mini-5w1s-mamlpp-{s}steps"}) for s in (1, 2, 3, 4)] + \
            [("MAML++", 5, {"1": "mini-5w1s-mamlpp", "5": "mini-5w5s-mamlpp"})]


def _omniglot_table_presets() -> set[str]:
    names = {f"omniglot-{key}-{algo}" for _, key in OMNIGLOT_COLUMNS for _, algo in OMNIGLOT_ROWS}
    return names | {p for _, p in OMNIGLOT_ABLATIONS}


def _mini_table_presets() -> set[str]:
    return {p for _, _, cells in MINI_ROWS for p in cells.values()}


# Keys that do not change what a run computes; left out of "differs from the preset".
_IGNORED_KEYS = {"train.seed", "train.device", "train.tensorboard", "train.impl", "train.log_every",
                 "train.eval_chunk", "data.data_dir"}


# ---- loading runs -------------------------------------------------------------------------------------
@dataclass
class Run:
    path: Path
    label: str  # the path as given on the command line
    config: dict
    preset: str
    seed: int
    kind: str  # "classification" or "regression"
    test: dict | None
    metrics: list[dict]
    iterations: int | None
    planned_iterations: int
    overrides: list[str] = field(default_factory=list)  # "key=value" where the config differs from its preset

    @property
    def metric(self) -> float | None:
        """Ensemble test accuracy in percent (classification) or MSE after adaptation (regression)."""
        if self.test is None:
            return None
        if self.kind == "classification":
            return 100.0 * self.test["accuracy"]
        return self.test["mse_after_adaptation"]

    def config_object(self) -> Config:
        try:
            return Config.from_dict(self.config)
        except ConfigError as e:
            raise ConfigError(f"{self.path / 'config.json'}: {e}") from e


def _json_value(v):
    return json.loads(json.dumps(v))  # tuples -> lists, as in config.json


def _differences(config: dict) -> list[str]:
    name = config.get("name", "")
    if name not in PRESETS:
        return []
    ours, preset = flat_keys(config), flat_keys(get_preset(name).to_dict())
    out = []
    for key in sorted(set(ours) | set(preset)):
        if key in _IGNORED_KEYS or key == "name":
            continue
        a, b = _json_value(ours.get(key)), _json_value(preset.get(key))
        if a != b:
            shown = ",".join(map(str, a)) if isinstance(a, list) else json.dumps(a) if isinstance(a, bool) else a
            out.append(f"{key}={shown}")
    return out


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                rows.append({"iteration": int(r["iteration"]), "epoch": int(r["epoch"]), "phase": r["phase"],
                             "loss": float(r["loss"]) if r.get("loss") not in ("", None) else math.nan,
                             "accuracy": float(r["accuracy"]) if r.get("accuracy") not in ("", None) else None})
            except (KeyError, ValueError):
                continue  # a torn last line of a killed run
    return rows


def load_run(path: str) -> Run:
    """Read one run directory; FileNotFoundError when it is not one (no config.json)."""
    run_dir = Path(path)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        what = "does not exist" if not run_dir.exists() else "has no config.json"
        raise FileNotFoundError(f"{path} is not a run directory: it {what} (expected the --out folder of "
                                "'mamlpp train')")
    config = json.loads(config_path.read_text())
    test_path = run_dir / "test.json"
    test = json.loads(test_path.read_text()) if test_path.is_file() else None
    metrics = _read_metrics(run_dir / "metrics.csv")
    iterations = max((r["iteration"] for r in metrics), default=None)
    if iterations is None and (run_dir / "summary.json").is_file():
        iterations = json.loads((run_dir / "summary.json").read_text()).get("iterations")
    train = config.get("train", {})
    dataset = config.get("data", {}).get("dataset", "")
    kind = "regression" if dataset == "sinusoid" or (test and "mse_after_adaptation" in test) else "classification"
    return Run(path=run_dir, label=str(path), config=config, preset=config.get("name", "custom"),
               seed=int(train.get("seed", 0)), kind=kind, test=test, metrics=metrics, iterations=iterations,
               planned_iterations=int(train.get("epochs", 0)) * int(train.get("iters_per_epoch", 0)),
               overrides=_differences(config))


def group_by_preset(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in sorted(runs, key=lambda r: (r.preset, r.seed, r.label)):
        groups.setdefault(run.preset, []).append(run)
    return groups


def run_statistics(runs: list[Run]) -> tuple[float, float | None, int] | None:
    """(mean, std over runs or None for one run, number of runs) of the runs that have a test.json."""
    values = [r.metric for r in runs if r.metric is not None]
    if not values:
        return None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


# ---- markdown -----------------------------------------------------------------------------------------
def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


def _ours(stats, kind: str = "classification") -> str:
    if stats is None:
        return "–"
    mean, std, n = stats
    fmt = (lambda v: f"{v:.2f}") if kind == "classification" else (lambda v: f"{v:.4f}")
    runs = f"({n} run{'s' if n != 1 else ''})"
    return f"{fmt(mean)} ± {fmt(std)} {runs}" if std is not None else f"{fmt(mean)} {runs}"


def _paper_cell(preset: str, marks: dict[str, str]) -> str:
    p = paper_result(preset)
    if p is None:
        return "–"
    base = preset[: -len(REFERENCE_SUFFIX)] if preset.endswith(REFERENCE_SUFFIX) else preset
    text = f"{p.text()} [{marks.setdefault(p.source, _mark(len(marks)))}]"
    rep = PAPER_MAML_REPLICATION.get(base)
    if rep is not None:
        text += f" / {rep.text()} [{marks.setdefault(rep.source, _mark(len(marks)))}]"
    return text


def _mark(i: int) -> str:
    return "abcdefghijklmnopqrstuvwxyz"[i]


def _footnotes(marks: dict[str, str]) -> list[str]:
    return [f"[{m}] {source}" for source, m in marks.items()]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return lines


STD_NOTE = ("Ours: mean ± standard deviation over runs (seeds) of the ensemble test accuracy in percent, "
            "with the number of runs. Paper: mean ± standard deviation over 3 runs (MAML++ authors), except "
            "where a footnote says otherwise (the original MAML paper's ± are 95% confidence intervals over tasks).")


def _omniglot_section(groups: dict[str, list[Run]]) -> list[str]:
    marks: dict[str, str] = {}
    header = ["approach"] + [h for name, _ in OMNIGLOT_COLUMNS for h in (f"{name} (ours)", f"{name} (paper)")]
    rows = []
    for label, algo in OMNIGLOT_ROWS:
        row = [label]
        for _, key in OMNIGLOT_COLUMNS:
            preset = f"omniglot-{key}-{algo}"
            row += [_ours(run_statistics(groups.get(preset, []))), _paper_cell(preset, marks)]
        rows.append(row)
    for label, preset in OMNIGLOT_ABLATIONS:
        if preset not in groups:
            continue
        row = [label]
        for _, key in OMNIGLOT_COLUMNS:
            row += ([_ours(run_statistics(groups[preset])), _paper_cell(preset, marks)] if key == "20w1s"
                    else ["–", "–"])
        rows.append(row)
    lines = ["## Omniglot", ""] + _table(header, rows) + [""]
    lines += [STD_NOTE, "", "MAML's paper column shows the original MAML paper's number first and, after the slash, "
              "the MAML++ authors' own replication of MAML (the baseline of their ablation table, 20-way 1-shot "
              "91.27 ± 1.07).", ""]
    lines += [f"{note}  " for note in _footnotes(marks)] + [""]
    return lines


def _mini_section(groups: dict[str, list[Run]]) -> list[str]:
    marks: dict[str, str] = {}
    header = ["approach", "inner steps"] + [h for name, _ in MINI_COLUMNS for h in (f"{name} (ours)",
                                                                                    f"{name} (paper)")]
    rows = []
    for label, steps, cells in MINI_ROWS:
        row = [label, str(steps)]
        for _, key in MINI_COLUMNS:
            preset = cells.get(key)
            row += ([_ours(run_statistics(groups.get(preset, []))), _paper_cell(preset, marks)] if preset
                    else ["–", "–"])
        rows.append(row)
    lines = ["## Mini-ImageNet 5-way", ""] + _table(header, rows) + [""]
    lines += [STD_NOTE, "", "MAML's paper column shows the original MAML paper's number first and, after the slash, "
              "the MAML++ authors' own reproduction of MAML.", ""]
    lines += [f"{note}  " for note in _footnotes(marks)] + [""]
    return lines


def _generic_section(groups: dict[str, list[Run]]) -> list[str]:
    marks: dict[str, str] = {}
    rows = []
    for preset, members in groups.items():
        kind = members[0].kind
        metric = ("ensemble test accuracy (%)" if kind == "classification"
                  else "test MSE after adaptation (lower is better)")
        dataset = members[0].config.get("data", {}).get("dataset", "?")
        rows.append([preset, dataset, str(len(members)), metric, _ours(run_statistics(members), kind),
                     _paper_cell(preset, marks)])
    lines = ["## Other presets", ""]
    lines += _table(["preset", "data set", "runs", "metric", "ours (mean ± std over runs)", "paper"], rows) + [""]
    lines += ["Ours: mean ± standard deviation over the runs (seeds) with a test.json; 'runs' counts every run "
              "directory given. Paper: mean ± standard deviation over 3 runs. `-reference` presets (the reference "
              "code's HEAD configs) are compared with the paper's number for the unsuffixed preset.", ""]
    lines += [f"{note}  " for note in _footnotes(marks)] + [""]
    return lines


def _per_run_section(runs: list[Run]) -> list[str]:
    rows = []
    for r in runs:
        t = r.test
        if t is None:
            ens, single, size = "– (no test.json)", "–", "–"
        elif r.kind == "classification":
            ens = f"{100 * t['accuracy']:.2f}% ± {100 * t.get('ci95', 0.0):.2f}"
            single = (f"{100 * t['single_model_accuracy']:.2f}% ± {100 * t.get('single_model_ci95', 0.0):.2f}"
                      if "single_model_accuracy" in t else "–")
            size = str(t.get("ensemble_size", "–"))
        else:
            ens = f"MSE {t['mse_after_adaptation']:.4f} ± {t.get('ci95', 0.0):.4f}"
            single = (f"MSE {t['single_model_mse_after_adaptation']:.4f}"
                      if "single_model_mse_after_adaptation" in t else "–")
            if "mse_before_adaptation" in t:
                single += f" (before adaptation {t['mse_before_adaptation']:.4f})"
            size = str(t.get("ensemble_size", "–"))
        if r.iterations is None:
            its = "–"
        elif r.planned_iterations and r.iterations < r.planned_iterations:
            its = f"{r.iterations} of {r.planned_iterations}"
        else:
            its = str(r.iterations)
        rows.append([f"`{r.label}`", r.preset, str(r.seed), ens, single, size, its, " ".join(r.overrides) or "–"])
    header = ["run", "preset", "seed", "ensemble test ± 95% CI", "single best model ± 95% CI", "ensemble size",
              "iterations", "differs from the preset"]
    lines = ["## Runs", ""] + _table(header, rows) + [""]
    lines += ["The ± here is the 95% confidence interval over the test tasks of one run (1.96 · std / √tasks), "
              "not the std over runs used in the tables above.", ""]
    return lines


def render_markdown(runs: list[Run], plots: dict[str, list[Path]], notes: list[str], out_dir: Path) -> str:
    groups = group_by_preset(runs)
    tested = {p: [r for r in m if r.test is not None] for p, m in groups.items()}
    omniglot, mini = _omniglot_table_presets(), _mini_table_presets()
    lines = ["# mamlpp report", "", f"{len(runs)} run(s), {len(groups)} preset(s): "
             + ", ".join(f"{p} ({len(m)})" for p, m in groups.items()), ""]
    if any(p in omniglot and tested[p] for p in groups):
        lines += _omniglot_section(tested)
    if any(p in mini and tested[p] for p in groups):
        lines += _mini_section(tested)
    other = {p: m for p, m in groups.items() if p not in omniglot and p not in mini}
    if other:
        lines += _generic_section(other)
    lines += _per_run_section(runs)
    missing = [r.label for r in runs if r.test is None]
    if missing:
        notes = [f"Left out of the tables (no test.json; run `mamlpp eval RUN_DIR`): {', '.join(missing)}"] + notes
    for preset, members in groups.items():
        settings = [dict(o.split("=", 1) for o in r.overrides) for r in members]
        differing = sorted(k for k in set().union(*settings) if len({s.get(k) for s in settings}) > 1)
        if differing:
            notes.append(f"The runs of {preset} do not share one config besides the seed (they differ in "
                         f"{', '.join(differing)}); the tables pool them anyway.")
    if notes:
        lines += ["## Notes", ""] + [f"* {n}" for n in notes] + [""]
    if any(plots.values()):
        lines += ["## Plots", ""]
        titles = {"learning_curves": "Learning curves", "lslr": "Learned LSLR rates", "msl_weights": "MSL weights"}
        for key, paths in plots.items():
            for p in paths:
                rel = p.relative_to(out_dir) if p.is_relative_to(out_dir) else p
                lines += [f"### {titles.get(key, key)}: {p.stem}", "", f"![{p.stem}]({rel.as_posix()})", ""]
    return "\n".join(lines).rstrip() + "\n"


# ---- plots ----------------------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas directly: no pyplot, no global backend switch
    return fig


def _save(fig, path: Path) -> Path:
    from .files import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _run_labels(members: list[Run]) -> dict[int, str]:
    seeds = [r.seed for r in members]
    return {id(r): (f"seed {r.seed}" if seeds.count(r.seed) == 1 else f"seed {r.seed} ({r.path.name})")
            for r in members}


def plot_learning_curves(preset: str, members: list[Run], out_dir: Path) -> Path | None:
    members = [r for r in members if r.metrics]
    if not members:
        return None
    regression = members[0].kind == "regression"
    fig = _figure(11, 4)
    ax_val, ax_train = fig.subplots(1, 2)
    labels = _run_labels(members)
    for r in members:
        val = [m for m in r.metrics if m["phase"] == "val"]
        train = [m for m in r.metrics if m["phase"] == "train"]
        if regression or all(m["accuracy"] is None for m in val):
            xs, ys = [m["iteration"] for m in val], [m["loss"] for m in val]
        else:
            xs, ys = [m["iteration"] for m in val], [100 * m["accuracy"] for m in val]
        line, = ax_val.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=labels[id(r)])
        ax_train.plot([m["iteration"] for m in train], [m["loss"] for m in train], color=line.get_color(),
                      linewidth=1, label=labels[id(r)])
    ax_val.set_title("validation " + ("loss (MSE)" if regression else "accuracy"))
    ax_val.set_ylabel("MSE" if regression else "accuracy (%)")
    ax_train.set_title("training loss (logged meta-batches)")
    ax_train.set_ylabel("loss")
    for ax in (ax_val, ax_train):
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{preset}: learning curves, one line per seed")
    return _save(fig, out_dir / f"learning_curves_{_safe(preset)}.png")


def _layer_order(name: str):
    """Network order: conv0.weight, conv0.bias, ..., linear.weight, linear.bias (fc0... for the MLP)."""
    layer, _, part = name.partition(".")
    m = re.fullmatch(r"([A-Za-z_]+?)(\d*)", layer)
    prefix, index = (m.group(1), int(m.group(2) or 0)) if m else (layer, 0)
    return (1 if prefix == "linear" else 0, index, {"weight": 0, "bias": 1}.get(part, 2), name)


def lslr_rates(run: Run):
    """(tensor names in network order, rates [names][steps], description of the checkpoint used), or None."""
    import torch

    folder = run.path / "checkpoints"
    path, what = None, ""
    index_path = folder / "index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        if index and (folder / index[0]["file"]).is_file():
            path, what = folder / index[0]["file"], f"best validation checkpoint, epoch {index[0]['epoch']}"
    if path is None and (folder / "latest.pt").is_file():
        path, what = folder / "latest.pt", "latest checkpoint"
    if path is None:
        return None
    params = torch.load(path, map_location="cpu", weights_only=True)["params"]
    rates = {k[len("lr."):]: v for k, v in params.items() if k.startswith("lr.")}
    names = sorted(rates, key=_layer_order)
    return names, [[float(x) for x in rates[n].reshape(-1)] for n in names], what


def plot_lslr(run: Run, out_dir: Path, stem: str) -> Path | None:
    found = lslr_rates(run)
    if found is None or not found[0]:
        return None
    names, values, what = found
    steps = max(len(v) for v in values)
    fig = _figure(1.6 + 0.95 * steps, 1.2 + 0.42 * len(names))
    ax = fig.subplots()
    image = ax.imshow(values, aspect="auto", cmap="viridis")
    lo, hi = min(map(min, values)), max(map(max, values))
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            bright = (v - lo) / (hi - lo) if hi > lo else 0.5
            ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=8,
                    color="black" if bright > 0.6 else "white")
    ax.set_xticks(range(steps), [f"step {j + 1}" for j in range(steps)])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("inner step")
    fig.colorbar(image, ax=ax, label="learned inner learning rate")
    init = run.config.get("inner", {}).get("lr")
    ax.set_title(f"{run.preset} seed {run.seed}: LSLR rates\n({what}; initial value {init})", fontsize=9)
    return _save(fig, out_dir / f"{stem}.png")


def plot_msl(preset: str, members: list[Run], out_dir: Path) -> tuple[Path | None, str | None]:
    from .schedules import step_weights

    msl_runs = [r for r in members if r.config.get("outer", {}).get("msl")]
    if not msl_runs:
        return None, None
    cfg = msl_runs[0].config_object()
    keys = lambda r: (r.config["inner"]["steps"], r.config["outer"]["msl_epochs"],  # noqa: E731
                      r.config["outer"]["msl_floor"], r.config["train"]["epochs"])
    note = None
    if len({keys(r) for r in msl_runs}) > 1:
        note = (f"msl_weights_{preset}: the runs' MSL schedules differ; the plot shows {msl_runs[0].label}'s "
                f"(steps, msl_epochs, msl_floor, epochs) = {keys(msl_runs[0])}")
    steps, epochs = cfg.inner.steps, cfg.train.epochs
    weights = [step_weights(cfg, e, steps, training=True) for e in range(epochs)]
    columns = [[w[s] for w in weights] for s in range(steps)]
    groups: list[list[int]] = []  # steps with identical weights share one line
    for s in range(steps):
        for g in groups:
            if columns[g[0]] == columns[s]:
                g.append(s)
                break
        else:
            groups.append([s])
    fig = _figure(7.5, 4)
    ax = fig.subplots()
    xs = list(range(epochs + 1))  # epoch e holds its weights on [e, e + 1)
    for g in groups:
        label = f"step {g[0] + 1}" if len(g) == 1 else f"steps {g[0] + 1}–{g[-1] + 1} (each)"
        final = steps - 1 in g
        ys = columns[g[0]] + columns[g[0]][-1:]
        ax.step(xs, ys, where="post", marker="o" if epochs <= 40 else None, markersize=3,
                markevery=list(range(epochs)), linewidth=2.4 if final else 1.3, zorder=2 if final else 3,
                label=label + (" (final)" if final and len(g) == 1 else ""))
    ax.set_xlim(0, epochs)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if cfg.outer.msl_epochs < epochs:
        ax.axvline(cfg.outer.msl_epochs, color="grey", linestyle="--", linewidth=1)
        ax.text(cfg.outer.msl_epochs, 0.5, f" MSL off from epoch {cfg.outer.msl_epochs}:\n final step only",
                fontsize=8, color="grey", va="center")
    ax.set_xlabel("epoch")
    ax.set_ylabel("weight of the query loss after the step")
    ax.set_ylim(-0.03, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{preset}: MSL weights per inner step (S={steps}, msl_epochs={cfg.outer.msl_epochs}, "
                 f"floor={cfg.outer.msl_floor})", fontsize=9)
    return _save(fig, out_dir / f"msl_weights_{_safe(preset)}.png"), note


# ---- entry points ---------------------------------------------------------------------------------------
def make_report(run_dirs: list[str], out_dir: str) -> dict:
    """Write report.md and the plots for run_dirs into out_dir.

    Returns {"report": path of report.md, "learning_curves": [...], "lslr": [...], "msl_weights": [...]}
    (paths as strings). Raises FileNotFoundError naming the first path that is not a run directory.
    """
    from .files import atomic_write_bytes

    if not run_dirs:
        raise ValueError("make_report needs at least one run directory")
    runs, seen = [], set()
    for d in run_dirs:
        run = load_run(d)  # every path is checked before anything is written
        key = run.path.resolve()
        if key not in seen:
            seen.add(key)
            runs.append(run)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_by_preset(runs)
    plots: dict[str, list[Path]] = {"learning_curves": [], "lslr": [], "msl_weights": []}
    notes: list[str] = []
    no_checkpoint: list[str] = []
    for preset, members in groups.items():
        path = plot_learning_curves(preset, members, out)
        if path:
            plots["learning_curves"].append(path)
        else:
            notes.append(f"No learning curves for {preset}: its runs have no metrics.csv rows.")
        path, note = plot_msl(preset, members, out)
        if path:
            plots["msl_weights"].append(path)
        if note:
            notes.append(note)
        used: set[str] = set()
        for r in members:
            if r.config.get("inner", {}).get("lr_mode") != "lslr":
                continue
            stem = f"lslr_{_safe(preset)}_seed{r.seed}"
            if stem in used:
                stem = f"{stem}_{_safe(r.path.name)}"
            used.add(stem)
            try:
                path = plot_lslr(r, out, stem)
            except Exception as e:  # a damaged checkpoint: report it, keep the rest of the report
                notes.append(f"No LSLR plot for {r.label}: its checkpoint cannot be read ({e}).")
                continue
            if path:
                plots["lslr"].append(path)
            else:
                no_checkpoint.append(r.label)
    if no_checkpoint:
        notes.append("No LSLR plot (inner.lr_mode=lslr, but no checkpoints/index.json entry or latest.pt with "
                     f"learned rates): {', '.join(no_checkpoint)}")
    report = out / "report.md"
    atomic_write_bytes(report, render_markdown(runs, plots, notes, out).encode("utf-8"))
    return {"report": str(report), **{k: [str(p) for p in v] for k, v in plots.items()}}


def cmd_report(args) -> int:
    written = make_report(args.run_dirs, args.out)
    print(f"wrote {written['report']}")
    for key in ("learning_curves", "lslr", "msl_weights"):
        for path in written[key]:
            print(f"wrote {path}")
    return 0


def register(subparsers) -> None:
    """Add `report RUN_DIR... [--out DIR]` to the CLI's subparsers (cli.build_parser calls this)."""
    p = subparsers.add_parser(
        "report", help="tables in the paper's layout and plots across run directories",
        description="Group runs by preset (their seeds are the repeats) and write OUT/report.md: mean ± std over "
                    "runs of the ensemble test accuracy beside the paper's numbers, a per-run table, and PNG "
                    "plots (learning curves, learned LSLR rates, MSL weights).")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by 'mamlpp train'")
    p.add_argument("--out", default="report", help="output folder (default: ./report)")
    p.set_defaults(func=cmd_report)

"""`mamlpp report RUN_DIR... [--out DIR]`: tables in the paper's layout and plots, across runs.

Runs are grouped by preset name (config.json "name"); the seeds of one preset are its repeats. The
comparison tables (Omniglot, Mini-ImageNet 5-way) place each preset by its metadata (approach, data
set, N, K, inner steps: presets.py), one row per approach as in the MAML++ paper, every method of
mamlpp beside the published number; approaches that are published numbers only are marked. Each
cell holds our mean +/- standard deviation over runs of the ensemble test accuracy (test.json).

Written to the output folder:
  report.md                        tables (Omniglot, Mini-ImageNet, other presets, per run) and notes
  learning_curves_<preset>.png     validation accuracy (loss for regression) and training loss
  lslr_<preset>_seed<S>.png        learned LSLR rates, layer x step, from the best checkpoint
  msl_weights_<preset>.png         MSL loss weights per inner step over the epochs
  stability.png                    the paper's stability figure: every seed of the -strided presets

Only the standard library, config and presets are imported at module level, so `mamlpp --help`
stays fast; torch and matplotlib load when a report is made.
"""
from __future__ import annotations

import io
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .config import INCIDENTAL_KEYS, Config, ConfigError, flat_keys
from .presets import PRESETS, PUBLISHED, REPLICATIONS, PaperResult, get_preset
from .rundir import RunDir, RunDirError, TestResult


# ---- the paper's numbers (presets.py holds them with each preset's metadata) ------------------------
def paper_result(preset: str) -> PaperResult | None:
    """The published number a preset is compared with; `-reference` presets share their unsuffixed name's."""
    return PRESETS[preset].paper if preset in PRESETS else None


PAPER_RESULTS: dict[str, PaperResult] = {name: p.paper for name, p in PRESETS.items()
                                         if p.paper is not None and p.flavour == "paper"}

# ---- table layouts: rows are approaches, columns (ways, shots); cells are found by preset metadata -----
OMNIGLOT_COLUMNS = [("5-way 1-shot", (5, 1)), ("5-way 5-shot", (5, 5)), ("20-way 1-shot", (20, 1)),
                    ("20-way 5-shot", (20, 5))]
MINI_COLUMNS = [("1-shot", (5, 1)), ("5-shot", (5, 5))]
# The MAML++ paper's comparison rows, then ours; ablation rows ("MAML + X") appear when they were run.
APPROACH_ORDER = ["Siamese Nets", "Matching Nets", "Neural Statistician", "Memory Module", "Meta-SGD",
                  "Meta-Networks", "Meta-LSTM", "Prototypical Networks", "MAML", "MAML++"]
PUBLISHED_ONLY = "†"  # marks rows that are published numbers only (not yet a method of mamlpp)


def _table_cells(dataset: str) -> dict[tuple, str]:
    """(approach, ways, shots, steps) -> the paper-flavour preset that fills that cell."""
    return {(p.approach, p.ways, p.shots, p.steps): name for name, p in PRESETS.items()
            if p.dataset == dataset and p.flavour == "paper"}


def _table_presets(dataset: str) -> set[str]:
    return set(_table_cells(dataset).values())


# Keys that do not change what a run computes, plus the seed (the repeats of one preset differ in it).
_IGNORED_KEYS = INCIDENTAL_KEYS | {"train.seed"}


# ---- loading runs -------------------------------------------------------------------------------------
@dataclass
class Run:
    path: Path
    label: str  # the path as given on the command line
    config: dict
    preset: str
    seed: int
    kind: str  # "classification" or "regression"
    test: TestResult | None
    metrics: list[dict]
    iterations: int | None
    planned_iterations: int
    overrides: list[str] = field(default_factory=list)  # "key=value" where the config differs from its preset

    @property
    def metric(self) -> float | None:
        """Ensemble test accuracy in percent (classification) or MSE after adaptation (regression)."""
        if self.test is None:
            return None
        return 100.0 * self.test.metric if self.kind == "classification" else self.test.metric

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


def load_run(path: str) -> Run:
    """Read one run directory; FileNotFoundError when it is not one (no config.json)."""
    run_dir = RunDir(path)
    config = run_dir.read_config_dict()
    test = run_dir.read_test()
    metrics = run_dir.read_metrics()
    iterations = max((r["iteration"] for r in metrics), default=None)
    if iterations is None:
        iterations = (run_dir.read_summary() or {}).get("iterations")
    train = config.get("train", {})
    dataset = config.get("data", {}).get("dataset", "")
    kind = "regression" if dataset == "sinusoid" or (test and test.kind == "regression") else "classification"
    try:
        seed = int(train.get("seed", 0))
    except (TypeError, ValueError):
        raise RunDirError(f"{run_dir.config_path}: train.seed = {train.get('seed')!r}: expected an integer") from None
    return Run(path=run_dir.path, label=str(path), config=config, preset=config.get("name", "custom"),
               seed=seed, kind=kind, test=test, metrics=metrics, iterations=iterations,
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


def _paper_cell(key: tuple | None, marks: dict[str, str]) -> str:
    """The published number for (approach, data set, ways, shots, steps), with the authors' own
    replication of MAML after a slash where there is one."""
    p = PUBLISHED.get(key) if key else None
    if p is None:
        return "–"
    text = f"{p.text()} [{marks.setdefault(p.source, _mark(len(marks)))}]"
    rep = REPLICATIONS.get(key)
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
            "with the number of runs; every method of a setting is tested on the same fixed test tasks. Paper: "
            "mean ± standard deviation over 3 runs (MAML++ authors), except where a footnote says otherwise (the "
            "original MAML paper's ± are 95% confidence intervals over tasks).")


def _comparison_rows(dataset: str, groups: dict[str, list[Run]]) -> list[tuple[str, int | None]]:
    """(approach, inner steps) of each table row: the paper's comparison rows and every approach with a
    preset, in APPROACH_ORDER; ablations ("MAML + X") only when they were run."""
    cells = _table_cells(dataset)
    keys = {(a, st) for a, _, _, st in cells} | {(a, st) for a, d, _, _, st in PUBLISHED if d == dataset}
    rank = {a: i for i, a in enumerate(APPROACH_ORDER)}
    rows = sorted((k for k in keys if k[0] in rank), key=lambda k: (rank[k[0]], k[1] or 0))
    ran = {(a, st) for (a, _, _, st), name in cells.items() if groups.get(name)}
    ablations = list(dict.fromkeys(p.approach for p in PRESETS.values() if p.approach.startswith("MAML + ")))
    return rows + [(a, st) for a in ablations for (b, st) in sorted(ran, key=str) if b == a]


def _comparison_section(title: str, dataset: str, columns, groups: dict[str, list[Run]], steps_column: bool,
                        extra: list[str]) -> list[str]:
    marks: dict[str, str] = {}
    cells = _table_cells(dataset)
    header = ["approach"] + (["inner steps"] if steps_column else [])
    header += [h for name, _ in columns for h in (f"{name} (ours)", f"{name} (paper)")]
    rows, unmeasured = [], False
    for approach, steps in _comparison_rows(dataset, groups):
        measured = any(a == approach for a, *_ in cells)
        unmeasured |= not measured
        row = [approach if measured else f"{approach} {PUBLISHED_ONLY}"]
        row += [str(steps) if steps else "–"] if steps_column else []
        for _, (ways, shots) in columns:
            preset = cells.get((approach, ways, shots, steps))
            row += [_ours(run_statistics(groups.get(preset, []))) if preset else "–",
                    _paper_cell((approach, dataset, ways, shots, steps), marks)]
        rows.append(row)
    lines = [f"## {title}", ""] + _table(header, rows) + [""]
    lines += [STD_NOTE, ""] + extra
    if unmeasured:
        lines += [f"{PUBLISHED_ONLY} Published number only: not yet a method of mamlpp, so not measured here. Every "
                  "other row is a method of mamlpp, trained and tested in this harness.", ""]
    lines += [f"{note}  " for note in _footnotes(marks)] + [""]
    return lines


def _omniglot_section(groups: dict[str, list[Run]]) -> list[str]:
    return _comparison_section("Omniglot", "omniglot", OMNIGLOT_COLUMNS, groups, False, [
        "MAML's paper column shows the original MAML paper's number first and, after the slash, the MAML++ "
        "authors' own replication of MAML (the baseline of their ablation table, 20-way 1-shot 91.27 ± 1.07).", ""])


def _mini_section(groups: dict[str, list[Run]]) -> list[str]:
    return _comparison_section("Mini-ImageNet 5-way", "mini_imagenet", MINI_COLUMNS, groups, True, [
        "MAML's paper column shows the original MAML paper's number first and, after the slash, the MAML++ "
        "authors' own reproduction of MAML.", ""])


def _generic_section(groups: dict[str, list[Run]]) -> list[str]:
    marks: dict[str, str] = {}
    rows = []
    for preset, members in groups.items():
        kind = members[0].kind
        metric = ("ensemble test accuracy (%)" if kind == "classification"
                  else "test MSE after adaptation (lower is better)")
        dataset = members[0].config.get("data", {}).get("dataset", "?")
        key = PRESETS[preset].key if paper_result(preset) is not None else None
        rows.append([preset, dataset, str(len(members)), metric, _ours(run_statistics(members), kind),
                     _paper_cell(key, marks)])
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
            ens = f"{100 * t.metric:.2f}% ± {100 * t.ci95:.2f}"
            single = f"{100 * t.single_model:.2f}% ± {100 * t.single_model_ci95:.2f}"
            size = str(t.ensemble_size)
        else:
            ens = f"MSE {t.metric:.4f} ± {t.ci95:.4f}"
            single = f"MSE {t.single_model:.4f}"
            if t.mse_before_adaptation is not None:
                single += f" (before adaptation {t.mse_before_adaptation:.4f})"
            size = str(t.ensemble_size)
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
    omniglot, mini = _table_presets("omniglot"), _table_presets("mini_imagenet")
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
        titles = {"learning_curves": "Learning curves", "lslr": "Learned LSLR rates", "msl_weights": "MSL weights",
                  "stability": "Stability (the paper's figure)"}
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
    run_dir = RunDir(run.path)
    found = run_dir.best_checkpoint()
    if found is None:
        return None
    path, what = found
    params = run_dir.load_checkpoint(path)["params"]
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


def plot_stability(runs: list[Run], out_dir: Path) -> Path | None:
    """The paper's stability figure: validation accuracy of every seed of MAML and MAML++ on the strided
    network (presets of flavour "strided"), overlaid, one colour per approach."""
    strided = [r for r in runs if r.preset in PRESETS and PRESETS[r.preset].flavour == "strided" and r.metrics]
    if not strided:
        return None
    fig = _figure(7.5, 4.5)
    ax = fig.subplots()
    colours = {}
    for r in sorted(strided, key=lambda r: (PRESETS[r.preset].approach, r.seed)):
        approach = PRESETS[r.preset].approach
        val = [m for m in r.metrics if m["phase"] == "val" and m["accuracy"] is not None]
        first = approach not in colours
        colour = colours.setdefault(approach, f"C{len(colours)}")
        ax.plot([m["iteration"] for m in val], [100 * m["accuracy"] for m in val], color=colour, linewidth=1.4,
                alpha=0.85, label=approach if first else None)
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Stability on the strided network (one line per seed)", fontsize=9)
    return _save(fig, out_dir / "stability.png")


# ---- entry points ---------------------------------------------------------------------------------------
def make_report(run_dirs: list[str], out_dir: str) -> dict:
    """Write report.md and the plots for run_dirs into out_dir.

    Returns {"report": path of report.md, "learning_curves": [...], "lslr": [...], "msl_weights": [...],
    "stability": [...]}
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
    plots: dict[str, list[Path]] = {"learning_curves": [], "lslr": [], "msl_weights": [], "stability": []}
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
    path = plot_stability(runs, out)
    if path:
        plots["stability"].append(path)
    if no_checkpoint:
        notes.append("No LSLR plot (inner.lr_mode=lslr, but no checkpoints/index.json entry or latest.pt with "
                     f"learned rates): {', '.join(no_checkpoint)}")
    report = out / "report.md"
    atomic_write_bytes(report, render_markdown(runs, plots, notes, out).encode("utf-8"))
    return {"report": str(report), **{k: [str(p) for p in v] for k, v in plots.items()}}


def cmd_report(args) -> int:
    written = make_report(args.run_dirs, args.out)
    print(f"wrote {written['report']}")
    for key in ("learning_curves", "lslr", "msl_weights", "stability"):
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

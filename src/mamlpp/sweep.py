"""`mamlpp sweep PRESET --seeds 0 1 2 [KEY=V1,V2 ...] --out SWEEP_DIR`: a grid of runs and their report.

Each grid point x seed is one run directory, SWEEP_DIR/<preset>[-<key>=<value>...]-seed<S> (only keys with
more than one alternative appear in the name), trained exactly as `mamlpp train` would train it:

  local           one run after another, in this process
  submitit-local  submitit.LocalExecutor: one subprocess per run (all at once), logs in SWEEP_DIR/submitit
  slurm           submitit.AutoExecutor(cluster="slurm"): one job per run, submitted as one job array

A run is a picklable `RunJob`. It resumes from RUN_DIR/checkpoints/latest.pt when RUN_DIR/config.json
exists and skips a run whose summary.json exists, so launching the same sweep again continues it, and
its `checkpoint()` hands submitit a DelayedSubmission of itself, so a preempted or timed-out Slurm job
is requeued and continues from its last epoch checkpoint. SWEEP_DIR/sweep.json lists the runs (name,
dir, overrides, seed, status), and when every run is done `make_report` writes SWEEP_DIR/report.

Grid syntax: `KEY=V1,V2,...` gives alternatives; for tuple-valued keys (model.hidden, outer.betas,
data.split_fractions) `;` separates alternatives, e.g. `model.hidden=40,40;20,20`. A single value is a
plain override applied to every run. Every combination is resolved and validated before any run starts
or any job is submitted.

Only the standard library and the config modules are imported at module level (`mamlpp --help` stays
fast); torch loads when a run trains, submitit when a submitit executor is used.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import sys
import time
import traceback
import typing
from dataclasses import dataclass
from pathlib import Path

from .config import INCIDENTAL_KEYS, Config, ConfigError, flat_keys, resolve_key, valid_keys
from .presets import get_preset, resolve
from .rundir import RunDir, TestResult

EXECUTORS = ("local", "submitit-local", "slurm")
SWEEP_FILE = "sweep.json"
SUBMITIT_FOLDER = "submitit"
REPORT_FOLDER = "report"

# Slurm states of a job that is still queued or running (sacct/squeue spelling).
_ACTIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                        "COMPLETING", "SUSPENDED", "RESIZING", "STAGE_OUT", "SIGNALING"}
_MAX_NAME = 180  # characters of a run directory name before the -seed<S> suffix


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError("the submitit-local and slurm executors need submitit: pip install submitit") from None
    return submitit


# ---- the grid -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Axis:
    key: str  # full section.name
    values: tuple[str, ...]  # the alternatives, as override strings


def _key_type(base: Config, section: str, name: str):
    hints = typing.get_type_hints(type(getattr(base, section)))
    if name not in hints:
        raise ConfigError(f"unknown config key {section}.{name!r}; valid keys: {', '.join(valid_keys(base))}")
    tp = hints[name]
    if typing.get_origin(tp) is typing.Union:  # Optional[X]
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    return tp


def parse_grid(items: list[str], base: Config | None = None) -> tuple[list[str], list[Axis]]:
    """Split KEY=V1,V2 items into plain overrides (one value) and grid axes (several), keys made full.
    base: the preset's config (its method decides which method.* keys exist)."""
    base = base or Config()
    plain: list[str] = []
    axes: list[Axis] = []
    seen: set[str] = set()
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE or KEY=V1,V2,...; valid keys: "
                              f"{', '.join(valid_keys(base))}")
        key, text = item.split("=", 1)
        section, name = resolve_key(key.strip(), base)
        full = f"{section}.{name}"
        is_tuple = typing.get_origin(_key_type(base, section, name)) is tuple
        if full == "train.seed":
            raise ConfigError("set the seeds with --seeds S1 S2 ..., not train.seed")
        if full in seen:
            raise ConfigError(f"{full} is given twice; list its alternatives in one {full}=V1,V2,... item")
        seen.add(full)
        values = [v.strip() for v in text.split(";" if is_tuple else ",")]
        if len(values) > 1 and any(not v for v in values):
            sep = ";" if is_tuple else ","
            raise ConfigError(f"{item!r}: an empty alternative (alternatives are separated by {sep!r}"
                              + (", tuple values keep their commas: model.hidden=40,40;20,20)" if is_tuple else ")"))
        values = list(dict.fromkeys(values))  # duplicates would be the same run
        if len(values) == 1:
            plain.append(f"{full}={values[0]}")
        else:
            axes.append(Axis(full, tuple(values)))
    return plain, axes


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", text).strip("_") or "_"


def run_name(preset: str, choice: dict[str, str], seed: int) -> str:
    """<preset>[-<key>=<value>...]-seed<S>, with filesystem-safe characters (40,40 becomes 40_40)."""
    base = "-".join([_safe(preset)] + [f"{_safe(k)}={_safe(v)}" for k, v in choice.items()])
    if len(base) > _MAX_NAME:  # stay under file name limits; the hash keeps names distinct
        digest = hashlib.sha1(base.encode()).hexdigest()[:10]
        base = f"{base[:_MAX_NAME - 11]}-{digest}"
    return f"{base}-seed{seed}"


@dataclass
class SweepRun:
    name: str
    run_dir: Path
    overrides: list[str]  # everything resolve_config gets: plain overrides, the grid choice, train.seed
    choice: dict[str, str]  # the grid point
    seed: int
    config: Config | None = None  # the resolved config
    status: str = "pending"
    job_id: str | None = None
    error: str | None = None

    def record(self) -> dict:
        out = {"name": self.name, "dir": str(self.run_dir), "overrides": self.overrides, "grid": self.choice,
               "seed": self.seed, "status": self.status}
        if self.job_id is not None:
            out["job_id"] = self.job_id
        if self.error:
            out["error"] = self.error
        return out


def plan_sweep(preset: str, seeds: list[int], items: list[str], out: str | os.PathLike) \
        -> tuple[list[str], list[Axis], list[SweepRun]]:
    """(plain overrides, axes, runs); every run's config is resolved here, so any bad key or value
    raises ConfigError before anything is written or submitted."""
    base = get_preset(preset)  # an unknown preset fails with its own message first
    if not seeds:
        raise ConfigError("--seeds needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, seeds))}: a seed is repeated")
    plain, axes = parse_grid(items, base)
    out = Path(out)
    runs: list[SweepRun] = []
    names: dict[str, list[str]] = {}
    for values in itertools.product(*(a.values for a in axes)):
        choice = {a.key: v for a, v in zip(axes, values)}
        grid = [f"{k}={v}" for k, v in choice.items()]
        for seed in seeds:
            overrides = plain + grid + [f"train.seed={seed}"]
            try:
                cfg = resolve(preset, overrides)
            except ConfigError as e:
                where = f" (grid point {' '.join(grid)})" if grid else ""
                raise ConfigError(f"{e}{where}") from None
            name = run_name(preset, choice, seed)
            if name in names:
                raise ConfigError(f"grid points {' '.join(names[name])} and {' '.join(grid)} give the same run "
                                  f"directory name {name!r}; spell their values differently")
            names[name] = grid
            runs.append(SweepRun(name, out / name, overrides, choice, seed, cfg))
    return plain, axes, runs


def config_differences(run_dir: str | os.PathLike, cfg: Config) -> list[str]:
    """'key: old -> new' for each key where RUN_DIR/config.json differs from cfg (compatible keys aside)."""
    stored = flat_keys(RunDir(run_dir).read_config_dict())
    wanted = flat_keys(json.loads(cfg.to_json()))  # tuples become lists, as in config.json
    out = []
    for key in sorted(set(stored) | set(wanted)):
        if key in INCIDENTAL_KEYS:
            continue
        if stored.get(key) != wanted.get(key):
            out.append(f"{key}: {json.dumps(stored.get(key))} -> {json.dumps(wanted.get(key))}")
    return out


def check_existing(run_dir: str | os.PathLike, cfg: Config) -> None:
    """A run directory that already holds a run must hold this run (else resuming would mix configs)."""
    if not RunDir(run_dir).is_run():
        return
    diff = config_differences(run_dir, cfg)
    if diff:
        raise ConfigError(f"{run_dir} already holds a run with another config ({'; '.join(diff)}); "
                          "sweep into another --out or delete that run directory")


def run_status(run_dir: str | os.PathLike) -> str:
    run = RunDir(run_dir)
    if run.summary_path.is_file():
        return "done"
    if run.is_run():
        return "partial"  # started before: will resume from its latest checkpoint
    return "pending"


# ---- one run ------------------------------------------------------------------------------------------
def _distributed_env_from_submitit() -> None:
    """In a submitit job with several tasks, give each task torchrun's variables so that
    distributed.init_from_env sets up data parallelism over tasks (rank 0 writes the run)."""
    if "WORLD_SIZE" in os.environ:
        return
    try:
        import submitit

        env = submitit.JobEnvironment()
        num_tasks = env.num_tasks
    except Exception:  # not in a submitit job, or submitit missing
        return
    if num_tasks <= 1:
        return
    digits = re.sub(r"\D", "", str(env.job_id)) or "0"
    os.environ.update(RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(num_tasks),
                      MASTER_ADDR=env.hostnames[0], MASTER_PORT=str(20000 + int(digits[-6:]) % 20000))


@dataclass
class RunJob:
    """One run of a sweep: a picklable callable for submitit or for an in-process loop.

    Calling it trains PRESET with OVERRIDES into RUN_DIR and returns the summary. A run whose
    summary.json exists is not trained again (its summary is returned); a run whose config.json
    exists resumes from its latest epoch checkpoint. That makes it safe to requeue: `checkpoint()`
    is what submitit calls on preemption or timeout, and it resubmits this same job.
    """
    preset: str
    overrides: list[str]
    run_dir: str
    data_dir: str | None = None
    run_test: bool = True
    progress: bool = False

    def __call__(self) -> dict:
        run = RunDir(self.run_dir)
        summary = run.read_summary()
        if summary is not None:
            return summary
        cfg = resolve(self.preset, self.overrides)
        resume = run.is_run()
        if resume:
            check_existing(run.path, cfg)
        _distributed_env_from_submitit()

        from .data import build_tasks
        from .distributed import init_from_env
        from .experiment import train

        dist, device = init_from_env(cfg.train.device)
        tasks = build_tasks(cfg, device, data_dir=self.data_dir)
        return train(cfg, tasks, run.path, device, progress=self.progress, resume=resume, run_test=self.run_test,
                     dist=dist)

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on preemption/timeout: requeue this job; it resumes from latest.pt."""
        submitit = import_submitit()
        return submitit.helpers.DelayedSubmission(self)


# ---- executors ----------------------------------------------------------------------------------------
def _slurm_params(args) -> dict:
    params = {"name": f"mamlpp-{args.preset}", "timeout_min": args.timeout_min,
              "slurm_partition": args.partition, "gpus_per_node": args.gpus_per_node,
              "cpus_per_task": args.cpus_per_task, "nodes": args.nodes, "tasks_per_node": args.tasks_per_node,
              "slurm_array_parallelism": args.slurm_array_parallelism}
    if args.setup:
        params["slurm_setup"] = list(args.setup)
    for item in args.slurm_param or []:
        if "=" not in item:
            raise ConfigError(f"--slurm-param {item!r}: expected KEY=VALUE, e.g. account=myproject")
        key, value = item.split("=", 1)
        params[f"slurm_{key.strip().replace('-', '_')}"] = value.strip()
    return {k: v for k, v in params.items() if v is not None}


def make_executor(args, folder: Path):
    """The submitit executor for --executor submitit-local or slurm, with the job parameters set."""
    submitit = import_submitit()
    try:
        if args.executor == "submitit-local":
            executor = submitit.LocalExecutor(folder=str(folder), max_num_timeout=args.max_num_timeout)
            params = {"timeout_min": args.timeout_min, "gpus_per_node": args.gpus_per_node,
                      "tasks_per_node": args.tasks_per_node, "nodes": args.nodes}
            params = {k: v for k, v in params.items() if v is not None}
        else:
            executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm",
                                             slurm_max_num_timeout=args.max_num_timeout)
            params = _slurm_params(args)
        executor.update_parameters(**params)
    except (RuntimeError, ValueError, NameError, AssertionError) as e:
        raise ConfigError(f"--executor {args.executor}: {e}") from None
    return executor


def _active_slurm_job(submitit, folder: Path, job_id: str):
    """The Slurm job job_id when it is still queued or running (a relaunch attaches to it), else None."""
    try:
        job = submitit.SlurmJob(folder=str(folder), job_id=str(job_id))
        state = str(job.get_info(mode="force").get("State", "UNKNOWN")).split()[0].upper()
    except Exception:
        return None
    return job if state in _ACTIVE_SLURM_STATES else None


# ---- the command --------------------------------------------------------------------------------------
def _short_error(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else text  # submitit's FailedJobError ends with the job's own error line


class Sweep:
    """The runs of one sweep and SWEEP_DIR/sweep.json, written after every change of status."""

    def __init__(self, args, plain: list[str], axes: list[Axis], runs: list[SweepRun]):
        self.args, self.plain, self.axes, self.runs = args, plain, axes, runs
        self.out = Path(args.out)

    def write(self) -> None:
        from .files import atomic_write_json

        atomic_write_json(self.out / SWEEP_FILE, {
            "preset": self.args.preset, "seeds": self.args.seeds, "grid": {a.key: list(a.values) for a in self.axes},
            "overrides": self.plain, "executor": self.args.executor, "data_dir": self.args.data_dir,
            "run_test": not self.args.no_test, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "runs": [r.record() for r in self.runs]})

    def job(self, run: SweepRun, progress: bool = False) -> RunJob:
        """Absolute paths: a Slurm job need not start in the folder the sweep was launched from."""
        data_dir = os.path.abspath(self.args.data_dir) if self.args.data_dir else None
        return RunJob(self.args.preset, run.overrides, os.path.abspath(run.run_dir), data_dir,
                      not self.args.no_test, progress)

    def finish(self, run: SweepRun, summary: dict | None, error: BaseException | None) -> None:
        if error is None and RunDir(run.run_dir).summary_path.is_file():
            run.status, run.error = "done", None
        else:
            run.status = "failed"
            run.error = _short_error(error) if error is not None else "the job ended without a summary.json"
        self.write()
        done = sum(r.status == "done" for r in self.runs)
        if run.status == "done":
            print(f"[{done}/{len(self.runs)} done] {run.name}")
            if summary and summary.get("final"):
                print(TestResult.from_dict(summary["final"]).describe())
        else:
            print(f"[{done}/{len(self.runs)} done] {run.name} FAILED: {run.error}", file=sys.stderr)


def _previous_job_ids(out: Path) -> dict[str, str]:
    try:
        data = json.loads((out / SWEEP_FILE).read_text())
        return {r["name"]: str(r["job_id"]) for r in data.get("runs", []) if r.get("job_id")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _run_local(sweep: Sweep, todo: list[SweepRun]) -> None:
    for i, run in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {'resuming' if run.status == 'partial' else 'training'} {run.name}", flush=True)
        run.status = "running"
        sweep.write()
        try:
            summary = sweep.job(run, progress=not sweep.args.no_progress)()
        except KeyboardInterrupt:
            run.status = run_status(run.run_dir)
            sweep.write()
            print(f"\ninterrupted during {run.name}; launch the same sweep again to resume it", file=sys.stderr)
            raise SystemExit(130) from None
        except Exception as e:  # one failed run (NaN loss, data problem) does not stop the others
            traceback.print_exc()
            sweep.finish(run, None, e)
        else:
            sweep.finish(run, summary, None)


def _run_submitit(sweep: Sweep, todo: list[SweepRun], executor) -> bool:
    """Submit (or, for Slurm, attach to still-active jobs of an earlier launch); wait unless --no-wait.
    Returns whether the jobs were waited for."""
    args = sweep.args
    folder = sweep.out / SUBMITIT_FOLDER
    submitit = import_submitit()
    jobs: dict[str, object] = {}  # run name -> submitit job
    if args.executor == "slurm":
        for run in todo:  # a relaunch must not start a second job on a run directory that one still trains
            job = _active_slurm_job(submitit, folder, run.job_id) if run.job_id else None
            if job is not None:
                jobs[run.name] = job
                print(f"{run.name}: job {job.job_id} from an earlier launch is still active; waiting for it")
    attached = set(jobs)
    fresh = [r for r in todo if r.name not in attached]
    if fresh and args.executor == "slurm":
        with executor.batch():  # one job array; slurm_array_parallelism caps how many run at once
            submitted = [executor.submit(sweep.job(r)) for r in fresh]
        jobs.update({r.name: j for r, j in zip(fresh, submitted)})
    else:
        jobs.update({r.name: executor.submit(sweep.job(r)) for r in fresh})
    for run in todo:
        run.status, run.job_id, run.error = "submitted", str(jobs[run.name].job_id), None
        if run.name not in attached:
            print(f"submitted {run.name}: job {run.job_id}")
    sweep.write()
    print(f"job logs: {folder}")
    if args.no_wait:
        print("not waiting (--no-wait); launch the same sweep again to wait for its jobs and make the report")
        return False
    by_job = {id(j): r for r, j in ((r, jobs[r.name]) for r in todo)}
    poll = 1.0 if args.executor == "submitit-local" else 30.0
    print(f"waiting for {len(todo)} job(s)...", flush=True)
    try:
        for job in submitit.helpers.as_completed([jobs[r.name] for r in todo], poll_frequency=poll):
            run = by_job[id(job)]
            try:
                summary = job.result()
            except Exception as e:
                sweep.finish(run, None, e)
            else:
                sweep.finish(run, summary, None)
    except KeyboardInterrupt:
        if args.executor == "slurm":
            print("\nstopped waiting; the Slurm jobs keep running. Launch the same sweep again to wait for "
                  "them and make the report.", file=sys.stderr)
        else:
            print("\ninterrupted; launch the same sweep again to resume the unfinished runs", file=sys.stderr)
        raise SystemExit(130) from None
    return True


def grid_table(sweep: "Sweep") -> str:
    """Markdown: one row per grid point, mean ± std over its seeds of the test metric. `mamlpp report`
    groups runs by preset, so its tables pool the grid points of one sweep; this table keeps them apart."""
    from .report import load_run, run_statistics

    rows, kind = [], None
    points: dict[tuple, list[SweepRun]] = {}
    for run in sweep.runs:
        points.setdefault(tuple(run.choice.items()), []).append(run)
    for point, members in points.items():
        loaded = [load_run(str(r.run_dir)) for r in members if r.status == "done"]
        kind = kind or next((r.kind for r in loaded), None)
        stats = run_statistics(loaded) if loaded else None
        if stats is None:
            cell = "–"
        else:
            mean, std, n = stats
            fmt = "{:.2f}" if loaded[0].kind == "classification" else "{:.4f}"
            cell = fmt.format(mean) + (f" ± {fmt.format(std)}" if std is not None else "")
            cell += f" ({n} run{'s' * (n != 1)})"
        seeds = " ".join(str(r.seed) for r in members if r.status == "done") or "–"
        rows.append([v for _, v in point] + [seeds, cell])
    metric = ("ensemble test accuracy (%)" if kind == "classification"
              else "test MSE after adaptation" if kind == "regression" else "test metric")
    header = [a.key for a in sweep.axes] + ["seeds done", f"{metric}, mean ± std over seeds"]
    lines = [f"# Sweep {sweep.args.preset}", "",
             f"{len(sweep.runs)} run(s) in {sweep.out}; overrides for every run: "
             f"{' '.join(sweep.plain) or 'none'}. The per-run details, plots and the paper's numbers are in "
             "report.md (which pools the grid points of a preset).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def cmd_sweep(args) -> int:
    args.overrides = list(args.overrides or []) + list(getattr(args, "seed_overrides", None) or [])
    if args.no_wait and args.executor != "slurm":
        raise ConfigError("--no-wait is for --executor slurm (local jobs left running would be started a second "
                          "time by the next launch)")
    plain, axes, runs = plan_sweep(args.preset, args.seeds, args.overrides, args.out)
    for run in runs:  # every existing run directory must hold this very run, checked before anything starts
        check_existing(run.run_dir, run.config)
        run.status = run_status(run.run_dir)
    shape = " x ".join([f"{len(args.seeds)} seed(s)"] + [f"{len(a.values)} {a.key}" for a in axes])
    print(f"sweep {args.preset}: {len(runs)} run(s) ({shape}) in {args.out}, executor {args.executor}")
    if args.dry_run:
        width = max(len(str(r.run_dir)) for r in runs)
        for run in runs:
            print(f"  {str(run.run_dir):<{width}}  {run.status:<7}  {' '.join(run.overrides)}")
        return 0
    todo = [r for r in runs if r.status != "done"]
    executor = None
    if todo and args.executor != "local":  # a missing submitit or Slurm fails before sweep.json is written
        executor = make_executor(args, Path(args.out) / SUBMITIT_FOLDER)
    previous = _previous_job_ids(Path(args.out))  # an earlier launch's jobs, read before sweep.json is rewritten
    for run in todo:
        run.job_id = previous.get(run.name)
    sweep = Sweep(args, plain, axes, runs)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    sweep.write()
    for run in runs:
        if run.status == "done":
            print(f"skip {run.name}: finished (summary.json)")
    if todo and executor is None:
        _run_local(sweep, todo)
    elif todo and not _run_submitit(sweep, todo, executor):
        return 0
    finished = [r for r in runs if r.status == "done"]
    failed = [r for r in runs if r.status != "done"]
    if args.report and finished:
        from .files import atomic_write_bytes
        from .report import make_report

        written = make_report([str(r.run_dir) for r in finished], str(Path(args.out) / REPORT_FOLDER))
        table = Path(args.out) / REPORT_FOLDER / "sweep.md"
        atomic_write_bytes(table, grid_table(sweep).encode("utf-8"))
        print(f"wrote {written['report']}\nwrote {table}")
    elif args.report:
        print("no finished runs: no report")
    if failed:
        print(f"{len(failed)} of {len(runs)} run(s) did not finish: {', '.join(r.name for r in failed)} "
              f"(see {Path(args.out) / SWEEP_FILE}); launch the same sweep again to continue them", file=sys.stderr)
        return 1
    print(f"all {len(runs)} run(s) done: {args.out}")
    return 0


class _SeedsAction(argparse.Action):
    """--seeds 0 1 2 [KEY=V1,V2 ...]: the integers are seeds; KEY=VALUE items that follow them (the
    documented order `PRESET --seeds 0 1 2 KEY=V1,V2 --out DIR`) are grid items, kept apart."""

    def __call__(self, parser, namespace, values, option_string=None):
        seeds, items = [], []
        for text in values:
            if "=" in text:
                items.append(text)
                continue
            try:
                seeds.append(int(text))
            except ValueError:
                parser.error(f"argument --seeds: {text!r} is neither an integer seed nor KEY=V1,V2,...")
        if not seeds:
            parser.error("argument --seeds: expected at least one integer seed")
        setattr(namespace, self.dest, seeds)
        setattr(namespace, "seed_overrides", (getattr(namespace, "seed_overrides", None) or []) + items)


def register(subparsers) -> None:
    """Add `sweep PRESET --seeds ... [KEY=V1,V2 ...] --out SWEEP_DIR` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "sweep", help="a grid of runs (seeds x KEY=V1,V2 alternatives), locally or on Slurm, then the report",
        description="Train every combination of --seeds and the grid into SWEEP_DIR/<preset>[-<key>=<value>...]-"
                    "seed<S>, one run after another (--executor local), or one submitit job per run "
                    "(submitit-local, slurm; jobs are requeued on preemption/timeout and resume from their last "
                    "epoch checkpoint). SWEEP_DIR/sweep.json lists the runs; when all are done, SWEEP_DIR/report "
                    "holds 'mamlpp report' over them. Launching the same sweep again skips finished runs and "
                    "resumes unfinished ones.",
        epilog="Grid: KEY=V1,V2,... (comma between alternatives); tuple-valued keys take ';' between "
               "alternatives, e.g. model.hidden=40,40;20,20 (quote it in the shell). A single value is a plain "
               "override for every run. Example: mamlpp sweep sinusoid-maml --seeds 0 1 2 inner.lr=0.01,0.02 "
               "train.budget=0.1 --out sweeps/lr")
    p.add_argument("preset", help="preset name ('mamlpp presets' lists them)")
    p.add_argument("overrides", nargs="*", metavar="KEY=V1,V2", help="grid alternatives or plain overrides")
    p.add_argument("--seeds", nargs="+", default=[0], action=_SeedsAction, metavar="S",
                   help="train.seed values (default: 0); grid items may follow them")
    p.add_argument("--out", required=True, metavar="SWEEP_DIR", help="folder for the run directories")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: in this process, one run after another (default); submitit-local: one "
                        "subprocess per run; slurm: one Slurm job per run (needs submitit)")
    p.add_argument("--data-dir", default=None, help="data root (default: $MAMLPP_DATA, then the user cache)")
    p.add_argument("--no-test", action="store_true", help="skip the test protocol at the end of each run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (local executor)")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their status; start nothing")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="when every run is done, write SWEEP_DIR/report with 'mamlpp report' (default: on)")
    p.add_argument("--no-wait", action="store_true",
                   help="submitit executors: submit and return without waiting (no report)")
    g = p.add_argument_group("submitit / Slurm")
    g.add_argument("--partition", default=None, help="Slurm partition")
    g.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (per run)")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task")
    g.add_argument("--timeout-min", type=int, default=24 * 60,
                   help="job time limit in minutes (default 1440); a timed-out job is requeued and resumes")
    g.add_argument("--max-num-timeout", type=int, default=10,
                   help="requeues after a timeout before a job counts as failed (default 10; preemptions do "
                        "not count)")
    g.add_argument("--slurm-array-parallelism", type=int, default=None, help="most runs in flight at once")
    g.add_argument("--nodes", type=int, default=None, help="nodes per run (default 1)")
    g.add_argument("--tasks-per-node", type=int, default=None,
                   help="processes per node; more than one trains each run data-parallel over tasks")
    g.add_argument("--setup", action="append", metavar="CMD",
                   help="shell command run in the Slurm job before training (repeatable), e.g. 'module load cuda'")
    g.add_argument("--slurm-param", action="append", metavar="KEY=VALUE",
                   help="another submitit Slurm parameter (repeatable), e.g. account=myproj qos=high mem=32G")
    p.set_defaults(func=cmd_sweep, seed_overrides=[])


def main(argv: list[str] | None = None) -> int:
    """`python -m mamlpp.sweep ...`: the sweep command on its own (the same as `mamlpp sweep ...`)."""
    parser = argparse.ArgumentParser(prog="mamlpp")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sweep", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError) as e:
        print(f"mamlpp: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`mamlpp sweep`: grids of seeds x overrides, run locally or as submitit jobs (requeue-safe), then the report."""
import argparse
import json
import os
import pickle
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import need_module
from core_utils import PausedRunJob
from mamlpp import sweep
from mamlpp.cli import main as mamlpp_main
from mamlpp.config import ConfigError
from mamlpp.sweep import RunJob, parse_grid, plan_sweep

TINY = ["train.epochs=1", "train.iters_per_epoch=5", "train.eval_tasks=10", "model.hidden=8,8", "outer.meta_batch=2",
        "train.tensorboard=false"]
GRID_2x2 = ["--seeds", "0", "1", "inner.lr=0.01,0.02"]
NAMES_2x2 = [f"sinusoid-maml-inner.lr={lr}-seed{s}" for lr in ("0.01", "0.02") for s in (0, 1)]


def cli(argv: list[str]) -> int:
    """`mamlpp sweep ...` through the command line."""
    return mamlpp_main(["sweep", *argv])


@pytest.fixture(scope="module")
def submitit():
    """Only the tests that run submitit need it (the `test` extra); missing, they skip (fail under CI=true)."""
    return need_module("submitit")


@pytest.fixture(scope="module")
def swept(tmp_path_factory, submitit):
    """A 2 x 2 sweep (seeds 0 1 x inner.lr 0.01 0.02) through submitit's LocalExecutor, in the issue's syntax."""
    out = tmp_path_factory.mktemp("sweep") / "lr"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # four job processes at once: one thread each
        rc = cli(["sinusoid-maml", *GRID_2x2, *TINY, "--out", str(out), "--executor", "submitit-local"])
    return out, rc


def test_submitit_local_2x2_sweep_makes_four_runs_and_a_report(swept):
    out, rc = swept
    assert rc == 0
    runs = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name.startswith("sinusoid-maml"))
    assert runs == sorted(NAMES_2x2)
    for name in NAMES_2x2:
        run = out / name
        assert (run / "summary.json").is_file() and (run / "test.json").is_file()
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["inner"]["lr"] == float(name.split("inner.lr=")[1].split("-")[0])
        assert cfg["train"]["seed"] == int(name[-1])
        assert cfg["model"]["hidden"] == [8, 8] and cfg["train"]["epochs"] == 1
    assert list((out / "submitit").glob("*_submitted.pkl")), "the runs went through submitit"
    report = (out / "report" / "report.md").read_text()
    for name in NAMES_2x2:
        assert name in report
    assert "sinusoid-maml" in report and "MSE" in report
    table = (out / "report" / "sweep.md").read_text()
    assert "| 0.01 | 0 1 |" in table and "| 0.02 | 0 1 |" in table
    listing = json.loads((out / "sweep.json").read_text())
    assert listing["grid"] == {"inner.lr": ["0.01", "0.02"]}
    assert [r["name"] for r in listing["runs"]] == NAMES_2x2
    for r in listing["runs"]:
        assert r["status"] == "done" and r["dir"] == str(out / r["name"]) and "job_id" in r
        assert r["overrides"][-1] == f"train.seed={r['seed']}" and f"inner.lr={r['grid']['inner.lr']}" in r["overrides"]


def test_relaunching_a_finished_sweep_trains_nothing(swept, capsys):
    out, rc = swept
    assert rc == 0
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    jobs = set((out / "submitit").glob("*_submitted.pkl"))
    capsys.readouterr()
    assert cli(["sinusoid-maml", *GRID_2x2, *TINY, "--out", str(out), "--executor", "submitit-local"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skip ") == 4 and "submitted" not in printed
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")} == stamps
    assert set((out / "submitit").glob("*_submitted.pkl")) == jobs
    assert (out / "report" / "report.md").is_file()


def test_dry_run_lists_the_runs_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "dry"
    assert cli(["sinusoid-maml", *GRID_2x2, *TINY, "--out", str(out), "--dry-run"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ")]
    assert len(lines) == 4
    for line, name in zip(lines, NAMES_2x2):
        assert str(out / name) in line and "pending" in line
    assert not out.exists()


@pytest.mark.parametrize("bad, message", [
    ("inner.bogus=1,2", "unknown config key"),
    ("inner.steps=1,0", "inner.steps=0: must be >= 1"),
    ("inner.lr_mode=lslr,fast", "expected one of"),
    ("train.seed=3", "--seeds"),
])
def test_a_bad_override_fails_before_anything_is_created(tmp_path, capsys, bad, message):
    out = tmp_path / "bad"
    assert cli(["sinusoid-maml", *GRID_2x2, bad, *TINY, "--out", str(out), "--executor", "submitit-local"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unknown_preset_fails_with_its_message(tmp_path, capsys):
    assert cli(["sinusoid-mam", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_grid_syntax_commas_and_semicolons():
    plain, axes = parse_grid(["model.hidden=40,40;20,20", "outer.betas=0.9,0.999", "lr_mode=fixed,lslr",
                              "inner.lr=0.01", "outer.lr=1e-3,1e-4,1e-3"])
    assert plain == ["outer.betas=0.9,0.999", "inner.lr=0.01"]
    assert [(a.key, a.values) for a in axes] == [("model.hidden", ("40,40", "20,20")),
                                                ("inner.lr_mode", ("fixed", "lslr")),
                                                ("outer.lr", ("1e-3", "1e-4"))]  # bare keys resolved, dups dropped
    with pytest.raises(ConfigError, match="ambiguous"):
        parse_grid(["lr=0.1,0.2"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["inner.lr=0.1", "inner.lr=0.2"])
    with pytest.raises(ConfigError, match="empty alternative"):
        parse_grid(["model.hidden=8,8;"])


def test_tuple_grid_runs_with_the_local_executor(tmp_path):
    out = tmp_path / "hidden"
    tiny = [o for o in TINY if not o.startswith("model.hidden")]
    assert cli(["sinusoid-maml", "model.hidden=8,8;4,4", *tiny, "--out", str(out), "--no-test", "--no-progress"]) == 0
    for hidden in ((8, 8), (4, 4)):
        run = out / f"sinusoid-maml-model.hidden={hidden[0]}_{hidden[1]}-seed0"
        assert json.loads((run / "config.json").read_text())["model"]["hidden"] == list(hidden)
        assert (run / "summary.json").is_file() and not (run / "test.json").exists()  # --no-test
    assert (out / "report" / "report.md").is_file()  # the report notes the runs without test.json


def test_run_names_are_filesystem_safe_and_distinct(tmp_path):
    _, _, runs = plan_sweep("sinusoid-maml", [0, 7], ["outer.grad_clamp=none,10", "outer.betas=0.9,0.99;0.5,0.9"],
                            tmp_path)
    names = [r.name for r in runs]
    assert len(set(names)) == 8
    assert "sinusoid-maml-outer.grad_clamp=none-outer.betas=0.9_0.99-seed7" in names
    for name in names:
        assert all(c.isalnum() or c in "._+=-" for c in name)
    long = plan_sweep("sinusoid-maml", [0], ["data.split_fractions=" + ";".join(
        f"0.{6 + i}{'0' * 90},0.{2 - i}{'0' * 90},0.2" for i in range(2))], tmp_path)[2]
    assert all(len(r.name) < 200 for r in long) and len({r.name for r in long}) == 2


def test_runjob_pickles_and_requeues_itself(submitit):
    job = RunJob("sinusoid-maml", TINY + ["train.seed=1"], "/tmp/somewhere", None, True)
    assert pickle.loads(pickle.dumps(job)) == job
    import cloudpickle

    assert cloudpickle.loads(cloudpickle.dumps(job)) == job
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function == job and delayed.args == () and delayed.kwargs == {}
    assert pickle.loads(pickle.dumps(delayed)).function == job


def test_runjob_resumes_an_unfinished_run_and_skips_a_finished_one(tmp_path):
    run = tmp_path / "run"
    job = RunJob("sinusoid-maml", TINY + ["train.epochs=2"], str(run), None, False)
    first = job()
    assert first["iterations"] == 10
    (run / "summary.json").unlink()  # as if killed after the last checkpoint
    rows = (run / "metrics.csv").read_text()
    assert job()["iterations"] == 10  # config.json exists: resumes instead of FileExistsError
    assert (run / "metrics.csv").read_text() == rows  # nothing was trained again
    stamp = (run / "summary.json").stat().st_mtime_ns
    assert job() == json.loads((run / "summary.json").read_text())
    assert (run / "summary.json").stat().st_mtime_ns == stamp


def test_a_run_directory_with_another_config_is_refused(tmp_path, capsys):
    out = tmp_path / "s"
    assert cli(["sinusoid-maml", *TINY, "--out", str(out), "--no-report", "--no-progress", "--no-test"]) == 0
    other = [o.replace("train.epochs=1", "train.epochs=2") for o in TINY]
    assert cli(["sinusoid-maml", *other, "--out", str(out), "--no-progress"]) == 2
    assert "train.epochs: 1 -> 2" in capsys.readouterr().err
    # what does not change the computation may differ (e.g. the device when moving to a GPU machine)
    assert cli(["sinusoid-maml", *TINY, "train.device=cpu", "--out", str(out), "--no-progress"]) == 0


def test_a_failed_run_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    real = RunJob.__call__

    def flaky(self):
        if self.run_dir.endswith("seed1"):
            raise FloatingPointError("meta-loss is not finite")
        return real(self)

    monkeypatch.setattr(RunJob, "__call__", flaky)
    out = tmp_path / "f"
    assert cli(["sinusoid-maml", "--seeds", "0", "1", *TINY, "--out", str(out), "--no-progress"]) == 1
    runs = {r["name"]: r for r in json.loads((out / "sweep.json").read_text())["runs"]}
    assert runs["sinusoid-maml-seed0"]["status"] == "done"
    assert runs["sinusoid-maml-seed1"]["status"] == "failed"
    assert "not finite" in runs["sinusoid-maml-seed1"]["error"]
    assert "sinusoid-maml-seed0" in (out / "report" / "report.md").read_text()
    assert "did not finish" in capsys.readouterr().err


def val_rows(run: Path) -> list[list[str]]:
    """[iteration, epoch] of each validation row of metrics.csv."""
    return [line.split(",")[:2] for line in (run / "metrics.csv").read_text().splitlines() if ",val," in line]


def test_a_preempted_submitit_job_is_requeued_and_resumes(tmp_path, monkeypatch, submitit):
    """Pre-empt the job at a fixed point, paused in its second epoch after the first epoch's checkpoint:
    submitit calls RunJob.checkpoint, requeues, and the new process continues from latest.pt to the same end."""
    run, paused = tmp_path / "run", tmp_path / "paused"
    overrides = [o for o in TINY if not o.startswith("train.")] + [
        "train.epochs=3", "train.iters_per_epoch=10", "train.eval_tasks=10", "train.log_every=5",
        "train.tensorboard=false"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # the job process unpickles PausedRunJob from core_utils, next to this file
    path = [str(Path(__file__).parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    executor = submitit.LocalExecutor(folder=str(tmp_path / "submitit"), max_num_timeout=3)
    executor.update_parameters(timeout_min=60)
    job = executor.submit(PausedRunJob("sinusoid-maml", overrides, str(run), None, False, marker=str(paused),
                                       pause_at=10))
    deadline = time.time() + 120
    while not paused.exists() and time.time() < deadline and not job.done():
        time.sleep(0.02)
    assert paused.exists(), f"the job did not reach its pause: {Path(job.paths.stderr).read_text()[-2000:]}"
    assert val_rows(run) == [["10", "0"]] and (run / "checkpoints" / "latest.pt").is_file()
    assert not (run / "summary.json").exists()
    os.kill(int(paused.read_text()), signal.SIGUSR2)  # what Slurm sends before preemption (submitit's default)
    summary = job.result()
    assert summary["iterations"] == 30
    log = Path(job.paths.stderr).read_text()
    assert "Caught signal SIGUSR2" in log and "preempted" in log
    assert val_rows(run) == [[str(10 * (e + 1)), str(e)] for e in range(3)]  # every epoch once: resumed, not restarted
    assert json.loads((run / "summary.json").read_text())["iterations"] == 30


def test_missing_submitit_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(ConfigError, match="pip install submitit"):
        sweep.import_submitit()
    assert cli(["sinusoid-maml", *TINY, "--out", str(tmp_path / "x"), "--executor", "slurm"]) == 2
    assert not (tmp_path / "x" / "sweep.json").exists()


def test_slurm_executor_gets_the_options(tmp_path, monkeypatch, submitit):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("srun", "sbatch"):  # submitit only checks that srun exists; nothing is submitted here
        (bin_dir / tool).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    parser = argparse.ArgumentParser()
    sweep.register(parser.add_subparsers())
    args = parser.parse_args(["sweep", "sinusoid-maml", "--out", str(tmp_path / "s"), "--executor", "slurm",
                              "--partition", "gpu", "--gpus-per-node", "1", "--cpus-per-task", "8",
                              "--timeout-min", "120", "--slurm-array-parallelism", "2", "--nodes", "1",
                              "--tasks-per-node", "1", "--slurm-param", "account=proj", "--setup", "module load cuda"])
    executor = sweep.make_executor(args, tmp_path / "s" / "submitit")
    params = executor._executor.parameters
    assert params["partition"] == "gpu" and params["gpus_per_node"] == 1 and params["cpus_per_task"] == 8
    assert params["time"] == 120 and params["array_parallelism"] == 2 and params["account"] == "proj"
    assert params["setup"] == ["module load cuda"] and executor._executor.max_num_timeout == 10
    args.slurm_param = ["no_such_option=1"]
    with pytest.raises(ConfigError, match="no_such_option"):
        sweep.make_executor(args, tmp_path / "s" / "submitit")


def test_seeds_may_be_followed_by_grid_items():
    parser = argparse.ArgumentParser()
    sweep.register(parser.add_subparsers())
    args = parser.parse_args(["sweep", "sinusoid-maml", "train.epochs=1", "--seeds", "0", "1", "2",
                              "inner.lr=0.1,0.2", "--out", "x"])
    assert args.seeds == [0, 1, 2] and args.overrides == ["train.epochs=1"]
    assert args.seed_overrides == ["inner.lr=0.1,0.2"]
    with pytest.raises(SystemExit):
        parser.parse_args(["sweep", "sinusoid-maml", "--seeds", "zero", "--out", "x"])


def test_cli_registers_sweep():
    from mamlpp import cli as mamlpp_cli

    parser = mamlpp_cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "sweep" in commands.choices, "cli.build_parser does not register the sweep command"
    assert commands.choices["sweep"].get_default("func") is sweep.cmd_sweep


class FakeSlurmJob:
    def __init__(self, job_id):
        self.job_id = job_id


class FakeSlurmExecutor:
    """Records submissions; stands in for submitit's Slurm executor (no cluster here)."""

    def __init__(self):
        self.submitted, self.batches, self.count = [], 0, 0

    def batch(self):
        import contextlib

        self.batches += 1
        return contextlib.nullcontext()

    def submit(self, job):
        assert pickle.loads(pickle.dumps(job)) == job
        self.submitted.append(job)
        self.count += 1
        return FakeSlurmJob(f"77_{self.count - 1}")


def test_slurm_relaunch_attaches_to_active_jobs_instead_of_resubmitting(tmp_path, monkeypatch, capsys, submitit):
    out = tmp_path / "slurm"
    fake = FakeSlurmExecutor()
    monkeypatch.setattr(sweep, "make_executor", lambda args, folder: fake)
    argv = ["sinusoid-maml", "--seeds", "0", "1", *TINY, "--out", str(out), "--executor", "slurm", "--no-wait"]
    assert cli(argv) == 0
    assert [Path(j.run_dir).name for j in fake.submitted] == ["sinusoid-maml-seed0", "sinusoid-maml-seed1"]
    assert fake.batches == 1  # one job array
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [(r["status"], r["job_id"]) for r in runs] == [("submitted", "77_0"), ("submitted", "77_1")]
    assert not any(out.glob("sinusoid-maml-*")), "nothing trains in the launching process"
    # relaunch: seed0's job is still queued on the cluster, seed1's is gone -> only seed1 is submitted again
    monkeypatch.setattr(sweep, "_active_slurm_job",
                        lambda submitit, folder, job_id: FakeSlurmJob(job_id) if job_id == "77_0" else None)
    fake.submitted.clear()
    assert cli(argv) == 0
    assert [Path(j.run_dir).name for j in fake.submitted] == ["sinusoid-maml-seed1"]
    assert "77_0 from an earlier launch is still active" in capsys.readouterr().out
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["job_id"] for r in runs] == ["77_0", "77_2"]


def test_no_wait_is_only_for_slurm(tmp_path, capsys):
    assert cli(["sinusoid-maml", *TINY, "--out", str(tmp_path / "x"), "--executor", "submitit-local",
                "--no-wait"]) == 2
    assert "--no-wait is for --executor slurm" in capsys.readouterr().err and not (tmp_path / "x").exists()

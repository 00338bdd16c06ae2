"""Run folders that cannot be corrupted and inputs that get one line, not a traceback (sinusoid runs:
no data needed)."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from mamlpp.cli import main
from mamlpp.rundir import RunDir

SINE = ["train.epochs=3", "train.iters_per_epoch=10", "train.eval_tasks=20", "train.log_every=5",
        "model.hidden=8,8", "outer.meta_batch=4", "train.tensorboard=false", "train.top_k=3"]


def train(out, *extra, resume=False):
    args = ["train", "--resume", str(out)] if resume else ["train", "sinusoid-maml", *SINE, *extra, "--out", str(out)]
    return main([*args, "--no-progress"])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 3-epoch run (three epoch checkpoints, test.json), copied by the tests that change it."""
    out = tmp_path_factory.mktemp("runs") / "done"
    assert train(out) == 0
    return out


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def one_line(capsys) -> str:
    """The error's one line (a run that started announces itself first: that line is not the error)."""
    err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines() if "intra-op threads" not in line)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ---- one writer per run folder ------------------------------------------------------------------------
def hold_lock(run_dir):
    """Another process holding the run folder's lock, as a training run would."""
    code = textwrap.dedent(f"""
        import sys, time
        from mamlpp.rundir import RunDir
        with RunDir({str(run_dir)!r}).lock():
            print("locked", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_with_the_holders_pid_and_a_killed_holder_leaves_no_lock(tmp_path, finished,
                                                                                            capsys):
    run = copy_run(finished, tmp_path / "r")
    holder = hold_lock(run)
    try:
        assert train(run, resume=True) == 2
        assert f"in use by another mamlpp process (PID {holder.pid})" in one_line(capsys)
        assert main(["eval", str(run)]) == 2
        assert f"PID {holder.pid}" in one_line(capsys)
        new = tmp_path / "new"
        new.mkdir()
        holder2 = hold_lock(new)  # a new run's folder locked by another `train --out` that started first
        assert train(new) == 2 and f"PID {holder2.pid}" in one_line(capsys)
        assert not (new / "config.json").exists()
        holder2.kill()
        holder2.wait()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main(["eval", str(run)]) == 0  # the kernel released the lock of the killed process
    with RunDir(run).lock():  # and this process can take it again, nested
        with RunDir(run).lock():
            pass


def test_a_folder_that_is_not_a_run_is_refused_and_left_alone(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "epoch_007.pt").write_bytes(b"a user's file")
    (out / "metrics.csv").write_text("a,b\n1,2\n")
    assert train(out) == 2
    assert "holds files but no mamlpp run" in one_line(capsys)
    assert (out / "checkpoints" / "epoch_007.pt").read_bytes() == b"a user's file"
    assert (out / "metrics.csv").read_text() == "a,b\n1,2\n" and not (out / "config.json").exists()
    assert train(tmp_path / "empty-ok") == 0  # a new folder is fine; so is an empty existing one
    (tmp_path / "empty").mkdir()
    assert train(tmp_path / "empty") == 0


@pytest.mark.parametrize("k", ["-2", "0", "4"])
def test_eval_top_k_is_validated_and_never_replaces_the_runs_result(k, tmp_path, finished, capsys):
    run = copy_run(finished, tmp_path / "r")
    before = (run / "test.json").read_bytes()
    assert main(["eval", str(run), "--top-k", k]) == 2
    assert f"--top-k {k}: expected 1 to 3" in one_line(capsys)
    assert main(["eval", str(run), "--top-k", "2"]) == 0
    assert (run / "test.json").read_bytes() == before  # another protocol is written beside it
    assert json.loads((run / "test_top2.json").read_text())["ensemble_size"] == 2


def test_a_damaged_latest_checkpoint_resumes_from_the_newest_intact_epoch(tmp_path, finished, capsys):
    run = copy_run(finished, tmp_path / "r")
    good = RunDir(finished).load_checkpoint(RunDir(finished).latest)
    (run / "summary.json").unlink()
    damaged = [run / "checkpoints" / "latest.pt", run / "checkpoints" / "epoch_002.pt"]
    for path in damaged:  # truncated, as by a disk failing outside our writer
        path.write_bytes(path.read_bytes()[:1000])
    newest = {"file": "epoch_001.pt", "epoch": 1}  # the newest that loads: epoch 2 is trained again
    (run / "checkpoints" / ".latest.pt.abc123.tmp").write_bytes(b"x" * 100)  # left by interrupted writes
    (run / ".metrics.csv.def456.tmp").write_bytes(b"x")
    assert train(run, resume=True) == 0
    err = capsys.readouterr().err
    assert "latest.pt cannot be loaded" in err and f"{newest['file']} (epoch {newest['epoch']})" in err
    again = RunDir(run).load_checkpoint(RunDir(run).latest)
    assert again["epoch"] == good["epoch"]
    for key, value in good["params"].items():  # the epochs after it were trained again, to the same end
        assert torch.equal(again["params"][key], value), key
    assert not list(run.glob(".*.tmp")) and not list((run / "checkpoints").glob(".*.tmp"))


def test_a_damaged_latest_checkpoint_without_an_intact_epoch_is_one_line(tmp_path, finished, capsys):
    run = copy_run(finished, tmp_path / "r")
    for p in (run / "checkpoints").glob("*.pt"):
        p.write_bytes(b"not a checkpoint")
    assert train(run, resume=True) == 2
    err = one_line(capsys)
    assert "latest.pt cannot be loaded" in err and "cannot be resumed" in err


# ---- one line for every bad input ---------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("outer.lr=-1", "outer.lr=-1.0: must be > 0"),
    ("outer.lr=nan", "outer.lr=nan: must be a finite number"),
    ("outer.betas=2,3", "expected two values in [0, 1)"),
])
def test_bad_values_fail_in_the_config_not_in_training(override, message, tmp_path, capsys):
    assert train(tmp_path / "r", override) == 2
    assert message in one_line(capsys) and not (tmp_path / "r").exists()


@pytest.mark.parametrize("override", ["data.image_size=-5", "data.image_size=1"])
def test_bad_image_sizes_are_config_errors(override, capsys):
    assert main(["config", "omniglot-5w1s-mamlpp", override]) == 2
    assert "data.image_size" in one_line(capsys)


def test_out_below_a_file_resume_with_out_and_debug(tmp_path, finished, capsys):
    (tmp_path / "afile").write_text("x")
    assert train(tmp_path / "afile" / "sub") == 2
    assert "a file is in the way" in one_line(capsys)
    assert main(["train", "--resume", str(finished), "--out", str(tmp_path / "other")]) == 2
    assert "drop --out" in one_line(capsys)
    with pytest.raises(Exception, match="a file is in the way"):  # --debug: the traceback
        main(["--debug", "train", "sinusoid-maml", *SINE, "--out", str(tmp_path / "afile" / "sub")])


@pytest.mark.parametrize("damage, command, message", [
    (lambda r: (r / "config.json").write_text("{bad"), "eval", "config.json: not valid JSON"),
    (lambda r: (r / "config.json").write_text("{bad"), "report", "config.json: not valid JSON"),
    (lambda r: (r / "config.json").write_text("[1, 2]"), "eval", "config.json: expected a JSON object"),
    (lambda r: (r / "test.json").write_text(json.dumps({**json.loads((r / "test.json").read_text()),
                                                        "mse_after_adaptation": "high"})),
     "report", "test.json: mse_after_adaptation = 'high': expected a number"),
    (lambda r: (r / "metrics.csv").write_bytes(b"\xff\xfe\x00bad"), "report", "metrics.csv: not UTF-8"),
    (lambda r: (r / "config.json").write_text(json.dumps({**json.loads((r / "config.json").read_text()),
                                                          "train": {"seed": "one"}})),
     "report", "config.json: train.seed = 'one': expected an integer"),
])
def test_damaged_run_files_are_named_in_one_line(damage, command, message, tmp_path, finished, capsys):
    run = copy_run(finished, tmp_path / "r")
    damage(run)
    args = ["eval", str(run)] if command == "eval" else ["report", str(run), "--out", str(tmp_path / "rep")]
    assert main(args) == 2
    err = one_line(capsys)
    assert message in err and str(run) in err


def test_a_non_finite_loss_in_the_first_epoch_says_there_is_no_checkpoint(tmp_path, capsys):
    assert train(tmp_path / "r", "outer.lr=1e30") == 1
    err = capsys.readouterr().err
    assert "no checkpoint yet" in err and not (tmp_path / "r" / "checkpoints" / "latest.pt").exists()

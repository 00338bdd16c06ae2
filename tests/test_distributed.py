"""torchrun with 2 CPU processes (gloo) against a single process, and kill-and-resume under torchrun."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mamlpp.rundir import RunDir

# float64: conv biases before batch norm are driven by rounding noise (see assert_same_params), and
# in float32 that noise moves the other weights by ~1% over a few dozen Adam steps, whatever the
# summation order; in float64 everything else agrees to ~1e-13.
ARGS = ["train.dtype=float64", "train.epochs=2", "train.iters_per_epoch=12", "train.eval_tasks=30", "train.eval_chunk=7",
        "outer.meta_batch=5", "train.device=cpu", "train.log_every=4", "--no-progress"]


def launch(preset, out, overrides, procs, extra=(), wait=True, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    if procs == 1:  # one process unless the test asks for more (auto would take one per core)
        overrides = overrides if any(o.startswith("train.processes=") for o in overrides) else [*overrides, "train.processes=1"]
        cmd = [sys.executable, "-m", "mamlpp", "train", preset, *overrides, "--out", str(out), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               "-m", "mamlpp", "train", preset, *overrides, "--out", str(out), *extra]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def latest(run_dir):
    return RunDir(run_dir).load_checkpoint(RunDir(run_dir).latest)


def assert_same_params(a, b, tol):
    for k in a["params"]:
        if k.startswith(("net.conv", "lr.conv")) and k.endswith(".bias"):
            # Conv biases in front of batch norm have a true gradient of zero: theirs (and their
            # rates') is rounding noise that Adam scales up to full steps, so the summation order
            # of the all-reduce decides them. They cannot change any output, checked below.
            continue
        x, y = a["params"][k], b["params"][k]
        assert torch.allclose(x, y, rtol=tol, atol=tol * x.abs().max().item()), k


# two_only: what only the two-process run gets (chunks within a process's share)
@pytest.mark.parametrize("preset, extra, tol, two_only", [
    ("sinusoid-maml", ["model.hidden=16,16"], 1e-9, []),
    ("omniglot-5w1s-mamlpp", ["model.filters=8", "inner.steps=2"], 1e-9, []),  # BNRS state is all-reduced too
    # Shares of 3 and 2 tasks, one task per pass: the BNRS parts sum over passes and processes.
    ("omniglot-5w1s-mamlpp", ["model.filters=8", "inner.steps=2"], 1e-9, ["train.chunk=1"]),
    # A metric method with running statistics. Its ReLU units that are dead on every image have a true
    # gradient of zero, so rounding noise moves their BN biases by ~1e-11 (the tensors' scale: 1e-2).
    ("omniglot-5w1s-protonet", ["model.filters=8", "data.train_ways=10"], 1e-8, []),
    # Pairs and distortions are drawn for the whole meta-batch, each pass keeping its tasks' rows.
    ("omniglot-5w1s-siamese", ["model.filters=8", "data.train_ways=8", "method.pairs=16"], 1e-8, ["train.chunk=2"]),
    # The memory's nearest-neighbour decisions are discrete: on a network without batch norm (the
    # preset's LeNet) nothing differs between the two summation orders, and the runs agree exactly.
    # (On Conv4 the conv biases' rounding noise, above, can flip one after a few updates.)
    ("omniglot-5w1s-memory", ["train.iters_per_epoch=3", "data.train_queries=1", "train.eval_tasks=10"], 1e-12, []),
])
def test_two_processes_match_one(tmp_path, preset, extra, tol, two_only, request):
    env = {}
    if preset.startswith("omniglot"):
        request.getfixturevalue("omniglot_set")  # decode the real Omniglot once, into the session cache
        env = {"MAMLPP_DATA": str(request.getfixturevalue("shared_data_root")),
               "MAMLPP_CACHE": str(request.getfixturevalue("data_cache_dir"))}
    one, two = tmp_path / "one", tmp_path / "two"
    launch(preset, one, ARGS + extra, 1, env=env)
    out = launch(preset, two, ARGS + extra + two_only, 2, env=env)
    assert out.stdout.count("run: ") == 1  # only rank 0 reports
    a, b = latest(one), latest(two)
    assert_same_params(a, b, tol)
    for k in a["state"]:  # BNRS: the running variances go through the same all-reduced fold as the
        if k.endswith(".var"):  # means; the means also carry the noise-driven conv biases
            assert torch.allclose(a["state"][k], b["state"][k], rtol=1e-9, atol=0), k
    if "accuracy" in a["val"]:
        assert a["val"]["accuracy"] == b["val"]["accuracy"]
    # Biases differ, outputs do not; except through running statistics used at evaluation (ProtoNets):
    # their lag behind the noise-driven conv biases does not cancel exactly.
    val_rel = 1e-6 if preset.endswith(("protonet", "siamese")) else 1e-9
    assert a["val"]["loss"] == pytest.approx(b["val"]["loss"], rel=val_rel)
    # Only rank 0 wrote: one header and no duplicated rows, one event file, one test.json.
    rows = (two / "metrics.csv").read_text().splitlines()
    assert rows.count(rows[0]) == 1 and len(rows) == len((one / "metrics.csv").read_text().splitlines())
    assert len(list((two / "tensorboard").iterdir())) == 1
    assert (two / "test.json").exists() and (two / "summary.json").exists()


def test_kill_and_resume_under_torchrun(tmp_path):
    args = ["train.epochs=3", "train.iters_per_epoch=150", "train.eval_tasks=20", "outer.meta_batch=4",
            "model.hidden=16,16", "train.device=cpu", "train.log_every=10", "train.tensorboard=false",
            "--no-progress", "--no-test"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    launch("sinusoid-maml", full, args, 2)
    proc = launch("sinusoid-maml", killed, args, 2, wait=False)
    metrics = killed / "metrics.csv"
    deadline = time.time() + 300
    while time.time() < deadline:
        rows = metrics.read_text().splitlines()[1:] if metrics.exists() else []
        if any(",train," in r and 180 <= int(r.split(",")[0]) <= 260 for r in rows):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    assert latest(killed)["epoch"] == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "-m", "mamlpp", "train", "--resume", str(killed), "--no-progress", "--no-test"],
                   env=env, check=True, capture_output=True, timeout=600)
    a, b = latest(full), latest(killed)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k


# Ranks follow rank 0 through PR_SET_PDEATHSIG, and the tests find them in /proc.
LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def peers_of(pid):
    return [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]


def alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_train_starts_its_own_processes(tmp_path):
    """train.processes=2: `mamlpp train` makes itself rank 0 and starts rank 1; the same update as one
    process, one report, the choice in the first line."""
    args = ARGS + ["model.hidden=16,16"]
    launch("sinusoid-maml", tmp_path / "one", args + ["train.processes=1"], 1)
    out = launch("sinusoid-maml", tmp_path / "two", args + ["train.processes=2"], 1)
    assert "on cpu, processes 2 (train.processes), intra-op threads 1 (auto: one in each of 2 processes)" in out.stderr
    assert out.stdout.count("run: ") == 1
    assert_same_params(latest(tmp_path / "one"), latest(tmp_path / "two"), 1e-9)


# A sinusoid run long enough to interrupt, in two processes that `mamlpp train` starts itself.
LONG_RUN = ["train.epochs=3", "train.iters_per_epoch=150", "train.eval_tasks=20", "outer.meta_batch=4",
            "model.hidden=16,16", "train.device=cpu", "train.log_every=10", "train.tensorboard=false",
            "train.processes=2", "--no-progress", "--no-test"]


def start_long_run(run, **popen):
    """The LONG_RUN training in `run`, once it has logged: (rank 0's Popen, the pids of its peers)."""
    proc = subprocess.Popen([sys.executable, "-m", "mamlpp", "train", "sinusoid-maml", *LONG_RUN, "--out", str(run)],
                            **popen)
    deadline, peers = time.time() + 120, []
    while time.time() < deadline and not (run / "metrics.csv").exists():
        peers = peers or peers_of(proc.pid)
        time.sleep(0.05)
    assert len(peers) == 1 and (run / "metrics.csv").exists()
    return proc, peers


@LINUX
def test_killed_train_takes_its_processes_along_and_resumes(tmp_path):
    """kill -9 of the process the user started leaves no rank training on (holding the run's lock):
    the resume starts at once and finishes the run."""
    run = tmp_path / "run"
    proc, peers = start_long_run(run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.kill()  # rank 0 only: its peer must follow
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and alive(peers[0]):
        time.sleep(0.05)
    assert not alive(peers[0])
    done = subprocess.run([sys.executable, "-m", "mamlpp", "train", "--resume", str(run), "--no-progress", "--no-test"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "processes 2 (train.processes)" in done.stderr and latest(run)["epoch"] == 2


def test_a_failed_process_ends_the_run():
    """Rank 0 would wait on a dead rank for half an hour (the store at start-up, or a collective)."""
    code = "from mamlpp.launch import Peers; import time; Peers(2, 'test', ['no-such-command']); time.sleep(120)"
    start = time.time()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and time.time() - start < 60
    assert "mamlpp: training process 1 of 2 exited with status 2; stopping the run" in done.stderr


@LINUX
def test_ctrl_c_stops_every_process_with_one_line(tmp_path):
    run = tmp_path / "run"
    proc, peers = start_long_run(run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to every process of the job
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and not alive(peers[0])
    assert f"mamlpp: interrupted; continue with: mamlpp train --resume {run}" in err and "Traceback" not in err, err

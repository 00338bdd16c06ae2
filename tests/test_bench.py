"""`mamlpp bench`: one timed iteration of each implementation on synthetic episodes, as JSON."""
import json
import os
import subprocess
import sys

from mamlpp.cli import main

KEYS = {"impl", "preset", "method", "data", "meta_batch", "ways", "shots", "queries", "inner_steps", "filters", "second_order",
        "msl", "dtype", "iters", "chunk", "seconds_per_iter_median", "seconds_per_iter_min", "seconds_per_iter_max",
        "tasks_per_second", "sampling_seconds_per_iter", "peak_memory_mb", "device_name", "torch_version",
        "eval_tasks", "eval_seconds", "threads", "processes", "precision", "peak_memory_mb_all"}


def test_bench_one_iteration_on_synthetic_data(capsys):
    assert main(["bench", "omniglot-5w1s-mamlpp", "model.filters=4", "inner.steps=2", "outer.meta_batch=2",
                 "train.device=cpu", "--synthetic", "--impl", "both", "--iters", "1", "--warmup", "0",
                 "--eval-tasks", "3", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    results = [json.loads(line) for line in lines]
    assert [r["impl"] for r in results] == ["parallel", "loop"]
    for r in results:
        assert set(r) == KEYS, set(r) ^ KEYS
        assert (r["preset"], r["method"], r["data"], r["iters"], r["eval_tasks"]) == ("omniglot-5w1s-mamlpp", "maml",
                                                                                  "synthetic", 1, 3)
        shape = (r["meta_batch"], r["ways"], r["shots"], r["queries"], r["inner_steps"], r["filters"])
        assert shape == (2, 5, 1, 1, 2, 4)
        assert r["second_order"] is True and r["msl"] is True and r["dtype"] == "float32"  # epoch 0 of MAML++
        one = r["seconds_per_iter_median"]
        assert 0 < one == r["seconds_per_iter_min"] == r["seconds_per_iter_max"]  # a single timed iteration
        assert r["tasks_per_second"] == 2 / one
        assert r["sampling_seconds_per_iter"] >= 0 and r["eval_seconds"] > 0 and r["peak_memory_mb"] > 0
        assert r["device_name"] and r["torch_version"]
    assert [r["chunk"] for r in results] == [0, 2]  # the loop runs the whole meta-batch as one graph


def test_bench_under_torchrun_times_the_data_parallel_split():
    # Two single-thread processes, each its share of the meta-batch: how the process/thread split is measured.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mamlpp", "bench",
           "omniglot-5w1s-mamlpp", "model.filters=4", "inner.steps=2", "outer.meta_batch=4", "train.device=cpu",
           "train.threads=1", "--synthetic", "--iters", "1", "--warmup", "0", "--json"]
    done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1  # rank 0 reports
    assert results[0]["processes"] == 2 and results[0]["meta_batch"] == 4 and results[0]["threads"].startswith("1 ")
    assert results[0]["peak_memory_mb"] < results[0]["peak_memory_mb_all"] < 3 * results[0]["peak_memory_mb"]
    refused = subprocess.run(cmd[:-6] + ["--synthetic", "--impl", "loop", "--iters", "1", "--warmup", "0"],
                             env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "--impl loop is the one-process baseline" in refused.stderr

"""The benchmark scripts BENCHMARKS.md quotes run, and count what they claim to count."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mamlpp.bench import SyntheticTasks
from mamlpp.presets import resolve
from mamlpp.trainer import Trainer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["model.filters=4", "inner.steps=2", "outer.meta_batch=2", "train.device=cpu", "train.threads=1"]


def run(script, *args):
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_floor_counts_the_iterations_convolution_flops():
    spec = importlib.util.spec_from_file_location("floor", BENCHMARKS / "floor.py")
    floor = importlib.util.module_from_spec(spec)
    sys.modules["floor"] = floor  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(floor)
    cfg = resolve("omniglot-5w1s-mamlpp-reference", TINY)
    tasks = SyntheticTasks(cfg, torch.device("cpu"), torch.float32)
    report = floor.floor_report(cfg, tasks, torch.device("cpu"), "loop", 0)
    # The per-task loop has no groups, where torch's counter is exact: the same convolution FLOPs.
    trainer = Trainer(resolve("omniglot-5w1s-mamlpp-reference", TINY + ["train.impl=loop", "train.chunk=2"]), tasks,
                      torch.device("cpu"))
    batch = tasks.train_batch(3, 2)
    with FlopCounterMode(display=False) as counter:
        trainer.meta_step(batch, 0)
    conv_flops = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))
    assert abs(report["gflop"] * 1e9 - conv_flops) / conv_flops < 1e-9
    assert report["floor_s"] > 0 and all(r["floor_ms"] <= r["alone_us"]["as-run"] * r["calls"] / 1e3 for r in report["rows"])


def test_floor_and_precision_scripts_run_from_the_command_line():
    floor = run("floor.py", "omniglot-5w1s-mamlpp-reference", *TINY, "--synthetic", "--json")
    assert floor["impl"] == "parallel" and floor["rows"] and floor["wall_seconds"] > 0
    assert {r["best"] for r in floor["rows"]} <= {"as-run", "nchw", "cl", "per-group"}
    precision = run("precision.py", "omniglot-5w1s-mamlpp-reference", *TINY, "--synthetic", "--batches", "1", "--json")
    assert set(precision["median"]) == {"float32", "bf16"}
    assert 0 < precision["median"]["float32"] < 1

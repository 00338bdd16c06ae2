"""`mamlpp bench`: time full meta-training iterations and evaluation passes of a preset.

A timed iteration is what training does: forward through the inner loop, the meta-backward and the
optimiser step, on task batches sampled beforehand (sampling is timed on its own). Peak memory is
CUDA's max allocated on a GPU and the process's peak resident set size during the path on a CPU.
With impl=both, both paths run in one process on the same batches and the ratio is printed.
Under torchrun the parallel path runs data-parallel over the tasks as training does (each process its
share, gradients all-reduced); rank 0 reports, with its own peak memory and all processes' together.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import threading
import time

import torch

from .config import METHODS, Config, ConfigError
from .distributed import Dist
from .schedules import second_order_at
from .trainer import Trainer


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Peak memory over a block: CUDA max allocated, or sampled process RSS on a CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0.0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/statm"):
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_mb())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_path(cfg: Config, tasks, device: torch.device, impl: str, iters: int, warmup: int,
               epoch: int = 0, eval_tasks: int | None = None, dist: Dist = Dist()) -> dict:
    """Time one implementation ('parallel' or 'loop') of a preset on this device (under torchrun: this
    process's share of the parallel path)."""
    # The loop is the reference-style baseline: one graph for the whole meta-batch, as the reference keeps.
    if impl == "loop" and not METHODS.get(cfg.method.name).loop_oracle:
        raise ConfigError(f"--impl {impl}: method.name={cfg.method.name} has no per-task loop; use --impl parallel")
    if impl == "loop" and dist.active:
        raise ConfigError("--impl loop is the one-process baseline; run it without torchrun")
    chunk = cfg.outer.meta_batch if impl == "loop" else cfg.train.chunk
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, impl=impl, chunk=chunk))
    B = cfg.outer.meta_batch
    t0 = time.perf_counter()
    batches = [tasks.train_batch(i, B) for i in range(warmup + iters)]
    _sync(device)
    sample_seconds = (time.perf_counter() - t0) / len(batches)
    trainer = Trainer(cfg, tasks, device, dist)
    with trainer.threads() as threads:  # the thread count a run of this preset would use
        return _time(trainer, cfg, batches, device, impl, B, iters, warmup, epoch, sample_seconds, eval_tasks, threads)


def _time(trainer: Trainer, cfg: Config, batches: list, device: torch.device, impl: str, B: int, iters: int,
          warmup: int, epoch: int, sample_seconds: float, eval_tasks: int | None, threads: str) -> dict:
    times = []
    with PeakMemory(device) as memory:
        for i, batch in enumerate(batches):
            _sync(device)
            start = time.perf_counter()
            trainer.meta_step(batch, epoch)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    result = {
        "impl": impl, "preset": cfg.name, "method": cfg.method.name, "meta_batch": B, "ways": cfg.data.ways,
        "shots": cfg.data.shots, "queries": cfg.data.queries, "inner_steps": cfg.inner.steps,
        "filters": cfg.model.filters, "second_order": second_order_at(cfg, epoch),
        "msl": cfg.outer.msl and epoch < cfg.outer.msl_epochs, "dtype": cfg.train.dtype,
        "precision": cfg.train.precision, "iters": iters, "chunk": cfg.train.chunk,
        "seconds_per_iter_median": statistics.median(times), "seconds_per_iter_min": min(times),
        "seconds_per_iter_max": max(times), "tasks_per_second": B / statistics.median(times),
        "sampling_seconds_per_iter": sample_seconds, "peak_memory_mb": round(memory.peak, 1),
        "device_name": device_name(device), "torch_version": torch.__version__, "threads": threads,
        "processes": trainer.dist.world,
        # every process's peak added up (resident sets: the library pages they share count once each)
        "peak_memory_mb_all": round(trainer.dist.all_reduce_flat([torch.tensor([memory.peak], dtype=torch.float64, device=device)])[0].item(), 1),
    }
    if eval_tasks:
        trainer.evaluate("val", num_tasks=min(eval_tasks, 8))  # warm-up
        _sync(device)
        start = time.perf_counter()
        trainer.evaluate("val", num_tasks=eval_tasks)
        _sync(device)
        result["eval_tasks"], result["eval_seconds"] = eval_tasks, time.perf_counter() - start
    return result


def format_result(r: dict) -> str:
    text = (f"{r['impl']:>8}: {r['seconds_per_iter_median'] * 1e3:9.1f} ms/iter (min {r['seconds_per_iter_min'] * 1e3:.1f}, "
            f"max {r['seconds_per_iter_max'] * 1e3:.1f}), {r['tasks_per_second']:.1f} tasks/s, "
            f"peak {r['peak_memory_mb']:.0f} MB, sampling {r['sampling_seconds_per_iter'] * 1e3:.2f} ms/iter")
    if "eval_seconds" in r:
        text += f", {r['eval_tasks']} eval tasks in {r['eval_seconds']:.2f} s"
    return text


class SyntheticTasks:
    """Random episodes with a preset's shapes, for timing where the data set is not on disk
    (no Mini-ImageNet images on these machines). Same tensor shapes and dtypes as the real sampler."""

    kind = "classification"

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype):
        d = cfg.data
        size = d.image_size or {"omniglot": 28, "cifar_fs": 32, "fc100": 32}.get(d.dataset, 84)
        channels = d.channels or (1 if d.dataset == "omniglot" else 3)
        self.input_shape, self.num_outputs = (channels, size, size), d.ways
        self.cfg, self.device, self.dtype = cfg, device, dtype

    def _tasks(self, first: int, count: int, ways: int, queries: int) -> dict[str, torch.Tensor]:
        d, g = self.cfg.data, torch.Generator().manual_seed(first)
        labels = lambda per: torch.arange(ways).repeat_interleave(per).repeat(count, 1).to(self.device)
        images = lambda per: torch.rand(count, ways * per, *self.input_shape, generator=g).to(self.device, self.dtype)
        return {"xs": images(d.shots), "ys": labels(d.shots), "xq": images(queries), "yq": labels(queries)}

    def train_batch(self, iteration: int, batch_size: int):
        d = self.cfg.data
        return self._tasks(iteration * batch_size, batch_size, d.train_ways or d.ways, d.train_queries or d.queries)

    def eval_batch(self, split: str, first: int, count: int):
        return self._tasks(10**9 + first, count, self.cfg.data.ways, self.cfg.data.queries)


def cmd_bench(args) -> int:
    from .distributed import init_from_env, shutdown
    from .presets import resolve

    cfg = resolve(args.preset, args.overrides)
    dist, device = init_from_env(cfg.train.device)
    clean = False
    try:
        code = _bench(args, cfg, dist, device)
        clean = True
        return code
    finally:
        shutdown(clean)


def _bench(args, cfg: Config, dist: Dist, device: torch.device) -> int:
    import json

    from .data import build_tasks

    dtype = getattr(torch, cfg.train.dtype)
    tasks = SyntheticTasks(cfg, device, dtype) if args.synthetic else build_tasks(cfg, device, args.data_dir)
    impls = ["parallel", "loop"] if args.impl == "both" else [args.impl]
    results = []
    for impl in impls:
        r = bench_path(cfg, tasks, device, impl, args.iters, args.warmup, args.epoch, args.eval_tasks, dist)
        r["data"] = "synthetic" if args.synthetic else cfg.data.dataset
        results.append(r)
        if dist.main:
            print(json.dumps(r) if args.json else format_result(r), flush=True)
    if len(results) == 2 and not args.json:
        ratio = results[1]["seconds_per_iter_median"] / results[0]["seconds_per_iter_median"]
        print(f"parallel is {ratio:.2f}x the speed of the per-task loop ({results[0]['device_name']}, "
              f"torch {results[0]['torch_version']})")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="time meta-training iterations (and evaluation) of a preset",
        description="Times full meta-training iterations (inner loop, meta-backward, Adam step) on pre-sampled "
                    "task batches: median/min/max seconds per iteration, tasks per second, peak memory.")
    p.add_argument("preset")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--impl", choices=["parallel", "loop", "both"], default="parallel")
    p.add_argument("--iters", type=int, default=10, help="timed iterations")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--epoch", type=int, default=0, help="epoch the schedules are at (0: MSL on; DA per preset)")
    p.add_argument("--eval-tasks", type=int, default=0, help="also time one evaluation pass over this many tasks")
    p.add_argument("--synthetic", action="store_true", help="random episodes of the preset's shapes (no data needed)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", action="store_true", help="one JSON object per implementation")
    p.set_defaults(func=cmd_bench)

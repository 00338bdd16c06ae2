"""The outer loop of any method: Adam over the method's meta-parameters, CA or step decay of its
learning rate, the gradient clamp, chunked meta-batches and the share of tasks under torchrun.

What is trained and how a batch of episodes becomes a loss is the method's (methods/); the
Trainer holds the explicit state (params, method state, Adam) and never looks inside it.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path

import torch

from .config import Config, ConfigError
from .distributed import LAUNCH_REASON, Dist, Shard
from .methods import build_method, flatten
from .schedules import meta_lr
from .tasks import TaskSource

# Auto chunks (BENCHMARKS.md). On a CPU, passes over few tasks keep activations near the caches:
# training passes of about 4M activations of the backbone's largest layer (2 tasks of Omniglot
# 20-way 1-shot, 1 of Mini-ImageNet) cut peak memory by 2.5-4x and were as fast or faster than the
# whole meta-batch, and evaluating 4 tasks per pass was twice as fast as 200. On a GPU, or for
# backbones whose activations are small (the sinusoid MLP), big passes win.
CPU_CHUNK_ACTIVATIONS, CPU_EVAL_CHUNK, GPU_EVAL_CHUNK = 2**22, 4, 200
SMALL_ACTIVATIONS = 4096  # per example; below this a backbone is "small"
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"  # "QUOTA PERIOD" of a container's CPU limit, or "max PERIOD"


class Trainer:
    """Holds the explicit training state (params, method state, Adam) and runs meta-updates.

    Under torchrun (`dist`), each process takes its share of every meta-batch's tasks and of the
    evaluation tasks; gradients and method state are all-reduced, results gathered.
    """

    def __init__(self, cfg: Config, tasks: TaskSource, device: torch.device, dist: Dist = Dist(), backbone=None):
        if dist.world > cfg.outer.meta_batch:
            raise ConfigError(f"outer.meta_batch={cfg.outer.meta_batch} is smaller than the {dist.world} processes; "
                              "every process needs at least one task")
        if cfg.train.impl == "loop" and (dist.active or 0 < cfg.train.chunk < cfg.outer.meta_batch):
            raise ConfigError("train.impl=loop is the one-process oracle over whole meta-batches: run it with "
                              "train.chunk=0 and without torchrun, or use train.impl=parallel")
        self.cfg, self.tasks, self.device, self.dist = cfg, tasks, device, dist
        self.dtype = getattr(torch, cfg.train.dtype)
        self.method = build_method(cfg, tasks.kind, tasks.input_shape, tasks.num_outputs, backbone)
        generator = torch.Generator().manual_seed(cfg.train.seed)
        self.params, self.state = self.method.init(generator, self.dtype, device)
        self.optimizer = torch.optim.Adam(self.method.trainable(self.params), lr=cfg.outer.lr,
                                          betas=tuple(cfg.outer.betas))
        self.clamped = self.method.clamped(self.params)
        self.activations = self.method.activation_elements()  # per example, largest layer
        if cfg.train.precision == "bf16":
            require_bf16(device)

    def precision(self):
        return mixed_precision(self.cfg.train.precision, self.device)

    @contextlib.contextmanager
    def threads(self):
        """torch's intra-op threads for this workload while a block runs (restored after); yields what
        was chosen and why. On a CPU: train.threads, else one thread for a small network."""
        previous = torch.get_num_threads()
        if self.device.type != "cpu":
            chosen = None, "n/a (not a CPU)"
        elif self.cfg.train.threads:
            chosen = self.cfg.train.threads, f"{self.cfg.train.threads} (train.threads)"
        elif self.dist.active:
            chosen = 1, f"1 (auto: one in each of {self.dist.world} processes)"
        elif self.activations < SMALL_ACTIVATIONS:
            chosen = 1, "1 (auto: a small network)"
        else:
            chosen = None, f"{previous} (auto: torch's default)"
        if chosen[0]:
            torch.set_num_threads(chosen[0])
        try:
            yield chosen[1]
        finally:
            torch.set_num_threads(previous)

    def processes(self) -> tuple[int, str]:
        """CPU processes to split every meta-batch over, and why (train.processes; 0: auto). Auto takes
        one single-thread process per core when several tasks fit in one pass: on two cores, two
        processes were 1.23x (Omniglot 20w1s) and 1.19x (5w1s) faster than two threads, which wait on
        each other in every small operation; a task that fills a pass alone (Mini-ImageNet) was 1.10x
        faster on two threads (BENCHMARKS.md, "Processes or threads"; more cores are not measured)."""
        t = self.cfg.train
        if self.dist.active:
            return self.dist.world, os.environ.get(LAUNCH_REASON, "torchrun")
        if t.processes:
            return t.processes, "train.processes"
        if self.device.type != "cpu":
            return 1, "auto: not a CPU"
        if t.impl == "loop":
            return 1, "auto: the per-task loop runs in one process"
        if not sys.platform.startswith("linux"):
            return 1, "auto: processes are chosen on Linux only"
        if self.activations < SMALL_ACTIVATIONS:
            return 1, "auto: a small network"
        if t.threads:
            return 1, "auto: train.threads is set"
        per_pass = t.chunk or self._tasks_per_pass(self.tasks.train_batch(0, 1))
        if per_pass < 2:
            return 1, "auto: one task per pass, intra-op threads share it"
        cores = available_cores()
        world = min(cores, self.cfg.outer.meta_batch)
        if world < 2:
            return 1, "auto: one core" if cores < 2 else "auto: one task per meta-batch"
        return world, f"auto: {per_pass} tasks fit in a pass, one process per core"

    def meta_step(self, episodes: dict, epoch: int) -> dict[str, torch.Tensor]:
        """One meta-update on a batch of tasks. Metrics stay on the device (no host sync)."""
        lr = meta_lr(self.cfg, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics, self.state = self._backward(episodes, epoch)
        if self.dist.active:
            self.dist.all_reduce_grads(self.optimizer.param_groups[0]["params"])
            names = list(metrics)
            summed = self.dist.all_reduce_flat([loss, *metrics.values(), *self.state.values()])
            loss, metrics = summed[0], dict(zip(names, summed[1:1 + len(names)]))
            self.state = dict(zip(self.state, summed[1 + len(names):]))
        if self.cfg.outer.grad_clamp is not None:
            c = self.cfg.outer.grad_clamp
            for p in self.clamped:
                if p.grad is not None:
                    p.grad.clamp_(-c, c)
        if self.cfg.outer.grad_norm_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.clamped, self.cfg.outer.grad_norm_clip)
        self.optimizer.step()
        metrics["meta_loss"] = loss
        return metrics

    def _auto_chunk(self, tasks: int, episodes: dict) -> int:
        if self.cfg.train.impl == "loop" or self.device.type == "cuda" or self.activations < SMALL_ACTIVATIONS:
            return tasks
        return max(1, self._tasks_per_pass(episodes))

    def _tasks_per_pass(self, episodes: dict) -> int:
        """Tasks of these episodes' size that a CPU pass of CPU_CHUNK_ACTIVATIONS holds (0: not one)."""
        return CPU_CHUNK_ACTIVATIONS // ((episodes["xs"].shape[1] + episodes["xq"].shape[1]) * self.activations)

    def _backward(self, episodes: dict, epoch: int):
        """Backward over this process's share of the meta-batch, `chunk` tasks per pass (one graph alive
        at a time), gradients accumulating: (loss, metrics, state) of the share, to be summed over
        processes. Each pass is a Shard of the whole meta-batch: its loss is its part of the meta-loss,
        its metrics weighted by its part of the tasks, its state what it adds (the first part of the
        meta-batch also carries the old state).

        Randomness: one seed per meta-batch from the global generator (checkpointed, the same in every
        process). Numbers drawn for the whole meta-batch come from a generator started from it in every
        pass (Shard.generator), the same for a task however the batch is split; what a pass draws for
        itself alone (DropBlock masks, Matching Nets' support shuffles) comes from the global generator
        seeded per pass, so passes never repeat each other's draws; afterwards the global generator is
        seeded from the meta-batch's seed, so every process leaves the step in the same state."""
        total = episodes["xs"].shape[0]
        lo, hi = self.dist.share(total)
        chunk = self.cfg.train.chunk or self._auto_chunk(hi - lo, episodes)
        seed = int(torch.randint(2**62, ()))
        losses, metrics, state = [], {}, None
        for first in range(lo, hi, chunk):
            last = min(first + chunk, hi)
            torch.manual_seed(seed + 1 + first)
            part = {k: v[first:last] for k, v in episodes.items()}
            shard = Shard(offset=first, total=total, carry=first == 0, generator=torch.Generator().manual_seed(seed))
            with self.precision():
                part_loss, part_metrics, part_state = self.method.meta_loss(self.params, self.state, part, epoch, shard)
            part_loss.backward()
            losses.append(part_loss.detach())
            for k, v in part_metrics.items():
                metrics[k] = metrics.get(k, 0.0) + v * ((last - first) / total)
            state = part_state if state is None else {k: state[k] + v for k, v in part_state.items()}
        torch.manual_seed(seed + 1 + total)
        return sum(losses[1:], losses[0]), metrics, state

    def state_dict(self) -> dict:
        """Everything a resumed run needs, as tensors and plain numbers (loads with weights_only)."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"params": {k: v.detach().clone() for k, v in flatten(self.params).items()},
                "state": {k: v.clone() for k, v in self.state.items()},
                "optimizer": self.optimizer.state_dict(), "rng": rng}

    def load_state_dict(self, ckpt: dict) -> None:
        flat = flatten(self.params)
        if set(ckpt["params"]) != set(flat):
            raise RuntimeError(f"checkpoint parameters {sorted(ckpt['params'])} do not match the model's {sorted(flat)}")
        with torch.no_grad():
            for k, v in flat.items():
                v.copy_(ckpt["params"][k])
        self.state = {k: v.to(self.device) for k, v in ckpt["state"].items()}
        self.optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["cpu"].cpu())
        if "cuda" in ckpt["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu(), self.device)

    def evaluate_tasks(self, split: str, num_tasks: int | None = None, **predict_options) -> dict:
        """Per-task results on the fixed tasks of a split, `eval_chunk` tasks per batched pass:
        {"loss": [T], "accuracy": [T] (classification), "output": [T, n, ...], "target": [T, n, ...]}.
        predict_options go to the method's predict (MAML: steps=...)."""
        num_tasks = num_tasks or self.cfg.train.eval_tasks
        few = self.device.type == "cpu" and self.activations >= SMALL_ACTIVATIONS
        chunk = self.cfg.train.eval_chunk or (CPU_EVAL_CHUNK if few else GPU_EVAL_CHUNK)
        lo, hi = self.dist.share(num_tasks)
        parts = []
        for first in range(lo, hi, chunk):
            episodes = self.tasks.eval_batch(split, first, min(chunk, hi - first))
            with self.precision():
                result = self.method.predict(self.params, self.state, episodes, **predict_options)
            result["target"] = episodes["yq"]
            parts.append(result)
        local = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return {k: self.dist.gather(v, num_tasks) for k, v in local.items()}

    def evaluate(self, split: str, num_tasks: int | None = None, **predict_options) -> dict[str, float]:
        """Mean loss/accuracy and 95% CI over the fixed tasks of a split."""
        result = self.evaluate_tasks(split, num_tasks, **predict_options)
        out = summarise("loss", result["loss"])
        if "accuracy" in result:
            out.update(summarise("accuracy", result["accuracy"]))
        return out


def mixed_precision(precision: str, device: torch.device):
    """The arithmetic of a block: with train.precision=bf16, torch.autocast runs convolutions and matrix
    products in bfloat16 (float32 accumulation) and losses in float32; parameters, inner-loop updates
    and the optimiser stay float32. Second-order gradients are taken inside it too: autocast only
    chooses the dtype of forward ops, and their backward follows those dtypes."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def require_bf16(device: torch.device) -> None:
    """train.precision=bf16 needs native bfloat16 arithmetic; emulated, it would be slower than float32."""
    if device.type == "cuda":
        ok, what = torch.cuda.is_bf16_supported(), f"the GPU {torch.cuda.get_device_name(device)}"
    else:
        ok, what = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported(), "this CPU"
    if not ok:
        raise ConfigError(f"train.precision=bf16: {what} has no native bfloat16 arithmetic (a CPU needs avx512_bf16 "
                          "or AMX, a GPU compute capability 8.0 or later); use train.precision=full")


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):  # no cgroup v2 limit file: the affinity is the limit
        quota, period = Path(CGROUP_CPU_MAX).read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    return cores


def summarise(name: str, per_task: torch.Tensor) -> dict[str, float]:
    """Mean over tasks and its 95% confidence interval, 1.96 * std / sqrt(tasks)."""
    per_task = per_task.double().cpu()
    n = per_task.numel()
    std = per_task.std().item() if n > 1 else 0.0
    return {name: per_task.mean().item(), f"{name}_ci95": 1.96 * std / math.sqrt(n), "num_tasks": n}

"""The outer loop of any method: Adam over the method's meta-parameters, CA or step decay of its
learning rate, the gradient clamp, chunked meta-batches and the share of tasks under torchrun.

What is trained and how a batch of episodes becomes a loss is the method's (methods/); the
Trainer holds the explicit state (params, method state, Adam) and never looks inside it.
"""
from __future__ import annotations

import contextlib
import math

import torch

from .config import Config, ConfigError
from .distributed import Dist, Shard
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


class Trainer:
    """Holds the explicit training state (params, method state, Adam) and runs meta-updates.

    Under torchrun (`dist`), each process takes its share of every meta-batch's tasks and of the
    evaluation tasks; gradients and method state are all-reduced, results gathered.
    """

    def __init__(self, cfg: Config, tasks: TaskSource, device: torch.device, dist: Dist = Dist(), backbone=None):
        if dist.world > cfg.outer.meta_batch:
            raise ConfigError(f"outer.meta_batch={cfg.outer.meta_batch} is smaller than the {dist.world} processes; "
                              "every process needs at least one task")
        if dist.active and cfg.train.chunk:
            raise ConfigError("train.chunk splits the meta-batch within one process; under torchrun leave it at 0 "
                              "(each process already holds only its share of the tasks)")
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

    def meta_step(self, episodes: dict, epoch: int) -> dict[str, torch.Tensor]:
        """One meta-update on a batch of tasks. Metrics stay on the device (no host sync)."""
        lr = meta_lr(self.cfg, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        shard = Shard()
        if self.dist.active:
            total = self.cfg.outer.meta_batch
            lo, hi = self.dist.share(total)
            episodes = {k: v[lo:hi] for k, v in episodes.items()}
            shard = Shard(offset=lo, total=total, all_reduce=self.dist.all_reduce)
        tasks = episodes["xs"].shape[0]
        chunk = self.cfg.train.chunk or self._auto_chunk(tasks, episodes)
        if chunk >= tasks:
            with self.precision():
                loss, metrics, self.state = self.method.meta_loss(self.params, self.state, episodes, epoch, shard)
            loss.backward()
        else:  # chunked meta-batch: one graph alive at a time, the same gradients
            loss, metrics = self._chunked_backward(episodes, epoch, chunk)
        if self.dist.active:
            self.dist.all_reduce_grads(self.optimizer.param_groups[0]["params"])
            share = (hi - lo) / total  # metrics are local means: weight them by the share of tasks
            for k in metrics:
                metrics[k] = metrics[k] * share
                self.dist.all_reduce(metrics[k])
            loss = loss.detach().clone()
            self.dist.all_reduce(loss)
        if self.cfg.outer.grad_clamp is not None:
            c = self.cfg.outer.grad_clamp
            for p in self.clamped:
                if p.grad is not None:
                    p.grad.clamp_(-c, c)
        if self.cfg.outer.grad_norm_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.clamped, self.cfg.outer.grad_norm_clip)
        self.optimizer.step()
        metrics["meta_loss"] = loss.detach()
        return metrics

    def _auto_chunk(self, tasks: int, episodes: dict) -> int:
        if self.dist.active or self.device.type == "cuda" or self.activations < SMALL_ACTIVATIONS:
            return tasks
        per_task = (episodes["xs"].shape[1] + episodes["xq"].shape[1]) * self.activations
        return max(1, CPU_CHUNK_ACTIVATIONS // per_task)

    def _chunked_backward(self, episodes: dict, epoch: int, chunk: int):
        """Backward over `chunk` tasks at a time, gradients accumulating. A mean over tasks becomes a
        sum of chunk means weighted by their share; the method state threads through the chunks in
        task order, which for BNRS is exactly the reference's sequential update."""
        tasks = episodes["xs"].shape[0]
        mean = self.cfg.outer.task_reduction == "mean"
        loss, metrics = 0.0, {}
        for lo in range(0, tasks, chunk):
            part = {k: v[lo:lo + chunk] for k, v in episodes.items()}
            share = part["xs"].shape[0] / tasks
            with self.precision():
                part_loss, part_metrics, self.state = self.method.meta_loss(self.params, self.state, part, epoch)
            part_loss = part_loss * share if mean else part_loss
            part_loss.backward()
            loss = loss + part_loss.detach()
            for k, v in part_metrics.items():
                metrics[k] = metrics.get(k, 0.0) + v * share
        return loss, metrics

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


def summarise(name: str, per_task: torch.Tensor) -> dict[str, float]:
    """Mean over tasks and its 95% confidence interval, 1.96 * std / sqrt(tasks)."""
    per_task = per_task.double().cpu()
    n = per_task.numel()
    std = per_task.std().item() if n > 1 else 0.0
    return {name: per_task.mean().item(), f"{name}_ci95": 1.96 * std / math.sqrt(n), "num_tasks": n}

"""Sinusoid regression (MAML paper, section 5.1): a task family that needs no download.

Task: y = A sin(x - phase) with A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]; K support and
T query points. Each task is drawn from its own generator seeded by (seed, split, task index),
so the training stream resumes exactly and the held-out tasks never change.
"""
from __future__ import annotations

import math

import torch

from .config import DataConfig
from .tasks import task_seed

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)


class SinusoidTasks:
    kind = "regression"
    input_shape = (1,)
    num_outputs = 1

    def __init__(self, cfg: DataConfig, seed: int, device: torch.device, dtype: torch.dtype):
        self.shots, self.queries = cfg.shots, cfg.queries
        self.seed, self.device, self.dtype = seed, device, dtype

    def _tasks(self, split: str, first: int, count: int) -> dict[str, torch.Tensor]:
        points = self.shots + self.queries
        x = torch.empty(count, points, 1, dtype=torch.float64)
        y = torch.empty_like(x)
        for b in range(count):
            g = torch.Generator().manual_seed(task_seed(self.seed, split, first + b))
            amp, phase = torch.rand(2, generator=g, dtype=torch.float64)
            amp = AMPLITUDE[0] + (AMPLITUDE[1] - AMPLITUDE[0]) * amp
            phase = PHASE[0] + (PHASE[1] - PHASE[0]) * phase
            x[b] = X_RANGE[0] + (X_RANGE[1] - X_RANGE[0]) * torch.rand(points, 1, generator=g, dtype=torch.float64)
            y[b] = amp * torch.sin(x[b] - phase)
        x, y = x.to(self.device, self.dtype), y.to(self.device, self.dtype)
        k = self.shots
        return {"xs": x[:, :k], "ys": y[:, :k], "xq": x[:, k:], "yq": y[:, k:]}

    def train_batch(self, iteration: int, batch_size: int) -> dict[str, torch.Tensor]:
        return self._tasks("train", iteration * batch_size, batch_size)

    def eval_batch(self, split: str, first: int, count: int) -> dict[str, torch.Tensor]:
        return self._tasks(split, first, count)

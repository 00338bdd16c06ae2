"""What the meta-learner consumes: batches of tasks ("episodes"), and where they come from.

An episode batch is a dict of tensors with a leading task axis B, already on the training device:
  xs: support inputs  [B, N*K, *input_shape]   (float)
  ys: support targets [B, N*K]  int64 labels, class-major (label j for rows j*K .. j*K+K-1)
                      or [B, K, 1] float targets for regression
  xq: query inputs    [B, N*T, *input_shape]
  yq: query targets   [B, N*T] (or [B, T, 1] for regression)
Every source is deterministic per (seed, split, task index), so the training stream resumes
exactly and the validation/test tasks are the same fixed set every time.
"""
from __future__ import annotations

import hashlib
from typing import Literal, Protocol

import torch


Episodes = dict[str, torch.Tensor]


class TaskSource(Protocol):
    kind: Literal["classification", "regression"]
    input_shape: tuple[int, ...]  # (C, H, W) for images, (features,) for regression
    num_outputs: int  # N ways, or output dimension for regression

    def train_batch(self, iteration: int, batch_size: int) -> Episodes:
        """Tasks iteration*batch_size .. (iteration+1)*batch_size-1 of the training stream."""

    def eval_batch(self, split: Literal["val", "test"], first: int, count: int) -> Episodes:
        """Tasks first .. first+count-1 of the fixed validation or test set."""


def task_seed(seed: int, split: str, index: int) -> int:
    """Seed of one task. The training stream follows train.seed; validation and test tasks are a
    fixed set whatever the seed (like the reference's fixed val seed), drawn independently of it."""
    key = f"{seed}/train/{index}" if split == "train" else f"fixed/{split}/{index}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1

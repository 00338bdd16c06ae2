"""The method interface: what the trainer, evaluation, bench, distributed training and the report
need from a few-shot algorithm, and nothing else.

A method is a class registered with `@METHODS.register(name)` (the name is `method.name`). The
trainer builds it once per run, `method = Method(cfg, kind, input_shape, num_outputs)`, and then only
calls the functions below, each over explicit tensors: parameters `params` ({group: {name: tensor}},
e.g. {"net": ..., "bn": ..., "lr": ...}) and state `state` ({name: tensor}, e.g. batch-norm running
statistics or a memory) go in, new state comes out, nothing is stored in the object or mutated.
That is what lets checkpoints, exact resume, chunked meta-batches and torchrun work for every method.

Episodes are the dict of tensors that tasks.py documents: xs [B, N*K, ...], ys [B, N*K], xq, yq.
"""
from __future__ import annotations

import torch

from ..config import Config, ConfigError, MethodConfig
from ..distributed import Shard
from ..network import Backbone

Tree = dict[str, torch.Tensor]
Params = dict[str, Tree]


class Method:
    """A few-shot algorithm behind the interface this module describes (register subclasses with
    `@METHODS.register(name)`)."""

    name: str  # set by METHODS.register
    Options: type[MethodConfig] = MethodConfig  # the `method.*` config section; subclass to add options
    kinds: tuple[str, ...] = ("classification",)  # task kinds it handles (tasks.py: classification, regression)
    backbones: tuple[str, ...] | None = None  # model.arch values it accepts; None: every registered backbone
    loop_oracle = False  # has a per-task loop implementation (train.impl=loop) to test the parallel path against
    takes_backbone = True  # False: the method's networks are its own (a custom backbone is refused)
    backbone: "Backbone | None" = None  # built in __init__ by methods that use one

    def __init__(self, cfg: Config, kind: str, input_shape: tuple[int, ...], num_outputs: int, backbone=None):
        """backbone: a factory to build instead of the registered model.arch (usermodule.ModuleBackbone)."""
        if backbone is not None and not self.takes_backbone:
            raise ConfigError(f"method.name={self.name} uses networks of its own; it takes no backbone of yours")
        self.cfg, self.kind, self.input_shape, self.num_outputs = cfg, kind, input_shape, num_outputs
        self.custom_backbone = backbone

    @classmethod
    def check(cls, cfg: Config, backbone) -> None:
        """Raise ConfigError for a config this method cannot run, naming the keys (config.validate
        calls it). Subclasses extend it with their own rules."""
        if cls.backbones is not None and backbone.name not in cls.backbones:
            raise ConfigError(f"method.name={cls.name} accepts model.arch={' or '.join(cls.backbones)}, "
                              f"not model.arch={backbone.name}")
        kind = "regression" if cfg.data.dataset == "sinusoid" else "classification"
        if kind not in cls.kinds:
            raise ConfigError(f"method.name={cls.name} does {' and '.join(cls.kinds)}, and data.dataset="
                              f"{cfg.data.dataset} is {kind}")
        if cfg.train.impl == "loop" and not cls.loop_oracle:
            raise ConfigError(f"train.impl=loop: method.name={cls.name} has no per-task loop; use train.impl=parallel")

    def activation_elements(self) -> int:
        """Elements of the largest activation of one example: the trainer sizes its CPU chunks from it."""
        return self.backbone.activation_elements if self.backbone is not None else 0

    def init(self, generator: torch.Generator, dtype: torch.dtype, device) -> tuple[Params, Tree]:
        """(params, state) at the start of training, drawn from `generator` only (deterministic)."""
        raise NotImplementedError

    def trainable(self, params: Params) -> list[torch.Tensor]:
        """The tensors the meta-optimiser trains (every one of them by default)."""
        return [t for tree in params.values() for t in tree.values()]

    def clamped(self, params: Params) -> list[torch.Tensor]:
        """The tensors whose gradients outer.grad_clamp clamps (by default those it trains)."""
        return self.trainable(params)

    def meta_loss(self, params: Params, state: Tree, episodes: dict, epoch: int,
                  shard: Shard = Shard()) -> tuple[torch.Tensor, dict[str, torch.Tensor], Tree]:
        """Training loss of a batch of episodes: (loss, metrics, new_state).

        The episodes are one part of a meta-batch (shard: a chunk of tasks, of this process's share).
        loss = shard.combine(per-task losses, cfg.outer.task_reduction): the part's share of a sum or
        mean over the whole meta-batch, so the parts' losses sum to it. new_state: with shard.carry,
        the given state updated by the part's tasks; without, only what the part adds to it (zeros
        where it adds nothing), as the trainer sums the parts' states. metrics: detached scalar tensors,
        means over the part's tasks, at least "loss" and, for classification, "accuracy" (no host sync).
        """
        raise NotImplementedError

    def predict(self, params: Params, state: Tree, episodes: dict) -> dict[str, torch.Tensor]:
        """Evaluation of many tasks at once, no meta-graph, state unchanged. Per task:
        {"loss": [B], "output": [B, n, ...], "accuracy": [B] (classification)}. "output" is logits:
        unnormalised log-probabilities, which the test protocol averages over checkpoints."""
        raise NotImplementedError

    # ---- adaptation apart from prediction (the Python API's Learner.adapt / Learner.predict) ----------
    def adapt(self, params: Params, state: Tree, xs: torch.Tensor, ys: torch.Tensor) -> Tree:
        """What a task keeps of its support set xs [B, N*K, ...], ys [B, N*K]: fast weights, embeddings.
        By default the support set itself, which `apply` hands to `predict` with the queries."""
        return {"xs": xs, "ys": ys}

    def apply(self, params: Params, state: Tree, fast: Tree, xq: torch.Tensor) -> torch.Tensor:
        """Logits [B, n, ...] of queries xq [B, n, ...] given what `adapt` returned."""
        labels = torch.zeros(xq.shape[:2], dtype=torch.int64, device=xq.device)  # unused by the output
        output: torch.Tensor = self.predict(params, state, {**fast, "xq": xq, "yq": labels})["output"]
        return output


def task_uniforms(shard: Shard, tasks: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """U[0, 1) numbers [tasks, width] for the part's tasks of a meta-batch, `width` per task, on like's
    device and dtype. Methods that sample within an episode (pairs, distortions, dropout) take their
    randomness here.

    The draw is made for the whole meta-batch (shard.total tasks) from the meta-batch's generator
    (shard.generator: the trainer starts it from the same seed, drawn from the checkpointed global
    generator, in every part) and the part's rows are kept, so each task gets the same numbers
    however the meta-batch is split into chunks and processes.
    """
    total = shard.total or tasks
    u = torch.rand(total, width, generator=shard.generator, dtype=like.dtype)
    return u[shard.offset: shard.offset + tasks].to(like.device)


def flatten(params: Params) -> dict[str, torch.Tensor]:
    """{'net': {'conv0.weight': t}, 'lr': {...}} -> {'net.conv0.weight': t, 'lr.conv0.weight': ...}"""
    return {f"{group}.{name}": t for group, tree in params.items() for name, t in tree.items()}


def leaves(params: Params) -> Params:
    """params with every tensor made a leaf that requires grad (what the meta-optimiser updates)."""
    for tree in params.values():
        for tensor in tree.values():
            tensor.requires_grad_(True)
    return params

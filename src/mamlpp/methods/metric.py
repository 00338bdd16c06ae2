"""Metric methods: one embedding network for support and query images, and a classifier over the
embeddings; no inner loop, so a meta-batch is simply B episodes at once.

Each episode's support and query images go through the embedding in one pass, as the published code
does, so batch statistics are per episode (the task-folded backbone normalises each task alone).
With model.bnrs the embedding keeps running statistics (one slot), folded in task order exactly as
episodes run one after another would update them; model.bn_eval=running evaluates with them, which
is the published protocol for these methods (network in eval mode at test time).
"""
from __future__ import annotations

import torch

from ..config import Config, ConfigError
from ..distributed import Shard
from ..network import build_backbone, update_running_stats
from ..objective import task_accuracy, task_losses
from .base import Method, leaves


class MetricMethod(Method):
    """Subclasses give `log_probs(params, support, ys, query, ways, training)` -> [B, nq, ways] and,
    optionally, `init_head` for parameters beyond the embedding."""

    def __init__(self, cfg: Config, kind: str, input_shape, num_outputs: int, backbone=None):
        super().__init__(cfg, kind, input_shape, num_outputs, backbone)
        self.backbone = build_backbone(cfg.model, input_shape, 0, 1, backbone)  # no head, one BN slot

    @classmethod
    def check(cls, cfg: Config, backbone) -> None:
        super().check(cfg, backbone)
        for key, on in (("model.bnwb", cfg.model.bnwb), ("outer.msl", cfg.outer.msl),
                        ("train.checkpoint_inner", cfg.train.checkpoint_inner)):
            if on:
                raise ConfigError(f"{key}=true is per inner step; method.name={cls.name} has no inner loop")

    def init_head(self, generator, dtype, device) -> dict:
        return {}

    def init(self, generator, dtype, device):
        params, state = self.backbone.init(generator, dtype, device)
        params.update(self.init_head(generator, dtype, device))
        return leaves(params), state

    def features(self, params, state, x: torch.Tensor, training: bool):
        """Embeddings of images x [B, n, ...] in one pass per task -> ([B, n, d], BN statistics)."""
        net = {k: v.expand(x.shape[0], *v.shape) for k, v in params["net"].items()}  # shared by the tasks
        use_running = not training and self.cfg.model.bn_eval == "running"
        return self.backbone.forward(net, params["bn"], state, x, 0, use_running, training and bool(state),
                                     training=training)

    def embed(self, params, state, episodes: dict, training: bool):
        """(support [B, ns, d], query [B, nq, d], BN statistics of the pass)."""
        xs, xq = episodes["xs"], episodes["xq"]
        feats, stats = self.features(params, state, torch.cat([xs, xq], 1), training)
        return feats[:, : xs.shape[1]], feats[:, xs.shape[1]:], stats

    def adapt(self, params, state, xs, ys):
        """The support embeddings and labels. Support and queries are embedded in separate passes, which
        is what `predict` computes when batch norm uses running statistics (model.bn_eval=running)."""
        with torch.no_grad():
            support, _, _ = self.embed(params, state, {"xs": xs, "xq": xs[:, :0]}, training=False)
        return {"support": support, "ys": ys}

    def apply(self, params, state, fast, xq):
        ways = fast["ys"].shape[1] // self.cfg.data.shots
        with torch.no_grad():
            _, query, _ = self.embed(params, state, {"xs": xq[:, :0], "xq": xq}, training=False)
            return self.log_probs(params, fast["support"], fast["ys"], query, ways, training=False)

    def _scores(self, params, state, episodes, training: bool):
        support, query, stats = self.embed(params, state, episodes, training)
        ways = episodes["xs"].shape[1] // self.cfg.data.shots  # train_ways in training, ways in evaluation
        return self.log_probs(params, support, episodes["ys"], query, ways, training), stats

    def meta_loss(self, params, state, episodes, epoch, shard: Shard = Shard()):
        out, stats = self._scores(params, state, episodes, training=True)
        losses = task_losses("classification", out, episodes["yq"])
        loss = shard.combine(losses, self.cfg.outer.task_reduction)
        new_state = update_running_stats(state, [(0, stats)], self.cfg.model.bn_momentum, shard) if state else state
        with torch.no_grad():
            metrics = {"loss": losses.mean(), "accuracy": task_accuracy(out, episodes["yq"]).mean()}
        return loss, metrics, new_state

    def predict(self, params, state, episodes):
        with torch.no_grad():
            out, _ = self._scores(params, state, episodes, training=False)
        return {"loss": task_losses("classification", out, episodes["yq"]), "output": out,
                "accuracy": task_accuracy(out, episodes["yq"])}

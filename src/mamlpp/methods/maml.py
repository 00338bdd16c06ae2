"""MAML and MAML++ (with each of the six fixes switchable) and Meta-SGD, as one method.

The parts live where the paper's ideas live: the inner loop and LSLR / Meta-SGD rates in inner.py,
the meta-objective with MSL, DA and BNRS in objective.py, BNWB and BNRS in network.py, MSL / DA / CA
schedules in schedules.py, and the per-task oracle (train.impl=loop) in loop.py. This class only
binds them to the method interface.
"""
from __future__ import annotations

from ..config import METHODS, Config, ConfigError
from ..distributed import Shard
from ..inner import init_rates
from ..loop import evaluate_loop, meta_loss_loop
from ..network import build_backbone
from ..objective import adapt, evaluate, meta_loss, query_output
from .base import Method, leaves


@METHODS.register("maml")
class MAML(Method):
    kinds = ("classification", "regression")
    loop_oracle = True

    def __init__(self, cfg: Config, kind: str, input_shape, num_outputs: int, backbone=None):
        super().__init__(cfg, kind, input_shape, num_outputs, backbone)
        self.backbone = build_backbone(cfg.model, input_shape, num_outputs, cfg.inner.steps, backbone)
        loop = cfg.train.impl == "loop"
        if loop and backbone is not None:
            raise ConfigError("train.impl=loop is the oracle for the built-in backbones; a ModuleBackbone runs "
                              "with train.impl=parallel")
        self._meta_loss = meta_loss_loop if loop else meta_loss
        self._evaluate = evaluate_loop if loop else evaluate

    @classmethod
    def check(cls, cfg: Config, backbone) -> None:
        super().check(cfg, backbone)
        if cfg.data.train_ways not in (0, cfg.data.ways):
            raise ConfigError(f"data.train_ways={cfg.data.train_ways}: MAML's output layer has data.ways="
                              f"{cfg.data.ways} units, so it trains and tests at the same way (leave it 0)")
        if cfg.train.checkpoint_inner and cfg.train.impl == "loop":
            raise ConfigError("train.checkpoint_inner=true checkpoints the task-parallel path; the per-task loop "
                              "(train.impl=loop) is the oracle that keeps its whole graph: use train.impl=parallel")
        lo_hi = cfg.inner.lr_range
        if lo_hi and (cfg.inner.lr_mode != "metasgd" or len(lo_hi) != 2 or not lo_hi[0] <= lo_hi[1]):
            raise ConfigError(f"inner.lr_range={lo_hi}: expected two values lo,hi (lo <= hi) with "
                              "inner.lr_mode=metasgd, or nothing")

    def init(self, generator, dtype, device):
        params, state = self.backbone.init(generator, dtype, device)
        params["lr"] = init_rates(params["net"], self.cfg.inner, generator)
        return leaves(params), state

    def trainable(self, params):
        groups = ("net", "bn") if self.cfg.inner.lr_mode == "fixed" else ("net", "bn", "lr")
        return [t for g in groups for t in params[g].values()]

    def clamped(self, params):
        # The reference clamps the classifier's gradients (conv, linear, BN), not the LSLR rates.
        return [t for g in ("net", "bn") for t in params[g].values()]

    def meta_loss(self, params, state, episodes, epoch, shard=Shard()):
        return self._meta_loss(self.backbone, params, state, episodes, self.cfg, epoch, self.kind, shard)

    def predict(self, params, state, episodes, steps: int | None = None):
        """`steps` inner steps (default inner.test_steps; 0: the meta-initialisation unadapted)."""
        return self._evaluate(self.backbone, params, state, episodes, self.cfg, self.kind, steps)

    def adapt(self, params, state, xs, ys, steps: int | None = None):
        steps = self.cfg.inner.test_steps if steps is None else steps
        return adapt(self.backbone, params, state, xs, ys, self.cfg, self.kind, steps)

    def apply(self, params, state, fast, xq, steps: int | None = None):
        steps = self.cfg.inner.test_steps if steps is None else steps
        return query_output(self.backbone, params, state, fast, xq, self.cfg, steps)

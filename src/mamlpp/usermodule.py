"""Any torch.nn.Module as MAML's base learner, through torch.func.functional_call.

    backbone = mamlpp.ModuleBackbone(MyNet(), adapt=lambda name: name.startswith("head"))  # ANIL
    mamlpp.train(cfg, out="runs/mine", backbone=backbone)

Parameters chosen by `adapt` (a predicate on parameter names, a list of names, or None for all) are
adapted in the inner loop (params["net"], with LSLR / Meta-SGD rates); the others are meta-learned
only (params["bn"]). The module's BatchNorm layers become mamlpp's batch norm: gamma/beta per inner
step with model.bnwb, running statistics per step in the explicit state with model.bnrs, batch
statistics per task otherwise; nothing is updated in place, and the user's module is not changed
(a copy is used).

Tasks run with torch.func.vmap when the module has no batch norm; with batch norm they run one task
after another, because batch norm in training mode under vmap gave second-order meta-gradients
0.1-0.2% off on torch 2.13 (engineering notes). `batching` says which is used.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .config import BACKBONES, ConfigError, ModelConfig
from .network import BN_EPS, batch_norm

Tree = dict[str, torch.Tensor]


class _StepBatchNorm(nn.Module):
    """Stands in for a BatchNorm layer of the user's module: mamlpp's batch norm with per-step slots,
    reading the current call's parameters from the bound backbone (`_Bound.call`)."""

    def __init__(self, name: str, owner: "_Bound"):
        super().__init__()
        self.layer, self.owner = name, [owner]  # a list: not registered as a submodule

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        c = self.owner[0].call
        out, stats = batch_norm(h, c["bn"], c["state"], self.layer, c["slot"], 1, c["use_running"], c["want_stats"])
        if stats is not None:
            c["stats"].setdefault(self.layer, []).append(stats)
        result: torch.Tensor = out
        return result


class ModuleBackbone:
    """A user's nn.Module as a backbone factory: pass it as `backbone=` to mamlpp.train, evaluate, load
    or Learner (config: model.arch=module). `adapt`: which parameters the inner loop adapts."""

    def __init__(self, module: nn.Module, adapt: Callable[[str], bool] | Iterable[str] | None = None,
                 batching: str = "auto"):
        if batching not in ("auto", "vmap", "loop"):
            raise ValueError(f"batching={batching!r}: expected auto, vmap or loop")
        names = None if adapt is None or callable(adapt) else set(adapt)
        self.module = module
        self.adapt: Callable[[str], bool] = (adapt if callable(adapt) else
                                             (lambda n: True) if names is None else (lambda n: n in names))
        self.batching = batching

    def __call__(self, cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int, bn_slots: int) -> "_Bound":
        return _Bound(self, cfg, input_shape, bn_slots)


class _Bound:
    """The Backbone interface (network.Backbone) over a copy of the user's module."""

    inputs = "any"

    def __init__(self, spec: ModuleBackbone, cfg: ModelConfig, input_shape: tuple[int, ...], bn_slots: int):
        self.cfg, self.bn_slots = cfg, bn_slots
        self.call: dict[str, Any] = {}  # the current forward's bn, state, slot and modes, read by _StepBatchNorm
        self.module = copy.deepcopy(spec.module)
        self.bn_layers = {}
        for name, sub in list(self.module.named_modules()):
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                if sub.eps != BN_EPS:
                    raise ConfigError(f"ModuleBackbone: {name} has eps={sub.eps}; mamlpp's batch norm uses {BN_EPS}")
                self.bn_layers[name] = sub
                parent, _, leaf = name.rpartition(".")
                setattr(self.module.get_submodule(parent) if parent else self.module, leaf, _StepBatchNorm(name, self))
        if spec.batching == "vmap" and self.bn_layers:
            raise ConfigError("ModuleBackbone(batching='vmap'): the module has batch norm, whose second-order "
                              "gradients under vmap are not exact; use batching='auto' or 'loop'")
        self.batching = spec.batching if spec.batching != "auto" else ("loop" if self.bn_layers else "vmap")
        self.adapted = [n for n, _ in self.module.named_parameters() if spec.adapt(n)]
        if not self.adapted:
            raise ConfigError("ModuleBackbone: `adapt` chose no parameter for the inner loop")
        self.features = 0
        self.activation_elements = self._largest_activation(input_shape)

    def _largest_activation(self, input_shape: tuple[int, ...]) -> int:
        sizes = [0]
        hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o[0].numel() if o.dim() > 1 else o.numel()))
                 for m in self.module.modules() if not list(m.children())]
        self.call = {"bn": {f"{n}.{p}": getattr(b, p).detach() for n, b in self.bn_layers.items()
                            for p in ("weight", "bias")},
                     "state": {}, "slot": 0, "use_running": False, "want_stats": False, "stats": {}}
        dtype = next(self.module.parameters()).dtype
        with torch.no_grad():
            self.module(torch.zeros(2, *input_shape, dtype=dtype))
        for h in hooks:
            h.remove()
        return max(sizes)

    def init(self, generator: torch.Generator, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> tuple[dict[str, Tree], Tree]:
        """The user's own initial values (generator unused: the module was initialised by its owner)."""
        own = {n: p.detach().to(device, dtype).clone() for n, p in self.module.named_parameters()}
        net = {n: own[n] for n in self.adapted}
        bn = {n: t for n, t in own.items() if n not in net}
        state: Tree = {}
        for name, layer in self.bn_layers.items():
            for p in ("weight", "bias"):
                value = getattr(layer, p).detach().to(device, dtype)
                bn[f"{name}.{p}"] = value.repeat(self.bn_slots, 1) if self.cfg.bnwb else value.clone()
            if self.cfg.bnrs:
                for key, buffer in (("mean", layer.running_mean), ("var", layer.running_var)):
                    if buffer is None:
                        raise ConfigError(f"ModuleBackbone: {name} keeps no running statistics "
                                          "(track_running_stats=False) but model.bnrs is on")
                    state[f"{name}.{key}"] = buffer.to(device, dtype).repeat(self.bn_slots, 1)
        return {"net": net, "bn": bn}, state

    def forward(self, net: Tree, bn: Tree, state: Tree, x: torch.Tensor, slot: int, use_running: bool = False,
                want_stats: bool = False, training: bool = False,
                ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """x [B, n, ...], net tensors [B, ...] -> (outputs [B, n, ...], {layer: (mean [B, C], var [B, C])}).
        `training` is unused: the module's own dropout-like layers run in its train()/eval() mode."""
        frozen = {k: v for k, v in bn.items() if k.rsplit(".", 1)[0] not in self.bn_layers}
        self.call = {"bn": bn, "state": state, "slot": slot, "use_running": use_running, "want_stats": want_stats,
                     "stats": {}}

        def one(weights: Tree, xb: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = torch.func.functional_call(self.module, {**weights, **frozen}, (xb,))
            return out

        if self.batching == "vmap":
            out = torch.func.vmap(one)(net, x)
        else:
            out = torch.stack([one({k: v[b] for k, v in net.items()}, x[b]) for b in range(x.shape[0])])
        stats = {layer: (torch.cat([m for m, _ in s]), torch.cat([v for _, v in s]))
                 for layer, s in self.call["stats"].items()}
        return out, stats


@BACKBONES.register("module")
class _ModulePlaceholder:
    """model.arch=module names a run whose base learner is a user's nn.Module: it is passed to the
    Python API as backbone=ModuleBackbone(...), since a config cannot hold a module."""

    inputs = "any"

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise ConfigError("model.arch=module is a torch.nn.Module of your own: pass it as "
                          "backbone=mamlpp.ModuleBackbone(module) to mamlpp.train / evaluate / load / Learner")

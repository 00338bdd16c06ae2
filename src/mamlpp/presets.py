"""Named presets: an experiment = a data-set half + an algorithm half (+ a flavour).

Algorithm halves (`ALGORITHMS`) switch the six MAML++ fixes; data halves (`DATASETS`) set the
per-data-set values of the spec's section 8. Flavours: the unsuffixed name is the *paper* flavour
(paper-era code, spec 8.5); `-reference` is the reference code's HEAD configs (spec 8.3/8.4).
`mamlpp presets` lists every name; `get_preset(name)` returns a fresh Config.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from .config import Config, ConfigError, validate


# ---- algorithm halves -----------------------------------------------------------------------------
def maml(cfg: Config) -> None:
    """MAML baseline as the MAML++ authors ran it: fixed inner LR, shared BN, single final loss."""
    cfg.inner.lr_mode = "fixed"
    cfg.inner.second_order = True
    cfg.inner.da_epochs = -1
    cfg.model.bnwb = cfg.model.bnrs = False
    cfg.outer.msl = False
    cfg.outer.ca = False


def with_msl(cfg: Config) -> None:
    cfg.outer.msl = True


def with_lslr(cfg: Config) -> None:
    cfg.inner.lr_mode = "lslr"


def with_bn(cfg: Config) -> None:
    cfg.model.bnwb = cfg.model.bnrs = True


def with_ca(cfg: Config) -> None:
    cfg.outer.ca = True


def with_da(cfg: Config) -> None:
    # The paper's DA: first order for the first 50 epochs (spec 2.4).
    cfg.inner.da_epochs = 50


def mamlpp(cfg: Config) -> None:
    """All six fixes. DA keeps the data set's paper-era epoch (set by the data half)."""
    maml(cfg)
    for fix in (with_msl, with_lslr, with_bn, with_ca):
        fix(cfg)


ALGORITHMS: dict[str, Callable[[Config], None]] = {
    "maml": maml,
    "mamlpp": mamlpp,
    "maml+msl": lambda c: (maml(c), with_msl(c)),
    "maml+lslr": lambda c: (maml(c), with_lslr(c)),
    "maml+bn": lambda c: (maml(c), with_bn(c)),  # BNWB + BNRS
    "maml+ca": lambda c: (maml(c), with_ca(c)),
    "maml+da": lambda c: (maml(c), with_da(c)),
    "metasgd": lambda c: (maml(c), setattr(c.inner, "lr_mode", "metasgd")),
}


# ---- data halves ------------------------------------------------------------------------------------
def omniglot(ways: int, shots: int, reference: bool) -> Callable[[Config], None]:
    def apply(cfg: Config) -> None:
        cfg.data.dataset, cfg.data.ways, cfg.data.shots, cfg.data.queries = "omniglot", ways, shots, 1
        cfg.model.filters = 64
        cfg.inner.lr = 0.1
        cfg.outer.msl_epochs = 10
        cfg.outer.eta_min = 1e-5
        cfg.outer.grad_clamp = None
        if reference:  # HEAD: B=8, mean over tasks, top-5 test ensemble
            cfg.outer.meta_batch, cfg.outer.task_reduction, cfg.train.top_k = 8, "mean", 5
        else:  # paper era: B=16 (8 for 20-way 5-shot), sum over tasks
            cfg.outer.meta_batch = 8 if (ways, shots) == (20, 5) else 16
            cfg.outer.task_reduction = "sum"

    return apply


def mini_imagenet(shots: int, reference: bool) -> Callable[[Config], None]:
    def apply(cfg: Config) -> None:
        cfg.data.dataset, cfg.data.ways, cfg.data.shots, cfg.data.queries = "mini_imagenet", 5, shots, 15
        cfg.data.augment = False
        cfg.model.filters = 48
        cfg.outer.msl_epochs = 15
        cfg.outer.eta_min = 1e-3  # = meta LR: CA is a no-op on Mini-ImageNet in the reference
        cfg.outer.grad_clamp = 10.0
        if reference:
            cfg.outer.meta_batch, cfg.outer.task_reduction, cfg.inner.lr, cfg.train.top_k = 2, "mean", 0.1, 5
        else:
            cfg.outer.meta_batch = 4 if shots == 1 else 2
            cfg.outer.task_reduction, cfg.inner.lr = "sum", 0.01

    return apply


def _flavour(cfg: Config, reference: bool) -> None:
    """What differs by flavour beyond the data half (spec 8.4/8.5)."""
    if not reference and cfg.data.dataset == "mini_imagenet" and cfg.inner.lr_mode == "lslr":
        cfg.inner.da_epochs = 10  # paper-era MAML++ Mini-ImageNet: first order for epochs 0..10
    if reference and cfg.data.dataset == "omniglot":
        cfg.outer.ca = True  # HEAD's Omniglot MAML baseline also anneals to eta_min=1e-5


# ---- registry ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    build: Callable[[], Config]


PRESETS: dict[str, Preset] = {}


def register(name: str, description: str, *steps: Callable[[Config], None]) -> None:
    def build() -> Config:
        cfg = Config(name=name)
        for step in steps:
            step(cfg)
        validate(cfg)
        return cfg

    if name in PRESETS:
        raise ValueError(f"preset {name!r} registered twice")
    PRESETS[name] = Preset(name, description, build)


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}.{hint} Run 'mamlpp presets' for the list.")
    return PRESETS[name].build()


def _sinusoid(cfg: Config) -> None:
    # MAML paper 5.1: 1-40-40-1 ReLU MLP, K=10, inner lr 0.01, one inner step, meta-batch 25, Adam 1e-3.
    cfg.data.dataset, cfg.data.shots, cfg.data.queries = "sinusoid", 10, 10
    cfg.model.arch, cfg.model.activation, cfg.model.hidden = "mlp", "relu", (40, 40)
    cfg.inner.lr, cfg.inner.steps, cfg.inner.eval_steps = 0.01, 1, 10
    cfg.outer.meta_batch, cfg.outer.lr, cfg.outer.task_reduction = 25, 1e-3, "mean"
    cfg.train.epochs, cfg.train.iters_per_epoch, cfg.train.eval_tasks = 70, 1000, 600
    cfg.train.top_k = 1  # MAML reports its final model; validation here is only for checkpoint choice


register("sinusoid-maml", "MAML on sinusoid regression (MAML paper 5.1), K=10, no download", maml, _sinusoid)

_METHOD_TEXT = {"maml": "MAML baseline", "mamlpp": "MAML++ (all six fixes)"}
for _suffix in ("", "-reference"):
    _ref = bool(_suffix)
    _what = "reference-code HEAD config" if _ref else "paper-era config"
    for _ways in (5, 20):
        for _shots in (1, 5):
            for _method in ("maml", "mamlpp"):
                register(f"omniglot-{_ways}w{_shots}s-{_method}{_suffix}",
                         f"Omniglot {_ways}-way {_shots}-shot, {_METHOD_TEXT[_method]}, {_what}",
                         ALGORITHMS[_method], omniglot(_ways, _shots, _ref),
                         lambda c, r=_ref: _flavour(c, r))
    for _shots in (1, 5):
        for _method in ("maml", "mamlpp"):
            register(f"mini-5w{_shots}s-{_method}{_suffix}",
                     f"Mini-ImageNet 5-way {_shots}-shot, {_METHOD_TEXT[_method]}, {_what}",
                     ALGORITHMS[_method], mini_imagenet(_shots, _ref), lambda c, r=_ref: _flavour(c, r))
# The inner-step sweep and the single-fix ablations exist only in the paper (no HEAD configs).
for _steps in (1, 2, 3, 4):
    register(f"mini-5w1s-mamlpp-{_steps}steps",
             f"Mini-ImageNet 5-way 1-shot MAML++ with {_steps} inner steps, paper-era config",
             ALGORITHMS["mamlpp"], mini_imagenet(1, False), lambda c: _flavour(c, False),
             lambda c, s=_steps: (setattr(c.inner, "steps", s), setattr(c.inner, "eval_steps", s)))
for _fix, _text in (("msl", "MSL"), ("lslr", "LSLR"), ("bn", "BNWB+BNRS"), ("ca", "CA"), ("da", "DA")):
    register(f"omniglot-20w1s-maml+{_fix}", f"Ablation: Omniglot 20-way 1-shot, MAML + {_text} only, paper-era config",
             omniglot(20, 1, False), ALGORITHMS[f"maml+{_fix}"])

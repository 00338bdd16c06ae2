"""Named presets: an experiment = a data-set half + an algorithm half (+ a flavour), with metadata.

Algorithm halves (`ALGORITHMS`) pick the method and switch the six MAML++ fixes; data halves set
the per-data-set values of the spec's section 8. Flavours: the unsuffixed name is the *paper*
flavour (paper-era code, spec 8.5, or the method's own paper); `-reference` is the reference code's
HEAD configs (spec 8.3/8.4); `-strided` the stability figure's strided network; `-resnet12` the
paper-era Mini-ImageNet setups on ResNet-12 (resnet.py) instead of Conv4. Each preset records
what the report needs to place it (approach, data set, N, K, inner steps, flavour) and the published
number it is compared with. `mamlpp presets` lists every name; `get_preset(name)` returns a fresh
Config; `resolve(name, overrides)` applies overrides and train.budget as `mamlpp train` does.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from .config import Config, ConfigError, apply_budget, apply_overrides, validate


# ---- published numbers (percent) ----------------------------------------------------------------------
@dataclass(frozen=True)
class PaperResult:
    mean: float
    std: float | None  # None: the source gives no +/-
    source: str  # short label, used in the report's footnotes

    def text(self) -> str:
        return f"{self.mean:g}" if self.std is None else f"{self.mean:g} ± {self.std:g}"


_MAML_ORIG = "MAML paper (Finn et al. 2017); its ± is a 95% CI over tasks"
_MAMLPP = "MAML++ paper (ICLR 2019); ± is the std over 3 runs"
_ABLATION = "MAML++ paper ablation (20-way 1-shot); ± is the std over 3 runs"
_BLOG_STEPS = "MAML++ inner-step sweep (Nov-2018 blog); ± is the std over 3 runs"
_TNAS = "MAML++ (ICLR) as cited by T-NAS, no ± given"
_REPLICATION = "MAML++ authors' replication of MAML"
_SIAMESE = "Vinyals et al.'s fine-tuned Siamese re-implementation, via the MAML and MAML++ tables; no ±"
_MATCHING = "Matching Networks paper, Table 1 (cosine, no fine-tuning), via the MAML++ table; no ±"
_MATCHING_MINI = "Ravi & Larochelle's Matching Nets FCE re-implementation, via the MAML++ table; ± is a 95% CI over tasks"
_STATISTICIAN = "Neural Statistician paper, via the MAML and MAML++ tables; no ±"
_MEMORY = "Kaiser et al. (Memory Module), via the MAML and MAML++ tables; no ±"
_METASGD = "Meta-SGD paper, as quoted by MAML++; ± is a 95% CI over tasks"
_METANET = "Meta Networks paper (Tables 1-2), via the MAML++ table; no ± given there"
_METALSTM = "Ravi & Larochelle (Meta-LSTM) Table 1; ± is a 95% CI over tasks"
_PROTO = "Prototypical Networks paper, Table 1; no ±"
_PROTO_MINI = "Prototypical Networks paper, Table 2; ± is a 95% CI over 600 tasks"

# (approach, data set, ways, shots, inner steps or None) -> the published number. The approach is the
# row label of the paper's comparison tables; inner steps tell the MAML++ step sweep apart.
PUBLISHED: dict[tuple, PaperResult] = {}


def _publish(approach: str, dataset: str, cells: dict[tuple[int, int], tuple[float, float | None]], source: str,
             steps: int | None = None) -> None:
    for (ways, shots), (mean, std) in cells.items():
        PUBLISHED[(approach, dataset, ways, shots, steps)] = PaperResult(mean, std, source)


_publish("MAML", "omniglot", {(5, 1): (98.7, 0.4), (5, 5): (99.9, 0.1), (20, 1): (95.8, 0.3), (20, 5): (98.9, 0.2)},
         _MAML_ORIG, 5)
_publish("MAML++", "omniglot", {(5, 1): (99.47, None), (5, 5): (99.93, None)}, _TNAS, 5)  # PwC lists 99.85 for 5w5s
_publish("MAML++", "omniglot", {(20, 1): (97.65, 0.05), (20, 5): (99.33, 0.03)}, _MAMLPP, 5)
for _fix, _value in (("MSL", (91.53, 0.69)), ("LSLR", (95.77, 0.38)), ("BNWB + BNRS", (95.35, 0.23)),
                     ("CA", (93.03, 0.44)), ("DA", (92.3, 0.55))):
    _publish(f"MAML + {_fix}", "omniglot", {(20, 1): _value}, _ABLATION, 5)
_publish("MAML", "mini_imagenet", {(5, 1): (48.70, 1.84), (5, 5): (63.11, 0.92)}, _MAML_ORIG, 5)
_publish("MAML++", "mini_imagenet", {(5, 1): (52.15, 0.26), (5, 5): (68.32, 0.44)}, _MAMLPP, 5)
for _steps, _value in ((1, 51.05), (2, 51.49), (3, 51.11), (4, 51.65)):
    _publish("MAML++", "mini_imagenet", {(5, 1): (_value, {1: 0.31, 2: 0.25, 3: 0.11, 4: 0.34}[_steps])},
             _BLOG_STEPS, _steps)
_publish("Siamese Nets", "omniglot", {(5, 1): (97.3, None), (5, 5): (98.4, None), (20, 1): (88.2, None),
                                      (20, 5): (97.0, None)}, _SIAMESE)
_publish("Matching Nets", "omniglot", {(5, 1): (98.1, None), (5, 5): (98.9, None), (20, 1): (93.8, None),
                                       (20, 5): (98.5, None)}, _MATCHING)
_publish("Matching Nets", "mini_imagenet", {(5, 1): (43.56, 0.84), (5, 5): (55.31, 0.73)}, _MATCHING_MINI)
_publish("Neural Statistician", "omniglot", {(5, 1): (98.1, None), (5, 5): (99.5, None), (20, 1): (93.2, None),
                                             (20, 5): (98.1, None)}, _STATISTICIAN)
_publish("Memory Module", "omniglot", {(5, 1): (98.4, None), (5, 5): (99.6, None), (20, 1): (95.0, None),
                                       (20, 5): (98.6, None)}, _MEMORY)
_publish("Meta-SGD", "omniglot", {(5, 1): (99.53, 0.26), (5, 5): (99.93, 0.09), (20, 1): (95.93, 0.38),
                                  (20, 5): (98.97, 0.19)}, _METASGD, 1)
_publish("Meta-SGD", "mini_imagenet", {(5, 1): (50.47, 1.87), (5, 5): (64.03, 0.94)}, _METASGD, 1)
_publish("Meta-Networks", "omniglot", {(20, 1): (97.00, None)}, _METANET)
_publish("Meta-Networks", "mini_imagenet", {(5, 1): (49.21, None)}, _METANET)
_publish("Meta-LSTM", "mini_imagenet", {(5, 1): (43.44, 0.77), (5, 5): (60.60, 0.71)}, _METALSTM)
_publish("Prototypical Networks", "omniglot", {(5, 1): (98.8, None), (5, 5): (99.7, None), (20, 1): (96.0, None),
                                               (20, 5): (98.9, None)}, _PROTO)
_publish("Prototypical Networks", "mini_imagenet", {(5, 1): (49.42, 0.78), (5, 5): (68.20, 0.66)}, _PROTO_MINI)
# The MAML++ authors' own replication of MAML, shown beside the original-paper MAML number
# (the baseline of the ablation table: MAML 20-way 1-shot 91.27 +/- 1.07).
REPLICATIONS: dict[tuple, PaperResult] = {
    ("MAML", "omniglot", 20, 1, 5): PaperResult(91.27, 1.07, f"{_REPLICATION}; std over 3 runs"),
    ("MAML", "omniglot", 20, 5, 5): PaperResult(98.78, None, _REPLICATION),
    ("MAML", "mini_imagenet", 5, 1, 5): PaperResult(48.64, None, _REPLICATION),
    ("MAML", "mini_imagenet", 5, 5, 5): PaperResult(64.78, None, _REPLICATION),
}


# ---- algorithm halves -----------------------------------------------------------------------------
def maml(cfg: Config) -> None:
    """MAML baseline as the MAML++ authors ran it: fixed inner LR, shared BN, single final loss."""
    cfg.set_method("maml")
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


def metasgd(cfg: Config) -> None:
    """Meta-SGD (spec 8): one inner step, a learned rate per element drawn from U[0.005, 0.1],
    second order, MAML's meta-batches; 15 training queries per class."""
    maml(cfg)
    cfg.inner.lr_mode, cfg.inner.lr_range = "metasgd", (0.005, 0.1)
    cfg.inner.steps = cfg.inner.eval_steps = 1
    cfg.outer.task_reduction, cfg.outer.grad_clamp = "mean", None
    cfg.data.train_queries = 15
    cfg.train.epochs, cfg.train.iters_per_epoch = 120, 500  # 60,000 meta-iterations, as MAML
    if cfg.data.dataset == "omniglot":
        cfg.outer.meta_batch = 32 if cfg.data.ways == 5 else 16
    else:
        cfg.model.filters = 32  # as MAML on Mini-ImageNet
        cfg.outer.meta_batch = 4 if cfg.data.shots == 1 else 2


def _metric(cfg: Config) -> None:
    """What the metric methods share: the ReLU Conv4 embedding with 64 filters, batch norm in
    evaluation mode at test time (running statistics), one episode per update, Adam 1e-3."""
    cfg.model.activation, cfg.model.filters = "relu", 64
    cfg.model.bnwb, cfg.model.bnrs, cfg.model.bn_eval = False, True, "running"
    cfg.inner.lr_mode, cfg.outer.msl, cfg.outer.ca, cfg.inner.da_epochs = "fixed", False, False, -1
    cfg.outer.meta_batch, cfg.outer.lr, cfg.outer.task_reduction, cfg.outer.grad_clamp = 1, 1e-3, "mean", None
    cfg.train.iters_per_epoch = 500


def protonet(cfg: Config) -> None:
    """Prototypical Networks (spec 9.2): higher way in training (Omniglot 60-way with 5 queries;
    Mini-ImageNet 30-way 1-shot / 20-way 5-shot with 15), lr halved every 2,000 episodes; 20,000
    episodes, by which point the rate has fallen 1,000-fold (the paper stops on validation loss)."""
    cfg.set_method("protonet")
    _metric(cfg)
    omniglot = cfg.data.dataset == "omniglot"
    cfg.data.train_ways = 60 if omniglot else (30 if cfg.data.shots == 1 else 20)
    cfg.data.train_queries = 5 if omniglot else 15
    cfg.outer.lr_step_epochs, cfg.outer.lr_step_gamma = 4, 0.5
    cfg.train.epochs = 40


def matchingnet(cfg: Config) -> None:
    """Matching Networks (spec 3, [adapt] defaults of 3.5): train at the test way and shot with 15
    queries per class; FCE (K=3) on Mini-ImageNet only, as published; lr halved every 20,000
    episodes; 60,000 episodes Omniglot, 100,000 Mini-ImageNet."""
    omniglot = cfg.data.dataset == "omniglot"
    cfg.set_method("matchingnet")
    _metric(cfg)
    cfg.method.fce = not omniglot
    cfg.data.train_queries = 15
    cfg.outer.lr_step_epochs, cfg.outer.lr_step_gamma = 40, 0.5
    cfg.train.epochs = 120 if omniglot else 200


def metalstm(cfg: Config) -> None:
    """The Meta-LSTM learner (spec 7): the 32-filter Conv4 learner, 12 updates for 1-shot and 8 for 5-shot
    on the whole support set (the code's counts; the paper's text says 5 for 5-shot), 15 training
    queries per class, batch-norm momentum 0.9 / 0.95 (Torch convention), Adam 1e-3 with the gradient's
    global norm clipped at 0.25, one episode per update, 75,000 / 50,000 episodes."""
    one_shot = cfg.data.shots == 1
    cfg.set_method("metalstm")
    cfg.model.filters, cfg.model.activation, cfg.model.pooling = 32, "relu", "max"
    cfg.model.bnwb, cfg.model.bnrs, cfg.model.bn_eval = False, False, "batch"
    cfg.model.bn_momentum = 0.9 if one_shot else 0.95
    cfg.inner.steps = cfg.inner.eval_steps = 12 if one_shot else 8
    cfg.inner.lr_mode, cfg.inner.da_epochs, cfg.outer.msl, cfg.outer.ca = "fixed", -1, False, False
    cfg.outer.meta_batch, cfg.outer.lr, cfg.outer.task_reduction = 1, 1e-3, "mean"
    cfg.outer.grad_clamp, cfg.outer.grad_norm_clip = None, 0.25
    cfg.data.train_queries = 15
    cfg.train.iters_per_epoch, cfg.train.epochs = 1000, 75 if one_shot else 50


def metanet(cfg: Config) -> None:
    """Meta Networks (spec 6.7-6.8): b and u of 5 conv blocks (no bias, no batch norm, ReLU, 2x2 max-pool
    with ceil rounding) and fc1, fc2, every layer fast-parameterised; 64 filters Omniglot, 32 Mini-ImageNet;
    support chunks T = 5 (Omniglot) / 10 (Mini-ImageNet); training queries 10 / 15 per class; the query
    losses summed; Adam 1e-3 with the gradient's global norm clipped at 10; one task per update;
    100,000 training tasks ([adapt], the paper gives no count)."""
    omniglot = cfg.data.dataset == "omniglot"
    cfg.set_method("metanet")
    cfg.method.chunks = 5 if omniglot else 10
    cfg.model.filters, cfg.model.stages, cfg.model.activation, cfg.model.pooling = (64 if omniglot else 32), 5, "relu", "max"
    cfg.model.bnwb, cfg.model.bnrs, cfg.model.bn_eval = False, False, "batch"
    cfg.inner.lr_mode, cfg.inner.da_epochs, cfg.outer.msl, cfg.outer.ca = "fixed", -1, False, False
    cfg.outer.meta_batch, cfg.outer.lr, cfg.outer.task_reduction = 1, 1e-3, "sum"
    cfg.outer.grad_clamp, cfg.outer.grad_norm_clip = None, 10.0
    cfg.data.train_queries = 10 if omniglot else 15
    cfg.train.iters_per_epoch, cfg.train.epochs = 500, 200


ALGORITHMS: dict[str, Callable[[Config], None]] = {
    "maml": maml,
    "mamlpp": mamlpp,
    "maml+msl": lambda c: (maml(c), with_msl(c)),
    "maml+lslr": lambda c: (maml(c), with_lslr(c)),
    "maml+bn": lambda c: (maml(c), with_bn(c)),  # BNWB + BNRS
    "maml+ca": lambda c: (maml(c), with_ca(c)),
    "maml+da": lambda c: (maml(c), with_da(c)),
    "metasgd": metasgd,
    "protonet": protonet,
    "matchingnet": matchingnet,
    "metalstm": metalstm,
    "metanet": metanet,
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
    approach: str  # the row of the paper's comparison tables: "MAML++", "Matching Nets", "MAML + LSLR", ...
    # "paper", "reference" (reference-code HEAD), "strided" (the stability figure), "resnet12" (ResNet-12)
    flavour: str
    dataset: str
    ways: int
    shots: int
    steps: int | None  # inner steps of a gradient-based method (tells the step sweep apart), else None

    @property
    def key(self) -> tuple:
        return (self.approach, self.dataset, self.ways, self.shots, self.steps)

    @property
    def paper(self) -> PaperResult | None:
        """The published number this preset is compared with (none for the strided network and for
        ResNet-12: the papers' numbers are Conv4's)."""
        return None if self.flavour in OTHER_NETWORKS else PUBLISHED.get(self.key)

    @property
    def replication(self) -> PaperResult | None:
        return None if self.flavour in OTHER_NETWORKS else REPLICATIONS.get(self.key)


OTHER_NETWORKS = ("strided", "resnet12")  # flavours whose network is not the one the published numbers used


PRESETS: dict[str, Preset] = {}


def register(name: str, description: str, *steps: Callable[[Config], None], approach: str,
             flavour: str = "paper") -> None:
    def assemble() -> Config:
        cfg = Config(name=name)
        for step in steps:
            step(cfg)
        return cfg

    def build() -> Config:
        cfg = assemble()
        validate(cfg)
        return cfg

    if name in PRESETS:
        raise ValueError(f"preset {name!r} registered twice")
    cfg = assemble()  # metadata only; validated when built (methods register after this module loads)
    inner = cfg.inner.test_steps if cfg.method.name == "maml" else None
    PRESETS[name] = Preset(name, description, build, approach, flavour, cfg.data.dataset, cfg.data.ways,
                           cfg.data.shots, inner)


def get_preset(name: str) -> Config:
    """A fresh Config of a named preset (no overrides, no budget scaling); an unknown name is a
    ConfigError with the closest names."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}.{hint} Run 'mamlpp presets' for the list.")
    return PRESETS[name].build()


def resolve(name: str, overrides: list[str]) -> Config:
    """Preset, then KEY=VALUE overrides, then train.budget scaling (applied once, recorded in config.json):
    the config `mamlpp train` runs."""
    return apply_budget(apply_overrides(get_preset(name), overrides))


def _sinusoid(cfg: Config) -> None:
    # MAML paper 5.1: 1-40-40-1 ReLU MLP, K=10, inner lr 0.01, one inner step, meta-batch 25, Adam 1e-3.
    cfg.data.dataset, cfg.data.shots, cfg.data.queries = "sinusoid", 10, 10
    cfg.model.arch, cfg.model.activation, cfg.model.hidden = "mlp", "relu", (40, 40)
    cfg.inner.lr, cfg.inner.steps, cfg.inner.eval_steps = 0.01, 1, 10
    cfg.outer.meta_batch, cfg.outer.lr, cfg.outer.task_reduction = 25, 1e-3, "mean"
    cfg.train.epochs, cfg.train.iters_per_epoch, cfg.train.eval_tasks = 70, 1000, 600
    cfg.train.top_k = 1  # MAML reports its final model; validation here is only for checkpoint choice


register("sinusoid-maml", "MAML on sinusoid regression (MAML paper 5.1), K=10, no download", maml, _sinusoid,
         approach="MAML")

_LABEL = {"maml": "MAML", "mamlpp": "MAML++", "metasgd": "Meta-SGD", "protonet": "Prototypical Networks",
          "matchingnet": "Matching Nets", "metalstm": "Meta-LSTM",
          "metanet": "Meta-Networks"}
_TEXT = {"maml": "MAML baseline", "mamlpp": "MAML++ (all six fixes)", "metasgd": "Meta-SGD",
         "protonet": "Prototypical Networks", "matchingnet": "Matching Networks", "metalstm": "the Meta-LSTM learner",
         "metanet": "Meta Networks"}
for _suffix in ("", "-reference"):
    _ref = bool(_suffix)
    _what = "reference-code HEAD config" if _ref else "paper-era config"
    _flav = "reference" if _ref else "paper"
    for _ways in (5, 20):
        for _shots in (1, 5):
            for _method in ("maml", "mamlpp"):
                register(f"omniglot-{_ways}w{_shots}s-{_method}{_suffix}",
                         f"Omniglot {_ways}-way {_shots}-shot, {_TEXT[_method]}, {_what}",
                         ALGORITHMS[_method], omniglot(_ways, _shots, _ref),
                         lambda c, r=_ref: _flavour(c, r), approach=_LABEL[_method], flavour=_flav)
    for _shots in (1, 5):
        for _method in ("maml", "mamlpp"):
            register(f"mini-5w{_shots}s-{_method}{_suffix}",
                     f"Mini-ImageNet 5-way {_shots}-shot, {_TEXT[_method]}, {_what}",
                     ALGORITHMS[_method], mini_imagenet(_shots, _ref), lambda c, r=_ref: _flavour(c, r),
                     approach=_LABEL[_method], flavour=_flav)
# The inner-step sweep and the single-fix ablations exist only in the paper (no HEAD configs).
for _steps in (1, 2, 3, 4):
    register(f"mini-5w1s-mamlpp-{_steps}steps",
             f"Mini-ImageNet 5-way 1-shot MAML++ with {_steps} inner steps, paper-era config",
             ALGORITHMS["mamlpp"], mini_imagenet(1, False), lambda c: _flavour(c, False),
             lambda c, s=_steps: (setattr(c.inner, "steps", s), setattr(c.inner, "eval_steps", s)),
             approach="MAML++")
for _fix, _text in (("msl", "MSL"), ("lslr", "LSLR"), ("bn", "BNWB + BNRS"), ("ca", "CA"), ("da", "DA")):
    register(f"omniglot-20w1s-maml+{_fix}", f"Ablation: Omniglot 20-way 1-shot, MAML + {_text} only, paper-era config",
             omniglot(20, 1, False), ALGORITHMS[f"maml+{_fix}"], approach=f"MAML + {_text}")
# The paper's stability figure: MAML and MAML++ on the strided network (no max-pooling).
for _method in ("maml", "mamlpp"):
    register(f"omniglot-20w1s-{_method}-strided",
             f"Stability figure: Omniglot 20-way 1-shot, {_TEXT[_method]} on the strided network, paper-era config",
             ALGORITHMS[_method], omniglot(20, 1, False), lambda c: setattr(c.model, "pooling", "stride"),
             approach=_LABEL[_method], flavour="strided")
# The comparison methods, on the same data, episodes and test protocol as MAML++ (the data half sets
# the test tasks: Omniglot T=1, Mini-ImageNet T=15; the method sets its own training tasks after it).
for _method in ("protonet", "matchingnet", "metasgd", "metalstm"):
    for _ways in (5, 20):
        for _shots in (1, 5):
            register(f"omniglot-{_ways}w{_shots}s-{_method}",
                     f"Omniglot {_ways}-way {_shots}-shot, {_TEXT[_method]}, its paper's setup",
                     omniglot(_ways, _shots, False), ALGORITHMS[_method], approach=_LABEL[_method])
    for _shots in (1, 5):
        register(f"mini-5w{_shots}s-{_method}", f"Mini-ImageNet 5-way {_shots}-shot, {_TEXT[_method]}, its paper's setup",
                 mini_imagenet(_shots, False), ALGORITHMS[_method], approach=_LABEL[_method])
# Meta Networks: 1-shot only, as published (no 5-shot results; loss_emb for K > 1 is a contrastive loss).
for _ways in (5, 20):
    register(f"omniglot-{_ways}w1s-metanet", f"Omniglot {_ways}-way 1-shot, {_TEXT['metanet']}, its paper's setup",
             omniglot(_ways, 1, False), ALGORITHMS["metanet"], approach=_LABEL["metanet"])
register("mini-5w1s-metanet", f"Mini-ImageNet 5-way 1-shot, {_TEXT['metanet']}, its paper's setup (5-way training)",
         mini_imagenet(1, False), ALGORITHMS["metanet"], approach=_LABEL["metanet"])

# ---- the few-shot sets most papers since 2019 also report (CIFAR-FS, FC100, tieredImageNet, CUB) --------
# No paper tuned MAML++ on these sets, so their data halves take Mini-ImageNet's paper-era settings
# (5-way, 15 queries, 48 filters, B=4 for 1-shot / 2 for 5-shot summed over tasks, inner LR 0.01, MSL
# over 15 epochs, gradient clamp 10, CA a no-op) on each set's own images, whose size and normalisation
# the loaders set: CIFAR-FS and FC100 32x32 with CIFAR-100's per-channel mean/std, tieredImageNet and CUB
# 84x84 with ImageNet's. MAML++ keeps Mini-ImageNet's DA (first order for epochs 0..10); Prototypical
# Networks keep their Mini-ImageNet training way (30-way 1-shot, 20-way 5-shot, 15 queries).
FEWSHOT_SETS = {"cifarfs": ("cifar_fs", "CIFAR-FS"), "fc100": ("fc100", "FC100"),
                "tiered": ("tiered_imagenet", "tieredImageNet"), "cub": ("cub", "CUB-200-2011")}


def fewshot_set(dataset: str, shots: int) -> Callable[[Config], None]:
    """The data half of a 5-way set of FEWSHOT_SETS: Mini-ImageNet's paper-era half on `dataset`."""
    mini = mini_imagenet(shots, False)

    def apply(cfg: Config) -> None:
        mini(cfg)
        cfg.data.dataset = dataset

    return apply


def _mini_da(cfg: Config) -> None:
    """Mini-ImageNet's paper-era DA for MAML++ (as _flavour sets it there): first order for epochs 0..10."""
    if cfg.inner.lr_mode == "lslr":
        cfg.inner.da_epochs = 10


for _prefix, (_dataset, _title) in FEWSHOT_SETS.items():
    for _shots in (1, 5):
        register(f"{_prefix}-5w{_shots}s-mamlpp",
                 f"{_title} 5-way {_shots}-shot, {_TEXT['mamlpp']}, Mini-ImageNet's paper-era settings",
                 ALGORITHMS["mamlpp"], fewshot_set(_dataset, _shots), _mini_da, approach=_LABEL["mamlpp"])
        # the data half first: the method's training way depends on the data set
        register(f"{_prefix}-5w{_shots}s-protonet",
                 f"{_title} 5-way {_shots}-shot, {_TEXT['protonet']}, its Mini-ImageNet setup",
                 fewshot_set(_dataset, _shots), ALGORITHMS["protonet"], approach=_LABEL["protonet"])

def statistician(cfg: Config) -> None:
    """Neural Statistician (spec 4.3/4.4; conormdurkan's omnirun.py where the paper is silent): each class
    of a 32-way training episode is one set of K + T same-class images (5 for 1-shot; 6 for 5-shot, since
    a class needs a query), so an update sees 32 sets as conormdurkan's batches do; Adam 1e-3, gradients
    clamped to +/-0.5, loss weight w = 1 + 0.5^epoch; 180 epochs of 500 updates = 90,000 updates
    (conormdurkan: 300 epochs of 300 batches). Batch norm over the episode in training, running
    statistics at test (evaluation mode)."""
    cfg.set_method("statistician")
    cfg.model.filters = 64  # encoder widths 64 / 128 / 256
    cfg.model.bnwb, cfg.model.bnrs, cfg.model.bn_eval = False, True, "running"
    cfg.inner.lr_mode, cfg.outer.msl, cfg.outer.ca, cfg.inner.da_epochs = "fixed", False, False, -1
    cfg.data.train_ways, cfg.data.train_queries = 32, max(1, 5 - cfg.data.shots)
    cfg.outer.meta_batch, cfg.outer.lr, cfg.outer.task_reduction, cfg.outer.grad_clamp = 1, 1e-3, "mean", 0.5
    cfg.train.epochs, cfg.train.iters_per_epoch = 180, 500


ALGORITHMS["statistician"] = statistician
for _ways in (5, 20):
    for _shots in (1, 5):
        register(f"omniglot-{_ways}w{_shots}s-statistician",
                 f"Omniglot {_ways}-way {_shots}-shot, Neural Statistician (context-KL classifier), its paper's setup",
                 omniglot(_ways, _shots, False), statistician, approach="Neural Statistician")


# ---- Siamese Networks and the Memory Module, on the same data, episodes and test tasks ----------------
def siamese(cfg: Config) -> None:
    """Siamese Networks (spec 2; the [adapt] setup of 2.8 and 11.4): the Conv4 tower (the paper's own is
    model.arch=koch data.image_size=105), 128 balanced pairs per update drawn from one training episode
    of 128 images (32 classes x 4 at 1 shot, 16 x 8 at 5 shots), Koch's affine distortions, Adam 1e-3
    decayed 1% per epoch as Koch's rate, 200 epochs of 500 updates (12.8M pairs), selection on the
    validation tasks' one-shot accuracy."""
    cfg.set_method("siamese")
    _metric(cfg)
    cfg.method.distort = True
    cfg.data.train_ways, cfg.data.train_queries = (32 if cfg.data.shots == 1 else 16), 3
    cfg.outer.lr_step_epochs, cfg.outer.lr_step_gamma = 1, 0.99
    cfg.train.epochs = 200


def memory(cfg: Config) -> None:
    """The Memory Module (spec 5.5, the published code's Omniglot setup): its LeNet embedder (128-d keys),
    16 episodes of 5 classes x 6 images per update (training episodes stay 5-way whatever the test way),
    one memory per episode with a slot per image, choose_k 256, margin 0.1, age noise 8, dropout keep 0.3,
    100,000 batches of episodes (200 epochs of 500). One Adam step per batch at 1e-3: the code takes one
    at 1e-4 after each of an episode's 30 steps (docs/methods.md)."""
    cfg.set_method("memory")
    _metric(cfg)
    cfg.model.arch = "lenet"
    cfg.data.train_ways, cfg.data.train_queries = 5, max(1, 6 - cfg.data.shots)
    cfg.outer.meta_batch, cfg.outer.grad_norm_clip = 16, 5.0  # the code clips the global norm at 5
    cfg.train.epochs = 200


ALGORITHMS.update(siamese=siamese, memory=memory)
_LABEL.update(siamese="Siamese Nets", memory="Memory Module")
_TEXT.update(siamese="Siamese Networks", memory="Memory Module")
for _method in ("siamese", "memory"):
    for _ways in (5, 20):
        for _shots in (1, 5):
            register(f"omniglot-{_ways}w{_shots}s-{_method}",
                     f"Omniglot {_ways}-way {_shots}-shot, {_TEXT[_method]}, its paper's setup",
                     omniglot(_ways, _shots, False), ALGORITHMS[_method], approach=_LABEL[_method])
# ResNet-12 (resnet.py), the backbone of most few-shot results since 2018, with the paper-era
# Mini-ImageNet halves: MAML++ with its inner loop checkpointed (second-order MAML++ on ResNet-12 is
# where memory runs out; train.checkpoint_inner=false trades memory back for time, the same gradients),
# and Prototypical Networks with MetaOptNet's DropBlock 0.1. Flavour "resnet12" keeps them out of the
# paper's Conv4 tables (the report lists them under other presets).
def _resnet12(cfg: Config) -> None:
    cfg.model.arch = "resnet12"
    if cfg.method.name == "maml":
        cfg.train.checkpoint_inner = True
    else:
        cfg.model.dropblock = 0.1


for _shots in (1, 5):
    register(f"mini-5w{_shots}s-mamlpp-resnet12",
             f"Mini-ImageNet 5-way {_shots}-shot, {_TEXT['mamlpp']} on ResNet-12, paper-era config, "
             "inner loop checkpointed", ALGORITHMS["mamlpp"], mini_imagenet(_shots, False),
             lambda c: _flavour(c, False), _resnet12, approach="MAML++", flavour="resnet12")
    register(f"mini-5w{_shots}s-protonet-resnet12",
             f"Mini-ImageNet 5-way {_shots}-shot, {_TEXT['protonet']} on ResNet-12 with DropBlock 0.1",
             mini_imagenet(_shots, False), ALGORITHMS["protonet"], _resnet12, approach="Prototypical Networks",
             flavour="resnet12")

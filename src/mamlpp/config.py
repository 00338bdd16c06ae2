"""One typed configuration for every run, with `section.key=value` overrides.

The config is plain nested dataclasses. `apply_overrides` parses command-line strings against the
field annotations, so a typo or a bad value fails with the list of valid keys or the expected type.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message says what is expected."""


class Registry:
    """Named extension points (methods, backbones): a new one is a new file plus one `register` call.

    The config names an entry by string (`method.name`, `model.arch`); `get` turns an unknown name
    into a ConfigError that lists the registered ones.
    """

    def __init__(self, key: str):
        self.key, self._entries = key, {}

    def register(self, name: str):
        def add(obj):
            if name in self._entries:
                raise ValueError(f"{self.key}={name!r} is registered twice")
            self._entries[name] = obj
            obj.name = name
            return obj

        return add

    def get(self, name: str):
        if name not in self._entries:
            raise ConfigError(f"{self.key}={name!r}: expected one of {', '.join(self._entries)}")
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


# Filled by the modules that define methods (mamlpp/methods) and backbones (mamlpp/network.py).
METHODS = Registry("method.name")
BACKBONES = Registry("model.arch")


@dataclass
class DataConfig:
    dataset: Literal["sinusoid", "omniglot", "mini_imagenet", "cifar_fs", "fc100", "tiered_imagenet", "cub",
                     "folder"] = "omniglot"
    data_dir: str = ""  # empty: --data-dir, then $MAMLPP_DATA, then the user cache directory
    ways: int = 5  # N classes per task (ignored by sinusoid)
    shots: int = 1  # K support examples per class (sinusoid: K points per task)
    queries: int = 1  # T query examples per class (sinusoid: T query points per task)
    # Training tasks only (0: as above). Prototypical Networks train at a higher way than they test.
    train_ways: int = 0
    train_queries: int = 0
    split: Literal["reference", "vinyals"] = "reference"  # Omniglot class split
    augment: bool = True  # Omniglot: per-task, per-class random k*90 degree rotation (train only)
    image_size: int = 0  # 0: the data set's own size (28 Omniglot, 32 CIFAR-FS/FC100, 84 the others)
    channels: int = 0  # 0: the data set's own channel count
    split_fractions: tuple[float, ...] = (0.64, 0.16, 0.20)  # image folders that are not pre-split


@dataclass
class ModelConfig:
    arch: str = "conv4"  # a registered backbone (network.py, resnet.py): conv4, resnet12, mlp
    filters: int = 64  # conv4 only
    stages: int = 4  # conv4 only
    widths: tuple[int, ...] = (64, 160, 320, 640)  # resnet12 only: channels of each residual block
    # resnet12 only: DropBlock drop probability in the last two blocks, training passes only (0: off;
    # MetaOptNet 0.1). Masks come from torch's global generator (seeded by runs, saved in checkpoints).
    dropblock: float = 0.0
    pooling: Literal["max", "avg", "stride"] = "max"  # 'stride': stride-2 convs, global avg pool
    activation: Literal["leaky_relu", "relu", "tanh"] = "leaky_relu"
    hidden: tuple[int, ...] = (40, 40)  # mlp only
    # BNWB: per-step batch-norm weights and biases, shape (S, C), learned in the outer loop.
    bnwb: bool = False
    # BNRS: per-step batch-norm running statistics, shape (S, C), carried as explicit state.
    bnrs: bool = False
    # 'batch': normalise with each task's own batch statistics, also at evaluation (the reference).
    # 'running': evaluation normalises with the per-step running statistics (needs bnrs).
    bn_eval: Literal["batch", "running"] = "batch"
    bn_momentum: float = 0.1


@dataclass
class MethodConfig:
    """Which algorithm runs. A method with options of its own registers a subclass of this (its
    `Options`); `method.name=X` then makes the section an instance of X's options."""
    name: str = "maml"  # a registered method (mamlpp/methods): maml, protonet, matchingnet


@dataclass
class InnerConfig:
    steps: int = 5  # S, inner steps during meta-training
    eval_steps: int = 0  # inner steps at validation/test; 0 means the same as steps
    lr: float = 0.1  # fixed rate (MAML), or the initial value of the learned rates
    # 'fixed': one scalar; 'lslr': one learned scalar per parameter tensor per step (MAML++);
    # 'metasgd': one learned rate per parameter element (Meta-SGD).
    lr_mode: Literal["fixed", "lslr", "metasgd"] = "fixed"
    lr_range: tuple[float, ...] = ()  # metasgd: each rate drawn from U[lo, hi] instead of inner.lr
    second_order: bool = True
    # DA: first order for epochs 0..da_epochs, second order after; -1 means never first order.
    da_epochs: int = -1

    @property
    def test_steps(self) -> int:
        return self.eval_steps or self.steps


@dataclass
class OuterConfig:
    meta_batch: int = 8  # B tasks per meta-update
    lr: float = 1e-3  # Adam learning rate
    betas: tuple[float, ...] = (0.9, 0.999)
    # MSL: multi-step loss, annealed over msl_epochs, floor msl_floor/S for non-final steps.
    msl: bool = False
    msl_epochs: int = 10
    msl_floor: float = 0.03
    # How task losses combine: 'sum' (paper, paper-era code) or 'mean' (reference HEAD).
    task_reduction: Literal["sum", "mean"] = "mean"
    # CA: closed-form per-epoch cosine annealing of the meta learning rate down to eta_min.
    ca: bool = False
    eta_min: float = 1e-5
    grad_clamp: Optional[float] = None  # element-wise clamp of network meta-gradients (Mini: 10)
    grad_norm_clip: Optional[float] = None  # clip the meta-gradient's global norm (Meta-LSTM: 0.25)
    # Step decay of the meta learning rate (Prototypical Networks): x lr_step_gamma every
    # lr_step_epochs epochs; 0: off.
    lr_step_epochs: int = 0
    lr_step_gamma: float = 0.5


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 100
    iters_per_epoch: int = 500
    eval_tasks: int = 600  # fixed validation/test tasks
    eval_chunk: int = 0  # tasks evaluated together in one pass; 0: auto, 200 (4 for the conv network on a CPU)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float64"] = "float32"
    # 'bf16': convolutions and matrix products in bfloat16 with float32 accumulation (torch.autocast);
    # batch-norm statistics, losses, inner-loop updates and meta-parameters stay in train.dtype.
    precision: Literal["full", "bf16"] = "full"
    impl: Literal["parallel", "loop"] = "parallel"  # 'loop': the per-task oracle, for tests/bench
    # Gradient checkpointing of MAML's inner loop: the meta-backward recomputes each inner step's
    # and each query pass's activations instead of keeping them (objective.py). Same gradients, less
    # memory, more time (BENCHMARKS.md).
    checkpoint_inner: bool = False
    # Tasks per forward/backward pass. Smaller chunks keep one chunk's graph alive at a time: less
    # memory, the same gradients (single process). 0: auto, the whole meta-batch on a GPU; on a CPU
    # passes of about 4M first-layer activations for the conv network (trainer.py).
    chunk: int = 0
    # Intra-op threads on a CPU. 0: auto, one thread for small networks (the sinusoid MLP: many tiny
    # parallel regions each wait for a thread that a busy machine deschedules), torch's default otherwise.
    threads: int = 0
    # CPU processes that split every meta-batch's tasks (`mamlpp train` starts them; gloo, the same
    # update as one process). 0: auto, on Linux one single-thread process per core when several tasks
    # fit in one pass (tasks are small; a task that fills a pass is faster on intra-op threads), else
    # one. Under torchrun, torchrun decides.
    processes: int = 0
    log_every: int = 50  # iterations between metrics.csv rows
    top_k: int = 3  # checkpoints kept by validation score and ensembled at test (paper 3, HEAD 5)
    # Fraction of the schedule for quick runs: scales epochs and the epoch-denominated schedules
    # (MSL epochs, DA epochs; CA follows epochs) together, so every schedule stays proportional.
    budget: float = 1.0
    tensorboard: bool = True


@dataclass
class Config:
    """A whole run's settings: the method and its options, the data, the network, the inner and outer
    loops, and the run itself; `mamlpp config PRESET` prints one as JSON."""

    name: str = "custom"
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        if not isinstance(d, dict):
            raise ConfigError(f"expected a JSON object of config sections, not {type(d).__name__}")
        cfg = cls()
        method = d.get("method", {})
        if isinstance(method, dict) and "name" in method:  # first: it decides which method keys exist
            _set(cfg.method, "method", "name", method["name"], from_string=False, cfg=cfg)
        for key, value in d.items():
            if key == "name":
                cfg.name = value
                continue
            section = getattr(cfg, key, None) if key in SECTIONS else None
            if section is None:
                raise ConfigError(f"unknown config section {key!r}; valid: {', '.join(SECTIONS)}")
            if not isinstance(value, dict):
                raise ConfigError(f"config section {key!r} must be a JSON object, not {type(value).__name__}")
            for k, v in value.items():
                if (key, k) != ("method", "name"):
                    _set(getattr(cfg, key), key, k, v, from_string=False, cfg=cfg)
        validate(cfg)
        return cfg

    def set_method(self, name: str) -> None:
        """Switch to a registered method; the method section becomes that method's options (defaults)."""
        self.method = getattr(METHODS.get(name), "Options", MethodConfig)(name=name)

    def copy(self) -> "Config":
        """A copy whose sections can be changed without touching this one."""
        return dataclasses.replace(self, **{s: dataclasses.replace(getattr(self, s)) for s in SECTIONS})


SECTIONS = ("data", "model", "inner", "outer", "train", "method")
# Keys that do not change what a run computes (where it runs, how often it logs, how the same
# arithmetic is split into passes); runs that differ only here are comparable. Report and sweep
# both use this list.
INCIDENTAL_KEYS = frozenset({"data.data_dir", "train.device", "train.tensorboard", "train.log_every",
                             "train.eval_chunk", "train.chunk", "train.impl", "train.threads", "train.processes",
                             "train.checkpoint_inner"})


def valid_keys(cfg: Config | None = None) -> list[str]:
    """Every section.key of cfg (the method section holds cfg's method's own options)."""
    cfg = cfg or Config()
    return [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(cfg, s))]


def flat_keys(d: dict, prefix: str = "") -> dict:
    """{'inner': {'steps': 5}} -> {'inner.steps': 5}: a config dict keyed as overrides are."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _parse(text: str, tp, key: str):
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return None if text.lower() in ("none", "null", "") else _parse(text, inner, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if text not in choices:
            raise ConfigError(f"{key}={text!r}: expected one of {', '.join(map(str, choices))}")
        return text
    if origin is tuple:
        elem = typing.get_args(tp)[0]
        parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
        return tuple(_parse(p.strip(), elem, key) for p in parts)
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r}: expected a boolean (true/false)")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected {tp.__name__}") from None
    return text


def _check_type(value, tp, key: str):
    """Type-check a value that did not come from a string (presets, config.json)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return _check_type(value, inner, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, typing.get_args(tp)))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a comma-separated list")
        return tuple(_check_type(v, typing.get_args(tp)[0], key) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (bool, int, float, str) and (type(value) is not tp):
        raise ConfigError(f"{key}={value!r}: expected {tp.__name__}")
    return value


def _set(section_obj, section: str, key: str, value, from_string: bool, cfg: Config | None = None):
    hints = typing.get_type_hints(type(section_obj))
    if key not in hints:
        raise ConfigError(f"unknown config key {section}.{key!r}; valid keys: {', '.join(valid_keys(cfg))}")
    full = f"{section}.{key}"
    value = _parse(value, hints[key], full) if from_string else _check_type(value, hints[key], full)
    if full == "method.name" and cfg is not None:  # the section becomes the method's own options
        cfg.set_method(value)
        return
    setattr(section_obj, key, value)


def resolve_key(key: str, cfg: Config | None = None) -> tuple[str, str]:
    """'inner.steps' -> ('inner', 'steps'); a bare 'steps' works when only one section has it."""
    cfg = cfg or Config()
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r} in {key!r}; valid keys: {', '.join(valid_keys(cfg))}")
        return section, name
    owners = [s for s in SECTIONS if key in {f.name for f in dataclasses.fields(getattr(cfg, s))}]
    if len(owners) == 1:
        return owners[0], key
    if not owners:
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys(cfg))}")
    raise ConfigError(f"ambiguous key {key!r}: say {' or '.join(f'{s}.{key}' for s in owners)}")


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `KEY=VALUE` strings (as the command line takes them) to a copy of cfg and validate it."""
    values = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE; valid keys: {', '.join(valid_keys(cfg))}")
        key, value = item.split("=", 1)
        values[key.strip()] = value.strip()
    return apply_values(cfg, values)


def apply_values(cfg: Config, values: dict) -> Config:
    """Apply {KEY: value} to a copy of cfg and validate it: strings are parsed as on the command line,
    other values type-checked. `method.name` goes first, since it decides which `method.*` keys exist."""
    cfg = cfg.copy()
    for key, value in sorted(values.items(), key=lambda kv: kv[0] not in ("method.name", "name")):
        section, name = resolve_key(key, cfg)
        _set(getattr(cfg, section), section, name, value, from_string=isinstance(value, str), cfg=cfg)
    validate(cfg)
    return cfg


def apply_budget(cfg: Config) -> Config:
    """Shrink a run to train.budget of its epochs, scaling MSL and DA epochs alike (CA follows epochs).

    The scaled values replace the originals and budget returns to 1.0, so applying it twice is
    harmless and a run's config.json holds exactly what ran.
    """
    f = cfg.train.budget
    if f == 1.0:
        return cfg
    cfg = cfg.copy()
    cfg.train.epochs = max(1, round(cfg.train.epochs * f))
    cfg.outer.msl_epochs = max(1, round(cfg.outer.msl_epochs * f))
    if cfg.inner.da_epochs >= 0:  # first order for da_epochs + 1 epochs
        cfg.inner.da_epochs = max(1, round((cfg.inner.da_epochs + 1) * f)) - 1
    cfg.train.budget = 1.0
    return cfg


def validate(cfg: Config) -> None:
    """Reject combinations that cannot run, before any work starts."""
    d, m, i, o, t = cfg.data, cfg.model, cfg.inner, cfg.outer, cfg.train
    positive = {"data.ways": d.ways, "data.shots": d.shots, "data.queries": d.queries,
                "model.filters": m.filters, "model.stages": m.stages, "inner.steps": i.steps,
                "outer.meta_batch": o.meta_batch, "outer.msl_epochs": o.msl_epochs,
                "train.epochs": t.epochs, "train.iters_per_epoch": t.iters_per_epoch,
                "train.eval_tasks": t.eval_tasks, "train.log_every": t.log_every,
                "train.top_k": t.top_k}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value}: must be >= 1")
    for key, value in {"data.train_ways": d.train_ways, "data.train_queries": d.train_queries,
                       "outer.lr_step_epochs": o.lr_step_epochs, "train.threads": t.threads,
                       "train.processes": t.processes}.items():
        if value < 0:
            raise ConfigError(f"{key}={value}: must be >= 1 (or 0 for the default)")
    if t.processes > 1 and t.impl == "loop":
        raise ConfigError(f"train.processes={t.processes}: train.impl=loop is the one-process oracle; use "
                          "train.processes=1 (or 0) with it, or train.impl=parallel")
    if t.processes > o.meta_batch:
        raise ConfigError(f"train.processes={t.processes}: more than outer.meta_batch={o.meta_batch}; every process "
                          "needs at least one task of each meta-batch")
    if not 0.0 < o.lr_step_gamma <= 1.0:
        raise ConfigError(f"outer.lr_step_gamma={o.lr_step_gamma}: must be in (0, 1]")
    for s in SECTIONS:  # a NaN or an infinity never makes sense and passes every comparison below
        for f in dataclasses.fields(getattr(cfg, s)):
            value = getattr(getattr(cfg, s), f.name)
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"{s}.{f.name}={value}: must be a finite number")
    if o.lr <= 0:
        raise ConfigError(f"outer.lr={o.lr}: must be > 0 (Adam's learning rate)")
    if o.eta_min < 0:
        raise ConfigError(f"outer.eta_min={o.eta_min}: must be >= 0")
    if d.image_size < 0 or d.channels < 0:
        raise ConfigError(f"data.image_size={d.image_size}, data.channels={d.channels}: must be >= 1 "
                          "(or 0 for the data set's own)")
    if t.precision == "bf16" and t.dtype != "float32":
        raise ConfigError(f"train.precision=bf16 mixes bfloat16 into float32 training; train.dtype={t.dtype} "
                          "must be float32")
    if t.eval_chunk < 0:
        raise ConfigError(f"train.eval_chunk={t.eval_chunk}: must be >= 1 (or 0 for auto)")
    if t.chunk < 0:
        raise ConfigError(f"train.chunk={t.chunk}: must be >= 1 (or 0 for auto)")
    if not 0.0 < t.budget <= 1.0:
        raise ConfigError(f"train.budget={t.budget}: must be in (0, 1], a fraction of the schedule")
    if i.eval_steps < 0:
        raise ConfigError(f"inner.eval_steps={i.eval_steps}: must be >= 1 (or 0 for 'same as inner.steps')")
    backbone = BACKBONES.get(m.arch)
    inputs = "vector" if d.dataset == "sinusoid" else "image"
    if backbone.inputs not in ("any", inputs):
        fitting = [n for n in BACKBONES.names() if BACKBONES.get(n).inputs == inputs]
        raise ConfigError(f"data.dataset={d.dataset} gives {inputs} inputs but model.arch={m.arch} takes "
                          f"{backbone.inputs} inputs; use model.arch={' or '.join(fitting)}")
    if hasattr(backbone, "check"):
        backbone.check(cfg)
    METHODS.get(cfg.method.name).check(cfg, backbone)
    if m.bn_eval == "running" and not m.bnrs:
        raise ConfigError("model.bn_eval=running needs per-step running statistics: set model.bnrs=true")
    if not 0.0 <= m.dropblock < 1.0:
        raise ConfigError(f"model.dropblock={m.dropblock}: must be in [0, 1), a drop probability (0: off)")
    if m.dropblock and m.arch != "resnet12":
        raise ConfigError(f"model.dropblock={m.dropblock}: DropBlock is part of model.arch=resnet12, "
                          f"not model.arch={m.arch}")
    if not 0.0 < m.bn_momentum <= 1.0:
        raise ConfigError(f"model.bn_momentum={m.bn_momentum}: must be in (0, 1]")
    for key, value in (("outer.grad_clamp", o.grad_clamp), ("outer.grad_norm_clip", o.grad_norm_clip)):
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value}: must be > 0 or none")
    if not 0.0 <= o.msl_floor * 1.0 < 1.0:
        raise ConfigError(f"outer.msl_floor={o.msl_floor}: must be in [0, 1)")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"outer.betas={o.betas}: expected two values in [0, 1), e.g. 0.9,0.999")
    if len(d.split_fractions) != 3 or abs(sum(d.split_fractions) - 1.0) > 1e-6:
        raise ConfigError(f"data.split_fractions={d.split_fractions}: expected three fractions summing to 1")

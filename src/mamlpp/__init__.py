"""mamlpp: fast, faithful MAML and MAML++ (Antoniou et al., ICLR 2019) and the few-shot methods it
is compared with, behind one trainer, test protocol and report.

The public API (docs/api.md): `preset`, `train`, `evaluate`, `load`, `task_source`, `Learner`, `ModuleBackbone`,
`Config`, `TestResult`; `METHODS` / `BACKBONES` and `Method` to add your own. Everything else is
internal and may change.
"""
from .config import BACKBONES, METHODS, Config, ConfigError, apply_overrides
from . import network, paper_backbones, resnet, methods  # noqa: F401,I001  (register the built-in backbones and methods first)
from .api import Learner, evaluate, load, preset, task_source, train
from .methods import Method
from .presets import PRESETS, get_preset
from .rundir import TestResult
from .usermodule import ModuleBackbone

__version__ = "0.1.0"
__all__ = ["preset", "train", "evaluate", "load", "task_source", "Learner", "ModuleBackbone", "Config", "ConfigError",
           "TestResult", "PRESETS", "get_preset", "apply_overrides", "METHODS", "BACKBONES", "Method",
           "__version__"]

"""mamlpp: fast, faithful MAML and MAML++ (Antoniou et al., ICLR 2019) and the few-shot methods it
is compared with, behind one trainer, test protocol and report."""
from .config import Config, ConfigError, apply_overrides
from . import network, resnet, methods  # noqa: F401,I001  (register the built-in backbones and methods first)
from .presets import PRESETS, get_preset

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "apply_overrides", "PRESETS", "get_preset", "__version__"]

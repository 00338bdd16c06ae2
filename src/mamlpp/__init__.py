"""mamlpp: fast, faithful MAML and MAML++ (Antoniou et al., ICLR 2019) for few-shot learning."""
from .config import Config, ConfigError, apply_overrides
from .presets import PRESETS, get_preset

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "apply_overrides", "PRESETS", "get_preset", "__version__"]

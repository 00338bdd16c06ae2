"""Few-shot methods behind one interface (base.py), registered by name (`method.name`).

maml         MAML, MAML++ (MSL, DA, BNRS, BNWB, LSLR, CA) and Meta-SGD (maml.py)
protonet     Prototypical Networks (protonet.py)
matchingnet  Matching Networks, with or without Full Context Embeddings (matchingnet.py)
siamese      Siamese Networks: pairs, weighted L1 distance, sigmoid (siamese.py)
memory       the Memory Module: key/value/age memory, margin loss, update rule (memory.py)

To add a method: a new module with a `Method` subclass decorated `@METHODS.register("name")`,
imported below (or by your own code before the config is built). The trainer does not change.
"""
from ..config import METHODS
from . import maml, matchingnet, memory, protonet, siamese  # noqa: F401  (registration)
from .base import Method, Params, flatten, leaves


def build_method(cfg, kind: str, input_shape: tuple[int, ...], num_outputs: int) -> Method:
    """The registered method that cfg.method.name names, built for these tasks."""
    return METHODS.get(cfg.method.name)(cfg, kind, input_shape, num_outputs)


__all__ = ["Method", "Params", "build_method", "flatten", "leaves"]

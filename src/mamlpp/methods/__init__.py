"""Few-shot methods behind one interface (base.py), registered by name (`method.name`).

maml         MAML, MAML++ (MSL, DA, BNRS, BNWB, LSLR, CA) and Meta-SGD (maml.py)
protonet     Prototypical Networks (protonet.py)
matchingnet  Matching Networks, with or without Full Context Embeddings (matchingnet.py)
metalstm     the Meta-LSTM learner of Ravi & Larochelle (metalstm.py)
statistician Neural Statistician: a generative model of sets, few-shot by context KL (statistician.py)
metanet      Meta Networks of Munkhdalai & Yu (metanet.py)
siamese      Siamese Networks: pairs, weighted L1 distance, sigmoid (siamese.py)
memory       the Memory Module: key/value/age memory, margin loss, update rule (memory.py)

To add a method: a new module with a `Method` subclass decorated `@METHODS.register("name")`,
imported below (or by your own code before the config is built). The trainer does not change.
"""
from ..config import METHODS
from . import maml, matchingnet, memory, metalstm, metanet, protonet, siamese, statistician  # noqa: F401  (registration)
from .base import Method, Params, flatten, leaves


def build_method(cfg, kind: str, input_shape: tuple[int, ...], num_outputs: int, backbone=None) -> Method:
    """The registered method that cfg.method.name names, built for these tasks (with a custom backbone
    factory instead of model.arch's, if given)."""
    return METHODS.get(cfg.method.name)(cfg, kind, input_shape, num_outputs, backbone)


__all__ = ["Method", "Params", "build_method", "flatten", "leaves"]

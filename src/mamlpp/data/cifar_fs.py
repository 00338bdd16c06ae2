"""CIFAR-FS (Bertinetto et al., ICLR 2019, "Meta-learning with differentiable closed-form solvers"):
CIFAR-100's 100 classes split 64/16/20 at random by the authors, all 600 32x32 images of each.

The lists are the authors' split (their repository's data/cifar-fs/splits/bertinetto/{train,val,test}.txt),
as torchmeta ships it: tristandeleu/pytorch-meta, torchmeta/datasets/assets/cifar100/cifar-fs/
{train,val,test}.json (pairs [superclass, class]; the class names are kept here, in that order).
"""
from __future__ import annotations

from pathlib import Path

from .cifar100 import split_set
from .common import ImageSet

SOURCE = "Bertinetto et al. 2019 (CIFAR-FS), 64/16/20 classes"

SPLIT = {
    "train": [
        "dolphin", "seal", "aquarium_fish", "ray", "trout", "orchid", "sunflower", "tulip", "bottle", "bowl",
        "can", "cup", "plate", "apple", "mushroom", "orange", "pear", "clock", "keyboard", "chair", "couch",
        "bee", "caterpillar", "cockroach", "bear", "lion", "tiger", "wolf", "bridge", "castle", "house", "road",
        "skyscraper", "cloud", "forest", "mountain", "elephant", "kangaroo", "porcupine", "possum", "raccoon",
        "skunk", "lobster", "spider", "boy", "girl", "dinosaur", "lizard", "snake", "turtle", "hamster", "mouse",
        "rabbit", "shrew", "squirrel", "oak_tree", "palm_tree", "pine_tree", "willow_tree", "bus", "train",
        "lawn_mower", "streetcar", "tank",
    ],
    "val": [
        "beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle", "butterfly", "sea", "camel",
        "cattle", "crab", "crocodile", "maple_tree", "motorcycle", "tractor",
    ],
    "test": [
        "whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table", "wardrobe", "leopard", "plain",
        "chimpanzee", "fox", "snail", "worm", "baby", "man", "woman", "bicycle", "pickup_truck", "rocket",
    ],
}


def load_cifar_fs(data_cfg, root: Path, cache_root: Path, force: bool = False, fetch=None) -> ImageSet:
    """CIFAR-FS over the CIFAR-100 cache (built, and the archive fetched with `fetch`, if needed)."""
    return split_set("cifar_fs", data_cfg, root, cache_root, force, fetch, lambda manifest: SPLIT, "CIFAR-FS", SOURCE)

"""FC100 (Oreshkin et al., NeurIPS 2018, "TADAM: Task dependent adaptive metric for improved few-shot
learning"): CIFAR-100 split by superclass, 12/4/4 superclasses = 60/20/20 classes, all 600 32x32
images of each, so that no superclass spans two splits.

The superclass lists are TADAM's (ElementAI/TADAM: class_split = {'train': {1, 2, 3, 4, 5, 6, 9, 10, 15,
17, 18, 19}, 'val': {8, 11, 13, 16}, 'test': {0, 7, 12, 14}} over CIFAR-100's coarse label indices),
named as torchmeta names them (tristandeleu/pytorch-meta, torchmeta/datasets/assets/cifar100/fc100/
{train,val,test}.json). A split's classes are the archive's fine classes whose superclass (coarse
label) is listed.
"""
from __future__ import annotations

from pathlib import Path

from .cifar100 import split_set
from .common import DataError, ImageSet

SOURCE = "Oreshkin et al. 2018 (FC100), superclasses 12/4/4 = 60/20/20 classes"

SUPERCLASSES = {
    "train": ["fish", "flowers", "food_containers", "fruit_and_vegetables", "household_electrical_devices",
              "household_furniture", "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "reptiles",
              "trees", "vehicles_1", "vehicles_2"],
    "val": ["large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals"],
    "test": ["aquatic_mammals", "insects", "medium_mammals", "people"],
}


def class_lists(manifest: dict) -> dict[str, list[str]]:
    """{split: fine class names} from each class's superclass in the CIFAR-100 cache manifest."""
    source = manifest["sources"]["path"]
    found = set(manifest["superclasses"])
    lists = {}
    for split, supers in SUPERCLASSES.items():
        missing = [s for s in supers if s not in found]
        if missing:
            raise DataError(f"{source}: has no superclass {missing[0]!r} of the FC100 {split} split "
                            "(meta's coarse_label_names with at least one class)")
        lists[split] = [c for c, s in zip(manifest["classes"], manifest["superclasses"]) if s in supers]
    return lists


def load_fc100(data_cfg, root: Path, cache_root: Path, force: bool = False, fetch=None) -> ImageSet:
    """FC100 over the CIFAR-100 cache (built, and the archive fetched with `fetch`, if needed)."""
    return split_set("fc100", data_cfg, root, cache_root, force, fetch, class_lists, "FC100", SOURCE)

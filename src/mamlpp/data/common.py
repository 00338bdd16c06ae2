"""Shared pieces of the image-data layer: the error type, where data and caches live, and the
in-memory form every data set is reduced to (`ImageSet`)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np


class DataError(ValueError):
    """Data that cannot be used. The message names the file or folder and the problem, and is
    raised before training starts."""


SPLITS = ("train", "val", "test")
# Files that image folders may hold; anything else (README, .DS_Store, ...) is ignored.
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})

# ImageNet statistics used by the reference for Mini-ImageNet (spec 6.2), per RGB channel.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# CIFAR-100's per-channel statistics as CIFAR-FS and FC100 code normalises with them since MetaOptNet
# (kjunelee/MetaOptNet, data/CIFAR_FS.py and data/FC100.py: mean_pix, std_pix on the 0-255 scale).
CIFAR100_MEAN = (129.37731888 / 255, 124.10583864 / 255, 112.47758569 / 255)
CIFAR100_STD = (68.20947949 / 255, 65.43124043 / 255, 70.45866994 / 255)
# ImageSet.norm -> (mean, std) per channel of x/255; 'unit' is x/255 alone, 'none' the stored values.
NORM_STATS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}


def _env(name: str) -> str | None:
    """An environment variable, with an empty value treated as unset."""
    value = os.environ.get(name, "").strip()
    return value or None


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/mamlpp, else ~/.cache/mamlpp."""
    base = _env("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "mamlpp"


def resolve_data_root(data_dir: str | os.PathLike | None = None, cfg_data_dir: str = "") -> Path:
    """Where data sets live: --data-dir, then data.data_dir, then $MAMLPP_DATA, then the user
    cache directory. Omniglot is looked for at ROOT/omniglot, Mini-ImageNet at ROOT/mini_imagenet."""
    for candidate in (data_dir, cfg_data_dir, _env("MAMLPP_DATA")):
        if candidate:
            return Path(candidate).expanduser()
    return user_cache_dir()


def resolve_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where decoded caches go: the argument, then $MAMLPP_CACHE, then USER_CACHE/cache.
    Kept apart from the data root because that one may be read-only (CI's shared copy)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = _env("MAMLPP_CACHE")
    return Path(env).expanduser() if env else user_cache_dir() / "cache"


@dataclass
class Split:
    """The classes of one split. `classes` index ImageSet.class_names; `rotations` is a fixed
    k*90 degree rotation per class (the Vinyals split's rotated classes), zero otherwise."""

    classes: np.ndarray  # int64 [n]
    rotations: np.ndarray  # int64 [n], values 0..3
    names: list[str]  # display names, e.g. "Angelic/character01/rot090"


@dataclass
class ImageSet:
    """A decoded data set: every image of every class, class-major, as uint8 [n, C, H, W] (a
    read-only memory map of the cache, so large sets are never copied into RAM), plus splits."""

    dataset: str
    images: np.ndarray  # uint8 [n_images, C, H, W]
    class_names: list[str]
    offsets: np.ndarray  # int64 [n_classes + 1]: class c owns images offsets[c]:offsets[c+1]
    splits: dict[str, Split]
    # 'none': values used as stored (Omniglot {0,1}); 'unit': x/255; 'imagenet', 'cifar100': x/255,
    # then that data set's per-channel mean/std (NORM_STATS).
    norm: Literal["none", "unit", "imagenet", "cifar100"]
    cache_path: Path | None = None
    sources: dict[str, str] = field(default_factory=dict)  # source name -> checksum/fingerprint
    split_source: str = ""  # where a fixed class split comes from, for `mamlpp data check`

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def split_sizes(self) -> dict[str, dict[str, int]]:
        counts = self.counts
        return {name: {"classes": len(s.classes), "images": int(counts[s.classes].sum())}
                for name, s in self.splits.items()}


def check_member_name(archive: Path, member: str, what: str) -> None:
    """Refuse archive members whose names could point outside the archive's own folder (absolute
    paths, drive letters, '..' components); `what` names the archive expected, for the message."""
    p = member.replace("\\", "/")
    if p.startswith("/") or (len(p) > 1 and p[1] == ":" and p[0].isalpha()) or ".." in p.split("/"):
        raise DataError(f"{archive}: member {member!r} has an absolute path or a '..' component; "
                        f"refusing to read this archive (it is not a genuine {what})")


def fixed_splits(class_names: list[str], lists: dict[str, list[str]], source: Path | str, what: str) -> dict[str, Split]:
    """Splits given by name lists (published class splits): every listed name must be a class of
    the data (else a DataError naming `source`), in the order the data has them."""
    index = {c: i for i, c in enumerate(class_names)}
    splits = {}
    for split in SPLITS:
        missing = [c for c in lists[split] if c not in index]
        if missing:
            more = f" ({len(missing)} of its {len(lists[split])} classes are missing)" if len(missing) > 1 else ""
            raise DataError(f"{source}: has no class {missing[0]!r} of the {what} {split} split{more}")
        splits[split] = plain_split(sorted(index[c] for c in lists[split]), class_names)
    return splits


def offsets_from_counts(counts) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).astype(np.int64)


def plain_split(classes, class_names: list[str]) -> Split:
    classes = np.asarray(classes, dtype=np.int64)
    return Split(classes, np.zeros(len(classes), dtype=np.int64), [class_names[c] for c in classes])


def shuffled_split(class_names: list[str], fractions, seed: int = 985773, exact: bool = False) -> dict[str, Split]:
    """The reference's class split (spec 6.1): shuffle arange(n) with RandomState(seed), cut at
    int(f0*n) and int((f0+f1)*n). exact=False also keeps every split with a positive fraction
    non-empty, which small user folders need (int() would round a 0.16 split of 6 classes to 0)."""
    n = len(class_names)
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    f0, f1 = fractions[0], fractions[1]
    cut1, cut2 = int(f0 * n), int((f0 + f1) * n)
    if not exact:
        n_val = max(cut2 - cut1, 1 if f1 > 0 else 0)
        n_test = max(n - cut2, 1 if fractions[2] > 0 else 0)
        cut2 = n - n_test
        cut1 = max(cut2 - n_val, 0)
    parts = {"train": order[:cut1], "val": order[cut1:cut2], "test": order[cut2:]}
    return {k: plain_split(v, class_names) for k, v in parts.items()}

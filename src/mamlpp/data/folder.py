"""Image folders: root/CLASS/IMAGE or root/{train,val,test}/CLASS/IMAGE, decoded once into the cache.

The same machinery caches Mini-ImageNet's folder and CSV layouts: every source is first reduced to
a list of `ClassFiles`, then decoded in parallel (PIL, converted to RGB or L, resized bicubic, the
default filter of current Pillow and so of the reference's Mini-ImageNet pipeline).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .cache import entry_dir, listing_fingerprint, load_entry, write_entry
from .common import IMAGE_EXTS, SPLITS, DataError, ImageSet, offsets_from_counts, plain_split, shuffled_split
from .decode import decode_into, open_image, to_chw

_CHUNK = 256  # images per decoding job


@dataclass
class ClassFiles:
    name: str  # unique class name; "split/name" when the source is pre-split
    split: str | None  # None: assigned later by the seeded class split
    files: list[Path]


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".") and p.is_file())


def scan_classes(root: Path, split: str | None = None) -> list[ClassFiles]:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise DataError(f"{root}: no class folders; expected {root}/CLASS/IMAGE files")
    classes = []
    for d in subdirs:
        files = list_images(d)
        if not files:
            raise DataError(f"{d}: empty class folder (no files ending in {', '.join(sorted(IMAGE_EXTS))})")
        classes.append(ClassFiles(f"{split}/{d.name}" if split else d.name, split, files))
    return classes


def scan_folder(root: Path) -> list[ClassFiles]:
    """Classes of root/CLASS/* or, when root has train/ val/ test/ folders, of each of those."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    present = [s for s in SPLITS if (root / s).is_dir()]
    if not present:
        return scan_classes(root)
    if len(present) < len(SPLITS):
        missing = [s for s in SPLITS if s not in present]
        raise DataError(f"{root}: has {'/, '.join(present)}/ but not {'/, '.join(missing)}/; a pre-split "
                        "folder needs train/, val/ and test/ (or use root/CLASS/* for a seeded split)")
    return [c for s in SPLITS for c in scan_classes(root / s, s)]


def decode_files(payload) -> np.ndarray:
    """Worker: decode image files to uint8 [m, C, size, size]."""
    paths, size, mode = payload
    return np.stack([to_chw(open_image(p, p), size, mode, Image.BICUBIC) for p in paths])


def cached_classes(classes: list[ClassFiles], dataset: str, layout: str, root: Path, size: int,
                   channels: int, cache_root: Path, force: bool = False, extra_key: dict | None = None):
    """Decode `classes` into the cache (once) and return (images, manifest, cache folder, fingerprint)."""
    fingerprint = "listing:" + listing_fingerprint((f for c in classes for f in c.files), root)
    key = {"dataset": dataset, "layout": layout, "source": fingerprint, "size": size, "channels": channels,
           **(extra_key or {})}
    folder = entry_dir(cache_root, dataset, key)
    loaded = None if force else load_entry(folder)
    if loaded is None:
        mode = "RGB" if channels == 3 else "L"
        jobs, start = [], 0
        for c in classes:
            for i in range(0, len(c.files), _CHUNK):
                chunk = [str(p) for p in c.files[i:i + _CHUNK]]
                jobs.append((start, (chunk, size, mode)))
                start += len(chunk)
        manifest = {
            "dataset": dataset, "layout": layout, "sources": {"root": str(root), "checksum": fingerprint},
            "preprocess": {"size": size, "channels": channels, "resample": "bicubic"},
            "classes": [c.name for c in classes], "counts": [len(c.files) for c in classes],
            "class_splits": [c.split for c in classes],
        }
        loaded = write_entry(folder, (start, channels, size, size), manifest,
                             lambda out: decode_into(out, decode_files, jobs, desc=f"decoding {dataset}"))
    return loaded[0], loaded[1], folder, fingerprint


def image_set(dataset: str, images, manifest: dict, folder: Path, sources: dict, fractions) -> ImageSet:
    """An ImageSet from a cache manifest: its own splits when pre-split, else the seeded class split
    (fixed seed, so it does not move with train.seed)."""
    names = manifest["classes"]
    class_splits = manifest.get("class_splits") or [None] * len(names)
    if all(s is not None for s in class_splits):
        splits = {s: plain_split([i for i, cs in enumerate(class_splits) if cs == s], names) for s in SPLITS}
    else:
        splits = shuffled_split(names, fractions)
    norm = "imagenet" if images.shape[1] == 3 else "unit"
    return ImageSet(dataset, images, names, offsets_from_counts(manifest["counts"]), splits, norm,
                    cache_path=folder, sources=sources)


def load_folder(data_cfg, root: Path, cache_root: Path, force: bool = False) -> ImageSet:
    """A user's image folder (data.dataset=folder): size data.image_size (default 84), channels
    data.channels (1 or 3, default 3), split by data.split_fractions unless pre-split."""
    size, channels = data_cfg.image_size or 84, data_cfg.channels or 3
    if channels not in (1, 3):
        raise DataError(f"data.channels={channels}: image folders support 1 (grayscale) or 3 (RGB)")
    root = Path(root)
    classes = scan_folder(root)
    images, manifest, folder, fp = cached_classes(classes, "folder", "folder", root, size, channels, cache_root, force)
    return image_set("folder", images, manifest, folder, {str(root): fp}, data_cfg.split_fractions)

"""Mini-ImageNet in any of its three common forms, cached as uint8 [n, 3, 84, 84]:

1. pre-split folders  train|val|test/<wnid>/*.jpg  (the MAML++ authors' mini_imagenet_full_size);
2. one flat folder images/*.jpg plus the Ravi & Larochelle split CSVs (filename,label), looked for
   beside images/, then in splits/ravi/, then in a csv_dir the caller names;
3. the pickles mini-imagenet-cache-{train,val,test}.pkl (image_data uint8 [n, 84, 84, 3],
   class_dict {wnid: [indices]}).
They are looked for in DATA_ROOT/mini_imagenet, then in DATA_ROOT itself.
"""
from __future__ import annotations

import csv
import hashlib
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from .cache import entry_dir, load_entry, sha256_file, write_entry
from .common import SPLITS, DataError, ImageSet
from .folder import ClassFiles, cached_classes, image_set, scan_classes
from .safepickle import ArrayUnpickler as _ArrayUnpickler

PICKLES = {s: f"mini-imagenet-cache-{s}.pkl" for s in SPLITS}
LAYOUTS = ("train/ val/ test/ folders of <wnid>/*.jpg",
           "images/*.jpg with train.csv val.csv test.csv (beside images/ or in splits/ravi/)",
           "mini-imagenet-cache-{train,val,test}.pkl")


def find_layout(root: Path, csv_dirs: list[Path] = ()) -> tuple[str, Path, Path | None]:
    """(layout, base folder, CSV folder or None). CSVs: beside images/, in splits/ravi/, then csv_dirs."""
    bases = [Path(root) / "mini_imagenet", Path(root)]
    for base in bases:
        if all((base / s).is_dir() for s in SPLITS):
            return "folders", base, None
        if all((base / p).is_file() for p in PICKLES.values()):
            return "pickles", base, None
        if (base / "images").is_dir():
            places = [base, base / "splits" / "ravi", *map(Path, csv_dirs)]
            for place in places:
                if all((place / f"{s}.csv").is_file() for s in SPLITS):
                    return "csv", base, place
            raise DataError(f"{base / 'images'} needs the split files train.csv, val.csv and test.csv "
                            f"(filename,label) in one of: {', '.join(map(str, places))}")
    raise DataError(f"Mini-ImageNet not found in {bases[0]} or {bases[1]}; expected one of: " + "; ".join(LAYOUTS))


def is_plain_name(name: str) -> bool:
    """A bare file name: no folder part, not absolute, not '.' or '..'. Anything else could name a
    file outside images/ ('../x.jpg', '/etc/x.jpg') or one the cache cannot key relative to it."""
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and Path(name).name == name


def read_split_csv(path: Path, images_dir: Path, split: str) -> list[ClassFiles]:
    """Classes of one Ravi & Larochelle CSV; every file it names must be a plain name that exists."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise DataError(f"{path}: expected the header 'filename,label'")
    by_label: dict[str, list[Path]] = {}
    for lineno, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) != 2:
            raise DataError(f"{path}:{lineno}: expected 'filename,label', got {row!r}")
        name = row[0].strip()
        if not is_plain_name(name):  # checked before any file is looked at or decoded
            raise DataError(f"{path}:{lineno}: file name {name!r} is not a plain file name inside "
                            f"{images_dir}; expected a bare name such as n0153282900000005.jpg (no folders, "
                            "'..' or leading '/')")
        by_label.setdefault(row[1].strip(), []).append(images_dir / name)
    missing = [p.name for files in by_label.values() for p in files if not p.is_file()]
    if missing:
        n = sum(map(len, by_label.values()))
        raise DataError(f"{path}: {len(missing)} of the {n} files it names are missing from {images_dir} "
                        f"(e.g. {', '.join(missing[:5])})")
    if not by_label:
        raise DataError(f"{path}: names no images")
    return [ClassFiles(f"{split}/{label}", split, sorted(files)) for label, files in sorted(by_label.items())]


def read_pickle(path: Path) -> tuple[np.ndarray, dict[str, list[int]]]:
    try:
        with open(path, "rb") as f:
            payload = _ArrayUnpickler(f, encoding="latin1").load()  # latin1: Python 2 pickles
        images, class_dict = payload["image_data"], payload["class_dict"]
    except (pickle.UnpicklingError, EOFError, OSError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise DataError(f"{path}: not a Mini-ImageNet pickle with image_data and class_dict ({e!r})") from e
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3):
        raise DataError(f"{path}: image_data must be uint8 [n, H, W, 3], got {getattr(images, 'dtype', type(images))} "
                        f"{getattr(images, 'shape', '')}")
    classes = {}
    for wnid, idx in class_dict.items():
        wnid = wnid.decode() if isinstance(wnid, bytes) else str(wnid)
        idx = [int(i) for i in idx]
        if not idx or min(idx) < 0 or max(idx) >= len(images):
            raise DataError(f"{path}: class {wnid} has no or out-of-range image indices")
        classes[wnid] = idx
    return images, classes


def _pickle_class_lists(base: Path) -> dict[str, dict[str, int]]:
    """Per split, {wnid: image count}, read without keeping the images."""
    return {s: {w: len(i) for w, i in sorted(read_pickle(base / PICKLES[s])[1].items())} for s in SPLITS}


def _cached_pickles(base: Path, size: int, cache_root: Path, force: bool):
    stamp = {s: f"{(base / p).stat().st_size}:{(base / p).stat().st_mtime_ns}" for s, p in PICKLES.items()}
    fingerprint = "stat:" + hashlib.sha256(repr(sorted(stamp.items())).encode()).hexdigest()
    key = {"dataset": "mini_imagenet", "layout": "pickles", "source": fingerprint, "size": size, "channels": 3}
    folder = entry_dir(cache_root, "mini_imagenet", key)
    loaded = None if force else load_entry(folder)
    if loaded is None:
        order: list[tuple[str, str]] = []  # (split, wnid) in cache order
        counts: list[int] = []

        def fill(out: np.ndarray) -> None:
            start = 0
            for s in SPLITS:  # one pickle in memory at a time
                images, classes = read_pickle(base / PICKLES[s])
                for wnid, idx in sorted(classes.items()):
                    block = images[idx]
                    if block.shape[1:3] != (size, size):
                        block = np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC))
                                          for a in block])
                    out[start:start + len(idx)] = block.transpose(0, 3, 1, 2)
                    start += len(idx)

        # The cache's shape must be known before writing, so the pickles are read twice: once for
        # their class lists here, once for the images in fill(). A one-off cost at preparation.
        lists = _pickle_class_lists(base)
        for s in SPLITS:
            for wnid, n in lists[s].items():
                order.append((s, wnid))
                counts.append(n)
        manifest = {"dataset": "mini_imagenet", "layout": "pickles",
                    "sources": {"root": str(base), "checksum": fingerprint},
                    "preprocess": {"size": size, "channels": 3, "resample": "bicubic"},
                    "classes": [f"{s}/{w}" for s, w in order], "counts": counts,
                    "class_splits": [s for s, _ in order]}
        loaded = write_entry(folder, (sum(counts), 3, size, size), manifest, fill)
    return loaded[0], loaded[1], folder, fingerprint


def load_mini_imagenet(data_cfg, root: Path, cache_root: Path, force: bool = False,
                       csv_dirs: list[Path] = ()) -> ImageSet:
    size = data_cfg.image_size or 84
    if data_cfg.channels not in (0, 3):
        raise DataError(f"data.channels={data_cfg.channels}: Mini-ImageNet images have 3 channels")
    layout, base, csvs = find_layout(root, csv_dirs)
    if layout == "pickles":
        images, manifest, folder, fp = _cached_pickles(base, size, cache_root, force)
    else:
        extra = {}
        if layout == "folders":
            classes = [c for s in SPLITS for c in scan_classes(base / s, s)]
        else:
            classes = [c for s in SPLITS for c in read_split_csv(csvs / f"{s}.csv", base / "images", s)]
            extra = {"csv": {s: sha256_file(csvs / f"{s}.csv") for s in SPLITS}}
        images, manifest, folder, fp = cached_classes(classes, "mini_imagenet", layout, base, size, 3,
                                                      cache_root, force, extra)
    return image_set("mini_imagenet", images, manifest, folder, {str(base): fp}, (0.64, 0.16, 0.20))

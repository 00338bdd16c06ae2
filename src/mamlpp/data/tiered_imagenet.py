"""tieredImageNet (Ren et al., ICLR 2018, "Meta-learning for semi-supervised few-shot classification"):
608 ImageNet classes under 34 higher-level categories, split 351/97/160 classes by category, 84x84,
cached as memory-mapped uint8 [n, 3, 84, 84] (16 GB for the whole set: never decoded into RAM at once,
and above the sampler's device limit, so only each batch's images go to an accelerator).

Layouts, looked for in DATA_ROOT/tiered_imagenet, then DATA_ROOT/tiered_imagenet/tiered-imagenet (the
folder the release's tiered-imagenet.tar extracts to), then DATA_ROOT:

1. the release's pickles, as Ren et al.'s code writes them and learn2learn and torchmeta read them
   (tristandeleu/pytorch-meta, torchmeta/datasets/tieredimagenet.py): per split,
   {split}_images_png.pkl, a list of PNG-encoded images (uint8 arrays from cv2.imencode, or bytes),
   and {split}_labels.pkl, a dict whose 'label_specific' [n] indexes 'label_specific_str' (that split's
   class wnids); 'label_general' / 'label_general_str' (the categories) are not needed;
2. image folders train|val|test/<wnid>/*.{jpg,png} (decoded as Mini-ImageNet's folders are).

The image pickles are read as a stream (safepickle.stream_list): one batch of encoded images is in
memory at a time, decoded in parallel straight into the cache's memory map at each image's class-major
row. The pickles are keyed by size and modification time (hashing 12 GB would take minutes), as
Mini-ImageNet's are.
"""
from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .cache import entry_dir, load_entry, write_entry
from .common import SPLITS, DataError, ImageSet
from .decode import _SERIAL_BELOW, open_image, to_chw
from .folder import cached_classes, image_set, scan_classes
from .safepickle import ArrayUnpickler, stream_list

SIZE = 84
PICKLES = {s: (f"{s}_images_png.pkl", f"{s}_labels.pkl") for s in SPLITS}
LAYOUTS = ("{train,val,test}_images_png.pkl with {train,val,test}_labels.pkl",
           "train/ val/ test/ folders of <wnid>/*.jpg or *.png")
_BATCH = 2048  # encoded images decoded per round
_BLOCK = 256  # images per decoding job


def search_dirs(root: Path) -> list[Path]:
    return [Path(root) / "tiered_imagenet", Path(root) / "tiered_imagenet" / "tiered-imagenet", Path(root)]


def find_layout(root: Path) -> tuple[str, Path]:
    """('pickles' | 'folders', base folder). A base with only some of the six pickles, or only some
    of the split folders, is an error naming what is missing (not a silent fall-through)."""
    bases = search_dirs(root)
    for base in bases:
        files = [f for s in SPLITS for f in PICKLES[s]]
        present = [f for f in files if (base / f).is_file()]
        if len(present) == len(files):
            return "pickles", base
        if present:
            missing = [f for f in files if f not in present]
            raise DataError(f"{base}: has {', '.join(present)} but not {', '.join(missing)}; tieredImageNet's "
                            "pickles are {split}_images_png.pkl with {split}_labels.pkl for train, val and test")
        dirs = [s for s in SPLITS if (base / s).is_dir()]
        if len(dirs) == len(SPLITS):
            return "folders", base
        if dirs and base != Path(root):
            raise DataError(f"{base}: has {'/, '.join(dirs)}/ but not {'/, '.join(s for s in SPLITS if s not in dirs)}/; "
                            "tieredImageNet's folders are train/, val/ and test/, each of <wnid>/ image folders")
    raise DataError(f"tieredImageNet not found in {bases[0]}, {bases[1]} or {bases[2]}; expected one of: "
                    + "; ".join(LAYOUTS))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_labels(path: Path) -> tuple[np.ndarray, list[str]]:
    """(label per image [n] int64, class wnids) of one {split}_labels.pkl, checked."""
    try:
        with open(path, "rb") as f:
            d = ArrayUnpickler(f, encoding="latin1").load()
        if not isinstance(d, dict):
            raise TypeError(f"a {type(d).__name__}, not a dict")
        d = {_text(k): v for k, v in d.items()}
        labels, names = d["label_specific"], d["label_specific_str"]
        labels = np.asarray(labels)
        names = [_text(n) for n in names]
    except (pickle.UnpicklingError, EOFError, OSError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise DataError(f"{path}: not a tieredImageNet label file, a dict with label_specific (an int per image) "
                        f"and label_specific_str (the class names) ({e!r})") from e
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: label_specific must be one integer per image, got {labels.dtype} {labels.shape}")
    labels = labels.astype(np.int64)
    if not names or len(set(names)) != len(names):
        raise DataError(f"{path}: label_specific_str must name distinct classes ({len(names)} names, "
                        f"{len(set(names))} distinct)")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise DataError(f"{path}: label_specific holds {int(labels.min())}..{int(labels.max())}, but "
                        f"label_specific_str names {len(names)} classes")
    counts = np.bincount(labels, minlength=len(names))
    if (counts == 0).any():
        empty = np.flatnonzero(counts == 0)
        raise DataError(f"{path}: class {names[empty[0]]} has no images"
                        + (f" ({len(empty)} such classes)" if len(empty) > 1 else ""))
    return labels, names


def _png_bytes(item, where: str) -> bytes:
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()  # cv2.imencode's [n, 1] buffer, or [n]
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str):  # a Python 2 str read as latin1
        return item.encode("latin1")
    raise DataError(f"{where}: expected PNG-encoded bytes (a uint8 array or bytes), got "
                    f"{type(item).__name__} {getattr(item, 'dtype', '')}")


def decode_pngs(payload) -> np.ndarray:
    """Worker: encoded images -> uint8 [m, 3, size, size]."""
    blobs, size, names = payload
    return np.stack([to_chw(open_image(io.BytesIO(b), name), size, "RGB", Image.BICUBIC)
                     for b, name in zip(blobs, names)])


def _fingerprint(base: Path) -> str:
    stamp = {f: f"{(base / f).stat().st_size}:{(base / f).stat().st_mtime_ns}" for s in SPLITS for f in PICKLES[s]}
    return "stat:" + hashlib.sha256(repr(sorted(stamp.items())).encode()).hexdigest()


def _cached_pickles(base: Path, size: int, cache_root: Path, force: bool):
    fingerprint = _fingerprint(base)
    key = {"dataset": "tiered_imagenet", "layout": "pickles", "source": fingerprint, "size": size, "channels": 3}
    folder = entry_dir(cache_root, "tiered_imagenet", key)
    loaded = None if force else load_entry(folder)
    if loaded is None:
        labels = {s: read_labels(base / PICKLES[s][1]) for s in SPLITS}
        classes, counts, class_splits, rows = [], [], [], {}
        start = 0
        for s in SPLITS:
            lab, names = labels[s]
            n = np.bincount(lab, minlength=len(names))
            offsets = start + np.concatenate([[0], np.cumsum(n)[:-1]])
            order = np.argsort(lab, kind="stable")  # pickle position -> class-major row
            row = np.empty(len(lab), dtype=np.int64)
            row[order] = offsets[lab[order]] + (np.arange(len(lab)) - np.repeat(np.cumsum(n) - n, n))
            rows[s] = row
            classes += [f"{s}/{w}" for w in names]
            counts += n.tolist()
            class_splits += [s] * len(names)
            start += len(lab)

        def fill(out: np.ndarray) -> None:
            workers = min(os.cpu_count() or 1, 8)
            pool = None
            if workers > 1 and start >= _SERIAL_BELOW:
                method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
                pool = multiprocessing.get_context(method).Pool(workers)
            try:
                with tqdm(total=start, desc="decoding tieredImageNet", unit="img", disable=None, leave=False) as bar:
                    for s in SPLITS:
                        _stream_split(base / PICKLES[s][0], rows[s], size, out, pool, bar)
            finally:
                if pool is not None:
                    pool.terminate()
                    pool.join()

        manifest = {"dataset": "tiered_imagenet", "layout": "pickles",
                    "sources": {"root": str(base), "checksum": fingerprint},
                    "preprocess": {"size": size, "channels": 3, "resample": "bicubic"},
                    "classes": classes, "counts": counts, "class_splits": class_splits}
        loaded = write_entry(folder, (start, 3, size, size), manifest, fill)
    return loaded[0], loaded[1], folder, fingerprint


def _stream_split(path: Path, rows: np.ndarray, size: int, out: np.ndarray, pool, bar) -> None:
    """Decode one {split}_images_png.pkl into `out` at `rows` (its images' class-major rows)."""
    pending: list[bytes] = []
    done = 0

    def flush() -> None:
        nonlocal done
        names = [f"{path}: image {done + i}" for i in range(len(pending))]
        jobs = [(pending[i:i + _BLOCK], size, names[i:i + _BLOCK]) for i in range(0, len(pending), _BLOCK)]
        blocks = pool.map(decode_pngs, jobs) if pool is not None and len(jobs) > 1 else map(decode_pngs, jobs)
        for i, block in zip(range(0, len(pending), _BLOCK), blocks):
            out[rows[done + i:done + i + len(block)]] = block
        bar.update(len(pending))
        done += len(pending)
        pending.clear()

    def take(items: list) -> None:
        first = done + len(pending)
        if first + len(items) > len(rows):
            raise DataError(f"{path}: holds more than the {len(rows)} images its label file lists")
        pending.extend(_png_bytes(item, f"{path}: image {first + i}") for i, item in enumerate(items))
        if len(pending) >= _BATCH:
            flush()

    try:
        with open(path, "rb") as f:
            count = stream_list(f, take)
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, OSError, TypeError, AttributeError, ValueError, IndexError) as e:
        raise DataError(f"{path}: not a tieredImageNet image pickle, a list of PNG-encoded images ({e!r})") from e
    if pending:
        flush()
    if count != len(rows):
        raise DataError(f"{path}: holds {count} images, but its label file lists {len(rows)}")


def load_tiered_imagenet(data_cfg, root: Path, cache_root: Path, force: bool = False) -> ImageSet:
    size = data_cfg.image_size or SIZE
    if data_cfg.channels not in (0, 3):
        raise DataError(f"data.channels={data_cfg.channels}: tieredImageNet images have 3 channels")
    layout, base = find_layout(root)
    if layout == "pickles":
        images, manifest, folder, fp = _cached_pickles(base, size, cache_root, force)
    else:
        classes = [c for s in SPLITS for c in scan_classes(base / s, s)]
        images, manifest, folder, fp = cached_classes(classes, "tiered_imagenet", layout, base, size, 3,
                                                      cache_root, force)
    data = image_set("tiered_imagenet", images, manifest, folder, {str(base): fp}, (0.64, 0.16, 0.20))
    data.split_source = "Ren et al. 2018 (tieredImageNet), the release's own train/val/test"
    return data

"""CIFAR-100's python archive -> one uint8 [60000, 3, 32, 32] cache; CIFAR-FS (cifar_fs.py) and FC100
(fc100.py) are class splits of it and share the cache.

Source, looked for in DATA_ROOT/cifar100, then DATA_ROOT: the archive cifar-100-python.tar.gz
(preferred: it has a checksum; downloaded with MD5 verification when neither form is there, see
download.py) or its extracted folder cifar-100-python/ with the pickles train, test and meta. The
archive is read in place: members are never extracted to disk, and a member whose name could point
outside it is refused. Pickles are read with numpy arrays and plain containers only (safepickle.py).

Both few-shot splits use all 600 images of a class (its 500 in `train`, then its 100 in `test`). The
cache is class-major in the order of meta's fine_label_names; its manifest keeps each class's
superclass (coarse label), which FC100 splits by. Other sizes than 32 (data.image_size) are resized
bicubic, as the other data sets are.
"""
from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .cache import entry_dir, listing_fingerprint, load_entry, sha256_file, write_entry
from .common import DataError, ImageSet, check_member_name, fixed_splits, offsets_from_counts
from .safepickle import ArrayUnpickler

ARCHIVE = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
MEMBERS = ("train", "test", "meta")
SIZE = 32
# Where the archive is published, and its MD5 as torchvision checks it (pytorch/vision,
# torchvision/datasets/cifar.py: CIFAR100.url and CIFAR100.tgz_md5).
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
WHAT = "CIFAR-100 python archive"


def search_dirs(root: Path) -> list[Path]:
    """ROOT/cifar100 first (the data-root layout), then ROOT itself."""
    return [Path(root) / "cifar100", Path(root)]


def find_source(root: Path) -> Path | None:
    """The archive (preferred) or the extracted folder, whichever is found first."""
    for d in search_dirs(root):
        if (d / ARCHIVE).is_file():
            return d / ARCHIVE
        if (d / FOLDER).is_dir():
            return d / FOLDER
    return None


def _checked_members(path: Path, tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    infos = tar.getmembers()
    for info in infos:
        check_member_name(path, info.name, WHAT)
    return {info.name.rstrip("/"): info for info in infos if info.isfile()}


def archive_members(path: Path) -> dict[str, tarfile.TarInfo]:
    """The archive's regular-file members by name, refusing names that could escape it."""
    try:
        with tarfile.open(path, "r:*") as tar:
            return _checked_members(path, tar)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{path}: not a readable tar.gz archive ({e}); delete it and fetch it again") from e


def read_members(path: Path) -> dict[str, bytes]:
    """The bytes of train, test and meta, from the archive or the extracted folder. Anything missing
    or unreadable is a DataError naming the file and what was expected."""
    path = Path(path)
    out = {}
    if path.is_dir():
        for m in MEMBERS:
            try:
                out[m] = (path / m).read_bytes()
            except OSError as e:
                raise DataError(f"{path}: cannot read {m} ({e.strerror or e}); the extracted CIFAR-100 python "
                                f"folder holds {', '.join(MEMBERS)}") from e
        return out
    try:
        with tarfile.open(path, "r:*") as tar:
            members = _checked_members(path, tar)
            missing = [f"{FOLDER}/{m}" for m in MEMBERS if f"{FOLDER}/{m}" not in members]
            if missing:
                raise DataError(f"{path}: has no {', '.join(missing)}; the {WHAT} holds "
                                + ", ".join(f"{FOLDER}/{m}" for m in MEMBERS))
            for m in MEMBERS:
                with tar.extractfile(members[f"{FOLDER}/{m}"]) as f:
                    out[m] = f.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{path}: not a readable tar.gz archive ({e}); delete it and fetch it again") from e
    return out


def _get(d: dict, key: str):
    """A key of a CIFAR pickle: str when read as latin1 from Python 2, bytes when written so."""
    return d[key] if key in d else d[key.encode()]


def _names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _load(blob: bytes, where: str, keys: tuple[str, ...]) -> dict:
    try:
        d = ArrayUnpickler(io.BytesIO(blob), encoding="latin1").load()
        if not isinstance(d, dict):
            raise TypeError(f"a {type(d).__name__}, not a dict")
        return {k: _get(d, k) for k in keys}
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise DataError(f"{where}: not a CIFAR-100 pickle with {', '.join(keys)} ({e!r})") from e


def parse(members: dict[str, bytes], source: Path):
    """(images uint8 [n, 3, 32, 32] in train-then-test order, fine labels [n], coarse labels [n],
    fine names, coarse names), every field checked."""
    meta = _load(members["meta"], f"{source}: meta", ("fine_label_names", "coarse_label_names"))
    fine_names, coarse_names = _names(meta["fine_label_names"]), _names(meta["coarse_label_names"])
    if not fine_names or len(set(fine_names)) != len(fine_names) or not coarse_names:
        raise DataError(f"{source}: meta must list distinct fine_label_names and coarse_label_names")
    images, fine, coarse = [], [], []
    for m in ("train", "test"):
        where = f"{source}: {m}"
        d = _load(members[m], where, ("data", "fine_labels", "coarse_labels"))
        data = d["data"]
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (3 * SIZE * SIZE,)):
            raise DataError(f"{where}: data must be uint8 [n, 3072] (32x32 RGB, channel-major), got "
                            f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
        f, c = np.asarray(d["fine_labels"], dtype=np.int64), np.asarray(d["coarse_labels"], dtype=np.int64)
        if f.shape != (len(data),) or c.shape != (len(data),):
            raise DataError(f"{where}: {len(data)} images but {f.size} fine_labels and {c.size} coarse_labels")
        if len(f) and (f.min() < 0 or f.max() >= len(fine_names) or c.min() < 0 or c.max() >= len(coarse_names)):
            raise DataError(f"{where}: labels out of range (meta names {len(fine_names)} fine and "
                            f"{len(coarse_names)} coarse classes)")
        images.append(data.reshape(-1, 3, SIZE, SIZE))
        fine.append(f)
        coarse.append(c)
    return np.concatenate(images), np.concatenate(fine), np.concatenate(coarse), fine_names, coarse_names


def source_checksum(path: Path) -> str:
    if Path(path).is_dir():
        return "listing:" + listing_fingerprint([Path(path) / m for m in MEMBERS if (Path(path) / m).is_file()], path)
    return "sha256:" + sha256_file(path)


def prepare(source: Path, folder: Path, checksum: str, size: int):
    """Read the source and write its cache entry; returns (images, manifest)."""
    images, fine, coarse, fine_names, coarse_names = parse(read_members(source), source)
    counts = np.bincount(fine, minlength=len(fine_names))
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise DataError(f"{source}: class {fine_names[empty[0]]!r} has no images"
                        + (f" ({len(empty)} such classes)" if len(empty) > 1 else ""))
    superclass = []
    for k, name in enumerate(fine_names):
        found = np.unique(coarse[fine == k])
        if len(found) != 1:
            raise DataError(f"{source}: class {name!r} has images under {len(found)} superclasses "
                            f"({', '.join(coarse_names[i] for i in found)}); CIFAR-100 gives each class one")
        superclass.append(coarse_names[int(found[0])])
    order = np.argsort(fine, kind="stable")  # class-major; within a class train images, then test

    def fill(out: np.ndarray) -> None:
        for start in range(0, len(order), 4096):
            block = images[order[start:start + 4096]]
            if size != SIZE:
                block = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0)))
                                             .resize((size, size), Image.BICUBIC)).transpose(2, 0, 1) for a in block])
            out[start:start + len(block)] = block

    manifest = {"dataset": "cifar100", "sources": {"path": str(source), "checksum": checksum},
                "preprocess": {"size": size, "channels": 3, "resample": "none" if size == SIZE else "bicubic"},
                "classes": fine_names, "counts": counts.tolist(), "superclasses": superclass}
    return write_entry(folder, (len(order), 3, size, size), manifest, fill)


def load_cifar100(data_cfg, root: Path, cache_root: Path, force: bool,
                  fetch: Callable[[Path], None] | None) -> tuple[np.ndarray, dict, Path, dict[str, str]]:
    """(images, manifest, cache folder, {source: checksum}) of the CIFAR-100 cache, building it (and
    fetching the archive into ROOT/cifar100 with `fetch`, when given) if needed."""
    size = data_cfg.image_size or SIZE
    if data_cfg.channels not in (0, 3):
        raise DataError(f"data.channels={data_cfg.channels}: CIFAR-100 images have 3 channels")
    source = find_source(root)
    if source is None:
        target = search_dirs(root)[0]
        if fetch is None:
            raise DataError(f"CIFAR-100 not found: put {ARCHIVE} (from {URL}) or its extracted {FOLDER}/ in {target}")
        fetch(target)  # download.download_cifar100 (MD5-checked)
        source = target / ARCHIVE
    checksum = source_checksum(source)
    folder = entry_dir(cache_root, "cifar100", {"dataset": "cifar100", "source": checksum, "size": size})
    loaded = None if force else load_entry(folder)
    images, manifest = loaded or prepare(source, folder, checksum, size)
    return images, manifest, folder, {str(source): checksum}


def split_set(dataset: str, data_cfg, root: Path, cache_root: Path, force: bool, fetch,
              lists_for: Callable[[dict], dict[str, list[str]]], what: str, split_source: str) -> ImageSet:
    """An ImageSet over the CIFAR-100 cache with the class split `lists_for(manifest)` names
    ({split: fine class names}); `what` names the split in errors, `split_source` cites it."""
    images, manifest, folder, sources = load_cifar100(data_cfg, root, cache_root, force, fetch)
    names = manifest["classes"]
    splits = fixed_splits(names, lists_for(manifest), next(iter(sources)), what)
    return ImageSet(dataset, images, names, offsets_from_counts(manifest["counts"]), splits, norm="cifar100",
                    cache_path=folder, sources=sources, split_source=split_source)

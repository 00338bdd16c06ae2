"""The decoded-image cache: one folder per (data set, sources, preprocessing), holding a uint8
.npy of all images and a manifest.json.

Crash safety: the .npy is written under a temporary name in the same folder, fsynced, and renamed;
then manifest.json is replaced the same way. The manifest names the .npy it describes, so its
atomic replacement is the single commit point: a reader sees either the old complete cache or the
new complete one, and a failed preparation leaves the previous cache untouched.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..files import atomic_write_json
from .common import DataError

CACHE_VERSION = 1  # bump when the preprocessing changes, so stale caches are rebuilt, not read


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def listing_fingerprint(files: Iterable[Path], root: Path) -> str:
    """A cheap stand-in for hashing every byte of a large image folder: relative path, size and
    modification time of each file. Any added, removed, renamed or rewritten file changes it."""
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def entry_dir(cache_root: Path, dataset: str, key: dict) -> Path:
    """The cache folder for a data set whose sources and preprocessing are described by `key`."""
    digest = hashlib.sha256(json.dumps({"v": CACHE_VERSION, **key}, sort_keys=True).encode()).hexdigest()
    return Path(cache_root) / f"{dataset}-{digest[:16]}"


def load_entry(folder: Path) -> tuple[np.ndarray, dict] | None:
    """The cached images and manifest, or None when the folder holds no complete cache of this
    version. The images are a copy-on-write memory map: nothing is read until indexed, torch can
    wrap it without a copy, and a stray write could never reach the file."""
    manifest_path = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("version") != CACHE_VERSION:
            return None
        images = np.load(Path(folder) / manifest["images"], mmap_mode="c")
    except (OSError, ValueError, KeyError):
        return None
    if list(images.shape) != manifest.get("shape") or images.dtype != np.uint8:
        return None
    return images, manifest


def write_entry(folder: Path, shape: tuple[int, ...], manifest: dict,
                fill: Callable[[np.ndarray], None]) -> tuple[np.ndarray, dict]:
    """Create a cache entry: `fill(array)` writes every image into a uint8 memory map of `shape`.
    If fill raises, nothing in `folder` changes except that the temporary file is removed."""
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the cache folder {folder} ({e}); set MAMLPP_CACHE to a writable folder") from e
    name = f"images-{uuid.uuid4().hex[:12]}.npy"
    tmp = folder / f".{name}.tmp"
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=tuple(shape))
        fill(array)
        array.flush()
        del array
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, folder / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if created:  # leave no empty cache folder behind a failed first preparation
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    manifest = {"version": CACHE_VERSION, **manifest, "images": name, "shape": list(shape)}
    try:
        previous = json.loads((folder / "manifest.json").read_text()).get("images")
    except (OSError, ValueError, AttributeError):
        previous = None
    try:
        atomic_write_json(folder / "manifest.json", manifest)
    except BaseException:
        (folder / name).unlink(missing_ok=True)
        raise
    # Committed. Remove only the file the replaced manifest named: a concurrent preparation's
    # file may be about to be committed. (A process that maps the old file keeps its data.)
    if previous and previous != name and "/" not in previous:
        (folder / previous).unlink(missing_ok=True)
    loaded = load_entry(folder)
    if loaded is None:
        raise DataError(f"the cache just written in {folder} cannot be read back")
    return loaded

"""Omniglot: the two archives (or their extracted folders) -> one uint8 cache -> class splits.

Preprocessing follows the reference (spec 6.1): PIL open, resize to 28x28 nearest-neighbour (what
Pillow does to 1-bit images even when LANCZOS is asked for), values {0, 1}, background 1, strokes 0.
Classes are "<alphabet>/<characterNN>" over both archives, sorted; images within a class are in
sorted file-name order (the reference used file-system walk order, which nobody can reproduce).
"""
from __future__ import annotations

import io
import os
import re
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .cache import entry_dir, listing_fingerprint, load_entry, sha256_file, write_entry
from .common import DataError, ImageSet, Split, offsets_from_counts, shuffled_split
from .decode import decode_into, open_image, to_8bit

ARCHIVES = ("images_background", "images_evaluation")
# (alphabets, characters, images) of the public archives, used to verify downloads.
EXPECTED = {"images_background": (30, 964, 19280), "images_evaluation": (20, 659, 13180)}
# The reference split (spec 6.1, engineering notes): shuffle with the derived val seed, cut by fractions.
REFERENCE_FRACTIONS = (0.70918052988, 0.03080714725, 0.2606284658)
REFERENCE_SEED = int(np.random.RandomState(0).randint(1, 999999))  # 985773
_ROT = {"rot000": 0, "rot090": 1, "rot180": 2, "rot270": 3}


def search_dirs(root: Path) -> list[Path]:
    """ROOT/omniglot first (the shared data layout), then ROOT itself."""
    return [Path(root) / "omniglot", Path(root)]


def find_sources(root: Path) -> dict[str, Path]:
    """Each archive name -> its .zip (preferred: it has a checksum) or extracted folder."""
    found = {}
    for name in ARCHIVES:
        for d in search_dirs(root):
            if (d / f"{name}.zip").is_file():
                found[name] = d / f"{name}.zip"
                break
            if (d / name).is_dir():
                found[name] = d / name
                break
    return found


def check_member_name(archive: Path, member: str) -> None:
    """Refuse archives whose member names could point outside the archive's own folder."""
    p = member.replace("\\", "/")
    if p.startswith("/") or re.match(r"^[A-Za-z]:", p) or ".." in p.split("/"):
        raise DataError(f"{archive}: member {member!r} has an absolute path or a '..' component; "
                        "refusing to read this archive (it is not a genuine Omniglot archive)")


def list_source(name: str, path: Path) -> dict[str, list[str]]:
    """'<alphabet>/<character>' -> sorted image names (zip members or relative paths), checking
    the layout NAME/ALPHABET/CHARACTER/*.png and that no character folder is empty."""
    path = Path(path)
    classes: dict[str, list[str]] = {}
    if path.suffix == ".zip":
        try:
            with zipfile.ZipFile(path) as z:
                infos = z.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{path}: not a valid zip archive ({e}); delete it and fetch it again") from e
        for info in infos:
            check_member_name(path, info.filename)
            parts = info.filename.rstrip("/").split("/")
            if parts[0] != name:
                continue  # e.g. __MACOSX/
            if info.is_dir() and len(parts) == 3:  # a character folder: must not stay empty
                classes.setdefault(f"{parts[1]}/{parts[2]}", [])
            elif not info.is_dir() and len(parts) == 4 and parts[3].lower().endswith(".png"):
                classes.setdefault(f"{parts[1]}/{parts[2]}", []).append(info.filename)
    else:
        for alphabet in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for char in sorted(p for p in alphabet.iterdir() if p.is_dir() and not p.name.startswith(".")):
                classes[f"{alphabet.name}/{char.name}"] = [
                    f"{alphabet.name}/{char.name}/{f.name}" for f in char.iterdir() if f.suffix.lower() == ".png"]
    if not classes:
        raise DataError(f"{path}: no images found; expected the layout {name}/ALPHABET/characterNN/*.png")
    for label, members in classes.items():
        if not members:
            raise DataError(f"{path}: character folder {name}/{label} is empty (no .png images)")
        members.sort()
    return classes


def source_checksum(path: Path) -> str:
    if path.suffix == ".zip":
        return "sha256:" + sha256_file(path)
    return "listing:" + listing_fingerprint(sorted(path.rglob("*.png")), path)


_OPEN_ZIPS: dict[tuple[int, str], zipfile.ZipFile] = {}


def _zip(path: str) -> zipfile.ZipFile:
    # Keyed by process id: a forked worker must not share the parent's file offset.
    key = (os.getpid(), path)
    if key not in _OPEN_ZIPS:
        _OPEN_ZIPS[key] = zipfile.ZipFile(path)
    return _OPEN_ZIPS[key]


def decode_members(payload) -> np.ndarray:
    """Worker: decode image members of one source to uint8 [m, 1, size, size] with values {0, 1}."""
    source, members, size = payload
    out = np.empty((len(members), 1, size, size), dtype=np.uint8)
    for i, member in enumerate(members):
        name = f"{source}: {member}"
        if source.endswith(".zip"):
            try:
                data = _zip(source).read(member)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
                raise DataError(f"{name}: damaged archive member ({e})") from e
            img = open_image(io.BytesIO(data), name)
        else:
            img = open_image(os.path.join(source, member), name)
        if img.mode == "1":  # the genuine data: nearest-neighbour keeps exactly {0, 1}
            out[i, 0] = np.asarray(img.resize((size, size), Image.NEAREST), dtype=np.uint8)
        else:  # re-saved copies: threshold back to {0, 1} so the value range stays the reference's
            small = to_8bit(img).convert("L").resize((size, size), Image.NEAREST)  # 16-bit: scaled, not clipped
            out[i, 0] = np.asarray(small, dtype=np.uint8) >= 128
    return out


def prepare(sources: dict[str, Path], folder: Path, checksums: dict[str, str], size: int):
    """Decode both sources into the cache entry `folder`; returns (images, manifest)."""
    owner: dict[str, tuple[str, list[str]]] = {}
    for name, path in sources.items():
        for label, members in list_source(name, path).items():
            if label in owner:
                raise DataError(f"{path}: character {label} also appears in {owner[label][0]}")
            owner[label] = (str(path), members)
    class_names = sorted(owner)
    counts = [len(owner[c][1]) for c in class_names]
    jobs, start = [], 0
    for c in class_names:  # one job per class keeps every job inside a single source
        source, members = owner[c]
        jobs.append((start, (source, members, size)))
        start += len(members)
    manifest = {
        "dataset": "omniglot",
        "sources": {n: {"path": str(p), "checksum": checksums[n]} for n, p in sources.items()},
        "preprocess": {"size": size, "resample": "nearest", "values": "{0,1}, background 1"},
        "classes": class_names,
        "counts": counts,
    }
    return write_entry(folder, (start, 1, size, size), manifest,
                       lambda out: decode_into(out, decode_members, jobs, desc="decoding Omniglot"))


def vinyals_splits(root: Path, class_names: list[str]) -> dict[str, Split]:
    """The Vinyals et al. alphabet split: each line 'ALPHABET/characterNN/rotDDD' is a class,
    i.e. a character at a fixed rotation (4x as many classes as characters)."""
    index = {c: i for i, c in enumerate(class_names)}
    for d in search_dirs(root):
        split_dir = d / "splits" / "vinyals"
        if all((split_dir / f"{s}.txt").is_file() for s in ("train", "val", "test")):
            break
    else:
        raise DataError(f"data.split=vinyals needs the split lists train.txt, val.txt and test.txt in "
                        f"{search_dirs(root)[0] / 'splits' / 'vinyals'}")
    splits = {}
    for s in ("train", "val", "test"):
        path = split_dir / f"{s}.txt"
        classes, rots, names = [], [], []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            label, _, rot = line.strip().rpartition("/")
            if label not in index or rot not in _ROT:
                raise DataError(f"{path}:{lineno}: {line.strip()!r} is not 'ALPHABET/characterNN/rotDDD' "
                                "naming a character of the archives")
            classes.append(index[label])
            rots.append(_ROT[rot])
            names.append(line.strip())
        splits[s] = Split(np.array(classes, dtype=np.int64), np.array(rots, dtype=np.int64), names)
    return splits


def load_omniglot(data_cfg, root: Path, cache_root: Path, force: bool = False,
                  fetch: Callable[[Path, list[str]], None] | None = None) -> ImageSet:
    """The Omniglot ImageSet with the split data_cfg.split names, building the cache if needed."""
    size = data_cfg.image_size or 28
    if data_cfg.channels not in (0, 1):
        raise DataError(f"data.channels={data_cfg.channels}: Omniglot images have 1 channel")
    sources = find_sources(root)
    if len(sources) < len(ARCHIVES):
        missing = [n for n in ARCHIVES if n not in sources]
        if fetch is None:
            raise DataError(f"Omniglot not found: put {', '.join(m + '.zip' for m in missing)} in {Path(root) / 'omniglot'}")
        fetch(Path(root) / "omniglot", missing)  # download.download_omniglot (checksummed)
        sources = find_sources(root)
    checksums = {n: source_checksum(p) for n, p in sources.items()}
    folder = entry_dir(cache_root, "omniglot", {"dataset": "omniglot", "sources": checksums, "size": size})
    loaded = None if force else load_entry(folder)
    images, manifest = loaded or prepare(sources, folder, checksums, size)
    class_names = manifest["classes"]
    if data_cfg.split == "vinyals":
        splits = vinyals_splits(root, class_names)
    else:
        splits = shuffled_split(class_names, REFERENCE_FRACTIONS, REFERENCE_SEED, exact=True)
    return ImageSet("omniglot", images, class_names, offsets_from_counts(manifest["counts"]), splits,
                    norm="none", cache_path=folder, sources=checksums)

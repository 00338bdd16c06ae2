"""Decoding images once, in parallel, straight into the cache's memory map."""
from __future__ import annotations

import multiprocessing
import os
import warnings
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from .common import DataError

# Below this many images a process pool costs more to start than it saves.
_SERIAL_BELOW = 3000


def open_image(source, name: str) -> Image.Image:
    """PIL-open and fully decode one image (PIL decodes lazily, so a truncated file would only
    fail later); any failure becomes a DataError naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
            img.load()
        return img
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DataError(f"{name}: cannot decode image ({e})") from e


# Pillow's integer modes: 16-bit grayscale (PNG, TIFF) and 32-bit integers.
_WIDE_GRAY = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grayscale as 8-bit 'L', scaled: round(v * 255 / 65535), which is round(v / 257) and
    never a tie. Pillow's own convert('L'/'RGB') clips at 255 instead, turning such images white.
    Mode 'I' is read as 16-bit too (older Pillow opens 16-bit PNGs so); values past 65535 clip.
    Other modes are returned as they are."""
    if img.mode not in _WIDE_GRAY:
        return img
    v = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
    return Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8))  # 2-D uint8: mode L


def to_chw(img: Image.Image, size: int, mode: str, resample: int) -> np.ndarray:
    """Convert to `mode` ('RGB' or 'L'), resize to size x size, return uint8 [C, H, W]."""
    img = to_8bit(img)  # before convert(): 16-bit to RGB goes through the scaled 'L'
    if img.mode != mode:
        img = img.convert(mode)
    if img.size != (size, size):
        img = img.resize((size, size), resample)
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _run(job):
    fn, start, payload = job
    return start, fn(payload)


def decode_into(out: np.ndarray, fn: Callable, jobs: Sequence[tuple[int, object]], desc: str,
                workers: int | None = None) -> None:
    """For each job (start row, payload), fn(payload) returns a uint8 block that is written to
    out[start:start+len(block)]. `fn` must be a module-level function (it crosses processes)."""
    total = out.shape[0]
    if workers is None:
        workers = min(os.cpu_count() or 1, 8, len(jobs))
    tasks = [(fn, start, payload) for start, payload in jobs]
    with tqdm(total=total, desc=desc, unit="img", disable=None, leave=False) as bar:
        if workers <= 1 or total < _SERIAL_BELOW:
            results = map(_run, tasks)
            pool = None
        else:
            # fork: workers inherit the parent's modules, so no package re-import per worker
            # (spawn would re-import torch in every worker). The workers only run PIL/numpy.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            pool = multiprocessing.get_context(method).Pool(workers)
            results = pool.imap_unordered(_run, tasks)
        try:
            for start, block in results:
                out[start:start + len(block)] = block
                bar.update(len(block))
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()

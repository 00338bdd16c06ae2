"""Shared fixtures of the data tests: the real Omniglot copy (../shared/data or $MAMLPP_DATA), a
cache folder for the whole session, and generators of small synthetic image sets."""
from __future__ import annotations

import importlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def skip_or_fail(reason: str):
    """Skip a test whose prerequisite is missing; under CI=true fail instead: nothing skips silently there."""
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{reason} (CI=true: missing prerequisites fail instead of skipping)")
    pytest.skip(reason)


def need_module(name: str):
    """Import an optional test dependency (the `test` extra), or skip_or_fail."""
    try:
        return importlib.import_module(name)
    except ImportError:
        skip_or_fail(f"{name} is not installed: pip install -e '.[test]'")


def _find_shared_data(*parts: str) -> Path | None:
    """The first data root ($MAMLPP_DATA, then ../shared/data) holding every file in parts."""
    env = os.environ.get("MAMLPP_DATA", "").strip()
    for root in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if all((root / part).is_file() for part in parts):
            return root
    return None


@pytest.fixture(scope="session")
def shared_data_root() -> Path:
    """The data root holding omniglot/images_*.zip. Missing: skip, or fail when CI=true."""
    root = _find_shared_data("omniglot/images_background.zip", "omniglot/images_evaluation.zip")
    if root is None:
        skip_or_fail("Omniglot archives not found in $MAMLPP_DATA/omniglot or ../shared/data/omniglot")
    return root


@pytest.fixture(scope="session")
def ravi_split_dir() -> Path:
    """The folder holding Mini-ImageNet's split files (Ravi & Larochelle) train/val/test.csv,
    ROOT/mini_imagenet/splits/ravi of the shared data. Missing: skip, or fail when CI=true."""
    ravi = "mini_imagenet/splits/ravi"
    root = _find_shared_data(*(f"{ravi}/{s}.csv" for s in ("train", "val", "test")))
    if root is None:
        skip_or_fail(f"Mini-ImageNet split files not found in $MAMLPP_DATA/{ravi} or ../shared/data/{ravi}")
    return root / ravi


@pytest.fixture(scope="session")
def data_cache_dir(tmp_path_factory) -> Path:
    """$MAMLPP_CACHE when set (reused across runs), else a fresh folder for this session."""
    env = os.environ.get("MAMLPP_CACHE", "").strip()
    return Path(env) if env else tmp_path_factory.mktemp("mamlpp-cache")


@pytest.fixture(scope="session")
def omniglot_set(shared_data_root, data_cache_dir):
    """The real Omniglot, decoded once per session (reference split)."""
    from mamlpp.config import DataConfig
    from mamlpp.data import load_image_set

    return load_image_set(DataConfig(dataset="omniglot"), shared_data_root, cache_dir=data_cache_dir, download=False)


def write_images(folder: Path, count: int, size=(20, 24), seed: int = 0, ext: str = ".jpg", mode: str = "RGB"):
    """`count` random images (width x height = size) named 000.jpg, 001.jpg, ... in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    paths = []
    for i in range(count):
        a = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
        p = folder / f"{i:03d}{ext}"
        Image.fromarray(a[..., 0] if channels == 1 else a, mode).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def make_class_folders():
    """make(root, {class_name: n_images}) writes root/CLASS/NNN.jpg."""

    def make(root: Path, classes: dict[str, int], **kwargs) -> Path:
        for i, (name, n) in enumerate(sorted(classes.items())):
            write_images(Path(root) / name, n, seed=i, **kwargs)
        return Path(root)

    return make


def png_bytes(seed: int, size: int = 12) -> bytes:
    a = np.random.default_rng(seed).integers(0, 2, size=(size, size)).astype(bool)
    buf = io.BytesIO()
    Image.fromarray(a).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def make_omniglot(root: Path, extra: dict[str, dict[str, bytes]] | None = None, chars: int = 3) -> Path:
    """Tiny stand-ins for the two archives: 2 alphabets x `chars` characters x 4 drawings each.
    extra: {archive: {member name: bytes}} added as they are."""
    folder = root / "omniglot"
    folder.mkdir(parents=True, exist_ok=True)
    for a, name in enumerate(("images_background", "images_evaluation")):
        with zipfile.ZipFile(folder / f"{name}.zip", "w") as z:
            for alphabet in (f"Script{a}A", f"Script{a}B"):
                for c in range(1, chars + 1):
                    for d in range(1, 5):
                        z.writestr(f"{name}/{alphabet}/character{c:02d}/{c:02d}{d:02d}_{d:02d}.png", png_bytes(c * 10 + d))
            for member, data in (extra or {}).get(name, {}).items():
                z.writestr(member, data)
    return root

"""Mini-ImageNet's three layouts and plain image folders, on small generated images; determinism
across processes; cache reuse."""
from __future__ import annotations

import csv
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, write_images
from mamlpp.config import Config
from mamlpp.data import build_image_tasks, load_image_set

WNIDS = {"train": ["n01000001", "n01000002"], "val": ["n02000001", "n02000002"], "test": ["n03000001", "n03000002"]}
PER_CLASS = 8


def data_cfg(dataset: str, ways: int, shots: int, queries: int, **data) -> Config:
    cfg = Config()
    cfg.data.dataset, cfg.data.ways, cfg.data.shots, cfg.data.queries = dataset, ways, shots, queries
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def mini_cfg(**data) -> Config:
    return data_cfg("mini_imagenet", 2, 1, 3, **data)


def decode_reference(path: Path, size: int = 84) -> np.ndarray:
    """The reference's Mini-ImageNet preprocessing: PIL open, resize (bicubic), RGB, CHW."""
    img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    return np.asarray(img).transpose(2, 0, 1)


def check_mini(tasks, sources: dict[str, list[Path]]):
    """Split sizes, shapes, and each cached class equal to its decoded source files."""
    data = tasks.data
    assert tasks.input_shape == (3, 84, 84) and data.norm == "imagenet"
    assert tasks.split_sizes() == {s: {"classes": 2, "images": 2 * PER_CLASS} for s in ("train", "val", "test")}
    for name, files in sources.items():
        c = data.class_names.index(name)
        assert data.counts[c] == len(files)
        for i, f in enumerate(sorted(files)):
            assert np.array_equal(data.images[data.offsets[c] + i], decode_reference(f))
    ep = tasks.train_batch(0, 2)
    assert ep["xs"].shape == (2, 2, 3, 84, 84) and ep["xq"].shape == (2, 6, 3, 84, 84)
    assert -2.2 < float(ep["xs"].min()) and float(ep["xs"].max()) < 2.7  # ImageNet-normalised
    # labels by content: every image of label j is an image of the class the plan names
    plan = tasks.plan("train", range(2))
    x = torch.cat([ep["xs"].view(2, 2, 1, 3, 84, 84), ep["xq"].view(2, 2, 3, 3, 84, 84)], 2)
    for t in range(2):
        for j in range(2):
            c = int(plan["classes"][t, j])
            block = data.images[data.offsets[c]:data.offsets[c + 1]]
            for img in tasks.to_uint8(x[t, j]):
                assert any(np.array_equal(img, b) for b in block)


def test_mini_presplit_folders(tmp_path, data_cache_dir):
    sources = {}
    for s, wnids in WNIDS.items():
        for i, w in enumerate(wnids):
            sources[f"{s}/{w}"] = write_images(tmp_path / "mini_imagenet" / s / w, PER_CLASS, seed=int(w[1:]) % 997)
    tasks = build_image_tasks(mini_cfg(), torch.device("cpu"), torch.float32, str(tmp_path), cache_dir=data_cache_dir)
    check_mini(tasks, sources)


def _flat_images(root: Path) -> dict[str, list[Path]]:
    sources = {}
    for s, wnids in WNIDS.items():
        for w in wnids:
            paths = write_images(root / "images", PER_CLASS, seed=int(w[1:]) % 997)
            renamed = []
            for i, p in enumerate(paths):
                target = p.with_name(f"{w}{i:08d}.jpg")
                p.rename(target)
                renamed.append(target)
            sources[f"{s}/{w}"] = renamed
    return sources


def _write_csvs(folder: Path, sources: dict[str, list[Path]]):
    folder.mkdir(parents=True, exist_ok=True)
    for s in WNIDS:
        with open(folder / f"{s}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filename", "label"])
            for name, files in sources.items():
                if name.startswith(s + "/"):
                    w.writerows([p.name, name.split("/")[1]] for p in files)


@pytest.mark.parametrize("csv_place", ["beside", "ravi", "argument"])
def test_mini_flat_images_with_csvs(tmp_path, data_cache_dir, csv_place):
    root = tmp_path / "data"
    sources = _flat_images(root / "mini_imagenet")
    csv_dir = {"beside": root / "mini_imagenet", "ravi": root / "mini_imagenet" / "splits" / "ravi",
               "argument": tmp_path / "elsewhere"}[csv_place]
    _write_csvs(csv_dir, sources)
    tasks = build_image_tasks(mini_cfg(), torch.device("cpu"), torch.float32, str(root), cache_dir=data_cache_dir,
                              csv_dir=csv_dir if csv_place == "argument" else None)
    check_mini(tasks, sources)


def test_mini_pickles(tmp_path, data_cache_dir):
    rng = np.random.default_rng(0)
    expected = {}
    for s, wnids in WNIDS.items():
        images = rng.integers(0, 256, size=(len(wnids) * PER_CLASS, 84, 84, 3), dtype=np.uint8)
        order = rng.permutation(len(images))  # classes need not be contiguous in image_data
        class_dict = {w: order[i * PER_CLASS:(i + 1) * PER_CLASS].tolist() for i, w in enumerate(wnids)}
        with open(tmp_path / f"mini-imagenet-cache-{s}.pkl", "wb") as f:
            pickle.dump({"image_data": images, "class_dict": class_dict}, f, protocol=4)
        for w, idx in class_dict.items():
            expected[f"{s}/{w}"] = images[idx].transpose(0, 3, 1, 2)
    data = load_image_set(mini_cfg().data, tmp_path, cache_dir=data_cache_dir)
    for name, block in expected.items():
        c = data.class_names.index(name)
        assert np.array_equal(data.images[data.offsets[c]:data.offsets[c + 1]], block)
    assert {s: len(v.classes) for s, v in data.splits.items()} == {"train": 2, "val": 2, "test": 2}


def folder_cfg(**data) -> Config:
    return data_cfg("folder", 3, 2, 2, **data)


def test_folder_with_seeded_split(tmp_path, data_cache_dir, make_class_folders):
    root = make_class_folders(tmp_path / "mine", {f"class{i:02d}": 5 + i % 3 for i in range(12)}, ext=".png")
    cfg = folder_cfg(image_size=32, channels=1, split_fractions=(0.5, 0.25, 0.25))
    tasks = build_image_tasks(cfg, torch.device("cpu"), torch.float32, str(root), cache_dir=data_cache_dir)
    assert tasks.input_shape == (1, 32, 32) and tasks.data.norm == "unit"
    splits = tasks.data.splits
    assert [len(splits[s].classes) for s in ("train", "val", "test")] == [6, 3, 3]
    assert sorted(np.concatenate([s.classes for s in splits.values()]).tolist()) == list(range(12))
    ep = tasks.eval_batch("test", 0, 4)
    assert ep["xq"].shape == (4, 6, 1, 32, 32) and 0 <= float(ep["xq"].min()) and float(ep["xq"].max()) <= 1
    # the split is seeded, not drawn from train.seed, and does not change with it
    cfg.train.seed = 9
    again = build_image_tasks(cfg, torch.device("cpu"), torch.float32, str(root), cache_dir=data_cache_dir)
    assert all(np.array_equal(splits[s].classes, again.data.splits[s].classes) for s in splits)
    # the same folder in RGB at another size is a separate cache
    rgb = load_image_set(folder_cfg(image_size=16).data, root, cache_dir=data_cache_dir)
    assert rgb.images.shape[1:] == (3, 16, 16) and rgb.norm == "imagenet" and rgb.cache_path != tasks.data.cache_path


def test_folder_presplit(tmp_path, data_cache_dir, make_class_folders):
    for s, n in (("train", 4), ("val", 3), ("test", 3)):
        make_class_folders(tmp_path / "mine" / s, {f"{s}_c{i}": 6 for i in range(n)})
    data = load_image_set(folder_cfg().data, tmp_path / "mine", cache_dir=data_cache_dir)
    assert data.images.shape[1:] == (3, 84, 84)
    assert [len(data.splits[s].classes) for s in ("train", "val", "test")] == [4, 3, 3]
    assert data.splits["val"].names == ["val/val_c0", "val/val_c1", "val/val_c2"]


def test_folder_needs_a_directory():
    from mamlpp.data import DataError

    with pytest.raises(DataError, match="needs the image folder"):
        load_image_set(folder_cfg().data, None)


def test_folder_16bit_png_is_scaled_not_clipped(tmp_path, data_cache_dir):
    """Pillow's convert() clips 16-bit grayscale at 255 (a white image); the decoder scales it to
    round(v * 255 / 65535) = round(v / 257) instead (never a tie), in L and in RGB. 8-bit images,
    grayscale and RGB, decode to exactly their stored values as before."""
    wide = np.array([[0, 32768, 65535, 257], [128, 129, 1000, 65000]] * 2, dtype=np.uint16)
    gray = np.arange(0, 256, 16, dtype=np.uint8).reshape(4, 4)
    rgb = np.random.default_rng(0).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    root = tmp_path / "mine"
    for name, a in (("wide", wide), ("gray", gray), ("rgb", rgb)):
        (root / name).mkdir(parents=True)
        img = Image.fromarray(a)
        img.save(root / name / "000.png")
        assert Image.open(root / name / "000.png").mode == {"wide": "I;16", "gray": "L", "rgb": "RGB"}[name]
    scaled = np.array([[0, 128, 255, 1], [0, 1, 4, 253]] * 2, dtype=np.uint8)
    expected = {1: {"wide": scaled, "gray": gray, "rgb": np.asarray(Image.fromarray(rgb).convert("L"))},
                3: {"wide": np.stack([scaled] * 3), "gray": np.stack([gray] * 3), "rgb": rgb.transpose(2, 0, 1)}}
    for channels in (1, 3):  # image_size 4: no resize, so the values are the decoder's alone
        data = load_image_set(folder_cfg(image_size=4, channels=channels).data, root, cache_dir=data_cache_dir)
        for name, want in expected[channels].items():
            got = data.images[data.offsets[data.class_names.index(name)]]
            assert np.array_equal(got, want.reshape(channels, 4, 4)), (channels, name, got)


def test_cache_is_reused_and_follows_the_source(tmp_path, data_cache_dir, make_class_folders):
    root = make_class_folders(tmp_path / "mine", {f"c{i}": 6 for i in range(9)})
    cfg = folder_cfg(image_size=16)
    first = load_image_set(cfg.data, root, cache_dir=data_cache_dir)
    npy = first.cache_path / (first.cache_path / "manifest.json").read_text().split('"images": "')[1].split('"')[0]
    stamp = npy.stat().st_mtime_ns
    second = load_image_set(cfg.data, root, cache_dir=data_cache_dir)
    assert second.cache_path == first.cache_path and npy.stat().st_mtime_ns == stamp
    write_images(root / "c0", 7, seed=42)  # one more image: a different source, a different cache
    third = load_image_set(cfg.data, root, cache_dir=data_cache_dir)
    assert third.cache_path != first.cache_path and third.counts[0] == 7


DIGEST = textwrap.dedent("""
    import hashlib, sys, torch
    from mamlpp.config import Config
    from mamlpp.data import build_image_tasks

    def digest(root, cache):
        cfg = Config()
        cfg.data.dataset, cfg.data.image_size, cfg.train.seed = "folder", 16, 7
        cfg.data.ways, cfg.data.shots, cfg.data.queries = 2, 2, 3
        tasks = build_image_tasks(cfg, torch.device("cpu"), torch.float32, root, cache_dir=cache)
        h = hashlib.sha256()
        for ep in (tasks.train_batch(3, 4), tasks.eval_batch("val", 0, 5), tasks.eval_batch("test", 2, 3)):
            for key in sorted(ep):
                h.update(ep[key].numpy().tobytes())
        return h.hexdigest()
""")


def test_episodes_identical_across_processes(tmp_path, data_cache_dir, make_class_folders):
    root = make_class_folders(tmp_path / "mine", {f"c{i}": 6 for i in range(9)})
    namespace = {}
    exec(DIGEST, namespace)
    here = namespace["digest"](str(root), str(data_cache_dir))
    code = DIGEST + "\nprint(digest(sys.argv[1], sys.argv[2]))\n"
    out = subprocess.run([sys.executable, "-c", code, str(root), str(data_cache_dir)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == here

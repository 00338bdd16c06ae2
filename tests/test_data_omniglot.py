"""The real Omniglot copy: cache contents, the reference and Vinyals splits, episodes checked by
their pixel content, and the training-only per-class rotation."""
from __future__ import annotations

import hashlib
import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from mamlpp.config import Config, DataConfig
from mamlpp.data import ImageTasks, build_image_tasks, load_image_set

ARCHIVE_SHA256 = {  # ../shared/data/omniglot/README.md
    "images_background": "7c59c4a4d20f97eaee66dd1cafe1b532194e600732ce4880fed46d1ada89ef21",
    "images_evaluation": "ad893e407fc23720e7afc9beb30cbff8d552eac4408cb9ff004577dd4c8ce460",
}


def fingerprint(names) -> str:
    return hashlib.sha1("\n".join(sorted(names)).encode()).hexdigest()[:12]


@pytest.fixture(scope="module")
def content_index(omniglot_set):
    """image bytes -> set of class ids holding that exact image (a few simple characters repeat)."""
    index: dict[bytes, set[int]] = {}
    counts = omniglot_set.counts
    classes = np.repeat(np.arange(len(counts)), counts)
    for img, c in zip(np.asarray(omniglot_set.images), classes):
        index.setdefault(img.tobytes(), set()).add(int(c))
    return index


def test_cache_contents(omniglot_set):
    data = omniglot_set
    assert len(data.class_names) == 1623 and data.images.shape == (32460, 1, 28, 28)
    assert data.images.dtype == np.uint8 and set(np.unique(data.images)) == {0, 1}
    assert data.class_names == sorted(data.class_names) and data.class_names[0] == "Alphabet_of_the_Magi/character01"
    assert (data.counts == 20).all()
    assert 0.85 < data.images.mean() < 0.95  # background 1, strokes 0 (spec: mean pixel ~0.91)
    assert {k: v.removeprefix("sha256:") for k, v in data.sources.items()} == ARCHIVE_SHA256


def test_reference_split(omniglot_set):
    splits = omniglot_set.splits
    assert {k: len(s.classes) for k, s in splits.items()} == {"train": 1150, "val": 50, "test": 423}
    assert fingerprint(splits["train"].names) == "a4b4420291aa"
    assert fingerprint(splits["val"].names) == "3f6b0698add7"
    assert fingerprint(splits["test"].names) == "e967f3886c5a"
    assert len(set(np.concatenate([s.classes for s in splits.values()]))) == 1623


def test_vinyals_split(shared_data_root, data_cache_dir, omniglot_set):
    data = load_image_set(DataConfig(dataset="omniglot", split="vinyals"), shared_data_root,
                          cache_dir=data_cache_dir, download=False)
    assert data.cache_path == omniglot_set.cache_path  # one cache serves every split
    sizes = {k: len(s.classes) for k, s in data.splits.items()}
    assert sizes == {"train": 4112, "val": 688, "test": 1692}  # characters x 4 rotations
    chars = {k: set(s.classes.tolist()) for k, s in data.splits.items()}
    assert [len(c) for c in chars.values()] == [1028, 172, 423]
    assert not (chars["train"] & chars["test"] or chars["val"] & chars["test"] or chars["train"] & chars["val"])
    alphabets = {k: {data.class_names[c].split("/")[0] for c in v} for k, v in chars.items()}
    assert alphabets["train"] & alphabets["test"] == {"Gurmukhi"}  # the lists cut one alphabet in two
    assert set(data.splits["train"].rotations.tolist()) == {0, 1, 2, 3}


def test_cached_load_decodes_nothing(shared_data_root, data_cache_dir, omniglot_set, monkeypatch):
    """A second load reads the cache (how fast it is belongs in benchmarks, not in a test)."""
    import mamlpp.data.omniglot as omniglot

    monkeypatch.setattr(omniglot, "prepare", lambda *args: pytest.fail("the cache was built again"))
    data = load_image_set(DataConfig(dataset="omniglot"), shared_data_root, cache_dir=data_cache_dir, download=False)
    assert data.cache_path == omniglot_set.cache_path
    assert np.array_equal(data.images[::997], omniglot_set.images[::997])


def test_preprocessing_matches_reference(shared_data_root, omniglot_set):
    """The reference's load_image: PIL open, resize 28x28 asking for LANCZOS, np.array, no scaling."""
    with zipfile.ZipFile(shared_data_root / "omniglot" / "images_evaluation.zip") as z:
        members = sorted(n for n in z.namelist() if n.startswith("images_evaluation/Tengwar/character03/"))
        expected = [np.array(Image.open(io.BytesIO(z.read(m))).resize((28, 28), Image.LANCZOS), dtype=np.float32)
                    for m in members]
    c = omniglot_set.class_names.index("Tengwar/character03")
    start = omniglot_set.offsets[c]
    for i, e in enumerate(expected):
        assert np.array_equal(omniglot_set.images[start + i, 0].astype(np.float32), e)


def _classes_of(index, img: np.ndarray) -> set[int]:
    return index.get(np.ascontiguousarray(img, dtype=np.uint8).tobytes(), set())


def _label_rotations(index, images: np.ndarray) -> dict[int, set[int]]:
    """For one label's images [K+T, 1, 28, 28]: rotation k -> classes holding every image once the
    rotation is undone (a rotation k is valid for the label when this set is non-empty)."""
    found = {}
    for k in range(4):
        sets = [_classes_of(index, np.rot90(img, -k, axes=(-2, -1))) for img in images]
        common = set.intersection(*sets)
        if common:
            found[k] = common
    return found


def test_episodes_by_content(omniglot_set, content_index):
    n, k, q, b = 20, 2, 3, 4
    tasks = ImageTasks(omniglot_set, n, k, q, seed=0, augment=True)
    assert tasks.input_shape == (1, 28, 28) and tasks.num_outputs == n
    for split, ep in (("val", tasks.eval_batch("val", 0, b)), ("test", tasks.eval_batch("test", 5, b)),
                      ("train", tasks.train_batch(0, b))):
        assert ep["xs"].shape == (b, n * k, 1, 28, 28) and ep["xq"].shape == (b, n * q, 1, 28, 28)
        assert ep["ys"].dtype == torch.int64 and ep["ys"].shape == (b, n * k) and ep["yq"].shape == (b, n * q)
        assert torch.equal(ep["ys"][0], torch.arange(n).repeat_interleave(k))
        assert torch.equal(ep["yq"][0], torch.arange(n).repeat_interleave(q))
        pool = set(omniglot_set.splits[split].classes.tolist())
        for t in range(b):
            xs = ep["xs"][t].view(n, k, 1, 28, 28).numpy().astype(np.uint8)
            xq = ep["xq"][t].view(n, q, 1, 28, 28).numpy().astype(np.uint8)
            owners = []
            for j in range(n):
                imgs = np.concatenate([xs[j], xq[j]])
                assert len({im.tobytes() for im in imgs}) == k + q  # distinct images
                rotations = _label_rotations(content_index, imgs)
                if split != "train":
                    assert 0 in rotations  # never rotated outside training
                assert rotations, f"{split} task {t} label {j}: support and query are not one class"
                owners.append(set.union(*rotations.values()))
                assert owners[-1] <= pool  # classes of this split only
            # N distinct classes: no class can own two labels (unless its images repeat elsewhere)
            assert len(set().union(*owners)) >= n


def test_rotation_is_per_class_and_training_only(omniglot_set, content_index):
    n, k, q = 5, 2, 3
    augmented = ImageTasks(omniglot_set, n, k, q, seed=1, augment=True)
    plain = ImageTasks(omniglot_set, n, k, q, seed=1, augment=False)
    ep = augmented.train_batch(0, 16)
    plan = augmented.plan("train", range(16))
    seen = set()
    for t in range(16):
        x = torch.cat([ep["xs"][t].view(n, k, 1, 28, 28), ep["xq"][t].view(n, q, 1, 28, 28)], 1).numpy()
        for j in range(n):
            valid = _label_rotations(content_index, x[j].astype(np.uint8))
            rot = int(plan["rotations"][t, j])
            assert rot in valid  # one rotation for all support and query images of the class
            seen.add(rot)
            # undoing the planned rotation gives back the cached images of the planned class
            c = int(plan["classes"][t, j])
            for img, idx in zip(x[j], plan["images"][t, j].tolist()):
                assert omniglot_set.offsets[c] <= idx < omniglot_set.offsets[c + 1]
                assert np.array_equal(np.rot90(img, -rot, axes=(-2, -1)), omniglot_set.images[idx])
    assert seen == {0, 1, 2, 3}
    # Rotation codes vary between the classes of one task (per class, not per task).
    assert any(len(set(r.tolist())) > 1 for r in plan["rotations"])
    # Without augmentation: the same classes and images, unrotated.
    plain_plan = plain.plan("train", range(16))
    assert torch.equal(plain_plan["images"], plan["images"]) and not plain_plan["rotations"].any()
    assert not augmented.plan("val", range(50))["rotations"].any()
    assert not augmented.plan("test", range(50))["rotations"].any()


def test_build_image_tasks(shared_data_root, data_cache_dir, omniglot_set):
    cfg = Config()
    cfg.data.ways, cfg.data.shots, cfg.data.queries = 20, 1, 1
    tasks = build_image_tasks(cfg, torch.device("cpu"), torch.float64, str(shared_data_root), cache_dir=data_cache_dir)
    assert tasks.kind == "classification" and tasks.input_shape == (1, 28, 28) and tasks.num_outputs == 20
    assert tasks.augment
    ep = tasks.train_batch(3, 8)
    assert ep["xs"].dtype == torch.float64 and set(ep["xs"].unique().tolist()) <= {0.0, 1.0}
    assert tasks.split_sizes()["test"] == {"classes": 423, "images": 8460}
    cfg.data.split = "vinyals"
    vinyals = build_image_tasks(cfg, torch.device("cpu"), torch.float32, str(shared_data_root), cache_dir=data_cache_dir)
    assert not vinyals.augment  # rotations are classes of their own there
    assert vinyals.split_sizes()["train"]["classes"] == 4112

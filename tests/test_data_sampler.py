"""The episode sampler on synthetic in-memory image sets: which images a task gets, determinism,
resumption, seeds per split, normalisation and rotation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mamlpp.data import DataError, ImageSet, ImageTasks, Split
from mamlpp.data.common import IMAGENET_MEAN, IMAGENET_STD, offsets_from_counts, plain_split


def tagged_set(counts, channels=1, size=6, norm="none", splits=None) -> ImageSet:
    """Image i of class c has pixel (0, 0) = c and pixel (0, 1) = its index within the class."""
    offsets = offsets_from_counts(counts)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(int(offsets[-1]), channels, size, size), dtype=np.uint8)
    for c, n in enumerate(counts):
        images[offsets[c]:offsets[c + 1], :, 0, 0] = c
        images[offsets[c]:offsets[c + 1], :, 0, 1] = np.arange(n)[:, None]
    names = [f"class{c:02d}" for c in range(len(counts))]
    if splits is None:
        cut = np.array_split(np.arange(len(counts)), 3)
        splits = dict(zip(("train", "val", "test"), cut))
    return ImageSet("synthetic", images, names, offsets,
                    {k: v if isinstance(v, Split) else plain_split(v, names) for k, v in splits.items()}, norm)


def episodes_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tasks_have_distinct_classes_and_images():
    counts = [8, 5, 12, 7, 9, 6] * 5  # uneven classes
    data = tagged_set(counts)
    n, k, q = 4, 2, 3
    tasks = ImageTasks(data, n, k, q, seed=0, augment=False)
    for split in ("train", "val", "test"):
        pool = set(data.splits[split].classes.tolist())
        ep = tasks.episodes(split, range(40))
        xs = ep["xs"].view(40, n, k, 6, 6)
        xq = ep["xq"].view(40, n, q, 6, 6)
        x = torch.cat([xs, xq], 2).to(torch.int64)
        cls, idx = x[..., 0, 0], x[..., 0, 1]  # [B, N, K+T]
        assert (cls == cls[..., :1]).all()  # support and query of one label: one class
        for t in range(40):
            assert len(set(cls[t, :, 0].tolist())) == n and set(cls[t, :, 0].tolist()) <= pool
            for j in range(n):
                c = int(cls[t, j, 0])
                assert len(set(idx[t, j].tolist())) == k + q and int(idx[t, j].max()) < counts[c]
        used = set(cls[..., 0].flatten().tolist())
        assert used == pool  # every class of the split gets used


def test_deterministic_resumable_and_seeded_per_split():
    data = tagged_set([10] * 30)
    a = ImageTasks(data, 3, 1, 2, seed=5, augment=False)
    b = ImageTasks(data, 3, 1, 2, seed=5, augment=False)
    other = ImageTasks(data, 3, 1, 2, seed=6, augment=False)
    # the training stream: batch i of size B = tasks i*B .. i*B+B-1, whatever came before
    a.train_batch(0, 4)
    assert episodes_equal(a.train_batch(1, 4), b.train_batch(1, 4))
    whole = b.train_batch(0, 8)
    assert episodes_equal(a.train_batch(1, 4), {k: v[4:] for k, v in whole.items()})
    assert episodes_equal(a.train_batch(0, 4), {k: v[:4] for k, v in whole.items()})
    assert not torch.equal(a.train_batch(0, 4)["xs"], other.train_batch(0, 4)["xs"])
    # the evaluation sets: fixed, independent of the training seed, chunking does not matter
    for split in ("val", "test"):
        full = a.eval_batch(split, 0, 10)
        assert episodes_equal(full, other.eval_batch(split, 0, 10))
        assert episodes_equal({k: v[3:7] for k, v in full.items()}, b.eval_batch(split, 3, 4))
    # splits do not share task seeds: same class pools would otherwise give the same tasks
    same_pool = tagged_set([10] * 12, splits={s: np.arange(12) for s in ("train", "val", "test")})
    t = ImageTasks(same_pool, 3, 1, 2, seed=0, augment=False)
    val, test, train = (t.episodes(s, range(6))["xs"] for s in ("val", "test", "train"))
    assert not torch.equal(val, test) and not torch.equal(val, train)
    with pytest.raises(ValueError):
        a.eval_batch("train", 0, 1)


@pytest.mark.parametrize("norm,channels", [("none", 1), ("unit", 1), ("imagenet", 3)])
def test_normalisation(norm, channels):
    data = tagged_set([6] * 9, channels=channels, norm=norm)
    tasks = ImageTasks(data, 2, 2, 1, seed=0, augment=False, dtype=torch.float64)
    ep = tasks.eval_batch("val", 0, 3)
    plan = tasks.plan("val", range(3))
    raw = torch.from_numpy(data.images[plan["images"].numpy()]).double()  # [B, N, K+T, C, H, W]
    if norm == "unit":
        raw = raw / 255
    elif norm == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
        raw = (raw / 255 - mean) / std
    assert ep["xs"].dtype == torch.float64
    torch.testing.assert_close(ep["xs"], raw[:, :, :2].reshape(3, 4, channels, 6, 6), rtol=0, atol=1e-12)
    torch.testing.assert_close(ep["xq"], raw[:, :, 2:].reshape(3, 2, channels, 6, 6), rtol=0, atol=1e-12)
    assert np.array_equal(tasks.to_uint8(ep["xq"]), data.images[plan["images"][:, :, 2:].reshape(3, 2).numpy()])


def test_rotation_matches_np_rot90_counter_clockwise():
    data = tagged_set([6] * 9)
    tasks = ImageTasks(data, 3, 2, 2, seed=0, augment=True)
    ep = tasks.train_batch(0, 12)
    plan = tasks.plan("train", range(12))
    x = torch.cat([ep["xs"].view(12, 3, 2, 1, 6, 6), ep["xq"].view(12, 3, 2, 1, 6, 6)], 2).numpy()
    for t in range(12):
        for j in range(3):
            k = int(plan["rotations"][t, j])
            for i, idx in enumerate(plan["images"][t, j].tolist()):
                assert np.array_equal(x[t, j, i], np.rot90(data.images[idx], k, axes=(1, 2)))
    assert set(plan["rotations"].flatten().tolist()) == {0, 1, 2, 3}
    # np.rot90 turns counter-clockwise: the top-right pixel moves to the top-left
    a = np.arange(4).reshape(2, 2)
    assert np.rot90(a)[0, 0] == a[0, 1]


def test_fixed_class_rotations_apply_everywhere():
    names = [f"c{i}" for i in range(4)]
    rotated = Split(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 3]), ["c0/rot000", "c0/rot090", "c1/rot000", "c1/rot270"])
    data = tagged_set([5] * 4, splits={"train": rotated, "val": rotated, "test": plain_split([2, 3], names)})
    tasks = ImageTasks(data, 2, 1, 1, seed=0, augment=False)
    plan = tasks.plan("val", range(20))
    expected = torch.tensor([0, 1, 0, 3])
    # each sampled class keeps its own fixed rotation
    for t in range(20):
        for j in range(2):
            c = int(plan["classes"][t, j])
            assert int(plan["rotations"][t, j]) in set(expected[torch.tensor([0, 1, 2, 3])[rotated.classes == c]].tolist())
    assert set(plan["rotations"].flatten().tolist()) == {0, 1, 3}


def test_sizes_are_checked_against_every_split():
    data = tagged_set([6] * 9)  # 3 classes per split
    with pytest.raises(DataError, match=r"split 'train' has 3 classes, fewer than data.ways=4"):
        ImageTasks(data, 4, 1, 1, seed=0, augment=False)
    small = tagged_set([6, 6, 6, 6, 6, 6, 6, 3, 6])
    with pytest.raises(DataError, match=r"split 'test', class class07 has 3 images, fewer than data.shots \+ data.queries = 2\+2"):
        ImageTasks(small, 2, 2, 2, seed=0, augment=False)
    ImageTasks(small, 2, 2, 1, seed=0, augment=False)


def test_rotation_needs_square_images():
    data = tagged_set([6] * 9)
    data.images = np.ascontiguousarray(data.images[:, :, :, :5])
    with pytest.raises(DataError, match="square"):
        ImageTasks(data, 2, 1, 1, seed=0, augment=True)
    ImageTasks(data, 2, 1, 1, seed=0, augment=False).train_batch(0, 2)


@pytest.mark.parametrize("norm,channels,augment", [("none", 1, True), ("imagenet", 3, False), ("cifar100", 3, False)])
def test_streamed_images_give_the_same_episodes(norm, channels, augment):
    """Above the device limit the images stay in host memory and each batch is gathered there; forcing
    the limit to 0 on the CPU exercises that path, which must give exactly the resident path's episodes."""
    data = tagged_set([7, 9, 6, 8] * 6, channels=channels, norm=norm)
    resident = ImageTasks(data, 3, 2, 2, seed=4, augment=augment, dtype=torch.float64)
    streamed = ImageTasks(data, 3, 2, 2, seed=4, augment=augment, dtype=torch.float64, device_max_bytes=0)
    assert streamed.streamed and not resident.streamed
    assert ImageTasks(data, 3, 2, 2, seed=4, augment=augment, device_max_bytes=data.images.nbytes).streamed is False
    for a, b in ((resident.train_batch(2, 5), streamed.train_batch(2, 5)),
                 (resident.eval_batch("val", 3, 7), streamed.eval_batch("val", 3, 7))):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_device_limit_from_the_environment(monkeypatch):
    from mamlpp.data.sampler import DEVICE_COPY_MAX_BYTES, device_copy_limit

    monkeypatch.delenv("MAMLPP_DEVICE_IMAGES_GB", raising=False)
    assert device_copy_limit() == DEVICE_COPY_MAX_BYTES == 4 << 30
    monkeypatch.setenv("MAMLPP_DEVICE_IMAGES_GB", "0.5")
    assert device_copy_limit() == 1 << 29
    data = tagged_set([6] * 9)
    monkeypatch.setenv("MAMLPP_DEVICE_IMAGES_GB", "0")
    assert ImageTasks(data, 2, 1, 1, seed=0, augment=False).streamed
    for bad in ("-1", "lots", "nan", "inf"):
        monkeypatch.setenv("MAMLPP_DEVICE_IMAGES_GB", bad)
        with pytest.raises(DataError, match=rf"MAMLPP_DEVICE_IMAGES_GB='{bad}': expected a size in GB >= 0"):
            device_copy_limit()

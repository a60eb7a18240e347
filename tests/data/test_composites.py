"""Instance composites on real photos (../shared/data/photos; never the UKBench benchmark images)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from glimr.data.composites import InstanceComposites
from glimr.data.samplers import GroupSizeBatchSampler, RandomOrder


@pytest.fixture(scope="module")
def photos(shared_data):
    paths = sorted((shared_data / "photos").glob("*.JPEG"))[:8]
    assert len(paths) == 8
    return paths


def test_items_labels_and_sizes(photos):
    ds = InstanceComposites(photos, long_side=128, views_per_class=3)
    assert len(ds) == 24 and ds.num_classes == 8
    assert list(ds.labels[:10]) == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    item = ds[(9, 128, 96)]
    assert item["label"] == 1 and item["index"] == 9
    img, info = ds.render(9, (128, 96))
    x0, y0, x1, y1 = info.box
    assert torch.allclose(item["box"], torch.tensor([x0 / 128, y0 / 96, x1 / 128, y1 / 96]))
    assert item["image"].dtype == torch.uint8 and tuple(item["image"].shape) == (3, 96, 128)
    free = ds[4]  # no size given: the group size of the photo's aspect ratio
    assert max(free["image"].shape[1:]) == 128


def test_views_are_pure_functions_of_seed_epoch_index(photos):
    a = InstanceComposites(photos, long_side=96, seed=5)
    b = InstanceComposites(photos, long_side=96, seed=5)
    x = a[(3, 96, 64)]["image"]
    assert torch.equal(x, b[(3, 96, 64)]["image"])
    b.set_epoch(1)
    assert not torch.equal(x, b[(3, 96, 64)]["image"])
    assert not torch.equal(x, InstanceComposites(photos, long_side=96, seed=6)[(3, 96, 64)]["image"])


def test_composites_paste_the_object_into_another_photo(photos):
    ds = InstanceComposites(photos, long_side=160, p_clean=0.0, paste_scale=(0.3, 0.5), illumination=0.0,
                            views_per_class=4)
    for i in range(len(ds)):
        img, info = ds.render(i, (160, 120))
        assert img.size == (160, 120) and info.label == i % 8
        assert info.background is not None and info.background != info.label
        x0, y0, x1, y1 = info.box
        assert 0 <= x0 < x1 <= 160 and 0 <= y0 < y1 <= 120
        frac = (x1 - x0) / 160
        assert frac <= 0.5 + 1e-9 and (frac >= 0.3 - 0.01 or (y1 - y0) >= int(0.95 * 120) - 1)


def test_pasted_region_shows_the_object_not_the_background(photos):
    """With no augmentation, the pasted box holds the (resized) object photo's pixels."""
    ds = InstanceComposites(photos, long_side=200, p_clean=0.0, paste_scale=(0.6, 0.6), crop_area=(1.0, 1.0),
                            crop_ratio=(1.0, 1.0), illumination=0.0, hflip=0.0)
    img, info = ds.render(2, (200, 150))
    x0, y0, x1, y1 = info.box
    obj = ds._load(2, 200).resize((x1 - x0, y1 - y0))
    got = np.asarray(img.crop(info.box), dtype=np.float32)
    assert np.abs(got - np.asarray(obj, dtype=np.float32)).mean() < 3.0
    bg = ds._load(info.background, 200).resize((x1 - x0, y1 - y0))
    assert np.abs(got - np.asarray(bg, dtype=np.float32)).mean() > 10.0


def test_clean_views(photos):
    ds = InstanceComposites(photos, long_side=96, p_clean=1.0)
    _, info = ds.render(0, (96, 64))
    assert info.background is None and info.box == (0, 0, 96, 64)
    ds2 = InstanceComposites(photos, long_side=96, p_clean=0.0, clean_first=1, views_per_class=3)
    kinds = [ds2.render(i, (96, 64))[1].background is None for i in range(len(ds2))]
    assert kinds == [True] * 8 + [False] * 16


def test_group_size_batches_of_composites(photos):
    ds = InstanceComposites(photos, long_side=96, views_per_class=2)
    s = GroupSizeBatchSampler(RandomOrder(len(ds)), ds.aspects, batch_size=4, long_side=96, n_groups=2,
                              drop_last=False)
    for batch in s:
        shapes = {tuple(ds[k]["image"].shape) for k in batch}
        assert len(shapes) == 1


def test_errors(photos, tmp_path):
    with pytest.raises(FileNotFoundError, match="photo folder"):
        InstanceComposites(tmp_path / "nope")
    with pytest.raises(ValueError, match="at least 2"):
        InstanceComposites(photos[:1])
    with pytest.raises(ValueError, match="paste_scale"):
        InstanceComposites(photos, paste_scale=(0.5, 1.5))
    with pytest.raises(IndexError):
        InstanceComposites(photos).render(99)

"""Real views (glimr.data.views): instance classes from real photos (../shared/data/photos) seen through
real_view, place classes from real webcam frames (../shared/data/train-real/webcam); nothing is pasted."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from glimr.data.views import RealViews


@pytest.fixture(scope="module")
def photos(shared_data):
    paths = sorted((shared_data / "photos").glob("*.JPEG"))[:6]
    assert len(paths) == 6
    return paths


@pytest.fixture(scope="module")
def places(shared_data, tmp_path_factory):
    """Two webcams with 3 frames each, and a sub-folder with one frame only (not a class)."""
    root = tmp_path_factory.mktemp("places")
    cams = sorted(p for p in (shared_data / "train-real" / "webcam").iterdir() if p.is_dir())[:3]
    for cam, n in zip(cams, (3, 3, 1)):
        (root / cam.name).mkdir()
        for f in sorted(cam.glob("*.jpg"))[:n]:
            os.symlink(f, root / cam.name / f.name)
    return root


def test_items_labels_ids_and_place_classes(photos, places):
    ds = RealViews(photos, places, long_side=96, views_per_class=3)
    assert ds.num_instances == 6 and ds.num_classes == 8          # the 1-frame folder is no class
    assert len(ds) == 6 * 3 + 6
    labels = ds.labels
    assert labels[:18].tolist() == [i % 6 for i in range(18)]
    assert labels[18:].tolist() == [6, 6, 6, 7, 7, 7]
    ids = ds.item_ids()
    assert len(set(ids)) == len(ds) and ids[0] == "c0_v0" and ids[17] == "c5_v2"
    assert [ds.source(i)[2] for i in (0, 17, 18, 23)] == [False, False, True, True]
    assert ds.source(19)[1] == os.path.abspath(sorted((places / sorted(os.listdir(places))[0]).iterdir())[1])
    assert ds.aspects.shape == (len(ds),)
    assert ds.describe()["kind"] == "views" and len(ds.describe()["groups"]) == 2


def test_views_are_pure_functions_of_seed_epoch_index(photos, places):
    ds = RealViews(photos, places, long_side=96, views_per_class=2, seed=3)
    a = np.asarray(ds.render(4, (96, 72))[0])
    assert np.array_equal(a, np.asarray(ds.render(4, (96, 72))[0]))
    assert not np.array_equal(a, np.asarray(ds.render(4, (96, 72), epoch=1)[0]))
    assert not np.array_equal(a, np.asarray(RealViews(photos, places, views_per_class=2, seed=4)
                                            .render(4, (96, 72))[0]))
    img, info = ds.render(13, (80, 96))
    assert img.size == (80, 96) and info.box == (0, 0, 80, 96) and info.background is None
    item = ds[(13, 80, 96)]
    assert tuple(item["image"].shape) == (3, 96, 80) and item["label"] == ds.labels[13]


def test_a_view_shows_its_own_photo_only(tmp_path):
    """Nothing is pasted: with colour shifts, night, occluders and JPEG off, a view of a red photo holds
    only red and one of a blue photo only blue (the warp's border fill is black)."""
    for name, rgb in (("red.png", (220, 20, 20)), ("blue.png", (20, 20, 220))):
        Image.new("RGB", (160, 120), rgb).save(tmp_path / name)
    ds = RealViews(tmp_path, long_side=64, views_per_class=8, illumination=0.0, crop_area=(0.3, 1.0))
    ds.p_night = ds.p_occlude = ds.p_jpeg = 0.0
    for i in range(len(ds)):
        x = np.asarray(ds.render(i, (64, 48))[0]).reshape(-1, 3).astype(int)
        lit = x[x.sum(1) > 120]
        assert len(lit) > 0.5 * len(x)
        ch = 2 if os.path.basename(ds.source(i)[1]) == "blue.png" else 0
        assert (lit[:, ch] > lit.sum(1) - lit[:, ch]).all(), i


def test_errors(photos, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder nor a file"):
        RealViews([tmp_path / "missing"])
    with pytest.raises(FileNotFoundError, match="not a folder"):
        RealViews(photos, tmp_path / "nowhere")
    (tmp_path / "g" / "one").mkdir(parents=True)
    with pytest.raises(ValueError, match="no sub-folder"):
        RealViews(photos, tmp_path / "g")
    with pytest.raises(ValueError, match="at least 2 classes"):
        RealViews(photos[:1])
    with pytest.raises(ValueError, match="crop_area"):
        RealViews(photos, crop_area=(0.0, 1.0))
    with pytest.raises(ValueError, match="views_per_class"):
        RealViews(photos, views_per_class=0)
    with pytest.raises(IndexError):
        RealViews(photos, views_per_class=1).render(6)

"""Loading the official Revisited/Oxford ground truth safely, and mapping it to real Oxford images."""
from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest

from glimr.data.revisited import (
    GroundTruthError,
    RestrictedUnpickler,
    clip_box,
    load_gnd,
    load_revisited,
)
from glimr.io.images import load_image

SAMPLE = ["bodleian_000132", "oxford_002904", "pitt_rivers_000033", "pitt_rivers_000058",
          "pitt_rivers_000087", "pitt_rivers_000119", "pitt_rivers_000153", "radcliffe_camera_000095",
          "radcliffe_camera_000519", "radcliffe_camera_000523"]


@pytest.fixture(scope="module")
def revisited(shared_data):
    return shared_data / "revisited"


@pytest.mark.parametrize("name,nq,ndb,keys", [
    ("roxford5k", 70, 4993, {"bbx", "easy", "hard", "junk"}),
    ("rparis6k", 70, 6322, {"bbx", "easy", "hard", "junk"}),
    ("oxford5k", 55, 5063, {"bbx", "ok", "junk"}),
    ("paris6k", 55, 6392, {"bbx", "ok", "junk"}),
])
def test_official_files_load_through_the_restricted_unpickler(revisited, name, nq, ndb, keys):
    d = load_gnd(revisited / f"gnd_{name}.pkl")
    assert len(d["qimlist"]) == nq and len(d["gnd"]) == nq and len(d["imlist"]) == ndb
    assert all(set(g) == keys for g in d["gnd"])
    g = d["gnd"][0]
    assert isinstance(g["bbx"], tuple) and len(g["bbx"]) == 4
    assert g["junk"].dtype == np.int64


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless if it ran; it must not be called at all


def test_restricted_unpickler_refuses_code(tmp_path):
    p = tmp_path / "gnd_roxford5k.pkl"
    p.write_bytes(pickle.dumps({"qimlist": [], "imlist": [], "gnd": [_Evil()]}))
    with pytest.raises(GroundTruthError, match=r"refused to load '(posix|os|nt)\.getcwd'"):
        load_gnd(p)
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        RestrictedUnpickler(open(p, "rb")).load()
    # plain numpy arrays (a copy re-saved with numpy) are still accepted
    ok = tmp_path / "gnd_np.pkl"
    ok.write_bytes(pickle.dumps({"qimlist": ["a"], "imlist": ["b", "c"],
                                 "gnd": [{"bbx": np.array([1.0, 2, 3, 4]), "ok": np.array([1]),
                                          "junk": np.array([], dtype=np.int64)}]}))
    d = load_gnd(ok)
    assert d["gnd"][0]["bbx"] == (1.0, 2.0, 3.0, 4.0) and d["gnd"][0]["ok"].tolist() == [1]


def test_bad_ground_truth_is_reported(tmp_path):
    p = tmp_path / "gnd_x.pkl"
    p.write_bytes(b"not a pickle")
    with pytest.raises(GroundTruthError, match="gnd_x.pkl"):
        load_gnd(p)
    p.write_bytes(pickle.dumps({"qimlist": ["a"], "imlist": ["b"], "gnd": [{"ok": [3], "junk": []}]}))
    with pytest.raises(GroundTruthError, match="outside"):
        load_gnd(p)


def test_loader_finds_the_sample_images_by_name(revisited):
    ds = load_revisited("roxford5k", gnd_path=revisited / "gnd_roxford5k.pkl",
                        images=revisited / "oxford-sample")
    assert ds.protocol == "revisited" and ds.crop and ds.notes == []
    found = {n: p for n, p in zip(ds.qimlist, ds.query_paths) if p is not None}
    assert sorted(found) == SAMPLE  # all ten are ROxford queries (which are not in its database)
    assert all(p.name == n + ".jpg" and p.is_file() for n, p in found.items())
    miss = ds.missing()
    assert len(miss["query"]) == 60 and len(miss["db"]) == 4993
    with pytest.raises(FileNotFoundError, match="60 of 70 query images"):
        ds.require_images()
    # the original Oxford5k lists the same images among its database images too
    old = load_revisited("oxford5k", root=revisited, images=revisited / "oxford-sample")
    assert sorted(n for n, p in zip(old.imlist, old.db_paths) if p is not None) == SAMPLE


def test_layout_search_under_root(revisited, tmp_path):
    root = tmp_path / "datasets"
    (root / "roxford5k" / "jpg").mkdir(parents=True)
    shutil.copy(revisited / "gnd_roxford5k.pkl", root / "roxford5k")
    shutil.copy(revisited / "oxford-sample" / "bodleian_000132.jpg", root / "roxford5k" / "jpg")
    ds = load_revisited("roxford5k", root=root)
    assert ds.image_dir == root / "roxford5k" / "jpg"
    assert sum(p is not None for p in ds.query_paths) == 1
    with pytest.raises(FileNotFoundError, match="gnd_rparis6k.pkl"):
        load_revisited("rparis6k", root=root)
    with pytest.raises(GroundTruthError, match="original-protocol"):
        load_revisited("roxford5k", gnd_path=revisited / "gnd_oxford5k.pkl")


def test_query_is_cropped_to_its_ground_truth_box(revisited):
    ds = load_revisited("roxford5k", gnd_path=revisited / "gnd_roxford5k.pkl",
                        images=revisited / "oxford-sample")
    q = ds.qimlist.index("radcliffe_camera_000523")
    assert ds.query_boxes[q] == (38.0, 8.0, 686.0, 984.0)
    crop = ds.query_image(q)
    full = load_image(ds.query_paths[q])
    assert full.size == (768, 1024)
    assert crop.size == (686 - 38, 984 - 8)
    assert np.array_equal(np.asarray(crop), np.asarray(full)[8:984, 38:686])
    # a fractional box (pitt_rivers_000033: 68.3, 51.2, 989.9, 682.7) is rounded like PIL does
    q2 = ds.qimlist.index("pitt_rivers_000033")
    assert ds.query_image(q2).size == (990 - 68, 683 - 51)
    # a size-capped decode keeps the crop on the same content
    small = ds.query_image(q, target_size=256)
    assert small.width < crop.width and abs(small.width / small.height - crop.width / crop.height) < 0.02


def test_crop_off_is_explicit_and_said(revisited):
    with pytest.warns(UserWarning, match="NOT cropped"):
        ds = load_revisited("roxford5k", gnd_path=revisited / "gnd_roxford5k.pkl",
                            images=revisited / "oxford-sample", crop=False)
    assert ds.query_boxes == [None] * 70 and not ds.crop
    assert any("NOT cropped" in n for n in ds.notes)
    q = ds.qimlist.index("radcliffe_camera_000523")
    assert ds.query_image(q).size == (768, 1024)


def test_distractors_are_appended_after_the_database(revisited, tmp_path):
    dis = tmp_path / "r1m" / "0"
    dis.mkdir(parents=True)
    for n in SAMPLE[:3]:
        shutil.copy(revisited / "oxford-sample" / f"{n}.jpg", dis / f"d_{n}.jpg")
    ds = load_revisited("roxford5k", gnd_path=revisited / "gnd_roxford5k.pkl",
                        images=revisited / "oxford-sample", distractors=tmp_path / "r1m")
    assert ds.n_db == 4993 + 3 and ds.n_distractors == 3
    assert [p.name for p in ds.db_paths[4993:]] == sorted(f"d_{n}.jpg" for n in SAMPLE[:3])
    assert "distractors" in ds.title and any("R1M" in n for n in ds.notes)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_revisited("roxford5k", gnd_path=revisited / "gnd_roxford5k.pkl", distractors=tmp_path / "nope")


def test_clip_box():
    assert clip_box((68.3, 51.2, 989.9, 682.7), 1024, 766) == (68, 51, 990, 683)
    assert clip_box((-5, -5, 2000, 2000), 100, 80) == (0, 0, 100, 80)
    with pytest.raises(ValueError, match="empty"):
        clip_box((50, 50, 50, 60), 100, 100)


@pytest.mark.parametrize(("obj", "what"), [
    ({"qimlist": "abc", "imlist": ["b"], "gnd": []}, "'qimlist' must be a list of image names"),
    ({"qimlist": 3, "imlist": ["b"], "gnd": []}, "'qimlist' must be a list of image names, not int"),
    ({"qimlist": ["a", 5], "imlist": ["b"], "gnd": [{}, {}]}, "'qimlist' must be a list of image names"),
    ({"qimlist": ["a"], "imlist": ["b"], "gnd": {"a": {}}}, "'gnd' must be a list"),
    ({"qimlist": ["a"], "imlist": ["b", "c"], "gnd": [{"ok": [[0, 1]], "junk": []}]}, "must be a flat list"),
    ({"qimlist": ["a"], "imlist": ["b", "c"], "gnd": [{"ok": "01", "junk": []}]}, "must be a flat list"),
    ({"qimlist": ["a"], "imlist": ["b", "c"], "gnd": [{"ok": [0.5], "junk": []}]}, "non-integer indices"),
    ({"qimlist": ["a"], "imlist": ["b", "c"], "gnd": [{"ok": [[0], [0, 1]], "junk": []}]}, "not a list of indices"),
    ({"qimlist": ["a"], "imlist": ["b", "c"], "gnd": [{"ok": [True], "junk": []}]}, "must be a flat list"),
    ({"qimlist": ["a"], "imlist": ["b"], "gnd": [{"ok": [0], "junk": [], "bbx": [1, 2, 3]}]}, "must have 4 numbers"),
    ({"qimlist": ["a"], "imlist": ["b"], "gnd": [{"ok": [0], "junk": [], "bbx": ["x", 2, 3, 4]}]}, "4 numbers"),
    ({"qimlist": ["a"], "imlist": ["b"], "gnd": [{"ok": [0], "junk": [], "bbx": [5, 2, 3, 4]}]}, "is not a box"),
    ({"qimlist": ["a"], "imlist": ["b"], "gnd": [{"ok": [0], "junk": [], "bbx": [0, 0, float("nan"), 4]}]},
     "is not a box"),
])
def test_malformed_pickle_contents_and_shapes_are_ground_truth_errors(tmp_path, obj, what):
    p = tmp_path / "gnd_bad.pkl"
    p.write_bytes(pickle.dumps(obj))
    with pytest.raises(GroundTruthError) as e:
        load_gnd(p)
    assert what in str(e.value) and "gnd_bad.pkl" in str(e.value)
    # integral floats (a numpy re-save) are accepted as indices
    p.write_bytes(pickle.dumps({"qimlist": ["a"], "imlist": ["b", "c"],
                                "gnd": [{"ok": np.array([1.0]), "junk": [], "bbx": [0, 0, 3, 4]}]}))
    assert load_gnd(p)["gnd"][0]["ok"].tolist() == [1]

"""CSV and GLDv2-format training sets, on real photos."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from glimr.data.datasets import (DatasetError, LabeledImages, gldv2_image_path, number_labels, read_gldv2_csv,
                                 read_label_csv)


@pytest.fixture(scope="module")
def photos(shared_data):
    return sorted((shared_data / "photos").glob("*.JPEG"))[:6]


def test_csv_with_header_string_labels_and_relative_paths(photos, tmp_path):
    for p in photos:
        os.symlink(p, tmp_path / p.name)
    rows = ["image,label"] + [f"{p.name},{'cat' if k % 2 else 'dog'}" for k, p in enumerate(photos)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    ds = LabeledImages.from_csv(tmp_path / "train.csv", long_side=96)
    assert len(ds) == 6 and ds.num_classes == 2 and ds.class_names == ["cat", "dog"]
    assert list(ds.labels) == [1, 0, 1, 0, 1, 0]
    item = ds[(2, 96, 64)]
    assert item["label"] == 1 and tuple(item["image"].shape) == (3, 64, 96) and item["image"].dtype == torch.uint8
    assert torch.equal(item["image"], ds[(2, 96, 64)]["image"])          # same (seed, epoch, index): same view
    ds.set_epoch(1)
    assert not torch.equal(item["image"], ds[(2, 96, 64)]["image"])
    assert ds.aspects.shape == (6,) and np.all(ds.aspects > 0)


def test_csv_without_header_and_absolute_paths(photos, tmp_path):
    (tmp_path / "l.csv").write_text("".join(f"{p},{k // 2}\n" for k, p in enumerate(photos)))
    paths, labels = read_label_csv(tmp_path / "l.csv")
    assert paths[0] == str(photos[0]) and labels == ["0", "0", "1", "1", "2", "2"]
    ds = LabeledImages.from_csv(tmp_path / "l.csv", augment=False, long_side=64)
    assert ds.num_classes == 3
    assert tuple(ds[0]["image"].shape)[0] == 3


def test_numeric_labels_are_numbered_numerically():
    y, names = number_labels(["10", "9", "100", "9"])
    assert names == ["9", "10", "100"] and list(y) == [1, 0, 2, 0]


def test_gldv2_train_csv_and_train_clean_csv(photos, tmp_path):
    root = tmp_path / "train"
    ids = [f"{k:x}{k:x}{k:x}0feed{k}" for k in range(1, 5)]
    for i, p in zip(ids, photos):
        dst = gldv2_image_path(root, i)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(p, dst)
    (tmp_path / "train.csv").write_text("id,url,landmark_id\n" + "".join(
        f"{i},http://example.invalid/{i}.jpg,{1000 + k // 2}\n" for k, i in enumerate(ids)))
    ds = LabeledImages.from_gldv2(tmp_path / "train.csv", root, long_side=64)
    assert len(ds) == 4 and ds.num_classes == 2 and ds.class_names == ["1000", "1001"]
    assert ds.paths[0].endswith(f"{ids[0][0]}/{ids[0][1]}/{ids[0][2]}/{ids[0]}.jpg")
    assert ds[(3, 64, 48)]["label"] == 1
    (tmp_path / "train_clean.csv").write_text(f"landmark_id,images\n7,{ids[0]} {ids[1]} {ids[2]}\n3,{ids[3]}\n")
    got_ids, got_labels = read_gldv2_csv(tmp_path / "train_clean.csv")
    assert got_ids == ids and got_labels == ["7", "7", "7", "3"]
    ds2 = LabeledImages.from_gldv2(tmp_path / "train_clean.csv", root)
    assert list(ds2.labels) == [1, 1, 1, 0]


def test_errors_name_the_file(photos, tmp_path):
    (tmp_path / "bad.csv").write_text("id,foo\n1,2\n")
    with pytest.raises(DatasetError, match="bad.csv"):
        read_gldv2_csv(tmp_path / "bad.csv")
    (tmp_path / "miss.csv").write_text("path,label\nnot_there.jpg,1\n")
    with pytest.raises(DatasetError, match="missing"):
        LabeledImages.from_csv(tmp_path / "miss.csv")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_label_csv(tmp_path / "nope.csv")
    (tmp_path / "short.csv").write_text(f"{photos[0]}\n")
    with pytest.raises(DatasetError, match="line 1"):
        read_label_csv(tmp_path / "short.csv")

"""GLDv2-format training sets (glimr/data/gldv2.py) on real photos: both CSV forms, nested and flat images,
errors that name the file and the line, missing images listed once and skipped, and the cleaned CSV."""
from __future__ import annotations

import csv
import os

import pytest

from glimr.data.gldv2 import GLDv2Error, filter_csv, image_path, load_gldv2, read_gldv2_rows

IDS = ["0a1b2c3d4e5f6071", "1b2c3d4e5f607182", "2c3d4e5f60718293", "3d4e5f6071829304", "4e5f607182930415"]


@pytest.fixture()
def images(tmp_path, shared_data):
    """Five real photos: the first three nested (a/b/c/<id>.jpg), the others flat (<id>.jpg)."""
    root = tmp_path / "train"
    photos = sorted((shared_data / "photos").glob("*.JPEG"))[:5]
    for k, (i, p) in enumerate(zip(IDS, photos)):
        dst = root / i[0] / i[1] / i[2] / f"{i}.jpg" if k < 3 else root / f"{i}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(p, dst)
    return root


def test_train_csv_and_train_clean_csv_nested_and_flat(images, tmp_path):
    (tmp_path / "train.csv").write_text("\ufeffid,url,landmark_id\n" + "".join(
        f"{i},http://example.invalid/{i}.jpg,{7 if k < 2 else 12}\n" for k, i in enumerate(IDS)) + "\n")
    ds = load_gldv2(tmp_path / "train.csv", images, progress=False)
    assert ds.form == "train" and ds.ids == IDS and ds.landmarks == ["7", "7", "12", "12", "12"]
    assert ds.lines == [2, 3, 4, 5, 6] and not ds.missing
    assert ds.paths[0] == images / "0" / "a" / "1" / f"{IDS[0]}.jpg" and ds.paths[4] == images / f"{IDS[4]}.jpg"
    assert ds.classes() == {"7": [0, 1], "12": [2, 3, 4]}
    (tmp_path / "clean.csv").write_text(f"landmark_id,images\n7,{IDS[0]}  {IDS[1]}\n12,{' '.join(IDS[2:])}\n")
    dc = load_gldv2(tmp_path / "clean.csv", images, progress=False)
    assert dc.form == "clean" and dc.ids == IDS and dc.landmarks == ds.landmarks and dc.lines == [2, 2, 3, 3, 3]
    assert image_path(images, "ffff000011112222") is None


def test_missing_images_are_listed_once_and_skipped(images, tmp_path):
    gone = ["aaaa000000000001", "bbbb000000000002"]
    (tmp_path / "train.csv").write_text("id,landmark_id\n" + "".join(f"{i},1\n" for i in IDS[:2] + gone)
                                        + f"{IDS[2]},2\n")
    said = []
    ds = load_gldv2(tmp_path / "train.csv", images, progress=False, warn=said.append)
    assert ds.ids == IDS[:3] and ds.missing == [(gone[0], "1", 4), (gone[1], "1", 5)]
    assert len(said) == 1                           # one message for all of them
    assert "2 of 5 images" in said[0] and "train.csv" in said[0] and f"{gone[0]} (line 4)" in said[0]
    (tmp_path / "none.csv").write_text("id,landmark_id\n" + "".join(f"{i},1\n" for i in gone))
    with pytest.raises(FileNotFoundError, match="none of the 2 images.*none.csv.*--images"):
        load_gldv2(tmp_path / "none.csv", images, progress=False)
    with pytest.raises(FileNotFoundError, match="image folder"):
        load_gldv2(tmp_path / "train.csv", tmp_path / "nope", progress=False)


@pytest.mark.parametrize("text, line, what", [
    ("id,foo\n1,2\n", 1, "not a GLDv2 header"),
    ("id,url,landmark_id\n0a1b2c3d4e5f6071,x,3\n1b2c3d4e5f607182\n", 3, "expected 3 columns"),
    ("id,landmark_id\n,3\n", 2, "empty image id"),
    ("id,landmark_id\n../../etc/passwd,3\n", 2, "image id .*has characters other than"),
    ("id,landmark_id\n0a1b2c3d4e5f6071,\n", 2, "empty landmark_id"),
    ("id,landmark_id\n0a1b2c3d4e5f6071,3\n\n0a1b2c3d4e5f6071,4\n", 4, "image 0a1b2c3d4e5f6071 is listed again \\(first on line 2\\)"),
    ("landmark_id,images\n3,0a1b2c3d4e5f6071\n4,   \n", 3, "landmark 4 lists no images"),
    ("landmark_id,images\n3 4,0a1b2c3d4e5f6071\n", 2, "landmark_id .* must be one token"),
])
def test_malformed_rows_name_the_file_and_line(tmp_path, text, line, what):
    f = tmp_path / "bad_train.csv"
    f.write_text(text)
    with pytest.raises(GLDv2Error, match=f"bad_train.csv' line {line}: {what}"):
        read_gldv2_rows(f)


def test_unreadable_files(tmp_path):
    (tmp_path / "empty.csv").write_text("\n\n")
    with pytest.raises(GLDv2Error, match="empty.csv.*empty"):
        read_gldv2_rows(tmp_path / "empty.csv")
    (tmp_path / "latin1.csv").write_bytes("id,landmark_id\n0a1b\xe9,3\n".encode("latin-1"))
    with pytest.raises(GLDv2Error, match="latin1.csv.*not UTF-8"):
        read_gldv2_rows(tmp_path / "latin1.csv")
    (tmp_path / "header_only.csv").write_text("id,url,landmark_id\n")
    with pytest.raises(GLDv2Error, match="lists no images"):
        read_gldv2_rows(tmp_path / "header_only.csv")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_gldv2_rows(tmp_path / "nope.csv")


def test_filter_csv_keeps_the_form_and_drops_whole_classes(tmp_path):
    src = tmp_path / "train.csv"
    src.write_text("id,url,landmark_id\n" + "".join(f"{i},u{k},{k % 3}\n" for k, i in enumerate(IDS)))
    c = filter_csv(src, tmp_path / "out.csv", {"1"})
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["id", "url", "landmark_id"]] + [[i, f"u{k}", str(k % 3)] for k, i in enumerate(IDS) if k % 3 != 1]
    assert c == {"images_before": 5, "images_after": 3, "classes_before": 3, "classes_after": 2,
                 "removed": {"1": 2}}
    clean = tmp_path / "clean.csv"
    clean.write_text(f"landmark_id,images\n7,{IDS[0]} {IDS[1]}\n12,{IDS[2]}\n")
    c = filter_csv(clean, tmp_path / "clean_out.csv", {"7"})
    assert (tmp_path / "clean_out.csv").read_text() == f"landmark_id,images\n12,{IDS[2]}\n"
    assert c["removed"] == {"7": 2} and c["images_after"] == 1


def test_glimr_train_reads_gldv2_through_the_loader(images, tmp_path, capsys):
    """`glimr train` (data.kind: gldv2) builds its dataset with LabeledImages.from_gldv2: flat images are found,
    missing ones skipped with one warning."""
    from glimr.data.datasets import LabeledImages

    (tmp_path / "train.csv").write_text("id,landmark_id\n" + "".join(f"{i},{k // 2}\n" for k, i in enumerate(IDS))
                                        + "ffff000011112222,9\n")
    ds = LabeledImages.from_gldv2(tmp_path / "train.csv", images, long_side=64)
    assert len(ds) == 5 and ds.num_classes == 3 and ds.paths[4].endswith(f"train/{IDS[4]}.jpg")
    assert ds[(4, 64, 48)]["label"] == 2
    err = capsys.readouterr().err
    assert err.count("ffff000011112222 (line 7)") == 1 and "skipped" in err

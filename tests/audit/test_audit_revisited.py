"""`glimr audit` against roxford5k: the official ground truth (restricted unpickler) with the 10 real Oxford
sample images (10 of the 70 queries, cropped to their boxes as the protocol uses them); the missing images are
reported once, clearly, and the found ones audited."""
from __future__ import annotations

import json
import random

import pytest
from PIL import Image

from glimr.audit.overlap import load_eval_set


def test_roxford5k_with_the_sample_images(shared_data):
    ev = load_eval_set("roxford5k", shared_data / "revisited")
    assert ev.name == "roxford5k" and len(ev.images) == 10
    assert all(e.name.startswith("query/") and e.box is not None for e in ev.images)  # the samples are queries
    assert {e.path.name for e in ev.images} == {p.name for p in (shared_data / "revisited" / "oxford-sample").iterdir()}
    assert len(ev.notes) == 1
    note = ev.notes[0]
    assert "60 of 70 query images and 4993 of 4993 database images" in note and "the 10 found are audited" in note
    assert "revisitop" in note and "roxford5k/jpg" in note


def test_roxford5k_without_images_or_ground_truth_says_what_to_do(tmp_path, shared_data):
    (tmp_path / "gnd_roxford5k.pkl").write_bytes((shared_data / "revisited" / "gnd_roxford5k.pkl").read_bytes())
    with pytest.raises(FileNotFoundError, match="70 of 70 query images and 4993 of 4993.*Download the images"):
        load_eval_set("roxford5k", tmp_path)
    with pytest.raises(FileNotFoundError, match="gnd_rparis6k.pkl"):
        load_eval_set("rparis6k", tmp_path)
    with pytest.raises(FileNotFoundError, match="neither roxford5k / rparis6k nor an existing folder"):
        load_eval_set(str(tmp_path / "nope"), None)


def test_audit_flags_the_oxford_landmark_planted_in_a_training_set(shared_data, tmp_path, audit_fn, capsys):
    """Training set: one class of two augmented views of an Oxford sample photo (Pitt Rivers), 8 real photos as
    other classes; EVAL roxford5k: the Pitt Rivers class is flagged (its other sample photos are different views
    of the same building), the photo classes are not."""
    sample = shared_data / "revisited" / "oxford-sample"
    root = tmp_path / "train"
    rng = random.Random(0)
    rows = []
    srcs = [(sample / "pitt_rivers_000033.jpg", "777")] * 2 + \
        [(p, str(100 + k)) for k, p in enumerate(sorted((shared_data / "photos").glob("*.JPEG"))[600:608])]
    for k, (src, lm) in enumerate(srcs):
        img = Image.open(src).convert("RGB")
        w, h = img.size
        x0, y0 = rng.randint(0, w // 8), rng.randint(0, h // 8)
        img = img.crop((x0, y0, w - rng.randint(0, w // 8), h - rng.randint(0, h // 8))).rotate(rng.uniform(-8, 8))
        img.thumbnail((512, 512))
        gid = f"{k:03x}abcdef0123456"
        (root / gid[0] / gid[1] / gid[2]).mkdir(parents=True, exist_ok=True)
        img.save(root / gid[0] / gid[1] / gid[2] / f"{gid}.jpg", quality=90)
        rows.append(f"{gid},{lm}")
    (tmp_path / "train.csv").write_text("id,landmark_id\n" + "\n".join(rows) + "\n")
    audit_fn(str(tmp_path / "train.csv"), str(root), ["roxford5k"], tmp_path / "audit",
             root=shared_data / "revisited")
    err = capsys.readouterr().err
    assert err.count("60 of 70 query images and 4993 of 4993 database images") == 1      # said once
    flagged = json.loads((tmp_path / "audit" / "flagged.json").read_text())["classes"]
    assert [c["landmark_id"] for c in flagged] == ["777"]
    c = flagged[0]
    assert {p["eval_image"] for p in c["best_pairs"]} >= {"query/pitt_rivers_000033"}
    assert c["eval_images"] >= 2, c     # the photo itself and at least one other view of the building

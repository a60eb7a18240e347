"""`glimr whiten` (glimr/train/whiten.py): fits on real training images, refuses benchmarks, writes checkpoints."""
from __future__ import annotations

import json

import numpy as np
import pytest

from glimr.extract.multiscale import extract
from glimr.models.checkpoint import save_model
from glimr.models.registry import build_model
from glimr.models.whiten import fit_pca_whitening
from glimr.train.whiten import group_pairs, view_pairs
from glimr.train.whiten import main as whiten_main

SIZE = 128  # the longest side whiten_plain_descs (tests/conftest.py) were extracted at


@pytest.fixture(scope="module")
def head_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "gem.safetensors"
    save_model(build_model("gem-lite0"), out, prefixes=["head."])
    return out


def test_cli_refuses_ukbench(head_ckpt, shared_data, whiten_photos, tmp_path, capsys):
    uk = tmp_path / "UKBench"
    uk.mkdir()
    (uk / "a.jpg").symlink_to(whiten_photos[0])
    for folder in (uk, shared_data / "ukbench"):
        assert whiten_main(["whiten", str(head_ckpt), "--out", str(tmp_path / "o.safetensors"),
                            "--images", str(folder), "--quiet"]) == 2
        assert "ukbench" in capsys.readouterr().err.lower()
    # an evaluation-set folder (gnd.json) and a symlink into UKBench are refused too
    ev = tmp_path / "evalset"
    (ev / "db").mkdir(parents=True)
    (ev / "gnd.json").write_text("{}")
    assert whiten_main(["whiten", str(head_ckpt), "--out", str(tmp_path / "o.safetensors"),
                        "--images", str(ev / "db"), "--quiet"]) == 2
    assert "gnd.json" in capsys.readouterr().err
    sneaky = tmp_path / "train"
    sneaky.mkdir()
    (sneaky / "x.jpg").symlink_to(shared_data / "ukbench" / "ukbench00000.jpg")
    assert whiten_main(["whiten", str(head_ckpt), "--out", str(tmp_path / "o.safetensors"),
                        "--images", str(sneaky), "--quiet"]) == 2
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_writes_a_loadable_checkpoint_from_images(head_ckpt, whiten_photos, whiten_plain_descs, tmp_path,
                                                      capsys):
    train = tmp_path / "train"
    train.mkdir()
    for p in whiten_photos:
        (train / p.name).symlink_to(p)
    out = tmp_path / "gem-w.safetensors"
    from glimr.cli import main as glimr_main  # registered in the one entry point

    assert glimr_main(["whiten", str(head_ckpt), "--out", str(out), "--images", str(train), "--dim", "16",
                       "--max-size", str(SIZE), "--workers", "0", "--quiet", "--precision", "fp32",
                       "--query-scales", "1,0.7071,0.5"]) == 0
    printed = capsys.readouterr().out
    assert "20 descriptors" in printed and "1280 -> 16" in printed and str(out) in printed
    cfg = json.loads(out.with_suffix(".json").read_text())
    assert cfg["partial"]["prefixes"] == ["head.", "pcaw."]
    assert cfg["query_scales"] == [1.0, 0.7071, 0.5]
    assert cfg["max_size"] == SIZE          # fitted at this size: the model runs at it unless told otherwise
    assert cfg["pca_whiten"]["dim"] == 16 and cfg["pca_whiten"]["source"].startswith("images:")
    net = build_model(checkpoint=out)
    assert net.dim == 16 and net.config["query_scales"] == [1.0, 0.7071, 0.5] and net.config["max_size"] == SIZE
    # the same fit as from the descriptors directly
    ref = fit_pca_whitening(whiten_plain_descs, dim=16)
    assert np.allclose(net.pcaw.mean.numpy(), ref.mean.numpy(), atol=1e-5)
    assert np.allclose(net.pcaw.proj.numpy(), ref.proj.numpy(), atol=1e-3 * float(ref.proj.abs().max()))
    # re-whitening a whitened checkpoint starts from the plain descriptors again (not whitened twice)
    out2 = tmp_path / "gem-w2.safetensors"
    # (no --max-size: the model's own, SIZE)
    assert whiten_main(["whiten", str(out), "--out", str(out2), "--images", str(train), "--dim", "8",
                        "--workers", "0", "--quiet", "--limit", "12", "--precision", "fp32"]) == 0
    assert "replaced" in capsys.readouterr().out
    cfg2 = json.loads(out2.with_suffix(".json").read_text())
    assert cfg2["pca_whiten"]["in_dim"] == 1280 and cfg2["pca_whiten"]["dim"] == 8
    assert cfg2["max_size"] == SIZE and f"max_size {SIZE}," in cfg2["pca_whiten"]["source"]
    assert cfg2["partial"]["prefixes"] == ["head.", "pcaw."] and "12 images" in cfg2["pca_whiten"]["source"]
    assert build_model(checkpoint=out2).dim == 8


def test_cli_from_a_feature_cache(head_ckpt, whiten_photos, tmp_path, capsys):
    from PIL import Image

    from glimr.train.cache import build_image_cache

    pngs = []  # PNG copies: the image cache's size check trips on some JPEGs' reduced (draft) decoding
    for p in whiten_photos:
        with Image.open(p) as im:
            im = im.convert("RGB")
            im.thumbnail((160, 160))
            pngs.append(tmp_path / f"{p.stem}.png")
            im.save(pngs[-1])
    net = build_model("gem-lite0")
    cache = build_image_cache(tmp_path / "cache", net.backbone, pngs, max_size=SIZE, workers=0, progress=False,
                              precision="fp32")
    out = tmp_path / "c.safetensors"
    assert whiten_main(["whiten", str(head_ckpt), "--out", str(out), "--cache", str(cache.root), "--dim", "12",
                        "--quiet", "--precision", "fp32"]) == 0
    assert "from cache" in capsys.readouterr().out
    w = build_model(checkpoint=out)
    assert w.dim == 12 and w.config["pca_whiten"]["source"].startswith("cache:")




def test_view_and_group_pairs():
    assert view_pairs(3, 1).tolist() == [[0, 3], [1, 4], [2, 5]]
    assert sorted(map(tuple, view_pairs(2, 2).tolist())) == [(0, 2), (0, 4), (1, 3), (1, 5), (2, 4), (3, 5)]
    labels = np.array([0, 1, 0, 0, 2, 1])
    assert sorted(map(tuple, group_pairs(labels, 10).tolist())) == [(0, 2), (0, 3), (1, 5), (2, 3)]
    assert len(group_pairs(labels, 1)) == 2                     # at most one pair per label


def test_cli_learned_whitening_from_real_views_and_webcam_groups(whiten_photos, shared_data, tmp_path, capsys):
    """--method learned on real photos: generated views of 8 photos and two real webcams (3 photos each)."""
    train, groups = tmp_path / "train", tmp_path / "groups"
    train.mkdir()
    for p in whiten_photos[:8]:
        (train / p.name).symlink_to(p)
    cams = sorted(p for p in (shared_data / "train-real" / "webcam").iterdir() if p.is_dir())[:2]
    for cam in cams:
        (groups / cam.name).mkdir(parents=True)
        for f in sorted(cam.iterdir())[:3]:
            (groups / cam.name / f.name).symlink_to(f)
    out = tmp_path / "lw.safetensors"
    args = ["whiten", "gem-lite0", "--out", str(out), "--images", str(train), "--max-size", str(SIZE),
            "--workers", "0", "--quiet", "--precision", "fp32", "--method", "learned", "--dim", "16"]
    assert whiten_main(args + ["--views", "0"]) == 2                 # no pairs at all: refused, nothing written
    assert "matching pairs" in capsys.readouterr().err and not out.exists()
    assert whiten_main(args + ["--views", "1", "--groups", str(groups)]) == 0
    printed = capsys.readouterr().out
    # 8 images + 8 views + 6 webcam photos; 8 (image, view) pairs + 2 x 3 webcam pairs
    assert "22 descriptors and 14 matching pairs" in printed and "1280 -> 16" in printed
    cfg = json.loads(out.with_suffix(".json").read_text())
    assert cfg["name"] == "gem-lite0" and cfg["partial"]["prefixes"] == ["head.", "pcaw."]
    assert cfg["pca_whiten"]["method"] == "learned" and "14 pairs" in cfg["pca_whiten"]["source"]
    net = build_model(checkpoint=out)
    d = extract(net, whiten_photos[:3], max_size=SIZE, workers=0, progress=False, precision="fp32").descriptors
    assert d.shape == (3, 16) and np.allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)

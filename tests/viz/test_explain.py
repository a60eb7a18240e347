"""`glimr explain`: attention maps of every head drawn over a real photo."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from glimr.models.registry import build_model
from glimr.viz.cli import main
from glimr.viz.explain import attention_maps, explain, to_tensor, upsample

EXPECTED = {
    "glam": {"local_spatial", "global_spatial"},
    "cider": {"A", "masks[0]", "masks[1]"},
    "ugalr": {"G", "O"},
    "dplg": {"A"},
    "dolg": {"A"},
    "gem": {"local_norm"},
}


@pytest.fixture(scope="module")
def photo(shared_data):
    return shared_data / "photos" / "n01518878_ostrich.JPEG"


@pytest.fixture(scope="module")
def image(photo):
    from glimr.io.images import load_image

    return load_image(photo)


@pytest.mark.parametrize("head", sorted(EXPECTED))
def test_maps_of_every_head(head, image):
    torch.manual_seed(0)
    model = build_model(f"{head}-lite0", weights="pretrained")
    resized, x = to_tensor(image, 160)
    maps = attention_maps(model, x)
    assert set(maps) == EXPECTED[head]
    stride = 16 if head in ("ugalr", "dplg", "dolg") else 32
    for m in maps.values():
        assert m.shape == (-(-resized.height // stride), -(-resized.width // stride))
        assert torch.isfinite(m).all()


def test_render_one_panel_per_map(image, tmp_path):
    out, maps = explain(build_model("cider-lite0", weights="pretrained"), image, tmp_path / "c.png", size=128)
    png = Image.open(out)
    png.load()
    # image + A + 2 masks side by side: four panels in one row
    assert png.format == "PNG" and png.width > 2 * png.height and len(maps) == 3


def test_maps_are_upsampled_and_normalised(image):
    resized, x = to_tensor(image, 128)
    assert max(resized.size) == 128 and x.shape == (1, 3, resized.height, resized.width)
    assert 0.0 <= x.min() and x.max() <= 1.0
    maps = attention_maps(build_model("cider-lite0", weights="pretrained"), x)
    a = upsample(maps["A"], (resized.height, resized.width))
    assert a.shape == (resized.height, resized.width) and a.min() == 0.0 and a.max() == pytest.approx(1.0)
    m = upsample(maps["masks[0]"], (resized.height, resized.width), absolute=True)
    assert m.min() >= 0.0 and m.max() <= 1.0                     # masks keep their absolute scale


def test_cli_writes_png(photo, tmp_path, capsys):
    out = tmp_path / "sub" / "glam.png"
    assert main(["explain", str(photo), "--model", "glam-lite0", "--out", str(out), "--size", "128"]) == 0
    assert out.is_file() and Image.open(out).format == "PNG"
    assert "local_spatial" in capsys.readouterr().out


def test_cli_errors_name_the_problem(tmp_path, capsys):
    missing = tmp_path / "nope.jpg"
    assert main(["explain", str(missing), "--out", str(tmp_path / "x.png")]) == 2
    assert str(missing) in capsys.readouterr().err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert main(["explain", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert "bad.jpg" in capsys.readouterr().err
    img = tmp_path / "ok.png"
    Image.new("RGB", (64, 48), "white").save(img)
    assert main(["explain", str(img), "--model", "nohead-lite0", "--out", str(tmp_path / "x.png")]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        main(["explain", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "example:" in text and "glimr explain photo.jpg --model glam-lite0 --out glam.png" in text

"""A folder of real photos plus every kind of bad input an index build meets in the wild."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# name -> words the build's error message for it must contain
BAD_FILES = {
    "truncated.jpg": "corrupt or truncated",
    "corrupt.png": "corrupt or truncated",
    "empty.jpg": "empty (0 bytes)",
    "readme.jpg": "not a supported image",
    "dangling.jpg": "broken symbolic link",
    "fifo.jpg": "not a regular file",
}
NON_UTF8 = os.fsdecode(b"caf\xe9-latin1.jpg")     # a Latin-1 file name: not valid UTF-8
NON_UTF8_STORED = "caf\\xe9-latin1.jpg"          # how the index stores and prints it


def copy_ukb(shared_data: Path, dst: Path, idx) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for i in idx:
        shutil.copy(shared_data / "ukbench" / f"ukbench{i:05d}.jpg", dst / f"ukbench{i:05d}.jpg")
    return dst


def make_bad_corpus(shared_data: Path, root: Path) -> dict[str, str]:
    """Write the corpus under ``root``; returns {relative path: kind} of the files that must be indexed."""
    copy_ukb(shared_data, root, range(4))
    src = shared_data / "ukbench" / "ukbench00010.jpg"
    photo = Image.open(src).convert("RGB").resize((160, 120))
    good = {f"ukbench{i:05d}.jpg": "jpeg" for i in range(4)}
    # the image kinds glimr.io.images converts (tests/io/test_images.py), each a real photo
    photo.convert("L").save(root / "gray.png")
    photo.convert("P").save(root / "palette.gif")
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    rgba.save(root / "alpha.png")
    photo.convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257).save(root / "deep16.png")
    photo.save(root / "photo.tiff")
    photo.save(root / "photo.webp")
    photo.save(root / "photo.bmp")
    photo.save(root / "photo.ppm")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    photo.save(root / "rotated.jpg", exif=exif)
    good.update({k: "kind" for k in ("gray.png", "palette.gif", "alpha.png", "cmyk.jpg", "deep16.png",
                                     "photo.tiff", "photo.webp", "photo.bmp", "photo.ppm", "rotated.jpg")})
    # a name that is not valid UTF-8: indexed, stored with its bad byte escaped
    Path(root / NON_UTF8).write_bytes(src.read_bytes())
    good[NON_UTF8_STORED] = "non-utf8"
    # a folder named like an image holds a real image
    (root / "x.jpg").mkdir()
    shutil.copy(shared_data / "ukbench" / "ukbench00020.jpg", root / "x.jpg" / "inner.jpg")
    good["x.jpg/inner.jpg"] = "in a folder named x.jpg"
    # the bad ones
    data = src.read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 3])
    buf = root / "corrupt.png"
    photo.save(buf)
    raw = bytearray(buf.read_bytes())
    raw[200:400] = bytes(200)  # zeros inside the compressed pixel data
    buf.write_bytes(bytes(raw[: len(raw) - 300]))
    (root / "empty.jpg").write_bytes(b"")
    (root / "readme.jpg").write_text("this is not a photo\n")
    (root / "dangling.jpg").symlink_to(root / "no-such-target.jpg")
    os.mkfifo(root / "fifo.jpg")
    (root / "loop").symlink_to(root / "loop")  # a link loop: not scanned, reported
    return good


@pytest.fixture
def bad_corpus(shared_data, tmp_path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "corpus"
    root.mkdir()
    return root, make_bad_corpus(shared_data, root)

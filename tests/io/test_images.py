"""Tests for glimr.io.images, on real images from ../shared/data and inputs derived from them."""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from glimr.io.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageError,
    content_hash,
    list_images,
    load_image,
    load_image_bytes,
)


@pytest.fixture(scope="module")
def jpeg_path(shared_data: Path) -> Path:
    return shared_data / "ukbench" / "ukbench00000.jpg"  # 640x480 RGB JPEG


@pytest.fixture(scope="module")
def photo(jpeg_path: Path) -> Image.Image:
    """The real UKBench photo, decoded by PIL directly (the reference the loader is compared with)."""
    with Image.open(jpeg_path) as im:
        return im.convert("RGB")


@pytest.fixture(scope="module")
def small(photo: Image.Image) -> Image.Image:
    """A 160x120 version of the real photo, for the lossless-format tests."""
    return photo.resize((160, 120), Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PNG of 12000x12000 = 144 MP (mode "1", all black) that compresses to ~20 KB."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (12000, 12000)).save(path)
    assert path.stat().st_size < 100_000
    return path


def _arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.int16)


def _assert_rgb(im: Image.Image, size: tuple[int, int]) -> None:
    assert isinstance(im, Image.Image)
    assert im.mode == "RGB"
    assert im.size == size


def _assert_image_error(exc: pytest.ExceptionInfo[ImageError], path: str, *reason_words: str) -> None:
    err = exc.value
    assert isinstance(err, ValueError)
    assert err.path == path
    assert f"'{path}'" in str(err)
    assert str(err).startswith(f"cannot read image '{path}': {err.reason}. ")
    for word in reason_words:
        assert word in err.reason.lower(), (word, err.reason)


# ----------------------------------------------------------------------------------------- basics


def test_constants():
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"} == set(
        IMAGE_EXTENSIONS
    )
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)
    assert DEFAULT_MAX_PIXELS == 100_000_000


def test_load_real_jpeg_matches_pil(jpeg_path: Path, photo: Image.Image):
    im = load_image(jpeg_path)
    _assert_rgb(im, (640, 480))
    assert np.array_equal(np.asarray(im), np.asarray(photo))
    im2 = load_image(str(jpeg_path))  # str paths too
    assert np.array_equal(np.asarray(im2), np.asarray(photo))


def test_load_imagenet_photos(shared_data: Path):
    paths = sorted((shared_data / "photos").glob("*.JPEG"))[:5]
    assert len(paths) == 5
    for p in paths:
        im = load_image(p)
        assert im.mode == "RGB"
        with Image.open(p) as ref:
            assert im.size == ref.size


def test_load_image_bytes_matches_file(jpeg_path: Path, photo: Image.Image):
    data = jpeg_path.read_bytes()
    for blob in (data, bytearray(data), memoryview(data)):
        im = load_image_bytes(blob)
        _assert_rgb(im, (640, 480))
        assert np.array_equal(np.asarray(im), np.asarray(photo))


def test_image_error_is_picklable():
    err = ImageError("/x/y.jpg", "the file is empty (0 bytes)", "re-download or remove the file")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, ImageError)
    assert (back.path, back.reason, back.hint) == (err.path, err.reason, err.hint)
    assert str(back) == str(err) == (
        "cannot read image '/x/y.jpg': the file is empty (0 bytes). re-download or remove the file"
    )


def test_bad_arguments(jpeg_path: Path):
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(jpeg_path, max_pixels=0)
    with pytest.raises(ValueError, match="target_size"):
        load_image(jpeg_path, target_size=0)
    with pytest.raises(TypeError):
        load_image_bytes("not bytes")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- bad input


def test_missing_path(tmp_path: Path):
    p = str(tmp_path / "nope.jpg")
    with pytest.raises(ImageError) as exc:
        load_image(p)
    _assert_image_error(exc, p, "not found")


def test_directory(tmp_path: Path):
    d = tmp_path / "folder.jpg"
    d.mkdir()
    with pytest.raises(ImageError) as exc:
        load_image(d)
    _assert_image_error(exc, str(d), "directory")


def test_empty_file(tmp_path: Path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageError) as exc:
        load_image(p)
    _assert_image_error(exc, str(p), "empty")
    assert "re-download or remove the file" in str(exc.value)


def test_empty_bytes():
    with pytest.raises(ImageError) as exc:
        load_image_bytes(b"")
    _assert_image_error(exc, "<upload>", "0 bytes")


def test_text_file_named_jpg(tmp_path: Path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not an image\n" * 20)
    with pytest.raises(ImageError) as exc:
        load_image(p)
    _assert_image_error(exc, str(p), "not a supported image")
    assert "re-download or remove the file" in str(exc.value)


def test_text_bytes_named_upload():
    with pytest.raises(ImageError) as exc:
        load_image_bytes(b"GET / HTTP/1.1\r\n\r\n", name="query.jpg")
    _assert_image_error(exc, "query.jpg", "not a supported image")


def test_unsupported_format_refused(tmp_path: Path, small: Image.Image):
    # A real image in a format outside IMAGE_EXTENSIONS (ICO) is refused, even named .png.
    p = tmp_path / "icon.png"
    small.save(p, format="ICO")
    with pytest.raises(ImageError) as exc:
        load_image(p)
    _assert_image_error(exc, str(p), "not a supported image")


def test_truncated_jpeg(tmp_path: Path, jpeg_path: Path):
    data = jpeg_path.read_bytes()
    p = tmp_path / "half.jpg"
    p.write_bytes(data[: len(data) // 2])
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(ImageError) as exc:
        load_image(p)
    _assert_image_error(exc, str(p), "truncated")
    assert "re-download or remove the file" in str(exc.value)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # never switched on globally
    with pytest.raises(ImageError) as exc:
        load_image_bytes(data[: len(data) // 2], name="half-upload.jpg")
    _assert_image_error(exc, "half-upload.jpg", "truncated")


def test_truncated_png(tmp_path: Path, small: Image.Image):
    buf = io.BytesIO()
    small.save(buf, format="PNG")
    p = tmp_path / "cut.png"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    with pytest.raises(ImageError) as exc:
        load_image(p)
    _assert_image_error(exc, str(p), "truncated")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns above 89 MP
def test_too_many_pixels_checked_before_decoding(bomb_png: Path, monkeypatch: pytest.MonkeyPatch):
    def no_decoding(self, *args, **kwargs):
        raise AssertionError("decoded an image that exceeds max_pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError) as exc:
        load_image(bomb_png, max_pixels=1_000_000)
    _assert_image_error(exc, str(bomb_png), "12000x12000", "max_pixels")
    assert "raise max_pixels / --max-pixels if the image is trusted" in str(exc.value)
    with pytest.raises(ImageError) as exc:
        load_image_bytes(bomb_png.read_bytes(), name="bomb-upload.png", max_pixels=1_000_000)
    _assert_image_error(exc, "bomb-upload.png", "12000x12000")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_too_many_pixels_default_cap(bomb_png: Path):
    with pytest.raises(ImageError) as exc:
        load_image(bomb_png)
    _assert_image_error(exc, str(bomb_png), "exceeds max_pixels")


def test_pil_decompression_bomb_error_becomes_image_error(bomb_png: Path, monkeypatch: pytest.MonkeyPatch):
    # PIL's own check fires first (144 MP > 2 * 1 MP) inside Image.open: still an ImageError.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    with pytest.raises(ImageError) as exc:
        load_image(bomb_png, max_pixels=1_500_000)
    _assert_image_error(exc, str(bomb_png), "too many pixels")
    assert "--max-pixels" in str(exc.value)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_max_pixels_overrides_lower_pil_limit(jpeg_path: Path, monkeypatch: pytest.MonkeyPatch):
    # A caller that trusts larger images than PIL's process-wide limit gets them, and the limit is restored.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    im = load_image(jpeg_path, max_pixels=1_000_000)
    _assert_rgb(im, (640, 480))
    assert Image.MAX_IMAGE_PIXELS == 10_000
    with pytest.raises(ImageError) as exc:
        load_image(jpeg_path, max_pixels=300_000)  # 307,200 pixels
    _assert_image_error(exc, str(jpeg_path), "640x480", "exceeds max_pixels")
    assert Image.MAX_IMAGE_PIXELS == 10_000


# ----------------------------------------------------------------------------------------- orientation


def test_exif_orientation_applied(tmp_path: Path, photo: Image.Image):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    p = tmp_path / "rotated.jpg"
    photo.save(p, quality=95, exif=exif)
    im = load_image(p)
    _assert_rgb(im, (480, 640))  # width and height swapped
    expected = photo.transpose(Image.Transpose.ROTATE_270)
    diff = np.abs(_arr(im) - _arr(expected))
    assert diff.mean() < 3.0
    # and it is really the rotation that matches, not the stored orientation
    wrong = photo.transpose(Image.Transpose.ROTATE_90)
    assert np.abs(_arr(im) - _arr(wrong)).mean() > 10 * diff.mean()


# ----------------------------------------------------------------------------------------- modes


def test_grayscale(tmp_path: Path, small: Image.Image):
    gray = small.convert("L")
    p = tmp_path / "gray.png"
    gray.save(p)
    im = load_image(p)
    _assert_rgb(im, gray.size)
    a = np.asarray(im)
    assert np.array_equal(a[..., 0], np.asarray(gray))
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])


def test_bilevel(tmp_path: Path, small: Image.Image):
    bw = small.convert("1")
    p = tmp_path / "bw.png"
    bw.save(p)
    a = np.asarray(load_image(p))
    assert set(np.unique(a)) <= {0, 255}
    assert np.array_equal(a[..., 0] == 255, np.asarray(bw))


def test_palette(tmp_path: Path, small: Image.Image):
    pal = small.quantize(colors=64)
    assert pal.mode == "P"
    p = tmp_path / "pal.png"
    pal.save(p)
    im = load_image(p)
    _assert_rgb(im, small.size)
    assert np.array_equal(np.asarray(im), np.asarray(pal.convert("RGB")))


def test_palette_with_transparency(tmp_path: Path, small: Image.Image):
    pal = small.quantize(colors=200)
    pal.putpalette(pal.getpalette()[: 200 * 3] + [0, 0, 0] * 56)  # 256 entries; 200..255 unused
    pal.paste(255, (0, 0, 40, 30))  # paint with index 255 (black) and make it transparent
    p = tmp_path / "pal_t.png"
    pal.save(p, transparency=255)
    with Image.open(p) as check:
        assert check.mode == "P" and check.info.get("transparency") is not None
    a = np.asarray(load_image(p))
    assert (a[:30, :40] == 255).all()  # transparent -> white
    assert np.array_equal(a[30:, 40:], np.asarray(pal.convert("RGB"))[30:, 40:])


def test_gif_palette_transparency_first_frame(tmp_path: Path, small: Image.Image, photo: Image.Image):
    first = small.quantize(colors=128)
    first.paste(200, (0, 0, 16, 16))  # unused index 200: transparent
    second = photo.crop((300, 200, 460, 320)).quantize(colors=128)
    p = tmp_path / "anim.gif"
    first.save(p, save_all=True, append_images=[second], transparency=200, duration=100, disposal=1)
    with Image.open(p) as check:
        assert check.n_frames == 2
    a = _arr(load_image(p))
    assert (a[:16, :16] == 255).all()
    ref = _arr(first.convert("RGB"))
    assert np.abs(a[16:] - ref[16:]).mean() < 1.0  # the first frame ...
    assert np.abs(a[16:] - _arr(second.convert("RGB"))[16:]).mean() > 20  # ... not the second


def test_multipage_tiff_first_page(tmp_path: Path, small: Image.Image, photo: Image.Image):
    second = photo.crop((0, 0, 160, 120))
    p = tmp_path / "pages.tiff"
    small.save(p, save_all=True, append_images=[second])
    assert np.array_equal(np.asarray(load_image(p)), np.asarray(small))


def test_cmyk_jpeg(tmp_path: Path, photo: Image.Image):
    p = tmp_path / "cmyk.jpg"
    photo.convert("CMYK").save(p, quality=95)
    with Image.open(p) as check:
        assert check.mode == "CMYK"
    im = load_image(p)
    _assert_rgb(im, photo.size)
    assert np.abs(_arr(im) - _arr(photo)).mean() < 4.0


def test_rgba_alpha_on_white(tmp_path: Path, small: Image.Image):
    rgba = small.convert("RGBA")
    alpha = np.full((120, 160), 255, np.uint8)
    alpha[:, :40] = 0  # fully transparent band
    alpha[:, 40:80] = 128  # half transparent band
    rgba.putalpha(Image.fromarray(alpha))
    p = tmp_path / "rgba.png"
    rgba.save(p)
    a = _arr(load_image(p))
    src = np.asarray(small, dtype=np.float64)
    assert (a[:, :40] == 255).all()
    assert np.array_equal(a[:, 80:], src[:, 80:])
    expected = (src[:, 40:80] * 128 + 255 * 127) / 255
    assert np.abs(a[:, 40:80] - expected).max() <= 1.5


def test_la_alpha_on_white(tmp_path: Path, small: Image.Image):
    la = small.convert("LA")
    alpha = np.full((120, 160), 255, np.uint8)
    alpha[60:, :] = 0
    la.putalpha(Image.fromarray(alpha))
    p = tmp_path / "la.png"
    la.save(p)
    with Image.open(p) as check:
        assert check.mode == "LA"
    a = np.asarray(load_image(p))
    assert (a[60:] == 255).all()
    gray = np.asarray(small.convert("L"))
    for c in range(3):
        assert np.array_equal(a[:60, :, c], gray[:60])


def test_16bit_png_scaled_not_clipped(tmp_path: Path, small: Image.Image):
    gray8 = np.asarray(small.convert("L")).astype(np.uint16)
    data = gray8 * 257  # the real image at 16 bits: v8 -> v8 * 257 (0 -> 0, 255 -> 65535)
    data[0, :4] = [0, 32768, 65535, 65280]
    p = tmp_path / "deep.png"
    Image.fromarray(data).save(p)
    with Image.open(p) as check:
        assert check.mode.startswith("I")
    a = np.asarray(load_image(p))
    assert list(a[0, :4, 0]) == [0, 128, 255, 254]
    assert np.array_equal(a[1:, :, 0], gray8[1:].astype(np.uint8))
    assert np.array_equal(a[..., 0], a[..., 2])


def test_16bit_pgm_in_mode_i(tmp_path: Path, small: Image.Image):
    gray8 = np.asarray(small.convert("L")).astype(np.uint16)
    data = gray8 * 257
    data[0, :3] = [0, 32768, 65535]
    p = tmp_path / "deep.pgm"
    Image.fromarray(data).save(p)
    with Image.open(p) as check:
        assert check.mode in ("I", "I;16", "I;16B")
    a = np.asarray(load_image(p))
    assert list(a[0, :3, 0]) == [0, 128, 255]
    assert np.array_equal(a[1:, :, 0], gray8[1:].astype(np.uint8))


def test_32bit_int_tiff_stretched(tmp_path: Path, small: Image.Image):
    gray8 = np.asarray(small.convert("L")).astype(np.int32)
    data = gray8 * 1_000_000  # beyond 16 bits: stretched from [min, max]
    p = tmp_path / "i32.tiff"
    Image.fromarray(data).save(p)
    with Image.open(p) as check:
        assert check.mode == "I"
    a = np.asarray(load_image(p))[..., 0].astype(np.float64)
    lo, hi = gray8.min(), gray8.max()
    expected = (gray8 - lo) * 255.0 / (hi - lo)
    assert np.abs(a - expected).max() <= 0.5 + 1e-9
    assert a.max() == 255 and a.min() == 0  # not clipped, not black


def test_float_tiff(tmp_path: Path, small: Image.Image):
    gray = np.asarray(small.convert("L")).astype(np.float32) / 255.0  # [0, 1]
    p = tmp_path / "f.tiff"
    Image.fromarray(gray, mode="F").save(p)
    a = np.asarray(load_image(p))[..., 0]
    assert np.array_equal(a, np.asarray(small.convert("L")))


# ----------------------------------------------------------------------------------------- draft


@pytest.mark.parametrize(
    ("target", "size"),
    [(100, (160, 120)), (200, (320, 240)), (320, (320, 240)), (321, (640, 480)), (2000, (640, 480))],
)
def test_jpeg_draft_target_size(jpeg_path: Path, photo: Image.Image, target: int, size: tuple[int, int]):
    im = load_image(jpeg_path, target_size=target)
    _assert_rgb(im, size)
    assert max(im.size) >= min(target, 640)
    if size != (640, 480):
        ref = photo.resize(size, Image.Resampling.BOX)
        assert np.abs(_arr(im) - _arr(ref)).mean() < 6.0


def test_draft_with_exif_rotation_and_bytes(tmp_path: Path, photo: Image.Image, jpeg_path: Path):
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "rotated.jpg"
    photo.save(p, quality=95, exif=exif)
    assert load_image(p, target_size=200).size == (240, 320)
    assert load_image_bytes(jpeg_path.read_bytes(), target_size=100).size == (160, 120)


def test_png_reduced_for_target_size(tmp_path: Path, photo: Image.Image):
    """A PNG loaded for a smaller view is box-reduced by the largest integer factor that keeps the longest side
    >= target_size (strip by strip: the same pixels as one reduce() of the whole image), alpha onto white and
    EXIF orientation applied as for a full decode."""
    p = tmp_path / "a.png"
    photo.save(p)  # 640x480
    assert load_image(p, target_size=2000).size == (640, 480)   # nothing to gain: full decode
    assert load_image(p, target_size=400).size == (640, 480)    # factor 1
    im = load_image(p, target_size=200)                          # factor 3
    _assert_rgb(im, (214, 160))
    np.testing.assert_array_equal(_arr(im), _arr(photo.reduce(3)))
    # RGBA: composited onto white like the full decode (strip by strip), then reduced
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    rgba.save(tmp_path / "b.png")
    full = load_image(tmp_path / "b.png")
    red = load_image(tmp_path / "b.png", target_size=200)
    assert red.size == (214, 160)
    assert np.abs(_arr(red) - _arr(full.reduce(3))).max() <= 1
    # with many strips (a tiny strip budget: 6 rows each) the result is the same, to the bit
    from glimr.io import images as mod

    saved = mod._STRIP_BYTES
    mod._STRIP_BYTES = 640 * 4 * 3 * 2
    try:
        np.testing.assert_array_equal(_arr(load_image(tmp_path / "b.png", target_size=200)), _arr(red))
    finally:
        mod._STRIP_BYTES = saved
    # EXIF rotation is applied to the reduced image
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(tmp_path / "c.png", exif=exif)
    np.testing.assert_array_equal(_arr(load_image(tmp_path / "c.png", target_size=200)),
                                  _arr(load_image(tmp_path / "c.png").reduce(3)))


# ----------------------------------------------------------------------------------------- listing


def test_list_images(tmp_path: Path, jpeg_path: Path):
    files = [
        "b.JPG",
        "a.jpg",
        "c.PnG",
        "d.txt",
        "noext",
        "e.jpg.txt",
        ".hidden.jpg",
        ".cache/x.jpg",
        "sub/e.jpeg",
        "sub/deeper/f.webp",
        "sub/g.TIFF",
        "sub/h.bmp",
        "sub/i.gif",
        "sub/j.tif",
        "sub/k.ppm",
        "sub/l.pgm",
        "sub/.secret/m.png",
    ]
    for rel in files:
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(jpeg_path, f)
    (tmp_path / "folder.jpg").mkdir()  # a folder with an image extension is not an image
    (tmp_path / "sub" / "loop").symlink_to(tmp_path, target_is_directory=True)  # no infinite walk
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "missing.jpg")  # listed, so that it is reported
    (tmp_path / "gone_folder").symlink_to(tmp_path / "missing", target_is_directory=True)

    unreadable: list = []
    found = list_images(tmp_path, unreadable=unreadable)
    rel = [p.relative_to(tmp_path).as_posix() for p in found]
    assert rel == [
        "a.jpg",
        "b.JPG",
        "c.PnG",
        "dangling.jpg",
        "sub/deeper/f.webp",
        "sub/e.jpeg",
        "sub/g.TIFF",
        "sub/h.bmp",
        "sub/i.gif",
        "sub/j.tif",
        "sub/k.ppm",
        "sub/l.pgm",
    ]
    assert found == sorted(found)
    assert all(isinstance(p, Path) and p.parent.exists() for p in found)
    assert unreadable == [(tmp_path / "gone_folder", "broken symbolic link")]
    assert [p.name for p in list_images(str(tmp_path), recursive=False)] == ["a.jpg", "b.JPG", "c.PnG", "dangling.jpg"]
    with pytest.raises(ImageError, match="dangling.jpg.*broken symbolic link"):
        load_image(tmp_path / "dangling.jpg")


def test_list_images_real_folder(shared_data: Path):
    found = list_images(shared_data / "ukbench", recursive=False)
    assert len(found) == 300
    assert found[0].name == "ukbench00000.jpg" and found[-1].name == "ukbench00299.jpg"


def test_list_images_bad_root(tmp_path: Path, jpeg_path: Path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        list_images(missing)
    with pytest.raises(NotADirectoryError, match=jpeg_path.name):
        list_images(jpeg_path)


# ----------------------------------------------------------------------------------------- hashing


def test_content_hash(tmp_path: Path, jpeg_path: Path):
    data = jpeg_path.read_bytes()
    assert content_hash(jpeg_path) == hashlib.sha1(data).hexdigest()
    assert content_hash(str(jpeg_path)) == hashlib.sha1(data).hexdigest()
    big = tmp_path / "big.bin"  # > 1 MiB: several chunks
    blob = data * (3 * (1 << 20) // len(data) + 1)
    big.write_bytes(blob)
    assert content_hash(big) == hashlib.sha1(blob).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert content_hash(empty) == hashlib.sha1(b"").hexdigest()
    copy = tmp_path / "copy.jpg"
    shutil.copyfile(jpeg_path, copy)
    assert content_hash(copy) == content_hash(jpeg_path)

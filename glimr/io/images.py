"""Image decoding: the only place in glimr that turns image files (or uploaded bytes) into pixels.

Everything that reads an image goes through :func:`load_image` / :func:`load_image_bytes`, which
always return a fully decoded ``PIL.Image.Image`` in mode ``"RGB"`` with the EXIF orientation applied,
or raise :class:`ImageError` (a ``ValueError``) whose message names the file, says what is wrong and
what to do about it.

Safety: the declared image size is checked against ``max_pixels`` right after the header is parsed and
before any pixel is decoded (decompression bombs), only the formats of :data:`IMAGE_EXTENSIONS` are
accepted (no EPS/Ghostscript etc. for uploads), and truncated files are errors: this module never sets
``ImageFile.LOAD_TRUNCATED_IMAGES``.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageError",
    "content_hash",
    "list_images",
    "load_image",
    "load_image_bytes",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
"""File name extensions (lower case, with the dot) that :func:`list_images` picks up."""

DEFAULT_MAX_PIXELS: int = 100_000_000
"""Default cap on width * height, against decompression bombs (a 100 MP photo is still accepted)."""

# PIL formats we decode, matching IMAGE_EXTENSIONS (PPM covers .pgm/.pbm; JPEG also yields MPO files).
# The format is detected from the content, not the extension; anything else is refused.
_PIL_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")

_HASH_CHUNK = 1 << 20  # 1 MiB

_HINT_CORRUPT = "re-download or remove the file"
_HINT_TOO_BIG = "raise max_pixels / --max-pixels if the image is trusted"

# Errors PIL raises on malformed input (UnidentifiedImageError is an OSError; struct.error, IndexError and
# EOFError come out of some plugins on garbage headers).
_PIL_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    struct.error,
)

# Guards the temporary change of PIL's process-wide Image.MAX_IMAGE_PIXELS (see _pil_pixel_limit).
_PIL_LIMIT_LOCK = threading.Lock()


class ImageError(ValueError):
    """The one error for any bad image input: missing, unreadable, corrupt, truncated, too large.

    ``str(err)`` is ``"cannot read image '<path>': <reason>. <hint>"``.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, hint: str = _HINT_CORRUPT) -> None:
        self.path = os.fspath(path) if not isinstance(path, str) else path
        self.reason = reason
        self.hint = hint
        super().__init__(f"cannot read image '{self.path}': {reason}. {hint}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the error picklable (it crosses DataLoader worker processes).
        return (type(self), (self.path, self.reason, self.hint))


# --------------------------------------------------------------------------------------------- loading


def load_image(
    path: str | os.PathLike[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    target_size: int | None = None,
) -> Image.Image:
    """Decode the image file at ``path`` into an RGB ``PIL.Image.Image``.

    Args:
        path: the image file (JPEG, PNG, BMP, GIF, TIFF, WebP, PPM/PGM; detected from the content).
        max_pixels: refuse images whose declared width * height exceeds this, before decoding.
        target_size: the longest side the caller will resize to, if known. JPEGs are then decoded at a
            reduced scale (1/2, 1/4 or 1/8, libjpeg's DCT scaling) whose longest side is still
            >= ``target_size``; other formats are decoded at full size (PIL has no reduced decoding for
            them) and at once box-reduced by the largest integer factor that keeps the longest side
            >= ``target_size``, strip by strip, so that no further full-size copy is made.

    Returns:
        A fully loaded image in mode ``"RGB"``: EXIF orientation applied, first frame of multi-frame
        files, alpha composited onto white, 16/32-bit and float data scaled to 8 bits.

    Raises:
        ImageError: missing path, directory, empty, not an image, corrupt or truncated, too large.
    """
    _check_args(max_pixels, target_size)
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except FileNotFoundError:
        if os.path.islink(name):
            raise ImageError(name, "broken symbolic link (its target is missing)", "fix or remove the link") from None
        raise ImageError(name, "file not found", "check the path") from None
    except PermissionError:
        raise ImageError(name, "permission denied", "check the file's permissions") from None
    except OSError as e:
        raise ImageError(name, f"cannot access the file ({e.strerror or e})", "check the path") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(
            name, "it is a directory, not an image file", "pass an image file (list_images() lists a folder)"
        )
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(name, "not a regular file", "pass an image file")
    if st.st_size == 0:
        raise ImageError(name, "the file is empty (0 bytes)", _HINT_CORRUPT)
    try:
        f = open(name, "rb")  # closed by the `with f` below
    except PermissionError:
        raise ImageError(name, "permission denied", "check the file's permissions") from None
    except OSError as e:
        raise ImageError(name, f"cannot open the file ({e.strerror or e})", "check the path") from None
    with f:
        return _decode(f, name, max_pixels, target_size)


def load_image_bytes(
    data: bytes | bytearray | memoryview,
    name: str = "<upload>",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    target_size: int | None = None,
) -> Image.Image:
    """Like :func:`load_image`, for an image held in memory (e.g. a REST upload).

    ``name`` is only used in error messages (the uploaded file name, if any).
    """
    _check_args(max_pixels, target_size)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"load_image_bytes expects bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageError(name, "no data (0 bytes)", "send the image file's content")
    return _decode(io.BytesIO(bytes(data)), name, max_pixels, target_size)


def _check_args(max_pixels: int, target_size: int | None) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if target_size is not None and (
        isinstance(target_size, bool) or not isinstance(target_size, int) or target_size <= 0
    ):
        raise ValueError(f"target_size must be a positive integer or None, got {target_size!r}")


def _decode(fp: IO[bytes], name: str, max_pixels: int, target_size: int | None) -> Image.Image:
    """Open, check the size, decode fully, orient and convert to RGB; every failure is an ImageError."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or max_pixels <= 2 * limit:
        # PIL's own bomb check (error above 2 * limit) cannot refuse an image that max_pixels allows.
        return _decode_unlocked(fp, name, max_pixels, target_size)
    # The caller trusts images larger than PIL's process-wide limit allows: raise PIL's limit to
    # max_pixels for this call only. Serialised, since Image.MAX_IMAGE_PIXELS is a module global.
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            return _decode_unlocked(fp, name, max_pixels, target_size)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _decode_unlocked(fp: IO[bytes], name: str, max_pixels: int, target_size: int | None) -> Image.Image:
    try:
        with Image.open(fp, formats=_PIL_FORMATS) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageError(
                    name,
                    f"{width}x{height} = {width * height:,} pixels exceeds max_pixels = {max_pixels:,}",
                    _HINT_TOO_BIG,
                )
            if target_size is not None and im.format in ("JPEG", "MPO"):
                _draft(im, target_size)
            im.load()  # full decode of the first frame: truncated or corrupt data raises here
            if target_size is not None and im.format not in ("JPEG", "MPO"):
                small = _reduced_rgb(im, target_size)
                if small is not None:
                    return _transpose(small, _orientation(im))
            im = _exif_transpose(im)
            return _to_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(name, f"too many pixels ({e})", _HINT_TOO_BIG) from None
    except UnidentifiedImageError:
        raise ImageError(
            name,
            "not a supported image (expected JPEG, PNG, BMP, GIF, TIFF, WebP or PPM/PGM data)",
            _HINT_CORRUPT,
        ) from None
    except _PIL_ERRORS as e:
        raise ImageError(name, f"corrupt or truncated image data ({e})", _HINT_CORRUPT) from None


def _draft(im: Image.Image, target_size: int) -> None:
    """Ask libjpeg to decode at 1/s scale, s in {8, 4, 2}, keeping the longest side >= target_size."""
    width, height = im.size
    longest = max(width, height)
    for s in (8, 4, 2):
        if (longest + s - 1) // s >= target_size:  # PIL's reduced size is ceil(side / s)
            # draft() picks the largest power of two <= min(w // size[0], h // size[1]); with
            # size = (w // s, h // s) that is exactly s (or less for extremely thin images).
            im.draft(None, (max(1, width // s), max(1, height // s)))
            return


_STRIP_BYTES = 8 << 20  # converted and reduced this many bytes of the decoded raster at a time


def _reduced_rgb(im: Image.Image, target_size: int) -> Image.Image | None:
    """The decoded image reduced by the largest integer factor f that keeps its longest side >= target_size
    (box average, PIL's ``reduce``), converted to RGB strip by strip: no full-resolution copy is ever made
    (no RGBA premultiplied copy, no RGB conversion, no rotation, no resize at full size). None when f < 2 or the
    conversion is not per-pixel (32-bit integer and float images are stretched by their global min/max).

    Formats other than JPEG have no reduced decoding in PIL/libpng, so the decoded raster itself (width x
    height x bands bytes, e.g. 144 MiB for a 48 MP RGB PNG) is the one full-size allocation; max_pixels bounds
    it."""
    w, h = im.size
    f = max(w, h) // target_size
    if f < 2 or im.mode in ("I", "F"):
        return None
    if im.mode in ("RGB", "L") and "transparency" not in im.info:  # reduce() makes no full-size copy of these
        return im.reduce(f).convert("RGB")
    bands = max(1, len(im.getbands()))
    rows = max(1, _STRIP_BYTES // max(1, w * bands * f)) * f  # a multiple of f: the blocks match one reduce()
    out = Image.new("RGB", (-(-w // f), -(-h // f)))
    for y in range(0, h, rows):
        strip = im.crop((0, y, w, min(h, y + rows)))  # keeps the palette and the "transparency" entry
        out.paste(_to_rgb(strip).reduce(f), (0, y // f))
    return out


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # noqa: BLE001 (malformed EXIF of any kind: keep the stored orientation)
        return 1


def _transpose(im: Image.Image, orientation: int) -> Image.Image:
    """The EXIF orientation applied to an already converted image (as ImageOps.exif_transpose would)."""
    method = _TRANSPOSE.get(orientation)
    return im.transpose(method) if method is not None else im


def _exif_transpose(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation. Unreadable EXIF is ignored: the pixels themselves are fine."""
    try:
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # malformed EXIF block: keep the stored orientation
        return im
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return im
    try:
        return ImageOps.exif_transpose(im)
    except (SyntaxError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return im


_WHITE = (255, 255, 255)


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_rgb(im)
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        "transparency" in im.info and mode in ("P", "L", "RGB")
    )
    if has_alpha:
        rgba = im.convert("RGBA")  # also applies a palette/colour-key "transparency" entry
        out = Image.new("RGB", im.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))  # alpha-composite onto white
        return out
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, ...


def _high_bit_depth_to_rgb(im: Image.Image) -> Image.Image:
    """Scale 16-bit ("I;16*"), 32-bit integer ("I") and float ("F") images to 8 bits without clipping.

    - "I;16*": the nominal range 0..65535 maps linearly onto 0..255 (v / 257, rounded): 65535 -> 255,
      32768 -> 128.
    - "I": 16-bit data is commonly stored in this mode (16-bit PGM, some TIFFs), so values within
      0..65535 are scaled as 16-bit; any other range is stretched linearly from [min, max] to 0..255.
    - "F": values within [0, 1] are scaled by 255, values within [0, 255] kept; any other range is
      stretched from [min, max]. NaN/inf become 0.
    """
    mode = im.mode
    if mode in ("I", "F", "I;16", "I;16L", "I;16B", "I;16N"):
        arr = np.asarray(im)
    else:  # rarer variants (I;16S, I;32...): let PIL widen them to 32-bit first
        arr = np.asarray(im.convert("I"))
        mode = "I"
    a = arr.astype(np.float64)
    if mode.startswith("I;16"):
        scaled = a / 257.0
    else:
        finite = np.isfinite(a)
        a = np.where(finite, a, 0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode == "I" and lo >= 0 and hi <= 65535:
            scaled = a / 257.0
        elif mode == "F" and lo >= 0 and hi <= 1.0:
            scaled = a * 255.0
        elif mode == "F" and lo >= 0 and hi <= 255.0:
            scaled = a
        elif hi > lo:
            scaled = (a - lo) * (255.0 / (hi - lo))
        else:
            scaled = np.zeros_like(a)
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


# --------------------------------------------------------------------------------------------- listing


def list_images(
    root: str | os.PathLike[str],
    recursive: bool = True,
    *,
    unreadable: list[tuple[Path, str]] | None = None,
) -> list[Path]:
    """All image files under ``root``, sorted.

    Picks regular files (symlinks to files included) whose extension, in any case, is in
    :data:`IMAGE_EXTENSIONS`; skips hidden files and folders (names starting with "."). With
    ``recursive``, sub-folders are walked too, following symlinked folders but never twice (no loops).
    Returned paths are ``root`` joined with the relative path (not resolved). Entries with an image
    extension that cannot be opened as files (broken symbolic links, FIFOs, devices) are listed too, so
    that :func:`load_image` reports them instead of their being silently left out.

    unreadable: if given, receives ``(path, reason)`` for every sub-folder that could not be read
    (permissions, I/O error) and every entry without an image extension that could not be examined (a
    broken link may be a folder that is gone for now): their contents are not listed.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is not a folder.
        PermissionError: ``root`` itself cannot be read.
    """
    root_path = Path(root)
    if not root_path.exists():
        raise FileNotFoundError(f"image folder not found: '{root_path}' (check the path)")
    if not root_path.is_dir():
        raise NotADirectoryError(
            f"not a folder: '{root_path}' (pass the folder that contains the images; "
            "to read a single image use load_image)"
        )
    try:
        with os.scandir(root_path):
            pass
    except OSError as e:
        raise PermissionError(
            f"cannot read the image folder '{root_path}' ({e.strerror or e}): check its permissions"
        ) from None
    sink = unreadable if unreadable is not None else []
    return sorted(_iter_images(root_path, recursive, sink))


def _iter_images(
    root: Path, recursive: bool = True, unreadable: list[tuple[Path, str]] | None = None
) -> Iterator[Path]:
    if unreadable is None:
        unreadable = []
    seen: set[tuple[int, int]] = set()
    st = os.stat(root)
    seen.add((st.st_dev, st.st_ino))
    stack = [os.fspath(root)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:  # an unreadable sub-folder is skipped (reported), like `find` does
            unreadable.append((Path(folder), f"cannot read folder ({e.strerror or e})"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            is_image = os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
            try:
                if entry.is_file():
                    if is_image:
                        yield Path(entry.path)
                elif entry.is_dir():
                    if not recursive:
                        continue
                    est = entry.stat()  # follows symlinks: identifies the real folder
                    key = (est.st_dev, est.st_ino)
                    if key not in seen:
                        seen.add(key)
                        stack.append(entry.path)
                elif is_image:  # broken link, FIFO, socket, device: reported by load_image
                    yield Path(entry.path)
                elif entry.is_symlink():
                    unreadable.append((Path(entry.path), "broken symbolic link"))
            except OSError as e:  # vanished, a link loop, an I/O error
                if is_image:
                    yield Path(entry.path)
                else:
                    unreadable.append((Path(entry.path), f"cannot examine it ({e.strerror or e})"))


# --------------------------------------------------------------------------------------------- hashing


def content_hash(path: str | os.PathLike[str]) -> str:
    """Hex SHA-1 of the file's bytes, read in 1 MiB chunks (the index uses it for incremental builds)."""
    h = hashlib.sha1(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()

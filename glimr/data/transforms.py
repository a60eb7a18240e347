"""Training-time image transforms on PIL images, driven by an explicit random generator.

Every function takes a ``numpy.random.Generator`` so that a view is a pure function of its seed: the
trainer seeds one generator per (seed, epoch, sample), which makes `--resume` reproduce the exact same
views whatever the number of DataLoader workers. GLAM's augmentation ("scaling, random cropping, and
varied illumination") is :func:`random_resized_crop` + :func:`illumination`; :func:`to_uint8_tensor`
gives the (3, H, W) uint8 tensor the models take (divided by 255 on the device).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageEnhance


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            area: tuple[float, float] = (0.35, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3),
                            tries: int = 10) -> tuple[int, int, int, int]:
    """A crop box (x0, y0, x1, y1) covering a random fraction `area` of the image with a random aspect-ratio
    change in `ratio` (log-uniform), as torchvision's RandomResizedCrop; falls back to the whole image."""
    total = width * height
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(tries):
        a = total * rng.uniform(*area)
        r = math.exp(rng.uniform(lo, hi)) * width / height      # relative to the image's own aspect ratio
        w = int(round(math.sqrt(a * r)))
        h = int(round(math.sqrt(a / r)))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            return x0, y0, x0 + w, y0 + h
    return 0, 0, width, height


def random_resized_crop(img: Image.Image, rng: np.random.Generator, area: tuple[float, float] = (0.35, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    return img.crop(random_resized_crop_box(img.width, img.height, rng, area, ratio))


def illumination(img: Image.Image, rng: np.random.Generator, strength: float = 0.3) -> Image.Image:
    """Varied illumination: brightness, contrast and saturation each scaled by a factor in
    [1 - strength, 1 + strength], in a random order."""
    if strength <= 0:
        return img
    ops = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    for k in rng.permutation(len(ops)):
        img = ops[int(k)](img).enhance(float(rng.uniform(1 - strength, 1 + strength)))
    return img


def maybe_hflip(img: Image.Image, rng: np.random.Generator, p: float = 0.5) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < p else img


def fit_crop(img: Image.Image, size: tuple[int, int], rng: np.random.Generator | None = None) -> Image.Image:
    """Resize `img` to cover `size` = (w, h) keeping its aspect ratio, then crop `size` out of it (at a random
    place with `rng`, else centred). Used to turn a background photo into a canvas of a group size."""
    w, h = size
    s = max(w / img.width, h / img.height)
    nw, nh = max(w, round(img.width * s)), max(h, round(img.height * s))
    img = img.resize((nw, nh), Image.BILINEAR)
    if rng is None:
        x0, y0 = (nw - w) // 2, (nh - h) // 2
    else:
        x0, y0 = int(rng.integers(0, nw - w + 1)), int(rng.integers(0, nh - h + 1))
    return img.crop((x0, y0, x0 + w, y0 + h))


def resize_to(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to exactly `size` = (w, h) (the group-size resize: the aspect ratio changes a little)."""
    return img if img.size == tuple(size) else img.resize(tuple(size), Image.BILINEAR)


def resize_longest(img: Image.Image, longest: int) -> Image.Image:
    s = longest / max(img.size)
    return img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BILINEAR)


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) uint8 tensor."""
    arr = np.array(img.convert("RGB"), dtype=np.uint8, copy=True)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def sample_rng(seed: int, epoch: int, index: int, salt: int = 0) -> np.random.Generator:
    """The generator of one sample's view: a pure function of (seed, epoch, index, salt)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index), int(salt)])


def perspective(img: Image.Image, rng: np.random.Generator, strength: float = 0.15) -> Image.Image:
    """A viewpoint change: a random projective warp that moves each corner by up to ``strength`` of the
    image's size (inwards or outwards), filled by edge replication so that no border line appears."""
    import cv2  # noqa: PLC0415

    if strength <= 0:
        return img
    w, h = img.size
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = src + rng.uniform(-strength, strength, size=(4, 2)).astype(np.float32) * np.float32([w, h])
    m = cv2.getPerspectiveTransform(src, dst)
    out = cv2.warpPerspective(np.asarray(img.convert("RGB")), m, (w, h), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE)
    return Image.fromarray(out)


def night(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Night-like darkening: a gamma > 1 darkening, a colour cast (warm street light or blue dusk) and
    sensor noise; as real night photos differ from day ones (real-dev's day/night pairs)."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    a = a ** rng.uniform(1.6, 3.0) * rng.uniform(0.5, 0.9)
    cast = np.array([1.15, 1.0, 0.75] if rng.random() < 0.5 else [0.8, 0.9, 1.2], np.float32)
    a = a * cast * rng.uniform(0.9, 1.1, size=3).astype(np.float32)
    a = a + rng.normal(0.0, rng.uniform(0.005, 0.03), size=a.shape).astype(np.float32)
    return Image.fromarray((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8))


def jpeg(img: Image.Image, rng: np.random.Generator, quality: tuple[int, int] = (30, 90)) -> Image.Image:
    import io  # noqa: PLC0415

    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=int(rng.integers(quality[0], quality[1] + 1)))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def occlude(img: Image.Image, rng: np.random.Generator, max_frac: float = 0.25) -> Image.Image:
    """An occluder: an irregular blob (an ellipse, soft-edged) of a flat random colour over up to
    ``max_frac`` of the image area; no rectangle edges to learn as a cue."""
    from PIL import ImageDraw, ImageFilter  # noqa: PLC0415

    w, h = img.size
    frac = rng.uniform(0.03, max_frac)
    rw, rh = math.sqrt(frac * w * h / math.pi) * rng.uniform(0.6, 1.6, size=2)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    mask = Image.new("L", img.size, 0)
    ImageDraw.Draw(mask).ellipse((cx - rw, cy - rh, cx + rw, cy + rh), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(max(1.0, 0.01 * max(w, h))))
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    return Image.composite(Image.new("RGB", img.size, colour), img.convert("RGB"), mask)


def real_view(img: Image.Image, rng: np.random.Generator, *, crop_area: tuple[float, float] = (0.3, 1.0),
              warp: float = 0.15, p_night: float = 0.25, p_blur: float = 0.3, p_jpeg: float = 0.5,
              p_occlude: float = 0.25, illum: float = 0.4) -> Image.Image:
    """A second view of a real photo made the way real views of one place or object differ: a viewpoint
    warp, a crop that may cut the object (scale change), a mirror, lighting and colour shifts, night-like
    darkening, blur, an occluder and JPEG loss. No pasting, so no rectangle edge is a cue. Each step is
    drawn from ``rng``, so a view is a pure function of its generator's seed."""
    from PIL import ImageFilter  # noqa: PLC0415

    img = perspective(img.convert("RGB"), rng, warp)
    img = random_resized_crop(img, rng, area=crop_area)
    img = maybe_hflip(img, rng)
    img = illumination(img, rng, illum)
    if rng.random() < p_night:
        img = night(img, rng)
    if rng.random() < p_occlude:
        img = occlude(img, rng)
    if rng.random() < p_blur:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    if rng.random() < p_jpeg:
        img = jpeg(img, rng)
    return img

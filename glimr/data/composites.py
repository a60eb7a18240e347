"""Instance composites: training data for instance retrieval from a folder of unlabelled photos.

Each photo is its own instance class. A training view of class i is a random crop of photo i (scaling,
random crop, aspect jitter, flip, illumination change), then either

- *clean* (probability `p_clean`): the crop alone, resized to the view's size, or
- *composite*: the crop pasted at a random scale (`paste_scale` = pasted width / canvas width) and a
  random place into another photo j != i (itself randomly cropped to the view's size), followed by a
  mild illumination change of the whole canvas: an object in clutter, with no label needed.

This mimics what instance retrieval must do on cluttered database images (the object is small, the rest
is another real scene) while the clean views play the part of the clean queries.

    ds = InstanceComposites("../shared/data/photos", long_side=384)
    ds[(17, 384, 288)]    # {"image": uint8 (3, 288, 384), "label": 17, "index": 17, "box": (4,) in [0, 1]}
    ds.set_epoch(3)       # new random views; a view is a pure function of (seed, epoch, index)

Item `index` is class `index % num_classes` (`views_per_class` items per class per epoch). Keys may be
an int (the view takes the group size of its photo's aspect ratio) or (index, w, h) from
:class:`glimr.data.samplers.GroupSizeBatchSampler`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from glimr.data import transforms as T
from glimr.data.samplers import group_size, split_key
from glimr.io.images import DEFAULT_MAX_PIXELS, ImageError, list_images, load_image


@dataclass
class ViewInfo:
    """How a view was made: `background` is the class of the background photo (None for a clean view),
    `box` the pasted object's (x0, y0, x1, y1) on the canvas (the whole canvas for a clean view)."""

    label: int
    background: int | None
    box: tuple[int, int, int, int]
    size: tuple[int, int]


def image_aspects(paths: Sequence[str | Path]) -> np.ndarray:
    """w / h of each image, from the header only (no pixel decoding)."""
    out = np.empty(len(paths))
    for k, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                w, h = im.size
        except OSError as e:
            raise ImageError(str(p), f"cannot read the header ({e})") from e
        out[k] = w / h
    return out


class InstanceComposites(Dataset):
    """See the module docstring. Arguments:

    photos:        a folder (searched recursively) or a list of image files; one class per photo.
    long_side:     longest side of a view when the key gives no size (group size of the photo's aspect).
    paste_scale:   (min, max) pasted width / canvas width for composites.
    p_clean:       probability that a view is the clean crop alone.
    crop_area:     (min, max) area fraction of the object photo kept by its random crop.
    crop_ratio:    (min, max) aspect-ratio change of that crop (log-uniform).
    bg_area:       (min, max) area fraction of the background photo kept before it is fitted to the canvas.
    illumination:  brightness/contrast/saturation factors in [1 - s, 1 + s] for the object; half of it for
                   the whole composite.
    hflip:         probability of a horizontal flip of the object crop (and, independently, the background).
    views_per_class: items per class and epoch.
    clean_first:   the first `clean_first` views of every class (items index < clean_first * num_classes) are
                   always clean; the others follow `p_clean` (a fixed cache then holds clean views of all
                   classes).
    seed:          the views are a pure function of (seed, epoch, index).
    """

    def __init__(self, photos: str | Path | Sequence[str | Path], long_side: int = 384,
                 paste_scale: tuple[float, float] = (0.25, 0.7), p_clean: float = 0.25,
                 crop_area: tuple[float, float] = (0.35, 1.0),
                 crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 bg_area: tuple[float, float] = (0.5, 1.0), illumination: float = 0.3, hflip: float = 0.5,
                 views_per_class: int = 1, clean_first: int = 0, seed: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        if isinstance(photos, (str, Path)):
            root = Path(photos)
            if not root.is_dir():
                raise FileNotFoundError(f"photo folder '{root}' not found: give a folder of photos "
                                        "(each photo becomes one instance class)")
            self.paths = [os.path.abspath(p) for p in list_images(root)]
        else:
            self.paths = [os.path.abspath(p) for p in photos]
        if len(self.paths) < 2:
            raise ValueError(f"instance composites need at least 2 photos (got {len(self.paths)}): every "
                             "composite pastes one photo into another")
        lo, hi = paste_scale
        if not (0 < lo <= hi <= 1):
            raise ValueError(f"paste_scale must satisfy 0 < min <= max <= 1, not {paste_scale}")
        if not (0 <= p_clean <= 1):
            raise ValueError(f"p_clean must be in [0, 1], not {p_clean}")
        self.long_side, self.p_clean = int(long_side), float(p_clean)
        self.paste_scale = (float(lo), float(hi))
        self.crop_area, self.crop_ratio, self.bg_area = tuple(crop_area), tuple(crop_ratio), tuple(bg_area)
        self.illumination, self.hflip = float(illumination), float(hflip)
        self.views_per_class, self.seed, self.max_pixels = int(views_per_class), int(seed), max_pixels
        self.clean_first = int(clean_first)
        self.num_classes = len(self.paths)
        self.class_aspects = image_aspects(self.paths)
        self.epoch = 0

    # the dataset protocol ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_classes * self.views_per_class

    @property
    def labels(self) -> np.ndarray:
        return np.arange(len(self)) % self.num_classes

    @property
    def aspects(self) -> np.ndarray:
        """Aspect ratio of every item (its photo's): what the group-size sampler groups by."""
        return self.class_aspects[self.labels]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def item_ids(self) -> list[str]:
        return [f"c{i % self.num_classes}_v{i // self.num_classes}" for i in range(len(self))]

    def describe(self) -> dict:
        """What a view depends on (the feature cache's fingerprint)."""
        return {"paths": self.paths, "long_side": self.long_side, "paste_scale": list(self.paste_scale),
                "p_clean": self.p_clean, "clean_first": self.clean_first, "crop_area": list(self.crop_area),
                "crop_ratio": list(self.crop_ratio), "bg_area": list(self.bg_area),
                "illumination": self.illumination, "hflip": self.hflip,
                "views_per_class": self.views_per_class, "seed": self.seed}

    def __getitem__(self, key):
        index, size = split_key(key)
        img, info = self.render(index, size)
        w, h = img.size
        x0, y0, x1, y1 = info.box
        return {"image": T.to_uint8_tensor(img), "label": info.label, "index": index,
                "box": torch.tensor([x0 / w, y0 / h, x1 / w, y1 / h], dtype=torch.float32)}

    # rendering -----------------------------------------------------------------------------------------
    def _load(self, k: int, target: int) -> Image.Image:
        return load_image(self.paths[k], max_pixels=self.max_pixels, target_size=target)

    def render(self, index: int, size: tuple[int, int] | None = None, epoch: int | None = None
               ) -> tuple[Image.Image, ViewInfo]:
        """The view `index` of epoch `epoch` (default: the current one) at `size` = (w, h)."""
        if not 0 <= index < len(self):
            raise IndexError(f"view index {index} out of range [0, {len(self)})")
        label = index % self.num_classes
        rng = T.sample_rng(self.seed, self.epoch if epoch is None else epoch, index)
        if size is None:
            size = group_size(float(self.class_aspects[label]), self.long_side)
        w, h = size
        obj = self._load(label, max(w, h))
        obj = T.maybe_hflip(T.random_resized_crop(obj, rng, self.crop_area, self.crop_ratio), rng, self.hflip)
        obj = T.illumination(obj, rng, self.illumination)
        clean = rng.random() < self.p_clean
        if clean or index < self.clean_first * self.num_classes:
            return T.resize_to(obj, (w, h)), ViewInfo(label, None, (0, 0, w, h), (w, h))
        bg_label = int(rng.integers(0, self.num_classes - 1))
        bg_label += bg_label >= label                                   # any photo but the object's
        bg = self._load(bg_label, max(w, h))
        bg = T.maybe_hflip(T.random_resized_crop(bg, rng, self.bg_area, (3 / 4, 4 / 3)), rng, self.hflip)
        canvas = T.fit_crop(bg, (w, h), rng)
        tw = max(1, round(w * rng.uniform(*self.paste_scale)))
        th = max(1, round(tw * obj.height / obj.width))
        if th > 0.95 * h:                                               # too tall: shrink, keeping its aspect
            th = max(1, int(0.95 * h))
            tw = max(1, min(w, round(th * obj.width / obj.height)))
        x0, y0 = int(rng.integers(0, w - tw + 1)), int(rng.integers(0, h - th + 1))
        canvas.paste(obj.resize((tw, th), Image.BILINEAR), (x0, y0))
        canvas = T.illumination(canvas, rng, self.illumination / 2)
        return canvas, ViewInfo(label, bg_label, (x0, y0, x0 + tw, y0 + th), (w, h))

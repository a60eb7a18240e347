"""Real views: training data for instance retrieval from real photos, with no pasting.

The real-photo training recipe (issue "Real photos decide"): instance discrimination on augmented views of
real photos, plus places photographed for real at different times.

- *Instance classes*: each photo of ``photos`` (folders and/or files) is its own class; its views are
  :func:`glimr.data.transforms.real_view` of it: a viewpoint warp, a crop that may cut the object, a mirror,
  lighting and colour shifts, night-like darkening, blur, an occluder, JPEG loss. No rectangle edge to find.
- *Place classes* (``groups``): every sub-folder of ``groups`` holding two or more images is one class (a
  fixed webcam across day, night, weather and seasons: real change, not generated); each of its images is
  an item, seen through a milder ``real_view`` (no night, no occluder: the change is already real).

Item layout (a view is a pure function of (seed, epoch, index)): the first ``views_per_class * P`` items are
the views of the P instance classes (item ``i`` is class ``i % P``, as in
:class:`glimr.data.composites.InstanceComposites`), then one item per image of each place class. The
interface is the composites' (``render``, ``labels``, ``class_aspects``, ``describe``, ``item_ids``), so the
frozen-backbone feature cache (:func:`glimr.train.cache.build_composite_cache`) and the trainer take either.

    ds = RealViews(["../shared/data/photos", "../shared/data/train-real/lund"],
                   groups="../shared/data/train-real/webcam", views_per_class=4)
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from glimr.data import transforms as T
from glimr.data.composites import ViewInfo, image_aspects
from glimr.data.samplers import group_size, split_key
from glimr.io.images import DEFAULT_MAX_PIXELS, list_images, load_image

__all__ = ["RealViews"]


def _photo_list(photos: str | Path | Sequence[str | Path]) -> list[str]:
    items = [photos] if isinstance(photos, (str, Path)) else list(photos)
    out: list[str] = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            out.extend(os.path.abspath(f) for f in list_images(p))
        elif p.is_file():
            out.append(os.path.abspath(p))
        else:
            raise FileNotFoundError(f"photos: '{p}' is neither a folder nor a file: give folders of real photos "
                                    "(each photo becomes one instance class)")
    return out


def _group_lists(groups: str | Path | None) -> list[list[str]]:
    if groups is None:
        return []
    root = Path(groups)
    if not root.is_dir():
        raise FileNotFoundError(f"groups: '{root}' is not a folder: give a folder whose sub-folders each hold "
                                "photos of one place (e.g. fixed webcams)")
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        files = [os.path.abspath(f) for f in list_images(sub)]
        if len(files) >= 2:
            out.append(files)
    if not out:
        raise ValueError(f"groups: no sub-folder of '{root}' holds two or more images")
    return out


class RealViews(Dataset):
    """See the module docstring. Arguments:

    photos:          folders (searched recursively) and/or image files; one instance class per photo.
    groups:          optional folder of place sub-folders; one class per sub-folder with >= 2 images.
    long_side:       longest side of a view when the key gives no size (group size of its class's aspect).
    views_per_class: views per instance class and epoch (a place class has one item per image).
    crop_area:       (min, max) area fraction kept by a view's random crop.
    warp:            perspective strength of a view (fraction of the side each corner may move).
    p_night, p_blur, p_jpeg, p_occlude, illumination: as in :func:`glimr.data.transforms.real_view`; place
                     items use ``illumination / 2`` and no night or occluder.
    seed:            views are a pure function of (seed, epoch, index).
    """

    def __init__(self, photos: str | Path | Sequence[str | Path], groups: str | Path | None = None, *,
                 long_side: int = 384, views_per_class: int = 4, crop_area: tuple[float, float] = (0.3, 1.0),
                 warp: float = 0.15, p_night: float = 0.25, p_blur: float = 0.3, p_jpeg: float = 0.5,
                 p_occlude: float = 0.25, illumination: float = 0.4, seed: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.paths = _photo_list(photos)
        self.groups = _group_lists(groups)
        if len(self.paths) + len(self.groups) < 2:
            raise ValueError(f"real views need at least 2 classes (got {len(self.paths)} photos and "
                             f"{len(self.groups)} place groups)")
        lo, hi = crop_area
        if not (0 < lo <= hi <= 1):
            raise ValueError(f"crop_area must satisfy 0 < min <= max <= 1, not {crop_area}")
        self.long_side, self.views_per_class = int(long_side), int(views_per_class)
        if self.views_per_class < 1:
            raise ValueError(f"views_per_class must be >= 1, not {views_per_class}")
        self.crop_area, self.warp = (float(lo), float(hi)), float(warp)
        self.p_night, self.p_blur, self.p_jpeg = float(p_night), float(p_blur), float(p_jpeg)
        self.p_occlude, self.illumination = float(p_occlude), float(illumination)
        self.seed, self.max_pixels, self.epoch = int(seed), max_pixels, 0
        self.num_instances = len(self.paths)
        self.num_classes = self.num_instances + len(self.groups)
        # place items: (class, file)
        self._place = [(self.num_instances + g, f) for g, files in enumerate(self.groups) for f in files]
        firsts = [files[0] for files in self.groups]                 # a webcam's frames share one size
        self.class_aspects = image_aspects(self.paths + firsts)

    # the dataset protocol (that of InstanceComposites) -------------------------------------------------
    def __len__(self) -> int:
        return self.num_instances * self.views_per_class + len(self._place)

    @property
    def labels(self) -> np.ndarray:
        n_views = self.num_instances * self.views_per_class
        inst = np.arange(n_views) % max(1, self.num_instances)
        return np.concatenate([inst, np.array([c for c, _ in self._place], dtype=np.int64)]).astype(np.int64)

    @property
    def aspects(self) -> np.ndarray:
        return self.class_aspects[self.labels]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def item_ids(self) -> list[str]:
        n_views = self.num_instances * self.views_per_class
        ids = [f"c{i % self.num_instances}_v{i // self.num_instances}" for i in range(n_views)]
        return ids + [f"g{c - self.num_instances}_{Path(f).name}" for c, f in self._place]

    def describe(self) -> dict:
        return {"kind": "views", "paths": self.paths, "groups": self.groups, "long_side": self.long_side,
                "views_per_class": self.views_per_class, "crop_area": list(self.crop_area), "warp": self.warp,
                "p_night": self.p_night, "p_blur": self.p_blur, "p_jpeg": self.p_jpeg,
                "p_occlude": self.p_occlude, "illumination": self.illumination, "seed": self.seed}

    def __getitem__(self, key):
        index, size = split_key(key)
        img, info = self.render(index, size)
        return {"image": T.to_uint8_tensor(img), "label": info.label, "index": index,
                "box": torch.tensor([0.0, 0.0, 1.0, 1.0])}

    def source(self, index: int) -> tuple[int, str, bool]:
        """(class, file, is_place) of item ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"view index {index} out of range [0, {len(self)})")
        n_views = self.num_instances * self.views_per_class
        if index < n_views:
            c = index % self.num_instances
            return c, self.paths[c], False
        c, f = self._place[index - n_views]
        return c, f, True

    def render(self, index: int, size: tuple[int, int] | None = None, epoch: int | None = None
               ) -> tuple[Image.Image, ViewInfo]:
        """The view ``index`` of epoch ``epoch`` (default: the current one) at ``size`` = (w, h); its box is
        the whole view (nothing is pasted)."""
        label, path, place = self.source(index)
        rng = T.sample_rng(self.seed, self.epoch if epoch is None else epoch, index)
        if size is None:
            size = group_size(float(self.class_aspects[label]), self.long_side)
        w, h = size
        img = load_image(path, max_pixels=self.max_pixels, target_size=max(w, h))
        if place:
            view = T.real_view(img, rng, crop_area=(max(self.crop_area[0], 0.5), self.crop_area[1]),
                               warp=self.warp / 2, p_night=0.0, p_blur=self.p_blur, p_jpeg=self.p_jpeg,
                               p_occlude=0.0, illum=self.illumination / 2)
        else:
            view = T.real_view(img, rng, crop_area=self.crop_area, warp=self.warp, p_night=self.p_night,
                               p_blur=self.p_blur, p_jpeg=self.p_jpeg, p_occlude=self.p_occlude,
                               illum=self.illumination)
        return T.resize_to(view, (w, h)), ViewInfo(label, None, (0, 0, w, h), (w, h))

"""Labelled training sets: a CSV of (image path, label) and the Google Landmarks v2 (GLDv2) CSV formats.

    ds = LabeledImages.from_csv("train.csv", root="images/")        # columns path,label (header optional)
    ds = LabeledImages.from_gldv2("gldv2/train_clean.csv", root="gldv2/train")
    ds[(i, 512, 384)]   # {"image": uint8 (3, 384, 512), "label": int, "index": i}  (augmented, group size)

CSV of (image path, label): a header naming the columns (`path`/`image`/`file`/`filename` and
`label`/`class`/`landmark_id`) or no header (first column path, second label). Paths are relative to
`root` (default: the CSV's folder). Labels may be any strings: they are numbered in sorted order
(`class_names[k]` is the original label of class k).

GLDv2: `train.csv` (`id,url,landmark_id`: one row per image) or `train_clean.csv` (`landmark_id,images`: one
row per landmark, image ids separated by spaces); images at `root/<a>/<b>/<c>/<id>.jpg` (the official
layout, a/b/c = the first three characters of the id) or flat `root/<id>.jpg`, read by glimr.data.gldv2:
malformed rows are errors naming the line; missing images are listed once on stderr and skipped (`check=True`).

Augmentation (GLAM: "scaling, random cropping, and varied illumination"): random resized crop, horizontal
flip, illumination; a view is a pure function of (seed, epoch, index), so a resumed run sees the same views.
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from glimr.data import transforms as T
from glimr.data.samplers import group_size, split_key
from glimr.io.images import DEFAULT_MAX_PIXELS, load_image

PATH_COLUMNS = ("path", "image", "file", "filename", "image_path")
LABEL_COLUMNS = ("label", "class", "landmark_id", "class_id", "instance")


class DatasetError(ValueError):
    pass


def _open_csv(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"CSV file '{path}' not found")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise DatasetError(f"'{path}' is empty: expected rows of (image path, label)")
    return rows


def read_label_csv(path: str | Path) -> tuple[list[str], list[str]]:
    """(paths, labels) as strings from a CSV of (image path, label)."""
    path = Path(path)
    rows = _open_csv(path)
    head = [c.strip().lower() for c in rows[0]]
    pc = next((head.index(c) for c in PATH_COLUMNS if c in head), None)
    lc = next((head.index(c) for c in LABEL_COLUMNS if c in head), None)
    header = pc is not None and lc is not None
    if header:
        rows = rows[1:]
    else:
        pc, lc = 0, 1
    paths, labels = [], []
    for k, r in enumerate(rows, start=2 if header else 1):
        if len(r) <= max(pc, lc):
            raise DatasetError(f"'{path}' line {k}: expected an image path and a label, got {r!r}")
        paths.append(r[pc].strip())
        labels.append(r[lc].strip())
    return paths, labels


def gldv2_image_path(root: str | Path, image_id: str) -> Path:
    """The official GLDv2 layout: root/a/b/c/<id>.jpg."""
    return Path(root) / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def read_gldv2_csv(path: str | Path) -> tuple[list[str], list[str]]:
    """(image ids, landmark ids) from GLDv2's train.csv (id,url,landmark_id) or train_clean.csv
    (landmark_id,images), checked row by row by glimr.data.gldv2."""
    from glimr.data.gldv2 import GLDv2Error, read_gldv2_rows

    try:
        _, rows = read_gldv2_rows(path)
    except GLDv2Error as e:
        raise DatasetError(str(e)) from None
    return [r[0] for r in rows], [r[1] for r in rows]


def number_labels(labels: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """String labels -> (int labels 0..C-1, class names), numbered in sorted order (numerically when all
    labels are integers)."""
    uniq = sorted(set(labels), key=lambda s: (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s))
    index = {s: k for k, s in enumerate(uniq)}
    return np.array([index[s] for s in labels], dtype=np.int64), uniq


class LabeledImages(Dataset):
    """Images with instance/landmark labels for classification-style training (ArcFace)."""

    def __init__(self, paths: Sequence[str | Path], labels: Sequence[int],
                 class_names: Sequence[str] | None = None, long_side: int = 512, augment: bool = True,
                 crop_area: tuple[float, float] = (0.5, 1.0),
                 crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 illumination: float = 0.3, hflip: float = 0.5,
                 seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS, aspects: Sequence[float] | None = None):
        if len(paths) != len(labels):
            raise DatasetError(f"{len(paths)} paths for {len(labels)} labels")
        if not len(paths):
            raise DatasetError("a training set needs at least one image")
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = int(self.labels.max()) + 1
        self.class_names = (list(class_names) if class_names is not None
                            else [str(k) for k in range(self.num_classes)])
        self.long_side, self.augment = int(long_side), augment
        self.crop_area, self.crop_ratio = crop_area, crop_ratio
        self.illumination, self.hflip = illumination, hflip
        self.seed, self.max_pixels = int(seed), max_pixels
        self._aspects = None if aspects is None else np.asarray(aspects, dtype=np.float64)
        self.epoch = 0

    # constructors --------------------------------------------------------------------------------------
    @classmethod
    def from_csv(cls, csv_path: str | Path, root: str | Path | None = None, check: bool = True,
                 **kw) -> LabeledImages:
        csv_path = Path(csv_path)
        paths, labels = read_label_csv(csv_path)
        base = Path(root) if root is not None else csv_path.parent
        full = [p if Path(p).is_absolute() else base / p for p in paths]
        y, names = number_labels(labels)
        if check:
            _check_exist(full, csv_path)
        return cls(full, y, names, **kw)

    @classmethod
    def from_gldv2(cls, csv_path: str | Path, root: str | Path, check: bool = True, **kw) -> LabeledImages:
        """GLDv2 train.csv / train_clean.csv with images nested (a/b/c/<id>.jpg) or flat under ``root``
        (glimr.data.gldv2). check=True: missing images are listed once on stderr and skipped; check=False:
        the official nested paths, unchecked."""
        if check:
            from glimr.data.gldv2 import load_gldv2

            ds = load_gldv2(csv_path, root)
            full, labels = ds.paths, ds.landmarks
        else:
            ids, labels = read_gldv2_csv(csv_path)
            full = [gldv2_image_path(root, i) for i in ids]
        y, names = number_labels(labels)
        return cls(full, y, names, **kw)

    # the dataset protocol ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.paths)

    @property
    def aspects(self) -> np.ndarray:
        """w / h of every image (header reads, once; with a progress bar for large sets)."""
        if self._aspects is None:
            from glimr.data.composites import image_aspects

            if len(self.paths) > 5000:
                out = np.empty(len(self.paths))
                for k in tqdm(range(0, len(self.paths), 1000), desc="image sizes", unit="k img"):
                    out[k: k + 1000] = image_aspects(self.paths[k: k + 1000])
                self._aspects = out
            else:
                self._aspects = image_aspects(self.paths)
        return self._aspects

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, key):
        index, size = split_key(key)
        if size is None:
            size = group_size(float(self.aspects[index]), self.long_side)
        img = load_image(self.paths[index], max_pixels=self.max_pixels, target_size=max(size))
        if self.augment:
            rng = T.sample_rng(self.seed, self.epoch, index)
            img = T.random_resized_crop(img, rng, self.crop_area, self.crop_ratio)
            img = T.maybe_hflip(img, rng, self.hflip)
            img = T.illumination(img, rng, self.illumination)
        return {"image": T.to_uint8_tensor(T.resize_to(img, size)), "label": int(self.labels[index]),
                "index": index}


def _check_exist(paths: Sequence[Path], source: Path) -> None:
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} of {len(paths)} images listed in '{source}' are missing, e.g. "
                           f"'{missing[0]}': check the root folder (or pass check=False to skip them later)")


"""On-disk cache of frozen-backbone feature maps (CiDeR-FT style training: heads train in minutes on a CPU).

The backbone is frozen up to a stage; its outputs are computed once and stored as ``.npy`` arrays (never
pickle), one array per feature-map size, memory-mapped at training time:

    stage="res5": res5 (and res4) maps are cached: only the head trains (its res5 call returns the cached
                  map). Works for every head that does not change what enters res5 (not UGALR).
    stage="res4": res4 maps are cached: res5 and the head train (UGALR needs this: its res5 takes one more
                  input channel).

Layout of a cache folder::

    meta.json          what was cached (model, stage, sizes, generator settings), and whether it is complete
    items.json         one id per item (view id "c{class}_v{view}" or the image's name), in item order
    labels.npy         int64 label per item (-1 when unlabelled)
    group.npy, row.npy item -> (feature-size group, row in that group's arrays)
    g{k}_res4.npy      (n_k, C4, h4, w4) float16/float32 arrays, one per size group; g{k}_res5.npy likewise
    done.npy           bool per item: building is resumable (an interrupted build continues where it stopped)
    boxes.npy          composites: (N, 4) float32 box of the pasted object, (x0, y0, x1, y1) in [0, 1] of
                       the view (the whole view for a clean one); `composite_boxes` adds it to a cache

Composites are random, so the cache pre-generates `views_per_class` fixed composite views per class
(view v of class c = item v * num_classes + c of an `InstanceComposites` with that many views per class,
epoch 0); the trainer adds cheap feature-level augmentation (horizontal flips of the maps).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from glimr.data import transforms as T
from glimr.data.composites import InstanceComposites
from glimr.data.samplers import aspect_groups, group_size
from glimr.data.views import RealViews
from glimr.io.atomic import atomic_write_bytes, atomic_write_npy
from glimr.io.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from glimr.models.precision import autocast

STAGES = ("res4", "res5")
CACHE_VERSION = 1


class CacheError(RuntimeError):
    pass


def _write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def _save_npy(path: Path, arr: np.ndarray) -> None:
    atomic_write_npy(path, arr)


# ------------------------------------------------------------------------------------------ item sources
class _CompositeItems(Dataset):
    def __init__(self, ds: InstanceComposites, sizes: list[tuple[int, int]]):
        self.ds, self.sizes = ds, sizes

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        img, _ = self.ds.render(i, self.sizes[i], epoch=0)
        return i, T.to_uint8_tensor(img), None


def resize_for_extraction(img: Image.Image, max_size: int) -> Image.Image:
    """Exactly what `glimr.extract` does at scale 1: downscale only, longest side `max_size`, bilinear."""
    s0 = min(1.0, max_size / max(img.size))
    w, h = max(1, round(img.width * s0)), max(1, round(img.height * s0))
    return img if (w, h) == img.size else img.resize((w, h), Image.BILINEAR)


class _ImageItems(Dataset):
    def __init__(self, paths: Sequence[str | Path], max_size: int, max_pixels: int):
        self.paths, self.max_size, self.max_pixels = [str(p) for p in paths], int(max_size), max_pixels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            img = load_image(self.paths[i], max_pixels=self.max_pixels, target_size=self.max_size)
        except ImageError as e:
            return i, None, str(e)
        return i, T.to_uint8_tensor(resize_for_extraction(img, self.max_size)), None


def _image_size(path: str, max_size: int) -> tuple[int, int]:
    with Image.open(path) as im:
        from PIL import ImageOps

        w, h = im.size
        try:
            if ImageOps.exif_transpose is not None and im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
        except Exception:  # noqa: BLE001  (no/odd EXIF: the decoder will report real problems)
            pass
    s0 = min(1.0, max_size / max(w, h))
    return max(1, round(w * s0)), max(1, round(h * s0))


def _first(batch):
    return batch


# ------------------------------------------------------------------------------------------ the cache
class FeatureCache:
    """A cache folder opened for reading (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        mp = self.root / "meta.json"
        if not mp.is_file():
            raise CacheError(f"'{self.root}' is not a feature cache (no meta.json): build it with "
                             "`glimr train CONFIG` (cache section) or glimr.train.cache.build_*_cache")
        self.meta = json.loads(mp.read_text())
        if not self.meta.get("complete"):
            raise CacheError(f"feature cache '{self.root}' is incomplete: run the build again to finish it")
        self.ids: list[str] = json.loads((self.root / "items.json").read_text())
        self.labels = np.load(self.root / "labels.npy")
        self.group = np.load(self.root / "group.npy")
        self.row = np.load(self.root / "row.npy")
        self.sizes = [tuple(g["size"]) for g in self.meta["groups"]]
        bp = self.root / "boxes.npy"
        self.boxes = np.load(bp) if bp.is_file() else None
        self.arrays: dict[str, list[np.ndarray]] = {}
        for key in self.meta["keys"]:
            self.arrays[key] = [np.load(self.root / f"g{k}_{key}.npy", mmap_mode="r")
                                for k in range(len(self.sizes))]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def keys(self) -> list[str]:
        return list(self.meta["keys"])

    def item_sizes(self) -> list[tuple[int, int]]:
        """Input image size (w, h) of every item (items of one size share feature-map shapes)."""
        return [self.sizes[g] for g in self.group]

    def get(self, key: str, indices: Sequence[int]) -> torch.Tensor:
        """Stacked float32 maps of items that share one size group."""
        idx = np.asarray(indices, dtype=np.int64)
        groups = np.unique(self.group[idx])
        if len(groups) != 1:
            raise ValueError("a batch must come from one size group (use GroupSizeBatchSampler(sizes=...))")
        rows = self.row[idx]
        order = np.argsort(rows, kind="stable")                      # sorted reads from the memmap
        arr = np.asarray(self.arrays[key][int(groups[0])][rows[order]])
        out = np.empty_like(arr)
        out[order] = arr
        return torch.from_numpy(out).float()


def _compute_maps(backbone, x: torch.Tensor, keys: Sequence[str], precision: str) -> dict[str, torch.Tensor]:
    with torch.inference_mode(), autocast(precision, x.device):
        r4 = backbone.forward_res4(x)
        out = {"res4": r4}
        if "res5" in keys:
            out["res5"] = backbone.res5(r4)
    return {k: out[k].float() for k in keys}


def _build(root: Path, backbone, items: Dataset, ids: list[str], labels: np.ndarray,
           sizes: list[tuple[int, int]], keys: Sequence[str], meta: dict, *, batch_size: int, workers: int,
           precision: str, dtype: str, progress: bool, desc: str) -> FeatureCache:
    root.mkdir(parents=True, exist_ok=True)
    fingerprint = json.dumps({**{k: v for k, v in meta.items() if k not in ("complete", "groups", "seconds")},
                              "item_sizes": [list(s) for s in sizes], "ids": list(ids)}, sort_keys=True)
    fingerprint = hashlib.sha256(fingerprint.encode()).hexdigest()
    mp = root / "meta.json"
    uniq = sorted(set(sizes))
    group = np.array([uniq.index(s) for s in sizes], dtype=np.int64)
    row = np.zeros(len(sizes), dtype=np.int64)
    counts = np.zeros(len(uniq), dtype=np.int64)
    for i, g in enumerate(group):
        row[i] = counts[g]
        counts[g] += 1
    if mp.is_file():
        old = json.loads(mp.read_text())
        if old.get("fingerprint") == fingerprint and old.get("complete"):
            return FeatureCache(root)
        if old.get("fingerprint") != fingerprint:
            for f in root.glob("g*_res*.npy"):
                f.unlink()
            for f in ("done.npy",):
                (root / f).unlink(missing_ok=True)
    device = next(backbone.parameters()).device
    # shapes of the maps per size group, from one dry run at each size
    shapes: dict[tuple[int, int], dict[str, tuple[int, ...]]] = {}
    for s in uniq:
        probe = _compute_maps(backbone, torch.zeros(1, 3, s[1], s[0], device=device), keys, precision)
        shapes[s] = {k: tuple(v.shape[1:]) for k, v in probe.items()}
    np_dtype = np.float16 if dtype == "float16" else np.float32
    arrays: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for gi, s in enumerate(uniq):
        for k in keys:
            path = root / f"g{gi}_{k}.npy"
            shape = (int(counts[gi]), *shapes[s][k])
            if path.is_file():
                arr = np.load(path, mmap_mode="r+")
                if arr.shape != shape:
                    raise CacheError(f"'{path}' has shape {arr.shape}, expected {shape}: delete '{root}'")
            else:
                arr = np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=shape)
            arrays[k].append(arr)
    done_path = root / "done.npy"
    done = np.load(done_path) if done_path.is_file() else np.zeros(len(sizes), dtype=bool)
    _write_json(root / "items.json", ids)
    _save_npy(root / "labels.npy", np.asarray(labels, dtype=np.int64))
    _save_npy(root / "group.npy", group)
    _save_npy(root / "row.npy", row)
    meta = dict(meta, fingerprint=fingerprint, complete=False,
                groups=[{"size": list(s), "count": int(c), "shapes": {k: list(shapes[s][k]) for k in keys}}
                        for s, c in zip(uniq, counts)])
    _write_json(mp, meta)

    todo = np.flatnonzero(~done)
    # same-size batches, in item order
    batches: list[list[int]] = []
    open_: dict[int, list[int]] = {}
    for i in todo:
        b = open_.setdefault(int(group[i]), [])
        b.append(int(i))
        if len(b) == batch_size:
            batches.append(b)
            open_[int(group[i])] = []
    batches.extend(b for b in open_.values() if b)
    t0 = time.time()
    errors: dict[str, str] = {}
    kw = dict(num_workers=workers, prefetch_factor=4, persistent_workers=False) if workers > 0 else {}
    loader = DataLoader(items, batch_sampler=batches, collate_fn=_first, **kw)
    bar = tqdm(total=len(sizes), initial=int(done.sum()), desc=desc, unit="img", disable=not progress,
               dynamic_ncols=True)
    last_save = time.time()
    for batch in loader:
        good = [(i, t) for i, t, err in batch if t is not None]
        for i, t in good:
            if (t.shape[2], t.shape[1]) != sizes[i]:
                raise CacheError(f"item {ids[i]!r} decoded at {t.shape[2]}x{t.shape[1]}, expected "
                                 f"{sizes[i][0]}x{sizes[i][1]} (EXIF orientation?); delete '{root}' and "
                                 "report it")
        for i, _, err in batch:
            if err is not None:
                errors[ids[i]] = err
                done[i] = True                                        # stays all-zero; listed in meta
        if good:
            x = torch.stack([t for _, t in good]).to(device).float().div_(255.0)
            maps = _compute_maps(backbone, x.contiguous(memory_format=torch.channels_last), keys, precision)
            g = int(group[good[0][0]])
            rows = row[[i for i, _ in good]]
            for k in keys:
                arrays[k][g][rows] = maps[k].cpu().numpy().astype(np_dtype)
            done[[i for i, _ in good]] = True
        bar.update(len(batch))
        if time.time() - last_save > 30:
            for k in keys:
                for a in arrays[k]:
                    a.flush()
            _save_npy(done_path, done)
            last_save = time.time()
    bar.close()
    for k in keys:
        for a in arrays[k]:
            a.flush()
    _save_npy(done_path, done)
    meta.update(complete=True, errors=errors, seconds=round(meta.get("seconds", 0) + time.time() - t0, 1))
    _write_json(mp, meta)
    return FeatureCache(root)


def composite_boxes(root: str | Path, dataset: InstanceComposites, progress: bool = True) -> np.ndarray:
    """The pasted-object boxes of a composite cache's views (rendered again: views are pure functions of
    their seed), saved as ROOT/boxes.npy; returns them (read from the file when it exists)."""
    root = Path(root)
    bp = root / "boxes.npy"
    if bp.is_file():
        return np.load(bp)
    cache = FeatureCache(root)
    if len(cache) != len(dataset):
        raise CacheError(f"'{root}' holds {len(cache)} views, the dataset {len(dataset)}: not its cache")
    out = np.zeros((len(cache), 4), dtype=np.float32)
    sizes = tqdm(cache.item_sizes(), desc="composite boxes", unit="view", disable=not progress)
    for i, (w, h) in enumerate(sizes):
        _, info = dataset.render(i, (w, h), epoch=0)
        x0, y0, x1, y1 = info.box
        out[i] = (x0 / w, y0 / h, x1 / w, y1 / h)
    _save_npy(bp, out)
    return out


def _keys_for(stage: str, keep_res4: bool = True) -> list[str]:
    if stage not in STAGES:
        raise ValueError(f"cache stage must be one of {STAGES}, not {stage!r}")
    return ["res4", "res5"] if stage == "res5" and keep_res4 else ([stage])


def build_composite_cache(root: str | Path, backbone, dataset: InstanceComposites | RealViews, *,
                          stage: str = "res5",
                          keep_res4: bool = True, n_groups: int = 3, batch_size: int = 16, workers: int = 2,
                          precision: str = "auto", dtype: str = "float16", progress: bool = True
                          ) -> FeatureCache:
    """Cache the items of epoch 0 of `dataset` (composites: `views_per_class` fixed views per class; real
    views: those and one per place image), each at the group size of its class's aspect ratio (`n_groups`
    aspect groups, longest side `dataset.long_side`). Composites also get their pasted boxes (boxes.npy)."""
    keys = _keys_for(stage, keep_res4)
    gid, reps = aspect_groups(dataset.class_aspects, n_groups)
    gsizes = [group_size(float(r), dataset.long_side) for r in reps]
    labels = dataset.labels
    sizes = [gsizes[gid[c]] for c in labels]
    ids = dataset.item_ids()
    source = dataset.describe()
    kind = source.pop("kind", "composites")
    meta = {"version": CACHE_VERSION, "kind": kind, "backbone": backbone.name,
            "stage": stage, "keys": keys, "dtype": dtype, "precision": precision, "n_groups": n_groups,
            "source": source}
    was = torch.is_grad_enabled()
    backbone.eval()
    try:
        _build(Path(root), backbone, _CompositeItems(dataset, sizes), ids, labels, sizes, keys, meta,
               batch_size=batch_size, workers=workers, precision=precision, dtype=dtype,
               progress=progress, desc=f"cache {kind}")
    finally:
        torch.set_grad_enabled(was)
    if kind == "composites":
        composite_boxes(root, dataset, progress=progress)
    return FeatureCache(root)


def build_image_cache(root: str | Path, backbone, paths: Sequence[str | Path], *,
                      names: Sequence[str] | None = None, labels: Sequence[int] | None = None,
                      stage: str = "res5", keep_res4: bool = True,
                      max_size: int = 512, batch_size: int = 16, workers: int = 2, precision: str = "auto",
                      dtype: str = "float32", progress: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS
                      ) -> FeatureCache:
    """Cache the maps of image files resized as `glimr.extract` does at scale 1 (longest side `max_size`,
    downscale only), e.g. a benchmark's query and database images, so that many heads on the same frozen
    backbone are evaluated from one backbone pass. A file that cannot be decoded gets all-zero maps and is
    listed in `meta["errors"]`."""
    keys = _keys_for(stage, keep_res4)
    paths = [str(p) for p in paths]
    sizes = [_image_size(p, max_size) for p in paths]
    ids = list(names) if names is not None else paths
    lab = np.asarray(labels if labels is not None else [-1] * len(paths), dtype=np.int64)
    meta = {"version": CACHE_VERSION, "kind": "images", "backbone": backbone.name,
            "stage": stage, "keys": keys, "dtype": dtype, "precision": precision, "max_size": max_size,
            "source": {"paths": paths}}
    backbone.eval()
    return _build(Path(root), backbone, _ImageItems(paths, max_size, max_pixels), ids, lab, sizes, keys, meta,
                  batch_size=batch_size, workers=workers, precision=precision, dtype=dtype,
                  progress=progress, desc="cache images")


# ------------------------------------------------------------------------------------------ using a cache
def head_forward(net, maps: dict[str, torch.Tensor], stage: str):
    """Run `net`'s trainable part on cached maps: stage "res5" -> the head on (res4, cached res5);
    stage "res4" -> the head on res4 with the net's own (trainable) res5."""
    if stage == "res5":
        r5 = maps["res5"]
        return net.head(maps.get("res4"), lambda _x: r5)
    return net.head(maps["res4"], net.backbone.res5)


@torch.inference_mode()
def cached_descriptors(net, cache: FeatureCache | str | Path, *, batch_size: int = 32,
                       precision: str = "auto", progress: bool = True) -> np.ndarray:
    """(N, D) float32 L2-normalised descriptors of every cached item, in item order, from the net's head
    (and res5 for a res4 cache) on the cached maps. Equals the net's own descriptors of the same images
    (up to the cache's dtype) when the net's frozen part is the one that filled the cache."""
    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    stage = cache.meta["stage"]
    was = net.training
    net.eval()
    device = next(net.parameters()).device
    out = np.zeros((len(cache), int(net.dim)), dtype=np.float32)
    groups = {}
    for i, g in enumerate(cache.group):
        groups.setdefault(int(g), []).append(i)
    bar = tqdm(total=len(cache), desc="descriptors", unit="img", disable=not progress, dynamic_ncols=True)
    for _, idx in sorted(groups.items()):
        for s in range(0, len(idx), batch_size):
            b = idx[s: s + batch_size]
            maps = {k: cache.get(k, b).to(device) for k in cache.keys}
            with autocast(precision, device):
                d = head_forward(net, maps, stage).descriptor
            out[b] = d.float().cpu().numpy()
            bar.update(len(b))
    bar.close()
    bad = [cache.ids.index(k) for k in cache.meta.get("errors", {})]
    out[bad] = 0
    net.train(was)
    return out


def estimate_bytes(cache_meta: dict) -> int:
    """Bytes of the cached arrays (for progress messages)."""
    item = 2 if cache_meta.get("dtype") == "float16" else 4
    return int(sum(g["count"] * sum(math.prod(s) for s in g["shapes"].values()) * item
                   for g in cache_meta.get("groups", [])))

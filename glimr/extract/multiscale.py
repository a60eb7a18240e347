"""Multi-scale global descriptors.

For each image: optional query crop (box in original pixels), resize so the longest side is `max_size`
(downscale only, as in the GeM/cirtorch protocol), then for every scale s resize by s, run the model,
take its L2-normalised descriptor; sum over scales and L2-normalise again.

Decoding and resizing run in DataLoader worker processes, or, with ``workers=0`` (the default on machines
with at most 2 cores: glimr/models/cpu.py), in one background thread that overlaps the forward pass; the main
process groups images of identical size into batches (so no padding changes the pooled descriptor), runs the model under bf16 autocast where
the hardware has native bf16, and never aborts on a bad file: it is reported and its row left at zero.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from glimr.io.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from glimr.models.precision import autocast

SCALE_SETS: dict[str, tuple[float, ...]] = {
    "1": (1.0,),
    "3": (0.7071, 1.0, 1.4142),                 # GeM / GLAM / DPLG multi-scale
    "5": (0.5, 0.7071, 1.0, 1.4142, 2.0),       # DELG / co-attention / UGALR 5 scales
}

Box = tuple[float, float, float, float]


def parse_scales(spec: str | Sequence[float]) -> tuple[float, ...]:
    """"1" | "3" | "5" | "1,0.7071,1.4142" | a sequence of floats -> tuple of positive floats."""
    if not isinstance(spec, str):
        scales = tuple(float(s) for s in spec)
    elif spec.strip() in SCALE_SETS:
        scales = SCALE_SETS[spec.strip()]
    else:
        try:
            scales = tuple(float(s) for s in spec.split(",") if s.strip())
        except ValueError:
            raise ValueError(f"bad scales {spec!r}: use 1, 3, 5 or a comma list like 1,0.7071,1.4142") from None
    if not scales or any(not (s > 0 and math.isfinite(s)) for s in scales):
        raise ValueError(f"bad scales {spec!r}: need one or more positive numbers")
    return scales


def parse_box(spec: str) -> Box:
    try:
        x0, y0, x1, y1 = (float(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"bad box {spec!r}: expected x0,y0,x1,y1 in pixels") from None
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"bad box {spec!r}: need x1 > x0 and y1 > y0")
    return (x0, y0, x1, y1)


def crop_box(img: Image.Image, box: Box, name: str = "<image>") -> Image.Image:
    x0, y0, x1, y1 = box
    # rounded like PIL's crop of a float box (the cirtorch / revisitop convention)
    x0, y0 = max(0, round(x0)), max(0, round(y0))
    x1, y1 = min(img.width, round(x1)), min(img.height, round(y1))
    if x1 <= x0 or y1 <= y0:
        raise ImageError(str(name), f"crop box {box} lies outside the {img.width}x{img.height} image",
                         hint="give the box as x0,y0,x1,y1 in the image's pixels")
    return img.crop((x0, y0, x1, y1))


def resized_views(img: Image.Image, scales: Sequence[float], max_size: int) -> list[torch.Tensor]:
    """The per-scale uint8 (3, h, w) tensors of one image."""
    s0 = min(1.0, max_size / max(img.size))  # downscale only
    views = []
    for s in scales:
        w, h = max(1, round(img.width * s0 * s)), max(1, round(img.height * s0 * s))
        im = img if (w, h) == img.size else img.resize((w, h), Image.BILINEAR)
        views.append(torch.from_numpy(np.array(im, dtype=np.uint8, copy=True)).permute(2, 0, 1))
    return views


class ImageViews(Dataset):
    """Item i -> (i, [per-scale uint8 tensors] or None, error message or None)."""

    def __init__(self, items: Sequence[str | Path | Image.Image], scales: Sequence[float], max_size: int,
                 boxes: Sequence[Box | None] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft: bool = True):
        if boxes is not None and len(boxes) != len(items):
            raise ValueError(f"{len(boxes)} boxes for {len(items)} images")
        self.items, self.scales, self.max_size = list(items), tuple(scales), int(max_size)
        self.boxes, self.max_pixels, self.draft = boxes, max_pixels, draft

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item, box = self.items[i], (self.boxes[i] if self.boxes is not None else None)
        try:
            if isinstance(item, Image.Image):
                img = item.convert("RGB")
            else:
                # JPEG draft decoding only when no crop box needs the original pixel grid
                draft = self.draft and box is None
                target = math.ceil(self.max_size * max(self.scales)) if draft else None
                img = load_image(item, max_pixels=self.max_pixels, target_size=target)
            if box is not None:
                img = crop_box(img, box, str(item) if not isinstance(item, Image.Image) else "<image>")
            return i, resized_views(img, self.scales, self.max_size), None
        except ImageError as e:
            return i, None, str(e)


@dataclass
class ExtractResult:
    descriptors: np.ndarray                      # (N, D) float32, L2-normalised; zero rows for failures
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> np.ndarray:
        m = np.ones(len(self.descriptors), dtype=bool)
        m[list(self.errors)] = False
        return m


def _identity(x):
    return x


def _prefetched(ds: Dataset, depth: int):
    """ds[0], ds[1], ... in order, each decoded by one background thread up to ``depth`` items ahead (PIL
    releases the GIL while it decodes and resizes, so decoding overlaps the forward pass)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    n = len(ds)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="glimr-decode") as pool:
        pending: deque = deque()
        nxt = 0
        while nxt < n or pending:
            while nxt < n and len(pending) < depth:
                pending.append(pool.submit(ds.__getitem__, nxt))
                nxt += 1
            yield pending.popleft().result()


def _loader(ds: Dataset, workers: int | None, batch_size: int):
    """Decoded items in order: ``workers`` processes (DataLoader), or with 0 one background thread."""
    from glimr.models.cpu import resolve_workers

    workers = resolve_workers(workers)
    if workers == 0:
        return _prefetched(ds, depth=2 * batch_size)
    kw = dict(num_workers=workers, prefetch_factor=max(2, 2 * batch_size // workers), persistent_workers=False)
    return DataLoader(ds, batch_size=None, shuffle=False, collate_fn=_identity, **kw)


FOLD_MIN_VIEWS = 8          # from this many views on, extract() makes the folded copy if it has none


@torch.inference_mode()
def extract(model: torch.nn.Module, items: Sequence[str | Path | Image.Image], *, scales: Sequence[float] = (1.0,),
            max_size: int = 512, boxes: Sequence[Box | None] | None = None, batch_size: int = 16,
            workers: int | None = None, precision: str = "auto", progress: bool = True, desc: str = "extract",
            max_pixels: int = DEFAULT_MAX_PIXELS, report_errors: bool = True, draft: bool = True,
            local_fn: Callable[[int, int, torch.Tensor, tuple[int, int]], None] | None = None) -> ExtractResult:
    """Global descriptors for image paths (or PIL images). Bad files are reported and skipped.

    local_fn: optional, called once per (image, scale) with ``(item index, scale index, local map, (H, W))``:
    the head's ``RetrievalOutput.local`` of that view, a float32 CPU tensor (C, h, w), from the same forward
    pass as the descriptor, and the view's input size (co-attention features, glimr.extract.local).

    draft: let the JPEG decoder reduce by 2, 4 or 8 in the DCT (never below the size needed), which is several
    times faster on large photos; descriptors differ from full decoding by about 1% (cosine > 0.99).
    """
    scales = parse_scales(scales) if isinstance(scales, str) else tuple(scales)
    from glimr.models.fold import inference_model

    # conv-BN pairs folded, channels-last weights (glimr/models/fold.py); a one-query call reuses a copy but
    # does not pay for making one
    model = inference_model(model, build=len(items) * len(scales) >= FOLD_MIN_VIEWS)
    device = next(model.parameters()).device
    if device.type == "cpu":
        from glimr.models.cpu import tune_allocator

        tune_allocator()
    n = len(items)
    dim = int(model.dim)
    acc = np.zeros((n, dim), dtype=np.float32)
    errors: dict[int, str] = {}
    if n == 0:
        return ExtractResult(acc, errors)
    ds = ImageViews(items, scales, max_size, boxes, max_pixels, draft)
    buckets: dict[tuple[int, int], list[tuple[int, torch.Tensor, int]]] = {}
    buffered = 0
    max_buffer = 4 * batch_size
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)

    def run(key):
        nonlocal buffered
        group = buckets.pop(key)
        buffered -= len(group)
        idx = [i for i, _, _ in group]
        # the views are HWC arrays seen as CHW: stacking them as NHWC is a plain copy, and the NCHW view of
        # that is already channels-last, the layout the convolutions run fastest in (no transposing copies)
        x = torch.stack([t.permute(1, 2, 0) for _, t, _ in group]).to(device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0).contiguous(memory_format=torch.channels_last)
        with autocast(precision, device):
            out = model(x)
            d = out.descriptor
        np.add.at(acc, idx, d.float().cpu().numpy())
        if local_fn is not None:
            if out.local is None:
                raise ValueError(f"model {getattr(model, 'name', type(model).__name__)} returns no local "
                                 "feature map: co-attention needs RetrievalOutput.local")
            loc = out.local.float().cpu()
            for j, (i, _, si) in enumerate(group):
                local_fn(i, si, loc[j], (int(x.shape[2]), int(x.shape[3])))

    for i, views, err in _loader(ds, workers, batch_size):
        if err is not None:
            errors[i] = err
            if report_errors:
                tqdm.write(f"skipped: {err}", file=sys.stderr)
        else:
            for si, v in enumerate(views):
                key = (v.shape[1], v.shape[2])
                buckets.setdefault(key, []).append((i, v, si))
                buffered += 1
                if len(buckets[key]) >= batch_size:
                    run(key)
            while buffered > max_buffer:
                run(max(buckets, key=lambda k: len(buckets[k])))
        bar.update(1)
    for key in list(buckets):
        run(key)
    bar.close()
    norms = np.linalg.norm(acc, axis=1, keepdims=True)
    np.divide(acc, norms, out=acc, where=norms > 0)
    return ExtractResult(acc, errors)

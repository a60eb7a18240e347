"""Multi-scale global descriptors.

For each image: optional query crop (box in original pixels), resize so the longest side is `max_size`
(downscale only, as in the GeM/cirtorch protocol; but a whole image whose longest side is below
``UPSCALE_BELOW * max_size``, a thumbnail, is upscaled to that size: see :func:`resized_views`), then for
every scale s resize by s, run the model, take its L2-normalised descriptor; sum over scales and
L2-normalise again.

Decoding and resizing run in DataLoader worker processes, or, with ``workers=0`` (the default on machines
with at most 2 cores: glimr/models/cpu.py), in one background thread that overlaps the forward pass; the main
process groups images of identical size into batches (so no padding changes the pooled descriptor), runs the model under bf16 autocast where
the hardware has native bf16, and never aborts on a bad file: it is reported and its row left at zero.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from glimr.config import whole_number
from glimr.io.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from glimr.models.precision import autocast

_R2 = math.sqrt(2.0)
# Named scale sets, each with its source. The scales multiply the image resized to max_size (longest side).
SCALE_SETS: dict[str, tuple[float, ...]] = {
    "1": (1.0,),
    # {1/sqrt2, 1, sqrt2}: Radenovic et al. 2018 (cirtorch, GeM); GLAM's multi-resolution representation
    # [16] is this one. Co-attention paper, Table 3, first row.
    "cirtorch3": (1 / _R2, 1.0, _R2),
    # {1/(2 sqrt2), 1/2, 1/sqrt2, 1, sqrt2} = sqrt2^k, k = -3..1: Yang et al. 2021 (DOLG); used by
    # co-attention (Sec. 4, "5 scales"), DPLG (Sec. 4: "5 scales") and UGALR (Sec. 4: 0.3535, 0.5, ...).
    "paper5": (1 / (2 * _R2), 0.5, 1 / _R2, 1.0, _R2),
    # {1/4, 1/(2 sqrt2), 1/2, 1/sqrt2, 1, sqrt2, 2}: Cao et al. 2020 (DELG), Tolias et al. 2020 (HOW);
    # co-attention paper, Table 3, third row.
    "delg7": (0.25, 1 / (2 * _R2), 0.5, 1 / _R2, 1.0, _R2, 2.0),
}
SCALE_SETS["3"] = SCALE_SETS["cirtorch3"]   # short names: the papers' "3 scales" and "5 scales"
SCALE_SETS["5"] = SCALE_SETS["paper5"]
SCALE_SETS["7"] = SCALE_SETS["delg7"]

Box = tuple[float, float, float, float]


DEFAULT_MAX_SIZE = 512      # longest side when neither the caller nor the model's config ("max_size") says
MAX_SCALE = 8.0             # a view at most 8x the max_size image
MAX_SCALES = 16             # views per image
MAX_SIDE = 16384            # --max-size
MAX_BATCH = 4096
MAX_WORKERS = 256
MAX_PIXELS_LIMIT = 10**10   # --max-pixels (10 gigapixels)
PRECISIONS = ("auto", "fp32", "bf16")


def parse_scales(spec: str | Sequence[float]) -> tuple[float, ...]:
    """"1" | a name of SCALE_SETS ("cirtorch3" = "3", "paper5" = "5", "delg7" = "7") | "1,0.7071,1.4142" | a sequence of floats -> tuple of positive floats (each at most
    MAX_SCALE, at most MAX_SCALES of them)."""
    if not isinstance(spec, str):
        try:
            scales = tuple(float(s) for s in spec)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"bad scales {spec!r}: need one or more positive numbers") from None
    elif spec.strip() in SCALE_SETS:
        scales = SCALE_SETS[spec.strip()]
    else:
        try:
            scales = tuple(float(s) for s in spec.split(",") if s.strip())
        except ValueError:
            raise ValueError(f"bad scales {spec!r}: use 1, 3 (cirtorch3), 5 (paper5), 7 (delg7) or a comma list like 1,0.7071,1.4142") from None
    if not scales or any(not (s > 0 and math.isfinite(s)) for s in scales):
        raise ValueError(f"bad scales {spec!r}: need one or more positive numbers")
    if any(s > MAX_SCALE for s in scales) or len(scales) > MAX_SCALES:
        raise ValueError(f"bad scales {spec!r}: at most {MAX_SCALES} scales, each at most {MAX_SCALE:g}")
    return scales


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ExtractSettings:
    """Everything that decides how descriptors are extracted; validated when built (ValueError naming the
    setting), serialised into an index's index.json (``to_json``/``from_json``, same validation).

    ``checkpoint`` is stored as an absolute path with its content hash ``checkpoint_sha256``
    (:meth:`with_checkpoint` fills both); ``check_checkpoint`` refuses a checkpoint that was replaced."""

    model: str = "model"
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    scales: tuple[float, ...] = (1.0,)
    max_size: int = DEFAULT_MAX_SIZE
    precision: str = "auto"
    batch_size: int = 8     # 16 costs ~200 MiB more peak memory at 512 px for no speed on a 2-core CPU
    workers: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model.strip() or len(self.model) > 200:
            raise ValueError(f"model must be a model name (see `glimr models`), got {self.model!r}")
        object.__setattr__(self, "scales", parse_scales(self.scales))
        object.__setattr__(self, "max_size", whole_number("max_size (--max-size)", self.max_size, 1, MAX_SIDE))
        object.__setattr__(self, "batch_size", whole_number("batch_size (--batch-size)", self.batch_size, 1, MAX_BATCH))
        object.__setattr__(self, "workers", whole_number("workers (--workers)", self.workers, 0, MAX_WORKERS,
                                                    none_ok=True))
        object.__setattr__(self, "max_pixels", whole_number("max_pixels (--max-pixels)", self.max_pixels, 1,
                                                       MAX_PIXELS_LIMIT))
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision (--precision) must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.checkpoint is not None:
            if not isinstance(self.checkpoint, str) or not self.checkpoint:
                raise ValueError(f"checkpoint must be a file path, got {self.checkpoint!r}")
            if not os.path.isabs(self.checkpoint):
                raise ValueError(f"checkpoint {self.checkpoint!r} must be an absolute path "
                                 "(ExtractSettings.with_checkpoint makes one)")
        sha = self.checkpoint_sha256
        if sha is not None and (not isinstance(sha, str) or len(sha) != 64
                                or any(c not in "0123456789abcdef" for c in sha)):
            raise ValueError(f"checkpoint_sha256 must be 64 lower-case hex digits, got {sha!r}")
        if (sha is None) != (self.checkpoint is None):
            raise ValueError("checkpoint and checkpoint_sha256 go together: give both or neither")

    @classmethod
    def with_checkpoint(cls, checkpoint: str | Path | None, **kw) -> ExtractSettings:
        """Settings whose checkpoint is ``checkpoint`` made absolute, with the sha256 of its weights."""
        if checkpoint is None:
            return cls(**kw)
        path = checkpoint_weights(checkpoint)
        return cls(checkpoint=str(path), checkpoint_sha256=file_sha256(path), **kw)

    def check_checkpoint(self) -> None:
        """Refuse (ValueError) when the recorded checkpoint is missing or its content changed."""
        if self.checkpoint is None:
            return
        p = Path(self.checkpoint)
        if not p.is_file():
            raise ValueError(f"the checkpoint this index was built with, '{p}', is gone: put it back, or rebuild "
                             "the index with the checkpoint you have")
        if file_sha256(p) != self.checkpoint_sha256:
            raise ValueError(f"the checkpoint '{p}' changed since this index was built (sha256 "
                             f"{self.checkpoint_sha256[:12]}... recorded): its descriptors would not match the "
                             "index; restore that file, or rebuild the index into a new folder")

    def same_descriptors(self, other: ExtractSettings) -> bool:
        """Do both make the same descriptors? (batching, workers, precision, pixel cap do not count)"""
        keys = ("model", "checkpoint_sha256", "scales", "max_size")
        return all(getattr(self, k) == getattr(other, k) for k in keys)

    def replace(self, **kw) -> ExtractSettings:
        return type(self)(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **kw})

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["scales"] = list(self.scales)
        return d

    @classmethod
    def from_json(cls, d: dict) -> ExtractSettings:
        from glimr.config import settings_from_json

        return settings_from_json(cls, d, "extraction settings")


def checkpoint_weights(checkpoint: str | Path) -> Path:
    """The absolute path of a checkpoint's weights file (``x.safetensors``; ``x`` or ``x.json`` name it too)."""
    p = Path(checkpoint).expanduser().absolute()
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    p = p.with_suffix(".safetensors")  # as glimr.models.checkpoint names the weights
    if not p.is_file():
        raise ValueError(f"checkpoint not found: '{p}' (give the .safetensors file that has its .json beside it)")
    return p


def parse_box(spec: str) -> Box:
    try:
        x0, y0, x1, y1 = (float(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"bad box {spec!r}: expected x0,y0,x1,y1 in pixels") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"bad box {spec!r}: the coordinates must be finite numbers")
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


#: a whole image whose longest side is below this fraction of max_size is upscaled to it (a 128-px thumbnail
#: gives a 4x4 map at stride 32: too few cells for pooling). Chosen on COIL-100 (128 px: GeM mAP +2.4 with
#: Lite0, +2.9 with Lite2 at max_size 512); crops (query boxes) are never upscaled, as the protocols say.
UPSCALE_BELOW = 0.5


def resized_views(img: Image.Image, scales: Sequence[float], max_size: int,
                  upscale_below: float = 0.0) -> list[torch.Tensor]:
    """The per-scale uint8 (3, h, w) tensors of one image: downscaled so that the longest side is at most
    ``max_size``, or upscaled to ``upscale_below * max_size`` when it is shorter than that (0: never)."""
    s0 = min(1.0, max_size / max(img.size))  # downscale only
    if max(img.size) < upscale_below * max_size:
        s0 = upscale_below * max_size / max(img.size)
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
            return i, resized_views(img, self.scales, self.max_size,
                                    upscale_below=UPSCALE_BELOW if box is None else 0.0), None
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
    kw = {"num_workers": workers, "prefetch_factor": max(2, 2 * batch_size // workers), "persistent_workers": False}
    return DataLoader(ds, batch_size=None, shuffle=False, collate_fn=_identity, **kw)


FOLD_MIN_VIEWS = 8          # from this many views on, extract() makes the folded copy if it has none


_UNSET = object()


def model_max_size(config: dict | None) -> int:
    """The longest image side a model runs at unless the caller says otherwise: its config's ``"max_size"``
    (a packaged or whitened model records the size its whitening was fitted at), else DEFAULT_MAX_SIZE."""
    m = (config or {}).get("max_size")
    return int(m) if m else DEFAULT_MAX_SIZE


def resolve_settings(model, settings: ExtractSettings | None, loose: dict) -> ExtractSettings:
    """``settings``, or (for callers that pass loose keywords) ExtractSettings built from them; never both."""
    given = {k: v for k, v in loose.items() if v is not _UNSET}
    if settings is not None:
        if given:
            raise ValueError(f"give settings= or the keywords {sorted(given)}, not both")
        if not isinstance(settings, ExtractSettings):  # ValueError: one error for bad settings
            raise ValueError(f"settings must be an ExtractSettings, got {type(settings).__name__}")
        return settings
    name = getattr(model, "name", None)
    given.setdefault("max_size", model_max_size(getattr(model, "config", None)))
    return ExtractSettings(model=name if isinstance(name, str) and name else "model", **given)


@torch.inference_mode()
def extract(model: torch.nn.Module, items: Sequence[str | Path | Image.Image], *,
            settings: ExtractSettings | None = None, scales=_UNSET, max_size=_UNSET,
            boxes: Sequence[Box | None] | None = None, batch_size=_UNSET, workers=_UNSET, precision=_UNSET,
            progress: bool = True, desc: str = "extract", max_pixels=_UNSET, report_errors: bool = True,
            draft: bool = True,
            local_fn: Callable[[int, int, torch.Tensor, tuple[int, int]], None] | None = None) -> ExtractResult:
    """Global descriptors for image paths (or PIL images). Bad files are reported and skipped.

    settings: an :class:`ExtractSettings` (scales, max_size, batch_size, workers, precision, max_pixels);
    callers may instead pass those as keywords (defaults: scales (1,), max_size the model's own
    (:func:`model_max_size`: its config's, else 512), batch_size 8, workers auto, precision auto, max_pixels
    100 MP), validated the same way (ValueError before any work).

    local_fn: optional, called once per (image, scale) with ``(item index, scale index, local map, (H, W))``:
    the head's ``RetrievalOutput.local`` of that view, a float32 CPU tensor (C, h, w), from the same forward
    pass as the descriptor, and the view's input size (co-attention features, glimr.extract.local).

    draft: let the JPEG decoder reduce by 2, 4 or 8 in the DCT (never below the size needed), which is several
    times faster on large photos; descriptors differ from full decoding by about 1% (cosine > 0.99).
    """
    st = resolve_settings(model, settings, {"scales": scales, "max_size": max_size, "batch_size": batch_size,
                                            "workers": workers, "precision": precision, "max_pixels": max_pixels})
    scales, max_size, batch_size, workers = st.scales, st.max_size, st.batch_size, st.workers
    precision, max_pixels = st.precision, st.max_pixels
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

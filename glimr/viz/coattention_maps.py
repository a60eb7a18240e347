"""Co-attention maps over candidate images (Hu & Bors 2023, Fig. 7): ``glimr explain --query Q IMAGE ...``.

For a query and each candidate image: the candidate's selected local features (N largest L2 norms over the
scales) are clustered (K), every cluster gets its co-attention weight a'_i (eq. (8), conditioned on the
query vector V_q), every selected location takes its cluster's weight, locations not selected get 0, and
the locations of every scale are projected back onto the image and accumulated (sec. 6.3). Next to it the
query-insensitive L2-norm attention (the channel norm of the scale-1 feature map), as in the paper's figure.

With an index built with ``--coattention`` (``index=``) its PCA, scales and settings are used; otherwise the
cosines are taken in the model's (whitened) space without PCA, at the given scales.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["CoAttentionMap", "coattention_maps", "render_coattention"]


@dataclass
class CoAttentionMap:
    path: str
    coattention: np.ndarray     # (H, W) at the display size, accumulated over scales (not normalised)
    l2norm: np.ndarray          # (H, W) channel L2 norm of the scale-1 map, upsampled
    weights: np.ndarray         # (K,) a'_i of the candidate's clusters
    score: float                # S_{q,c}, eq. (10)
    image: Image.Image          # the candidate at the display size


def _load(item, max_size: int, box=None, max_pixels: int | None = None) -> Image.Image:
    from glimr.extract.multiscale import crop_box  # noqa: PLC0415
    from glimr.io.images import DEFAULT_MAX_PIXELS, load_image  # noqa: PLC0415

    img = item.convert("RGB") if isinstance(item, Image.Image) else load_image(item, max_pixels=max_pixels or
                                                                                DEFAULT_MAX_PIXELS)
    if box is not None:
        img = crop_box(img, box, str(item))
    s = min(1.0, max_size / max(img.size))
    if s < 1.0:
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BILINEAR)
    return img


def _project(loc, weights: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Each selected location takes its cluster's weight; cells of every scale are drawn onto the image."""
    w_img, h_img = size_wh
    out = np.zeros((h_img, w_img), np.float64)
    for (si, y, x), lab in zip(loc.pos, loc.labels):
        h, w, vh, vw = loc.grids[si]
        # cell (y, x) of an (h, w) map covers [y/h, (y+1)/h) of the view's height (likewise width)
        y0, y1 = int(np.floor(y / h * h_img)), int(np.ceil((y + 1) / h * h_img))
        x0, x1 = int(np.floor(x / w * w_img)), int(np.ceil((x + 1) / w * w_img))
        out[y0:y1, x0:x1] += weights[lab]
    return out


def coattention_maps(model: torch.nn.Module, query, images: Sequence, *, index=None, params=None,
                     scales: Sequence[float] | None = None, max_size: int | None = None, box=None,
                     temperature: float = 10.0, clusters: int = 10, n_select: int = 500,
                     precision: str = "fp32") -> tuple[list[CoAttentionMap], Image.Image]:
    """Co-attention maps of ``images`` (paths or PIL images) for ``query`` (optionally cropped to ``box``).
    Returns (one CoAttentionMap per image, the query image as shown)."""
    from torch.nn import functional as F  # noqa: PLC0415

    from glimr.extract.local import PAPER_SCALES, CoAttentionParams, LocalConfig, extract_local, l2n_np  # noqa: PLC0415
    from glimr.extract.multiscale import resized_views  # noqa: PLC0415
    from glimr.rerank.coattention import coattention_weights, score_dense  # noqa: PLC0415

    if index is not None and params is None:
        from glimr.index.store import IndexStore  # noqa: PLC0415

        with IndexStore.open(index) as st:
            params = CoAttentionParams.load(Path(st.dir) / "coattention")
            scales = scales or st.config.scales
            max_size = max_size or st.config.max_size
    scales = tuple(scales or PAPER_SCALES)
    max_size = int(max_size or 512)
    cfg = params.cfg if params is not None else LocalConfig(n_select=n_select, clusters=clusters, max_words=0)
    items = [query] + list(images)
    res, locs = extract_local(model, items, cfg=cfg, scales=scales, max_size=max_size,
                              boxes=[box] + [None] * len(images) if box is not None else None, workers=0,
                              progress=False, precision=precision, report_errors=False)
    if res.errors:
        i, msg = next(iter(res.errors.items()))
        raise ValueError(msg)
    if params is not None:
        q = params.query_vector(locs[0])
    else:
        q = l2n_np(locs[0].query[None])[0]
    out = []
    for j, item in enumerate(images, start=1):
        loc = locs[j]
        if params is not None:
            units, norms = params.cluster_vectors(loc)
        else:
            units, norms = l2n_np(loc.clusters), np.linalg.norm(loc.clusters, axis=1)
        a = units @ q
        w = coattention_weights(a[None], (norms > 0)[None], temperature)[0]
        s = float(score_dense(q, units[None], norms[None], temperature=temperature)[0])
        img = _load(item, max_size)
        ca = _project(loc, w, img.size)
        view = resized_views(img, (1.0,), max_size)[0]
        with torch.inference_mode():
            local = model(view[None].float().div(255.0)).local[0].float()
        l2 = F.interpolate(local.norm(dim=0)[None, None], size=(img.height, img.width), mode="bilinear",
                           align_corners=False)[0, 0].numpy()
        out.append(CoAttentionMap(str(item), ca, l2, w, s, img))
    return out, _load(query, max_size, box)


def _norm01(m: np.ndarray) -> np.ndarray:
    lo, hi = float(m.min()), float(m.max())
    return np.zeros_like(m) if hi - lo <= 1e-12 else (m - lo) / (hi - lo)


def render_coattention(query, images: Sequence, out: str | Path, *, model: torch.nn.Module | None = None,
                       model_name: str | None = None, checkpoint=None, index=None, box=None,
                       scales: Sequence[float] | None = None, max_size: int | None = None,
                       temperature: float = 10.0, alpha: float = 0.5, dpi: int = 100) -> Path:
    """Write a PNG in the layout of the paper's Fig. 7: one row per candidate image with the query, the
    candidate, its co-attention map for this query and its L2-norm attention. Returns the path.

    ``model``: a built model (else ``model_name``/``checkpoint``, or the index's model when ``index`` is given).
    """
    from matplotlib import colormaps  # noqa: PLC0415
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    if model is None:
        from glimr.models.registry import DEFAULT_MODEL, build_model  # noqa: PLC0415

        if index is not None and model_name is None and checkpoint is None:
            from glimr.index.store import IndexStore  # noqa: PLC0415

            with IndexStore.open(index) as st:
                model_name, checkpoint = st.config.model, st.config.checkpoint
        model = build_model(model_name or DEFAULT_MODEL, checkpoint=checkpoint)
    maps, qimg = coattention_maps(model, query, images, index=index, box=box, scales=scales, max_size=max_size,
                                  temperature=temperature)

    def over(img: Image.Image, heat: np.ndarray) -> np.ndarray:
        rgb = np.asarray(img.convert("RGB"), np.float32) / 255.0
        col = colormaps["jet"](_norm01(heat))[..., :3]
        return ((1 - alpha) * rgb + alpha * col).clip(0, 1)

    rows = len(maps)
    fig = Figure(figsize=(12.8, 3.0 * rows + 0.4), dpi=dpi)
    FigureCanvasAgg(fig)
    titles = ["query" + (" (crop)" if box is not None else ""), "candidate", "co-attention (this query)",
              "L2-norm attention (any query)"]
    for r, m in enumerate(maps):
        panels = [np.asarray(qimg), np.asarray(m.image), over(m.image, m.coattention), over(m.image, m.l2norm)]
        for c, p in enumerate(panels):
            ax = fig.add_subplot(rows, 4, r * 4 + c + 1)
            ax.imshow(p)
            ax.axis("off")
            t = titles[c] if r == 0 else ""
            if c == 1:
                t = (t + "\n" if t else "") + f"{Path(m.path).name}  S={m.score:.3f}"
            ax.set_title(t, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out

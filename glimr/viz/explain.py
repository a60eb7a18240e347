"""Attention heat maps of a model over an image (`glimr explain`).

One panel for the image, then one panel per attention map of the head's `RetrievalOutput.attention`
(GLAM: local_spatial, global_spatial; CiDeR: A and each mask; UGALR: G, O; DPLG: A; DOLG: A). Heads without
attention maps (GeM) get the channel L2 norm of their local feature map ("local_norm") instead.
Maps are upsampled (bilinear) to the image, min-max normalised per panel (CiDeR's masks keep their absolute
[0, 1] scale) and drawn with a colormap over the image. Rendering uses matplotlib's Agg canvas directly (no
pyplot, no display needed).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

ABSOLUTE_SCALE = ("masks",)   # maps whose values already mean something on [0, 1]


def to_tensor(image: Image.Image, size: int) -> tuple[Image.Image, torch.Tensor]:
    """Resize so that the longest side is `size` (aspect kept); return it and a (1, 3, H, W) tensor in
    [0, 1]."""
    w, h = image.size
    s = size / max(w, h)
    resized = image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(resized.convert("RGB"), dtype=np.float32) / 255.0)
    return resized, x.permute(2, 0, 1).unsqueeze(0).contiguous()


@torch.no_grad()
def attention_maps(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run `model` (eval) on one image; return name -> (h, w) maps, a (k, h, w) map split as name[i]."""
    model.eval()
    out = model(x)
    maps: dict[str, torch.Tensor] = {}
    for name, m in out.attention.items():
        m = m[0].float()
        if m.dim() == 3:
            for i in range(m.shape[0]):
                maps[f"{name}[{i}]"] = m[i]
        else:
            maps[name] = m
    if not maps and out.local is not None:
        maps["local_norm"] = out.local[0].float().norm(dim=0)
    return maps


def upsample(m: torch.Tensor, size_hw: tuple[int, int], absolute: bool = False) -> np.ndarray:
    """(h, w) map -> (H, W) array in [0, 1]."""
    up = F.interpolate(m[None, None].float(), size=size_hw, mode="bilinear", align_corners=False)[0, 0]
    if absolute:
        return up.clamp(0, 1).numpy()
    lo, hi = up.min(), up.max()
    if hi - lo <= 1e-12:
        return torch.zeros_like(up).numpy()
    return ((up - lo) / (hi - lo)).numpy()


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a [0, 1] heat map (H, W) over an RGB uint8 image (H, W, 3) with a matplotlib colormap."""
    from matplotlib import colormaps

    colored = colormaps[cmap](heat)[..., :3]
    out = (1 - alpha) * image.astype(np.float32) / 255.0 + alpha * colored
    return (out.clip(0, 1) * 255).astype(np.uint8)


def render(image: Image.Image, maps: dict[str, torch.Tensor], out: str | Path, title: str | None = None,
           alpha: float = 0.5, dpi: int = 100) -> Path:
    """Write a PNG: the image, then one overlay panel per map (at most 4 per row)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    panels = [("image", rgb)] + [
        (name, overlay(rgb, upsample(m, (h, w), absolute=name.split("[")[0] in ABSOLUTE_SCALE), alpha))
        for name, m in maps.items()]
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols, 3.2 * rows * h / w + 0.6 * rows), dpi=dpi)
    FigureCanvasAgg(fig)
    for i, (name, img) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(img)
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def explain(model: torch.nn.Module, image: Image.Image, out: str | Path, size: int = 512,
            title: str | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
    """Heat maps of `model` over `image` (PIL) written to `out` (PNG); returns the path and the raw maps."""
    resized, x = to_tensor(image, size)
    maps = attention_maps(model, x)
    return render(resized, maps, out, title=title), maps

"""Training losses: ArcFace (GLAM, UGALR, DPLG, CiDeR), cross-entropy (UGALR's intermediate supervision) and
the contrastive loss of the GeM paper.

    ArcFace (Deng et al. 2019; UGALR eq. (6), DPLG Sec. 3.4):
        L = -1/N sum_i log( e^{s cos(theta_{y_i} + m)} /
                            (e^{s cos(theta_{y_i} + m)} + sum_{j != y_i} e^{s cos theta_j}) )
        cos theta_j = <x_i / |x_i|, W_j / |W_j|>
      GLAM: m = 0.3 (s not printed: 30 here); UGALR and DPLG: m = 0.15, s = 30 (`margin`, `scale`).
      Where theta_y + m > pi, cos(theta_y + m) would stop decreasing in theta; there, as in the reference
      implementation (insightface), the target logit is cos theta_y - m sin(m) (a linear continuation),
      so the loss stays monotonic. `easy_margin=True` instead applies the margin only where cos theta > 0.
    UGALR eq. (5), intermediate supervision: L_a = cross-entropy of a linear classifier (with bias) on the
      intermediate embedding; UGALR eq. (7): L = L_g + lambda L_a, lambda = 0.6 (`inter_weight`).
    Contrastive (Radenovic et al., TPAMI 2019, eq. (5)):
        L(i, j) = 1/2 ||f_i - f_j||^2                      if i, j match (same label)
                  1/2 max(0, tau - ||f_i - f_j||)^2        otherwise
      over all pairs i < j of the batch, averaged (`margin` tau, default 0.7 as cirtorch's ResNet setting),
      on L2-normalised descriptors.
    Localization (optional, `loc_weight` > 0; not in the papers): instance composites come with the box of
      the pasted object for free (no human label), so an attention map of the head (`loc_map`, e.g. CiDeR's A)
      can be supervised towards it: binary cross-entropy between the map, min-max normalised per image to
      [0, 1] (CiDeR eq. (2)), and the fraction of each map cell covered by the box; only views with a pasted
      object count (a clean view's box is the whole image).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def box_coverage(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 4) boxes (x0, y0, x1, y1) in [0, 1] image coordinates -> (B, h, w) fraction of each cell inside."""
    b = boxes.float()
    grid_x = torch.arange(w + 1, device=b.device, dtype=torch.float32) / w
    grid_y = torch.arange(h + 1, device=b.device, dtype=torch.float32) / h
    ox = torch.minimum(b[:, 2:3], grid_x[None, 1:]) - torch.maximum(b[:, 0:1], grid_x[None, :-1])
    oy = torch.minimum(b[:, 3:4], grid_y[None, 1:]) - torch.maximum(b[:, 1:2], grid_y[None, :-1])
    ox, oy = ox.clamp(min=0) * w, oy.clamp(min=0) * h
    return (oy[:, :, None] * ox[:, None, :]).clamp(0.0, 1.0)


def localization_loss(attention: torch.Tensor, boxes: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """BCE between a (B, h, w) or (B, 1, h, w) attention map (min-max normalised per image) and the coverage
    of the boxes; views whose box is the whole image are left out (0 when none is left)."""
    a = attention.float()
    if a.dim() == 4:
        a = a[:, 0]
    mn, mx = a.amin(dim=(1, 2), keepdim=True), a.amax(dim=(1, 2), keepdim=True)
    a = ((a - mn) / (mx - mn).clamp_min(1e-6)).clamp(eps, 1 - eps)
    cov = box_coverage(boxes, a.shape[1], a.shape[2])
    keep = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) < 0.999
    if not bool(keep.any()):
        return a.sum() * 0.0
    return F.binary_cross_entropy(a[keep], cov[keep])


class ArcFace(nn.Module):
    """ArcFace classifier + loss. `forward(embeddings (N, d), labels (N,))` -> scalar loss."""

    def __init__(self, dim: int, num_classes: int, margin: float = 0.3, scale: float = 30.0,
                 easy_margin: bool = False):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"ArcFace needs at least 2 classes, not {num_classes}")
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.xavier_uniform_(self.weight)
        self.margin, self.scale, self.easy_margin = float(margin), float(scale), easy_margin
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.th = math.cos(math.pi - margin)          # cos theta below th <=> theta + m > pi
        self.mm = math.sin(math.pi - margin) * margin

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        """cos theta_j of every embedding to every class centre, (N, C), in fp32."""
        return F.linear(F.normalize(x.float(), dim=1), F.normalize(self.weight.float(), dim=1))

    def logits(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(x)
        tgt = cos.gather(1, labels.view(-1, 1))
        sin = torch.sqrt((1.0 - tgt * tgt).clamp(min=1e-12))
        phi = tgt * self.cos_m - sin * self.sin_m     # cos(theta_y + m)
        if self.easy_margin:
            phi = torch.where(tgt > 0, phi, tgt)
        else:
            phi = torch.where(tgt > self.th, phi, tgt - self.mm)
        return self.scale * cos.scatter(1, labels.view(-1, 1), phi)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(x, labels), labels)

    def extra_repr(self) -> str:
        return (f"dim={self.weight.shape[1]}, classes={self.weight.shape[0]}, margin={self.margin}, "
                f"scale={self.scale}")


class SoftmaxCE(nn.Module):
    """Linear classifier with bias + cross-entropy (UGALR eq. (5))."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes, bias=True)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.fc(x.float()), labels)


def contrastive_loss(x: torch.Tensor, labels: torch.Tensor, margin: float = 0.7) -> torch.Tensor:
    """GeM-paper contrastive loss over all pairs i < j of a batch of L2-normalised descriptors."""
    x = F.normalize(x.float(), dim=1)
    n = x.shape[0]
    if n < 2:
        return x.sum() * 0.0
    i, j = torch.triu_indices(n, n, offset=1, device=x.device)
    d = (x[i] - x[j]).pow(2).sum(dim=1).clamp(min=1e-12).sqrt()
    same = (labels[i] == labels[j]).float()
    loss = 0.5 * same * d.pow(2) + 0.5 * (1.0 - same) * F.relu(margin - d).pow(2)
    return loss.mean()


class ContrastiveLoss(nn.Module):
    def __init__(self, margin: float = 0.7):
        super().__init__()
        self.margin = float(margin)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(x, labels, self.margin)


class Criterion(nn.Module):
    """The training objective of a retrieval net: a main loss on the global descriptor, plus, when the head
    returns `aux["inter_embedding"]` (UGALR), lambda times the cross-entropy of a classifier on it.

    loss: "arcface" | "contrastive". `loc_weight` > 0 adds `loc_weight` x localization_loss on the head's
    attention map `loc_map` when the batch has boxes. Returns (total loss, {name: value} for the log)."""

    def __init__(self, dim: int, num_classes: int, loss: str = "arcface", margin: float = 0.3,
                 scale: float = 30.0, easy_margin: bool = False, contrastive_margin: float = 0.7,
                 inter_dim: int | None = None,
                 inter_weight: float = 0.6, loc_weight: float = 0.0, loc_map: str = "A"):
        super().__init__()
        if loss == "arcface":
            self.main = ArcFace(dim, num_classes, margin, scale, easy_margin)
        elif loss == "contrastive":
            self.main = ContrastiveLoss(contrastive_margin)
        else:
            raise ValueError(f"loss must be 'arcface' or 'contrastive', not {loss!r}")
        self.loss_name = loss
        self.inter = SoftmaxCE(inter_dim, num_classes) if inter_dim else None
        self.inter_weight = float(inter_weight)
        self.loc_weight, self.loc_map = float(loc_weight), loc_map

    def forward(self, out, labels: torch.Tensor, boxes: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        lg = self.main(out.descriptor, labels)
        parts = {self.loss_name: float(lg.detach())}
        total = lg
        emb = out.aux.get("inter_embedding") if out.aux else None
        if emb is not None:
            if self.inter is None:
                raise RuntimeError("the head returns aux['inter_embedding'] but the criterion has no "
                                   "intermediate classifier (inter_dim)")
            la = self.inter(emb, labels)
            parts["inter_ce"] = float(la.detach())
            total = lg + self.inter_weight * la         # UGALR eq. (7): L = L_g + lambda L_a
        if self.loc_weight > 0 and boxes is not None:
            if self.loc_map not in out.attention:
                raise RuntimeError(f"loss.loc_map={self.loc_map!r}: the head returns the attention maps "
                                   f"{sorted(out.attention)}")
            ll = localization_loss(out.attention[self.loc_map], boxes)
            parts["localization"] = float(ll.detach())
            total = total + self.loc_weight * ll
        parts["loss"] = float(total.detach())
        return total, parts

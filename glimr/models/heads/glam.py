"""GLAM head (Song, Han, Avrithis, WACV 2022: "All the attention you need: global-local, spatial-channel
attention for image retrieval"), attached to the backbone's last feature map F = res5 (c x h x w).

    local channel   A_c^l = sigmoid(conv1d_k(GAP(F)))                (ECA, k = 3)
    local spatial   A_s^l = conv1x1([conv1x1(F'), dil3x3_1(F'), dil3x3_2(F'), dil3x3_3(F')]),  F' = conv1x1(F)
    eq. (1)         F_c^l = F * A_c^l + F
    eq. (2)         F^l   = F_c^l * A_s^l + F_c^l
    eq. (3)         A_c^g = softmax(K_c^T Q_c)          (c x c),  G_c = V_c A_c^g reshaped to c x h x w
    eq. (4)         A_s^g = softmax(K_s^T Q_s)          (hw x hw), G_s = conv1x1(V_s A_s^g)
    eq. (5)         F_c^g = F * G_c                      (no residual, as printed)
    eq. (6)         F^g   = F_c^g * G_s + F_c^g
    eq. (7)         F^gl  = w_l F^l + w_g F^g + w F      ((w_l, w_g, w) = softmax of three learnable scalars)
    GeM(F^gl) -> dropout -> FC (d = 512) -> batch norm -> L2

Paper typos and gaps, and what this file does (each is a constructor argument):
- Eq. (7) prints `w_g F^l`; the second term is `w_g F^g` (DESIGN.md).
- Sec. 3.1 gives dilations 1, 2, 3 (3x3/5x5/7x7 equivalents); Fig. 3's caption says 1, 3, 5.
  `dilations`, default (1, 2, 3) as in the text.
- The reduced width c' of the local and global spatial branches is not given: `reduction` (c' = c // 8).
- No activation is printed for the local spatial map (the last 1x1 conv "reduces the channel dimension to 1"):
  `spatial_activation="none"` (default, as printed) or "sigmoid".
- "softmax over channels" / "over locations" in eqs. (3)/(4) does not say which index: we normalise over
  the key index i of A[i, j] = K_i Q_j, so that every output channel / location j of V A is a convex
  combination of input channels / locations (the non-local convention). No 1/sqrt(c') scale (none printed).
- Dropout rate and the FC/BN/dropout order are not given: dropout (`dropout=0.1`) -> FC (no bias: the batch
  norm right after it would cancel one) -> BatchNorm1d, as in Yokoo et al.'s ResNet-GeM-ArcFace baseline that
  GLAM says it is compatible with.
- `use_local` / `use_global` give the paper's ablations (baseline, +local, +global); eq. (7) then fuses
  only the terms present.
- Not a deviation, a way of computing: `taylor_terms=16` evaluates V_c A_c^g in O(hw c) instead of
  O(hw c^2) by a series exact at float precision (see GlobalChannelAttention); None: the plain product.

Attention maps returned: "local_spatial" = A_s^l (B, h, w); "global_spatial" = the attention each location
receives from all queries, mean_j A_s^g[i, j] (B, h, w) (a (hw x hw) matrix has no single heat map; this one
sums to 1 over the image). `local` = F^gl.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from glimr.models.backbones import Backbone
from glimr.models.output import RetrievalOutput
from glimr.models.pooling import GeM, l2n
from glimr.models.precision import hi, no_autocast




class LocalChannelAttention(nn.Module):
    """ECA-style local channel attention: A_c^l = sigmoid(conv1d_k(GAP(F))), (B, c, 1, 1)."""

    def __init__(self, kernel_size: int = 3):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"the ECA kernel size must be odd, not {kernel_size}")
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        y = x.mean(dim=(2, 3)).view(b, 1, c)
        return torch.sigmoid(self.conv(y)).view(b, c, 1, 1)


class LocalSpatialAttention(nn.Module):
    """Inception-like local spatial attention (GLAM Fig. 3): (B, c, h, w) -> A_s^l (B, 1, h, w)."""

    def __init__(self, channels: int, reduced: int, dilations: Sequence[int] = (1, 2, 3),
                 activation: str = "none"):
        super().__init__()
        if activation not in ("none", "sigmoid"):
            raise ValueError(f"spatial_activation must be 'none' or 'sigmoid', not {activation!r}")
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.pointwise = nn.Conv2d(reduced, reduced, 1)
        self.dilated = nn.ModuleList(nn.Conv2d(reduced, reduced, 3, padding=int(d), dilation=int(d))
                                     for d in dilations)
        self.fuse = nn.Conv2d(reduced * (1 + len(self.dilated)), 1, 1)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.reduce(x)
        a = self.fuse(torch.cat([self.pointwise(r)] + [conv(r) for conv in self.dilated], dim=1))
        return torch.sigmoid(a) if self.activation == "sigmoid" else a


class GlobalChannelAttention(nn.Module):
    """GLAM Fig. 4: Q_c, K_c = sigmoid(conv1d(GAP(F))) (1 x c); A_c^g = softmax(K_c^T Q_c) (c x c);
    G_c = V_c A_c^g with V_c = F reshaped to hw x c. Returns (G_c (B, c, h, w), A_c^g (B, c, c)).

    `taylor_terms` (default 16): V_c A_c^g costs hw c^2 multiply-adds as a matrix product (2 GFLOPs for
    ResNet's 2048 channels at 512 x 512, a fifth of Lite0's whole cost). Because K_i Q_j lies in (0, 1)
    (sigmoids), exp(K_i Q_j) = sum_n K_i^n Q_j^n / n! converges fast, and
    V_c exp(K^T Q) = sum_{n <= N} (V_c K^n / n!) Q^n costs 2 (N + 1) hw c: the truncation error is below
    e / (N + 1)! (7e-15 relative for N = 16), exact at float precision. So is
    the normaliser Z_j = sum_i exp(K_i Q_j) = sum_n (sum_i K_i^n / n!) Q_j^n by the same series, so that no
    c x c work is left; A_c^g itself is formed (exactly, c^2 work) only when asked for. `taylor_terms=None`:
    the plain product V_c A_c^g."""

    def __init__(self, kernel_size: int = 3, taylor_terms: int | None = 16):
        super().__init__()
        self.query = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.key = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.taylor_terms = taylor_terms

    def forward(self, x: torch.Tensor, with_attention: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(G_c, A_c^g); with `with_attention=False` (and the series on), A_c^g is not formed and None comes
        back: then no c x c work is left (4 ms for Lite0's 1280 channels, 14 ms for ResNet's 2048 here)."""
        b, c, h, w = x.shape
        y = x.mean(dim=(2, 3)).view(b, 1, c)
        q = hi(torch.sigmoid(self.query(y)))             # (B, 1, c)
        k = hi(torch.sigmoid(self.key(y)))               # (B, 1, c)
        v = x.flatten(2).transpose(1, 2)                     # V_c: (B, hw, c)
        att = None
        if with_attention or self.taylor_terms is None:
            # GLAM eq. (3): A_c^g = softmax(K_c^T Q_c); A[i, j] = K_i Q_j, normalised over i
            # the outer product as a broadcast product: stays fp32 under autocast (a matmul would run in bf16)
            att = torch.softmax(k.transpose(1, 2) * q, dim=1)                      # (B, c, c)
        if self.taylor_terms is None:
            g = torch.bmm(v, att.to(v.dtype))                # V_c A_c^g: (B, hw, c)
        else:
            # V_c A_c^g = (sum_n (V_c K^n / n!) Q^n) / Z_j, Z_j = sum_i exp(K_i Q_j) = sum_n (sum_i K_i^n / n!) Q_j^n
            # (K Q in (0, 1): both series are exact at float precision)
            n = torch.arange(self.taylor_terms + 1, device=x.device, dtype=k.dtype)
            kn = k.transpose(1, 2).pow(n) / torch.exp(torch.lgamma(n + 1))        # (B, c, N+1): K_i^n / n!
            qn = q.pow(n.view(-1, 1))                                              # (B, N+1, c): Q_j^n
            z = torch.bmm(kn.sum(dim=1, keepdim=True), qn)                         # (B, 1, c): Z_j
            g = torch.bmm(torch.bmm(v, kn.to(v.dtype)), (qn / z).to(v.dtype))
        # (B, hw, c) is (B, h, w, c) in memory: as (B, c, h, w) that is channels-last, F's layout in extraction
        # (a contiguous NCHW copy would make F * G_c of eq. (5) mix layouts, several times slower)
        return g.view(b, h, w, c).permute(0, 3, 1, 2), att


class GlobalSpatialAttention(nn.Module):
    """GLAM Fig. 5 (non-local): Q_s, K_s, V_s = 1x1 convs to c' (c' x hw); A_s^g = softmax(K_s^T Q_s)
    (hw x hw); G_s = conv1x1(V_s A_s^g) back to c. Returns (G_s (B, c, h, w), A_s^g (B, hw, hw))."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.query = nn.Conv2d(channels, reduced, 1)
        # a key bias adds K-independent b.Q_j to every logit of column j: it cancels in the softmax over i
        self.key = nn.Conv2d(channels, reduced, 1, bias=False)
        self.value = nn.Conv2d(channels, reduced, 1)
        self.out = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = x.shape
        q = self.query(x).flatten(2)                         # (B, c', hw)
        k = self.key(x).flatten(2)
        v = self.value(x).flatten(2)
        # GLAM eq. (4): A_s^g = softmax(K_s^T Q_s); A[i, j] = K_i . Q_j, normalised over locations i
        with no_autocast(x):                                 # logits and softmax in fp32, also under autocast
            att = torch.softmax(torch.bmm(hi(k.transpose(1, 2)), hi(q)), dim=1)   # (B, hw, hw)
        y = torch.bmm(v, att.to(v.dtype)).view(b, -1, h, w)                  # V_s A_s^g: (B, c', h, w)
        return self.out(y), att


class GLAMHead(nn.Module):
    """GLAM on res5. kwargs (defaults): dim=512, reduction=8 (c' = c // reduction), dilations=(1, 2, 3),
    eca_kernel=3, spatial_activation="none", dropout=0.1, p=3.0, learn_p=True, use_local=True,
    use_global=True, taylor_terms=16 (the fast exact form of V_c A_c^g; None: plain matrix product).
    See the module docstring for the paper gaps each one settles."""

    def __init__(self, backbone: Backbone, dim: int = 512, reduction: int = 8,
                 dilations: Sequence[int] = (1, 2, 3), eca_kernel: int = 3, spatial_activation: str = "none",
                 dropout: float = 0.1, p: float = 3.0,
                 learn_p: bool = True, use_local: bool = True, use_global: bool = True,
                 taylor_terms: int | None = 16):
        super().__init__()
        c = backbone.channels["res5"]
        cr = max(1, c // reduction)
        self.use_local, self.use_global = use_local, use_global
        if use_local:
            self.local_channel = LocalChannelAttention(eca_kernel)
            self.local_spatial = LocalSpatialAttention(c, cr, dilations, spatial_activation)
        if use_global:
            self.global_channel = GlobalChannelAttention(eca_kernel, taylor_terms)
            self.global_spatial = GlobalSpatialAttention(c, cr)
        n_terms = 1 + int(use_local) + int(use_global)
        # eq. (7) fusion logits, order (local, global, original); zeros = equal weights at the start
        self.fusion = nn.Parameter(torch.zeros(n_terms)) if n_terms > 1 else None
        self.pool = GeM(p, learnable=learn_p)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c, dim, bias=False)
        self.bn = nn.BatchNorm1d(dim)
        self.dim = dim

    def attend(self, f: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """F -> (F^gl, attention maps)."""
        b, _, h, w = f.shape
        terms, maps = [], {}
        if self.use_local:
            a_cl = self.local_channel(f)
            f_cl = f * a_cl.to(f.dtype) + f                  # GLAM eq. (1)
            a_sl = self.local_spatial(f)
            f_l = f_cl * a_sl + f_cl                         # GLAM eq. (2)
            terms.append(f_l)
            maps["local_spatial"] = a_sl[:, 0]
        if self.use_global:
            g_c, _ = self.global_channel(f, with_attention=False)   # GLAM eq. (3)
            f_cg = f * g_c                                   # GLAM eq. (5), no residual
            g_s, a_sg = self.global_spatial(f)               # GLAM eq. (4)
            f_g = f_cg * g_s + f_cg                          # GLAM eq. (6)
            terms.append(f_g)
            maps["global_spatial"] = a_sg.mean(dim=2).view(b, h, w)
        terms.append(f)
        if self.fusion is None:
            return f, maps
        wts = torch.softmax(hi(self.fusion), dim=0)
        # GLAM eq. (7), with the printed typo fixed: F^gl = w_l F^l + w_g F^g + w F
        f_gl = sum(wt.to(t.dtype) * t for wt, t in zip(wts, terms))
        return f_gl, maps

    def forward(self, res4: torch.Tensor, res5: Callable[[torch.Tensor], torch.Tensor]) -> RetrievalOutput:
        f = res5(res4)
        f_gl, maps = self.attend(f)
        g = self.fc(self.dropout(self.pool(f_gl)))
        g = self.bn(hi(g))                               # batch norm in fp32 (also under bf16 autocast)
        return RetrievalOutput(descriptor=l2n(hi(g)).float(), attention=maps, local=f_gl)

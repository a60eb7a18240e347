"""CiDeR head (Song et al., CVPR 2024: "On train-test class overlap and detection for image retrieval"):
single-stage detect-to-retrieve, f = f^p o f^l o f^c o f^e o f^b (eq. (6)), on the backbone's last map
F = res5.

    f^e  backbone enhancement:  "eca" | "nonlocal" | "se" (timm layers) | "ge" (gather-excite) | "none"
    f^c  selective context:     "aspp" | "sk" (selective kernel) | "none"
    f^l  attentional localization (Sec. 4):
         eq. (1)  A = eta(zeta(f(F)))         f = 1x1 conv to one channel, zeta = softplus
         eq. (2)  eta(X) = (X - min X) / (max X - min X)        per image, over positions
         eq. (3)  M_i(p) = beta if A(p) < tau_i else 1          i = 1..T
         eq. (4)  F^l = H(M_1 * F, ..., M_T * F)
         eq. (5)  H(F_1..F_T) = sum_i w_i F_i / sum_i w_i,  w_i = softplus(alpha_i), alpha_i learnable
    f^p  GeM (+ optional whitening FC: `dim`), L2. The paper's CiDeR descriptor is the 2048-d GeM vector.

Paper typos and gaps, and what this file does (each is a constructor argument):
- Eq. (3)'s text prints beta = min(0, max(1, eps)); it means clipping eps to [0, 1]: beta = clip(eps, 0, 1)
  (DESIGN.md). eps ~ N(0.1, 0.9) (Table 8 default): 0.9 is read as the standard deviation
  (`beta_mean=0.1, beta_std=0.9`). One eps per image and position p ("for each p"), shared by the T masks.
- The random background is for training only; at inference beta is fixed: `beta_fixed=0.0` (also used in
  training when `beta_random=False`, Table 8's "Fixed (0.0)" / "Fixed (0.5)" rows).
- T = 2 masks (Table 9); the thresholds tau_i are not given in the text (the appendix is not available):
  `thresholds`, default i / (T + 1), i.e. (1/3, 2/3) for T = 2. They are constructor arguments, not learned.
- Eq. (3) is piecewise constant in A, so the localisation conv f would get no gradient and A would never be
  learned, while the paper shows A learned without location supervision (Fig. 5). `mask_grad="ste"` (default):
  straight-through estimator: the forward value is exactly eq. (3); the backward pass uses the gradient of
  beta + (1 - beta) * sigmoid((A - tau_i) / `ste_temperature`). `mask_grad="none"`: the printed, gradient-free
  masks.
- The appendix choices of f^e, f^c and of their widths are not available: `enhancement="eca"` (ECA-Net with
  its adaptive kernel size, `eca_kernel=None`), `context="aspp"` with atrous rates (3, 6, 9) (DeepLab's
  6, 12, 18 at stride 16, halved for the stride-32 map), branch width c // 32 (`context_width`: 64 for
  ResNet-50, 40 for Lite0, which keeps the head's cost near a fifth of Lite0's), image-pooling branch,
  BN + ReLU, projected back to c; "sk": timm's SelectiveKernel (3x3 and dilated 3x3 paths, `sk_groups=32`).
  Both keep the shape w x h x d, as eq. (6) requires, and are added to F (`context_residual=True`: the
  paper does not say; this way the pretrained features still reach the localization and pooling).
  "ge" is gather-excite GE-theta with a local extent (`ge_extent=8`), written here (timm 1.0's variants
  with parameters fail to build); "nonlocal" is timm's NL block, whose output BN starts at zero (identity).

Attention maps returned: "A" (B, h, w) and "masks" (B, T, h, w) (with this call's beta). `local` = F^l.

CiDeR-FT (fine-tuning mode: "we freeze the backbone while only training the head"): build the net, then call
`freeze_backbone(net)`; see its docstring.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import Conv2dNormActivation

from glimr.models.backbones import Backbone
from glimr.models.output import RetrievalOutput
from glimr.models.pooling import GeM, l2n
from glimr.models.precision import hi


ENHANCEMENTS = ("eca", "nonlocal", "se", "ge", "none")
CONTEXTS = ("aspp", "sk", "none")


class GatherExcite(nn.Module):
    """Gather-excite GE-theta (Hu et al., NeurIPS 2018): gather with log2(extent) depthwise 3x3 stride-2 convs
    (BN between, ReLU between), excite = nearest upsampling to the input size + sigmoid; x * gate.
    (timm 1.0's GatherExcite cannot build its parametric variants: `*dd` instead of `**dd`.)"""

    def __init__(self, channels: int, extent: int = 8):
        super().__init__()
        n = max(1, int(math.log2(extent)))
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False),
                       nn.BatchNorm2d(channels)]
            if i < n - 1:
                layers.append(nn.ReLU(inplace=True))
        self.gather = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = F.interpolate(self.gather(x), size=x.shape[-2:], mode="nearest")
        return x * torch.sigmoid(g)


def build_enhancement(kind: str, channels: int, eca_kernel: int | None = None, se_reduction: int = 16,
                      ge_extent: int = 8) -> nn.Module:
    """f^e: a shape-preserving channel/non-local block (timm's, except gather-excite)."""
    from timm.layers import EcaModule, NonLocalAttn, SEModule

    if kind == "eca":
        # channels given + no kernel: ECA-Net's adaptive kernel size k = odd(|log2(c) + 1| / 2)
        return EcaModule(channels=None if eca_kernel else channels, kernel_size=eca_kernel or 3)
    if kind == "se":
        return SEModule(channels, rd_ratio=1.0 / se_reduction)
    if kind == "ge":
        return GatherExcite(channels, ge_extent)
    if kind == "nonlocal":
        return NonLocalAttn(channels)  # embedded-Gaussian NL block with residual, zero-initialised output BN
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"enhancement must be one of {ENHANCEMENTS}, not {kind!r}")


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLab v3) that keeps the channel count: a 1x1 branch, one 3x3 branch
    per atrous rate and an image-pooling branch (each conv-BN-ReLU to `width`, the pooling branch without BN
    so that batches of one train), concatenated, 1x1 conv-BN-ReLU back to `channels`."""

    def __init__(self, channels: int, width: int, rates: Sequence[int] = (3, 6, 9)):
        super().__init__()
        self.branches = nn.ModuleList(
            [Conv2dNormActivation(channels, width, 1)]
            + [Conv2dNormActivation(channels, width, 3, dilation=int(r)) for r in rates])
        self.pool = nn.Conv2d(channels, width, 1)
        self.project = Conv2dNormActivation(width * (len(self.branches) + 1), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pooled = F.relu(self.pool(x.mean(dim=(2, 3), keepdim=True))).expand(-1, -1, h, w)
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled.to(x.dtype)], dim=1))


def build_context(kind: str, channels: int, width: int | None = None, rates: Sequence[int] = (3, 6, 9),
                  sk_groups: int = 32) -> nn.Module | None:
    """f^c: a shape-preserving multi-receptive-field block."""
    if kind == "aspp":
        return ASPP(channels, width or max(16, channels // 32), rates)
    if kind == "sk":
        from timm.layers import SelectiveKernel

        groups = math.gcd(sk_groups, channels // 2)  # each of the 2 paths reads channels // 2 inputs
        return SelectiveKernel(channels, channels, groups=groups)
    if kind == "none":
        return None
    raise ValueError(f"context must be one of {CONTEXTS}, not {kind!r}")


def minmax(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """CiDeR eq. (2): linearly normalise each map of (B, h, w) to [0, 1] (over its positions)."""
    mn = x.amin(dim=(-2, -1), keepdim=True)
    mx = x.amax(dim=(-2, -1), keepdim=True)
    return (x - mn) / (mx - mn).clamp_min(eps)


class AttentionalLocalization(nn.Module):
    """CiDeR Sec. 4, eqs. (1)-(5): F (B, d, h, w) -> (F^l, A (B, h, w), masks (B, T, h, w))."""

    def __init__(self, channels: int, thresholds: Sequence[float], beta_random: bool = True,
                 beta_mean: float = 0.1, beta_std: float = 0.9, beta_fixed: float = 0.0,
                 mask_grad: str = "ste", ste_temperature: float = 0.1):
        super().__init__()
        if mask_grad not in ("ste", "none"):
            raise ValueError(f"mask_grad must be 'ste' or 'none', not {mask_grad!r}")
        tau = [float(t) for t in thresholds]
        if not tau or any(not 0.0 <= t <= 1.0 for t in tau):
            raise ValueError(f"thresholds must be a non-empty list of values in [0, 1], not {thresholds!r}")
        self.f = nn.Conv2d(channels, 1, 1)                         # f^l of eq. (1)
        self.alpha = nn.Parameter(torch.zeros(len(tau)))          # eq. (5): w_i = softplus(alpha_i)
        self.register_buffer("tau", torch.tensor(tau), persistent=False)
        self.beta_random, self.beta_mean, self.beta_std = beta_random, beta_mean, beta_std
        self.beta_fixed = beta_fixed
        self.mask_grad, self.ste_temperature = mask_grad, ste_temperature

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        # CiDeR eq. (1): A = eta(zeta(f(F))), in fp32 (min-max over small differences)
        return minmax(F.softplus(hi(self.f(x))[:, 0]))       # CiDeR eq. (2) inside minmax

    def background(self, a: torch.Tensor) -> torch.Tensor | float:
        """beta: clip(eps, 0, 1), eps ~ N(beta_mean, beta_std^2) per image and position, in training with
        beta_random; else the fixed value."""
        if self.training and self.beta_random:
            eps = torch.randn_like(a) * self.beta_std + self.beta_mean
            return eps.clamp(0.0, 1.0).unsqueeze(1)               # (B, 1, h, w): shared by the T masks
        return self.beta_fixed

    def masks(self, a: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
        tau = self.tau.view(1, -1, 1, 1)
        a = a.unsqueeze(1)                                         # (B, 1, h, w)
        beta_t = torch.as_tensor(beta, dtype=a.dtype, device=a.device)
        # CiDeR eq. (3): M_i(p) = beta if A(p) < tau_i else 1
        hard = torch.where(a < tau, beta_t, torch.ones((), dtype=a.dtype, device=a.device))
        if self.mask_grad == "none":
            return hard
        soft = beta_t + (1.0 - beta_t) * torch.sigmoid((a - tau) / self.ste_temperature)
        return hard + (soft - soft.detach())                      # value: eq. (3); gradient: the relaxation

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.attention(x)
        m = self.masks(a, self.background(a))                     # (B, T, h, w)
        w = F.softplus(hi(self.alpha))
        # CiDeR eqs. (4)-(5): F^l = sum_i w_i (M_i * F) / sum_i w_i = (sum_i w_i M_i / sum_i w_i) * F
        fused = (m * w.view(1, -1, 1, 1)).sum(dim=1, keepdim=True) / w.sum()
        return x * fused.to(x.dtype), a, m


class CiDeRHead(nn.Module):
    """CiDeR on res5. kwargs (defaults): enhancement="eca", context="aspp", num_masks=2, thresholds=None
    (= i/(T+1)), beta_random=True, beta_mean=0.1, beta_std=0.9, beta_fixed=0.0, mask_grad="ste",
    ste_temperature=0.1, p=3.0, learn_p=True, dim=None (no whitening: the descriptor is GeM's c-d vector,
    2048 for ResNet), eca_kernel=None, se_reduction=16, context_width=None (c // 32), aspp_rates=(3, 6, 9),
    sk_groups=32, context_residual=True, use_localization=True (False: the "SC + BE" ablation of Table 7),
    ge_extent=8 (gather-excite GE-theta extent)."""

    def __init__(self, backbone: Backbone, enhancement: str = "eca", context: str = "aspp",
                 num_masks: int = 2, thresholds: Sequence[float] | None = None, beta_random: bool = True,
                 beta_mean: float = 0.1, beta_std: float = 0.9, beta_fixed: float = 0.0,
                 mask_grad: str = "ste", ste_temperature: float = 0.1, p: float = 3.0, learn_p: bool = True,
                 dim: int | None = None, eca_kernel: int | None = None, se_reduction: int = 16,
                 context_width: int | None = None, aspp_rates: Sequence[int] = (3, 6, 9), sk_groups: int = 32,
                 context_residual: bool = True, use_localization: bool = True, ge_extent: int = 8):
        super().__init__()
        c = backbone.channels["res5"]
        if thresholds is None:
            thresholds = [i / (num_masks + 1) for i in range(1, num_masks + 1)]
        elif len(thresholds) != num_masks:
            raise ValueError(f"got {len(thresholds)} thresholds for num_masks={num_masks}")
        self.enhance = build_enhancement(enhancement, c, eca_kernel, se_reduction, ge_extent)
        self.context = build_context(context, c, context_width, aspp_rates, sk_groups)
        self.context_residual = context_residual
        self.localize = AttentionalLocalization(c, thresholds, beta_random, beta_mean, beta_std, beta_fixed,
                                                mask_grad, ste_temperature) if use_localization else None
        self.pool = GeM(p, learnable=learn_p)
        self.whiten = nn.Linear(c, dim) if dim else None
        self.dim = dim or c

    def forward(self, res4: torch.Tensor, res5: Callable[[torch.Tensor], torch.Tensor]) -> RetrievalOutput:
        f = self.enhance(res5(res4))                               # f^e o f^b
        if self.context is not None:                               # f^c
            f = f + self.context(f) if self.context_residual else self.context(f)
        maps = {}
        if self.localize is not None:                              # f^l
            f, a, m = self.localize(f)
            maps = {"A": a, "masks": m}
        g = self.pool(f)                                           # f^p
        if self.whiten is not None:
            g = self.whiten(g)
        return RetrievalOutput(descriptor=l2n(hi(g)).float(), attention=maps, local=f)


def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """`train()` of a frozen backbone: always eval (BatchNorm statistics stay fixed), whatever `mode` is."""
    return nn.Module.train(self, False)


def freeze_backbone(net: nn.Module) -> int:
    """CiDeR-FT: freeze `net.backbone` so that only the head trains (CiDeR Sec. 5.1, "we freeze the backbone
    while only training the head in the second stage"; the paper trains nothing of the backbone, and the
    backbone enhancement f^e belongs to the head here, so it does train).

    Sets requires_grad=False on every backbone parameter and puts the backbone, BatchNorm included, in eval
    mode for good: its `train()` is replaced so that a later `net.train()` leaves it in eval mode (running
    statistics are neither used from the batch nor updated). Build the optimizer afterwards from the
    parameters that still require grad. Returns the number of frozen parameters (scalars). The replacement
    lives on this instance only: a checkpoint reloaded later is unfrozen again (call this again)."""
    bb = net.backbone
    n = 0
    for prm in bb.parameters():
        prm.requires_grad_(False)
        n += prm.numel()
    bb.train = _frozen_train.__get__(bb, type(bb))
    nn.Module.train(bb, False)
    return n

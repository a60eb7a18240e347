"""CiDeR head: eqs. (1)-(5) against direct, slow computations; the random mask background; CiDeR-FT."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from reference_ops import bn_relu_ref, conv_ref

from glimr.models.heads.cider import CONTEXTS, ENHANCEMENTS, CiDeRHead, freeze_backbone

C, H, W = 5, 4, 6


def npy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def make_head(**kw) -> CiDeRHead:
    torch.manual_seed(0)
    h = CiDeRHead(SimpleNamespace(channels={"res4": 3, "res5": C}), enhancement="none", context="none", **kw)
    with torch.no_grad():
        h.localize.f.weight.normal_()
        h.localize.f.bias.normal_()
        h.localize.alpha.copy_(torch.tensor([-0.5, 1.5]))
    return h.double()


@pytest.fixture
def feat():
    torch.manual_seed(1)
    return torch.rand(2, C, H, W, dtype=torch.float64)


def attention_ref(h, f):
    """eqs. (1)-(2) for one image, position by position."""
    w, b = npy(h.localize.f.weight)[0, :, 0, 0], npy(h.localize.f.bias)[0]
    s = np.zeros((H, W))
    for y in range(H):
        for x in range(W):
            s[y, x] = math.log1p(math.exp(float(w @ f[:, y, x] + b)))       # zeta(f(F)), softplus
    return (s - s.min()) / (s.max() - s.min())                             # eta: min-max to [0, 1]


def masks_ref(a, thresholds, beta):
    """eq. (3): M_i(p) = beta(p) if A(p) < tau_i else 1."""
    beta = np.broadcast_to(beta, a.shape)
    h, w = a.shape
    return np.array([[[beta[y, x] if a[y, x] < t else 1.0 for x in range(w)] for y in range(h)]
                     for t in thresholds])


def fusion_ref(f, masks, alpha):
    """eqs. (4)-(5): F^l = sum_i w_i (M_i * F) / sum_i w_i, w_i = softplus(alpha_i)."""
    w = [math.log1p(math.exp(a)) for a in alpha]
    return sum(w[i] * (masks[i][None] * f) for i in range(len(w))) / sum(w)


def test_eq1_eq2_attention_map(feat):
    h = make_head().eval()
    a = h.localize.attention(feat)
    for b in range(2):
        ref = attention_ref(h, npy(feat[b]))
        np.testing.assert_allclose(npy(a[b]), ref, rtol=1e-9, atol=1e-12)
        assert a[b].min().item() == 0.0 and a[b].max().item() == pytest.approx(1.0)


def test_eq3_eq4_eq5_masks_and_fusion_at_inference(feat):
    h = make_head(thresholds=(0.3, 0.7), beta_fixed=0.25).eval()
    out = h(None, lambda _: feat)
    for b in range(2):
        a = attention_ref(h, npy(feat[b]))
        m = masks_ref(a, (0.3, 0.7), 0.25)
        np.testing.assert_allclose(npy(out.attention["masks"][b]), m, rtol=0, atol=0)
        np.testing.assert_allclose(npy(out.local[b]), fusion_ref(npy(feat[b]), m, [-0.5, 1.5]), rtol=1e-9)
        p = h.pool.p.item()
        g = (np.clip(fusion_ref(npy(feat[b]), m, [-0.5, 1.5]), 1e-6, None) ** p).mean(axis=(1, 2)) ** (1 / p)
        np.testing.assert_allclose(npy(out.descriptor[b]), g / np.linalg.norm(g), rtol=1e-5)
    assert out.descriptor.shape == (2, C)                      # no whitening: the d-dim GeM vector


def test_eq3_eq4_with_random_background_in_training(feat):
    h = make_head().train()
    torch.manual_seed(5)
    out = h(None, lambda _: feat)
    m = npy(out.attention["masks"])
    for b in range(2):
        a = attention_ref(h, npy(feat[b]))
        assert a.min() < 1 / 3 < a.max()
        bg = a < np.array([1 / 3, 2 / 3])[:, None, None]                   # default thresholds i / (T + 1)
        np.testing.assert_array_equal(m[b][~bg], 1.0)
        beta = m[b, 1]                                                     # mask 2 has the widest background
        # one beta(p) per position, shared by the T masks
        np.testing.assert_allclose(m[b, 0][bg[0]], beta[bg[0]])
        np.testing.assert_allclose(npy(out.local[b]), fusion_ref(npy(feat[b]), m[b], [-0.5, 1.5]), rtol=1e-9)


def test_background_random_in_training_fixed_at_inference():
    h = make_head(beta_fixed=0.0)
    al = h.localize
    a = torch.zeros(1, 200, 200, dtype=torch.float64)                     # all background
    al.train()
    b1, b2 = al.background(a), al.background(a)
    assert not torch.equal(b1, b2)                                         # random in training
    assert b1.min() >= 0 and b1.max() <= 1                                # beta = clip(eps, 0, 1)
    # eps ~ N(0.1, 0.9^2): P(beta = 0) = Phi(-0.1/0.9), P(beta = 1) = 1 - Phi(1), mean in between
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    assert (b1 == 0).double().mean().item() == pytest.approx(phi(-0.1 / 0.9), abs=0.02)
    assert (b1 == 1).double().mean().item() == pytest.approx(1 - phi(1.0), abs=0.02)
    al.eval()
    assert al.background(a) == 0.0
    m1 = al.masks(al.attention(torch.rand(1, C, H, W, dtype=torch.float64)), al.background(a))
    assert set(np.unique(npy(m1))) <= {0.0, 1.0}                           # fixed beta at inference
    h2 = make_head(beta_random=False, beta_fixed=0.5).train()
    assert h2.localize.background(a) == 0.5                                # Table 8's "Fixed (0.5)"


def test_eval_deterministic_and_training_random(feat):
    h = make_head().eval()
    o1, o2 = h(None, lambda _: feat), h(None, lambda _: feat)
    assert torch.equal(o1.descriptor, o2.descriptor)
    assert torch.equal(o1.attention["masks"], o2.attention["masks"])
    h.train()
    t1, t2 = h(None, lambda _: feat), h(None, lambda _: feat)
    assert not torch.equal(t1.attention["masks"], t2.attention["masks"])


def test_straight_through_masks_train_the_localisation_conv(feat):
    for mode, expect_grad in (("ste", True), ("none", False)):
        h = make_head(mask_grad=mode).train()
        out = h(None, lambda _: feat)
        (out.descriptor * torch.randn_like(out.descriptor)).sum().backward()
        g = h.localize.f.weight.grad
        assert (g is not None and g.abs().max() > 0) == expect_grad, mode
        assert h.localize.alpha.grad.abs().max() > 0


@pytest.mark.parametrize("mode", ["ste", "none"])
def test_mask_forward_value_is_eq3_in_training(feat, mode):
    """In training, with or without the straight-through gradient, the masks' forward value is eq. (3)
    exactly (fp64: equal, not close): beta below the threshold, 1 at or above it."""
    h = make_head(mask_grad=mode, beta_random=False, beta_fixed=0.25).train()
    m = npy(h(None, lambda _: feat).attention["masks"])
    for b in range(feat.shape[0]):
        a = attention_ref(h, npy(feat[b]))
        want = masks_ref(a, list(npy(h.localize.tau)), 0.25)
        assert np.array_equal(m[b], want), mode


def test_straight_through_gradient_is_the_sigmoid_relaxation():
    """d M_i / d A = (1 - beta) sigma'((A - tau_i) / t) / t: the gradient of the relaxation
    beta + (1 - beta) sigma((A - tau_i) / t), while the value stays eq. (3) (fp64, rel. 1e-12)."""
    h = make_head(mask_grad="ste", ste_temperature=0.1).double()
    a = torch.linspace(0, 1, 13, dtype=torch.float64).view(1, 1, 13).repeat(1, 2, 1).requires_grad_(True)
    beta = 0.3
    m = h.localize.masks(a, beta)                       # (1, T=2, 2, 13)
    c = torch.arange(m.numel(), dtype=torch.float64).view_as(m) / m.numel()
    (m * c).sum().backward()
    av, t = npy(a)[0], 0.1
    taus = list(npy(h.localize.tau))                    # 1/3, 2/3 as stored (a float32 buffer)
    want = np.zeros_like(av)
    for i, tau in enumerate(taus):
        z = (av - tau) / t
        sig = 1 / (1 + np.exp(-z))
        want += npy(c)[0, i] * (1 - beta) * sig * (1 - sig) / t
    assert np.allclose(npy(a.grad)[0], want, rtol=1e-12, atol=1e-15)
    assert np.array_equal(npy(m)[0], masks_ref(av, taus, beta))   # the value: eq. (3)


@pytest.mark.parametrize("enhancement", ENHANCEMENTS)
@pytest.mark.parametrize("context", CONTEXTS)
def test_components_keep_shape(enhancement, context):
    h = CiDeRHead(SimpleNamespace(channels={"res4": 8, "res5": 64}), enhancement=enhancement, context=context)
    h.eval()
    f = torch.rand(2, 64, 5, 6)
    out = h(None, lambda _: f)
    assert out.local.shape == f.shape and out.descriptor.shape == (2, 64)
    assert torch.isfinite(out.descriptor).all()


def test_bad_arguments():
    bb = SimpleNamespace(channels={"res4": 8, "res5": 16})
    for kw in ({"enhancement": "cbam"}, {"context": "fpn"}, {"thresholds": (0.5,)},
               {"thresholds": (0.2, 1.5)}, {"mask_grad": "gumbel"}):
        with pytest.raises(ValueError):
            CiDeRHead(bb, **kw)
    assert CiDeRHead(bb, dim=4).dim == 4 and CiDeRHead(bb).dim == 16


def test_freeze_backbone_trains_only_the_head():
    from glimr.models.registry import build_model

    net = build_model("cider-lite0", weights="none")
    n = freeze_backbone(net)
    assert n == sum(p.numel() for p in net.backbone.parameters()) > 0
    net.train()
    assert net.head.training and not net.backbone.training
    assert not any(m.training for m in net.backbone.modules())            # BatchNorm stays in eval
    bn = next(m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    out = net(torch.rand(2, 3, 64, 96))
    (out.descriptor * torch.randn_like(out.descriptor)).sum().backward()
    assert torch.equal(bn.running_mean, before)
    assert all(p.grad is None for p in net.backbone.parameters())
    assert all(p.grad is not None for p in net.head.parameters())


def test_eca_enhancement_against_the_formula(randomize_bn):
    """f^e = ECA-Net: x * sigmoid(conv1d_k(GAP(x)) over the channel axis, zero padding, no bias), with the
    adaptive kernel k = odd(|(log2 c + 1) / 2|) (float64, rel. 1e-9)."""
    for c, k_want in ((64, 3), (512, 5), (1280, 5), (2048, 7)):
        t = int(abs((math.log2(c) + 1) / 2))
        assert (t if t % 2 else t + 1) == k_want
        h = CiDeRHead(SimpleNamespace(channels={"res4": 8, "res5": c}), enhancement="eca", context="none",
                      use_localization=False)
        assert h.enhance.conv.kernel_size == (k_want,)
    h = CiDeRHead(SimpleNamespace(channels={"res4": 8, "res5": 64}), enhancement="eca", context="none",
                  use_localization=False).double().eval()
    torch.manual_seed(5)
    x = torch.rand(2, 64, 3, 4, dtype=torch.float64)
    out = npy(h.enhance(x))
    w = npy(h.enhance.conv.weight)[0, 0]                              # (k,)
    k = len(w)
    for b in range(2):
        v = npy(x[b]).mean(axis=(1, 2))                                # GAP
        vp = np.pad(v, (k // 2, k // 2))
        z = np.array([sum(w[j] * vp[i + j] for j in range(k)) for i in range(64)])
        gate = 1 / (1 + np.exp(-z))
        np.testing.assert_allclose(out[b], npy(x[b]) * gate[:, None, None], rtol=1e-9)


def test_aspp_context_and_head_composition_against_direct_computations(randomize_bn):
    """f^c = ASPP (a 1x1 branch, a 3x3 branch per atrous rate, an image-pooling branch; each conv-BN-ReLU to
    c // 32 (>= 16) channels, the pooling branch conv + ReLU; concatenated; 1x1 conv-BN-ReLU back to c), added
    to F; then the head is eq. (6): GeM(f^l(F_e + f^c(F_e))), F_e = f^e(F). float64, rel. 1e-6 (GeM in fp32)."""
    c = 64
    torch.manual_seed(6)
    h = CiDeRHead(SimpleNamespace(channels={"res4": 8, "res5": c}), enhancement="eca", context="aspp")
    randomize_bn(h)
    h = h.double().eval()
    aspp = h.context
    width = max(16, c // 32)
    assert [b[0].dilation for b in aspp.branches] == [(1, 1), (3, 3), (6, 6), (9, 9)]
    x = torch.rand(2, c, 5, 6, dtype=torch.float64)
    fe = h.enhance(x)                                                  # f^e: checked by the test above
    out = h(None, lambda _: x)
    for b in range(2):
        f = npy(fe[b])
        parts = [bn_relu_ref(conv_ref(f, npy(br[0].weight), dilation=br[0].dilation[0]), br[1])
                 for br in aspp.branches]
        pooled = np.maximum(npy(aspp.pool.weight)[:, :, 0, 0] @ f.mean(axis=(1, 2)) + npy(aspp.pool.bias), 0)
        parts.append(np.broadcast_to(pooled[:, None, None], (width, 5, 6)))
        cat = np.concatenate(parts)
        proj = bn_relu_ref(conv_ref(cat, npy(aspp.project[0].weight)), aspp.project[1])
        fc = f + proj                                                  # context_residual=True
        fl, _, _ = h.localize(torch.from_numpy(fc)[None])              # f^l: eqs. (1)-(5), tested above
        g = npy(fl[0]).reshape(c, -1).clip(1e-6) ** 3
        desc = g.mean(axis=1) ** (1 / 3)                               # GeM, p = 3
        np.testing.assert_allclose(npy(out.descriptor[b]), desc / np.linalg.norm(desc), rtol=1e-6)

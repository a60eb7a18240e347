"""GLAM head: every equation against a direct, slow computation of the printed formula (float64, loops)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from glimr.models.heads.glam import GLAMHead

C, H, W = 6, 4, 5


def npy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def conv2d_slow(x, w, b=None, dilation=1):
    """'same' zero-padded convolution of one image x (C, H, W) with w (O, C, k, k), tap by tap."""
    _, h, wd = x.shape
    o, _, k, _ = w.shape
    r = k // 2
    out = np.zeros((o, h, wd))
    for y in range(h):
        for xx in range(wd):
            for ky in range(k):
                for kx in range(k):
                    yy, x2 = y + (ky - r) * dilation, xx + (kx - r) * dilation
                    if 0 <= yy < h and 0 <= x2 < wd:
                        out[:, y, xx] += w[:, :, ky, kx] @ x[:, yy, x2]
    return out if b is None else out + b[:, None, None]


def conv1d_slow(y, w):
    """1D convolution along channels, zero padding, no bias: out_i = sum_t w_t y_{i + t - k//2}."""
    k = len(w)
    return np.array([sum(w[t] * y[i + t - k // 2] for t in range(k) if 0 <= i + t - k // 2 < len(y))
                     for i in range(len(y))])


def softmax_over_first(m):
    """softmax of a matrix over its first index (each column sums to 1)."""
    e = np.exp(m - m.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


@pytest.fixture
def head():
    torch.manual_seed(0)
    h = GLAMHead(SimpleNamespace(channels={"res4": 3, "res5": C}), dim=4, reduction=2).double().eval()
    with torch.no_grad():
        for p in h.parameters():   # non-trivial values everywhere (biases, fusion logits, BN affine)
            p.add_(torch.randn_like(p) * 0.3)
        h.bn.running_mean.normal_()
        h.bn.running_var.uniform_(0.5, 2.0)
    return h


@pytest.fixture
def feat():
    torch.manual_seed(1)
    return torch.rand(2, C, H, W, dtype=torch.float64)


def local_ref(h, f):
    """GLAM Sec. 3.1 for one image: A_c^l, A_s^l, F_c^l (eq. 1), F^l (eq. 2)."""
    y = f.mean(axis=(1, 2))
    a_cl = sigmoid(conv1d_slow(y, npy(h.local_channel.conv.weight)[0, 0]))
    ls = h.local_spatial
    r = conv2d_slow(f, npy(ls.reduce.weight), npy(ls.reduce.bias))
    parts = [conv2d_slow(r, npy(ls.pointwise.weight), npy(ls.pointwise.bias))]
    parts += [conv2d_slow(r, npy(cv.weight), npy(cv.bias), dilation=cv.dilation[0]) for cv in ls.dilated]
    a_sl = conv2d_slow(np.concatenate(parts), npy(ls.fuse.weight), npy(ls.fuse.bias))[0]
    f_cl = f * a_cl[:, None, None] + f                                    # eq. (1)
    f_l = f_cl * a_sl[None] + f_cl                                        # eq. (2)
    return a_cl, a_sl, f_cl, f_l


def global_ref(h, f):
    """GLAM Sec. 3.2 for one image: A_c^g (eq. 3), G_c, F_c^g (eq. 5), A_s^g (eq. 4), G_s, F^g (eq. 6)."""
    c, hh, ww = f.shape
    y = f.mean(axis=(1, 2))
    q = sigmoid(conv1d_slow(y, npy(h.global_channel.query.weight)[0, 0]))
    k = sigmoid(conv1d_slow(y, npy(h.global_channel.key.weight)[0, 0]))
    a_cg = softmax_over_first(np.array([[k[i] * q[j] for j in range(c)] for i in range(c)]))   # eq. (3)
    v_c = f.reshape(c, -1).T                                              # hw x c
    g_c = (v_c @ a_cg).T.reshape(c, hh, ww)
    f_cg = f * g_c                                                        # eq. (5)
    gs = h.global_spatial
    flat = f.reshape(c, -1)
    qs = npy(gs.query.weight)[:, :, 0, 0] @ flat + npy(gs.query.bias)[:, None]
    ks = npy(gs.key.weight)[:, :, 0, 0] @ flat
    vs = npy(gs.value.weight)[:, :, 0, 0] @ flat + npy(gs.value.bias)[:, None]
    n = flat.shape[1]
    logits = np.array([[ks[:, i] @ qs[:, j] for j in range(n)] for i in range(n)])
    a_sg = softmax_over_first(logits)                                     # eq. (4)
    y_s = (vs @ a_sg).reshape(-1, hh, ww)
    g_s = conv2d_slow(y_s, npy(gs.out.weight), npy(gs.out.bias))
    f_g = f_cg * g_s + f_cg                                               # eq. (6)
    return a_cg, g_c, f_cg, a_sg, g_s, f_g


def test_eq1_eq2_local_attention(head, feat):
    a_cl = head.local_channel(feat)
    a_sl = head.local_spatial(feat)
    f_gl, maps = head.attend(feat)
    for b in range(feat.shape[0]):
        r_acl, r_asl, r_fcl, r_fl = local_ref(head, npy(feat[b]))
        np.testing.assert_allclose(npy(a_cl[b, :, 0, 0]), r_acl, rtol=1e-10)
        np.testing.assert_allclose(npy(a_sl[b, 0]), r_asl, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(npy(maps["local_spatial"][b]), r_asl, rtol=1e-9, atol=1e-12)
        f = feat[b:b + 1]
        f_cl = f * head.local_channel(f) + f
        np.testing.assert_allclose(npy(f_cl[0]), r_fcl, rtol=1e-10)


@pytest.mark.parametrize("taylor_terms", [16, None])     # the fast exact form and the plain matrix product
def test_eq3_eq5_global_channel_attention(head, feat, taylor_terms):
    head.global_channel.taylor_terms = taylor_terms
    g_c, a = head.global_channel(feat * 3)
    for b in range(feat.shape[0]):
        r_a, r_gc, r_fcg, *_ = global_ref(head, npy(feat[b] * 3))
        np.testing.assert_allclose(npy(a[b]), r_a, rtol=1e-10)
        np.testing.assert_allclose(npy(a[b]).sum(axis=0), np.ones(C), rtol=1e-12)   # softmax over channels i
        np.testing.assert_allclose(npy(g_c[b]), r_gc, rtol=1e-10)
        np.testing.assert_allclose(npy(feat[b] * 3 * g_c[b]), r_fcg, rtol=1e-10)
    # the path attend() takes: A_c^g not formed (with the series, the normaliser too comes from it)
    g_fast, a_fast = head.global_channel(feat * 3, with_attention=False)
    assert (a_fast is None) == (taylor_terms is not None)
    for b in range(feat.shape[0]):
        np.testing.assert_allclose(npy(g_fast[b]), global_ref(head, npy(feat[b] * 3))[1], rtol=1e-10)


def test_eq4_eq6_global_spatial_attention(head, feat):
    g_s, a = head.global_spatial(feat)
    _, maps = head.attend(feat)
    for b in range(feat.shape[0]):
        *_, r_asg, r_gs, r_fg = global_ref(head, npy(feat[b]))
        np.testing.assert_allclose(npy(a[b]), r_asg, rtol=1e-9)
        np.testing.assert_allclose(npy(g_s[b]), r_gs, rtol=1e-9, atol=1e-12)
        # the heat map: attention each location receives, averaged over the queries
        np.testing.assert_allclose(npy(maps["global_spatial"][b]).ravel(), r_asg.mean(axis=1), rtol=1e-9)
        assert maps["global_spatial"][b].sum().item() == pytest.approx(1.0)


def test_eq7_fusion_uses_global_map(head, feat):
    f_gl, _ = head.attend(feat)
    wl, wg, w = np.exp(npy(head.fusion)) / np.exp(npy(head.fusion)).sum()
    for b in range(feat.shape[0]):
        f = npy(feat[b])
        *_, f_l = local_ref(head, f)
        *_, f_g = global_ref(head, f)
        expected = wl * f_l + wg * f_g + w * f                            # eq. (7) with w_g F^g (typo fixed)
        np.testing.assert_allclose(npy(f_gl[b]), expected, rtol=1e-9)
        typo = wl * f_l + wg * f_l + w * f                                # eq. (7) as printed: not what we do
        assert not np.allclose(npy(f_gl[b]), typo)


def test_descriptor_gem_fc_bn_l2(head, feat):
    out = head(None, lambda _: feat)
    p = head.pool.p.item()
    f_gl, _ = head.attend(feat)
    for b in range(feat.shape[0]):
        x = np.clip(npy(f_gl[b]), 1e-6, None)
        g = (x ** p).mean(axis=(1, 2)) ** (1.0 / p)                       # GeM
        z = npy(head.fc.weight) @ g                                       # FC (dropout is off in eval)
        z = (z - npy(head.bn.running_mean)) / np.sqrt(npy(head.bn.running_var) + head.bn.eps)
        z = z * npy(head.bn.weight) + npy(head.bn.bias)                   # batch norm
        np.testing.assert_allclose(npy(out.descriptor[b]), z / np.linalg.norm(z), rtol=1e-6)
    assert out.descriptor.shape == (2, 4)
    assert out.local is not None and out.local.shape == feat.shape


def test_options_dilations_activation_ablations(feat):
    bb = SimpleNamespace(channels={"res4": 3, "res5": C})
    h = GLAMHead(bb, dim=4, reduction=2, dilations=(1, 3, 5), spatial_activation="sigmoid").double().eval()
    assert [cv.dilation[0] for cv in h.local_spatial.dilated] == [1, 3, 5]
    a = h.local_spatial(feat)
    assert ((a > 0) & (a < 1)).all()
    out = GLAMHead(bb, dim=4, reduction=2, use_global=False).double().eval()(None, lambda _: feat)
    assert set(out.attention) == {"local_spatial"}
    baseline = GLAMHead(bb, dim=4, reduction=2, use_local=False, use_global=False).double().eval()
    out = baseline(None, lambda _: feat)
    assert out.attention == {} and out.descriptor.shape == (2, 4)
    with pytest.raises(ValueError):
        GLAMHead(bb, spatial_activation="relu6")
    assert GLAMHead(SimpleNamespace(channels={"res4": 1024, "res5": 2048})).dim == 512   # paper: d = 512

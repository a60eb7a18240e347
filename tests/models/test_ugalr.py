"""UGALR head: LALM eqs. (1)-(4), G, D, O and the intermediate supervision against direct computations."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from glimr.models.backbones import build_backbone
from glimr.models.heads.ugalr import LALM, UGALRHead
from glimr.models.pooling import gem

C4, H, W = 6, 3, 4


def npy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def conv1x1(w, b, x):
    """1x1 convolution of x (C, L) position by position."""
    w = npy(w)[:, :, 0, 0]
    out = np.stack([w @ x[:, l] for l in range(x.shape[1])], axis=1)
    return out if b is None else out + npy(b)[:, None]


def lalm_ref(m: LALM, x: np.ndarray):
    """LALM for one image x (C4, h, w): returns X' (eq. 2), Z (eq. 4), G, D."""
    c, h, w = x.shape
    r = np.maximum(conv1x1(m.reduce.weight, m.reduce.bias, x.reshape(c, -1)), 0)       # conv + ReLU
    th = conv1x1(m.theta.weight, m.theta.bias, r).T                                   # eq. (1): (hw, c')
    ph = conv1x1(m.phi.weight, None, r).T
    gv = conv1x1(m.g.weight, m.g.bias, r).T
    n = h * w
    logits = np.array([[th[i] @ ph[j] for j in range(n)] for i in range(n)])
    xp = np.array([[math.exp(logits[i, j]) / sum(math.exp(v) for v in logits[i]) for j in range(n)]
                   for i in range(n)])                                                 # eq. (2)
    y = (xp @ gv).T                                                                    # eq. (3): (c', hw)
    z = conv1x1(m.w.weight, m.w.bias, y)                                               # eq. (4), no residual
    s = conv1x1(m.channel.weight, m.channel.bias, z)
    g = np.log1p(np.exp(s)).reshape(c, h, w)                                           # softplus -> G
    return xp, z, g, g * x                                                             # D = G * X


@pytest.fixture
def lalm():
    torch.manual_seed(0)
    return LALM(C4, 5, 3).double()


def test_eq1_to_eq4_nonlocal_without_residual(lalm):
    torch.manual_seed(1)
    x = torch.rand(2, C4, H, W, dtype=torch.float64)
    r = torch.relu(lalm.reduce(x))
    z, att = lalm.spatial(r)
    for b in range(2):
        xp, rz, _, _ = lalm_ref(lalm, npy(x[b]))
        np.testing.assert_allclose(npy(att[b]), xp, rtol=1e-9)
        np.testing.assert_allclose(npy(att[b]).sum(axis=1), 1.0, rtol=1e-12)   # rows of X' sum to 1
        np.testing.assert_allclose(npy(z[b]).reshape(5, -1), rz, rtol=1e-9, atol=1e-12)


def test_attention_g_and_weighted_map_d(lalm):
    torch.manual_seed(2)
    x = torch.rand(2, C4, H, W, dtype=torch.float64)
    d, g = lalm(x)
    for b in range(2):
        _, _, rg, rd = lalm_ref(lalm, npy(x[b]))
        np.testing.assert_allclose(npy(g[b]), rg, rtol=1e-9)
        np.testing.assert_allclose(npy(d[b]), rd, rtol=1e-9)
        assert (npy(g[b]) > 0).all()                                   # softplus: a positive map


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("lite0", weights="none").eval()


def test_o_is_concatenated_into_res5_and_starts_neutral(lite0):
    bb = copy.deepcopy(lite0)
    original_res5 = copy.deepcopy(bb.res5)
    torch.manual_seed(3)
    head = UGALRHead(bb).eval()
    c4 = bb.channels["res4"]
    assert bb.channels["res5_in"] == c4 + 1                            # res5 takes C4 + 1 channels
    UGALRHead(bb)                                                      # a second head does not expand again
    assert bb.channels["res5_in"] == c4 + 1
    x = torch.rand(2, c4, 6, 8) * 3
    seen = {}

    def res5(t):
        seen["input"] = t
        return bb.res5(t)

    with torch.no_grad():
        out = head(x, res5)
        d, g = head.lalm(x)
    o = d.mean(dim=1)                                                  # channel average of D
    assert seen["input"].shape == (2, c4 + 1, 6, 8)
    torch.testing.assert_close(seen["input"][:, :c4], x)
    torch.testing.assert_close(seen["input"][:, c4], o)
    torch.testing.assert_close(out.attention["O"], o)
    torch.testing.assert_close(out.attention["G"], g.mean(dim=1))
    # the new input channel is zero-initialised: the descriptor equals GeM -> FC on the original res5
    with torch.no_grad():
        ref = head.whiten(gem(original_res5(x), head.pool.p))
    torch.testing.assert_close(out.descriptor, torch.nn.functional.normalize(ref, dim=1), rtol=1e-4,
                               atol=1e-5)
    assert out.descriptor.shape == (2, 512) and out.aux == {}


def test_intermediate_supervision_embedding_in_training(lite0):
    """The intermediate embedding of eq. (5)'s L_a: avgpool(D) -> whitening FC, with D from the direct LALM
    computation above (float64, rel. 1e-9)."""
    bb = copy.deepcopy(lite0)
    torch.manual_seed(4)
    head = UGALRHead(bb, inter_dim=16).double().train()    # expands res5's input: make it float64 after
    bb.double()
    x = torch.rand(2, bb.channels["res4"], 3, 4, dtype=torch.float64)
    out = head(x, bb.res5)
    emb = out.aux["inter_embedding"]
    assert emb.shape == (2, 16)
    w, bias = npy(head.inter_whiten.weight), npy(head.inter_whiten.bias)
    for b in range(2):
        _, _, _, rd = lalm_ref(head.lalm, npy(x[b]))
        pooled = rd.reshape(rd.shape[0], -1).mean(axis=1)             # global average pooling of D
        np.testing.assert_allclose(npy(emb[b]), w @ pooled + bias, rtol=1e-9, atol=1e-12)
    # with res5's new weights at zero, LALM learns from the intermediate loss only
    emb.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in head.lalm.parameters())


def test_rejects_a_backbone_with_another_res5_input(lite0):
    bb = copy.deepcopy(lite0)
    bb.expand_res5_input(2)
    with pytest.raises(ValueError, match="input channels"):
        UGALRHead(bb)

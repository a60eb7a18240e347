"""Whitening of the descriptor (glimr/models/whiten.py): PCA-whitening and Lw against their formulas, the model
stage, checkpoints. The `glimr whiten` command: tests/train/test_whiten.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from glimr.extract.multiscale import extract
from glimr.models.checkpoint import load_model, save_model
from glimr.models.registry import build_model
from glimr.models.whiten import PCAWhitening, attach_whitening, detach_whitening, fit_pca_whitening

SIZE = 128  # the longest side whiten_plain_descs (tests/conftest.py) were extracted at


def _data(n=400, d=24, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.linspace(3.0, 0.05, d)                    # anisotropic, correlated after the rotation
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (rng.standard_normal((n, d)) * scales) @ q.T + rng.standard_normal(d)


def _formula(x, k, shrink=0.0):
    """The direct computation: eigendecomposition of the covariance of the L2-normalised descriptors."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    mu = xn.mean(0)
    lam, vec = np.linalg.eigh(np.cov(xn.T, bias=True))
    lam, vec = lam[::-1][:k], vec[:, ::-1][:, :k]
    return xn, mu, vec / np.sqrt(lam + shrink * lam.mean()), lam


def _same_up_to_sign(a, b, atol):
    s = np.sign((a * b).sum(0))
    return np.allclose(a, b * s, atol=atol)


@pytest.mark.parametrize("k", [24, 8])
def test_whitened_training_descriptors_have_identity_covariance(k):
    x = _data()
    w = fit_pca_whitening(x, dim=k)
    assert (w.in_dim, w.dim) == (24, k) and w.mean.dtype == torch.float32 and w.proj.dtype == torch.float32
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = (xn - w.mean.double().numpy()) @ w.proj.double().numpy()
    assert np.allclose(np.cov(y.T, bias=True), np.eye(k), atol=2e-3)
    assert np.allclose(y.mean(0), 0, atol=1e-4)


def test_fit_equals_the_formula_and_forward_normalises():
    x = _data(seed=1)
    xn, mu, p, _ = _formula(x, 10)
    w = fit_pca_whitening(x, dim=10)
    assert np.allclose(w.mean.numpy(), mu, atol=1e-6)
    assert _same_up_to_sign(w.proj.double().numpy(), p, atol=1e-3 * np.abs(p).max())
    # forward: L2((L2(d) - mu) @ P); the module L2-normalises its input itself
    out = w(torch.from_numpy(x[:50]).float()).double().numpy()
    ref = (xn[:50] - mu) @ p
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    s = np.sign((w.proj.double().numpy() * p).sum(0))
    assert np.allclose(out, ref * s, atol=1e-4)


def test_shrink_divides_by_lambda_plus_shrink_times_mean():
    x = _data(seed=2)
    _, _, p, lam = _formula(x, 12, shrink=0.5)
    w = fit_pca_whitening(x, dim=12, shrink=0.5)
    assert _same_up_to_sign(w.proj.double().numpy(), p, atol=1e-3 * np.abs(p).max())
    # the whitened variances are no longer 1 but lambda / (lambda + 0.5 mean(lambda))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = (xn - w.mean.double().numpy()) @ w.proj.double().numpy()
    assert np.allclose(y.var(0), lam / (lam + 0.5 * lam.mean()), rtol=1e-3)
    assert not np.allclose(y.var(0), 1, atol=0.05)
    plain = fit_pca_whitening(x, dim=12)
    assert not _same_up_to_sign(w.proj.numpy(), plain.proj.numpy(), atol=1e-3)


def test_refusals():
    x = _data(n=30, d=24)
    with pytest.raises(ValueError, match="at least 25 descriptors"):
        fit_pca_whitening(x[:24])                          # dim 24 needs 25 samples
    fit_pca_whitening(x[:25])
    with pytest.raises(ValueError, match="at least 11 descriptors"):
        fit_pca_whitening(x[:10], dim=10)
    with pytest.raises(ValueError, match="between 1 and the descriptor dimension 24"):
        fit_pca_whitening(x, dim=25)
    bad = x.copy()
    bad[3] = 0
    with pytest.raises(ValueError, match="all-zero"):
        fit_pca_whitening(bad, dim=4)
    flat = np.repeat(x[:3], 10, axis=0)                    # 30 samples spanning 2 directions
    with pytest.raises(ValueError, match="span only 2 directions"):
        fit_pca_whitening(flat, dim=4)
    with pytest.raises(ValueError, match="shrink"):
        fit_pca_whitening(x, dim=4, shrink=-1)
    # with shrink > 0 every kept direction has a positive divisor: fewer samples than dims is fine (fp32 buffers)
    w = fit_pca_whitening(x[:20], shrink=0.5)
    assert w.dim == 24 and torch.isfinite(w.proj).all()
    _, _, proj, _ = _formula(x[:20], 24, shrink=0.5)
    assert _same_up_to_sign(w.proj.double().numpy()[:, :19], proj[:, :19], atol=1e-3 * np.abs(proj[:, :19]).max())
    with pytest.raises(ValueError, match="at least"):
        fit_pca_whitening(x[:1], shrink=0.5)


# ------------------------------------------------------------------------------------------ real model
def test_whitened_model_round_trip_through_a_partial_checkpoint(whiten_photos, whiten_plain_descs,
                                                                   tmp_path):
    net = build_model("gem-lite0")                          # own instance: attaching changes it
    pcaw = fit_pca_whitening(whiten_plain_descs, dim=16)
    attach_whitening(net, pcaw, source="test photos")
    assert net.dim == 16 and net.head.dim == 1280
    assert net.config["pca_whiten"] == {"dim": 16, "in_dim": 1280, "shrink": 0.0, "source": "test photos"}
    d = extract(net, whiten_photos[:2], max_size=SIZE, workers=0, progress=False, precision="fp32").descriptors
    # the net's stage is the formula applied to the plain descriptors
    ref = (whiten_plain_descs[:2] - pcaw.mean.numpy()) @ pcaw.proj.numpy()
    assert np.allclose(d, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-4)

    st = save_model(net, tmp_path / "w.safetensors", prefixes=["head."])
    cfg = json.loads((tmp_path / "w.json").read_text())
    assert cfg["partial"]["prefixes"] == ["head.", "pcaw."] and cfg["pca_whiten"]["dim"] == 16
    from safetensors.torch import load_file

    assert set(load_file(str(st))) == {"head.pool.p", "pcaw.mean", "pcaw.proj"}
    again = build_model(checkpoint=st)
    assert isinstance(again.pcaw, PCAWhitening) and again.dim == 16
    d2 = extract(again, whiten_photos[:2], max_size=SIZE, workers=0, progress=False, precision="fp32").descriptors
    assert d2.shape == (2, 16)
    assert np.allclose(np.linalg.norm(d2, axis=1), 1, atol=1e-5)
    assert np.allclose(d2, d, atol=1e-5)

    # a file whose whitening does not match its config is refused, naming the file
    cfg["pca_whiten"]["dim"] = 8
    (tmp_path / "w.json").write_text(json.dumps(cfg))
    from glimr.models.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="w.safetensors"):
        load_model(st)
    # detaching gives the plain model back; saving it records no whitening
    assert detach_whitening(net) is pcaw and net.dim == 1280 and "pca_whiten" not in net.config
    save_model(net, tmp_path / "plain.safetensors", prefixes=["head."])
    assert "pca_whiten" not in json.loads((tmp_path / "plain.json").read_text())


def test_old_checkpoints_load_without_whitening():
    from glimr.models.packaged import packaged_checkpoint

    net = build_model(checkpoint=packaged_checkpoint("cider-lite0-composites"))
    assert net.pcaw is None and net.dim == 512 and "pca_whiten" not in net.config


# ---- learned whitening (Lw, Radenovic et al.) -----------------------------------------------------------
def _lw_direct(x, pairs, dim, reg):
    """Lw computed the slow, literal way (float64): loops over pairs, scipy's matrix power for C_S^{-1/2}."""
    from scipy.linalg import fractional_matrix_power

    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    mu = x.mean(axis=0)
    d = x.shape[1]
    cs = np.zeros((d, d))
    for i, j in pairs:
        v = (x[i] - x[j])[:, None]
        cs += v @ v.T
    cs /= len(pairs)
    cs += reg * np.trace(cs) / d * np.eye(d)
    w = np.real(fractional_matrix_power(cs, -0.5))
    y = (x - mu) @ w
    cd = sum(np.outer(r, r) for r in y) / len(y)
    _, vec = np.linalg.eigh(cd)
    vec = vec[:, ::-1][:, :dim]
    out = (x - mu) @ w @ vec
    return out / np.linalg.norm(out, axis=1, keepdims=True), w @ vec


@pytest.mark.parametrize("reg", [0.0, 0.3])
def test_learned_whitening_equals_the_formula(reg):
    from glimr.models.whiten import fit_learned_whitening

    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 12))
    x = np.concatenate([base + 0.2 * rng.normal(size=base.shape), base + 0.2 * rng.normal(size=base.shape)])
    pairs = np.stack([np.arange(40), np.arange(40) + 40], axis=1)
    lw = fit_learned_whitening(x, pairs, dim=8, reg=reg)
    want, proj = _lw_direct(x, pairs, 8, reg)
    # eigenvectors are defined up to sign: compare column by column up to sign (float64 fit, fp32 buffers)
    got_proj = lw.proj.double().numpy()
    signs = np.sign((got_proj * proj).sum(axis=0))
    np.testing.assert_allclose(got_proj, proj * signs, rtol=1e-4, atol=1e-5)
    got = lw(torch.from_numpy(x).float()).double().numpy()        # fp32 forward
    np.testing.assert_allclose(got, want * signs, atol=1e-4)


def test_learned_whitening_whitens_the_pair_differences():
    """With reg 0 and all dims, the differences of matching pairs have identity covariance after W (before
    the rotation, which keeps it identity): the within-instance variation is whitened away."""
    from glimr.models.whiten import fit_learned_whitening

    rng = np.random.default_rng(1)
    base = rng.normal(size=(300, 6))
    x = np.concatenate([base, base + 0.1 * rng.normal(size=base.shape) * np.arange(1, 7)])
    pairs = np.stack([np.arange(300), np.arange(300) + 300], axis=1)
    lw = fit_learned_whitening(x, pairs, reg=0.0)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    df = (xn[pairs[:, 0]] - xn[pairs[:, 1]]) @ lw.proj.double().numpy()
    np.testing.assert_allclose(df.T @ df / len(df), np.eye(6), atol=1e-4)   # fp32 buffers, float64 product


def test_learned_whitening_refusals():
    from glimr.models.whiten import fit_learned_whitening

    x = np.random.default_rng(2).normal(size=(10, 4))
    with pytest.raises(ValueError, match="pairs"):
        fit_learned_whitening(x, np.array([[0, 0]]))
    with pytest.raises(ValueError, match="pairs"):
        fit_learned_whitening(x, np.array([[0, 10]]))
    with pytest.raises(ValueError, match="reg"):
        fit_learned_whitening(x, np.array([[0, 1]]), reg=float("nan"))
    with pytest.raises(ValueError, match="too few directions"):
        fit_learned_whitening(x, np.array([[0, 1]]), reg=0.0)

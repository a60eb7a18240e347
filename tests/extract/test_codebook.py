"""The co-attention inverted file's codebook (sec. 5.2): Codebook.fit, the feature-to-word assignment, an
image's words with the per-image cap, and which features are assigned; each against a direct computation."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from glimr.extract.local import PCA, CoAttentionParams, Codebook, ImageLocal, LocalConfig


def blobs(rng, k=8, per=40, d=16, spread=0.05):
    centres = rng.normal(size=(k, d)) * 3
    x = np.concatenate([c + spread * rng.normal(size=(per, d)) for c in centres]).astype(np.float32)
    return x, np.repeat(np.arange(k), per), centres


def test_fit_projects_with_the_samples_pca_and_learns_k_means_words():
    """Fit on 8 well-separated blobs: the PCA is the samples' (mean, top eigenvectors of the covariance, up to
    sign; fp32 vs a float64 eigendecomposition, abs. 1e-4), and the words are a k-means fixed point in the
    PCA space: each word is the mean of the samples nearest to it (fp32, abs. 1e-3) and none is empty.
    (Lloyd's k-means may still merge two blobs: a local minimum, not checked here.)"""
    rng = np.random.default_rng(0)
    x, _, _ = blobs(rng)
    cb = Codebook.fit(x, size=8, dim=7, iters=25, points_per_word=64)   # 320 samples < 8 x 64: no sub-sampling
    assert cb.words.shape == (8, 7) and cb.size == 8
    # the PCA: eqs. (11)-(13) directly
    x64 = x.astype(np.float64)
    m = x64.mean(0)
    vals, vecs = np.linalg.eigh((x64 - m).T @ (x64 - m) / len(x))
    top = vecs[:, np.argsort(vals)[::-1][:7]].T
    assert np.allclose(cb.pca.mean, m, atol=1e-5)
    assert np.allclose(np.abs(np.sum(cb.pca.components * top, axis=1)), 1.0, atol=1e-4)
    # the words: Lloyd's fixed point
    z = (x64 - m) @ cb.pca.components.T.astype(np.float64)
    near = ((z[:, None, :] - cb.words[None].astype(np.float64)) ** 2).sum(-1).argmin(1)
    assert np.array_equal(near, cb.assign(x))
    assert set(near) == set(range(8))
    for j in range(8):
        assert np.allclose(cb.words[j], z[near == j].mean(0), atol=1e-3)


def test_assign_is_the_nearest_word_after_the_pca():
    """assign(f) = argmin_j ||P (f - m) - c_j||^2, checked feature by feature in float64 (ties impossible
    with random data)."""
    rng = np.random.default_rng(1)
    pca = PCA(rng.normal(size=6).astype(np.float32), np.linalg.qr(rng.normal(size=(6, 3)))[0].T.astype(np.float32),
              np.ones(3, np.float32))
    cb = Codebook(pca, rng.normal(size=(11, 3)).astype(np.float32))
    f = rng.normal(size=(50, 6)).astype(np.float32)
    got = cb.assign(f)
    for i in range(len(f)):
        z = (f[i].astype(np.float64) - pca.mean) @ pca.components.T.astype(np.float64)
        assert got[i] == int(np.argmin(((z - cb.words.astype(np.float64)) ** 2).sum(1)))
    assert cb.assign(np.zeros((0, 6), np.float32)).shape == (0,)


def _fixed_codebook(word_of):
    """A codebook whose words are unit vectors on the axes: feature e_i goes to word i (identity PCA)."""
    n = len(word_of)
    pca = PCA(np.zeros(n, np.float32), np.eye(n, dtype=np.float32), np.ones(n, np.float32))
    return Codebook(pca, np.eye(n, dtype=np.float32))


@pytest.mark.parametrize("cap", [1, 3, 5, 100])
def test_image_words_keep_the_most_frequent_then_lowest_ids(cap):
    """An image's words: distinct, sorted, at most ``cap``, the most frequent first and, on equal counts, the
    lower word id; against a direct count."""
    rng = np.random.default_rng(cap)
    n_words = 9
    cb = _fixed_codebook(range(n_words))
    words = rng.integers(0, n_words, size=40)
    feats = np.eye(n_words, dtype=np.float32)[words]
    got = cb.image_words(feats, cap)
    cnt = Counter(words.tolist())
    ranked = sorted(cnt, key=lambda wd: (-cnt[wd], wd))
    assert got.tolist() == sorted(ranked[:cap])


def test_records_assign_only_the_first_ivf_features_and_pad_to_the_cap():
    """encode(): the words of an image come from its first N_cdb = ivf_features selected features (the largest
    norms), capped at max_words, padded with the codec's pad word; query_words() takes all of the query's."""
    n_words, k, c = 6, 2, 6
    cfg = LocalConfig(n_select=10, clusters=k, dim=3, dtype="float32", proxy_dim=3, ivf_features=4,
                      codebook_size=n_words, max_words=3)
    rng = np.random.default_rng(5)
    pca = PCA(np.zeros(c, np.float32), np.linalg.qr(rng.normal(size=(c, 3)))[0].T.astype(np.float32),
              np.ones(3, np.float32))
    params = CoAttentionParams(cfg, pca, None, _fixed_codebook(range(n_words)))
    feat_words = np.array([5, 5, 1, 0, 2, 2, 2, 3, 3, 4])     # features 4.. (words 2, 3, 4) are past N_cdb
    loc = ImageLocal(query=rng.normal(size=c).astype(np.float32), global_=rng.normal(size=c).astype(np.float32),
                     clusters=rng.normal(size=(k, c)).astype(np.float32), counts=np.array([5, 5]),
                     feats=np.eye(n_words, dtype=np.float32)[feat_words], labels=np.zeros(10, np.int64),
                     pos=np.zeros((10, 3), np.int64))
    rec = params.encode(loc)
    stored = [int(w) for w in rec["words"] if w != params.codec.pad_word]
    # first 4 features: words 5, 5, 1, 0 -> counts {5: 2, 1: 1, 0: 1}: all 3 fit the cap of 3
    assert stored == [0, 1, 5]
    assert len(rec["words"]) == 3
    assert params.query_words(loc).tolist() == [0, 1, 5]
    cfg2 = LocalConfig(**{**cfg.__dict__, "max_words": 2})
    params2 = CoAttentionParams(cfg2, pca, None, _fixed_codebook(range(n_words)))
    rec2 = params2.encode(loc)
    assert [int(w) for w in rec2["words"]] == [0, 5]          # 5 (twice), then the lower id of the ties

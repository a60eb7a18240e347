"""Where co-attention learns its PCA and codebook: a collection separate from the ranked images by default (the
paper: training images), the database only when asked (transductive), and the report says which; the paper's
and the compact configurations."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from glimr.eval.evaluate import evaluate
from glimr.extract.local import DEFAULT_FIT_DIR, FIT_IMAGES_ENV, LocalConfig, resolve_fit_images


def _copy(src_dir, names, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy(src_dir / n, dst / n)
    return [dst / n for n in names]


def test_fit_images_default_env_database_and_errors(shared_data, tmp_path, monkeypatch):
    photos = sorted(p.name for p in (shared_data / "photos").iterdir())[:5]
    fit_dir = tmp_path / "fit"
    _copy(shared_data / "photos", photos, fit_dir)
    db = _copy(shared_data / "ukbench", ["ukbench00000.jpg", "ukbench00001.jpg"], tmp_path / "db")
    items, label = resolve_fit_images(fit_dir, db)
    assert len(items) == 5 and str(fit_dir) in label and "transductive" not in label
    items, label = resolve_fit_images("database", db)
    assert items == db and "transductive" in label
    items, label = resolve_fit_images(tmp_path / "db", db)            # the database's own folder, given
    assert "2 of them are also in the database" in label
    monkeypatch.setenv(FIT_IMAGES_ENV, str(fit_dir))
    assert len(resolve_fit_images(None, db)[0]) == 5
    monkeypatch.delenv(FIT_IMAGES_ENV)
    monkeypatch.chdir(tmp_path)                                        # no ../shared/data/photos from here
    assert not DEFAULT_FIT_DIR.is_dir()
    with pytest.raises(ValueError, match="separate collection"):
        resolve_fit_images(None, db)
    with pytest.raises(ValueError, match="not a folder"):
        resolve_fit_images(tmp_path / "nope", db)


def test_named_configurations():
    paper = LocalConfig.named("paper")
    assert (paper.n_select, paper.clusters, paper.dim, paper.dtype) == (500, 10, 512, "float32")
    assert (paper.codebook_size, paper.ivf_features, paper.max_words) == (65536, 500, 500)
    assert paper.codec().word_dtype is np.uint32                        # 65,536 words do not fit uint16's pad
    compact = LocalConfig.named("compact")
    assert (compact.dim, compact.dtype, compact.codebook_size, compact.max_words) == (256, "int8", 4096, 128)
    assert compact.codec().nbytes < 4096 < paper.codec().nbytes
    assert LocalConfig.named("paper", dim=64).dim == 64
    with pytest.raises(ValueError, match="paper"):
        LocalConfig.named("huge")


def test_eval_reranker_fits_on_the_separate_collection_and_says_so(shared_data, lite0_gem, tmp_path):
    """A tiny gnd.json set (3 UKBench objects, 1 query + 3 views each): co-attention fitted on 12 photos of
    photos/ (not the evaluated images), and on the database when asked; the report's notes say which."""
    root = tmp_path / "set"
    names = [f"ukbench{i:05d}.jpg" for i in range(12)]
    _copy(shared_data / "ukbench", [names[i] for i in (0, 4, 8)], root / "query")
    db_names = [n for i, n in enumerate(names) if i % 4]
    _copy(shared_data / "ukbench", db_names, root / "db")
    (root / "gnd.json").write_text(json.dumps({"query": [names[i] for i in (0, 4, 8)], "db": db_names,
                                               "positives": [[0, 1, 2], [3, 4, 5], [6, 7, 8]]}))
    fit_dir = tmp_path / "fit"
    _copy(shared_data / "photos", sorted(p.name for p in (shared_data / "photos").iterdir())[:12], fit_dir)
    common = "n=40,clusters=2,dim=8,scales=1,words=0"
    # glimr eval hands the images, the evaluated network and its image size to the re-ranker
    cache = tmp_path / "cache"
    rep = evaluate(root, net=lite0_gem, max_size=128, progress=False, precision="fp32", cache_dir=cache,
                   rerank=f"coattention:fit={fit_dir},{common}")
    note = [n for n in rep.notes if "co-attention" in n]
    assert len(note) == 1 and str(fit_dir) in note[0] and "12 images" in note[0] and "transductive" not in note[0]
    assert rep.metrics["mAP"] > 50                                     # 3 objects: the views are found
    # the fit is kept beside the cache and serves the next evaluation without the samples' features
    assert len(list(cache.glob("ca-params__*/params.json"))) == 1
    for d in cache.glob("ca-samples__*"):
        shutil.rmtree(d)
    again = evaluate(root, net=lite0_gem, max_size=128, progress=False, precision="fp32", cache_dir=cache,
                     rerank=f"coattention:fit={fit_dir},{common}")
    assert not list(cache.glob("ca-samples__*"))
    assert again.metrics["mAP"] == rep.metrics["mAP"]                  # the same parameters: the same ranking
    rep_db = evaluate(root, net=lite0_gem, max_size=128, progress=False, precision="fp32",     # the old form
                      rerank=f"coattention:dataset={root},fit=database,{common},model=gem-lite0,max_size=128")
    assert any("transductive" in n for n in rep_db.notes)


def test_cached_features_keep_their_own_global_vector(shared_data, tmp_path):
    """The cache of co-attention features keeps each image's global GeM over every location (the PCA's sample
    vector) apart from the model's descriptors: they used to share global.npy, so a head with its own FC (GLAM:
    512-d descriptors, 1280-d local features) fed 512-d vectors to a PCA then applied to 1280-d clusters."""
    from glimr.extract.local import fit_params
    from glimr.models.registry import build_model
    from glimr.rerank.coattention import cached_locals

    net = build_model("glam-lite0", warn_untrained=False)
    items = sorted((shared_data / "photos").glob("*.JPEG"))[:3]
    cfg = LocalConfig.named("compact", n_select=40, clusters=2, dim=2, codebook_size=4, max_words=0)
    plain, desc = cached_locals(None, "s", net, items, None, cfg, (1.0,), 128, workers=0, progress=False,
                                precision="fp32")
    first, desc1 = cached_locals(tmp_path, "s", net, items, None, cfg, (1.0,), 128, workers=0, progress=False,
                                 precision="fp32")
    again, desc2 = cached_locals(tmp_path, "s", net, items, None, cfg, (1.0,), 128, workers=0, progress=False,
                                 precision="fp32")
    assert desc.shape == (3, 512) and np.allclose(desc1, desc) and np.allclose(desc2, desc)
    for a, b, c in zip(plain, first, again):
        assert a.global_.shape == a.clusters.shape[1:] == (1280,)
        assert np.allclose(b.global_, a.global_) and np.allclose(c.global_, a.global_)   # fp32, from .npy
    fit_params(again, cfg)                          # the PCA fitted on global vectors projects the clusters


def test_feature_cache_is_keyed_by_the_weights(shared_data, lite0_gem, tmp_path):
    """Two nets with the same name and config but different weights (a model retrained in place, or handed to
    the re-ranker without its checkpoint's path) never share cached co-attention features or fits: the cache
    used to be keyed by name and config only, and served the first model's features to the second."""
    import copy

    import torch

    root = tmp_path / "set"
    names = [f"ukbench{i:05d}.jpg" for i in range(8)]
    _copy(shared_data / "ukbench", [names[0], names[4]], root / "query")
    db_names = [n for i, n in enumerate(names) if i % 4]
    _copy(shared_data / "ukbench", db_names, root / "db")
    (root / "gnd.json").write_text(json.dumps({"query": [names[0], names[4]], "db": db_names,
                                               "positives": [[0, 1, 2], [3, 4, 5]]}))
    fit_dir = tmp_path / "fit"
    _copy(shared_data / "photos", sorted(p.name for p in (shared_data / "photos").iterdir())[:8], fit_dir)
    other = copy.deepcopy(lite0_gem)
    with torch.no_grad():
        next(other.parameters()).mul_(0.5)                       # the stem's first conv: every feature changes
    assert other.name == lite0_gem.name and other.config == lite0_gem.config
    cache = tmp_path / "cache"
    spec = f"coattention:fit={fit_dir},n=40,clusters=2,dim=4,scales=1,words=0"
    for net in (lite0_gem, other, lite0_gem):
        evaluate(root, net=net, max_size=128, progress=False, precision="fp32", cache_dir=cache, rerank=spec)
    dbs = sorted(cache.glob("ca-database__*"))
    assert len(dbs) == 2 and len(list(cache.glob("ca-params__*"))) == 2   # the third run read the first's
    a, b = (np.load(d / "descriptors.npy") for d in dbs)
    assert a.shape == b.shape and not np.allclose(a, b, atol=1e-3)        # fp32: different weights, features

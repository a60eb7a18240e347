"""Property-based: any values -> a valid settings object that round-trips through index.json, or a ValueError.
Never another exception."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from glimr.extract.local import LocalConfig
from glimr.extract.multiscale import ExtractSettings
from glimr.index.settings import IndexConfig, IndexSettings
from glimr.index.store import IndexStore, IndexStoreError

ANY = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=20), st.dictionaries(
                    st.text(max_size=5), st.integers(), max_size=3))
INTS = st.one_of(st.integers(-5, 20_000), st.integers(-10**12, 10**12), ANY)
SCALES = st.one_of(st.lists(st.floats(allow_nan=True, allow_infinity=True, min_value=None), max_size=20),
                   st.lists(st.floats(0.01, 9), min_size=1, max_size=18), st.sampled_from(["1", "3", "5", "1,0.5",
                                                                                          "x", ""]), ANY)
SHA = st.one_of(st.none(), st.text("0123456789abcdef", min_size=63, max_size=65), ANY)
FACTORY = st.one_of(st.sampled_from(["Flat", "HNSW32", "IVF16,Flat", "PCA16,Flat", "PQ7", "IVF0,Flat", "IVF,",
                                     "Flat\x00", "garbage", "", "HNSW-1", "LSH", "IVF4,PQ4"]), st.text(max_size=12))


def _round_trip_extract(s: ExtractSettings) -> None:
    text = json.dumps(s.to_json())
    back = ExtractSettings.from_json(json.loads(text))
    assert back == s and back.same_descriptors(s)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=st.one_of(st.sampled_from(["gem-lite0", "cider-lite0"]), ANY), checkpoint=st.one_of(
    st.none(), st.just("/abs/ck.safetensors"), st.just("relative.safetensors"), ANY), sha=SHA, scales=SCALES,
    max_size=INTS, precision=st.one_of(st.sampled_from(["auto", "fp32", "bf16", "fp16"]), ANY), batch_size=INTS,
    workers=INTS, max_pixels=INTS)
@example(model="gem-lite0", checkpoint="/abs/ck.safetensors", sha="0" * 64, scales=[0.5, 1.0], max_size=256,
         precision="fp32", batch_size=8, workers=None, max_pixels=1000)  # the valid path, always exercised
def test_extract_settings_are_valid_or_a_value_error(model, checkpoint, sha, scales, max_size, precision,
                                                      batch_size, workers, max_pixels):
    try:
        s = ExtractSettings(model=model, checkpoint=checkpoint, checkpoint_sha256=sha, scales=scales,
                            max_size=max_size, precision=precision, batch_size=batch_size, workers=workers,
                            max_pixels=max_pixels)
    except ValueError as e:
        assert str(e)  # a message, naming what is wrong
        return
    # what a valid object guarantees
    assert 1 <= s.max_size <= 16384 and 1 <= s.batch_size <= 4096 and 1 <= s.max_pixels
    assert s.workers is None or 0 <= s.workers <= 256
    assert 1 <= len(s.scales) <= 16 and all(math.isfinite(x) and 0 < x <= 8 for x in s.scales)
    assert s.precision in ("auto", "fp32", "bf16")
    assert (s.checkpoint is None) == (s.checkpoint_sha256 is None)
    _round_trip_extract(s)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dim=st.one_of(st.sampled_from([16, 64, 1280]), INTS), factory=st.one_of(FACTORY, ANY), chunk=INTS,
       ca=st.one_of(st.none(), st.just("valid"), st.just("wrong-bytes"), ANY))
@example(dim=64, factory="IVF16,Flat", chunk=4, ca="valid")
def test_index_settings_are_valid_or_a_value_error(dim, factory, chunk, ca):
    if ca == "valid":
        cfg = LocalConfig(n_select=20, clusters=2, dim=8, proxy_dim=8, codebook_size=16, codebook_dim=8, max_words=8)
        ca = {"config": cfg.to_json(), "record_bytes": cfg.codec().nbytes}
    elif ca == "wrong-bytes":
        cfg = LocalConfig(n_select=20, clusters=2, dim=8, proxy_dim=8, codebook_size=16, codebook_dim=8, max_words=8)
        ca = {"config": cfg.to_json(), "record_bytes": cfg.codec().nbytes + 1}
    try:
        s = IndexSettings(dim=dim, factory=factory, chunk_size=chunk, coattention=ca)
    except ValueError as e:
        assert str(e)
        return
    assert 1 <= s.dim <= 65536 and 1 <= s.chunk_size <= 1_000_000 and isinstance(s.factory, str)
    back = IndexSettings.from_json(json.loads(json.dumps(s.to_json())))
    assert back == s


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=st.one_of(
    ANY,
    st.fixed_dictionaries({"version": st.one_of(st.just(2), ANY), "root": st.one_of(st.none(), st.text(), ANY),
                           "extract": st.one_of(st.fixed_dictionaries({"model": st.just("gem-lite0"),
                                                                       "max_size": INTS, "scales": SCALES}), ANY),
                           "index": st.one_of(st.fixed_dictionaries({"dim": INTS, "factory": FACTORY,
                                                                     "chunk_size": INTS}), ANY)}),
    st.fixed_dictionaries({"model": st.one_of(st.just("gem-lite0"), ANY), "dim": INTS, "max_size": INTS,
                           "scales": SCALES, "factory": FACTORY, "checkpoint": st.one_of(st.none(), ANY)})))
def test_index_json_is_read_back_or_reported(doc, tmp_path_factory):
    """A hand-edited (or old, format 1) index.json: loaded and equal after a round trip, or IndexStoreError."""
    d = tmp_path_factory.mktemp("idx")
    (d / "index.json").write_text(json.dumps(doc))
    try:
        cfg = IndexStore._read_config(d)
    except IndexStoreError as e:
        assert "index.json" in str(e) and ("rebuild" in str(e) or "fix" in str(e))
        return
    assert IndexConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg


def test_old_index_json_with_a_checkpoint_says_rebuild():
    with pytest.raises(ValueError, match="before glimr recorded its checkpoint's sha256.*rebuild"):
        IndexConfig.from_json({"model": "gem-lite0", "dim": 1280, "checkpoint": "x.safetensors"})
    old = IndexConfig.from_json({"model": "gem-lite0", "dim": 1280, "scales": [1.0], "max_size": 256,
                                 "factory": "Flat", "root": "/x", "version": 1})
    assert (old.model, old.dim, old.max_size, old.root) == ("gem-lite0", 1280, 256, "/x")

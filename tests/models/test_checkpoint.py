"""Checkpoints: NAME.safetensors + NAME.json; names with several dots; malformed JSON sidecars."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glimr.models.checkpoint import (
    CheckpointError,
    checkpoint_paths,
    config_path,
    load_model,
    read_config,
    save_model,
)


def test_the_sidecar_of_a_multi_dot_name_keeps_the_whole_name(tmp_path):
    assert config_path(tmp_path / "model.v2.safetensors") == tmp_path / "model.v2.json"
    assert checkpoint_paths(tmp_path / "model.v2") == (tmp_path / "model.v2.safetensors", tmp_path / "model.v2.json")
    assert checkpoint_paths(tmp_path / "model.v2.json") == (tmp_path / "model.v2.safetensors",
                                                            tmp_path / "model.v2.json")
    assert config_path("ck/run.2026.01.safetensors").name == "run.2026.01.json"
    assert config_path("model.safetensors").name == "model.json"
    with pytest.raises(CheckpointError, match="not a checkpoint name"):
        checkpoint_paths(tmp_path / ".safetensors")


def test_two_checkpoints_model_and_model_v2_in_one_folder_keep_their_own_weights(lite0_gem, tmp_path):
    """Saving model.v2 must not overwrite model.safetensors/.json, and each loads its own weights and config."""
    net = lite0_gem
    p0 = float(net.head.pool.p.detach())
    try:
        with torch.no_grad():
            net.head.pool.p.fill_(2.5)
        save_model(net, tmp_path / "model.safetensors", extra={"query_scales": [1.0]}, prefixes=["head."])
        first = {f: (tmp_path / f).read_bytes() for f in ("model.safetensors", "model.json")}
        with torch.no_grad():
            net.head.pool.p.fill_(4.25)
        st = save_model(net, tmp_path / "model.v2.safetensors", extra={"query_scales": [1.0, 0.5]},
                        prefixes=["head."])
    finally:
        with torch.no_grad():
            net.head.pool.p.fill_(p0)
    assert st == tmp_path / "model.v2.safetensors"
    assert sorted(os.listdir(tmp_path)) == ["model.json", "model.safetensors", "model.v2.json",
                                            "model.v2.safetensors"]
    assert all((tmp_path / f).read_bytes() == b for f, b in first.items())      # the first is untouched
    a, b = load_model(tmp_path / "model.safetensors"), load_model(tmp_path / "model.v2.safetensors")
    assert a.head.pool.p.item() == 2.5 and a.config["query_scales"] == [1.0]
    assert b.head.pool.p.item() == 4.25 and b.config["query_scales"] == [1.0, 0.5]
    # the stem without a suffix names the same checkpoint
    assert load_model(tmp_path / "model.v2").head.pool.p.item() == 4.25


def _saved(net, tmp_path):
    save_model(net, tmp_path / "ck.v1.safetensors", prefixes=["head."])
    return tmp_path / "ck.v1.safetensors", tmp_path / "ck.v1.json"


GOOD = {"name": "gem-lite0", "head_kwargs": {}, "partial": {"prefixes": ["head."], "base_weights": "pretrained"}}

BAD_SIDECARS = [
    (b"{not json", "not JSON"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b"[1, 2, 3]", "top level is a JSON list"),
    (b'"gem-lite0"', "top level is a JSON str"),
    (json.dumps({"head_kwargs": {}}).encode(), "needs a 'name'"),
    (json.dumps({**GOOD, "name": 7}).encode(), "'name' must be a non-empty string"),
    (json.dumps({**GOOD, "name": "nope-lite0"}).encode(), "cannot build 'nope-lite0'"),
    (json.dumps({**GOOD, "head_kwargs": [1]}).encode(), "'head_kwargs' must be an object"),
    (json.dumps({**GOOD, "head_kwargs": {"no_such_arg": 1}}).encode(), "cannot build 'gem-lite0'"),
    (json.dumps({**GOOD, "partial": ["head."]}).encode(), "'partial' must be an object"),
    (json.dumps({**GOOD, "partial": {"prefixes": "head."}}).encode(), "'partial' must be an object"),
    (json.dumps({**GOOD, "partial": {"prefixes": ["head."], "base_weights": 1}}).encode(), "base_weights"),
    (json.dumps({**GOOD, "pca_whiten": {"dim": "16", "in_dim": 1280}}).encode(), "'pca_whiten' must be"),
    (json.dumps({**GOOD, "pca_whiten": [16]}).encode(), "'pca_whiten' must be"),
    (json.dumps({**GOOD, "query_scales": "1,0.5"}).encode(), "'query_scales' must be"),
    (json.dumps({**GOOD, "query_scales": [1.0, -0.5]}).encode(), "'query_scales' must be"),
    (b'{"name": "gem-lite0", "query_scales": [NaN]}', "'query_scales' must be"),
    (json.dumps({**GOOD, "max_size": 0}).encode(), "'max_size' must be"),
    (json.dumps({**GOOD, "max_size": "768"}).encode(), "'max_size' must be"),
    (json.dumps({**GOOD, "max_size": 768.0}).encode(), "'max_size' must be"),
    (json.dumps({**GOOD, "max_size": True}).encode(), "'max_size' must be"),
    (json.dumps({**GOOD, "max_size": 10**6}).encode(), "'max_size' must be"),
]


@pytest.mark.parametrize(("content", "what"), BAD_SIDECARS, ids=[w for _, w in BAD_SIDECARS])
def test_a_malformed_sidecar_is_a_checkpoint_error_naming_the_file(lite0_gem, tmp_path, content, what):
    st, js = _saved(lite0_gem, tmp_path)
    assert load_model(st).head.pool.p.item() == lite0_gem.head.pool.p.item()    # the good one loads
    js.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_model(st)
    msg = str(e.value)
    assert what in msg and "ck.v1.json" in msg and ("re-export" in msg or "fix" in msg)


def test_a_missing_sidecar_names_the_missing_file(lite0_gem, tmp_path):
    st, js = _saved(lite0_gem, tmp_path)
    js.unlink()
    with pytest.raises(CheckpointError, match=r"ck\.v1\.json' not found"):
        load_model(st)


# ------------------------------------------------------------------------------------ property-based
JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 2000) | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                    max_leaves=10)


PARTIAL = st.fixed_dictionaries({"prefixes": st.just(["head."]), "base_weights": st.sampled_from(["pretrained", "x"])})
GOOD_VALUES = {
    "name": st.sampled_from(["gem-lite0", "cider-lite0", ""]),
    "head_kwargs": st.just({}) | st.dictionaries(st.sampled_from(["dim", "p"]), st.integers(1, 64)),
    "partial": st.none() | PARTIAL,
    "pca_whiten": st.none() | st.fixed_dictionaries({"in_dim": st.integers(-1, 2048), "dim": st.integers(-1, 64)}),
    "query_scales": st.none() | st.lists(st.floats(-1, 3) | st.integers(0, 2), max_size=3),
}


@st.composite
def sidecars(draw):
    """Checkpoint configs near real ones: the real keys with good or random values."""
    doc = {}
    for key, good in GOOD_VALUES.items():
        choice = draw(st.sampled_from(["good"] * 4 + ["json", "absent"]))
        if choice != "absent":
            doc[key] = draw(good if choice == "good" else JSON)
    return doc


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=sidecars() | JSON)
def test_any_sidecar_is_a_checked_config_or_a_checkpoint_error(tmp_path, doc):
    js = tmp_path / "m.v3.json"
    js.write_text(json.dumps(doc))
    try:
        cfg = read_config(js)
    except CheckpointError as e:
        assert "m.v3.json" in str(e)
        return
    assert isinstance(cfg, dict) and isinstance(cfg["name"], str) and cfg["name"]
    assert isinstance(cfg.get("head_kwargs", {}), dict)
    pw = cfg.get("pca_whiten")
    assert pw is None or (pw["in_dim"] >= 1 and pw["dim"] >= 1)
    qs = cfg.get("query_scales")
    assert qs is None or (qs and all(math.isfinite(s) and s > 0 for s in qs))

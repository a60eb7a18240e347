"""The real-photo recipe configs (configs/train_*_lite2_real.yaml) are one recipe: the same data, views, cache,
schedule and backbone for every head; they differ only where a head's paper or structure requires it."""
from __future__ import annotations

from pathlib import Path

import pytest

from glimr.train.trainer import load_config

REPO = Path(__file__).resolve().parents[2]
HEADS = ["gem", "glam", "cider", "ugalr", "dplg", "dolg"]
# what may differ between heads: the model, its head settings, the paper's ArcFace margin (+ UGALR's lambda),
# UGALR's cache stage (res5 trains), GeM's PCA-initialised whitening FC (the GeM paper) and the output folder
ALLOWED = {"model", "head_kwargs", "loss.margin", "loss.inter_weight", "cache.dir", "cache.stage",
           "cache.keep_res4", "optim.init_whiten", "run.out"}


def _flat(d: dict, pre: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "head_kwargs":
            out.update(_flat(v, f"{pre}{k}."))
        else:
            out[f"{pre}{k}"] = v
    return out


@pytest.fixture(scope="module")
def recipes():
    return {h: load_config(REPO / "configs" / f"train_{h}_lite2_real.yaml") for h in HEADS}


def test_one_recipe_for_every_head(recipes):
    base = _flat(recipes["gem"].to_dict())
    for h, cfg in recipes.items():
        flat = _flat(cfg.to_dict())
        differ = {k for k in base if base[k] != flat[k]}
        assert differ <= ALLOWED, (h, differ - ALLOWED)
        assert cfg.model == f"{h}-lite2" and cfg.run.out == f"runs/{h}-lite2-real"
        assert cfg.data.kind == "views" and cfg.cache.enabled and cfg.loss.loc_weight == 0
    assert recipes["ugalr"].cache.stage == "res4" and recipes["gem"].cache.stage == "res5"
    assert {recipes[h].loss.margin for h in ("ugalr", "dplg")} == {0.15}       # UGALR, DPLG: m = 0.15
    assert recipes["glam"].loss.margin == 0.3 and recipes["ugalr"].loss.inter_weight == 0.6
    assert recipes["gem"].optim.init_whiten == "pca"


def test_recipe_never_reads_a_benchmark(recipes):
    for cfg in recipes.values():
        folders = [*cfg.data.photos, cfg.data.groups]
        assert all(Path(f).parts[-1] in ("photos", "lund", "webcam") for f in folders)
        assert not any(b in Path(f).parts for f in folders for b in ("ukbench", "real-dev", "coil100"))

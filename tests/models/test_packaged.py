"""The trained model that ships in glimr/models/weights: head-only weights on the packaged Lite0 backbone."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from glimr.models.packaged import PACKAGED, WEIGHTS_DIR, load_packaged, packaged_checkpoint, packaged_models


def test_packaged_weights_are_small_head_only_and_documented():
    assert PACKAGED, "no packaged model"
    for name in PACKAGED:
        st = packaged_checkpoint(name)
        assert st.is_file() and st.stat().st_size <= 30 * 2**20
        cfg = json.loads(st.with_suffix(".json").read_text())
        prefixes = cfg["partial"]["prefixes"]
        assert prefixes[0] == "head." and set(prefixes) <= {"head.", "pcaw."}       # never the backbone
        assert all(k.startswith(tuple(prefixes)) for k in load_file(str(st)))
        assert ("pcaw." in prefixes) == ("pca_whiten" in cfg)
        # trained (head and/or whitening) on training photos only, never on a benchmark set
        fitted_on = json.dumps([cfg.get("train", {}).get("config", {}).get("data"), cfg.get("pca_whiten")])
        for bench in ("ukbench", "real-dev", "coil100", "clutter"):
            assert bench not in fitted_on.lower()
    card = (WEIGHTS_DIR / "MODEL_CARD.md").read_text()
    for name in PACKAGED:
        assert name in card
    assert {m["name"] for m in packaged_models()} == set(PACKAGED)


@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_packaged_model_loads_offline_and_describes_real_photos(name, shared_data):
    from glimr.extract.multiscale import extract
    from glimr.models.registry import build_model

    net = load_packaged(name)
    assert net.name == name and not net.training
    ref = build_model(json.loads(packaged_checkpoint(name).with_suffix(".json").read_text())["name"])
    for k, v in ref.backbone.state_dict().items():              # the backbone is the packaged pretrained one
        assert torch.equal(net.backbone.state_dict()[k], v)
    photos = sorted((shared_data / "photos").glob("*.JPEG"))[:3]
    d = extract(net, photos, max_size=256, workers=0, progress=False, precision="fp32").descriptors
    assert d.shape == (3, net.dim)
    assert np.allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-4)
    assert (d @ d.T)[0, 1] < 0.99                                # different photos, different descriptors

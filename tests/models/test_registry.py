"""The registry says which models have trained weights, and warns when a head's weights are random."""
import json
import warnings

import pytest

from glimr.cli import main
from glimr.models.registry import UntrainedHeadWarning, available_models, build_model, weights_status


def test_weights_status_of_each_kind_of_model():
    assert weights_status("gem-lite0") == "off-the-shelf"
    assert weights_status("gem-lite0", {"dim": 256}) == "untrained"   # a whitening FC starts random
    assert weights_status("glam-lite0") == "untrained"
    assert weights_status("cider-lite2") == "untrained"
    assert weights_status("cider-lite0-composites") == "trained"
    rows = {r["name"]: r["weights"] for r in available_models()}
    assert rows["dplg-resnet50"] == "untrained" and rows["gem-lite2"] == "off-the-shelf"


def test_an_untrained_head_warns_and_is_marked():
    with pytest.warns(UntrainedHeadWarning, match="random head weights"):
        net = build_model("cider-lite0")
    assert net.config.get("untrained_head") is True


def test_off_the_shelf_and_packaged_models_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedHeadWarning)
        assert "untrained_head" not in build_model("gem-lite0").config
        assert "untrained_head" not in build_model("cider-lite0-composites").config


def test_glimr_models_says_which_are_trained(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["models"]}
    assert rows["glam-lite0"]["weights"] == "untrained"
    assert rows["cider-lite0-composites"]["weights"] == "trained"
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if " ugalr-lite0 " in x)
    assert "untrained" in line

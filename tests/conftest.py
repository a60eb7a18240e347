"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

# Real images and ground truth live outside the repository, in ../shared/data (see its README.md).
SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder (``../shared/data`` relative to the repository root)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared test data not found at '{SHARED_DATA}': the tests need ../shared/data")
    return SHARED_DATA


@pytest.fixture(scope="session")
def default_model():
    """The offline default model (real packaged ImageNet weights), in eval mode; built once per session."""
    from glimr.models.registry import DEFAULT_MODEL, build_model

    return build_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def lite0_gem():
    """Off-the-shelf EfficientNet-Lite0 + GeM (packaged ImageNet weights)."""
    from glimr.models.registry import build_model

    return build_model("gem-lite0")


# ---- whitening (tests/models/test_whiten.py, tests/train/test_whiten_cli.py) -----------------------------
WHITEN_SIZE = 128


@pytest.fixture(scope="session")
def whiten_photos(shared_data):
    """20 real training photos to fit whitenings on."""
    return sorted((shared_data / "photos").glob("*.JPEG"))[:20]


@pytest.fixture(scope="session")
def whiten_plain_descs(whiten_photos, lite0_gem):
    """Their gem-lite0 descriptors at longest side WHITEN_SIZE, fp32: what a whitening is fitted on."""
    from glimr.extract.multiscale import extract

    return extract(lite0_gem, whiten_photos, max_size=WHITEN_SIZE, workers=0, progress=False,
                   precision="fp32").descriptors

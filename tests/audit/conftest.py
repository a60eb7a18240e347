"""Shared fixtures of the audit tests: a planted-overlap training set and eval set built from real photos
(glimr.audit.planted), audited once per session through the real CLI (real model, FAISS, SQLite, OpenCV)."""
from __future__ import annotations

import pytest

# small and fast: images of 384 px, the global descriptor at 256 px, the top 10 (the training set has 42
# images); the verification thresholds are the defaults
AUDIT_ARGS = ["--model", "gem-lite0", "--max-size", "256", "--top", "10", "--quiet", "--workers", "0"]


@pytest.fixture(scope="session")
def audit_args() -> list[str]:
    return list(AUDIT_ARGS)


@pytest.fixture(scope="session")
def planted(tmp_path_factory, shared_data):
    from glimr.audit.planted import build_planted

    return build_planted(tmp_path_factory.mktemp("planted"), shared_data / "photos", shared_data / "ukbench",
                         train_photos=16, views=2, planted=(3, 17, 42), decoys=(5, 60), others=(8, 25, 70),
                         negatives=10, size=384, bg_size=512, seed=0)


@pytest.fixture(scope="session")
def planted_audit(planted, tmp_path_factory):
    """(AUDIT_DIR, the CLI's stdout) of `glimr audit` on the planted set."""
    import contextlib
    import io

    from glimr.cli import main

    out = tmp_path_factory.mktemp("audit") / "audit"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["audit", planted["train_csv"], "--images", planted["images"], "--against", planted["eval"],
                   "--out", str(out), *AUDIT_ARGS])
    assert rc == 0
    return out, buf.getvalue()


@pytest.fixture(scope="session")
def audit_fn(lite0_gem):
    """run_audit (glimr.audit.pipeline) with the CLI's settings of AUDIT_ARGS and the session's gem-lite0:
    ``audit_fn(train_csv, images, against, out, **kw) -> (summary, log lines)``."""
    from glimr.audit.overlap import AuditSettings
    from glimr.audit.pipeline import run_audit
    from glimr.extract.multiscale import ExtractSettings

    def run(train_csv, images, against, out, **kw):
        lines: list[str] = []
        ext = ExtractSettings(model="gem-lite0", max_size=256, workers=0)
        s = run_audit(train_csv, images, against, out, lite0_gem, ext, AuditSettings(top=10), progress=False,
                      log=lines.append, **kw)
        return s, "\n".join(lines)
    return run

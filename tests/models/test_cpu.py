"""CPU settings: the allocator tuning is applied once and leaves results unchanged; worker defaults."""
from __future__ import annotations

import subprocess
import sys

import pytest


def _descriptors_in_subprocess(tuning: str, shared_data) -> list[float]:
    code = f"""
import json, sys
from glimr.models.cpu import tune_allocator
from glimr.models.registry import build_model
from glimr.extract.multiscale import extract
applied = tune_allocator()
d = extract(build_model("gem-lite0"), [{str(shared_data / 'ukbench' / 'ukbench00000.jpg')!r}], max_size=160,
            workers=0, progress=False, precision="fp32").descriptors[0]
print(json.dumps({{"applied": applied, "d": d[:64].tolist()}}))
"""
    import json
    import os

    env = dict(os.environ, GLIMR_MALLOC_TUNING=tuning)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_allocator_tuning_is_applied_on_glibc_and_changes_no_result(shared_data):
    import numpy as np

    on, off = _descriptors_in_subprocess("1", shared_data), _descriptors_in_subprocess("0", shared_data)
    assert off["applied"] is False
    if sys.platform.startswith("linux"):
        assert on["applied"] is True
    np.testing.assert_allclose(on["d"], off["d"], atol=1e-6)


def test_workers_default_by_cores(monkeypatch):
    from glimr.models import cpu

    monkeypatch.setattr(cpu, "cpu_cores", lambda: 2)
    assert cpu.resolve_workers(None) == 0
    monkeypatch.setattr(cpu, "cpu_cores", lambda: 16)
    assert cpu.resolve_workers(None) == 4
    monkeypatch.setattr(cpu, "cpu_cores", lambda: 6)
    assert cpu.resolve_workers(None) == 3 and cpu.resolve_workers(1) == 1
    with pytest.raises(ValueError, match="workers"):
        cpu.resolve_workers(-1)

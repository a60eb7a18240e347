"""glimr.io.atomic: whole files or nothing, ordinary modes, no temporary files left behind."""
from __future__ import annotations

import os

import numpy as np
import pytest

from glimr.io.atomic import atomic_write_bytes, atomic_write_npy


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_bytes_are_written_whole_with_mode_0644_and_parents_created(tmp_path, umask022):
    p = tmp_path / "a" / "b" / "f.json"
    atomic_write_bytes(p, b'{"x": 1}')
    assert p.read_bytes() == b'{"x": 1}'
    assert (p.stat().st_mode & 0o777) == 0o644           # not mkstemp's 0600
    atomic_write_bytes(p, b"second")                    # replaces, same mode
    assert p.read_bytes() == b"second" and (p.stat().st_mode & 0o777) == 0o644
    assert os.listdir(p.parent) == ["f.json"]


def test_the_mode_follows_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write_bytes(tmp_path / "private", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o600


def test_npy_round_trip_and_no_pickles(tmp_path, umask022):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    atomic_write_npy(tmp_path / "a.npy", a)
    assert np.array_equal(np.load(tmp_path / "a.npy", allow_pickle=False), a)
    assert (tmp_path / "a.npy").stat().st_mode & 0o777 == 0o644
    with pytest.raises(ValueError):
        atomic_write_npy(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object))
    assert sorted(os.listdir(tmp_path)) == ["a.npy"]     # nothing of the refused write, no temp file



def test_an_error_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"old content")

    real_fsync = os.fsync

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(p, b"new content that never lands")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert p.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["f.bin"]

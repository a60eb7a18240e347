import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from glimr.extract.multiscale import ExtractSettings
from glimr.index.build import build_index
from glimr.index.settings import IndexConfig, IndexSettings
from glimr.index.store import IndexStore, IndexStoreError, Row


def _cfg(dim: int, max_size: int = 512) -> IndexConfig:
    return IndexConfig(ExtractSettings(model="gem-lite0", max_size=max_size), IndexSettings(dim=dim))


def _copy_ukb(shared_data, dst, idx):
    dst.mkdir(parents=True, exist_ok=True)
    for i in idx:
        shutil.copy(shared_data / "ukbench" / f"ukbench{i:05d}.jpg", dst / f"ukbench{i:05d}.jpg")
    return dst


def _by_path(store):
    vids, paths = store.live()
    vecs = np.asarray(store.vectors())
    return {p: vecs[v] for v, p in zip(vids, paths)}


def test_build_search_and_incremental_update(shared_data, lite0_gem, tmp_path):
    imgs = _copy_ukb(shared_data, tmp_path / "imgs", range(12))
    (imgs / "sub").mkdir()
    shutil.copy(shared_data / "ukbench" / "ukbench00020.jpg", imgs / "sub" / "x.jpg")
    rep = build_index(imgs, tmp_path / "idx", lite0_gem, model_name="gem-lite0", max_size=256, workers=0,
                      chunk_size=5, progress=False)
    assert (rep.added, rep.unchanged, rep.errors, rep.total) == (13, 0, 0, 13)
    with IndexStore.open(tmp_path / "idx") as st:
        assert st.faiss_is_current()
        first = _by_path(st)
        assert "sub/x.jpg" in first
        # querying with a database image finds it first, with cosine 1
        hits = st.search(first["ukbench00005.jpg"][None], 4)[0]
        assert hits[0][0] == "ukbench00005.jpg" and hits[0][1] == pytest.approx(1, abs=1e-4)
        assert {p for p, _ in hits[:4]} <= {f"ukbench{i:05d}.jpg" for i in range(4, 8)} | {"ukbench00005.jpg"}

    # nothing changed: nothing embedded again
    rep = build_index(imgs, tmp_path / "idx", lite0_gem, model_name="gem-lite0", max_size=256, workers=0,
                      progress=False)
    assert (rep.added, rep.unchanged, rep.total) == (0, 13, 13)
    # touched but same content: no work; one removed, one changed, one new
    os.utime(imgs / "ukbench00000.jpg", (1, 1))
    (imgs / "ukbench00001.jpg").unlink()
    shutil.copy(shared_data / "ukbench" / "ukbench00100.jpg", imgs / "ukbench00002.jpg")
    shutil.copy(shared_data / "ukbench" / "ukbench00200.jpg", imgs / "new.jpg")
    rep = build_index(imgs, tmp_path / "idx", lite0_gem, model_name="gem-lite0", max_size=256, workers=0,
                      progress=False)
    assert (rep.added, rep.unchanged, rep.removed, rep.total) == (2, 11, 1, 13)
    with IndexStore.open(tmp_path / "idx") as st:
        now = _by_path(st)
        assert "ukbench00001.jpg" not in now and "new.jpg" in now
        assert float(now["ukbench00002.jpg"] @ first["ukbench00002.jpg"]) < 0.99  # re-embedded
        np.testing.assert_array_equal(now["ukbench00003.jpg"], first["ukbench00003.jpg"])
        assert len(st.search(now["new.jpg"][None], 50)[0]) == 13  # FAISS holds the live rows only


def test_bad_files_are_recorded_and_the_build_goes_on(shared_data, lite0_gem, tmp_path):
    imgs = _copy_ukb(shared_data, tmp_path / "imgs", range(3))
    (imgs / "truncated.jpg").write_bytes((imgs / "ukbench00000.jpg").read_bytes()[:3000])
    (imgs / "empty.png").write_bytes(b"")
    (imgs / "readme.jpg").write_text("hello")
    rep = build_index(imgs, tmp_path / "idx", lite0_gem, model_name="gem-lite0", max_size=128, workers=2,
                      chunk_size=2, progress=False)
    assert (rep.added, rep.errors, rep.total) == (3, 3, 3)
    with IndexStore.open(tmp_path / "idx") as st:
        errs = dict(st.errors())
    assert sorted(errs) == ["empty.png", "readme.jpg", "truncated.jpg"]
    assert all(name in msg for name, msg in errs.items())
    # unchanged bad files are not retried; fixing one brings it in
    shutil.copy(imgs / "ukbench00001.jpg", imgs / "truncated.jpg")
    rep = build_index(imgs, tmp_path / "idx", lite0_gem, model_name="gem-lite0", max_size=128, workers=0,
                      progress=False)
    assert (rep.added, rep.errors, rep.total) == (1, 0, 4)


def test_incompatible_settings_and_wrong_folders_are_refused(shared_data, lite0_gem, tmp_path):
    imgs = _copy_ukb(shared_data, tmp_path / "imgs", range(2))
    build_index(imgs, tmp_path / "idx", lite0_gem, model_name="gem-lite0", max_size=128, workers=0, progress=False)
    with pytest.raises(IndexStoreError, match="cannot be mixed"):
        build_index(imgs, tmp_path / "idx", lite0_gem, model_name="gem-lite0", max_size=256, workers=0,
                    progress=False)
    with pytest.raises(IndexStoreError, match="not a glimr index"):
        IndexStore.open(tmp_path / "imgs")
    with pytest.raises(IndexStoreError, match="not a glimr index"):
        build_index(imgs, imgs, lite0_gem, model_name="gem-lite0", workers=0, progress=False)
    with pytest.raises(FileNotFoundError, match="nope"):
        build_index(tmp_path / "nope", tmp_path / "idx2", lite0_gem, model_name="gem-lite0", progress=False)
    with IndexStore.create_or_open(tmp_path / "idx", _cfg(1280, max_size=128)), \
            pytest.raises(IndexStoreError, match="another process"):
        IndexStore.create_or_open(tmp_path / "idx", _cfg(1280, max_size=128))


def test_uncommitted_vectors_are_dropped_on_reopen(tmp_path):
    cfg = _cfg(4)
    with IndexStore.create_or_open(tmp_path / "idx", cfg) as st:
        st.commit_chunk([Row("a.jpg", "h", 1, 1.0, "ok", None, None)], np.ones((1, 4), np.float32))
    with open(tmp_path / "idx" / "vectors.f32", "ab") as f:  # a killed build appended but never committed
        f.write(np.full((3, 4), 7, np.float32).tobytes())
    with IndexStore.create_or_open(tmp_path / "idx", cfg) as st:
        assert st.n_vectors == 1 and (tmp_path / "idx" / "vectors.f32").stat().st_size == 16
        assert not st.faiss_is_current()
        assert st.search(np.ones((1, 4), np.float32), 5)[0] == [("a.jpg", pytest.approx(4.0))]


def test_killed_build_resumes_to_the_same_index(shared_data, tmp_path):
    """SIGKILL a real `glimr index build` midway; the resumed build equals an uninterrupted one."""
    imgs = _copy_ukb(shared_data, tmp_path / "imgs", range(40))
    cmd = [sys.executable, "-m", "glimr.cli", "index", "build", str(imgs), "--index", str(tmp_path / "killed"),
           "--max-size", "160", "--chunk-size", "4", "--batch-size", "4", "--workers", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = tmp_path / "killed" / "meta.sqlite"
    deadline = time.time() + 240
    committed = 0
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                con = sqlite3.connect(db, timeout=1)
                committed = con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
                con.close()
            except sqlite3.OperationalError:
                pass
        if committed >= 8:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert 8 <= committed < 40
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "40 images searchable" in done.stdout and "unchanged" in done.stdout
    ref = subprocess.run(cmd[:7] + [str(tmp_path / "clean")] + cmd[8:], capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    with IndexStore.open(tmp_path / "killed") as a, IndexStore.open(tmp_path / "clean") as b:
        va, vb = _by_path(a), _by_path(b)
        assert a.n_vectors == 40  # nothing duplicated
        assert a.faiss_is_current()
    assert sorted(va) == sorted(vb) and len(va) == 40
    for p in va:
        np.testing.assert_allclose(va[p], vb[p], atol=1e-5)

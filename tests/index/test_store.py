import os
import random
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


def test_build_killed_many_times_resumes_to_the_same_index(shared_data, tmp_path):
    """SIGKILL a real `glimr index build` (48 images) at random moments, 10 times, resuming each time; the final index equals
    a clean build vector for vector (fp32, --precision fp32: equal to 1e-6) with nothing lost or duplicated."""
    imgs = _copy_ukb(shared_data, tmp_path / "imgs", range(48))
    cmd = [sys.executable, "-m", "glimr.cli", "index", "build", str(imgs), "--index", str(tmp_path / "killed"),
           "--model", "gem-lite0", "--max-size", "128", "--chunk-size", "2", "--batch-size", "2", "--workers", "0",
           "--precision", "fp32"]
    db = tmp_path / "killed" / "meta.sqlite"
    rng = random.Random(12)
    kills, at = 0, [0]

    def committed() -> int:
        try:
            con = sqlite3.connect(db, timeout=5)
            try:
                return con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
            finally:
                con.close()
        except sqlite3.OperationalError:  # the table is not there yet
            return 0

    while kills < 10:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not db.exists() and proc.poll() is None and time.time() < deadline:  # the model is loaded
            time.sleep(0.02)
        # the kill points depend on progress, not on this machine's speed: a fast, idle machine commits a
        # chunk in tens of milliseconds, so a fixed delay could let the whole build finish first
        if kills % 2:  # odd kills: somewhere in the setup or the first chunk (whichever a random delay hits)
            t_end = time.time() + rng.uniform(0, 0.5)
            while time.time() < t_end and committed() <= at[-1] and proc.poll() is None:
                time.sleep(0.005)
        else:  # even kills: once this run has committed something, early in the next chunk
            while committed() <= at[-1] and proc.poll() is None and time.time() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.02))
        if proc.poll() is not None:
            break  # it finished first: the remaining kills cannot happen
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        at.append(committed())
    assert kills == 10, f"the build finished after {kills} kills (committed rows at each: {at})"
    assert len({n for n in at if 0 < n < 48}) >= 3, f"too few kills landed mid-build: {at}"
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "48 images searchable" in done.stdout
    ref = subprocess.run(cmd[:7] + [str(tmp_path / "clean")] + cmd[8:], capture_output=True, text=True, check=False)
    assert ref.returncode == 0, ref.stderr
    with IndexStore.open(tmp_path / "killed") as a, IndexStore.open(tmp_path / "clean") as b:
        va, vb = _by_path(a), _by_path(b)
        assert a.n_vectors == 48  # nothing duplicated
        assert a.faiss_is_current()
        assert a.stats()["errors"] == 0
    assert sorted(va) == sorted(vb) and len(va) == 48
    for p in va:
        np.testing.assert_allclose(va[p], vb[p], atol=1e-6, rtol=0)

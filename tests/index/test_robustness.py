"""Issue #12 part B: the index folder and the build on real images. No crash, no silent wrong answer, no lost index.

Descriptors compared here are fp32 (gem-lite0, --precision fp32 where the CLI runs).
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from glimr.cli import main
from glimr.index.build import build_index, compact_index
from glimr.index.store import IndexStore, IndexStoreError
from tests.index.conftest import BAD_FILES, NON_UTF8, NON_UTF8_STORED, copy_ukb

REPO = Path(__file__).resolve().parents[2]
KW = {"model_name": "gem-lite0", "max_size": 128, "workers": 0, "precision": "fp32", "progress": False}
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _by_path(store):
    vids, paths = store.live()
    vecs = np.asarray(store.vectors())
    return {p: vecs[v].copy() for v, p in zip(vids, paths)}


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _cli(*args, cwd=None, user=None, timeout=300):
    """A real `glimr` process (this worktree's code), optionally as an unprivileged user."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = (NOBODY if user == "nobody" else []) + [sys.executable, "-m", "glimr.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout, check=False)


def _shared_tmp() -> Path:
    """A folder under /tmp that the unprivileged user can reach (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="glimr-relb-", dir="/tmp"))
    d.chmod(0o755)
    return d


# ---- 1 + 8: bad files are reported and skipped, good ones indexed, the build finishes -------------------------
def test_bad_corpus_is_indexed_and_every_bad_file_reported(bad_corpus, lite0_gem, tmp_path, capsys):
    root, good = bad_corpus
    rep = build_index(root, tmp_path / "idx", lite0_gem, chunk_size=4, **{**KW, "progress": True})
    err = capsys.readouterr().err
    assert (rep.added, rep.errors, rep.total) == (len(good), len(BAD_FILES), len(good))
    with IndexStore.open(tmp_path / "idx") as st:
        errs = dict(st.errors())
        vecs = _by_path(st)
        assert sorted(vecs) == sorted(good)
        for name, v in vecs.items():  # each good file really embedded (not a zero row)
            assert abs(float(np.linalg.norm(v)) - 1) < 1e-5, name
        # the non-UTF-8 name is found by its own photo, under its escaped name
        hits = st.search(vecs[NON_UTF8_STORED][None], 1)[0]
        assert hits[0][0] == NON_UTF8_STORED
    assert sorted(errs) == sorted(BAD_FILES)
    for name, words in BAD_FILES.items():
        assert name in errs[name] and words in errs[name], (name, errs[name])
        assert f"skipped: cannot read image '{root / name}'" in err
    assert "loop" in err and "not scanned" in err  # the symlink loop is reported, not walked
    # a rerun over the same folder: nothing new, no crash; unchanged bad files are not retried, the broken link
    # (nothing to compare) is, and is still bad
    rep = build_index(root, tmp_path / "idx", lite0_gem, chunk_size=4, **KW)
    assert (rep.added, rep.unchanged, rep.errors, rep.total) == (0, len(good) + 5, 1, len(good))
    # the CLI shows the non-UTF-8 name escaped, rc 0
    r = _cli("search", tmp_path / "idx", root / NON_UTF8, "--top", "2", "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    assert NON_UTF8_STORED in r.stdout.splitlines()[0]


def test_unreadable_file_and_folder_for_an_unprivileged_user(shared_data):
    """chmod 000 stops only a non-root user: the build runs as `nobody`. An unreadable file is an error row; an
    unreadable sub-folder keeps its indexed images (warned: not scanned); neither aborts the build."""
    base = _shared_tmp()
    try:
        imgs = copy_ukb(shared_data, base / "imgs", range(3))
        copy_ukb(shared_data, imgs / "sub", range(4, 6))
        shutil.chown(base, "nobody")
        for p in [imgs, *imgs.rglob("*")]:
            shutil.chown(p, "nobody")
        args = ["index", "build", imgs, "--index", base / "idx", "--model", "gem-lite0", "--max-size", "128",
                "--workers", "0", "--precision", "fp32"]
        r = _cli(*args, user="nobody")
        assert r.returncode == 0, r.stderr
        assert "5 images searchable" in r.stdout
        (imgs / "ukbench00001.jpg").chmod(0)
        (imgs / "ukbench00002.jpg").chmod(0)
        os.utime(imgs / "ukbench00002.jpg", (1, 1))  # changed: must be read again, cannot be
        (imgs / "sub").chmod(0)
        copy_ukb(shared_data, imgs, [7])
        shutil.chown(imgs / "ukbench00007.jpg", "nobody")
        r = _cli(*args, user="nobody")
        assert r.returncode == 0, r.stderr
        assert f"'{imgs / 'sub'}': cannot read folder (Permission denied); it was not scanned, its 2 indexed " \
               "images are kept" in r.stderr
        assert "5 images searchable: 1 added" in r.stdout and "1 unreadable" in r.stdout
        assert "2 kept from folders that could not be read" in r.stdout
        with IndexStore.open(base / "idx") as st:
            assert sorted(st.live()[1]) == ["sub/ukbench00004.jpg", "sub/ukbench00005.jpg", "ukbench00000.jpg",
                                            "ukbench00001.jpg", "ukbench00007.jpg"]
            (path, msg), = st.errors()
        assert path == "ukbench00002.jpg" and "permission denied" in msg
    finally:
        for p in [base, *base.rglob("*")]:
            if not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(base)


# ---- 4: nothing is written before every setting is validated; a locked index is not touched -----------------
def _rc(argv) -> int:
    """main()'s exit status, argparse's refusals included."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def test_refused_builds_change_nothing(shared_data, lite0_gem, tmp_path, capsys):
    imgs = copy_ukb(shared_data, tmp_path / "imgs", range(3))
    build_index(imgs, tmp_path / "idx", lite0_gem, **KW)
    with IndexStore.for_build(tmp_path / "idx", IndexStore._read_config(tmp_path / "idx")):  # a running build
        before = _snapshot(tmp_path / "idx")
        r = _cli("index", "build", imgs, "--index", tmp_path / "idx", "--model", "gem-lite0", "--max-size", "128",
                 "--factory", "HNSW32", "--chunk-size", "7")
        assert r.returncode == 2 and "being written by another process" in r.stderr and "nothing was changed" \
            in r.stderr
        assert _snapshot(tmp_path / "idx") == before
    before = _snapshot(tmp_path / "idx")
    for bad, words in ((["--factory", "IVF,Nope"], "bad FAISS factory string 'IVF,Nope'"),
                       (["--factory", "PQ7"], "bad FAISS factory string 'PQ7'"),
                       (["--max-size", "0"], "--max-size: 0 is out of range"),
                       (["--chunk-size", "-1"], "--chunk-size: -1 is out of range"),
                       (["--scales", "1,nan"], "bad scales"),
                       (["--max-pixels", "0"], "--max-pixels: 0 is out of range")):
        for index in (tmp_path / "idx", tmp_path / "new"):
            rc = _rc(["index", "build", str(imgs), "--index", str(index), "--model", "gem-lite0", "--max-size",
                      "128", "--workers", "0", *bad])
            assert rc == 2 and words in capsys.readouterr().err
    assert _snapshot(tmp_path / "idx") == before
    assert not (tmp_path / "new").exists()
    # a hand-edited index.json with a bad value is named clearly, by search and by build
    cfg = json.loads((tmp_path / "idx" / "index.json").read_text())
    cfg["extract"]["max_size"] = 0
    (tmp_path / "idx" / "index.json").write_text(json.dumps(cfg))
    with pytest.raises(IndexStoreError, match=r"index.json' is damaged or holds a bad setting \(max_size "
                                              r"\(--max-size\) must be from 1 to 16384, got 0\)"):
        IndexStore.open(tmp_path / "idx")


# ---- 5: --prune and compaction ---------------------------------------------------------------------------------
def test_a_build_that_would_empty_the_index_needs_prune_and_compaction_keeps_every_vector(
        shared_data, lite0_gem, tmp_path):
    imgs = copy_ukb(shared_data, tmp_path / "imgs", range(8))
    build_index(imgs, tmp_path / "idx", lite0_gem, chunk_size=3, **KW)
    with IndexStore.open(tmp_path / "idx") as st:
        first = _by_path(st)
    before = _snapshot(tmp_path / "idx")
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", copy_ukb(shared_data, tmp_path / "few", range(3))):
        with pytest.raises(IndexStoreError, match=r"would remove (8|5) of the 8 images .* --prune\. Nothing was "
                                                  "changed"):
            build_index(folder, tmp_path / "idx", lite0_gem, **KW)
        assert _snapshot(tmp_path / "idx") == before
    # removing a few is an ordinary update; the dead rows stay until they are many
    (imgs / "ukbench00007.jpg").unlink()
    rep = build_index(imgs, tmp_path / "idx", lite0_gem, **KW)
    assert (rep.removed, rep.compacted, rep.total) == (1, 0, 7)
    # --prune: 5 of 7 go, the dead rows exceed half of vectors.f32: compacted in the same build
    rep = build_index(tmp_path / "few", tmp_path / "idx", lite0_gem, prune=True, **KW)
    assert (rep.removed, rep.compacted, rep.total) == (4, 5, 3)
    assert (tmp_path / "idx" / "vectors.f32").stat().st_size == 3 * 1280 * 4
    with IndexStore.open(tmp_path / "idx") as st:
        now = _by_path(st)
        assert st.n_vectors == 3 and sorted(st.live()[0]) == [0, 1, 2]
        for p, v in now.items():
            np.testing.assert_array_equal(v, first[p])  # the same bytes, renumbered
        assert st.search(now["ukbench00002.jpg"][None], 5)[0][0][0] == "ukbench00002.jpg"
    # `glimr index compact`: nothing left to drop
    assert compact_index(tmp_path / "idx", progress=False) == 0


def test_compaction_killed_at_each_step_resumes(shared_data, lite0_gem, tmp_path):
    """The two crash windows of a compaction: copies written but not committed (dropped on the next open), and
    committed but not yet renamed (a reader uses the copies, the next writer finishes the renames)."""
    imgs = copy_ukb(shared_data, tmp_path / "imgs", range(6))
    build_index(imgs, tmp_path / "idx", lite0_gem, **KW)
    for i in (0, 2, 4):
        (imgs / f"ukbench{i:05d}.jpg").unlink()
    build_index(imgs, tmp_path / "idx", lite0_gem, compact_fraction=1.0, **KW)  # 3 dead rows, not compacted
    with IndexStore.open(tmp_path / "idx") as st:
        ref = _by_path(st)
    vec = tmp_path / "idx" / "vectors.f32"
    # window 1: an uncommitted copy
    (tmp_path / "idx" / "vectors.f32.compact").write_bytes(b"\0" * 100)
    with IndexStore.create_or_open(tmp_path / "idx", IndexStore._read_config(tmp_path / "idx")) as st:
        assert not (tmp_path / "idx" / "vectors.f32.compact").exists() and st.n_vectors == 6
        # window 2: run the compaction up to its commit, then "die" before the renames
        real = IndexStore._finish_compaction
        IndexStore._finish_compaction = lambda self: None
        try:
            assert st.compact() == 3
        finally:
            IndexStore._finish_compaction = real
    assert vec.stat().st_size == 6 * 1280 * 4 and (tmp_path / "idx" / "vectors.f32.compact").exists()
    with IndexStore.open(tmp_path / "idx", quiet=True) as st:  # a reader in between sees the compacted rows
        got = _by_path(st)
    assert sorted(got) == sorted(ref) and all(np.array_equal(got[p], ref[p]) for p in ref)
    assert compact_index(tmp_path / "idx", progress=False) == 0  # the next writer finishes the renames
    assert vec.stat().st_size == 3 * 1280 * 4 and not (tmp_path / "idx" / "vectors.f32.compact").exists()
    with IndexStore.open(tmp_path / "idx") as st:
        got = _by_path(st)
    assert all(np.array_equal(got[p], ref[p]) for p in ref)


# ---- 6: one place opens and checks an index folder ---------------------------------------------------------------
def test_damaged_index_folders(shared_data, lite0_gem, tmp_path, capsys):
    imgs = copy_ukb(shared_data, tmp_path / "imgs", range(6))
    build_index(imgs, tmp_path / "idx", lite0_gem, **KW)
    with IndexStore.open(tmp_path / "idx") as st:
        q = _by_path(st)["ukbench00001.jpg"][None]
        ref = st.search(q, 6)[0]

    def damaged(name, fn):
        d = tmp_path / name
        shutil.copytree(tmp_path / "idx", d)
        fn(d)
        return d

    # faiss.index garbage, missing or stale: rebuilt from vectors.f32, said on stderr, same answers, saved
    for name, fn, word in (("garbage", lambda d: (d / "faiss.index").write_bytes(b"garbage" * 10), "damaged"),
                           ("nofaiss", lambda d: (d / "faiss.index").unlink(), "missing"),
                           ("stale", lambda d: (d / "faiss.json").write_text('{"n_vectors": 2}'), "stale")):
        d = damaged(name, fn)
        capsys.readouterr()
        with IndexStore.open(d) as st:
            assert [p for p, _ in st.search(q, 6)[0]] == [p for p, _ in ref]
        err = capsys.readouterr().err
        assert f"'{d / 'faiss.index'}' was {word}" in err and "rebuilt from vectors.f32 and saved" in err
        with IndexStore.open(d) as st:  # repaired for good: no message the second time
            assert st.faiss_is_current()
        assert capsys.readouterr().err == ""
    # what cannot be repaired: one clear error each, and nothing created
    d = damaged("nodb", lambda d: (d / "meta.sqlite").unlink())
    with pytest.raises(IndexStoreError, match="meta.sqlite' is missing"):
        IndexStore.open(d)
    assert not (d / "meta.sqlite").exists()
    r = _cli("search", d, imgs / "ukbench00001.jpg")
    assert r.returncode == 2 and "meta.sqlite' is missing" in r.stderr and not (d / "meta.sqlite").exists()
    d = damaged("baddb", lambda d: (d / "meta.sqlite").write_bytes(b"not a database at all" * 100))
    with pytest.raises(IndexStoreError, match="meta.sqlite' is damaged or unreadable"):
        IndexStore.open(d)
    d = damaged("short", lambda d: os.truncate(d / "vectors.f32", 1280 * 4 * 2 + 10))
    with pytest.raises(IndexStoreError, match="holds 2 vectors but the index committed 6"):
        IndexStore.open(d)
    d = damaged("badjson", lambda d: (d / "index.json").write_text("{nope"))
    with pytest.raises(IndexStoreError, match="index.json' is damaged"):
        IndexStore.open(d)
    r = _cli("search", d, imgs / "ukbench00001.jpg")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "index.json' is damaged" in r.stderr


# ---- 7: read-only folders; created files are 0644 ----------------------------------------------------------------
def test_read_only_index_is_searchable_and_search_writes_nothing(shared_data):
    base = _shared_tmp()
    try:
        imgs = copy_ukb(shared_data, base / "imgs", range(6))
        r = _cli("index", "build", imgs, "--index", base / "idx", "--model", "gem-lite0", "--max-size", "128",
                 "--workers", "0", "--precision", "fp32", "--diffusion", "--diffusion-k", "3")
        assert r.returncode == 0, r.stderr
        modes = {p.relative_to(base / "idx").as_posix(): p.stat().st_mode & 0o777
                 for p in (base / "idx").rglob("*") if p.is_file()}
        assert {"index.json", "faiss.index", "faiss.json", "meta.sqlite", "vectors.f32"} <= set(modes)
        assert any(k.startswith("diffusion/") for k in modes)
        assert set(modes.values()) == {0o644}, modes  # umask 022: nothing 0600
        before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in (base / "idx").iterdir()}
        (base / "idx" / "faiss.index").unlink()  # and it must rebuild FAISS in memory, without saving it
        r = _cli("search", base / "idx", imgs / "ukbench00005.jpg", "--top", "3", "--json", user="nobody")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["results"][0]["path"] == "ukbench00005.jpg"
        assert "rebuilt from vectors.f32 for this search (the folder is not writable now)" in r.stderr
        del before["faiss.index"]
        assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in (base / "idx").iterdir()} == before
    finally:
        shutil.rmtree(base)


# ---- 3: the checkpoint is recorded (absolute path + sha256) and checked --------------------------------------------
def test_checkpoint_is_recorded_and_a_replaced_one_is_refused(shared_data, tmp_path):
    weights = REPO / "glimr" / "models" / "weights"
    work = tmp_path / "work"
    work.mkdir()
    for ext in (".safetensors", ".json"):
        shutil.copy(weights / f"cider-lite0-composites{ext}", work / f"ck{ext}")
    imgs = copy_ukb(shared_data, tmp_path / "imgs", range(4))
    r = _cli("index", "build", imgs, "--index", tmp_path / "idx", "--checkpoint", "ck.safetensors", "--max-size",
             "128", "--workers", "0", cwd=work)  # a relative checkpoint path
    assert r.returncode == 0, r.stderr
    ex = json.loads((tmp_path / "idx" / "index.json").read_text())["extract"]
    assert ex["checkpoint"] == str(work / "ck.safetensors") and len(ex["checkpoint_sha256"]) == 64
    r = _cli("search", tmp_path / "idx", imgs / "ukbench00002.jpg", "--top", "1", cwd=tmp_path)  # another folder
    assert r.returncode == 0 and "ukbench00002.jpg" in r.stdout, r.stderr
    shutil.copy(weights / "cider-lite0-composites-pcaw.safetensors", work / "ck.safetensors")  # replaced
    r = _cli("search", tmp_path / "idx", imgs / "ukbench00002.jpg", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert f"the checkpoint '{work / 'ck.safetensors'}' changed since this index was built" in r.stderr
    (work / "ck.safetensors").unlink()
    r = _cli("search", tmp_path / "idx", imgs / "ukbench00002.jpg", cwd=tmp_path)
    assert r.returncode == 2 and "is gone" in r.stderr


# ---- 9: numeric arguments are bounded before any work ---------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["search", "IDX", "Q", "--top", "100000000"], ["search", "IDX", "Q", "--top", "0"],
    ["search", "IDX", "Q", "--top", "nan"], ["search", "IDX", "Q", "--qe-alpha", "inf"],
    ["search", "IDX", "Q", "--temperature", "0"], ["search", "IDX", "Q", "--temperature", "nan"],
    ["search", "IDX", "Q", "--shortlist", "0"], ["search", "IDX", "Q", "--qe-n", "-1"],
    ["search", "IDX", "Q", "--query-scales", "1,-1"], ["search", "IDX", "Q", "--query-scales", "1e9"],
    ["search", "IDX", "Q", "--crop", "0,0,inf,inf"], ["search", "IDX", "Q", "--crop", "0,0,nan,5"],
    ["index", "build", "IMGS", "--index", "NEW", "--batch-size", "0"],
    ["index", "build", "IMGS", "--index", "NEW", "--workers", "-2"],
    ["index", "build", "IMGS", "--index", "NEW", "--scales", "0"],
    ["index", "build", "IMGS", "--index", "NEW", "--ca-n", "0"],
    ["index", "build", "IMGS", "--index", "NEW", "--ca-clusters", "100000"],
    ["index", "build", "IMGS", "--index", "NEW", "--diffusion-k", "0"],
    ["index", "build", "IMGS", "--index", "NEW", "--max-size", "1e3"],
    ["extract", "IMGS", "--out", "NEW/x.npz", "--max-size", "99999"],
    ["extract", "IMGS", "--out", "NEW/x.npz", "--batch-size", "-5"],
])
def test_numeric_arguments_are_checked_before_any_work(argv, tmp_path, capsys):
    argv = [str(tmp_path / a) if a in ("IDX", "Q", "IMGS", "NEW") else a.replace("NEW", str(tmp_path / "new"))
            for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert any(m in err for m in ("out of range", "bad scales", "bad box", "not an integer", "not a finite number",
                                  "must be"))
    assert not (tmp_path / "new").exists()


def test_top_is_capped_at_the_index_size(shared_data, lite0_gem, tmp_path, capsys):
    imgs = copy_ukb(shared_data, tmp_path / "imgs", range(5))
    build_index(imgs, tmp_path / "idx", lite0_gem, **KW)
    assert main(["search", str(tmp_path / "idx"), str(imgs / "ukbench00003.jpg"), "--top", "10000", "--json",
                 "--precision", "fp32"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert len(res) == 5 and res[0]["path"] == "ukbench00003.jpg"
    with IndexStore.open(tmp_path / "idx") as st:
        assert len(st.search(np.ones((1, 1280), np.float32), 10_000)[0]) == 5


def test_sqlite_rows_of_a_non_utf8_name_are_text(bad_corpus, lite0_gem, tmp_path):
    """The stored name is valid UTF-8 text (other tools can read meta.sqlite)."""
    root, _ = bad_corpus
    build_index(root, tmp_path / "idx", lite0_gem, **KW)
    con = sqlite3.connect(tmp_path / "idx" / "meta.sqlite")
    kinds = dict(con.execute("SELECT path, typeof(path) FROM images").fetchall())
    con.close()
    assert kinds[NON_UTF8_STORED] == "text"

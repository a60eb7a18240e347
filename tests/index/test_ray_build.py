"""Issue #16: `glimr index build --ray` on a real Ray cluster: a head node and a worker node started here as
separate processes (`ray start`, 1 CPU each), the build's driver in this process or in a `glimr` process.

The collection is UKBench (300 real photos) plus bad files, at --max-size 128 so that the whole file stays
within about a minute on 2 cores. Descriptors are fp32 (gem-lite0, --precision fp32): a Ray build and a local
build run the same code on the same chunks, but with 1 torch thread per actor instead of 2, so sums may be
taken in another order; rows are compared with cosine > 0.9999 (fp32 rounding is ~1e-7).

The cluster is stopped by killing exactly the processes it started (found by a token in their environment),
not with `ray stop`, which kills every Ray process on the machine, other users' included.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from glimr.index.build import build_index
from glimr.index.ray import RaySettings, build_index_ray
from glimr.index.store import IndexStore

REPO = Path(__file__).resolve().parents[2]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]   # the `ray` command of this interpreter
MARK = "GLIMR_RAY_TEST_CLUSTER"
KW = {"model_name": "gem-lite0", "max_size": 128, "workers": 0, "precision": "fp32", "chunk_size": 16}
BAD = {"truncated.jpg": "corrupt or truncated", "empty.jpg": "empty (0 bytes)",
       "readme.jpg": "not a supported image", "dangling.jpg": "broken symbolic link"}
COS = 0.9999   # fp32 descriptors, see the module doc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_with(token: str) -> list[int]:
    """Processes whose environment holds MARK=token: those this file's cluster started (and their children)."""
    want = f"{MARK}={token}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if want in (d / "environ").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except OSError:
            pass
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stop(token: str) -> None:
    pids = _pids_with(token)
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait
        while time.monotonic() < end and (pids := [p for p in pids if _alive(p)]):
            time.sleep(0.2)
        if not pids:
            return


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Cluster:
    """A cluster whose nodes start in a background thread (while the local reference index is built)."""

    def __init__(self, cmds: list[list[str]], env: dict, address: str, token: str):
        self._address, self.token, self._error = address, token, None
        self._thread = threading.Thread(target=self._start, args=(cmds, env), daemon=True)
        self._thread.start()

    def _start(self, cmds, env) -> None:
        for cmd in cmds:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, check=False)
            if r.returncode != 0:
                self._error = f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
                return

    @property
    def address(self) -> str:
        """HOST:PORT of the head node, once both nodes are up."""
        self._thread.join(timeout=200)
        assert not self._thread.is_alive(), "the Ray nodes did not start within 200 s"
        assert self._error is None, self._error
        return self._address

    def actor_pids(self) -> list[int]:
        return [p for p in _pids_with(self.token) if _cmdline(p).startswith("ray::EmbedWorker")]


@pytest.fixture(scope="session")
def ray_cluster():
    """A head node and a worker node, 1 CPU each, as separate processes on this machine (no dashboard, no usage
    report, 100 MB object stores, free ports); the worker processes import this worktree's glimr."""
    token = uuid.uuid4().hex
    temp = Path(tempfile.mkdtemp(prefix="glimr-ray-", dir="/tmp"))  # short: Ray's unix sockets live there
    # token authentication with a token of this session's own, given to the nodes and to the drivers (this
    # process and the `glimr` processes it starts) by environment: no ~/.ray/auth_token is read or written
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({MARK: token, "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                "RAY_USAGE_STATS_ENABLED": "0", **auth})
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)
    port = _free_port()
    node = ["--num-cpus=1", "--num-gpus=0", "--object-store-memory=100000000", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1"]
    cmds = [[*RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}",
             f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}", *node],
            [*RAY, "start", f"--address=127.0.0.1:{port}", f"--dashboard-agent-listen-port={_free_port()}",
             *node]]
    cluster = Cluster(cmds, env, f"127.0.0.1:{port}", token)
    try:
        yield cluster
    finally:
        cluster._thread.join(timeout=200)
        _stop(token)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def corpus(shared_data, tmp_path_factory) -> Path:
    """UKBench's 300 photos plus bad files (a truncated JPEG, an empty file, a text file, a dangling link)."""
    root = tmp_path_factory.mktemp("ray-corpus") / "ukbench"
    shutil.copytree(shared_data / "ukbench", root)
    data = (root / "ukbench00010.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "empty.jpg").write_bytes(b"")
    (root / "readme.jpg").write_text("this is not a photo\n")
    (root / "dangling.jpg").symlink_to(root / "no-such-target.jpg")
    return root


@pytest.fixture(scope="session")
def local_index(corpus, lite0_gem, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ray-local") / "idx"
    rep = build_index(corpus, d, lite0_gem, progress=False, **KW)
    assert (rep.added, rep.errors) == (300, len(BAD))
    return d


def _rows(d: Path) -> dict[str, tuple]:
    with sqlite3.connect(f"file:{d / 'meta.sqlite'}?mode=ro", uri=True) as db:
        return {r[0]: r[1:] for r in db.execute("SELECT path, hash, size, mtime, status, error, vid FROM images")}


def _vectors(d: Path) -> dict[str, np.ndarray]:
    with IndexStore.open(d, quiet=True) as st:
        vids, paths = st.live()
        vecs = np.asarray(st.vectors())
        assert st.n_vectors == len(vids), "no dead or duplicated vector rows"
        return {p: vecs[v].copy() for v, p in zip(vids, paths)}


def _n_committed(d: Path) -> int:
    try:
        with sqlite3.connect(f"file:{d / 'meta.sqlite'}?mode=ro", uri=True, timeout=1) as db:
            r = db.execute("SELECT value FROM meta WHERE key='n_vectors'").fetchone()
        return int(r[0]) if r else 0
    except sqlite3.Error:
        return 0


def _assert_same_index(d: Path, ref: Path, *, same_vids: bool = True) -> None:
    rows, want = _rows(d), _rows(ref)
    if not same_vids:
        rows = {k: v[:-1] for k, v in rows.items()}
        want = {k: v[:-1] for k, v in want.items()}
    assert rows == want  # paths, hashes, sizes, mtimes, statuses, error messages (and vids)
    got, exp = _vectors(d), _vectors(ref)
    assert sorted(got) == sorted(exp) and len(got) == 300
    a = np.stack([got[p] for p in sorted(exp)])
    b = np.stack([exp[p] for p in sorted(exp)])
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > COS, cos.min()


def _settings(cluster: Cluster) -> RaySettings:
    return RaySettings(address=cluster.address, start_timeout=180, stall_timeout=180)


def test_ray_build_equals_local_build_and_second_run_adds_nothing(ray_cluster, corpus, local_index, lite0_gem,
                                                                  tmp_path, capsys):
    d = tmp_path / "idx"
    rep = build_index_ray(corpus, d, lite0_gem, ray_settings=_settings(ray_cluster), progress=False, **KW)
    err = capsys.readouterr().err
    assert (rep.added, rep.errors, rep.total) == (300, len(BAD), 300)
    assert "ray: 2 workers on 2 nodes" in err  # one actor on the head node, one on the worker node
    for name in BAD:  # reported as a local build reports them, naming the file
        assert f"skipped: cannot read image '{corpus / name}'" in err, name
    _assert_same_index(d, local_index)
    errs = {p: r[4] for p, r in _rows(d).items() if r[3] == "error"}
    assert sorted(errs) == sorted(BAD) and all(BAD[n] in errs[n] for n in BAD), errs
    with IndexStore.open(d) as st:  # the same kind of folder: `glimr search` finds each photo first
        q = _vectors(d)["ukbench00123.jpg"]
        assert st.search(q[None], 1)[0][0][0] == "ukbench00123.jpg"
    before = {p.name: p.read_bytes() for p in (d / "vectors.f32", d / "meta.sqlite")}
    rep = build_index_ray(corpus, d, lite0_gem, ray_settings=_settings(ray_cluster), progress=False, **KW)
    err = capsys.readouterr().err
    # nothing added; the unchanged bad files are not retried, the dangling link (nothing to compare) is
    assert (rep.added, rep.unchanged, rep.errors, rep.total) == (0, 303, 1, 300)
    assert "workers on" not in err  # nothing to embed: no actor was started
    assert (d / "vectors.f32").read_bytes() == before["vectors.f32"]
    _assert_same_index(d, local_index)


def test_killed_worker_batch_is_retried_and_the_index_is_the_same(ray_cluster, corpus, local_index, lite0_gem,
                                                                    tmp_path, capsys):
    d = tmp_path / "idx"
    killed: list[tuple[int, int]] = []     # (pid, images committed when it was killed)

    def kill_one_worker():
        end = time.monotonic() + 240
        while time.monotonic() < end:
            n = _n_committed(d)
            pids = ray_cluster.actor_pids()
            if n >= 16 and pids:   # the first shard is in: both workers hold batches
                os.kill(pids[0], signal.SIGKILL)
                killed.append((pids[0], n))
                return
            time.sleep(0.05)

    t = threading.Thread(target=kill_one_worker, daemon=True)
    t.start()
    rep = build_index_ray(corpus, d, lite0_gem, ray_settings=_settings(ray_cluster), progress=False, **KW)
    t.join(timeout=5)
    err = capsys.readouterr().err
    assert killed and killed[0][1] < 300, (killed, "the worker must die while the build runs")
    assert "died" in err and "retrying on another worker" in err, err[-3000:]
    assert (rep.added, rep.errors, rep.total) == (300, len(BAD), 300)
    _assert_same_index(d, local_index)  # nothing lost, nothing twice, same vids


def test_killed_driver_resumes_with_nothing_lost_or_duplicated(ray_cluster, corpus, local_index, lite0_gem,
                                                               tmp_path):
    # the first 96 photos and the bad files (hard links: same bytes, size and mtime as in the reference index)
    root = tmp_path / "subset"
    root.mkdir()
    names = [*sorted(BAD), *(f"ukbench{i:05d}.jpg" for i in range(96))]
    for name in names:
        src = corpus / name
        if src.is_symlink():
            (root / name).symlink_to(os.readlink(src))
        else:
            os.link(src, root / name)
    d = tmp_path / "idx"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "glimr", "index", "build", str(root), "--index", str(d), "--ray",
           ray_cluster.address, "--model", "gem-lite0", "--max-size", "128", "--workers", "0", "--precision",
           "fp32", "--chunk-size", "16"]
    log = tmp_path / "driver.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        end = time.monotonic() + 240
        while time.monotonic() < end and proc.poll() is None and _n_committed(d) < 16:
            time.sleep(0.02)
        assert proc.poll() is None, log.read_text()[-3000:]
        proc.kill()                                    # the driver dies between or inside commits
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert "ray: 2 workers on 2 nodes" in log.read_text()
    n = _n_committed(d)
    assert 16 <= n < 96, n
    rep = build_index_ray(root, d, lite0_gem, ray_settings=_settings(ray_cluster), progress=False, **KW)
    assert (rep.total, rep.added) == (96, 96 - n) and rep.unchanged >= n, rep
    rows, want = _rows(d), _rows(local_index)
    # all but the vids; the error messages name the file in its own folder
    moved = {k: (*v[:4], v[4] and v[4].replace(str(root), str(corpus))) for k, v in rows.items()}
    assert moved == {k: want[k][:-1] for k in names}
    assert sorted(v[-1] for v in rows.values() if v[-1] is not None) == list(range(96))  # each vector once
    got, exp = _vectors(d), _vectors(local_index)
    a = np.stack([got[p] for p in names[len(BAD):]])
    b = np.stack([exp[p] for p in names[len(BAD):]])
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > COS, cos.min()


# ---- settings and refusals (no cluster needed) --------------------------------------------------------------
@pytest.mark.parametrize(("kw", "words"), [({"actors": 0}, "actors (--ray-actors)"), ({"cpus": 0}, "cpus"),
                                          ({"gpus": -1}, "gpus"), ({"task_size": 0}, "task_size"),
                                          ({"address": " "}, "Ray address")])
def test_ray_settings_refuse_bad_values(kw, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        RaySettings(**kw)


def test_cli_refuses_bad_ray_options_before_any_work(corpus, tmp_path):
    from glimr.cli import main

    with pytest.raises(SystemExit) as e:
        main(["index", "build", str(corpus), "--index", str(tmp_path / "idx"), "--ray-actors", "0"])
    assert e.value.code == 2
    r = subprocess.run([sys.executable, "-m", "glimr", "index", "build", str(corpus), "--index",
                        str(tmp_path / "idx"), "--ray", "--coattention"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120, check=False)
    assert r.returncode == 2, r.stderr
    assert "--coattention cannot be combined with --ray" in r.stderr
    assert not (tmp_path / "idx").exists()  # refused before anything was written


def test_missing_ray_is_a_clear_error(corpus, tmp_path):
    """Without the `ray` package (hidden from this interpreter), --ray says how to install it; nothing written."""
    code = ("import sys; sys.modules['ray'] = None; from glimr.cli import main; "
            f"sys.exit(main(['index', 'build', {str(corpus)!r}, '--index', {str(tmp_path / 'idx')!r}, '--ray']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2, r.stderr
    assert "glimr index: error: --ray needs the `ray` package: pip install 'glimr[ray]'" in r.stderr, r.stderr
    assert not (tmp_path / "idx").exists()

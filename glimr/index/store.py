"""An index folder: descriptors + metadata, built incrementally, committed atomically, resumable.

    DIR/index.json     what made the descriptors and how the index is organised (glimr.index.settings:
                       ExtractSettings with the checkpoint's absolute path and sha256, IndexSettings), validated
                       when read
    DIR/meta.sqlite    table `images` (path relative to the image root, content hash, size, mtime, status,
                       error, vid) and table `meta` (n_vectors: committed rows of vectors.f32)
    DIR/vectors.f32    float32 descriptors, one row per vid, append-only between compactions
    DIR/faiss.index    FAISS index over the live rows (ids = vid), rebuilt atomically after each build
    DIR/faiss.json     how many committed vectors the FAISS file reflects (stale -> rebuilt from vectors.f32)
    DIR/coattention.rec  (only with --coattention) fixed-size co-attention records, one per vid, append-only
                       (glimr.extract.local.RecordCodec); DIR/coattention/ holds their parameters (.npy + .json)
    DIR/.lock          flock()ed by the one process that writes

Durability: a chunk's vectors are appended and fsynced, then its rows and the new n_vectors are committed in
one SQLite transaction. A build killed at any point leaves at most some uncommitted tail rows in
vectors.f32, which the next open truncates: nothing committed is lost and nothing is added twice. The
co-attention records follow the same rule: appended and fsynced with the vectors, counted by the same n_vectors.
Compaction (IndexStore.compact) writes compacted copies, commits the renumbering with a `compact_swap` mark, then
renames; every step is finished or undone by the next open.

Opening: IndexStore.open (search) is the one place that checks a folder, read-only; IndexStore.for_build (build)
takes the lock first and writes nothing until save_config().
"""
from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from glimr.index import ann
from glimr.index.settings import FORMAT_VERSION, IndexConfig, IndexSettings  # noqa: F401 (re-exported)

META_FILES = ("index.json", "meta.sqlite", "vectors.f32", "faiss.index", "faiss.json")


class IndexStoreError(RuntimeError):
    """A problem with an index folder (missing, locked, incompatible, damaged beyond repair)."""


def db_path(rel: str) -> str:
    """The text a file's relative path is stored as: itself, or, for a name that is not valid UTF-8 (Python's
    surrogate escapes), its bytes with the invalid ones written as \\xNN (as `ls` shows them)."""
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return os.fsencode(rel).decode("utf-8", "backslashreplace")


def _umask_mode(mode: int = 0o666) -> int:
    um = os.umask(0)
    os.umask(um)
    return mode & ~um


@dataclass(frozen=True)
class Row:
    path: str
    hash: str | None
    size: int
    mtime: float
    status: str        # "ok" | "error"
    error: str | None
    vid: int | None


SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    path TEXT PRIMARY KEY, hash TEXT, size INTEGER NOT NULL, mtime REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'error')), error TEXT, vid INTEGER UNIQUE
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class IndexStore:
    """Open with :meth:`open` (search: read-only, checked, FAISS repaired) or :meth:`for_build` /
    :meth:`create_or_open` (build: takes the folder's lock). Never construct directly."""

    def __init__(self, directory: Path, config: IndexConfig, *, writable: bool, lock_fd: int | None,
                 db: sqlite3.Connection | None):
        self.dir = Path(directory)
        self.config = config
        self.writable = writable
        self._lock_fd = lock_fd
        self.db = db
        self._vec_path = self.dir / "vectors.f32"
        self._rec_path = self.dir / "coattention.rec" if config.coattention else None
        self._faiss = None
        self._wal = False

    # ---- opening for a build ---------------------------------------------------------------------------
    @classmethod
    def for_build(cls, directory: str | Path, config: IndexConfig) -> IndexStore:
        """Take the folder's lock and check that ``config`` may write into it; writes nothing else yet
        (:meth:`save_config` does, once the caller's own checks passed). An existing index must have been made
        the same way; its runtime settings (factory, chunking, batching...) take the new values."""
        d = Path(directory)
        cfg_path = d / "index.json"
        if d.exists() and not d.is_dir():
            raise IndexStoreError(f"'{d}' is a file, not an index folder; choose another --index")
        old = None
        if cfg_path.exists():
            old = cls._read_config(d)
        elif d.exists() and any(p.name != ".lock" for p in d.iterdir()):
            raise IndexStoreError(f"'{d}' exists and is not a glimr index (no index.json); choose an empty folder")
        if old is not None:
            if not old.same_descriptors(config):
                raise IndexStoreError(
                    f"index '{d}' was built with {old.extract.to_json()}, not {config.extract.to_json()}: "
                    "descriptors of different models or settings cannot be mixed; use a new --index folder")
            if config.coattention and old.coattention != config.coattention:
                raise IndexStoreError(
                    f"index '{d}' was built " + ("without co-attention features" if not old.coattention else
                                                 f"with other co-attention settings ({old.coattention})")
                    + ": they cannot be added to its images now; use a new --index folder")
            config = IndexConfig(config.extract.replace(checkpoint=config.extract.checkpoint or old.checkpoint,
                                                        checkpoint_sha256=config.extract.checkpoint_sha256
                                                        or old.extract.checkpoint_sha256),
                                 IndexSettings(dim=old.dim, factory=config.factory,
                                               chunk_size=config.index.chunk_size, coattention=old.coattention),
                                 root=config.root or old.root)
        d.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(d / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise IndexStoreError(f"index '{d}' is being written by another process; wait for it to finish "
                                  "(nothing was changed)") from None
        store = cls(d, config, writable=True, lock_fd=lock_fd, db=None)
        try:
            if old is not None:
                if not (d / "meta.sqlite").is_file():
                    raise IndexStoreError(f"'{d / 'meta.sqlite'}' is missing: the index lost the list of its "
                                          "images; rebuild it into a new folder")
                store._open_db()
                store._finish_compaction()
                store._repair_tail()
        except BaseException:
            store.close()
            raise
        return store

    def save_config(self) -> None:
        """Write index.json (then create the database and data files of a new index)."""
        from glimr.io.atomic import atomic_write_bytes

        atomic_write_bytes(self.dir / "index.json", json.dumps(self.config.to_json(), indent=2).encode())
        os.chmod(self.dir / "index.json", _umask_mode())
        if self.db is None:
            self._open_db()
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as e:
            raise IndexStoreError(f"'{self.dir / 'meta.sqlite'}' cannot be written ({e})") from None
        self._wal = True
        for p in (self._vec_path, self._rec_path):
            if p is not None and not p.exists():
                p.touch()

    @classmethod
    def create_or_open(cls, directory: str | Path, config: IndexConfig) -> IndexStore:
        """For writing: :meth:`for_build` then :meth:`save_config`."""
        store = cls.for_build(directory, config)
        try:
            store.save_config()
        except BaseException:
            store.close()
            raise
        return store

    def _open_db(self) -> None:
        """The database, opened for writing; the journal switches to WAL only in :meth:`save_config`, so a
        build refused by its checks leaves the file byte for byte as it was."""
        try:
            self.db = sqlite3.connect(self.dir / "meta.sqlite", isolation_level=None)
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise IndexStoreError(f"'{self.dir / 'meta.sqlite'}' is damaged ({e}): it holds the list of the "
                                  "index's images; rebuild the index into a new folder") from None

    # ---- opening for search ------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | Path, *, quiet: bool = False) -> IndexStore:
        """For reading (search). The one place that checks an index folder: index.json, meta.sqlite (opened
        read-only, never created), vectors.f32 against the committed rows, co-attention records, and
        faiss.index (readable, same rows), which is rebuilt from vectors.f32 when damaged or stale (said on
        stderr; saved when the folder is writable and no build holds it). IndexStoreError for the rest."""
        d = Path(directory)
        config = cls._read_config(d)
        db_file = d / "meta.sqlite"
        if not db_file.is_file():
            raise IndexStoreError(f"'{db_file}' is missing: it lists the index's images, and without it the "
                                  f"vectors cannot be named; rebuild with `glimr index build IMAGES_DIR --index {d}`"
                                  " (move the damaged folder away first)")
        writable = os.access(d, os.W_OK) and os.access(db_file, os.W_OK)
        wal = d / "meta.sqlite-wal"
        if writable or (wal.exists() and wal.stat().st_size > 0):
            uri = f"{db_file.absolute().as_uri()}?mode=ro"
        else:  # nobody can be writing a folder we cannot write: read it as an immutable file
            uri = f"{db_file.absolute().as_uri()}?immutable=1"
        store = None
        try:
            db = sqlite3.connect(uri, uri=True, isolation_level=None)
            store = cls(d, config, writable=False, lock_fd=None, db=db)
            store._check_db()
            store._check_data()
            store._load_faiss(quiet=quiet, can_save=writable)
        except sqlite3.DatabaseError as e:
            if store is not None:
                store.close()
            raise IndexStoreError(f"'{db_file}' is damaged or unreadable ({e}): it lists the index's images; "
                                  "rebuild the index into a new folder") from None
        except BaseException:
            if store is not None:
                store.close()
            raise
        return store

    def _check_db(self) -> None:
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"images", "meta"} <= tables:
            raise IndexStoreError(f"'{self.dir / 'meta.sqlite'}' has no 'images'/'meta' tables: not a glimr index "
                                  "database; rebuild the index into a new folder")
        self.db.execute("SELECT path, hash, size, mtime, status, error, vid FROM images LIMIT 1").fetchall()

    def _vectors_file(self, p: Path | None) -> Path | None:
        """A data file, or its compacted copy while a compaction's final renames are pending."""
        if p is None:
            return None
        c = p.with_name(p.name + ".compact")
        if self._meta("compact_swap") and c.exists():
            return c
        return p

    def _check_data(self) -> None:
        n = self.n_vectors
        for p, nbytes, what in ((self._vectors_file(self._vec_path), self._row_bytes(), "vectors"),
                                (self._vectors_file(self._rec_path), self._rec_bytes(), "co-attention records")):
            if p is None:
                continue
            if not p.is_file():
                raise IndexStoreError(f"'{p}' is missing: the index's {what} are lost; rebuild the index")
            size = p.stat().st_size
            if size < n * nbytes:
                raise IndexStoreError(f"'{p}' holds {size // nbytes} {what} but the index committed {n}: the "
                                      "folder was damaged (truncated copy?); rebuild the index")
        top = self.db.execute("SELECT MAX(vid) FROM images").fetchone()[0]
        if top is not None and top >= n:
            raise IndexStoreError(f"'{self.dir / 'meta.sqlite'}' names vector {top} but only {n} are committed: "
                                  "the folder was damaged; rebuild the index")

    @staticmethod
    def _read_config(d: Path) -> IndexConfig:
        p = d / "index.json"
        if not p.is_file():
            raise IndexStoreError(f"'{d}' is not a glimr index (no index.json); build one with "
                                  f"`glimr index build IMAGES_DIR --index {d}`")
        try:
            return IndexConfig.from_json(json.loads(p.read_text()))
        except (ValueError, TypeError, UnicodeDecodeError, OSError) as e:
            raise IndexStoreError(f"'{p}' is damaged or holds a bad setting ({e}); fix that value or rebuild "
                                  "the index into a new folder") from None

    def close(self) -> None:
        if self.db is not None:
            if self._wal:
                try:  # leave no -wal/-shm files behind, so read-only searches need to create nothing
                    self.db.execute("PRAGMA journal_mode=DELETE")
                except sqlite3.Error:
                    pass
            self.db.close()
            self.db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- vectors -------------------------------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    @property
    def n_vectors(self) -> int:
        v = self._meta("n_vectors")
        return int(v) if v is not None else 0

    def _row_bytes(self) -> int:
        return 4 * self.config.dim

    def _repair_tail(self) -> None:
        """Drop vectors appended by a build that was killed before committing them."""
        for p, nbytes, what in ((self._vec_path, self._row_bytes(), "vectors"),
                                (self._rec_path, self._rec_bytes(), "co-attention records")):
            if p is None:
                continue
            if not p.exists():
                raise IndexStoreError(f"'{p}' is missing: the index's {what} are lost; rebuild the index")
            committed = self.n_vectors * nbytes
            size = p.stat().st_size
            if size > committed:
                os.truncate(p, committed)
            elif size < committed:
                raise IndexStoreError(f"'{p}' holds {size // nbytes} {what} but the index committed "
                                      f"{self.n_vectors}: the folder was damaged; rebuild it")

    # ---- compaction ----------------------------------------------------------------------------------
    def dead_vectors(self) -> int:
        """Rows of vectors.f32 no image uses any more (removed or re-embedded images)."""
        n_live = self.db.execute("SELECT COUNT(*) FROM images WHERE status='ok'").fetchone()[0]
        return self.n_vectors - int(n_live)

    def compact(self, progress: bool = False) -> int:
        """Rewrite vectors.f32 (and coattention.rec) without dead rows; returns how many rows were dropped.

        Durable and resumable: the compacted copies are written and fsynced beside the originals, then one
        SQLite transaction renumbers the rows and records that the copies must replace the originals; the
        renames follow. Killed before the transaction: the copies are deleted on the next open for writing.
        Killed after it: the next open (for writing or reading) uses/finishes the copies."""
        if not self.writable:
            raise IndexStoreError(f"index '{self.dir}' is open read-only; compact needs the build lock")
        dead = self.dead_vectors()
        if dead == 0:
            return 0
        vids, _ = self.live()
        pairs = [(self._vec_path, self._row_bytes())]
        if self._rec_path is not None:
            pairs.append((self._rec_path, self._rec_bytes()))
        step = 4096
        for p, nbytes in pairs:
            src = np.memmap(p, dtype=np.uint8, mode="r", shape=(self.n_vectors, nbytes)) if self.n_vectors \
                else np.zeros((0, nbytes), np.uint8)
            tmp = p.with_name(p.name + ".compact")
            with open(tmp, "wb") as f:
                steps = tqdm(range(0, len(vids), step), desc=f"compact {p.name}", disable=not progress, unit="chunk")
                f.writelines(np.ascontiguousarray(src[vids[s:s + step]]).tobytes() for s in steps)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _umask_mode())
            del src
        _fsync_dir(self.dir)
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            # new vid = rank among the live rows; ascending order never collides with a row not yet moved
            self.db.executemany("UPDATE images SET vid=? WHERE vid=?",
                                [(new, int(old)) for new, old in enumerate(vids)])
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('n_vectors', ?)", (str(len(vids)),))
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('compact_swap', '1')")
        self._finish_compaction()
        self._faiss = None
        return dead

    def _finish_compaction(self) -> None:
        """Complete the renames of a committed compaction, or drop the copies of one that never committed."""
        pending = self._meta("compact_swap") is not None
        for p in (self._vec_path, self._rec_path):
            if p is None:
                continue
            c = p.with_name(p.name + ".compact")
            if c.exists():
                if pending:
                    os.replace(c, p)
                else:
                    c.unlink()
        if pending:
            _fsync_dir(self.dir)
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute("DELETE FROM meta WHERE key='compact_swap'")

    def _rec_bytes(self) -> int:
        return int(self.config.coattention["record_bytes"]) if self.config.coattention else 0

    def coattention_records(self) -> np.ndarray:
        """All committed co-attention records (memory-mapped, read-only, a structured array), row = vid."""
        if self._rec_path is None:
            raise IndexStoreError(f"index '{self.dir}' has no co-attention features: build it with "
                                  "`glimr index build IMAGES --index NEW_FOLDER --coattention`")
        from glimr.extract.local import LocalConfig

        cfg = LocalConfig.from_json(self.config.coattention["config"])
        dtype = cfg.codec().record
        if dtype.itemsize != self._rec_bytes():
            raise IndexStoreError(f"'{self._rec_path}': records of {self._rec_bytes()} bytes in index.json but "
                                  f"{dtype.itemsize} from its settings; rebuild the index")
        n = self.n_vectors
        if n == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(self._vectors_file(self._rec_path), dtype=dtype, mode="r", shape=(n,))

    def vectors(self) -> np.ndarray:
        """All committed vectors (memory-mapped, read-only), row = vid."""
        n = self.n_vectors
        if n == 0:
            return np.zeros((0, self.config.dim), dtype=np.float32)
        return np.memmap(self._vectors_file(self._vec_path), dtype=np.float32, mode="r", shape=(n, self.config.dim))

    # ---- rows ----------------------------------------------------------------------------------------
    def rows(self) -> dict[str, Row]:
        cur = self.db.execute("SELECT path, hash, size, mtime, status, error, vid FROM images")
        return {r[0]: Row(*r) for r in cur}

    def live(self) -> tuple[np.ndarray, list[str]]:
        """(vids, paths) of the searchable images, in vid order."""
        cur = self.db.execute("SELECT vid, path FROM images WHERE status='ok' ORDER BY vid")
        rows = cur.fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64), [r[1] for r in rows]

    def live_vids(self) -> np.ndarray:
        """The vids of the searchable images, ascending (no paths: cheap for millions of rows)."""
        cur = self.db.execute("SELECT vid FROM images WHERE status='ok' ORDER BY vid")
        return np.fromiter((r[0] for r in cur), dtype=np.int64)

    def n_live(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM images WHERE status='ok'").fetchone()[0])

    def paths_for(self, vids) -> dict[int, str]:
        vids = [int(v) for v in vids if v >= 0]
        if not vids:
            return {}
        q = f"SELECT vid, path FROM images WHERE vid IN ({','.join('?' * len(vids))})"
        return dict(self.db.execute(q, vids).fetchall())

    def commit_chunk(self, rows: list[Row], vectors: np.ndarray, records: np.ndarray | None = None) -> None:
        """Add/replace rows; rows with status 'ok' take the next vids in order, one per vectors row (and one
        co-attention record per row when the index has them)."""
        ok = [r for r in rows if r.status == "ok"]
        if len(ok) != len(vectors):
            raise ValueError(f"{len(ok)} ok rows for {len(vectors)} vectors")
        if self._rec_path is not None:
            if records is None or len(records) != len(vectors) or records.dtype.itemsize != self._rec_bytes():
                raise ValueError(f"index '{self.dir}' needs one co-attention record of {self._rec_bytes()} bytes "
                                 f"per vector")
        elif records is not None:
            raise ValueError(f"index '{self.dir}' has no co-attention features: records given")
        base = self.n_vectors
        if len(vectors):
            data = np.ascontiguousarray(vectors, dtype=np.float32)
            if data.shape[1] != self.config.dim:
                raise ValueError(f"vectors of dim {data.shape[1]} for an index of dim {self.config.dim}")
            with open(self._vec_path, "ab") as f:
                f.write(data.tobytes())
                f.flush()
                os.fsync(f.fileno())
            if self._rec_path is not None:
                with open(self._rec_path, "ab") as f:
                    f.write(np.ascontiguousarray(records).tobytes())
                    f.flush()
                    os.fsync(f.fileno())
        vid = base
        with self.db:  # one transaction
            self.db.execute("BEGIN IMMEDIATE")
            for r in rows:
                v = None
                if r.status == "ok":
                    v, vid = vid, vid + 1
                self.db.execute("INSERT OR REPLACE INTO images (path, hash, size, mtime, status, error, vid) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?)", (r.path, r.hash, r.size, r.mtime, r.status,
                                                                  r.error, v))
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('n_vectors', ?)", (str(vid),))

    def touch(self, path: str, size: int, mtime: float) -> None:
        """Same content, new mtime: remember it so the next build does not hash the file again."""
        self.db.execute("UPDATE images SET size=?, mtime=? WHERE path=?", (size, mtime, path))

    def remove(self, paths: list[str]) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("DELETE FROM images WHERE path=?", [(p,) for p in paths])

    # ---- FAISS ---------------------------------------------------------------------------------------
    def _faiss_state(self) -> dict:
        p = self.dir / "faiss.json"
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return {}

    def faiss_is_current(self) -> bool:
        st = self._faiss_state()
        return (self.dir / "faiss.index").is_file() and st.get("n_vectors") == self.n_vectors \
            and st.get("n_live") == self.n_live() and st.get("factory") == self.config.factory

    def _make_faiss(self):
        """A FAISS index over the live rows: the structure ``config.factory`` names, or, for "auto", the one the
        size rule picks (glimr.index.ann.auto_factory), trained on a sample and filled in chunks from the
        memory-mapped vectors. Flat (said on stderr) when the factory cannot be trained on them, e.g. IVF4096
        over fewer than 4096 images."""
        vids = self.live_vids()
        factory = self.config.factory
        vectors = self.vectors()
        try:
            index, built_as = ann.build(vectors, vids, factory, progress=len(vids) >= ann.FLAT_MAX)
        except (ValueError, RuntimeError) as e:
            print(f"glimr: FAISS '{factory}' cannot be built over {len(vids)} vectors "
                  f"({str(e).strip().splitlines()[-1][:200]}); using Flat (exact search) until there are enough",
                  file=sys.stderr)
            index, built_as = ann.build(vectors, vids, "Flat")
        return index, len(vids), built_as

    def _grow_faiss(self):
        """The saved FAISS index plus the rows committed since it was built, when that is all that changed
        (no row removed or compacted, same structure as the size rule or factory asks now): a trained IVF is
        not retrained for a few new images. None when it must be rebuilt."""
        st = self._faiss_state()
        built_as = st.get("built_as")
        n0, live0 = st.get("n_vectors"), st.get("n_live")
        if built_as in (None, "Flat") or st.get("factory") != self.config.factory \
                or not isinstance(n0, int) or not isinstance(live0, int) or not 0 <= n0 <= self.n_vectors:
            return None
        vids = self.live_vids()
        new = vids[vids >= n0]
        if live0 + len(new) != len(vids) or ann.resolve_factory(self.config.factory, len(vids),
                                                                self.config.dim) != built_as:
            return None
        try:
            index = ann.load_index(self.dir / "faiss.index")
        except (RuntimeError, MemoryError):
            return None
        if index.ntotal != live0 or index.d != self.config.dim:
            return None
        ann.add(index, self.vectors(), new)
        return index, len(vids), built_as

    def rebuild_faiss(self) -> None:
        """FAISS over the live rows (grown in place when only rows were added, else rebuilt), written
        atomically (then its state file)."""
        index, n_live, built_as = self._grow_faiss() or self._make_faiss()
        self._save_faiss(index, n_live, built_as)
        self._faiss = index

    def optimize(self, factory: str | None = None) -> dict:
        """`glimr index optimize`: rebuild the search structure from the stored vectors (nothing re-embedded),
        as ``factory`` ("auto": by the size rule) or the index's own; index.json records a new factory.
        Returns the new structure's description (glimr.index.ann.describe)."""
        if not self.writable:
            raise IndexStoreError(f"index '{self.dir}' is open read-only; optimize needs the build lock")
        if factory is not None and factory != self.config.factory:
            self.config = IndexConfig(self.config.extract, IndexSettings(
                dim=self.config.dim, factory=factory, chunk_size=self.config.index.chunk_size,
                coattention=self.config.coattention), root=self.config.root)
            self.save_config()
        index, n_live, built_as = self._make_faiss()
        self._save_faiss(index, n_live, built_as)
        self._faiss = index
        return self.describe_faiss()

    def describe_faiss(self) -> dict:
        """The search structure and its bytes per image (its file's size over the images it holds)."""
        p = self.dir / "faiss.index"
        st = self._faiss_state()
        out = ann.describe(self.faiss(), p.stat().st_size if p.is_file() else None)
        out["factory"] = self.config.factory
        out["built_as"] = st.get("built_as")
        out["stored_vector_bytes_per_image"] = 4 * self.config.dim  # vectors.f32, memory-mapped for re-ranking
        return out

    def _save_faiss(self, index, n_live: int, built_as: str) -> None:
        from glimr.io.atomic import atomic_write_bytes

        ann.save_index(index, self.dir / "faiss.index")
        atomic_write_bytes(self.dir / "faiss.json", json.dumps(
            {"n_vectors": self.n_vectors, "n_live": n_live, "factory": self.config.factory,
             "built_as": built_as}).encode())
        os.chmod(self.dir / "faiss.json", _umask_mode())

    def _load_faiss(self, quiet: bool = False, can_save: bool = False) -> None:
        """Load faiss.index, or rebuild it from vectors.f32 when it is missing, stale or damaged."""
        path = self.dir / "faiss.index"
        n_live = self.n_live()
        reason = None
        if not path.is_file():
            reason = "missing"
        elif not self.faiss_is_current():
            reason = "stale (a build or compaction stopped before its last step)"
        else:
            try:
                index = ann.load_index(path, mmap=self._faiss_state().get("built_as") not in (None, "Flat"))
                if index.ntotal != n_live or index.d != self.config.dim:
                    reason = f"inconsistent ({index.ntotal} vectors of dim {index.d}, the index has {n_live} of " \
                             f"dim {self.config.dim})"
            except (RuntimeError, MemoryError) as e:
                reason = f"damaged ({str(e).strip().splitlines()[-1][:120]})"
        if reason is None:
            self._faiss = index
            return
        index, n_live, built_as = self._grow_faiss() or self._make_faiss()
        saved = False
        if can_save:  # only when no build holds the folder, which would rewrite it anyway
            fd = os.open(self.dir / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._save_faiss(index, n_live, built_as)
                saved = True
            except (BlockingIOError, OSError):
                pass
            finally:
                os.close(fd)
        if not quiet:
            print(f"glimr: '{path}' was {reason}: rebuilt from vectors.f32"
                  + (" and saved" if saved else " for this search (the folder is not writable now)"),
                  file=sys.stderr)
        self._faiss = index

    def rebuild_faiss_in_memory(self):
        """A fresh FAISS index over the live rows, kept in this object only (nothing written; for a read-only
        store whose rows moved on since faiss.index was saved, e.g. a service's snapshot)."""
        self._faiss = self._make_faiss()[0]
        return self._faiss

    def faiss(self):
        if self._faiss is None:
            if self.writable:
                self._faiss = self._make_faiss()[0] if not self.faiss_is_current() else None
                if self._faiss is None:
                    try:
                        self._faiss = ann.load_index(self.dir / "faiss.index", mmap=self._faiss_state().get(
                            "built_as") not in (None, "Flat"))
                    except RuntimeError:
                        self._faiss = self._make_faiss()[0]
            else:
                self._load_faiss()
        return self._faiss

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[tuple[str, float]]]:
        """Top ``k`` (path, score) per query; k is capped at the number of searchable images."""
        index = self.faiss()
        k = min(int(k), int(index.ntotal))
        if k <= 0:
            return [[] for _ in range(len(np.atleast_2d(queries)))]
        scores, ids = ann.search(index, queries, k, self.vectors())  # non-flat: shortlist re-ranked exactly
        names = self.paths_for(np.unique(ids))
        return [[(names[int(i)], float(s)) for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(scores, ids)]

    def stats(self) -> dict:
        counts = dict(self.db.execute("SELECT status, COUNT(*) FROM images GROUP BY status").fetchall())
        return {"images": counts.get("ok", 0), "errors": counts.get("error", 0), "n_vectors": self.n_vectors,
                **self.config.to_json(), "search_structure": self.describe_faiss()}

    def errors(self) -> list[tuple[str, str]]:
        return self.db.execute("SELECT path, error FROM images WHERE status='error' ORDER BY path").fetchall()


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def share_files(d: Path) -> None:
    """Give the files of an index folder (and its sub-folders: coattention/, diffusion/) the umask's mode:
    atomic writes go through mkstemp, which creates 0600 files that other users could not search."""
    mode = _umask_mode()
    for p in Path(d).rglob("*"):
        try:
            if p.is_file() and not p.is_symlink() and (p.stat().st_mode & 0o777) == 0o600 and mode != 0o600:
                os.chmod(p, mode)
        except OSError:
            pass

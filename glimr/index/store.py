"""An index folder: descriptors + metadata, built incrementally, committed atomically, resumable.

    DIR/index.json     what made the descriptors (model, checkpoint, scales, max size, dim, FAISS factory)
    DIR/meta.sqlite    table `images` (path relative to the image root, content hash, size, mtime, status,
                       error, vid) and table `meta` (n_vectors: committed rows of vectors.f32)
    DIR/vectors.f32    float32 descriptors, one row per vid, append-only
    DIR/faiss.index    FAISS index over the live rows (ids = vid), rebuilt atomically after each build
    DIR/faiss.json     how many committed vectors the FAISS file reflects (stale -> rebuilt from vectors.f32)
    DIR/coattention.rec  (only with --coattention) fixed-size co-attention records, one per vid, append-only
                       (glimr.extract.local.RecordCodec); DIR/coattention/ holds their parameters (.npy + .json)

Durability: a chunk's vectors are appended and fsynced, then its rows and the new n_vectors are committed in
one SQLite transaction. A build killed at any point leaves at most some uncommitted tail rows in
vectors.f32, which the next open truncates: nothing committed is lost and nothing is added twice. The
co-attention records follow the same rule: appended and fsynced with the vectors, counted by the same n_vectors.
"""
from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glimr.index import ann

FORMAT_VERSION = 1


class IndexStoreError(RuntimeError):
    """A problem with an index folder (missing, locked, incompatible)."""


@dataclass(frozen=True)
class IndexConfig:
    model: str
    dim: int
    scales: tuple[float, ...] = (1.0,)
    max_size: int = 512
    checkpoint: str | None = None
    factory: str = "Flat"
    root: str | None = None  # image folder the relative paths refer to
    version: int = FORMAT_VERSION
    coattention: dict | None = None  # {"config": LocalConfig json, "record_bytes": n} with --coattention

    def to_json(self) -> dict:
        d = self.__dict__.copy()
        d["scales"] = list(self.scales)
        return d

    @classmethod
    def from_json(cls, d: dict) -> IndexConfig:
        d = dict(d)
        d["scales"] = tuple(d.get("scales", (1.0,)))
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def same_descriptors(self, other: IndexConfig) -> bool:
        keys = ("model", "dim", "scales", "max_size", "checkpoint")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


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
    def __init__(self, directory: str | Path, config: IndexConfig, lock: bool):
        self.dir = Path(directory)
        self.config = config
        self._lock_fd = None
        if lock:
            self._lock_fd = os.open(self.dir / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock_fd)
                raise IndexStoreError(f"index '{self.dir}' is being written by another process; wait for it "
                                  "to finish") from None
        self.db = sqlite3.connect(self.dir / "meta.sqlite", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self._vec_path = self.dir / "vectors.f32"
        self._vec_path.touch()
        self._rec_path = self.dir / "coattention.rec" if config.coattention else None
        if self._rec_path is not None:
            self._rec_path.touch()
        if lock:
            self._repair_tail()
        self._faiss = None

    # ---- opening -------------------------------------------------------------------------------------
    @classmethod
    def create_or_open(cls, directory: str | Path, config: IndexConfig) -> IndexStore:
        """For writing (takes the folder's lock). An existing index must have been made the same way."""
        d = Path(directory)
        cfg_path = d / "index.json"
        if cfg_path.exists():
            old = cls._read_config(d)
            if not old.same_descriptors(config):
                raise IndexStoreError(
                    f"index '{d}' was built with {old.to_json()}, not {config.to_json()}: descriptors of "
                    "different models cannot be mixed; use a new --index folder")
            if config.coattention and old.coattention != config.coattention:
                raise IndexStoreError(
                    f"index '{d}' was built " + ("without co-attention features" if not old.coattention else
                                                 f"with other co-attention settings ({old.coattention})")
                    + ": they cannot be added to its images now; use a new --index folder")
            config = IndexConfig.from_json({**old.to_json(), "factory": config.factory,
                                            "root": config.root or old.root})
        elif d.exists() and any(p.name not in (".lock",) for p in d.iterdir()):
            raise IndexStoreError(f"'{d}' exists and is not a glimr index (no index.json); choose an empty folder")
        d.mkdir(parents=True, exist_ok=True)
        from glimr.models.checkpoint import atomic_write_bytes
        atomic_write_bytes(cfg_path, json.dumps(config.to_json(), indent=2).encode())
        return cls(d, config, lock=True)

    @classmethod
    def open(cls, directory: str | Path) -> IndexStore:
        """For reading (search)."""
        d = Path(directory)
        return cls(d, cls._read_config(d), lock=False)

    @staticmethod
    def _read_config(d: Path) -> IndexConfig:
        p = d / "index.json"
        if not p.is_file():
            raise IndexStoreError(f"'{d}' is not a glimr index (no index.json); build one with "
                              f"`glimr index build IMAGES_DIR --index {d}`")
        try:
            return IndexConfig.from_json(json.loads(p.read_text()))
        except (ValueError, TypeError) as e:
            raise IndexStoreError(f"'{p}' is damaged ({e}); rebuild the index into a new folder") from e

    def close(self) -> None:
        self.db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- vectors -------------------------------------------------------------------------------------
    @property
    def n_vectors(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key='n_vectors'").fetchone()
        return int(row[0]) if row else 0

    def _row_bytes(self) -> int:
        return 4 * self.config.dim

    def _repair_tail(self) -> None:
        """Drop vectors appended by a build that was killed before committing them."""
        committed = self.n_vectors * self._row_bytes()
        size = self._vec_path.stat().st_size
        if size > committed:
            os.truncate(self._vec_path, committed)
        elif size < committed:
            raise IndexStoreError(f"'{self._vec_path}' holds {size // self._row_bytes()} vectors but the index "
                              f"committed {self.n_vectors}: the folder was damaged; rebuild it")
        if self._rec_path is not None:
            committed = self.n_vectors * self._rec_bytes()
            size = self._rec_path.stat().st_size
            if size > committed:
                os.truncate(self._rec_path, committed)
            elif size < committed:
                raise IndexStoreError(f"'{self._rec_path}' holds {size // self._rec_bytes()} co-attention records "
                                      f"but the index committed {self.n_vectors}: the folder was damaged; rebuild it")

    def _rec_bytes(self) -> int:
        return int(self.config.coattention["record_bytes"]) if self.config.coattention else 0

    def coattention_records(self) -> np.ndarray:
        """All committed co-attention records (memory-mapped, read-only, a structured array), row = vid."""
        if self._rec_path is None:
            raise IndexStoreError(f"index '{self.dir}' has no co-attention features: build it with "
                                  "`glimr index build IMAGES --index NEW_FOLDER --coattention`")
        from glimr.extract.local import LocalConfig  # noqa: PLC0415

        cfg = LocalConfig.from_json(self.config.coattention["config"])
        dtype = cfg.codec().record
        if dtype.itemsize != self._rec_bytes():
            raise IndexStoreError(f"'{self._rec_path}': records of {self._rec_bytes()} bytes in index.json but "
                                  f"{dtype.itemsize} from its settings; rebuild the index")
        n = self.n_vectors
        if n == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(self._rec_path, dtype=dtype, mode="r", shape=(n,))

    def vectors(self) -> np.ndarray:
        """All committed vectors (memory-mapped, read-only), row = vid."""
        n = self.n_vectors
        if n == 0:
            return np.zeros((0, self.config.dim), dtype=np.float32)
        return np.memmap(self._vec_path, dtype=np.float32, mode="r", shape=(n, self.config.dim))

    # ---- rows ----------------------------------------------------------------------------------------
    def rows(self) -> dict[str, Row]:
        cur = self.db.execute("SELECT path, hash, size, mtime, status, error, vid FROM images")
        return {r[0]: Row(*r) for r in cur}

    def live(self) -> tuple[np.ndarray, list[str]]:
        """(vids, paths) of the searchable images, in vid order."""
        cur = self.db.execute("SELECT vid, path FROM images WHERE status='ok' ORDER BY vid")
        rows = cur.fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64), [r[1] for r in rows]

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
            and st.get("n_live") == len(self.live()[0]) and st.get("factory") == self.config.factory

    def rebuild_faiss(self) -> None:
        """FAISS over the live rows, written atomically (then its state file)."""
        from glimr.models.checkpoint import atomic_write_bytes

        vids, _ = self.live()
        vecs = np.asarray(self.vectors()[vids]) if len(vids) else np.zeros((0, self.config.dim), np.float32)
        index = ann.make_index(self.config.dim, self.config.factory, vecs)
        if len(vids):
            index.add_with_ids(vecs, vids)
        ann.save_index(index, self.dir / "faiss.index")
        atomic_write_bytes(self.dir / "faiss.json", json.dumps(
            {"n_vectors": self.n_vectors, "n_live": int(len(vids)), "factory": self.config.factory}).encode())
        self._faiss = index

    def faiss(self):
        if self._faiss is None:
            if self.faiss_is_current():
                self._faiss = ann.load_index(self.dir / "faiss.index")
            else:  # a build was interrupted before its FAISS step: the committed vectors are the truth
                vids, _ = self.live()
                vecs = np.asarray(self.vectors()[vids])
                self._faiss = ann.make_index(self.config.dim, self.config.factory, vecs)
                if len(vids):
                    self._faiss.add_with_ids(vecs, vids)
        return self._faiss

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[tuple[str, float]]]:
        scores, ids = ann.search(self.faiss(), queries, k)
        names = self.paths_for(np.unique(ids))
        return [[(names[int(i)], float(s)) for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(scores, ids)]

    def stats(self) -> dict:
        counts = dict(self.db.execute("SELECT status, COUNT(*) FROM images GROUP BY status").fetchall())
        return {"images": counts.get("ok", 0), "errors": counts.get("error", 0), "n_vectors": self.n_vectors,
                **self.config.to_json()}

    def errors(self) -> list[tuple[str, str]]:
        return self.db.execute("SELECT path, error FROM images WHERE status='error' ORDER BY path").fetchall()

"""FAISS indexes for inner-product search over L2-normalised descriptors, chosen by the index's size.

The size rule (``auto_factory``; the factory ``"auto"``, the default of a new index):

- fewer than ``FLAT_MAX`` vectors: ``Flat`` (exact search; ``4 * dim`` bytes per image in RAM);
- from ``FLAT_MAX`` on: ``PCAR{r},IVF{nlist}_HNSW32,PQ{m}x4fs``: the vectors' top ``r = min(dim / 2, 256)``
  principal components, randomly rotated (the PCA is fitted on the training sample), an inverted file whose
  ``nlist`` coarse centroids are searched with an HNSW graph, each vector stored as ``m = r / 2`` 4-bit
  product-quantizer codes of 2 dimensions (``m / 2`` bytes: 64 at 512-d) in FAISS's fast-scan layout, plus
  its 8-byte id. ``nlist`` is the power of two nearest ``4 * sqrt(n)``, from 1024 to ``NLIST_MAX``. Search
  scans ``nprobe`` lists, keeps a shortlist of ``shortlist`` candidates and re-ranks them exactly from the
  stored float32 vectors (glimr's ``vectors.f32``, memory-mapped, read row by row), so the scores returned
  are exact inner products of the full vectors. (Too small a dimension for that: ``IVF{nlist}_HNSW32,SQ8``.)

Why: at 1M x 512 (benchmarks/results/ann_scale.md) the PCA-rotated codes gave a better shortlist than the same
64 bytes of 4-bit codes over all 512 dimensions, with or without a random rotation; fast-scan codes keep the
scan of a shortlist of thousands at about 2 ms.

The IVF structures are trained on a random sample of at most ``TRAIN_MAX`` vectors (``TRAIN_PER_LIST`` per
list), vectors are added in chunks, and the file is opened with ``faiss.IO_FLAG_MMAP`` when it is not flat.
FAISS maps the inverted lists of 8-bit PQ codes (``...,PQ64``) from the file (1M x 512: 7.8 MB resident after
loading an 80 MB file) but reads fast-scan lists (``x4fs``) into RAM (10M: 713 MB resident for a 697 MB file);
both stay under 100 bytes per image. benchmarks/ann_scale.py measured these choices at 1M and 10M x 512
(benchmarks/results/ann_scale.md).
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

AUTO = "auto"
FLAT_MAX = 200_000       # exact (flat) search below this many vectors
NLIST_MIN, NLIST_MAX = 1024, 4096   # k-means over more lists costs too much on a 2-core machine
TRAIN_PER_LIST = 40      # training vectors per inverted list (FAISS warns below 39)
TRAIN_MAX = 500_000      # at most this many training vectors (a random sample)
KMEANS_ITER = 10         # k-means iterations of the coarse quantizer (FAISS's default is 25)
ADD_CHUNK = 65536        # vectors added per step
NPROBE = 128             # inverted lists scanned per query (IVF structures; ann_scale.md: 10M x 512)
SHORTLIST = 500          # candidates re-ranked exactly from the stored vectors (10M: R@10 0.974, ~4 ms)


def pca_pq(dim: int) -> tuple[int, int]:
    """(r, m) of the auto structure: PCA to r = min(dim / 2, 256) dimensions (then a random rotation), m = r / 2
    sub-quantizers of 2 dimensions and 4 bits each (m / 2 bytes: 64 at 512-d); m even. (0, 0) when dim is too
    small for it (then the auto structure stores 8-bit scalar codes, SQ8)."""
    m = min(dim // 2, 256) // 2
    m -= m % 2
    return (2 * m, m) if m >= 2 else (0, 0)


def auto_nlist(n: int) -> int:
    """Inverted lists for n vectors: the power of two nearest 4 * sqrt(n), within [NLIST_MIN, NLIST_MAX]."""
    p = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(max(1, n)))))
    return int(min(NLIST_MAX, max(NLIST_MIN, p)))


def auto_factory(n: int, dim: int) -> str:
    """The structure the size rule picks for ``n`` vectors of dimension ``dim`` (see the module's text)."""
    if n < FLAT_MAX:
        return "Flat"
    r, m = pca_pq(dim)
    if not m:
        return f"IVF{auto_nlist(n)}_HNSW32,SQ8"
    return f"PCAR{r},IVF{auto_nlist(n)}_HNSW32,PQ{m}x4fs"


def resolve_factory(factory: str, n: int, dim: int) -> str:
    return auto_factory(n, dim) if factory == AUTO else factory


def _base(factory: str, dim: int) -> faiss.Index:
    """The untrained structure (an IVF's k-means limited to KMEANS_ITER iterations)."""
    try:
        base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"bad FAISS factory string {factory!r} for dim {dim}: "
                         f"{str(e).strip().splitlines()[-1][:200]}") from None
    ivf = faiss.try_extract_index_ivf(base)
    if ivf is not None:
        ivf.cp.niter = KMEANS_ITER
    return base


def _wrap(base: faiss.Index) -> faiss.Index:
    """IVF structures keep their ids in their inverted lists; the others get an IndexIDMap2."""
    if faiss.try_extract_index_ivf(base) is not None:
        return base
    return faiss.IndexIDMap2(base)


def make_index(dim: int, factory: str = "Flat", train: np.ndarray | None = None) -> faiss.Index:
    """An inner-product FAISS index from a factory string ("Flat", "HNSW32", "IVF1024,PQ32", "PCA128,Flat"...)
    that takes ids (``add_with_ids``): wrapped in an IndexIDMap2 unless it is an IVF structure, which stores
    ids itself. Trained on ``train`` if it needs it."""
    base = _base(factory, dim)
    if not base.is_trained:
        if train is None or len(train) == 0:
            raise ValueError(f"FAISS index {factory!r} needs training vectors")
        try:
            base.train(np.ascontiguousarray(train, dtype=np.float32))
        except RuntimeError as e:
            raise ValueError(f"FAISS index {factory!r} cannot be trained on {len(train)} vectors: "
                             f"{str(e).strip().splitlines()[-1][:200]}") from None
    return _wrap(base)


def train_count(factory: str, n: int) -> int:
    """How many of ``n`` vectors train ``factory``: TRAIN_PER_LIST per inverted list (at least 65536), at most
    TRAIN_MAX, at most n."""
    ivf_lists = 0
    for part in factory.split(","):
        part = part.strip()
        if part.startswith("IVF"):
            digits = "".join(c for c in part[3:].split("_")[0] if c.isdigit())
            ivf_lists = int(digits) if digits else 0
    want = max(65536, TRAIN_PER_LIST * ivf_lists)
    return int(min(n, want, TRAIN_MAX))


def build(vectors: np.ndarray, vids: np.ndarray, factory: str = AUTO, *, progress: bool = False,
          seed: int = 0) -> tuple[faiss.Index, str]:
    """A FAISS index over ``vectors[vids]`` (ids = vids; ``vectors`` may be a memmap: it is read in chunks),
    trained on a random sample when it needs training. Returns (index, the factory it was built as)."""
    vids = np.asarray(vids, dtype=np.int64)
    dim = int(vectors.shape[1])
    built_as = resolve_factory(factory, len(vids), dim)
    base = _base(built_as, dim)
    if not base.is_trained:
        t = train_count(built_as, len(vids))
        if t == 0:
            raise ValueError(f"FAISS index {built_as!r} needs training vectors")
        pick = np.sort(np.random.default_rng(seed).choice(len(vids), size=t, replace=False))
        sample = read_rows(vectors, vids[pick])
        try:
            base.train(sample)
        except RuntimeError as e:
            raise ValueError(f"FAISS index {built_as!r} cannot be trained on {t} vectors: "
                             f"{str(e).strip().splitlines()[-1][:200]}") from None
        del sample
    index = _wrap(base)
    steps = range(0, len(vids), ADD_CHUNK)
    for s in tqdm(steps, desc=f"FAISS {built_as}", unit="chunk", disable=not progress or len(steps) < 4):
        ids = vids[s:s + ADD_CHUNK]
        index.add_with_ids(read_rows(vectors, ids), ids)
    return index, built_as


def add(index: faiss.Index, vectors: np.ndarray, vids: np.ndarray) -> None:
    """Add ``vectors[vids]`` (ids = vids) to a built index, in chunks."""
    vids = np.asarray(vids, dtype=np.int64)
    for s in range(0, len(vids), ADD_CHUNK):
        ids = vids[s:s + ADD_CHUNK]
        index.add_with_ids(read_rows(vectors, ids), ids)


def is_exact(index: faiss.Index) -> bool:
    """Whether the index returns exact inner products (a flat index, possibly behind an id map)."""
    inner = faiss.downcast_index(index.index) if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) \
        else index
    return isinstance(inner, faiss.IndexFlat)


def describe(index: faiss.Index, file_bytes: int | None = None) -> dict:
    """What a built index is and what it costs: structure, nlist, bytes of its file and per image."""
    ivf = faiss.try_extract_index_ivf(index)
    n = int(index.ntotal)
    out = {"structure": type(faiss.downcast_index(index)).__name__, "exact": is_exact(index), "ntotal": n}
    if ivf is not None:
        out.update(nlist=int(ivf.nlist), code_bytes=int(ivf.code_size), nprobe=NPROBE, shortlist=SHORTLIST)
    if file_bytes is not None:
        out["file_bytes"] = int(file_bytes)
        out["bytes_per_image"] = round(file_bytes / n, 2) if n else None
    return out


def save_index(index: faiss.Index, path: str | Path) -> None:
    """Atomic: write to a temporary file next to `path`, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        um = os.umask(0)
        os.umask(um)
        os.chmod(tmp, 0o666 & ~um)  # mkstemp makes 0600; an index is read by whoever may search it
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_index(path: str | Path, mmap: bool = False) -> faiss.Index:
    """Read a FAISS file; ``mmap``: its inverted lists stay in the file (IO_FLAG_MMAP, read-only), paged in by
    the OS as searches touch them."""
    if mmap:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    return faiss.read_index(str(path))


def search(index: faiss.Index, queries: np.ndarray, k: int, vectors: np.ndarray | None = None, *,
           nprobe: int | None = None, shortlist: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (n_queries, k); ids are -1 where fewer than k results exist.

    An exact (flat) index answers directly. Any other index gives a shortlist of ``max(k, shortlist)``
    candidates (``nprobe`` lists scanned when it is an IVF) that is re-ranked by the exact inner products with
    ``vectors`` (row = id; a memmap is fine) when they are given."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None]
    k = int(k)
    if is_exact(index):
        return index.search(q, k)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = int(min(ivf.nlist, nprobe or NPROBE))
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            # the HNSW over the centroids must look at least as wide as the lists it returns: with FAISS's
            # default (16) it missed lists holding 10% of the true top 10 at nprobe 128 (1M x 512; 2 x nprobe
            # finds the same lists as an exact search of the centroids)
            quantizer.hnsw.efSearch = max(16, 2 * ivf.nprobe)
    if vectors is None:
        return index.search(q, k)
    kk = int(min(max(k, shortlist or SHORTLIST), max(1, index.ntotal)))
    _, cand = index.search(q, kk)
    return rerank(q, cand, vectors, k)


def read_rows(vectors: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``vectors[ids]`` as float32 (ids ascending). A file-backed memmap is read with one pread per run of
    consecutive rows, so the rows never become resident pages of this process: a page fault on a memory-mapped
    row that is not in the page cache reads ahead far more than the row (measured ~4 s against ~50 ms for
    1,000 random rows of a 20 GB file on this machine's disk), and a build that streams millions of rows
    through a memmap grows its RSS by the file's size."""
    ids = np.asarray(ids, dtype=np.int64)
    if isinstance(vectors, np.memmap) and vectors.filename and vectors.ndim == 2 and len(ids) > 1 \
            and vectors.dtype == np.float32 and vectors.flags.c_contiguous:
        row = vectors.shape[1] * 4
        out = np.empty((len(ids), vectors.shape[1]), np.float32)
        mv = memoryview(out).cast("B")
        starts = np.flatnonzero(np.diff(ids, prepend=ids[0] - 2) != 1)  # where a run of consecutive ids begins
        ends = np.append(starts[1:], len(ids))
        fd = os.open(vectors.filename, os.O_RDONLY)
        try:
            for a, b in zip(starts.tolist(), ends.tolist()):
                want = (b - a) * row
                got = 0
                while got < want:  # pread may return less than asked for large runs
                    n = os.preadv(fd, [mv[a * row + got:b * row]], vectors.offset + int(ids[a]) * row + got)
                    if n <= 0:
                        raise OSError(f"'{vectors.filename}': rows {ids[a]}..{ids[b - 1]} are cut short "
                                      "(damaged file?)")
                    got += n
        finally:
            os.close(fd)
        return out
    return np.asarray(vectors[ids], dtype=np.float32)


def rerank(queries: np.ndarray, cand: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact re-ranking: for each query, the inner products with its candidates' stored vectors (ids < 0 are
    padding), the best ``k`` first. Rows are read in ascending order (read_rows)."""
    nq = len(queries)
    scores = np.full((nq, k), -np.inf, dtype=np.float32)
    ids = np.full((nq, k), -1, dtype=np.int64)
    for i in range(nq):
        c = np.unique(cand[i][cand[i] >= 0])
        if not len(c):
            continue
        s = read_rows(vectors, c) @ queries[i]
        top = np.argsort(-s, kind="stable")[:k]
        scores[i, :len(top)] = s[top]
        ids[i, :len(top)] = c[top]
    return scores, ids

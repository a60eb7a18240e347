"""Query-sensitive co-attention search (Hu & Bors, Neural Networks 2023, sections 4.2 and 5).

For a query vector ``V_q`` (D', unit) and a candidate's clustered features ``X_{c,K}`` (K unit vectors u_i
with norms n_i, see glimr.extract.local):

    a_i  = V_q . u_i                                  cosine similarity (sec. 4.2)
    a'_i = exp(T a_i) / sum_j exp(T a_j)              eq. (8), temperature T = 10
    V_c  = 1/K sum_i a'_i x_i                         eq. (9) with the normalised a'_i (the paper prints a_i)
    S    = cos(V_q, V_c)                              eq. (10)

``x_i`` is the unit cluster vector (``pool="unit"``: the paper L2-normalises X_{c,K} after PCA, sec. 5.1) or
the un-normalised PCA vector n_i u_i (``pool="norm"``). Empty cluster slots (n_i = 0) get no weight.
The score needs only a_i, the weights and the candidates' Gram matrices G_ij = u_i . u_j (stored):
``S = sum_i w_i a_i / sqrt(w^T G w)`` with w_i = a'_i (x n_i): one matrix-vector product per candidate
block, no per-candidate Python loop.

Search (:meth:`CoAttentionIndex.search`): the inverted file (sec. 5.2) keeps the images that share a visual
word with the query; optionally (``shortlist``) only the best of them by the temperature-0 proxy (uniform
weights, stored in ``proxy_dim`` dimensions) are scored exactly; the others get the ``fallback`` score
("zero": the paper; "last": below every scored image; "proxy": their proxy score, minus 2).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from glimr.extract.local import CoAttentionParams, RecordCodec, l2n_np
from glimr.rerank.invfile import InvertedFile

__all__ = ["coattention_weights", "score_dense", "CoAttentionIndex", "SearchResult", "expand_query",
           "rerank_coattention"]

FALLBACKS = ("zero", "last", "proxy")
SHORTLIST_BY = ("votes", "proxy")
_BLOCK = 2048                # int8 / float16 rows converted to float32 at a time (4 MB at D' = 512)
POOLS = ("unit", "norm")


def coattention_weights(a: np.ndarray, valid: np.ndarray | None = None, temperature: float = 10.0) -> np.ndarray:
    """Eq. (8): softmax of T * a over the last axis (slots with ``valid`` False get weight 0)."""
    z = np.asarray(a, dtype=np.float32) * np.float32(temperature)
    if valid is not None:
        z = np.where(valid, z, -np.inf)
    zmax = np.max(z, axis=-1, keepdims=True)
    zmax = np.where(np.isfinite(zmax), zmax, 0.0)
    e = np.exp(z - zmax)
    s = e.sum(-1, keepdims=True)
    return np.divide(e, s, out=np.zeros_like(e), where=s > 0).astype(np.float32, copy=False)


def score_dense(q: np.ndarray, units: np.ndarray, norms: np.ndarray, gram: np.ndarray | None = None,
                temperature: float = 10.0, pool: str = "unit") -> np.ndarray:
    """Co-attention scores of M candidates: ``units`` (M, K, D') float, ``norms`` (M, K), ``gram`` (M, K, K)
    (computed from ``units`` if None). Returns (M,) float32."""
    if pool not in POOLS:
        raise ValueError(f"pool {pool!r}: use one of {POOLS}")
    units = np.asarray(units, dtype=np.float32)
    a = units @ np.asarray(q, np.float32)                                 # (M, K) cosines
    return _combine(a, np.asarray(norms, np.float32),
                    gram if gram is not None else np.einsum("mkd,mld->mkl", units, units), temperature, pool)


def _combine(a: np.ndarray, norms: np.ndarray, gram: np.ndarray, temperature: float, pool: str) -> np.ndarray:
    """From cosines a (M, K), norms (M, K) and Gram (M, K, K) or its upper triangle (M, K(K-1)/2)."""
    valid = norms > 0
    w = coattention_weights(a, valid, temperature)                        # eq. (8)
    if pool == "norm":
        w = w * norms
    num = (w * a).sum(1)                                                 # V_q . (sum_i w_i x_i)
    k = a.shape[1]
    if gram.ndim == 3:
        den2 = np.einsum("mk,mkl,ml->m", w, gram, w)
    else:                                                                 # unit diagonal + 2 x upper triangle
        iu0, iu1 = np.triu_indices(k, 1)
        den2 = (w * w).sum(1) + 2.0 * ((w[:, iu0] * w[:, iu1]) * gram).sum(1)
    den = np.sqrt(np.maximum(den2, 1e-12))
    return (num / den).astype(np.float32)                                 # eq. (10) (1/K of eq. (9) cancels)


@dataclass
class SearchResult:
    ids: np.ndarray            # row ids (vids), best first
    scores: np.ndarray
    n_candidates: int          # images sharing a word with the query (all live ones without the IVF)
    n_scored: int              # images scored by co-attention


class CoAttentionIndex:
    """The co-attention features of a database, as contiguous arrays, row = image id (vid)."""

    def __init__(self, codes: np.ndarray, norms: np.ndarray, gram: np.ndarray, proxy: np.ndarray,
                 proxy_scale: np.ndarray, codec: RecordCodec, words: np.ndarray | None = None,
                 live: np.ndarray | None = None, ivf: InvertedFile | None = None, n_words: int | None = None):
        self.codec = codec
        self.codes = np.ascontiguousarray(codes)
        self.norms = np.ascontiguousarray(norms, dtype=np.float32)
        self.gram = np.ascontiguousarray(gram, dtype=np.float32)
        self.proxy = np.ascontiguousarray(proxy, dtype=np.int8)
        self.proxy_scale = np.ascontiguousarray(proxy_scale, dtype=np.float32)
        self._proxy_t = torch.from_numpy(self.proxy)
        self.words = words
        self.m = len(self.codes)
        self.live = np.ones(self.m, bool) if live is None else np.asarray(live, bool)
        if ivf is None and words is not None and n_words:
            ivf = InvertedFile.from_words(words, n_words, codec.pad_word, rows=np.flatnonzero(self.live))
        self.ivf = ivf

    @property
    def _all_live(self) -> bool:
        return bool(self.live.all())

    # ---- construction ----
    @classmethod
    def from_records(cls, records: np.ndarray, codec: RecordCodec, n_words: int | None = None,
                     live: np.ndarray | None = None, ivf: InvertedFile | None = None) -> CoAttentionIndex:
        words = np.asarray(records["words"]) if codec.max_words else None
        return cls(records["codes"], records["norms"], records["gram"], records["proxy"], records["proxy_scale"], codec,
                   words, live, ivf, n_words)

    @classmethod
    def from_store(cls, store) -> CoAttentionIndex:
        """From an index folder built with ``--coattention`` (the inverted file is cached in it)."""
        params = CoAttentionParams.load(Path(store.dir) / "coattention")
        codec = params.codec
        recs = store.coattention_records()
        vids, _ = store.live()
        live = np.zeros(len(recs), bool)
        live[vids] = True
        ivf = None
        n_words = params.codebook.size if params.codebook is not None else None
        if codec.max_words and n_words:
            state = {"n_vectors": int(store.n_vectors), "n_live": int(len(vids)), "n_words": int(n_words),
                     "live_sum": int(vids.sum())}
            cache = Path(store.dir) / "coattention"
            ivf = InvertedFile.load(cache, state)
            if ivf is None:
                ivf = InvertedFile.from_words(np.asarray(recs["words"]), n_words, codec.pad_word, rows=vids)
                try:
                    ivf.save(cache, state)
                except OSError:  # a read-only index can still be searched
                    pass
        idx = cls.from_records(recs, codec, n_words, live, ivf)
        idx.params = params
        return idx

    # ---- storage ----
    def bytes_per_image(self) -> dict:
        rec = self.codec.nbytes
        ivf = self.ivf.nbytes / max(1, int(self.live.sum())) if self.ivf is not None else 0.0
        return {"record": rec, "inverted_file": round(ivf, 1), "total": round(rec + ivf, 1)}

    # ---- scoring ----
    def _units(self, rows) -> np.ndarray:
        return self.codec.decode_units(self.codes[rows])

    def cosines(self, q: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
        """a_i = V_q . u_i for the given rows: (m, K), float32 accumulation.

        float32 codes: one matrix-vector product on the stored array (no copy). float16 / int8 codes (int8: the
        per-dimension step folds into the query) are converted to float32 in blocks of ``_BLOCK`` vectors (a
        cache-sized buffer) before each matrix-vector product: the float32 value of ``decode_units(codes) @ q``
        up to the order of the sums, with public operations only."""
        codes = self.codes[rows]
        k, d = codes.shape[1], codes.shape[2]
        flat = torch.from_numpy(np.ascontiguousarray(codes).reshape(-1, d))
        if codes.dtype == np.float32:
            return torch.mv(flat, torch.from_numpy(np.asarray(q, np.float32))).numpy().reshape(-1, k)
        qq = np.asarray(q, np.float32)
        if self.codec.dtype == "int8":
            qq = qq * self.codec.scale      # the per-dimension step folds into the query
        return _mv_f32(flat, torch.from_numpy(np.ascontiguousarray(qq, np.float32))).reshape(-1, k)

    def scores(self, q: np.ndarray, rows: np.ndarray | None = None, temperature: float = 10.0,
               pool: str = "unit", chunk: int = 32768) -> np.ndarray:
        """Co-attention scores (eq. (10)) of ``rows`` (default: all), vectorised in blocks of ``chunk``."""
        if pool not in POOLS:
            raise ValueError(f"pool {pool!r}: use one of {POOLS}")
        rows = np.arange(self.m) if rows is None else np.asarray(rows)
        out = np.empty(len(rows), np.float32)
        for s in range(0, len(rows), chunk):
            r = rows[s:s + chunk]
            if len(r) and r[-1] - r[0] == len(r) - 1 and np.all(np.diff(r) == 1):
                r = slice(int(r[0]), int(r[-1]) + 1)       # contiguous block: a view, not a copy
            out[s:s + chunk] = _combine(self.cosines(q, r), self.norms[r], self.gram[r], temperature, pool)
        return out

    def proxy_scores(self, q: np.ndarray) -> np.ndarray:
        """The temperature-0 proxy for every row: cos over the first proxy_dim dimensions (float32; the int8
        proxy is converted in blocks, then times its per-row scale)."""
        qp = torch.from_numpy(l2n_np(np.asarray(q, np.float32)[:self.proxy.shape[1]]))
        return _mv_f32(self._proxy_t, qp) * self.proxy_scale

    def candidates(self, qwords: np.ndarray | None, ivf: bool = True) -> np.ndarray:
        """(m,) bool: live rows sharing a word with the query (all live rows without the IVF / words)."""
        if ivf and self.ivf is not None and qwords is not None:
            return self.ivf.mask(qwords) & self.live
        return self.live.copy()

    def search(self, q: np.ndarray, qwords: np.ndarray | None = None, k: int | None = 100, *,
               temperature: float = 10.0, pool: str = "unit", ivf: bool = True, shortlist: int | None = None,
               fallback: str = "zero", prior: np.ndarray | None = None, shortlist_by: str = "votes") -> SearchResult:
        """Rank the live rows for query vector ``q`` (D', unit) and its visual words ``qwords``.

        ivf: score only rows sharing a word (sec. 5.2); shortlist: at most this many of them, the best by
        ``shortlist_by`` ("votes": the most query words shared, ties by the proxy; "proxy": the temperature-0
        proxy); fallback: the score of the rows not scored ("zero" as the paper, "last", "proxy");
        prior: (m,) order keys to break ties among unscored rows (lower first, e.g. a global ranking);
        k: how many to return (None: every live row)."""
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback {fallback!r}: use one of {FALLBACKS}")
        cand = self.candidates(qwords, ivf)
        n_cand = int(cand.sum())
        proxy = None
        if shortlist is not None and n_cand > shortlist:
            if shortlist_by not in SHORTLIST_BY:
                raise ValueError(f"shortlist_by {shortlist_by!r}: use one of {SHORTLIST_BY}")
            proxy = self.proxy_scores(q)
            pc = np.where(cand, proxy, -np.inf)
            if shortlist_by == "votes" and self.ivf is not None and qwords is not None and ivf:
                pc = np.where(cand, self.ivf.votes(qwords) + (proxy + 1.0) / 4.0, -np.inf)
            top = np.argpartition(-pc, shortlist - 1)[:shortlist]
            rows = np.sort(top)
        else:
            rows = np.flatnonzero(cand)
        s = self.scores(q, rows, temperature, pool)
        if fallback == "proxy":
            proxy = self.proxy_scores(q) if proxy is None else proxy
            full = proxy.astype(np.float32) - 2.0
        else:
            full = np.full(self.m, 0.0 if fallback == "zero" else -3.0, np.float32)   # "last": below any cosine
        full[rows] = s
        if not self._all_live:
            full[~self.live] = -np.inf
        n_live = self.m if self._all_live else int(self.live.sum())
        key2 = prior if prior is not None else None
        if k is None or k >= n_live:
            ids = np.flatnonzero(self.live) if not self._all_live else np.arange(self.m)
            order = np.lexsort((key2[ids] if key2 is not None else ids, -full[ids]))
            ids = ids[order]
        else:
            ids = _top_k(full, int(k), key2)
        return SearchResult(ids, full[ids], n_cand, len(rows))

    def pooled(self, q: np.ndarray, rows: np.ndarray, temperature: float = 10.0, pool: str = "unit") -> np.ndarray:
        """The query-conditioned candidate vectors V_c (eq. (9)), L2-normalised: (len(rows), D')."""
        units = self._units(rows)
        a = np.einsum("mkd,d->mk", units, np.asarray(q, np.float32))
        w = coattention_weights(a, self.norms[rows] > 0, temperature)
        if pool == "norm":
            w = w * self.norms[rows]
        return l2n_np(np.einsum("mk,mkd->md", w, units))


def _mv_f32(mat: torch.Tensor, vec: torch.Tensor) -> np.ndarray:
    """``mat @ vec`` for an int8 / float16 (n, d) matrix and a float32 (d,) vector: float32 (n,), computed block by
    block on a float32 copy of ``_BLOCK`` rows (one reused buffer; a whole float copy would be 4x the codes)."""
    n, d = mat.shape
    out = torch.empty(n, dtype=torch.float32)
    buf = torch.empty((min(n, _BLOCK), d), dtype=torch.float32)
    for s in range(0, n, _BLOCK):
        e = min(n, s + _BLOCK)
        b = buf[:e - s]
        b.copy_(mat[s:e])
        torch.mv(b, vec, out=out[s:e])
    return out.numpy()


def _top_k(score: np.ndarray, k: int, key2: np.ndarray | None) -> np.ndarray:
    """The ``k`` rows of highest ``score`` (ties: lower ``key2``, else lower row id), sorted; O(M), no full sort."""
    k = max(0, min(k, len(score)))
    if k == 0:
        return np.zeros(0, np.int64)
    part = np.argpartition(-score, k - 1)[:k]
    thr = score[part].min()
    above = np.flatnonzero(score > thr)
    ties = np.flatnonzero(score == thr)
    need = k - len(above)
    if need < len(ties):
        t2 = key2[ties] if key2 is not None else ties
        ties = ties[np.argpartition(t2, need - 1)[:need]] if need > 0 else ties[:0]
    ids = np.concatenate([above, ties])
    t2 = key2[ids] if key2 is not None else ids
    return ids[np.lexsort((t2, -score[ids]))]


def expand_query(q: np.ndarray, vecs: np.ndarray, scores: np.ndarray, alpha: float = 3.0) -> np.ndarray:
    """alpha-QE (Radenovic et al.): normalise(q + sum_j max(s_j, 0)^alpha v_j) over the top results."""
    w = np.power(np.maximum(np.asarray(scores, np.float64), 0.0), alpha)
    return l2n_np(np.asarray(q, np.float32) + (w[:, None] * vecs).sum(0).astype(np.float32))


def search_with_qe(index: CoAttentionIndex, q: np.ndarray, qwords=None, k: int | None = 100, *, qe: int = 2,
                   alpha: float = 3.0, **kw) -> SearchResult:
    """Co-attention + alpha-QE: the query is expanded with the query-conditioned vectors V_c of its top
    ``qe`` results (weights cos^alpha), then searched again by co-attention (same candidates)."""
    first = index.search(q, qwords, k=max(qe, 1), **kw)
    top = first.ids[:qe]
    if len(top) == 0 or qe <= 0:
        return index.search(q, qwords, k=k, **kw)
    t, pool = kw.get("temperature", 10.0), kw.get("pool", "unit")
    q2 = expand_query(q, index.pooled(q, top, t, pool), first.scores[:qe], alpha)
    return index.search(q2, qwords, k=k, **kw)


def rerank_coattention(qvecs: np.ndarray, index: CoAttentionIndex, qwords=None, ranks: np.ndarray | None = None,
                       *, qe: int = 0, alpha: float = 3.0, **kw) -> np.ndarray:
    """Full rankings [Ndb, Nq] (the eval layout) by co-attention; ``ranks`` (the global ranking) breaks ties
    among the images the inverted file leaves out."""
    n_db = index.m
    out = np.empty((int(index.live.sum()), len(qvecs)), dtype=np.int64)
    for j, q in enumerate(qvecs):
        prior = None
        if ranks is not None:
            prior = np.empty(n_db, np.int64)
            prior[ranks[:, j]] = np.arange(len(ranks))
        w = qwords[j] if qwords is not None else None
        if qe > 0:
            res = search_with_qe(index, q, w, k=None, qe=qe, alpha=alpha, prior=prior, **kw)
        else:
            res = index.search(q, w, k=None, prior=prior, **kw)
        out[:, j] = res.ids
    return out


def query_features(model, image, params: CoAttentionParams, *, scales, max_size: int, box=None,
                   precision: str = "auto"):
    """(V_q (D',), visual words) of one query image (path or PIL image), optionally cropped to ``box``."""
    from glimr.extract.local import extract_local  # noqa: PLC0415

    res, locs = extract_local(model, [image], cfg=params.cfg, scales=scales, max_size=max_size,
                              boxes=[box] if box is not None else None, workers=0, progress=False,
                              precision=precision, report_errors=False)
    if res.errors:
        raise ValueError(res.errors[0])
    return params.query_vector(locs[0]), params.query_words(locs[0])


def search_store(store, model, image, k: int = 10, *, box=None, precision: str = "auto", qe: int = 0,
                 alpha: float = 3.0, **kw) -> tuple[list[tuple[str, float]], SearchResult]:
    """Co-attention search of an index folder built with ``--coattention``: [(path, score)] best first."""
    idx = CoAttentionIndex.from_store(store)
    q, words = query_features(model, image, idx.params, scales=store.config.scales,
                              max_size=store.config.max_size, box=box, precision=precision)
    res = search_with_qe(idx, q, words, k=k, qe=qe, alpha=alpha, **kw) if qe > 0 else idx.search(q, words, k, **kw)
    names = store.paths_for(res.ids)
    return [(names[int(i)], float(s)) for i, s in zip(res.ids, res.scores)], res


# ------------------------------------------------------------------------------------------ evaluation
def cached_locals(cache, name: str, model, items, boxes, cfg, scales, max_size: int, *, workers: int | None = None,
                  batch_size: int = 16, ident=None, progress: bool = True, precision: str = "auto"):
    """(ImageLocal per item, multi-scale global descriptors) from one forward pass per view; cached in
    ``cache`` (a folder; None = no cache) by model, images, boxes, scales, max size, N, K (and precision, when
    it resolves to bf16)."""
    import hashlib  # noqa: PLC0415
    import json  # noqa: PLC0415

    from glimr.extract.local import extract_local, load_locals, save_locals  # noqa: PLC0415
    from glimr.models.precision import resolve_precision

    precision = resolve_precision(precision)
    fields = [ident, [str(p) for p in items], boxes, [float(s) for s in scales], max_size, cfg.n_select,
              cfg.clusters, cfg.kmeans_iters, cfg.p] + ([precision] if precision != "fp32" else [])
    key = hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]
    d = Path(cache) / f"{name}__{key}" if cache is not None else None
    # the model's descriptors go to descriptors.npy: save_locals already writes the ImageLocal's own
    # global.npy (the GeM over every location, the PCA's sample vector), which they must not replace
    if d is not None and (d / "locals.json").is_file() and (d / "descriptors.npy").is_file():
        return load_locals(d), np.load(d / "descriptors.npy", allow_pickle=False)
    res, locs = extract_local(model, [str(p) if isinstance(p, Path) else p for p in items], cfg=cfg, scales=scales,
                              max_size=max_size, boxes=boxes, workers=workers, batch_size=batch_size,
                              progress=progress, desc=name, precision=precision)
    out = [locs.get(i) for i in range(len(items))]
    if d is None:
        return out, res.descriptors
    from glimr.io.atomic import atomic_write_npy  # noqa: PLC0415

    save_locals(d, out)
    atomic_write_npy(d / "descriptors.npy", res.descriptors)
    return load_locals(d), res.descriptors


def _fitted_params(cache, net, items, cfg, max_size: int, kw: dict):
    """The PCA / codebook learned from ``items`` (at scale 1), kept in ``cache`` beside the samples' features:
    the same fit serves every evaluated set (the 65,536-word codebook of the paper's configuration takes
    minutes to learn)."""
    import hashlib  # noqa: PLC0415
    import json  # noqa: PLC0415

    from glimr.extract.local import fit_params  # noqa: PLC0415

    d = None
    if cache is not None:
        # "v2": fits before it took the model's descriptors as the PCA samples (a file-name clash)
        fields = [kw.get("ident"), [str(p) for p in items], cfg.to_json(), max_size, kw.get("precision"), "v2"]
        key = hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]
        d = Path(cache) / f"ca-params__{key}"
        if (d / "params.json").is_file():
            params = CoAttentionParams.load(d)
            if params.cfg in (cfg, cfg.capped(params.pca.mean.shape[0])):
                return params
    s_locs, _ = cached_locals(cache, "ca-samples", net, items, None, cfg, (1.0,), max_size, **kw)
    params = fit_params([x for x in s_locs if x is not None], cfg)
    if d is not None:
        params.save(d)
    return params


def rerank_images(q_desc, db_desc, ranks, *, query_paths, db_paths, query_boxes=None, model="gem-lite0",
                  checkpoint=None, scales="paper", max_size: int = 512, fit=None, samples=None,
                  n_samples: int = 1000, cache=None, config: str = "default", clusters: int | None = None,
                  n: int | None = None, dim: int | None = None, dtype: str | None = None,
                  codebook: int | None = None, words: int | None = None, temperature: float = 10.0, qe: int = 0,
                  alpha: float = 3.0, ivf: bool | None = None, shortlist: int | None = None,
                  fallback: str = "zero", pool: str = "unit", workers: int | None = None, progress: bool = True,
                  pca_whiten: bool = False, net=None, precision: str = "auto",
                  notes: list | None = None) -> np.ndarray:
    """Co-attention re-ranking of an evaluation set from its images (the eval re-ranker ``coattention``).

    The images' co-attention features are extracted at ``scales`` ("paper" = 1/(2 sqrt 2) .. sqrt 2, or
    a scale set name, or "0.5;1;2") and cached in ``cache``. ``config``: "default" (D' = 512 float32, no
    inverted file: ``words`` = 0), "paper" (:meth:`LocalConfig.paper`: 65,536 words, all N = 500 features
    assigned, D' = 512 float32, inverted file on) or "compact" (:meth:`LocalConfig.compact`); ``n``,
    ``clusters``, ``dim``, ``dtype``, ``codebook``, ``words`` override single values. The PCA (and the
    codebook) are learned at one scale from at most ``n_samples`` images of ``fit`` (``samples`` is its old
    name): a folder separate from the evaluated images (default: $GLIMR_FIT_IMAGES or ../shared/data/photos),
    or "database" (transductive); which one is appended to ``notes`` (and printed with ``progress``).
    Returns the [Ndb, Nq] ranking; the global ``ranks`` order the images the inverted file leaves out."""
    from glimr.extract.local import PAPER_SCALES, LocalConfig, resolve_fit_images, sample_items  # noqa: PLC0415
    from glimr.extract.multiscale import parse_scales  # noqa: PLC0415
    from glimr.models.checkpoint import model_fingerprint

    if net is None:
        from glimr.models.registry import build_model  # noqa: PLC0415

        net = build_model(model, checkpoint=str(checkpoint) if checkpoint else None)
    sc = PAPER_SCALES if str(scales) == "paper" else parse_scales(str(scales).replace(";", ","))
    over = {k: v for k, v in {"n_select": n, "clusters": clusters, "dim": dim, "dtype": dtype,
                               "codebook_size": codebook, "max_words": words}.items() if v is not None}
    over = {k: (str(v) if k == "dtype" else int(v)) for k, v in over.items()}
    if config == "default" and "max_words" not in over:
        over["max_words"] = 0                                     # the eval default: no inverted file
    base = LocalConfig.named(str(config), **over)
    cfg = LocalConfig(**{**base.to_json(), "proxy_dim": min(64, base.dim), "pca_whiten": bool(pca_whiten)})
    # the weights themselves key the feature cache: a retrained model with the same name and config (or one
    # handed over as ``net``, without its checkpoint's path) never reads another model's features
    ident = {"model": getattr(net, "name", model), "weights": model_fingerprint(net),
             "config": getattr(net, "config", None)}
    fit_items, fit_label = resolve_fit_images(fit if fit is not None else samples, list(db_paths))
    s_items = sample_items(fit_items, n_samples)
    line = f"co-attention ({config} configuration) PCA and codebook fitted on {fit_label}, {len(s_items)} sampled"
    if notes is not None:
        notes.append(line)
    if progress:
        print(line, file=sys.stderr)
    kw = dict(workers=workers, ident=ident, progress=progress, precision=precision)
    params = _fitted_params(cache, net, s_items, cfg, max_size, kw)
    if params.cfg.dim != cfg.dim:
        line = (f"co-attention: D' capped at the local features' {params.cfg.dim} dimensions "
                f"(asked {cfg.dim})")
        if notes is not None:
            notes.append(line)
        if progress:
            print(line, file=sys.stderr)
    q_locs, _ = cached_locals(cache, "ca-queries", net, list(query_paths), query_boxes, cfg, sc, max_size, **kw)
    db_locs, _ = cached_locals(cache, "ca-database", net, list(db_paths), None, cfg, sc, max_size, **kw)
    if any(x is None for x in q_locs):
        raise ValueError("a query image could not be read: every query must be evaluated")
    codec = params.codec
    empty = np.zeros((), dtype=codec.record)
    recs = np.stack([params.encode(x) if x is not None else empty for x in db_locs])
    live = np.array([x is not None for x in db_locs])
    index = CoAttentionIndex.from_records(recs, codec, params.codebook.size if params.codebook else None, live)
    qv = np.stack([params.query_vector(x) for x in q_locs])
    qw = [params.query_words(x) for x in q_locs] if params.codebook is not None else None
    use_ivf = bool(cfg.max_words) if ivf is None else bool(ivf)
    out = rerank_coattention(qv, index, qw, np.asarray(ranks), qe=int(qe), alpha=float(alpha),
                             temperature=float(temperature), ivf=use_ivf, shortlist=shortlist, fallback=fallback,
                             pool=pool)
    if not live.all():      # unreadable database images: ranked last, as the global ranking does
        bad = np.flatnonzero(~live)
        out = np.vstack([out, np.repeat(bad[:, None], out.shape[1], 1)])
    return out

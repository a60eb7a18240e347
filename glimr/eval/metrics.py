"""Retrieval metrics, exactly as published.

Conventions shared by every function here:

- ``ranks`` is an integer array of shape ``[n_database, n_queries]``: column ``j`` lists database
  indices ranked best first for query ``j`` (the layout of the official revisitop code). A column may be
  truncated (a top-k list): positives that are not listed count as never retrieved.
- Average precision uses the official revisitop interpolation (``compute_ap``): junk images are removed
  from the ranked list first; then the i-th positive (0-based) at rank r (0-based) contributes
  ``(p0 + p1) / 2 / n_pos`` with ``p0 = i / r`` (1 when r == 0) and ``p1 = (i + 1) / (r + 1)``.
  ``n_pos`` is the number of positives in the ground truth, retrieved or not.
- mP@k follows revisitop ``compute_map``: with the 1-based positions (after junk removal) of the
  retrieved positives, ``kq = min(max(positions), k)`` and ``P@k = #(positions <= kq) / kq``.
- Queries without positives (e.g. two ROxford queries have no *easy* image) are excluded from the
  means, as in the official code; results record which ones (``ProtocolResult.excluded``).
- Every mean is returned in percent (0..100). ``compute_ap`` alone returns a fraction, like the original.

Protocols:

- Revisited Oxford/Paris (Radenovic et al., CVPR 2018), ``revisited_map``:
  Easy: positives easy, ignored junk + hard; Medium: positives easy + hard, ignored junk;
  Hard: positives hard, ignored junk + easy.
- Original Oxford5k/Paris6k (Philbin et al. 2007/2008), ``oxford_map``: positives good + ok, ignored junk.
- UKBench (Nister & Stewenius, CVPR 2006), ``ukbench_ns``: the N-S score, the average number of the
  query object's 4 images among the top 4 (the query itself included), 0..4.
- Generic ``gnd.json`` ground truth (Clutter-UKB), ``gnd_json_map``: listed positives, optional junk.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "REVISITED_PROTOCOLS",
    "ProtocolResult",
    "check_ranks",
    "compute_ap",
    "compute_map",
    "revisited_protocols",
    "revisited_eval",
    "revisited_map",
    "oxford_ground_truth",
    "oxford_eval",
    "oxford_map",
    "ukbench_ns",
    "gnd_json_eval",
    "gnd_json_map",
]

#: Revisited protocols: name -> (positive keys, ignored keys), Radenovic et al. CVPR 2018 Sec. 4.
REVISITED_PROTOCOLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


@dataclass
class ProtocolResult:
    """Metrics of one protocol: means in percent, per-query values in percent (NaN where excluded)."""

    map: float
    mp: dict[int, float]
    aps: np.ndarray
    prs: np.ndarray
    kappas: tuple[int, ...]
    excluded: list[int] = field(default_factory=list)

    @property
    def n_queries(self) -> int:
        return len(self.aps)

    def as_dict(self) -> dict[str, float]:
        """``{"mAP": .., "mP@1": .., ...}`` in percent."""
        out = {"mAP": self.map}
        out.update({f"mP@{k}": self.mp[k] for k in self.kappas})
        return out

    def note(self) -> str:
        """A sentence about excluded queries, or '' when none was excluded."""
        if not self.excluded:
            return ""
        return (f"{len(self.excluded)} of {self.n_queries} queries have no positives and are excluded "
                f"from the means (as in the official protocol): query indices {self.excluded}")


def check_ranks(ranks, n_queries: int, *, what: str = "ranks") -> np.ndarray:
    """Validate ``ranks`` ([n_database, n_queries] integers, no repeats in a column) and return it.

    Catches the usual accidents: a transposed array, float scores passed instead of ranks, a column
    that lists an image twice (which would inflate AP), negative indices.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array [n_database, n_queries], got shape {ranks.shape}")
    if not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"{what} must hold integer database indices (got dtype {ranks.dtype}); "
                         "pass argsort(-scores, axis=0), not the scores themselves")
    if ranks.shape[1] != n_queries:
        hint = ""
        if ranks.shape[0] == n_queries:
            hint = " It looks transposed: use ranks.T (column j must be the ranking of query j)."
        raise ValueError(f"{what} has shape {ranks.shape} but the ground truth has {n_queries} queries; "
                         f"expected [n_database, {n_queries}].{hint}")
    if ranks.size and ranks.min() < 0:
        raise ValueError(f"{what} holds negative database indices")
    if ranks.shape[0] > 1:
        s = np.sort(ranks, axis=0)
        dup = np.nonzero((s[1:] == s[:-1]).any(axis=0))[0]
        if dup.size:
            raise ValueError(f"{what}: column(s) {dup[:5].tolist()} list a database image more than once")
    return ranks


def compute_ap(positions, n_pos: int) -> float:
    """Average precision (fraction 0..1) from the sorted 0-based ranks of the retrieved positives,
    junk already removed; ``n_pos`` = number of positives in the ground truth (revisitop compute_ap)."""
    r = np.asarray(positions, dtype=np.float64)
    if n_pos <= 0:
        raise ValueError("compute_ap needs at least one positive")
    if r.size == 0:
        return 0.0
    i = np.arange(r.size, dtype=np.float64)
    # precision just before the i-th positive (1 at rank 0), and just after it: trapezoidal rule
    p0 = np.divide(i, r, out=np.ones_like(r), where=r > 0)
    p1 = (i + 1.0) / (r + 1.0)
    return float(np.sum(p0 + p1) / (2.0 * n_pos))


def _as_index_array(x) -> np.ndarray:
    if x is None:
        return np.empty(0, dtype=np.int64)
    a = np.asarray(x, dtype=np.int64).ravel()
    return a


def compute_map(ranks, gnd: Sequence[Mapping], kappas: Sequence[int] = (1, 5, 10), *,
                check: bool = True) -> ProtocolResult:
    """mAP and mP@k over queries whose ground truth dicts have ``ok`` (positives) and ``junk``.

    The positional semantics are those of revisitop ``compute_map``; values returned in percent.
    ``check=False`` skips :func:`check_ranks` (for callers that already ran it).
    """
    kappas = tuple(int(k) for k in kappas)
    ranks = check_ranks(ranks, len(gnd)) if check else np.asarray(ranks)
    nq = len(gnd)
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(kappas)), np.nan)
    excluded: list[int] = []
    for q in range(nq):
        ok = _as_index_array(gnd[q].get("ok"))
        if ok.size == 0:
            excluded.append(q)
            continue
        junk = _as_index_array(gnd[q].get("junk"))
        col = ranks[:, q]
        pos = np.flatnonzero(np.isin(col, ok))  # sorted 0-based positions of the positives
        if junk.size:
            jpos = np.flatnonzero(np.isin(col, junk))
            # shift each positive up by the number of junk images ranked strictly before it
            pos = pos - np.searchsorted(jpos, pos, side="left")
        aps[q] = compute_ap(pos, ok.size)
        if pos.size == 0:
            prs[q] = 0.0
            continue
        pos1 = pos + 1  # 1-based
        for j, k in enumerate(kappas):
            kq = min(int(pos1.max()), k)
            prs[q, j] = np.count_nonzero(pos1 <= kq) / kq
    valid = np.ones(nq, dtype=bool)
    valid[excluded] = False
    if not valid.any():
        raise ValueError("no query has any positive: nothing to evaluate")
    m = float(np.mean(aps[valid])) * 100.0
    mp = {k: float(np.mean(prs[valid, j])) * 100.0 for j, k in enumerate(kappas)}
    return ProtocolResult(map=m, mp=mp, aps=aps * 100.0, prs=prs * 100.0, kappas=kappas, excluded=excluded)


# ----------------------------------------------------------------------------- Revisited Oxford/Paris
def revisited_protocols(gnd: Sequence[Mapping]) -> dict[str, list[dict[str, np.ndarray]]]:
    """The per-protocol ``ok``/``junk`` ground truth of the Revisited datasets (easy, medium, hard)."""
    for q, g in enumerate(gnd):
        missing = [k for k in ("easy", "hard", "junk") if k not in g]
        if missing:
            have = sorted(g.keys())
            hint = (" This looks like an original-protocol file (Oxford5k/Paris6k): use oxford_map "
                    "(dataset oxford5k/paris6k), not the Revisited protocol."
                    if "ok" in g or "good" in g else "")
            raise ValueError(f"ground truth of query {q} lacks {missing} (has {have}): not a Revisited "
                             f"gnd_r*.pkl.{hint}")
    out: dict[str, list[dict[str, np.ndarray]]] = {}
    for name, (pos_keys, junk_keys) in REVISITED_PROTOCOLS.items():
        out[name] = [
            {"ok": np.concatenate([_as_index_array(g[k]) for k in pos_keys]),
             "junk": np.concatenate([_as_index_array(g[k]) for k in junk_keys])}
            for g in gnd
        ]
    return out


def revisited_eval(ranks, gnd: Sequence[Mapping], kappas: Sequence[int] = (1, 5, 10)
                   ) -> dict[str, ProtocolResult]:
    """Revisited Easy/Medium/Hard with per-query details (see :func:`revisited_map`)."""
    protocols = revisited_protocols(gnd)
    ranks = check_ranks(ranks, len(gnd))
    return {name: compute_map(ranks, g, kappas, check=False) for name, g in protocols.items()}


def revisited_map(ranks, gnd: Sequence[Mapping], kappas: Sequence[int] = (1, 5, 10)
                  ) -> dict[str, dict[str, float]]:
    """Revisited Oxford/Paris metrics in percent.

    ``ranks``: int array [n_database, n_queries]; ``gnd``: the ``gnd`` list of the official
    ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` (dicts with ``easy``, ``hard``, ``junk``).
    Returns ``{"easy"|"medium"|"hard": {"mAP": .., "mP@1": .., "mP@5": .., "mP@10": ..}}``.
    Queries without positives under a protocol (two ROxford queries under Easy) are excluded from
    that protocol's means; :func:`revisited_eval` says which.
    """
    return {name: r.as_dict() for name, r in revisited_eval(ranks, gnd, kappas).items()}


# ----------------------------------------------------------------------------- original Oxford/Paris
def oxford_ground_truth(gnd: Sequence[Mapping]) -> list[dict[str, np.ndarray]]:
    """Original protocol ``ok``/``junk``: positives = good + ok, ignored = junk."""
    out = []
    for q, g in enumerate(gnd):
        if "ok" not in g and "good" not in g:
            hint = (" This looks like a Revisited file (ROxford/RParis): use revisited_map (dataset "
                    "roxford5k/rparis6k)." if "easy" in g else "")
            raise ValueError(f"ground truth of query {q} has neither 'ok' nor 'good' (has "
                             f"{sorted(g.keys())}): not an original-protocol gnd file.{hint}")
        ok = np.unique(np.concatenate([_as_index_array(g.get("good")), _as_index_array(g.get("ok"))]))
        out.append({"ok": ok, "junk": _as_index_array(g.get("junk"))})
    return out


def oxford_eval(ranks, gnd: Sequence[Mapping], kappas: Sequence[int] = (1, 5, 10)) -> ProtocolResult:
    return compute_map(ranks, oxford_ground_truth(gnd), kappas)


def oxford_map(ranks, gnd: Sequence[Mapping], kappas: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Original Oxford5k/Paris6k protocol (positives good + ok, junk ignored): ``{"mAP", "mP@k"...}``
    in percent. The official files list each query image in the database, among its own positives."""
    return oxford_eval(ranks, gnd, kappas).as_dict()


# ----------------------------------------------------------------------------- UKBench
def ukbench_ns(ranks, query_objects=None, db_objects=None, *, per_query: bool = False):
    """UKBench N-S score: mean number of the query object's images among the top 4 (0..4).

    By default queries and database are both the whole UKBench set in file order, so the object of
    image i is ``i // 4`` and the query itself (in the database) counts, as in Nister & Stewenius.
    Pass ``query_objects``/``db_objects`` (object id per query / per database image) otherwise.
    """
    ranks = np.asarray(ranks)
    nq = ranks.shape[1] if ranks.ndim == 2 else -1
    if query_objects is None:
        query_objects = np.arange(nq) // 4
    query_objects = np.asarray(query_objects)
    ranks = check_ranks(ranks, len(query_objects))
    if ranks.shape[0] < 4:
        raise ValueError("UKBench N-S needs at least the top 4 of each ranking")
    if db_objects is None:
        db_objects = np.arange(int(ranks.max()) + 1) // 4
    db_objects = np.asarray(db_objects)
    top = db_objects[ranks[:4]]  # [4, nq]
    hits = (top == query_objects[None, :]).sum(axis=0).astype(np.float64)
    score = float(hits.mean())
    return (score, hits) if per_query else score


# ----------------------------------------------------------------------------- gnd.json (Clutter-UKB)
def _gnd_json_truth(positives: Sequence[Sequence[int]], junk: Sequence[Sequence[int]] | None):
    if junk is not None and len(junk) != len(positives):
        raise ValueError(f"junk has {len(junk)} entries but positives has {len(positives)}")
    return [{"ok": _as_index_array(p), "junk": _as_index_array(junk[i] if junk is not None else None)}
            for i, p in enumerate(positives)]


def gnd_json_eval(ranks, positives, junk=None, kappas: Sequence[int] = (1, 3)) -> ProtocolResult:
    return compute_map(ranks, _gnd_json_truth(positives, junk), kappas)


def gnd_json_map(ranks, positives, junk=None, kappas: Sequence[int] = (1, 3)) -> dict[str, float]:
    """Metrics for a generic ``gnd.json`` ground truth (``positives[i]`` = database indices of query
    i, optional ``junk[i]``): ``{"mAP", "mP@1", "mP@3"}`` in percent, same AP and mP@k as above."""
    return gnd_json_eval(ranks, positives, junk, kappas).as_dict()

"""One query image against an index folder, with the optional re-ranking: what `glimr search` and the service
(`glimr serve`, glimr/serve/api.py) both run, so that they rank alike.

:class:`SearchSettings` holds the query's options (validated when built); :func:`search_image` embeds the query
(cropped to its box) with the index's own extraction settings and returns ``[(path, score)]`` best first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

RERANKS = ("none", "coattention", "qe", "aqe", "diffusion", "sv", "sv-deep")
FALLBACKS = ("zero", "last", "proxy")
MAX_TOP = 10_000            # at most this many results


class QueryError(ValueError):
    """The query image cannot be used (unreadable, not an image, a crop outside it): the message names it."""


@dataclass(frozen=True)
class SearchSettings:
    """top: results (capped at the index's size); box: (x0, y0, x1, y1) in the query's pixels or None;
    rerank: one of RERANKS; precision: auto/fp32/bf16; query_scales: the query's scales (None: the model's
    recommended ones, else the index's); qe_n, qe_alpha: query expansion (qe/aqe: n defaults to 2; with
    coattention: co-attention + alpha-QE when > 0); temperature, no_ivf, fallback: co-attention; shortlist:
    co-attention candidates / sv's verified global top. sv-deep: spatial verification with the model's own res4
    features (glimr.rerank.sv, ``kind=deep``) instead of SIFT."""

    top: int = 10
    box: tuple[float, float, float, float] | None = None
    rerank: str = "none"
    precision: str = "auto"
    query_scales: tuple[float, ...] | None = None
    qe_n: int = 0
    qe_alpha: float = 3.0
    temperature: float = 10.0
    shortlist: int | None = None
    no_ivf: bool = False
    fallback: str = "zero"

    def __post_init__(self):
        from glimr.config import whole_number
        from glimr.extract.multiscale import PRECISIONS, parse_scales

        object.__setattr__(self, "top", whole_number("top", self.top, 1, MAX_TOP))
        if self.rerank not in RERANKS:
            raise ValueError(f"rerank must be one of {', '.join(RERANKS)}, got {self.rerank!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {', '.join(FALLBACKS)}, got {self.fallback!r}")
        if self.box is not None:
            box = tuple(float(v) for v in self.box)
            if len(box) != 4 or not all(math.isfinite(v) for v in box) or not (box[2] > box[0] and box[3] > box[1]):
                raise ValueError(f"bad box {self.box!r}: expected finite x0,y0,x1,y1 with x1 > x0 and y1 > y0")
            object.__setattr__(self, "box", box)
        if self.query_scales is not None:
            object.__setattr__(self, "query_scales", parse_scales(self.query_scales))
            if self.rerank == "coattention":
                raise ValueError("--query-scales does not apply to --rerank coattention (it uses the index's "
                                 "co-attention scales)")
        object.__setattr__(self, "qe_n", whole_number("qe_n", self.qe_n, 0, 1000))
        object.__setattr__(self, "shortlist", whole_number("shortlist", self.shortlist, 1, 10_000_000, none_ok=True))
        for name, lo in (("qe_alpha", 0.0), ("temperature", 0.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo \
                    or (name == "temperature" and v == 0) or v > (100 if name == "qe_alpha" else 1e4):
                raise ValueError(f"{name} out of range: {v!r}")


def query_scales(settings: SearchSettings, store, model) -> tuple[float, ...]:
    """The query's scales: ``settings.query_scales``, else the model's recommended ``query_scales`` (its
    checkpoint config), else the index's scales (those of the database)."""
    from glimr.extract.multiscale import parse_scales

    if settings.query_scales:
        return settings.query_scales
    if model.config.get("query_scales"):
        return parse_scales(model.config["query_scales"])
    return tuple(store.config.scales)


def search_image(store, model, image: str | Path, settings: SearchSettings) -> list[tuple[str, float]]:
    """Search ``store`` (an open IndexStore) with the query ``image`` (a file); [(path, score)] best first.
    QueryError when the query cannot be read or cropped; FileNotFoundError / IndexStoreError when the index
    lacks what the re-ranking needs (co-attention records, a current diffusion graph)."""
    from glimr.extract.multiscale import extract

    top = min(settings.top, store.stats()["images"])
    if top <= 0:
        return []
    box = settings.box
    if settings.rerank == "coattention":
        from glimr.rerank.coattention import search_store

        try:
            hits, _ = search_store(store, model, image, top, box=box, precision=settings.precision,
                                   qe=settings.qe_n, alpha=settings.qe_alpha, temperature=settings.temperature,
                                   ivf=not settings.no_ivf, shortlist=settings.shortlist, fallback=settings.fallback)
        except ValueError as e:  # the query's own extraction error (glimr.rerank.coattention.query_features)
            if str(e).startswith("cannot read image"):
                raise QueryError(str(e)) from None
            raise
        return hits
    ex = store.config.extract.replace(scales=query_scales(settings, store, model), workers=0,
                                      precision=settings.precision)
    res = extract(model, [image], settings=ex, boxes=[box], progress=False, report_errors=False)
    if res.errors:
        raise QueryError(res.errors[0])
    q = res.descriptors[0]
    if settings.rerank in ("qe", "aqe"):
        from glimr.rerank.qe import search_store as qe_search

        return qe_search(store, q, top, n=settings.qe_n or 2, alpha=None if settings.rerank == "aqe"
                         else settings.qe_alpha)
    if settings.rerank == "diffusion":
        from glimr.rerank.diffusion import search_store as df_search

        return df_search(store, q, top)
    if settings.rerank in ("sv", "sv-deep"):
        from glimr.rerank.sv import SVConfig
        from glimr.rerank.sv import search_store as sv_search

        params = {"kind": "deep"} if settings.rerank == "sv-deep" else {}
        if settings.shortlist:
            params["top"] = settings.shortlist
        return sv_search(store, q, image, top, box=box, cfg=SVConfig.from_params(**params), net=model)
    return store.search(res.descriptors, top)[0]

"""Dataset-level evaluation: images -> descriptors -> rankings -> (re-ranking) -> the published metrics.

One call does it all::

    from glimr.eval.evaluate import evaluate
    report = evaluate("roxford5k", root="data/datasets", model="gem-lite0", scales="3")
    print(report.table()); report.metrics["medium"]["mAP"]

Datasets (:func:`load_eval_set`): ``roxford5k``, ``rparis6k`` (Revisited E/M/H), ``oxford5k``, ``paris6k``
(original protocol) with ``root``; ``ukbench`` with ``root`` (N-S score); any folder holding ``gnd.json``
with ``query/`` and ``db/`` (Clutter-UKB), given as the dataset itself or as ``root/<name>``.

Protocol safeguards: Revisited/Oxford queries are cropped to their ground-truth box unless ``crop=False``
(and the report then says so); junk is ignored as the protocol says; a failed query image is an error;
a failed database image is ranked last (it counts as not retrieved) and is listed in the report.

Re-ranking: :data:`RERANKERS` maps a name to ``fn(q_desc, db_desc, ranks, **params) -> ranks`` where
``q_desc`` [Nq, D] and ``db_desc`` [Ndb, D] are the L2-normalised descriptors, ``ranks`` the
[Ndb, Nq] ranking by inner product (column j for query j, best first), and the result has the same
layout (it may list fewer rows, e.g. a re-ranked top-k; unlisted images count as not retrieved).
A spec string ``"name"`` or ``"name:key=value,key=value"`` passes ``params`` (numbers are parsed).
A re-ranker that needs the images (spatial verification) says so with a function attribute
``fn.needs_images = True``: it is then also given ``query_paths``, ``db_paths``, ``query_boxes`` (the
protocol's query crops, or None), ``cache`` (the ``--cache`` folder, or None) and ``progress`` as keywords.
``none`` is built in; a module of ``glimr.rerank`` exposes its methods by adding them to a dict
``RERANKERS`` in ``glimr/rerank/__init__.py`` (eval reads it; rerank never imports eval), or by one
line in :data:`RERANKERS` below.
"""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glimr.data.gndjson import is_gnd_json_folder, load_gnd_json
from glimr.data.revisited import DATASETS as REVISITED_DATASETS
from glimr.data.revisited import load_revisited
from glimr.data.ukbench import load_ukbench
from glimr.eval import metrics as M
from glimr.io.atomic import atomic_write_bytes
from glimr.models.precision import resolve_precision

__all__ = [
    "RERANKERS",
    "EvalError",
    "EvalSet",
    "EvalReport",
    "Descriptors",
    "available_rerankers",
    "parse_rerank",
    "apply_rerank",
    "load_eval_set",
    "model_identity",
    "rank_by_inner_product",
    "extract_descriptors",
    "score_descriptors",
    "evaluate",
    "build_net",
    "resolve_device",
    "format_metrics_table",
    "KNOWN_DATASETS",
]

KNOWN_DATASETS = (*REVISITED_DATASETS, "ukbench")


class EvalError(RuntimeError):
    """The evaluation cannot run as the protocol requires (missing data, failed query image...)."""


# ------------------------------------------------------------------------------------------ re-rankers
Reranker = Callable[..., np.ndarray]


def rerank_none(q_desc: np.ndarray, db_desc: np.ndarray, ranks: np.ndarray, **params) -> np.ndarray:
    """No re-ranking: the ranking by inner product as is."""
    if params:
        raise ValueError(f"re-ranker 'none' takes no parameters (got {sorted(params)})")
    return ranks


def rerank_alpha_qe(q_desc, db_desc, ranks, **params):
    """alpha-QE (Radenovic et al.): ``alpha-qe:n=2,alpha=3``."""
    from glimr.rerank.qe import rerank_alpha_qe as fn  # noqa: PLC0415

    return fn(q_desc, db_desc, ranks, **params)


def rerank_average_qe(q_desc, db_desc, ranks, **params):
    """Average QE (Chum et al.): ``aqe:n=2``."""
    from glimr.rerank.qe import rerank_average_qe as fn  # noqa: PLC0415

    return fn(q_desc, db_desc, ranks, **params)


def rerank_diffusion(q_desc, db_desc, ranks, **params):
    """Diffusion (Iscen et al.): ``diffusion:k=50,kq=10,gamma=3,alpha=0.99,truncate=1000``."""
    from glimr.rerank.diffusion import rerank_diffusion as fn  # noqa: PLC0415

    return fn(q_desc, db_desc, ranks, **params)


def rerank_coattention(q_desc, db_desc, ranks, dataset=None, root=None, query_paths=None, db_paths=None,
                       query_boxes=None, **params):
    """Co-attention (Hu & Bors 2023) from the images: ``coattention:dataset=FOLDER_OR_NAME[,root=..,
    config=default|paper|compact,fit=FOLDER|database,scales=paper,dim=512,dtype=float32,clusters=10,n=500,
    temperature=10,qe=0,alpha=3,words=0,cache=FOLDER,model=gem-lite0,checkpoint=..,max_size=512,
    pca_whiten=false]``. It needs the evaluation set's images: ``glimr eval`` and ``glimr bench`` hand them over
    with the evaluated network and image size; a direct call names ``dataset`` (the same as ``glimr eval``'s
    DATASET). qe > 0 gives co-attention + alpha-QE. ``fit``: where the PCA and codebook are learned (default:
    $GLIMR_FIT_IMAGES or ../shared/data/photos, never the evaluated images unless ``fit=database``); the
    report's notes say which. ``config=paper``: 65,536 words, all N = 500 features assigned, D' = 512 float32,
    inverted file on; ``config=compact``: D' = 256 int8, 4,096 words, 128 per image."""
    from glimr.rerank.coattention import rerank_images  # noqa: PLC0415

    if dataset is None and query_paths is not None and db_paths is not None:
        if len(query_paths) != len(q_desc) or len(db_paths) != len(db_desc):
            raise ValueError("coattention: the images do not match the descriptors")
        return rerank_images(q_desc, db_desc, ranks, query_paths=query_paths, db_paths=db_paths,
                             query_boxes=query_boxes, **params)
    if dataset is None:
        raise ValueError("the coattention re-ranker needs the evaluation set's images: pass "
                         "--rerank coattention:dataset=DATASET (the same DATASET as glimr eval's, and root=ROOT "
                         "if it needs one)")
    ev = load_eval_set(dataset, root=root)
    if len(ev.query_paths) != len(q_desc) or len(ev.db_paths) != len(db_desc):
        raise ValueError(f"coattention:dataset={dataset} has {len(ev.query_paths)} queries and {len(ev.db_paths)} "
                         f"database images, not {len(q_desc)} and {len(db_desc)}: give the evaluated dataset")
    if "max_size" not in params:
        params["max_size"] = ev.max_size_for(None)  # co-attention's own model (params["model"]), not the global one
    return rerank_images(q_desc, db_desc, ranks, query_paths=ev.query_paths, db_paths=ev.db_paths,
                         query_boxes=ev.query_boxes, **params)


rerank_coattention.takes_notes = True
rerank_coattention.needs_images = True
rerank_coattention.uses_model = True


def rerank_sv(q_desc, db_desc, ranks, net=None, max_size=None, precision=None, **params):
    """Spatial verification (SIFT/RootSIFT + RANSAC, OpenCV) of the global top-k:
    ``sv:top=100,weight=1,min_inliers=8,cap=20,ratio=0.8,...``; ``sv:kind=deep`` matches the evaluated
    model's res4 features instead (glimr/rerank/sv.py)."""
    from glimr.rerank.sv import rerank_sv as fn

    del max_size, precision            # deep features: their own size (sv's max_side), fp32
    return fn(q_desc, db_desc, ranks, net=net, **params)


rerank_sv.needs_images = True
rerank_sv.uses_model = True

#: name -> ``fn(q_desc, db_desc, ranks, **params) -> ranks`` (see the module doc).
RERANKERS: dict[str, Reranker] = {
    "none": rerank_none,
    "alpha-qe": rerank_alpha_qe,
    "aqe": rerank_average_qe,
    "diffusion": rerank_diffusion,
    "coattention": rerank_coattention,
    "sv": rerank_sv,
}


def available_rerankers() -> dict[str, Reranker]:
    """:data:`RERANKERS` plus those that ``glimr.rerank`` exposes in its own ``RERANKERS`` dict."""
    out = dict(RERANKERS)
    try:
        import glimr.rerank as rr  # noqa: PLC0415

        out.update(getattr(rr, "RERANKERS", {}) or {})
    except ImportError:  # pragma: no cover - the package is part of glimr
        pass
    return out


def _parse_value(v: str):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def parse_rerank(spec: str) -> tuple[str, dict]:
    """``"none"`` -> ("none", {}); ``"alpha-qe:k=2,alpha=3"`` -> ("alpha-qe", {"k": 2, "alpha": 3})."""
    name, _, rest = spec.strip().partition(":")
    params = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        k, eq, v = item.partition("=")
        if not eq or not k.strip():
            raise ValueError(f"re-ranker spec {spec!r}: parameters are key=value, comma separated")
        params[k.strip()] = _parse_value(v.strip())
    known = available_rerankers()
    if name not in known:
        raise ValueError(f"unknown re-ranker {name!r}: choose one of {', '.join(sorted(known))}")
    for k, v in params.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"re-ranker spec {spec!r}: {k}={v} is not a finite number")
    try:
        sig = inspect.signature(known[name])
    except (TypeError, ValueError):
        return name, params
    takes = [p.name for p in list(sig.parameters.values())[3:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        bad = sorted(set(params) - set(takes))
        if bad:
            raise ValueError(f"re-ranker {name!r} takes no parameter {', '.join(bad)}: its parameters are "
                             f"{', '.join(takes) or 'none'}")
    return name, params


def apply_rerank(spec: str, q_desc: np.ndarray, db_desc: np.ndarray, ranks: np.ndarray, *,
                 evalset: EvalSet | None = None, cache_dir=None, progress: bool = False,
                 notes: list[str] | None = None, net=None, max_size: int | None = None,
                 precision: str | None = None) -> np.ndarray:
    """Run the re-ranker ``spec``; one that ``needs_images`` gets the images of ``evalset`` (module doc); one
    that ``takes_notes`` appends what the report should say (e.g. what it was fitted on) to ``notes``; one that
    ``uses_model`` gets the evaluated model ``net``, ``max_size`` and ``precision`` unless the spec names its
    own (co-attention: the same network and image size as the global ranking)."""
    name, params = parse_rerank(spec)
    fn = available_rerankers()[name]
    if getattr(fn, "takes_notes", False) and notes is not None:
        params["notes"] = notes
    if getattr(fn, "uses_model", False):
        if net is not None and "model" not in params and "checkpoint" not in params:
            params["net"] = net
        for key, value in (("max_size", max_size), ("precision", precision)):
            if value is not None:
                params.setdefault(key, value)
    if getattr(fn, "needs_images", False):
        if evalset is None:
            raise EvalError(f"re-ranker {name!r} needs the evaluation set's images: pass evalset")
        params.update(query_paths=list(evalset.query_paths), db_paths=list(evalset.db_paths),
                      query_boxes=evalset.query_boxes, cache=cache_dir, progress=progress)
    out = np.asarray(fn(q_desc, db_desc, ranks, **params))
    if out.ndim != 2 or out.shape[1] != ranks.shape[1] or not np.issubdtype(out.dtype, np.integer):
        raise EvalError(f"re-ranker {name!r} returned {out.dtype} {out.shape}; expected integer ranks "
                        f"[<= {ranks.shape[0]}, {ranks.shape[1]}]")
    return out


# ------------------------------------------------------------------------------------------ datasets
@dataclass
class EvalSet:
    """What an evaluation needs from a dataset: images, query boxes, and how to score rankings."""

    name: str
    title: str
    kind: str  # "revisited" | "oxford" | "ukbench" | "gnd.json"
    query_paths: list[Path]
    db_paths: list[Path]
    query_boxes: list | None
    score: Callable[[np.ndarray], tuple[dict, list[str]]]  # ranks -> (metrics, notes)
    relevant: Callable[[int], tuple[set, set]]  # query -> (positive db indices, ignored db indices)
    same_images: bool = False  # queries are the database images (UKBench)
    # the longest image side the benchmark's protocol fixes (Revisited/Oxford: 1024, as in the papers); None:
    # the evaluated model's own (its config's "max_size", else 512: glimr.extract.multiscale.model_max_size)
    default_max_size: int | None = None
    notes: list[str] = field(default_factory=list)
    crop: bool | None = None  # for Revisited/Oxford: queries cropped to their box

    def max_size_for(self, net=None) -> int:
        """The longest image side to evaluate ``net`` at when the caller gives none."""
        from glimr.extract.multiscale import model_max_size  # noqa: PLC0415

        return int(self.default_max_size or model_max_size(getattr(net, "config", None)))

    @property
    def protocols(self) -> list[str]:
        return list(M.REVISITED_PROTOCOLS) if self.kind == "revisited" else []


def _results_to_metrics(results: dict[str, M.ProtocolResult]) -> tuple[dict, list[str]]:
    notes = [f"{name}: {r.note()}" for name, r in results.items() if r.note()]
    return {name: r.as_dict() for name, r in results.items()}, notes


def _revisited_set(name: str, root, *, crop: bool, distractors, images) -> EvalSet:
    if root is None and images is None:
        raise EvalError(f"{name}: pass --root, the folder holding gnd_{name}.pkl and the images "
                        f"(revisitop layout: ROOT/{name}/gnd_{name}.pkl and ROOT/{name}/jpg/)")
    kw = {"images": images} if images is not None else {}
    root_p = Path(root) if root is not None else None
    if root_p is not None and root_p.is_file():
        ds = load_revisited(name, gnd_path=root_p, crop=crop, distractors=distractors, **kw)
    else:
        ds = load_revisited(name, root_p, crop=crop, distractors=distractors, **kw)
    ds.require_images()
    if ds.protocol == "revisited":
        def score(ranks):
            return _results_to_metrics(M.revisited_eval(ranks, ds.gnd))

        def relevant(q):  # the Medium protocol, for pictures
            g = ds.gnd[q]
            return set(g["easy"].tolist()) | set(g["hard"].tolist()), set(g["junk"].tolist())
    else:
        def score(ranks):
            r = M.oxford_eval(ranks, ds.gnd)
            return r.as_dict(), ([r.note()] if r.note() else [])

        truth = M.oxford_ground_truth(ds.gnd)

        def relevant(q):
            return set(truth[q]["ok"].tolist()), set(truth[q]["junk"].tolist())
    n_dis = ds.n_distractors
    set_name = name if not n_dis else f"{name}+{n_dis // 1000}k" if n_dis >= 1000 else f"{name}+{n_dis}"
    return EvalSet(name=set_name, title=ds.title, kind=ds.protocol, query_paths=list(ds.query_paths),
                   db_paths=list(ds.db_paths), query_boxes=list(ds.query_boxes) if crop else None,
                   score=score, relevant=relevant, default_max_size=1024, notes=list(ds.notes), crop=crop)


def _ukbench_set(root) -> EvalSet:
    if root is None:
        raise EvalError("ukbench: pass --root, the folder of ukbench00000.jpg ...")
    ds = load_ukbench(root)
    objects = ds.objects

    def score(ranks):
        ns = M.ukbench_ns(ranks, objects, objects)
        truth = [{"ok": np.flatnonzero(objects == o), "junk": np.empty(0, np.int64)} for o in objects]
        r = M.compute_map(ranks, truth, (1, 4))
        return {"N-S": ns, "mAP": r.map}, []

    def relevant(q):
        return set(np.flatnonzero(objects == objects[q]).tolist()), set()

    return EvalSet(name="ukbench", title=ds.title, kind="ukbench", query_paths=list(ds.paths),
                   db_paths=list(ds.paths), query_boxes=None, score=score, relevant=relevant,
                   same_images=True)


def _gnd_json_set(folder) -> EvalSet:
    ds = load_gnd_json(folder)
    kappas = tuple(ds.extra.get("kappas", (1, 3)))

    def score(ranks):
        r = M.gnd_json_eval(ranks, ds.positives, ds.junk, kappas)
        return r.as_dict(), ([r.note()] if r.note() else [])

    def relevant(q):
        return set(ds.positives[q]), (set(ds.junk[q]) if ds.junk is not None else set())

    return EvalSet(name=ds.name, title=ds.title, kind="gnd.json", query_paths=ds.query_paths,
                   db_paths=ds.db_paths, query_boxes=ds.query_boxes, score=score, relevant=relevant)


def load_eval_set(dataset: str | os.PathLike, *, root: str | os.PathLike | None = None, crop: bool = True,
                  distractors: str | os.PathLike | None = None, images: str | os.PathLike | None = None
                  ) -> EvalSet:
    """Resolve a dataset name or folder into an :class:`EvalSet` (see the module doc)."""
    ds = str(dataset)
    key = ds.lower()
    if key in REVISITED_DATASETS:
        return _revisited_set(key, root, crop=crop, distractors=distractors, images=images)
    if distractors is not None:
        raise EvalError("--distractors applies to roxford5k/rparis6k/oxford5k/paris6k only")
    if not crop:
        warnings.warn(f"crop=False has no effect on {ds}: only Revisited/Oxford queries have boxes",
                      stacklevel=2)
    if key == "ukbench":
        return _ukbench_set(root)
    cands = ([Path(root) / ds] if root is not None else []) + [Path(ds)]
    for cand in cands:
        if is_gnd_json_folder(cand):
            return _gnd_json_set(cand)
    if any(c.is_dir() for c in cands):
        raise EvalError(f"{next(c for c in cands if c.is_dir())} holds no gnd.json: a dataset folder holds "
                        "gnd.json, query/ and db/")
    if "/" in ds or os.sep in ds:
        nor = f" (nor {cands[0]})" if root is not None else ""
        raise EvalError(f"dataset folder {ds} does not exist{nor}. For Clutter-UKB, build it: "
                        "../shared/tools/build_clutter_dev.sh bench-data")
    raise EvalError(f"unknown dataset {ds!r}: use one of {', '.join(KNOWN_DATASETS)} (with --root), or a "
                    "folder holding gnd.json, query/ and db/ (e.g. bench-data/clutter-dev-medium)")


# ------------------------------------------------------------------------------------------ ranking
def rank_by_inner_product(q_desc: np.ndarray, db_desc: np.ndarray, *, invalid_db: Sequence[int] = (),
                          chunk: int = 64) -> np.ndarray:
    """Full rankings [Ndb, Nq] by descending inner product (ties: lower db index first).
    Rows of ``invalid_db`` (failed images) are ranked last."""
    q = np.asarray(q_desc, dtype=np.float32)
    db = np.asarray(db_desc, dtype=np.float32)
    if q.ndim != 2 or db.ndim != 2 or q.shape[1] != db.shape[1]:
        raise ValueError(f"descriptor shapes do not match: queries {q.shape}, database {db.shape}")
    bad = np.asarray(list(invalid_db), dtype=np.int64)
    ranks = np.empty((db.shape[0], q.shape[0]), dtype=np.int64)
    for s in range(0, q.shape[0], chunk):
        scores = db @ q[s:s + chunk].T  # [Ndb, c]
        if bad.size:
            scores[bad] = -np.inf
        ranks[:, s:s + chunk] = np.argsort(-scores, axis=0, kind="stable")
    return ranks


# ------------------------------------------------------------------------------------------ descriptors
@dataclass
class Descriptors:
    q: np.ndarray
    db: np.ndarray
    q_errors: dict[int, str]
    db_errors: dict[int, str]
    seconds: float
    cached: bool = False


def _file_stamp(p) -> list:
    try:
        st = os.stat(p)
        return [os.path.abspath(p), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(p)]


def _same_scales(a: Sequence[float], b: Sequence[float]) -> bool:
    return [round(float(s), 6) for s in a] == [round(float(s), 6) for s in b]


def descriptor_cache_key(model_id: dict, evalset: EvalSet, scales: Sequence[float], max_size: int,
                         query_scales: Sequence[float] | None = None) -> str:
    """Cache key of an evaluation's descriptors. ``query_scales`` enter it when they differ from
    ``scales`` (equal ones give the key of an extraction without query scales: same descriptors)."""
    from glimr.extract.multiscale import UPSCALE_BELOW  # noqa: PLC0415

    h = hashlib.sha256()
    head = {"model": model_id, "scales": [round(float(s), 6) for s in scales], "max_size": int(max_size),
            "kind": evalset.kind, "upscale_below": UPSCALE_BELOW}
    if query_scales is not None and not _same_scales(query_scales, scales):
        head["query_scales"] = [round(float(s), 6) for s in query_scales]
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    for p in evalset.query_paths:
        h.update(os.path.abspath(p).encode() + b"\0")
    h.update(b"|boxes|" + json.dumps(evalset.query_boxes).encode())
    for p in evalset.db_paths:
        h.update(os.path.abspath(p).encode() + b"\0")
    return h.hexdigest()[:16]


def model_identity(net, name: str | None, checkpoint) -> dict:
    """What identifies a model's descriptors in the cache (name, checkpoint file, config, device type)."""
    try:
        device = next(net.parameters()).device.type
    except (AttributeError, StopIteration, TypeError):
        device = None
    return {"name": getattr(net, "name", name) or name,
            "checkpoint": _file_stamp(checkpoint) if checkpoint else None,
            "config": getattr(net, "config", None), "device": device}


def _net_device(net) -> str:
    try:
        return str(next(net.parameters()).device)
    except (AttributeError, StopIteration, TypeError):
        return "cpu"


def extract_descriptors(net, evalset: EvalSet, *, scales: Sequence[float], max_size: int,
                        batch_size: int = 16, workers: int | None = None, progress: bool = True,
                        cache_dir: str | os.PathLike | None = None,
                        model_id: dict | None = None,
                        query_scales: Sequence[float] | None = None, precision: str = "auto") -> Descriptors:
    """Global descriptors of the queries (cropped to their boxes) at ``query_scales`` (default: ``scales``)
    and of the database at ``scales``, cached on disk when ``cache_dir`` is given (keyed by model,
    checkpoint file, scales, query scales, max size, image lists and boxes). When the query and database
    images are the same (UKBench) and the scale sets differ, they are extracted twice. ``precision``: auto,
    fp32 or bf16 (glimr.models.precision); bf16 descriptors are cached under their own key."""
    from glimr.extract.multiscale import extract  # noqa: PLC0415

    query_scales = tuple(scales) if query_scales is None else tuple(query_scales)
    precision = resolve_precision(precision, _net_device(net))
    cache_file = None
    if cache_dir is not None:
        mid = model_id or model_identity(net, None, None)
        if precision != "fp32":
            mid = {**mid, "precision": precision}
        key = descriptor_cache_key(mid, evalset, scales, max_size, query_scales)
        mname = str((model_id or {}).get("name") or getattr(net, "name", "model")).replace("/", "_")
        cache_file = Path(cache_dir) / f"{evalset.name}__{mname}__{key}.npz"
        if cache_file.is_file():
            with np.load(cache_file, allow_pickle=False) as z:
                errs = json.loads(str(z["errors"]))
                return Descriptors(q=z["q"], db=z["db"], q_errors={int(k): v for k, v in errs["q"].items()},
                                   db_errors={int(k): v for k, v in errs["db"].items()},
                                   seconds=float(z["seconds"]), cached=True)
    t0 = time.perf_counter()
    kw = dict(max_size=max_size, batch_size=batch_size, workers=workers, progress=progress, precision=precision)
    db_res = extract(net, [str(p) for p in evalset.db_paths], scales=tuple(scales),
                     desc=f"{evalset.name} database", **kw)
    if evalset.same_images and _same_scales(query_scales, scales):
        q_res = db_res
    else:
        q_res = extract(net, [str(p) for p in evalset.query_paths], boxes=evalset.query_boxes,
                        scales=query_scales, desc=f"{evalset.name} queries", **kw)
    out = Descriptors(q=np.asarray(q_res.descriptors, np.float32),
                      db=np.asarray(db_res.descriptors, np.float32),
                      q_errors=dict(q_res.errors), db_errors=dict(db_res.errors),
                      seconds=time.perf_counter() - t0)
    if cache_file is not None:
        errs = json.dumps({"q": {str(k): v for k, v in out.q_errors.items()},
                           "db": {str(k): v for k, v in out.db_errors.items()}})
        buf = io.BytesIO()
        np.savez(buf, q=out.q, db=out.db, errors=np.array(errs), seconds=np.array(out.seconds))
        atomic_write_bytes(cache_file, buf.getvalue())
    return out


def score_descriptors(evalset: EvalSet, desc: Descriptors, rerank: str = "none", *, cache_dir=None,
                      progress: bool = False, net=None, max_size: int | None = None,
                      precision: str | None = None) -> tuple[dict, list[str], np.ndarray]:
    """Rank, re-rank and score: returns (metrics, notes, ranks). ``cache_dir``/``progress`` reach a re-ranker
    that needs the images; ``net``/``max_size``/``precision`` (the evaluated ones) one that uses the model."""
    if desc.q_errors:
        i, msg = next(iter(sorted(desc.q_errors.items())))
        raise EvalError(f"{len(desc.q_errors)} query image(s) of {evalset.name} could not be read, e.g. "
                        f"{evalset.query_paths[i]}: {msg}. Every query must be evaluated; fix or restore "
                        "the file")
    ranks = rank_by_inner_product(desc.q, desc.db, invalid_db=sorted(desc.db_errors))
    rerank_notes: list[str] = []
    ranks = apply_rerank(rerank, desc.q, desc.db, ranks, evalset=evalset, cache_dir=cache_dir, progress=progress,
                         notes=rerank_notes, net=net, max_size=max_size, precision=precision)
    metrics, notes = evalset.score(ranks)
    notes += rerank_notes
    if desc.db_errors:
        notes.append(f"{len(desc.db_errors)} database image(s) could not be read and are ranked last "
                     f"(e.g. {evalset.db_paths[min(desc.db_errors)]})")
    return metrics, notes, ranks


# ------------------------------------------------------------------------------------------ reports
@dataclass
class EvalReport:
    dataset: str
    title: str
    kind: str
    metrics: dict  # {"mAP":..} or {"easy": {...}, "medium": {...}, "hard": {...}} (percent); UKBench: N-S
    meta: dict
    notes: list[str]
    ranks: np.ndarray | None = None
    descriptors: Descriptors | None = None

    def to_json(self) -> dict:
        """The metrics at the top level (per protocol where there are several), plus ``meta``."""
        return {**self.metrics, "meta": {**self.meta, "notes": self.notes}}

    def write_json(self, path: str | os.PathLike) -> None:
        atomic_write_bytes(path, (json.dumps(self.to_json(), indent=2) + "\n").encode())

    def table(self) -> str:
        m = self.meta
        head = [self.title,
                f"model {m['model']}" + (f" (checkpoint {m['checkpoint']})" if m.get("checkpoint") else "")
                + f" | scales {','.join(f'{s:g}' for s in m['scales'])}"
                + (f" (queries {','.join(f'{s:g}' for s in m['query_scales'])})"
                   if m.get("query_scales") is not None and not _same_scales(m["query_scales"], m["scales"])
                   else "")
                + f" | max size {m['max_size']}"
                + f" | re-rank {m['rerank']} | {m['n_queries']} queries, {m['n_db']} database images"]
        if m.get("crop") is True:
            head.append("queries cropped to their ground-truth box (the protocol)")
        elif m.get("crop") is False:
            head.append("queries NOT cropped to their box (--no-crop): not the published protocol")
        lines = head + ["", format_metrics_table(self.metrics)]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def format_metrics_table(metrics: dict) -> str:
    """A plain-text table: one row per protocol (or one row), one column per metric."""
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, dict)] or [("", metrics)]
    cols = list(rows[0][1])
    w = max(8, *(len(r[0]) for r in rows))
    out = [f"{'protocol' if rows[0][0] else '':<{w}}" + "".join(f"{c:>9}" for c in cols)]
    for name, vals in rows:
        out.append(f"{name:<{w}}" + "".join(f"{vals[c]:>9.2f}" for c in cols))
    return "\n".join(out)


def parse_scales_arg(scales) -> tuple[float, ...]:
    if isinstance(scales, str):
        from glimr.extract.multiscale import parse_scales  # noqa: PLC0415

        return tuple(parse_scales(scales))
    return tuple(float(s) for s in scales)


def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else as given."""
    if device != "auto":
        return device
    import torch  # noqa: PLC0415

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_net(model: str = "gem-lite0", checkpoint: str | os.PathLike | None = None,
              weights: str = "pretrained", device: str = "auto"):
    """The model by registry name (or from a checkpoint), in eval mode, on ``device``."""
    from glimr.models.registry import build_model  # noqa: PLC0415

    net = build_model(model, checkpoint=str(checkpoint) if checkpoint else None, weights=weights)
    return net.eval().to(resolve_device(device))


def evaluate(dataset: str | os.PathLike | EvalSet, *, root=None, model: str = "gem-lite0", checkpoint=None,
             weights: str = "pretrained", net=None, scales="1", query_scales=None,
             max_size: int | None = None, rerank: str = "none",
             crop: bool = True, distractors=None, images=None, batch_size: int = 16, workers: int | None = None,
             progress: bool = True, cache_dir=None, keep: bool = False, device: str = "auto",
             precision: str = "auto") -> EvalReport:
    """Evaluate a model on a dataset under its published protocol.

    ``scales``: "1", "3", "5" or "1,0.7071,1.4142" (or a sequence), the database's scales;
    ``query_scales``: the queries' scales, same syntax (default: the model's recommended
    ``net.config["query_scales"]`` when its checkpoint has one, else ``scales``); ``max_size``: longest image side
    (default 1024 for Revisited/Oxford as in the papers, else the model's own: its config's "max_size", else 512); ``rerank``: a re-ranker spec;
    ``net``: an already built model (else built from ``model``/``checkpoint`` on ``device``: "auto" = the
    GPU if there is one); ``keep``: keep the rankings and descriptors in the report; ``precision``: auto (bf16
    where the hardware has native bf16, else fp32), fp32 or bf16, recorded in the report.
    """
    parse_rerank(rerank)  # fail early on a bad spec
    evalset = dataset if isinstance(dataset, EvalSet) else load_eval_set(
        dataset, root=root, crop=crop, distractors=distractors, images=images)
    sc = parse_scales_arg(scales)
    if net is None:
        net = build_net(model, checkpoint, weights, device)
    max_size = int(max_size or evalset.max_size_for(net))
    model_name = getattr(net, "name", None) or model
    if query_scales is None:
        query_scales = (getattr(net, "config", None) or {}).get("query_scales") or sc
    qsc = parse_scales_arg(query_scales)
    desc = extract_descriptors(net, evalset, scales=sc, max_size=max_size, batch_size=batch_size,
                               workers=workers, progress=progress, cache_dir=cache_dir,
                               model_id=model_identity(net, model_name, checkpoint), query_scales=qsc,
                               precision=precision)
    t0 = time.perf_counter()
    metrics, notes, ranks = score_descriptors(evalset, desc, rerank, cache_dir=cache_dir, progress=progress,
                                              net=net, max_size=max_size, precision=precision)
    meta = {"dataset": evalset.name, "title": evalset.title, "protocol": evalset.kind, "model": model_name,
            "checkpoint": str(checkpoint) if checkpoint else None, "scales": list(sc), "query_scales": list(qsc),
            "max_size": max_size, "precision": resolve_precision(precision, _net_device(net)),
            "rerank": rerank, "crop": evalset.crop, "n_queries": len(evalset.query_paths),
            "n_db": len(evalset.db_paths), "dim": int(desc.db.shape[1]),
            "extract_seconds": round(desc.seconds, 3), "descriptors_cached": desc.cached,
            "rank_seconds": round(time.perf_counter() - t0, 3),
            "db_errors": len(desc.db_errors)}
    return EvalReport(dataset=evalset.name, title=evalset.title, kind=evalset.kind, metrics=metrics,
                      meta=meta,
                      notes=list(evalset.notes) + notes, ranks=ranks if keep else None,
                      descriptors=desc if keep else None)

"""Co-attention scoring kernels on this CPU: exact scores of a shortlist and the proxy of every image.

Times ``CoAttentionIndex.scores`` (eqs. (8)-(10)) on a sorted random shortlist and ``proxy_scores`` on the
whole database, for int8 / float16 / float32 records of K=10 clusters of D'=512 dims (the defaults), one thread.
Prints one JSON line per case (median of ``--repeats`` runs, milliseconds per query).

    python benchmarks/coattention_scoring.py --images 20000 --shortlist 1000 5000
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glimr.extract.local import RecordCodec, l2n_np
from glimr.rerank.coattention import CoAttentionIndex


def synthetic(m: int, k: int, d: int, dtype: str, proxy_dim: int, seed: int = 0) -> CoAttentionIndex:
    rng = np.random.default_rng(seed)
    scale = np.full(d, 4.0 / 127 / np.sqrt(d), np.float32) if dtype == "int8" else None
    codec = RecordCodec(k, d, dtype, proxy_dim, 0, 16, scale)
    recs = np.zeros(m, codec.record)
    for s in range(0, m, 5000):
        u = l2n_np(rng.standard_normal((min(m, s + 5000) - s, k, d)).astype(np.float32))
        recs["codes"][s:s + len(u)] = (np.clip(np.rint(u / scale), -127, 127).astype(np.int8) if scale is not None
                                       else u)
        recs["norms"][s:s + len(u)] = 1.0
        recs["gram"][s:s + len(u)] = np.einsum("nkd,nld->nkl", u, u)[:, codec.iu[0], codec.iu[1]]
        p = l2n_np(u.sum(1)[:, :proxy_dim])
        recs["proxy"][s:s + len(u)] = np.rint(p / (np.abs(p).max(1, keepdims=True) / 127)).astype(np.int8)
        recs["proxy_scale"][s:s + len(u)] = np.abs(p).max(1) / 127
    return CoAttentionIndex.from_records(recs, codec)


def median_ms(fn, repeats: int) -> float:
    fn()
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return round(1000 * float(np.median(t)), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--shortlist", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--dtypes", nargs="+", default=["int8", "float16", "float32"])
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    rng = np.random.default_rng(1)
    for dtype in a.dtypes:
        idx = synthetic(a.images, 10, 512, dtype, 64)
        q = l2n_np(rng.standard_normal(512).astype(np.float32))
        for n in a.shortlist:
            rows = np.sort(rng.choice(a.images, size=min(n, a.images), replace=False))
            print(json.dumps({"dtype": dtype, "images": a.images, "shortlist": n,
                              "scores_ms": median_ms(lambda i=idx, v=q, r=rows: i.scores(v, r), a.repeats)}), flush=True)
        print(json.dumps({"dtype": dtype, "images": a.images,
                          "proxy_ms": median_ms(lambda i=idx, v=q: i.proxy_scores(v), a.repeats)}), flush=True)


if __name__ == "__main__":
    main()

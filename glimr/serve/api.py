"""`glimr serve`: one process holding the model and an index folder, as a FastAPI app (``create_app``).

Endpoints (OpenAPI schema at /openapi.json, a local docs page at /docs, the web page at /):

    POST   /api/search               multipart: image, crop=x0,y0,x1,y1, top, rerank -> ranked results
    GET    /api/images/{id}          the indexed image, downscaled (JPEG)
    GET    /api/images/{id}/explain  heat map (PNG): co-attention for ?query=ID (a search's query), else the
                                     model's attention over the image
    POST   /api/images               add an uploaded image (bearer token)     -> stored in INDEX/uploads/
    DELETE /api/images/{id}          remove an image from the index (bearer token)
    GET    /api/stats, /healthz, /metrics (Prometheus text format)

Consistency: searches read an immutable snapshot of the index (its FAISS index and an in-memory copy of
meta.sqlite, swapped as a whole). An add or delete embeds outside any lock, then commits through the index's
own durable path (IndexStore.for_build + commit_chunk/remove, FAISS rebuilt, diffusion graph refreshed: what
`glimr index build` does) and swaps in the new snapshot under a writer lock that waits for running searches,
so a search sees the index before or after a commit, never half of one.

Ranking: POST /api/search writes the upload to a file and runs glimr.rerank.search.search_image, the code of
`glimr search`, so both rank alike on the same index.
"""
from __future__ import annotations

import hmac
import os
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import FastAPI, File, Form, Query, Security, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from glimr.serve.metrics import CONTENT_TYPE, Metrics

STATIC = Path(__file__).resolve().parent / "static"
RERANK_CHOICES = ("none", "aqe", "qe", "diffusion", "coattention", "sv", "sv-deep")
WRITE_ROUTES = (("POST", "/api/images"),)   # + DELETE /api/images/{id}: checked before their body is read


# ---- settings ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeSettings:
    """max_upload_bytes: request bodies above it get 413 (before they are read); max_pixels: uploaded images
    above it (width x height, from the header) get 413; max_top: the largest ``top`` of a search (default_top
    when none is given); queries_kept: uploaded queries kept for /explain (oldest dropped first);
    concurrency: model forward passes at a time (searches, adds, heat maps)."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_top: int = 100
    default_top: int = 20
    queries_kept: int = 64
    concurrency: int = 1

    def __post_init__(self):
        from glimr.config import whole_number

        whole_number("max_upload_bytes (--max-upload-mb)", self.max_upload_bytes, 1024, 1 << 34)
        whole_number("max_pixels (--max-pixels)", self.max_pixels, 1, 10**10)
        whole_number("max_top (--max-top)", self.max_top, 1, 10_000)
        whole_number("default_top", self.default_top, 1, self.max_top)
        whole_number("queries_kept", self.queries_kept, 1, 100_000)
        whole_number("concurrency (--concurrency)", self.concurrency, 1, 64)


class ApiError(Exception):
    def __init__(self, status: int, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


# ---- an immutable snapshot of the index ----------------------------------------------------------------
class _Rows(list):
    def fetchone(self):
        return self[0] if self else None

    def fetchall(self):
        return list(self)


class _FrozenDB:
    """An in-memory copy of meta.sqlite that nothing writes, shared by threads: one statement at a time."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn, self._lock = conn, threading.Lock()

    def execute(self, sql: str, params=()):
        if not sql.lstrip().upper().startswith(("SELECT", "PRAGMA")):
            raise RuntimeError(f"a search snapshot is read-only: {sql.split()[0]}")
        with self._lock:
            return _Rows(self._conn.execute(sql, params).fetchall())

    def close(self):
        with self._lock:
            self._conn.close()


class Snapshot:
    """One state of the index: an IndexStore (read-only) whose database is an in-memory copy and whose FAISS
    index matches it, plus id <-> path maps of the searchable images."""

    def __init__(self, index_dir: Path):
        from glimr.index.store import IndexStore

        store = IndexStore.open(index_dir, quiet=True)
        try:
            mem = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
            store.db.backup(mem)
            store.db.close()
            store.db = _FrozenDB(mem)
            vids, paths = store.live()
            if not store.faiss_is_current() or store.faiss().ntotal != len(vids):
                store.rebuild_faiss_in_memory()   # another process's build moved on since open()
            self.reranks = self._reranks(store)
        except BaseException:
            store.close()
            raise
        self.store = store
        self.paths = dict(zip((int(v) for v in vids), paths))
        self.ids = {p: v for v, p in self.paths.items()}
        self.stats = store.stats()

    @staticmethod
    def _reranks(store) -> dict[str, str | None]:
        """rerank -> None when this index has what it needs, else what it needs."""
        from glimr.rerank.diffusion import DiffusionGraph, graph_state

        out: dict[str, str | None] = {"none": None, "aqe": None, "qe": None, "sv": None, "sv-deep": None}
        out["coattention"] = None if store.config.coattention else \
            "needs an index built with `glimr index build --coattention`"
        gdir = store.dir / "diffusion"
        ok = (gdir / "graph.json").is_file() and DiffusionGraph.load(gdir, graph_state(store)) is not None
        out["diffusion"] = None if ok else "needs an index built with `glimr index build --diffusion`"
        return out


class _RWLock:
    """Many readers (searches) or one writer (a commit and the snapshot swap); a waiting writer goes first."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


def _image_status(e) -> int:
    """HTTP status of a bad upload (glimr.io.images.ImageError)."""
    if "max_pixels" in e.hint or "pixels" in e.reason and "exceeds" in e.reason:
        return 413
    if e.reason.startswith("not a supported image"):
        return 415
    return 422


_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
          (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"), (b"P5", ".pgm"), (b"P6", ".ppm"))


def _extension(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), ".img")


# ---- the service ---------------------------------------------------------------------------------------
class Service:
    """The model, the current snapshot, the writer path and the queries kept for heat maps."""

    def __init__(self, index_dir: str | Path, token: str | None, settings: ServeSettings, model=None):
        from glimr.index.store import IndexStoreError

        self.dir = Path(index_dir)
        if not (self.dir / "index.json").is_file():
            raise IndexStoreError(f"'{self.dir}' is not a glimr index (no index.json); build one with "
                                  f"`glimr index build IMAGES_DIR --index {self.dir}`")
        if token is not None and not token.strip():
            raise ValueError("the token is empty: put a secret in --token-file")
        self.token = token.strip() if token is not None else None
        self.settings = settings
        self.snapshot = Snapshot(self.dir)
        if model is None:
            from glimr.models.registry import build_model

            cfg = self.snapshot.store.config
            cfg.extract.check_checkpoint()   # the recorded file, unchanged (sha256), or a clear error
            model = build_model(cfg.model, checkpoint=cfg.checkpoint)
        self.model = model.eval()
        # adds embed as a build does (extract() of a chunk runs the BatchNorm-folded copy, glimr/models/fold.py),
        # searches as `glimr search` does (one query: the model as loaded); in bf16 the two differ by ~0.2% in
        # cosine, so each path keeps its own model and matches its CLI counterpart. Heat maps use the folded one.
        import copy

        from glimr.models.fold import inference_model

        self.build_model = inference_model(copy.deepcopy(self.model), build=True)
        self.root = Path(self.snapshot.store.config.root or ".").resolve()
        self.uploads = (self.dir / "uploads").resolve()
        self.metrics = Metrics()
        self.rw = _RWLock()
        self.write_lock = threading.Lock()           # one add/delete at a time
        self.compute = threading.BoundedSemaphore(settings.concurrency)
        self.qdir = Path(tempfile.mkdtemp(prefix="glimr-serve-queries-"))
        self.queries: OrderedDict[str, tuple[Path, tuple | None]] = OrderedDict()
        self.qlock = threading.Lock()
        self.started = time.time()

    def close(self) -> None:
        shutil.rmtree(self.qdir, ignore_errors=True)
        self.snapshot.store.close()

    # ---- auth ----
    def auth_error(self, authorization: str | None) -> ApiError | None:
        if self.token is None:
            return ApiError(403, "this service is read-only: adding and deleting images needs `glimr serve "
                                 "--token-file FILE`")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return ApiError(401, "this needs the service's token: send the header 'Authorization: Bearer TOKEN'",
                            {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return ApiError(401, "wrong token", {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return None

    # ---- helpers ----
    def decode_upload(self, data: bytes, name: str):
        """Check that the upload is an image within the caps (ApiError 413/415/422 with the reason)."""
        from glimr.io.images import ImageError, load_image_bytes

        try:
            return load_image_bytes(data, name=name or "<upload>", max_pixels=self.settings.max_pixels,
                                    target_size=self.snapshot.store.config.max_size)
        except ImageError as e:
            raise ApiError(_image_status(e), str(e)) from None

    def write_query(self, data: bytes) -> tuple[str, Path]:
        """The upload as a file of its own (the search reads it as `glimr search` reads its argument)."""
        qid = uuid.uuid4().hex
        path = self.qdir / f"{qid}{_extension(data)}"
        path.write_bytes(data)
        return qid, path

    def keep_query(self, qid: str, path: Path, box) -> None:
        """Keep a searched query for /explain; the oldest go first (only finished searches are kept, so a
        search never loses its file while it waits for the model)."""
        with self.qlock:
            self.queries[qid] = (path, box)
            while len(self.queries) > self.settings.queries_kept:
                _, (old, _) = self.queries.popitem(last=False)
                old.unlink(missing_ok=True)

    def query(self, qid: str) -> tuple[Path, tuple | None]:
        with self.qlock:
            got = self.queries.get(qid)
            if got is not None:
                self.queries.move_to_end(qid)
        if got is None or not got[0].is_file():
            raise ApiError(404, f"unknown or expired query {qid!r}: search again (the service keeps the last "
                                f"{self.settings.queries_kept} queries)")
        return got

    def image_file(self, snap: Snapshot, image_id: int) -> tuple[str, Path]:
        """(stored path, file) of a searchable image; only files under the image root or INDEX/uploads."""
        rel = snap.paths.get(image_id)
        if rel is None:
            raise ApiError(404, f"no image with id {image_id} in this index (ids come from /api/search)")
        p = (self.root / rel).resolve()
        if not (p.is_relative_to(self.root) or p.is_relative_to(self.uploads)):
            raise ApiError(403, f"image {image_id} lies outside the index's image folder; it is not served")
        if not p.is_file():
            raise ApiError(410, f"the file of image {image_id} ('{rel}') is gone; rebuild the index "
                                f"(`glimr index build`) to drop it")
        return rel, p

    # ---- work (runs in worker threads) ----
    def search(self, data: bytes, name: str, box, top: int, rerank: str, shortlist: int | None = None) -> dict:
        from glimr.rerank.search import QueryError, SearchSettings, search_image

        t0 = time.perf_counter()
        self.decode_upload(data, name)
        settings = SearchSettings(top=top, box=box, rerank=rerank, shortlist=shortlist)
        qid, qpath = self.write_query(data)
        try:
            with self.compute, self.rw.read():
                snap = self.snapshot
                why = snap.reranks.get(rerank)
                if why is not None:
                    raise ApiError(422, f"rerank '{rerank}' is not available on this index: it {why}")
                try:
                    hits = search_image(snap.store, self.model, qpath, settings)
                except QueryError as e:
                    raise ApiError(422, str(e).replace(str(qpath), name or "<upload>")) from None
        except BaseException:
            qpath.unlink(missing_ok=True)
            raise
        self.keep_query(qid, qpath, box)
        results = [{"rank": r + 1, "id": snap.ids[p], "path": p, "score": s} for r, (p, s) in enumerate(hits)]
        return {"results": results, "model": snap.store.config.model, "rerank": rerank,
                "crop": list(box) if box else None, "query": qid,
                "timing_ms": round((time.perf_counter() - t0) * 1000, 2)}

    def thumbnail(self, image_id: int, size: int) -> bytes:
        import io

        from PIL import Image

        from glimr.io.images import DEFAULT_MAX_PIXELS, ImageError, load_image

        _, p = self.image_file(self.snapshot, image_id)
        try:
            img = load_image(p, DEFAULT_MAX_PIXELS, target_size=size)
        except ImageError as e:
            raise ApiError(410, f"image {image_id} cannot be read now: {e}") from None
        img.thumbnail((size, size), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    def explain(self, image_id: int, qid: str | None) -> bytes:
        from glimr.io.images import ImageError, load_image

        snap = self.snapshot
        rel, p = self.image_file(snap, image_id)
        cfg = snap.store.config
        fd, out = tempfile.mkstemp(suffix=".png", dir=self.qdir)
        os.close(fd)
        try:
            with self.compute:
                if qid is not None:
                    from glimr.viz.coattention_maps import render_coattention

                    qpath, box = self.query(qid)
                    # the index's co-attention PCA when it has one, else the model's own space at its scales
                    render_coattention(qpath, [p], out, model=self.build_model, box=box,
                                       index=str(self.dir) if cfg.coattention else None,
                                       scales=None if cfg.coattention else cfg.scales, max_size=cfg.max_size)
                else:
                    from glimr.viz.explain import explain

                    image = load_image(p, target_size=cfg.max_size)
                    explain(self.build_model, image, out, size=cfg.max_size, title=f"{cfg.model}: {Path(rel).name}")
            return Path(out).read_bytes()
        except ImageError as e:
            raise ApiError(410, f"image {image_id} cannot be read now: {e}") from None
        finally:
            Path(out).unlink(missing_ok=True)

    def _commit(self, fn) -> Snapshot:
        """Run ``fn(writable store)`` under the index's build lock, then FAISS and the diffusion graph as a
        build leaves them, and swap in the new snapshot; searches wait meanwhile (writer lock)."""
        from glimr.index.store import IndexStore, share_files

        with self.rw.write():
            with IndexStore.for_build(self.dir, self.snapshot.store.config) as w:
                w.save_config()
                fn(w)
                if not w.faiss_is_current():
                    w.rebuild_faiss()
                gdir = self.dir / "diffusion"
                if (gdir / "graph.json").is_file():
                    from glimr.rerank.diffusion import DiffusionGraph, build_for_store

                    old = DiffusionGraph.load(gdir)
                    build_for_store(w, k=old.k if old is not None else 50)
            share_files(self.dir)
            old_snap, self.snapshot = self.snapshot, Snapshot(self.dir)
        return old_snap

    def add(self, data: bytes, name: str) -> tuple[int, dict]:
        from glimr.extract.multiscale import extract
        from glimr.index.store import Row
        from glimr.io.atomic import atomic_write_bytes
        from glimr.io.images import content_hash

        self.decode_upload(data, name)
        with self.write_lock:
            self.uploads.mkdir(parents=True, exist_ok=True)
            tmp = self.uploads / f".incoming-{uuid.uuid4().hex}{_extension(data)}"
            atomic_write_bytes(tmp, data)
            h = content_hash(tmp)
            final = self.uploads / f"{h[:20]}{_extension(data)}"
            # the rows' paths are relative to the image root; an upload outside it is named by its full path
            rel = final.relative_to(self.root).as_posix() if final.is_relative_to(self.root) else str(final)
            snap = self.snapshot
            if rel in snap.ids:
                tmp.unlink()
                return 200, {"id": snap.ids[rel], "path": rel, "added": False}
            os.replace(tmp, final)
            cfg = snap.store.config
            ex = cfg.extract.replace(workers=0)
            records = None
            with self.compute:
                if cfg.coattention:
                    from glimr.extract.local import CoAttentionParams, extract_local

                    params = CoAttentionParams.load(self.dir / "coattention")
                    res, locs = extract_local(self.build_model, [final], cfg=params.cfg, settings=ex, progress=False,
                                              report_errors=False)
                    if not res.errors:
                        records = np.stack([params.encode(locs[0])])
                else:
                    res = extract(self.build_model, [final], settings=ex, progress=False, report_errors=False)
            if res.errors:
                final.unlink(missing_ok=True)
                raise ApiError(422, res.errors[0].replace(str(final), name or "<upload>"))
            st = final.stat()
            row = Row(rel, h, st.st_size, st.st_mtime, "ok", None, None)
            self._commit(lambda w: w.commit_chunk([row], res.descriptors[:1], records))
            return 201, {"id": self.snapshot.ids[rel], "path": rel, "added": True}

    def delete(self, image_id: int) -> dict:
        with self.write_lock:
            rel = self.snapshot.paths.get(image_id)
            if rel is None:
                raise ApiError(404, f"no image with id {image_id} in this index")
            self._commit(lambda w: w.remove([rel]))
            f = (self.root / rel).resolve()
            if f.is_relative_to(self.uploads):   # an uploaded file goes with its row; the collection's stay
                f.unlink(missing_ok=True)
            return {"id": image_id, "path": rel, "deleted": True}

    def stats(self) -> dict:
        snap = self.snapshot
        s = snap.stats
        avail = snap.reranks
        return {"images": s["images"], "errors": s["errors"], "n_vectors": s["n_vectors"],
                "model": snap.store.config.model, "dim": snap.store.config.dim,
                "scales": list(snap.store.config.scales), "max_size": snap.store.config.max_size,
                "factory": snap.store.config.factory, "read_only": self.token is None,
                "reranks": [r for r in RERANK_CHOICES if avail[r] is None],
                "max_top": self.settings.max_top, "default_top": self.settings.default_top,
                "max_upload_bytes": self.settings.max_upload_bytes, "max_pixels": self.settings.max_pixels,
                "uptime_s": round(time.time() - self.started, 1)}


# ---- ASGI middleware: body cap, token check before a write's body, metrics, headers -----------------------
_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
            (b"content-security-policy", (b"default-src 'self'; img-src 'self' blob: data:; "
                                          b"connect-src 'self'; object-src 'none'; frame-ancestors 'none'"))]


class _Guard:
    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastapi import HTTPException

        start = time.perf_counter()
        status = [500]
        method, path = scope["method"], scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        cap = self.service.settings.max_upload_bytes

        async def send_with_headers(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
                msg = {**msg, "headers": list(msg.get("headers", [])) + _HEADERS}
            await send(msg)

        refusal = None
        try:
            declared = int(headers.get("content-length", "0"))
        except ValueError:
            declared = 0
        if declared > cap:
            refusal = ApiError(413, f"the request body ({declared:,} bytes) is larger than this service accepts "
                                    f"({cap:,} bytes, --max-upload-mb)")
        elif (method, path) in WRITE_ROUTES or (method == "DELETE" and path.startswith("/api/images/")):
            refusal = self.service.auth_error(headers.get("authorization"))
        if refusal is not None:
            resp = JSONResponse({"detail": refusal.detail}, status_code=refusal.status, headers=refusal.headers)
            await resp(scope, receive, send_with_headers)
        else:
            seen = 0

            async def counted():
                nonlocal seen
                msg = await receive()
                if msg["type"] == "http.request":
                    seen += len(msg.get("body", b""))
                    if seen > cap:
                        raise HTTPException(413, f"the request body is larger than this service accepts "
                                                 f"({cap:,} bytes, --max-upload-mb)")
                elif msg["type"] == "http.disconnect":
                    self.service.metrics.client_disconnected()
                return msg

            await self.app(scope, counted, send_with_headers)
        route = scope.get("route")
        label = getattr(route, "path", None)
        if label is None:   # refused before routing, or no route
            label = "/api/images" if path == "/api/images" else "/api/images/{image_id}" \
                if refusal is not None and path.startswith("/api/images/") else \
                "/static" if path.startswith("/static/") else "unmatched"
        self.service.metrics.observe(method, label, status[0], time.perf_counter() - start)


# ---- the app ---------------------------------------------------------------------------------------------
def create_app(index_dir: str | Path, token: str | None = None, *, settings: ServeSettings | None = None,
               model=None):
    """The FastAPI app serving ``index_dir``; ``token``: the bearer token that allows adds and deletes (None:
    read-only). ``model``: an already built model (else the index's, checked against its recorded hash)."""
    settings = settings or ServeSettings()
    svc = Service(index_dir, token, settings, model=model)
    try:
        return _build_app(svc, settings)
    except BaseException:
        svc.close()
        raise


def _build_app(svc: Service, settings: ServeSettings):
    from glimr import __version__

    @asynccontextmanager
    async def lifespan(_app):
        yield
        svc.close()

    app = FastAPI(title="glimr", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="Instance-level image retrieval: search an index by image, add and remove images.")
    app.state.service = svc
    bearer = HTTPBearer(auto_error=False, description="the token of `glimr serve --token-file FILE`")

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse({"detail": e.detail}, status_code=e.status, headers=e.headers)

    # FastAPI's parameter declarations are its documented default-argument style
    def writer(cred: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:  # noqa: B008
        err = svc.auth_error(f"Bearer {cred.credentials}" if cred is not None else None)
        if err is not None:
            raise err

    def parse_crop(crop: str | None):
        if crop is None or not crop.strip():
            return None
        from glimr.extract.multiscale import parse_box

        try:
            return parse_box(crop)
        except ValueError as e:
            raise ApiError(422, f"crop: {e}") from None

    async def read_upload(image: UploadFile) -> bytes:
        data = await image.read()
        if not data:
            raise ApiError(422, "image: the uploaded file is empty; send the image file's content")
        return data

    @app.post("/api/search", tags=["search"], summary="Search the index with an image")
    async def search(image: UploadFile = File(..., description="the query image (JPEG, PNG, ...)"),  # noqa: B008
                     crop: str | None = Form(None, description="query box x0,y0,x1,y1 in the image's pixels",
                                             max_length=200),
                     top: int = Form(settings.default_top, ge=1, le=settings.max_top, description="results"),
                     rerank: Literal[RERANK_CHOICES] = Form("none", description="re-ranking (see /api/stats)"),
                     shortlist: int | None = Form(None, ge=1, le=10_000,
                                                  description="sv: verify the global top this many (default 100); "
                                                              "coattention: score at most this many candidates")):
        box = parse_crop(crop)
        data = await read_upload(image)
        return await run_in_threadpool(svc.search, data, image.filename or "<upload>", box, top, rerank, shortlist)

    @app.get("/api/images/{image_id}", tags=["images"], summary="An indexed image, downscaled (JPEG)",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    async def get_image(image_id: int = PathParam(..., ge=0, le=2**62),
                        size: int = Query(512, ge=16, le=2048, description="longest side")):
        data = await run_in_threadpool(svc.thumbnail, image_id, size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=60"})

    @app.get("/api/images/{image_id}/explain", tags=["images"], response_class=Response,
             summary="Heat map (PNG): co-attention of the image for a query, else its attention",
             responses={200: {"content": {"image/png": {}}}})
    async def explain(image_id: int = PathParam(..., ge=0, le=2**62),
                      query: str | None = Query(None, pattern="^[0-9a-f]{32}$",
                                                description="the `query` id a search answered")):
        data = await run_in_threadpool(svc.explain, image_id, query)
        return Response(data, media_type="image/png")

    @app.post("/api/images", tags=["images"], status_code=201, summary="Add an image to the index (token)",
              dependencies=[Security(writer)])
    async def add_image(image: UploadFile = File(..., description="the image to add")):  # noqa: B008
        data = await read_upload(image)
        status, body = await run_in_threadpool(svc.add, data, image.filename or "<upload>")
        return JSONResponse(body, status_code=status)

    @app.delete("/api/images/{image_id}", tags=["images"], summary="Remove an image from the index (token)",
                dependencies=[Security(writer)])
    async def delete_image(image_id: int = PathParam(..., ge=0, le=2**62)):
        return await run_in_threadpool(svc.delete, image_id)

    @app.get("/api/stats", tags=["service"], summary="What the index holds and what the service allows")
    async def stats():
        return await run_in_threadpool(svc.stats)

    @app.get("/healthz", tags=["service"], summary="Liveness")
    async def healthz():
        return {"status": "ok", "images": svc.snapshot.stats["images"]}

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics():
        s = svc.snapshot.stats
        text = svc.metrics.render({
            "glimr_index_images": ("Searchable images in the index.", s["images"]),
            "glimr_index_errors": ("Indexed files that could not be read.", s["errors"]),
            "glimr_index_vectors": ("Rows of vectors.f32 (live and dead).", s["n_vectors"]),
            "glimr_queries_kept": ("Uploaded queries kept for heat maps.", len(svc.queries))})
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return FileResponse(STATIC / "docs.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(_Guard, service=svc)
    return app

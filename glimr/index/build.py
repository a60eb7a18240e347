"""`glimr index build`: incremental, chunked, resumable indexing of an image folder.

Order of work, so that a refused or failing build changes nothing: every setting is validated (the settings
objects, the FAISS factory tried on a dummy index), the folder is listed, the index's lock is taken, the
removals are checked (--prune), and only then is index.json written and the first chunk committed.

The build is split so that a distributed build (glimr/index/ray.py) shares everything but the embedding:
:func:`run_build` lists, skips what is already indexed, removes what is gone, and commits each chunk's
:class:`Shard` with :func:`commit_shard` (bad-file reporting, rows, one transaction); an *embedder* turns the
chunks' file lists into shards, in order (:func:`embed_local` here, Ray actors there).
"""
from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from glimr.extract.local import (
    CoAttentionParams,
    LocalConfig,
    extract_local,
    fit_params,
    resolve_fit_images,
    sample_items,
)
from glimr.extract.multiscale import ExtractSettings, extract, model_max_size
from glimr.index.settings import IndexConfig, IndexSettings
from glimr.index.store import IndexStore, IndexStoreError, Row, db_path, share_files
from glimr.io.images import DEFAULT_MAX_PIXELS, ImageError, content_hash, list_images

PRUNE_FRACTION = 0.5      # a build that would remove more than this share of an index needs --prune
COMPACT_FRACTION = 0.5    # vectors.f32 is compacted when more than this share of its rows is dead


@dataclass
class BuildReport:
    added: int = 0          # new or changed images embedded now
    unchanged: int = 0      # skipped: same size and mtime (or same content)
    removed: int = 0        # gone from the folder
    errors: int = 0         # unreadable now (reported, kept out of the search)
    total: int = 0          # searchable images after the build
    kept_unscanned: int = 0  # rows kept because their folder could not be read
    compacted: int = 0      # dead vector rows dropped by compaction

    def __str__(self) -> str:
        s = (f"{self.total} images searchable: {self.added} added, {self.unchanged} unchanged, "
             f"{self.removed} removed, {self.errors} unreadable")
        if self.kept_unscanned:
            s += f", {self.kept_unscanned} kept from folders that could not be read"
        if self.compacted:
            s += f"; vectors compacted ({self.compacted} dead rows dropped)"
        return s


@dataclass
class Shard:
    """One chunk's embedding, as an embedder returns it: a row per file given (zero rows for the files that
    failed), the failures by position (the message names the file), and, when the embedder read the files
    itself (Ray workers), their content hashes (None: the driver hashes them)."""
    descriptors: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)
    hashes: list[str | None] | None = None
    records: np.ndarray | None = None   # co-attention records of the files that did not fail


# one chunk's (path, relative path, stat or None, precomputed hash or, when stat failed, the error)
TodoItem = tuple[Path, str, "os.stat_result | None", "str | None"]
#: an embedder: the chunks' lists of files (lazily, in order) and the co-attention parameters (or None) ->
#: one Shard per list, in the same order
Embedder = Callable[[Iterable[list[Path]], "CoAttentionParams | None"], Iterator[Shard]]


def make_settings(model, *, model_name: str | None = None, checkpoint: str | None = None, scales=(1.0,),
                  max_size: int | None = None, precision: str = "auto", batch_size: int = 8, workers: int | None = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS, factory: str = "auto", chunk_size: int = 256,
                  coattention: LocalConfig | None = None) -> tuple[ExtractSettings, IndexSettings]:
    """Both settings objects from loose values (ValueError naming the bad one; the checkpoint is hashed).
    ``max_size`` None: the model's own (glimr.extract.multiscale.model_max_size)."""
    if max_size is None:
        max_size = model_max_size(getattr(model, "config", None))
    ex = ExtractSettings.with_checkpoint(checkpoint, model=model_name or getattr(model, "name", "model"),
                                         scales=scales, max_size=max_size, precision=precision,
                                         batch_size=batch_size, workers=workers, max_pixels=max_pixels)
    ca_json = None
    if coattention is not None:
        ca_json = {"config": coattention.to_json(), "record_bytes": coattention.codec().nbytes}
    return ex, IndexSettings(dim=int(model.dim), factory=factory, chunk_size=chunk_size, coattention=ca_json)


def resolve_build_settings(model, settings: ExtractSettings | None, index_settings: IndexSettings | None,
                           loose: dict) -> tuple[ExtractSettings, IndexSettings]:
    """The settings objects of a build: given, or made from make_settings' keywords (never both), checked
    against the model's dimension."""
    if (settings is None) != (index_settings is None):
        raise ValueError("give both settings= and index_settings=, or neither")
    if settings is None:
        settings, index_settings = make_settings(model, **loose)
    elif loose:
        raise ValueError(f"give the settings objects or the keywords {sorted(loose)}, not both")
    if int(model.dim) != index_settings.dim:
        raise ValueError(f"the model makes {model.dim}-d descriptors but the index settings say {index_settings.dim}")
    return settings, index_settings


def build_index(images_dir: str | Path, index_dir: str | Path, model, *, settings: ExtractSettings | None = None,
                index_settings: IndexSettings | None = None, prune: bool = False, progress: bool = True,
                ca_samples=None, ca_sample_count: int = 1000, ca_sample_scales=(1.0,),
                compact_fraction: float = COMPACT_FRACTION, files=None, **loose) -> BuildReport:
    """Index (or update) ``images_dir``.

    settings / index_settings: the validated settings objects (``make_settings``); callers may instead pass
    make_settings' keywords (model_name, checkpoint, scales, max_size, factory, chunk_size, batch_size,
    workers, precision, max_pixels, coattention). With co-attention settings every image also gets its
    co-attention record from the same forward pass (glimr.extract.local); the PCA/codebook parameters are
    learned once, when the index is created, from up to ``ca_sample_count`` images of ``ca_samples`` (image
    paths or a folder separate from ``images_dir``, as the paper learns them on training images; None =
    $GLIMR_FIT_IMAGES or ../shared/data/photos; "database" = ``images_dir`` itself, transductive; see
    glimr.extract.local.resolve_fit_images) at ``ca_sample_scales``, and kept in INDEX/coattention/ (its
    params.json's meta says what they were fitted on).

    prune: allow a build that removes more than half of the index's images (or all of them).
    compact_fraction: compact vectors.f32 when more than this share of its rows is dead.
    files: index exactly these image files (all under ``images_dir``; e.g. the images a training CSV lists)
    instead of every image under it; indexed images not among them count as removed."""
    settings, index_settings = resolve_build_settings(model, settings, index_settings, loose)
    return run_build(images_dir, index_dir, settings, index_settings,
                     embed=lambda batches, ca: embed_local(model, settings, batches, ca), prune=prune,
                     progress=progress, compact_fraction=compact_fraction, model=model, ca_samples=ca_samples,
                     ca_sample_count=ca_sample_count, ca_sample_scales=ca_sample_scales, files=files)


def embed_local(model, settings: ExtractSettings, batches: Iterable[list[Path]],
                ca: CoAttentionParams | None) -> Iterator[Shard]:
    """The local embedder: each list of files through ``extract`` (or ``extract_local``) in this process."""
    for items in batches:
        if ca is None:
            res = extract(model, items, settings=settings, progress=False, report_errors=False)
            yield Shard(res.descriptors, res.errors)
            continue
        res, locs = extract_local(model, items, cfg=ca.cfg, settings=settings, progress=False,
                                  report_errors=False)
        records = np.stack([ca.encode(locs[j]) for j in range(len(items)) if j not in res.errors]) \
            if len(locs) else np.zeros(0, dtype=ca.codec.record)
        yield Shard(res.descriptors, res.errors, records=records)


def run_build(images_dir: str | Path, index_dir: str | Path, settings: ExtractSettings,
              index_settings: IndexSettings, *, embed: Embedder, prune: bool = False, progress: bool = True,
              compact_fraction: float = COMPACT_FRACTION, model=None, ca_samples=None, ca_sample_count: int = 1000,
              ca_sample_scales=(1.0,), files=None) -> BuildReport:
    """A build with any embedder (see the module doc); ``model`` is needed only to learn co-attention
    parameters when an index with co-attention features is created; ``files``: as build_index's."""
    if not 0 <= compact_fraction <= 1:
        raise ValueError(f"compact_fraction must be in [0, 1], got {compact_fraction!r}")
    root = Path(images_dir)
    unscanned: list[tuple[Path, str]] = []
    if files is None:
        files = list_images(root, unreadable=unscanned)
    else:
        files = sorted({Path(p) for p in files})
        outside = [p for p in files if not p.is_relative_to(root)]
        if outside:
            raise ValueError(f"'{outside[0]}' is not under the image folder '{root}': the files to index must be "
                             "inside it")
    cfg = IndexConfig(settings, index_settings, root=str(root.resolve()))
    rep = BuildReport()
    with IndexStore.for_build(index_dir, cfg) as store:
        known = store.rows() if store.db is not None else {}
        if not files and not known:
            raise ValueError(f"no images found under '{root}' (extensions: .jpg .jpeg .png .bmp .gif .tif .tiff "
                             ".webp .ppm .pgm); nothing to index")
        present: set[str] = set()
        listed: list[tuple[Path, str]] = []
        for p in files:
            rel = db_path(p.relative_to(root).as_posix())
            present.add(rel)
            listed.append((p, rel))
        gone = set(known) - present
        skipped_dirs = [(db_path(d.relative_to(root).as_posix()) + "/", why) for d, why in unscanned]
        for prefix, why in skipped_dirs:
            kept = {g for g in gone if g.startswith(prefix)}
            tqdm.write(f"warning: '{root / prefix}': {why}; it was not scanned"
                       + (f", its {len(kept)} indexed images are kept" if kept else ""), file=sys.stderr)
            gone -= kept
            rep.kept_unscanned += len(kept)
        gone = sorted(gone)
        if gone and not prune and (len(gone) == len(known) or len(gone) > PRUNE_FRACTION * len(known)):
            raise IndexStoreError(
                f"this build would remove {len(gone)} of the {len(known)} images of index '{store.dir}' (they are "
                f"not under '{root}'{' any more' if files else ', which holds no images'}): check IMAGES_DIR; "
                "if they really are gone, run again with --prune. Nothing was changed")
        store.save_config()
        ca = None
        if store.config.coattention:
            if model is None:
                raise ValueError("an index with co-attention features needs the model here to learn its parameters")
            ca = _coattention_params(store, model, files, ca_samples, ca_sample_count, ca_sample_scales,
                                     settings=settings.replace(scales=tuple(ca_sample_scales)), progress=progress)
        todo: list[TodoItem] = []
        scan = tqdm(listed, desc="scan", unit="file", disable=not progress or len(listed) < 2000,
                    dynamic_ncols=True)
        for p, rel in scan:
            old = known.get(rel)
            try:
                st = p.stat()
            except OSError as e:  # vanished or unreadable since the listing (a broken link...)
                todo.append((p, rel, None, _stat_error(p, e)))
                continue
            if old is not None and old.size == st.st_size and old.mtime == st.st_mtime:
                rep.unchanged += 1
                continue
            h = None
            if old is not None and old.size == st.st_size and stat.S_ISREG(st.st_mode):
                h = _hash_or_none(p, st)
                if h is not None and h == old.hash:  # touched, not changed
                    store.touch(rel, st.st_size, st.st_mtime)
                    rep.unchanged += 1
                    continue
            todo.append((p, rel, st, h))
        if gone:
            store.remove(gone)
            rep.removed = len(gone)
        chunk_size = index_settings.chunk_size
        chunks = [todo[start:start + chunk_size] for start in range(0, len(todo), chunk_size)]
        batches = ([p for p, _, st, _ in chunk if st is not None] for chunk in chunks)  # not those stat() refused
        bar = tqdm(total=len(todo), desc="index", unit="img", disable=not progress, dynamic_ncols=True)
        shards = embed(batches, ca) if chunks else iter(())
        try:
            for chunk, shard in zip(chunks, shards, strict=True):
                commit_shard(store, chunk, shard, rep)
                bar.update(len(chunk))
        finally:
            close = getattr(shards, "close", None)
            if close is not None:
                close()  # an embedder's generator frees its workers even when a commit failed
        bar.close()
        dead = store.dead_vectors()
        if dead and dead > compact_fraction * store.n_vectors:
            rep.compacted = store.compact(progress=progress)
        if not store.faiss_is_current():
            store.rebuild_faiss()
        share_files(store.dir)
        rep.total = store.stats()["images"]
    return rep


def commit_shard(store: IndexStore, chunk: list[TodoItem], shard: Shard, rep: BuildReport) -> None:
    """Commit one chunk (one transaction, IndexStore.commit_chunk): its files' rows, the embedded ones with
    their vectors, the failed ones reported on stderr ("skipped: ...") and kept as error rows."""
    readable = [j for j, c in enumerate(chunk) if c[2] is not None]  # the others failed stat()
    if len(shard.descriptors) != len(readable):
        raise ValueError(f"the embedder returned {len(shard.descriptors)} rows for {len(readable)} files")
    errs = {readable[j]: e for j, e in shard.errors.items()}
    hashes = {readable[j]: h for j, h in enumerate(shard.hashes)} if shard.hashes is not None else None
    rows = []
    for j, (p, rel, st, h) in enumerate(chunk):
        err = errs.get(j) if st is not None else h  # for unstat-able files h holds the reason
        if err is not None:
            err = db_path(err)
            tqdm.write(f"skipped: {err}", file=sys.stderr)
            rep.errors += 1
        if st is None:
            rows.append(Row(rel, None, -1, -1.0, "error", err, None))
            continue
        if not h and not err:
            h = hashes[j] if hashes is not None else _hash_or_none(p, st)
        rows.append(Row(rel, h or None, st.st_size, st.st_mtime, "error" if err else "ok", err, None))
    ok = np.ones(len(readable), dtype=bool)
    ok[list(shard.errors)] = False
    store.commit_chunk(rows, shard.descriptors[ok], shard.records)
    rep.added += sum(r.status == "ok" for r in rows)


def compact_index(index_dir: str | Path, progress: bool = True) -> int:
    """`glimr index compact`: drop every dead row of vectors.f32 now; returns how many were dropped."""
    d = Path(index_dir)
    cfg = IndexStore._read_config(d)
    with IndexStore.for_build(d, cfg) as store:
        if store.db is None:
            raise IndexStoreError(f"'{d}' has no meta.sqlite: nothing to compact")
        n = store.compact(progress=progress)
        if not store.faiss_is_current():
            store.rebuild_faiss()
    return n


def optimize_index(index_dir: str | Path, factory: str | None = None) -> dict:
    """`glimr index optimize`: rebuild the FAISS search structure from vectors.f32 (nothing is re-embedded), as
    ``factory`` (a FAISS factory string, or "auto" for the size rule of glimr.index.ann) or, when None, as the
    index's own factory. Checks the factory first (ValueError naming it); returns the new structure's
    description, with its bytes per image."""
    d = Path(index_dir)
    cfg = IndexStore._read_config(d)
    if factory is not None:
        IndexSettings(dim=cfg.dim, factory=factory)  # ValueError with FAISS's reason, before the lock is taken
    with IndexStore.for_build(d, cfg) as store:
        if store.db is None:
            raise IndexStoreError(f"'{d}' has no meta.sqlite: nothing to optimize; build it with "
                                  f"`glimr index build IMAGES_DIR --index {d}`")
        store.save_config()
        out = store.optimize(factory)
        share_files(store.dir)
    return out


def _coattention_params(store: IndexStore, model, files, samples, count: int, sample_scales, *,
                        settings: ExtractSettings, progress: bool) -> CoAttentionParams:
    """The index's co-attention parameters: loaded, or learned now from sample images and saved."""
    d = store.dir / "coattention"
    cfg = LocalConfig.from_json(store.config.coattention["config"])
    if (d / "params.json").is_file():
        params = CoAttentionParams.load(d)
        if params.cfg != cfg:
            raise ValueError(f"'{d}' holds parameters for {params.cfg}, not {cfg}; rebuild the index")
        return params
    fit_items, fit_label = resolve_fit_images(samples, files)
    items = sample_items(fit_items, count)
    if not items:
        raise ValueError("co-attention needs sample images to learn its PCA and codebook: none found")
    if progress:
        print(f"co-attention PCA and codebook fitted on {fit_label}, {len(items)} sampled", file=sys.stderr)
    _, locs = extract_local(model, items, cfg=cfg, settings=settings, progress=progress,
                              desc="co-attention samples")
    params = fit_params([locs[i] for i in sorted(locs)], cfg,
                        meta={"sample_scales": list(sample_scales), "max_size": settings.max_size,
                              "fitted_on": fit_label})
    params.save(d)
    return params


def _hash_or_none(p: Path, st: os.stat_result | None = None) -> str | None:
    """The content hash of a regular file (never opens a FIFO or device), None when it cannot be read."""
    try:
        if not stat.S_ISREG((st or os.stat(p)).st_mode):
            return None
        return content_hash(p)
    except OSError:
        return None


def _stat_error(p: Path, e: OSError) -> str:
    if isinstance(e, FileNotFoundError) and os.path.islink(p):
        return str(ImageError(p, "broken symbolic link (its target is missing)", "fix or remove the link"))
    if isinstance(e, FileNotFoundError):
        return str(ImageError(p, "the file disappeared during the build", "nothing to do if it was removed"))
    return str(ImageError(p, f"cannot access the file ({e.strerror or e})", "check the file and its folder"))

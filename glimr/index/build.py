"""`glimr index build`: incremental, chunked, resumable indexing of an image folder."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from glimr.extract.local import CoAttentionParams, LocalConfig, extract_local, fit_params, sample_items
from glimr.extract.multiscale import extract
from glimr.index.store import IndexConfig, IndexStore, Row
from glimr.io.images import DEFAULT_MAX_PIXELS, content_hash, list_images


@dataclass
class BuildReport:
    added: int = 0          # new or changed images embedded now
    unchanged: int = 0      # skipped: same size and mtime (or same content)
    removed: int = 0        # gone from the folder
    errors: int = 0         # unreadable now (reported, kept out of the search)
    total: int = 0          # searchable images after the build

    def __str__(self) -> str:
        return (f"{self.total} images searchable: {self.added} added, {self.unchanged} unchanged, "
                f"{self.removed} removed, {self.errors} unreadable")


def build_index(images_dir: str | Path, index_dir: str | Path, model, *, model_name: str,
                checkpoint: str | None = None, scales=(1.0,), max_size: int = 512, factory: str = "Flat",
                chunk_size: int = 256, batch_size: int = 16, workers: int | None = None, precision: str = "auto",
                max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True,
                coattention: LocalConfig | None = None, ca_samples=None, ca_sample_count: int = 1000,
                ca_sample_scales=(1.0,)) -> BuildReport:
    """Index (or update) ``images_dir``. With ``coattention`` (a LocalConfig) every image also gets its
    co-attention record from the same forward pass (glimr.extract.local); the PCA/codebook parameters are
    learned once, when the index is created, from ``ca_samples`` (image paths or a folder; default: up to
    ``ca_sample_count`` images of ``images_dir``) at ``ca_sample_scales``, and kept in INDEX/coattention/."""
    root = Path(images_dir)
    files = list_images(root)
    ca_json = None
    if coattention is not None:
        ca_json = {"config": coattention.to_json(), "record_bytes": coattention.codec().nbytes}
    cfg = IndexConfig(model=model_name, dim=int(model.dim), scales=tuple(scales), max_size=int(max_size),
                      checkpoint=str(checkpoint) if checkpoint else None, factory=factory, root=str(root.resolve()),
                      coattention=ca_json)
    rep = BuildReport()
    with IndexStore.create_or_open(index_dir, cfg) as store:
        ca = None
        if store.config.coattention:
            ca = _coattention_params(store, model, files, ca_samples, ca_sample_count, ca_sample_scales,
                                     max_size=max_size, batch_size=batch_size, workers=workers,
                                     precision=precision, max_pixels=max_pixels, progress=progress)
        known = store.rows()
        present = set()
        todo: list[tuple[Path, str, os.stat_result, str | None]] = []
        for p in files:
            rel = p.relative_to(root).as_posix()
            present.add(rel)
            st = p.stat()
            old = known.get(rel)
            if old is not None and old.size == st.st_size and old.mtime == st.st_mtime:
                rep.unchanged += 1
                continue
            h = None
            if old is not None and old.size == st.st_size:
                h = content_hash(p)
                if h == old.hash:  # touched, not changed
                    store.touch(rel, st.st_size, st.st_mtime)
                    rep.unchanged += 1
                    continue
            todo.append((p, rel, st, h))
        gone = sorted(set(known) - present)
        if gone:
            store.remove(gone)
            rep.removed = len(gone)
        bar = tqdm(total=len(todo), desc="index", unit="img", disable=not progress, dynamic_ncols=True)
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start:start + chunk_size]
            kw = dict(scales=scales, max_size=max_size, batch_size=batch_size, workers=workers, precision=precision,
                      max_pixels=max_pixels, progress=False)
            records = None
            if ca is None:
                res = extract(model, [c[0] for c in chunk], **kw)
            else:
                res, locs = extract_local(model, [c[0] for c in chunk], cfg=ca.cfg, **kw)
                records = np.stack([ca.encode(locs[j]) for j in range(len(chunk)) if j not in res.errors]) \
                    if len(locs) else np.zeros(0, dtype=ca.codec.record)
            rows = []
            for j, (p, rel, st, h) in enumerate(chunk):
                err = res.errors.get(j)
                if err is not None:
                    tqdm.write(f"skipped: {err}", file=sys.stderr)
                    rep.errors += 1
                rows.append(Row(rel, h or _hash_or_none(p), st.st_size, st.st_mtime,
                                "error" if err else "ok", err, None))
            store.commit_chunk(rows, res.descriptors[res.ok], records)
            rep.added += len(chunk) - len(res.errors)
            bar.update(len(chunk))
        bar.close()
        if not store.faiss_is_current():
            store.rebuild_faiss()
        rep.total = store.stats()["images"]
    return rep


def _coattention_params(store: IndexStore, model, files, samples, count: int, sample_scales, **kw
                        ) -> CoAttentionParams:
    """The index's co-attention parameters: loaded, or learned now from sample images and saved."""
    d = store.dir / "coattention"
    cfg = LocalConfig.from_json(store.config.coattention["config"])
    if (d / "params.json").is_file():
        params = CoAttentionParams.load(d)
        if params.cfg != cfg:
            raise ValueError(f"'{d}' holds parameters for {params.cfg}, not {cfg}; rebuild the index")
        return params
    if samples is None:
        items = sample_items(files, count)
    elif isinstance(samples, (str, Path)):
        items = sample_items(list_images(Path(samples)), count)
    else:
        items = sample_items(list(samples), count)
    if not items:
        raise ValueError("co-attention needs sample images to learn its PCA and codebook: none found")
    progress = kw.pop("progress", True)
    res, locs = extract_local(model, items, cfg=cfg, scales=tuple(sample_scales), progress=progress,
                              desc="co-attention samples", **kw)
    params = fit_params([locs[i] for i in sorted(locs)], cfg,
                        meta={"sample_scales": list(sample_scales), "max_size": kw.get("max_size")})
    params.save(d)
    return params


def _hash_or_none(p: Path) -> str | None:
    try:
        return content_hash(p)
    except OSError:
        return None

"""`glimr index build`: incremental, chunked, resumable indexing of an image folder."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

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
                chunk_size: int = 256, batch_size: int = 16, workers: int = 2, precision: str = "auto",
                max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True) -> BuildReport:
    root = Path(images_dir)
    files = list_images(root)
    cfg = IndexConfig(model=model_name, dim=int(model.dim), scales=tuple(scales), max_size=int(max_size),
                      checkpoint=str(checkpoint) if checkpoint else None, factory=factory, root=str(root.resolve()))
    rep = BuildReport()
    with IndexStore.create_or_open(index_dir, cfg) as store:
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
            res = extract(model, [c[0] for c in chunk], scales=scales, max_size=max_size, batch_size=batch_size,
                          workers=workers, precision=precision, max_pixels=max_pixels, progress=False)
            rows = []
            for j, (p, rel, st, h) in enumerate(chunk):
                err = res.errors.get(j)
                if err is not None:
                    tqdm.write(f"skipped: {err}", file=sys.stderr)
                    rep.errors += 1
                rows.append(Row(rel, h or _hash_or_none(p), st.st_size, st.st_mtime,
                                "error" if err else "ok", err, None))
            store.commit_chunk(rows, res.descriptors[res.ok])
            rep.added += len(chunk) - len(res.errors)
            bar.update(len(chunk))
        bar.close()
        if not store.faiss_is_current():
            store.rebuild_faiss()
        rep.total = store.stats()["images"]
    return rep


def _hash_or_none(p: Path) -> str | None:
    try:
        return content_hash(p)
    except OSError:
        return None

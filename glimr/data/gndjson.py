"""Generic retrieval ground truth in a folder: ``gnd.json`` + ``query/`` + ``db/`` (the Clutter-UKB layout).

``gnd.json``: ``{"query": [names in query/], "db": [names in db/], "positives": [[db indices] per query],
"junk": [[db indices] per query] (optional), "bbx": [[x0, y0, x1, y1] or null per query] (optional)}``;
other keys (e.g. ``note``) are kept in ``extra``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["GndJsonDataset", "is_gnd_json_folder", "load_gnd_json"]


@dataclass
class GndJsonDataset:
    root: Path
    name: str
    query_names: list[str]
    db_names: list[str]
    query_paths: list[Path]
    db_paths: list[Path]
    positives: list[list[int]]
    junk: list[list[int]] | None = None
    query_boxes: list[tuple[float, float, float, float] | None] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def title(self) -> str:
        n_q, n_db = len(self.query_paths), len(self.db_paths)
        return f"{self.name} (gnd.json: {n_q} queries, {n_db} database images)"

    @property
    def n_queries(self) -> int:
        return len(self.query_paths)

    @property
    def n_db(self) -> int:
        return len(self.db_paths)


def is_gnd_json_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "gnd.json").is_file()


def _index_list(value, n_db: int, what: str, gnd: Path, n_q: int) -> list[list[int]]:
    if not isinstance(value, list) or len(value) != n_q:
        raise ValueError(f"{gnd}: '{what}' must be a list with one list of db indices per query ({n_q})")
    out = []
    for i, idx in enumerate(value):
        if not isinstance(idx, list) or not all(isinstance(j, int) and not isinstance(j, bool) for j in idx):
            raise ValueError(f"{gnd}: {what}[{i}] must be a list of integers")
        bad = [j for j in idx if j < 0 or j >= n_db]
        if bad:
            raise ValueError(f"{gnd}: {what}[{i}] has indices outside 0..{n_db - 1}: {bad[:5]}")
        out.append(list(idx))
    return out


def load_gnd_json(folder: str | os.PathLike, *, check_files: bool = True) -> GndJsonDataset:
    """Read ``folder/gnd.json`` and resolve ``query/`` and ``db/`` paths (checked to exist by default)."""
    root = Path(folder)
    gnd = root / "gnd.json"
    if not gnd.is_file():
        raise FileNotFoundError(f"{gnd} not found: a gnd.json dataset folder holds gnd.json, query/ and db/")
    try:
        data = json.loads(gnd.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{gnd}: not readable JSON ({e})") from e
    for key in ("query", "db", "positives"):
        if key not in data:
            raise ValueError(f"{gnd}: missing key '{key}' (needs query, db, positives)")
    qn, dn = [str(s) for s in data["query"]], [str(s) for s in data["db"]]
    pos = _index_list(data["positives"], len(dn), "positives", gnd, len(qn))
    junk = _index_list(data["junk"], len(dn), "junk", gnd, len(qn)) if data.get("junk") is not None else None
    boxes = None
    if data.get("bbx") is not None:
        if len(data["bbx"]) != len(qn):
            raise ValueError(f"{gnd}: 'bbx' must have one entry per query")
        boxes = [None if b is None else tuple(float(v) for v in b) for b in data["bbx"]]
    qp = [root / "query" / n for n in qn]
    dp = [root / "db" / n for n in dn]
    if check_files:
        miss = [str(p) for p in qp + dp if not p.is_file()]
        if miss:
            raise FileNotFoundError(f"{gnd}: {len(miss)} listed images are missing (e.g. {miss[:3]}); "
                                    "rebuild the dataset folder")
    extra = {k: v for k, v in data.items() if k not in ("query", "db", "positives", "junk", "bbx")}
    return GndJsonDataset(root=root, name=root.name, query_names=qn, db_names=dn, query_paths=qp, db_paths=dp,
                          positives=pos, junk=junk, query_boxes=boxes, extra=extra)

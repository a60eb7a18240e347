"""Generic retrieval ground truth in a folder: ``gnd.json`` + ``query/`` + ``db/`` (the Clutter-UKB layout).

``gnd.json``: ``{"query": [names in query/], "db": [names in db/], "positives": [[db indices] per query],
"junk": [[db indices] per query] (optional), "bbx": [[x0, y0, x1, y1] or null per query] (optional), "kappas": [k of mP@k] (optional)}``;
other keys (e.g. ``note``) are kept in ``extra``. Names are relative to ``query/`` and ``db/`` (subfolders
allowed; no absolute paths, no ``..``). A malformed file raises :class:`GroundTruthError` (a ``ValueError``)
naming the file and the entry.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from glimr.data.revisited import GroundTruthError

__all__ = ["GndJsonDataset", "GroundTruthError", "is_gnd_json_folder", "load_gnd_json"]


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


def _fail(gnd: Path, what: str) -> GroundTruthError:
    return GroundTruthError(f"{gnd}: {what}. Fix gnd.json (format: glimr/data/gndjson.py) or rebuild the dataset "
                            "folder")


def _names(value, key: str, gnd: Path) -> list[str]:
    """A list of image names relative to ``query/`` or ``db/``: non-empty strings, no absolute path, no '..'."""
    if not isinstance(value, list) or not value:
        raise _fail(gnd, f"'{key}' must be a non-empty list of image names, not {_short(value)}")
    out = []
    for i, n in enumerate(value):
        if not isinstance(n, str) or not n.strip():
            raise _fail(gnd, f"{key}[{i}] must be an image name (a non-empty string), not {_short(n)}")
        pure = PurePosixPath(n.replace("\\", "/"))
        if "\0" in n or pure.is_absolute() or PureWindowsPath(n).drive or ".." in pure.parts:
            raise _fail(gnd, f"{key}[{i}] {n!r} leaves the dataset folder: names are relative to {key}/, "
                        "without '..' or an absolute path")
        out.append(n)
    return out


def _index_list(value, n_db: int, what: str, gnd: Path, n_q: int) -> list[list[int]]:
    if not isinstance(value, list) or len(value) != n_q:
        raise _fail(gnd, f"'{what}' must be a list with one list of db indices per query ({n_q}), "
                    f"not {_short(value)}")
    out = []
    for i, idx in enumerate(value):
        if not isinstance(idx, list) or not all(isinstance(j, int) and not isinstance(j, bool) for j in idx):
            raise _fail(gnd, f"{what}[{i}] must be a list of integers (db indices), not {_short(idx)}")
        bad = [j for j in idx if j < 0 or j >= n_db]
        if bad:
            raise _fail(gnd, f"{what}[{i}] has indices outside 0..{n_db - 1}: {bad[:5]}")
        if len(set(idx)) != len(idx):
            twice = sorted(j for j, c in Counter(idx).items() if c > 1)
            raise _fail(gnd, f"{what}[{i}] lists db indices more than once: {twice[:5]}")
        out.append(list(idx))
    return out


def _boxes(value, n_q: int, gnd: Path) -> list[tuple[float, float, float, float] | None]:
    if not isinstance(value, list) or len(value) != n_q:
        raise _fail(gnd, f"'bbx' must be a list with one entry per query ({n_q}), not {_short(value)}")
    out: list[tuple[float, float, float, float] | None] = []
    for i, b in enumerate(value):
        if b is None:
            out.append(None)
            continue
        if (not isinstance(b, list) or len(b) != 4
                or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in b)):
            raise _fail(gnd, f"bbx[{i}] must be null or [x0, y0, x1, y1] (4 finite numbers), not {_short(b)}")
        x0, y0, x1, y1 = (float(v) for v in b)
        if x1 <= x0 or y1 <= y0:
            raise _fail(gnd, f"bbx[{i}] {b} is empty (needs x1 > x0 and y1 > y0)")
        out.append((x0, y0, x1, y1))
    return out


def _short(v, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def load_gnd_json(folder: str | os.PathLike, *, check_files: bool = True) -> GndJsonDataset:
    """Read ``folder/gnd.json`` and resolve ``query/`` and ``db/`` paths (checked to exist by default).

    Every entry is checked: names (relative, inside ``query/`` and ``db/``), index lists (integers in range,
    one list per query, no repeats, no index both positive and junk), boxes and ``kappas``; a malformed file
    raises :class:`GroundTruthError` naming the file and the entry."""
    root = Path(folder)
    gnd = root / "gnd.json"
    if not gnd.is_file():
        raise FileNotFoundError(f"{gnd} not found: a gnd.json dataset folder holds gnd.json, query/ and db/")
    try:
        data = json.loads(gnd.read_bytes().decode("utf-8"))
    except OSError as e:
        raise GroundTruthError(f"{gnd}: cannot read it ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise _fail(gnd, f"not UTF-8 text ({e.reason} at byte {e.start})") from e
    except (ValueError, RecursionError) as e:
        raise _fail(gnd, f"not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise _fail(gnd, f"the top level must be an object with query, db, positives, not a {type(data).__name__}")
    for key in ("query", "db", "positives"):
        if key not in data:
            raise _fail(gnd, f"missing key '{key}' (needs query, db, positives)")
    qn, dn = _names(data["query"], "query", gnd), _names(data["db"], "db", gnd)
    pos = _index_list(data["positives"], len(dn), "positives", gnd, len(qn))
    junk = _index_list(data["junk"], len(dn), "junk", gnd, len(qn)) if data.get("junk") is not None else None
    if junk is not None:
        for i, (p, j) in enumerate(zip(pos, junk)):
            both = sorted(set(p) & set(j))
            if both:
                raise _fail(gnd, f"query {i}: db indices {both[:5]} are both positive and junk")
    boxes = _boxes(data["bbx"], len(qn), gnd) if data.get("bbx") is not None else None
    kappas = data.get("kappas")
    if kappas is not None and (not isinstance(kappas, list) or not kappas or not all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in kappas)):
        raise _fail(gnd, f"'kappas' must be a non-empty list of positive integers (the k of mP@k), not "
                    f"{_short(kappas)}")
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

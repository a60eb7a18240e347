"""Google Landmarks v2 (GLDv2) training sets: the CSV forms and the image folder, read strictly.

Two CSV forms (the header says which; a UTF-8 byte-order mark and blank lines are allowed)::

    train.csv          id,url,landmark_id      one row per image (``url`` and other columns are ignored)
    train_clean.csv    landmark_id,images      one row per landmark, its image ids separated by spaces

Images: ``ROOT/a/b/c/<id>.jpg`` (the official layout: a, b, c = the id's first three characters) or flat
``ROOT/<id>.jpg``; each image is looked up in that order, so a folder may mix both.

Errors: a malformed row (missing column, empty or unsafe id, empty landmark, an image listed twice) raises
:class:`GLDv2Error` naming the file, the line and what to fix. Images that are listed but missing are not
an error: they are collected in :attr:`GLDv2Set.missing` (with their CSV line), reported once by
:func:`load_gldv2` and skipped, so one lost file never stops a long job.

``glimr train`` (``data.kind: gldv2``) and ``glimr audit`` both read training sets through this module.
"""
from __future__ import annotations

import csv
import io
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["GLDv2Error", "GLDv2Set", "filter_csv", "image_path", "load_gldv2", "read_gldv2_rows"]

#: an image id: letters, digits, '_' and '-' only (so that it can never leave the image folder)
_ID = re.compile(r"[A-Za-z0-9_\-]+")
FORMS = ("train", "clean")


class GLDv2Error(ValueError):
    """A GLDv2 CSV that cannot be read as one (its message names the file, the line and the fix)."""


@dataclass
class GLDv2Set:
    """A GLDv2 training set as found on disk: the listed images that exist, in CSV order.

    ``ids[i]`` / ``landmarks[i]`` / ``paths[i]`` / ``lines[i]``: image id, landmark id (as text), file, CSV line;
    ``missing``: (id, landmark id, line) of the listed images that were not found (skipped);
    ``form``: "train" (id,landmark_id rows) or "clean" (landmark_id,images rows)."""

    csv_path: Path
    root: Path
    form: str
    ids: list[str]
    landmarks: list[str]
    paths: list[Path]
    lines: list[int]
    missing: list[tuple[str, str, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def classes(self) -> dict[str, list[int]]:
        """landmark id -> indices of its (present) images."""
        out: dict[str, list[int]] = {}
        for i, lm in enumerate(self.landmarks):
            out.setdefault(lm, []).append(i)
        return out

    def missing_message(self, show: int = 10) -> str:
        """One message listing the missing images (the first ``show``, then a count)."""
        n = len(self.missing)
        listed = ", ".join(f"{i} (line {ln})" for i, _, ln in self.missing[:show])
        more = f" and {n - show} more" if n > show else ""
        return (f"{n} of {n + len(self.ids)} images listed in '{self.csv_path}' are missing under '{self.root}' "
                f"(looked for ROOT/a/b/c/<id>.jpg and ROOT/<id>.jpg): {listed}{more}; they are skipped")


def _fail(path: Path, line: int | None, what: str) -> GLDv2Error:
    where = f"'{path}' line {line}" if line is not None else f"'{path}'"
    return GLDv2Error(f"{where}: {what}. Fix the row or remove it (GLDv2 format: glimr/data/gldv2.py)")


def _check_id(image_id: str, path: Path, line: int) -> str:
    if not image_id:
        raise _fail(path, line, "empty image id")
    if not _ID.fullmatch(image_id):
        raise _fail(path, line, f"image id {image_id[:60]!r} has characters other than letters, digits, '_' "
                                "and '-'")
    return image_id


def _check_landmark(lm: str, path: Path, line: int) -> str:
    if not lm:
        raise _fail(path, line, "empty landmark_id")
    if any(c.isspace() for c in lm) or "," in lm:
        raise _fail(path, line, f"landmark_id {lm[:60]!r} must be one token (no spaces)")
    return lm


def read_gldv2_rows(csv_path: str | os.PathLike) -> tuple[str, list[tuple[str, str, int]]]:
    """(form, [(image id, landmark id, line number)]) of a GLDv2 CSV, checked row by row (GLDv2Error)."""
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"GLDv2 CSV '{path}' not found: give train.csv (id,url,landmark_id) or "
                                "train_clean.csv (landmark_id,images)")
    out: list[tuple[str, str, int]] = []
    seen: dict[str, int] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            head = None
            for row in reader:
                line = reader.line_num
                if not row or not any(c.strip() for c in row):
                    continue
                if head is None:
                    head = [c.strip().lower() for c in row]
                    if "id" in head and "landmark_id" in head:
                        form, ci, cl = "train", head.index("id"), head.index("landmark_id")
                    elif "landmark_id" in head and "images" in head:
                        form, ci, cl = "clean", head.index("images"), head.index("landmark_id")
                    else:
                        raise _fail(path, line, f"not a GLDv2 header: expected id,url,landmark_id (train.csv) "
                                                f"or landmark_id,images (train_clean.csv), got {row[:5]!r}")
                    continue
                if len(row) <= max(ci, cl):
                    raise _fail(path, line, f"expected {len(head)} columns ({','.join(head)}), got {len(row)}: "
                                            f"{row[:4]!r}")
                lm = _check_landmark(row[cl].strip(), path, line)
                ids = [row[ci].strip()] if form == "train" else row[ci].split()
                if form == "clean" and not ids:
                    raise _fail(path, line, f"landmark {lm} lists no images")
                for image_id in ids:
                    _check_id(image_id, path, line)
                    if image_id in seen:
                        raise _fail(path, line, f"image {image_id} is listed again (first on line "
                                                f"{seen[image_id]}): an image belongs to one landmark")
                    seen[image_id] = line
                    out.append((image_id, lm, line))
    except UnicodeDecodeError as e:
        raise _fail(path, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise _fail(path, None, f"not a readable CSV ({e})") from None
    if head is None:
        raise _fail(path, None, "the file is empty")
    if not out:
        raise _fail(path, None, "the file lists no images")
    return form, out


def image_path(root: str | os.PathLike, image_id: str) -> Path | None:
    """The image file of ``image_id`` under ``root``: nested a/b/c/<id>.jpg, else flat <id>.jpg; None if neither."""
    root = Path(root)
    if len(image_id) >= 3:
        p = root / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
        if p.is_file():
            return p
    p = root / f"{image_id}.jpg"
    return p if p.is_file() else None


def load_gldv2(csv_path: str | os.PathLike, root: str | os.PathLike, *, progress: bool = True,
               warn: Callable[[str], None] | None = None) -> GLDv2Set:
    """Read a GLDv2 CSV and find its images under ``root`` (see the module doc).

    Missing images are skipped and reported once through ``warn`` (default: a line on stderr); a CSV whose
    images are ALL missing raises FileNotFoundError (a wrong ``root``, most likely)."""
    from tqdm.auto import tqdm

    csv_path, root = Path(csv_path), Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"GLDv2 image folder '{root}' not found (--images): give the folder that holds "
                                "a/b/c/<id>.jpg or <id>.jpg")
    form, rows = read_gldv2_rows(csv_path)
    ds = GLDv2Set(csv_path, root, form, [], [], [], [])
    for image_id, lm, line in tqdm(rows, desc="gldv2 images", unit="img", disable=not progress or len(rows) < 20000,
                                   dynamic_ncols=True):
        p = image_path(root, image_id)
        if p is None:
            ds.missing.append((image_id, lm, line))
            continue
        ds.ids.append(image_id)
        ds.landmarks.append(lm)
        ds.paths.append(p)
        ds.lines.append(line)
    if not ds.ids:
        ex = ", ".join(i for i, _, _ in ds.missing[:3])
        raise FileNotFoundError(f"none of the {len(rows)} images listed in '{csv_path}' is under '{root}' "
                                f"(e.g. {ex}; looked for ROOT/a/b/c/<id>.jpg and ROOT/<id>.jpg): check --images")
    if ds.missing:
        (warn or (lambda m: print(f"warning: {m}", file=sys.stderr)))(ds.missing_message())
    return ds


def filter_csv(csv_path: str | os.PathLike, out_path: str | os.PathLike, remove: Iterable[str]) -> dict:
    """Write ``out_path``: the CSV ``csv_path`` (either form, columns and order kept) without the rows of the
    landmarks in ``remove``; atomically. Returns counts: images/classes before and after, removed per landmark."""
    from glimr.io.atomic import atomic_write_bytes

    src = Path(csv_path)
    read_gldv2_rows(src)  # the same checks as the loader, with line numbers
    drop = {str(x) for x in remove}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    n_before = n_after = 0
    classes_before: set[str] = set()
    classes_after: set[str] = set()
    removed: dict[str, int] = {}
    with open(src, newline="", encoding="utf-8-sig") as f:
        head = None
        for row in csv.reader(f):
            if not row or not any(c.strip() for c in row):
                continue
            if head is None:
                head = [c.strip().lower() for c in row]
                form = "train" if "id" in head and "landmark_id" in head else "clean"
                cl = head.index("landmark_id")
                ci = head.index("id") if form == "train" else head.index("images")
                w.writerow(row)
                continue
            lm = row[cl].strip()
            n = 1 if form == "train" else len(row[ci].split())
            n_before += n
            classes_before.add(lm)
            if lm in drop:
                removed[lm] = removed.get(lm, 0) + n
                continue
            n_after += n
            classes_after.add(lm)
            w.writerow(row)
    atomic_write_bytes(Path(out_path), buf.getvalue().encode("utf-8"))
    return {"images_before": n_before, "images_after": n_after, "classes_before": len(classes_before),
            "classes_after": len(classes_after), "removed": removed}

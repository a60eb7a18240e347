"""Revisited Oxford/Paris (ROxford5k, RParis6k) and the original Oxford5k/Paris6k, from the official files.

- The ground truth ``gnd_<name>.pkl`` is read through :class:`RestrictedUnpickler`, which builds only
  plain Python containers and numbers (plus numpy arrays, for copies re-saved with numpy) and refuses
  every other import with an error: a pickle can run arbitrary code, even a "trusted" one.
- Image names (``qimlist``, ``imlist``) are mapped to files by name (``<name>.jpg``) anywhere under the
  image folder (flat ``jpg/`` as in revisitop, or the nested folders of the original Paris archive).
- Queries are cropped to their ground-truth box by default, as the protocol requires
  (``query_boxes``). ``crop=False`` turns that off and the dataset's ``notes`` say so.
- A distractor folder (the R1M setting: ROxford5k+1M, RParis6k+1M) is appended after the database
  images, so the ground-truth indices stay valid.

Layout looked for under ``root`` (first match wins): ``root/<name>/gnd_<name>.pkl`` or
``root/gnd_<name>.pkl``; images in ``root/<name>/jpg``, ``root/jpg``, ``root/<name>`` or ``root``.
"""
from __future__ import annotations

import io
import os
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "GroundTruthError",
    "RestrictedUnpickler",
    "RevisitedDataset",
    "clip_box",
    "crop_to_box",
    "find_gnd_file",
    "index_images",
    "list_distractors",
    "load_gnd",
    "load_revisited",
]

#: dataset name -> protocol. "revisited": Easy/Medium/Hard; "oxford": original good+ok / junk.
DATASETS: dict[str, str] = {
    "roxford5k": "revisited",
    "rparis6k": "revisited",
    "oxford5k": "oxford",
    "paris6k": "oxford",
}

TITLES = {
    "roxford5k": "ROxford5k (Revisited protocol, Radenovic et al. CVPR 2018)",
    "rparis6k": "RParis6k (Revisited protocol, Radenovic et al. CVPR 2018)",
    "oxford5k": "Oxford5k (original protocol, Philbin et al. 2007)",
    "paris6k": "Paris6k (original protocol, Philbin et al. 2008)",
}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class GroundTruthError(ValueError):
    """A ground-truth file that cannot be read or does not have the expected content."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for the Revisited ground-truth files.

    The official ``gnd_*.pkl`` files (protocol 3) hold only dicts, lists, strings, ints and floats:
    they import nothing. ``ALLOWED`` admits, besides, the few numpy names that rebuild a plain array
    or scalar (in case a copy was re-saved with numpy arrays); any other global is refused.
    """

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    })

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refused to load '{module}.{name}': a ground-truth file should contain only lists, dicts, "
            "strings and numbers (and numpy arrays). This file is not an official gnd_*.pkl; get the "
            "official one from http://cmp.felk.cvut.cz/revisitop/")


def load_gnd(path: str | os.PathLike) -> dict:
    """Read an official ``gnd_*.pkl`` safely and check its structure.

    Returns a dict with ``qimlist`` (query names), ``imlist`` (database names) and ``gnd`` (one dict per
    query: ``bbx`` as a tuple of 4 floats, and the index lists ``easy``/``hard``/``junk`` or
    ``ok``/``good``/``junk`` as int64 numpy arrays). Other keys (e.g. ``qidx``) are kept.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GroundTruthError(f"{path}: cannot read the ground-truth file ({e.strerror or e})") from e
    try:
        obj = RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise GroundTruthError(f"{path}: {e}") from e
    except Exception as e:  # truncated or not a pickle at all
        raise GroundTruthError(f"{path}: not a readable pickle ({type(e).__name__}: {e}); "
                               "re-download the official file") from e
    if not isinstance(obj, dict) or not {"qimlist", "imlist", "gnd"} <= set(obj):
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise GroundTruthError(f"{path}: expected a dict with 'qimlist', 'imlist', 'gnd'; got {keys}")
    qimlist, imlist = _name_list(obj["qimlist"], "qimlist", path), _name_list(obj["imlist"], "imlist", path)
    gnd = obj["gnd"]
    if not isinstance(gnd, list | tuple):
        raise GroundTruthError(f"{path}: 'gnd' must be a list with one dict per query, not a {type(gnd).__name__}")
    if len(gnd) != len(qimlist):
        raise GroundTruthError(f"{path}: {len(gnd)} ground-truth entries for {len(qimlist)} queries")
    n_db = len(imlist)
    out_gnd = []
    for q, g in enumerate(gnd):
        if not isinstance(g, dict):
            raise GroundTruthError(f"{path}: gnd[{q}] is a {type(g).__name__}, expected a dict")
        e = dict(g)
        for key in ("easy", "hard", "junk", "ok", "good"):
            if key in e:
                e[key] = _index_array(e[key], f"gnd[{q}]['{key}']", n_db, path)
        if "bbx" in e and e["bbx"] is not None:
            e["bbx"] = _bbx(e["bbx"], f"gnd[{q}]['bbx']", path)
        out_gnd.append(e)
    out = dict(obj)
    out.update(qimlist=[str(s) for s in qimlist], imlist=[str(s) for s in imlist], gnd=out_gnd)
    return out


def _name_list(value, key: str, path: Path) -> list[str]:
    """qimlist / imlist: a list (or 1-D array) of image names (strings)."""
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = value.tolist()
    if not isinstance(value, list | tuple) or not all(isinstance(n, str) and n for n in value):
        what = type(value).__name__ if not isinstance(value, list | tuple) else "a list holding non-strings"
        raise GroundTruthError(f"{path}: '{key}' must be a list of image names, not {what}; "
                               "re-download the official file")
    return [str(n) for n in value]


def _index_array(value, what: str, n_db: int, path: Path) -> np.ndarray:
    """One list of database indices: 1-D, integers (integral floats accepted), inside 0..n_db-1."""
    try:
        a = np.asarray(value)
    except (ValueError, TypeError) as e:    # ragged nesting
        raise GroundTruthError(f"{path}: {what} is not a list of indices ({e})") from e
    if a.ndim > 1 or a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)
                                              or a.size == 0):
        raise GroundTruthError(f"{path}: {what} must be a flat list of integer indices, not {a.dtype} "
                               f"with shape {a.shape}")
    a = a.ravel()
    if a.size and np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a) & (a == np.round(a))):
        raise GroundTruthError(f"{path}: {what} holds non-integer indices")
    a = a.astype(np.int64) if a.size else np.zeros(0, np.int64)
    if a.size and (a.min() < 0 or a.max() >= n_db):
        raise GroundTruthError(f"{path}: {what} has indices outside 0..{n_db - 1}")
    return a


def _bbx(value, what: str, path: Path) -> tuple[float, float, float, float]:
    try:
        b = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise GroundTruthError(f"{path}: {what} must be 4 numbers x0, y0, x1, y1 ({e})") from e
    if b.size != 4 or b.ndim > 1:
        raise GroundTruthError(f"{path}: {what} must have 4 numbers, has shape {b.shape}")
    x0, y0, x1, y1 = (float(v) for v in b)
    if not np.all(np.isfinite(b)) or x1 <= x0 or y1 <= y0:
        raise GroundTruthError(f"{path}: {what} {tuple(b.tolist())} is not a box (finite, x1 > x0, y1 > y0)")
    return x0, y0, x1, y1


def find_gnd_file(name: str, root: str | os.PathLike) -> Path:
    """``root/<name>/gnd_<name>.pkl`` or ``root/gnd_<name>.pkl`` (or ``root`` itself if it is the file)."""
    root = Path(root)
    if root.is_file():
        return root
    candidates = [root / name / f"gnd_{name}.pkl", root / f"gnd_{name}.pkl"]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"no ground truth for {name} under {root}: looked for {', '.join(str(c) for c in candidates)}. "
        f"Download gnd_{name}.pkl from http://cmp.felk.cvut.cz/revisitop/ (or pass --root to the folder "
        "that holds it).")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def index_images(folder: str | os.PathLike) -> dict[str, list[Path]]:
    """Map each image file's stem (name without extension) to its path(s), recursively."""
    index: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for f in sorted(filenames):
            if _is_image(f):
                index.setdefault(os.path.splitext(f)[0], []).append(Path(dirpath) / f)
    return index


def list_distractors(folder: str | os.PathLike) -> list[Path]:
    """All image files under ``folder`` (recursively), sorted by path: the R1M distractor set."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"distractor folder {folder} does not exist")
    paths = sorted(p for ps in index_images(folder).values() for p in ps)
    if not paths:
        raise FileNotFoundError(f"distractor folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths


def _resolve(names: Sequence[str], index: dict[str, list[Path]], where: Path) -> list[Path | None]:
    out: list[Path | None] = []
    for n in names:
        stem = os.path.splitext(n)[0] if _is_image(n) else n
        hits = index.get(stem)
        if not hits:
            out.append(None)
        elif len(hits) > 1:
            raise GroundTruthError(f"image name {n} is ambiguous under {where}: {[str(h) for h in hits[:3]]}")
        else:
            out.append(hits[0])
    return out


def clip_box(bbx: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Round a ``(x0, y0, x1, y1)`` box to integer pixels (as PIL does) and clip it to the image."""
    x0, y0, x1, y1 = (int(round(float(v))) for v in bbx)
    x0, x1 = max(0, min(x0, width)), max(0, min(x1, width))
    y0, y1 = max(0, min(y0, height)), max(0, min(y1, height))
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {tuple(bbx)} is empty inside a {width}x{height} image")
    return x0, y0, x1, y1


def crop_to_box(img, bbx: Sequence[float]):
    """Crop a PIL image to a ground-truth box given in its pixel coordinates."""
    return img.crop(clip_box(bbx, img.width, img.height))


@dataclass
class RevisitedDataset:
    """One of roxford5k, rparis6k, oxford5k, paris6k, with paths, query boxes and ground truth.

    ``db_paths`` = database images in ``imlist`` order, then distractors; ``query_boxes[i]`` is the
    ground-truth box of query i in its original pixel coordinates, or None when cropping is off.
    Paths are None where an image was not found (see :meth:`missing`, :meth:`require_images`).
    """

    name: str
    protocol: str
    gnd_path: Path
    image_dir: Path | None
    qimlist: list[str]
    imlist: list[str]
    gnd: list[dict]
    query_paths: list[Path | None]
    db_paths: list[Path | None]
    query_boxes: list[tuple[float, float, float, float] | None]
    crop: bool = True
    distractor_dir: Path | None = None
    n_distractors: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        t = TITLES.get(self.name, self.name)
        if self.n_distractors:
            t += f" + {self.n_distractors} distractors"
        return t

    @property
    def n_queries(self) -> int:
        return len(self.qimlist)

    @property
    def n_db(self) -> int:
        return len(self.db_paths)

    def missing(self) -> dict[str, list[str]]:
        """Names of the query and database images that were not found."""
        return {"query": [n for n, p in zip(self.qimlist, self.query_paths) if p is None],
                "db": [n for n, p in zip(self.imlist, self.db_paths) if p is None]}

    def require_images(self) -> None:
        """Raise FileNotFoundError naming what is missing and what to do."""
        miss = self.missing()
        nq, nd = len(miss["query"]), len(miss["db"])
        if nq or nd:
            ex = (miss["query"] + miss["db"])[:5]
            raise FileNotFoundError(
                f"{self.name}: {nq} of {self.n_queries} query images and {nd} of {len(self.imlist)} database "
                f"images not found under {self.image_dir} (e.g. {', '.join(ex)}). Download the images "
                f"(revisitop: http://cmp.felk.cvut.cz/revisitop/) into <root>/{self.name}/jpg/ or pass the "
                "folder that holds them.")

    def query_image(self, i: int, **load_kwargs):
        """Query i as the protocol uses it: decoded by glimr.io and cropped to its box (if cropping is on)."""
        from glimr.io.images import load_image

        p = self.query_paths[i]
        if p is None:
            raise FileNotFoundError(f"query image {self.qimlist[i]} not found under {self.image_dir}")
        img = load_image(p, **load_kwargs)
        box = self.query_boxes[i]
        if box is None:
            return img
        return crop_to_box(img, _box_for_loaded(p, img, box))


def _box_for_loaded(path: Path, img, box):
    """Scale a box from original pixel coordinates to a (possibly size-capped) decoded image."""
    try:
        from PIL import Image

        with Image.open(path) as raw:  # header only: the original size
            w0, h0 = raw.size
    except Exception:  # noqa: BLE001
        return box
    if (w0, h0) == img.size:
        return box
    sx, sy = img.width / w0, img.height / h0
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def load_revisited(name: str, root: str | os.PathLike | None = None, *,
                   gnd_path: str | os.PathLike | None = None, images: str | os.PathLike | None = None,
                   crop: bool = True, distractors: str | os.PathLike | None = None) -> RevisitedDataset:
    """Load one of :data:`DATASETS` (``roxford5k``, ``rparis6k``, ``oxford5k``, ``paris6k``).

    ``root``: folder with the ground truth and images (see the module doc for the layouts searched);
    ``gnd_path``/``images``: explicit locations instead; ``crop``: crop queries to their box (the
    protocol; turning it off is recorded in ``notes``); ``distractors``: a folder of distractor images
    appended to the database (R1M). Missing images are reported by :meth:`RevisitedDataset.missing`,
    not raised here: call :meth:`RevisitedDataset.require_images` before extracting.
    """
    name = name.lower()
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    protocol = DATASETS[name]
    if gnd_path is None:
        if root is None:
            raise ValueError(f"{name}: give root (the folder holding gnd_{name}.pkl and the images)")
        gnd_path = find_gnd_file(name, root)
    gnd_path = Path(gnd_path)
    data = load_gnd(gnd_path)
    want = ("easy", "hard", "junk") if protocol == "revisited" else ("junk",)
    for q, g in enumerate(data["gnd"]):
        if not all(k in g for k in want) or (protocol == "oxford" and "ok" not in g and "good" not in g):
            other = "an original-protocol (Oxford5k/Paris6k)" if protocol == "revisited" else "a Revisited"
            raise GroundTruthError(f"{gnd_path}: gnd[{q}] has keys {sorted(g)}; {name} needs {want}"
                                   f"{' and ok/good' if protocol == 'oxford' else ''}. Is it {other} file?")
    if images is None:
        if root is None:
            root = gnd_path.parent
        root = Path(root)
        cands = [root / name / "jpg", root / "jpg", root / name, root]
        images = next((c for c in cands if c.is_dir() and any(True for _ in _iter_images(c))), None)
    image_dir = Path(images) if images is not None else None
    index = index_images(image_dir) if image_dir is not None else {}
    query_paths = _resolve(data["qimlist"], index, image_dir)
    db_paths = _resolve(data["imlist"], index, image_dir)
    notes: list[str] = []
    if crop:
        boxes = [g.get("bbx") for g in data["gnd"]]
        if any(b is None for b in boxes):
            raise GroundTruthError(f"{gnd_path}: some queries have no 'bbx'; cannot crop them")
    else:
        boxes = [None] * len(data["qimlist"])
        msg = (f"{name}: queries are NOT cropped to their ground-truth box (crop disabled); this is not the "
               "published protocol and the numbers are not comparable to papers")
        notes.append(msg)
        warnings.warn(msg, stacklevel=2)
    n_dis, dis_dir = 0, None
    if distractors is not None:
        dis_dir = Path(distractors)
        dis = list_distractors(dis_dir)
        n_dis = len(dis)
        db_paths = db_paths + dis
        notes.append(f"{name}: {n_dis} distractor images from {dis_dir} appended to the database "
                     "(R1M setting)")
    return RevisitedDataset(name=name, protocol=protocol, gnd_path=gnd_path, image_dir=image_dir,
                            qimlist=data["qimlist"], imlist=data["imlist"], gnd=data["gnd"],
                            query_paths=query_paths, db_paths=db_paths, query_boxes=boxes, crop=crop,
                            distractor_dir=dis_dir, n_distractors=n_dis, notes=notes)


def _iter_images(folder: Path):
    for dirpath, _, filenames in os.walk(folder):
        for f in filenames:
            if _is_image(f):
                yield Path(dirpath) / f

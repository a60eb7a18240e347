"""A planted-overlap check for `glimr audit`: a GLDv2-format training set and a Clutter-UKB-like eval set, built
from real photos, whose overlap is known.

- Training set (GLDv2 ``train.csv`` + nested a/b/c/<id>.jpg images): every photo of ``photos[half:]`` (the
  second half of the sorted folder) is its own class with ``views`` augmented views (random resized crop, small
  rotation, illumination); plus UKBench objects as classes: the *planted* ones (also in the eval set) and
  *decoys* (not in it: look-alike objects that must not be flagged), each from ``object_views`` of its views,
  augmented the same way.
- Eval set (a gnd.json folder, the Clutter-UKB recipe of ``../shared/tools/make_clutter.py``): for each eval
  object (the planted ones and others) a clean query view, and its other 3 views pasted small (``scale`` of the
  width) at a random place into a real photo; plus ``negatives``: crops of photos pasted the same way. Every
  background and pasted crop comes from ``photos[:half]``, disjoint from the training photos, so the only
  true overlap is the planted objects.

``truth["eval"]``: eval image name (query/.. or db/..) -> the planted landmark id it shows, or None;
``truth["planted"]`` / ``truth["decoys"]`` / ``truth["photo_classes"]``: landmark ids.
Deterministic for a given seed.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

__all__ = ["build_planted"]

PHOTO_LM0 = 100000     # landmark id of the k-th training photo: PHOTO_LM0 + k
OBJECT_LM0 = 900000    # landmark id of UKBench object o: OBJECT_LM0 + o


def _gid(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()[:16]


def _augment(img, rng: random.Random, size: int):
    from PIL import Image, ImageEnhance

    w, h = img.size
    area = rng.uniform(0.55, 1.0)
    ar = rng.uniform(3 / 4, 4 / 3)
    cw = min(w, round((area * w * h * ar) ** 0.5))
    ch = min(h, round((area * w * h / ar) ** 0.5))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = img.crop((x0, y0, x0 + cw, y0 + ch)).rotate(rng.uniform(-12, 12), resample=Image.Resampling.BICUBIC,
                                                      expand=False, fillcolor=(128, 128, 128))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.75, 1.25))
    s = size / max(img.size)
    return img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BICUBIC)


def build_planted(out, photos_dir, ukbench_dir, *, train_photos: int = 30, views: int = 2,
                  planted: tuple[int, ...] = (3, 17, 42), decoys: tuple[int, ...] = (5, 60),
                  others: tuple[int, ...] = (8, 25, 70), object_views: tuple[int, ...] = (0, 1),
                  negatives: int = 10, size: int = 384, bg_size: int = 512, scale: tuple[float, float] = (0.35, 0.6),
                  seed: int = 0) -> dict:
    """Write OUT/train.csv, OUT/train/ (images), OUT/eval/ (gnd.json, query/, db/) and OUT/truth.json; return
    the truth dict with the paths (see the module doc)."""
    from PIL import Image

    out = Path(out)
    rng = random.Random(seed)
    photos = sorted(p for p in Path(photos_dir).iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    half = len(photos) // 2
    eval_photos, train_pool = photos[:half], photos[half:]
    if train_photos > len(train_pool):
        raise ValueError(f"train_photos={train_photos}: only {len(train_pool)} photos in the training half")
    uk = Path(ukbench_dir)
    if set(planted) & set(decoys) or set(planted) & set(others) or set(decoys) & set(others):
        raise ValueError("planted, decoys and others must be different UKBench objects")
    train_dir = out / "train"
    rows = []

    def save_train(img, name: str, lm: int):
        gid = _gid(name)
        p = train_dir / gid[0] / gid[1] / gid[2] / f"{gid}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p, quality=90)
        rows.append((gid, lm))

    for k, ph in enumerate(train_pool[:train_photos]):
        src = Image.open(ph).convert("RGB")
        for v in range(views):
            save_train(_augment(src, rng, size), f"photo{k}_{v}", PHOTO_LM0 + k)
    for o in list(planted) + list(decoys):
        for v in object_views:
            src = Image.open(uk / f"ukbench{4 * o + v:05d}.jpg").convert("RGB")
            save_train(_augment(src, rng, size), f"object{o}_{v}", OBJECT_LM0 + o)
    (out / "train.csv").write_text("id,url,landmark_id\n" + "".join(f"{g},,{lm}\n" for g, lm in rows))

    ev = out / "eval"
    (ev / "query").mkdir(parents=True, exist_ok=True)
    (ev / "db").mkdir(parents=True, exist_ok=True)
    lo, hi = scale

    def canvas():
        bg = Image.open(rng.choice(eval_photos)).convert("RGB")
        s = bg_size / max(bg.size)
        return bg.resize((round(bg.width * s), round(bg.height * s)), Image.Resampling.BICUBIC)

    def paste(obj):   # as make_clutter.py: a central crop of the object photo, scaled, at a random place
        bg = canvas()
        w, h = obj.size
        cw, ch = int(w * rng.uniform(0.6, 0.85)), int(h * rng.uniform(0.6, 0.85))
        x0 = max(0, (w - cw) // 2 + rng.randint(-w // 20, w // 20))
        y0 = max(0, (h - ch) // 2 + rng.randint(-h // 20, h // 20))
        obj = obj.crop((x0, y0, x0 + cw, y0 + ch))
        tw = int(bg.width * rng.uniform(lo, hi))
        th = min(max(1, int(obj.height * tw / obj.width)), int(bg.height * 0.9))
        obj = obj.resize((tw, th), Image.Resampling.BICUBIC)
        bg.paste(obj, (rng.randint(0, bg.width - tw), rng.randint(0, bg.height - th)))
        return bg

    queries, db, pos, truth_eval = [], [], [], {}
    for o in sorted(set(planted) | set(others)):
        lm = str(OBJECT_LM0 + o) if o in planted else None
        q = rng.randrange(4)
        qn = f"q{o:04d}.jpg"
        Image.open(uk / f"ukbench{4 * o + q:05d}.jpg").convert("RGB").save(ev / "query" / qn, quality=92)
        queries.append(qn)
        truth_eval[f"query/{qn}"] = lm
        pos.append([])
        for v in range(4):
            if v == q:
                continue
            n = f"p{o:04d}_{v}.jpg"
            paste(Image.open(uk / f"ukbench{4 * o + v:05d}.jpg").convert("RGB")).save(ev / "db" / n, quality=92)
            pos[-1].append(len(db))
            db.append(n)
            truth_eval[f"db/{n}"] = lm
    for k in range(negatives):
        n = f"n{k:05d}.jpg"
        paste(Image.open(rng.choice(eval_photos)).convert("RGB")).save(ev / "db" / n, quality=92)
        db.append(n)
        truth_eval[f"db/{n}"] = None
    (ev / "gnd.json").write_text(json.dumps({"query": queries, "db": db, "positives": pos,
                                             "note": "planted-overlap eval set (glimr.audit.planted)"}))
    truth = {"train_csv": str(out / "train.csv"), "images": str(train_dir), "eval": str(ev),
             "planted": [str(OBJECT_LM0 + o) for o in planted], "decoys": [str(OBJECT_LM0 + o) for o in decoys],
             "photo_classes": [str(PHOTO_LM0 + k) for k in range(train_photos)], "eval_truth": truth_eval,
             "train_rows": len(rows)}
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth

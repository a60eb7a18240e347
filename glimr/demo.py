"""`glimr demo`: an offline, end-to-end search on photos that ship inside installed packages.

Scenes are regions of matplotlib's sample photo (grace_hopper.jpg) and its sample pictures; each scene is
shown in several views (crop, scale, small rotation, lighting, JPEG quality), pasted into generated clutter,
among distractor views of other scenes' backgrounds. The default model indexes them and one view is
searched: its other views should come first.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter


def _sample_photos() -> dict[str, Image.Image]:
    import matplotlib

    d = Path(matplotlib.get_data_path()) / "sample_data"
    hopper = Image.open(d / "grace_hopper.jpg").convert("RGB")  # 512x600
    w, h = hopper.size
    pack = Image.open(d / "Minduka_Present_Blue_Pack.png").convert("RGBA")
    bg = Image.new("RGB", pack.size, (255, 255, 255))
    bg.paste(pack, mask=pack.split()[3])
    return {
        "face": hopper.crop((w * 0.22, h * 0.05, w * 0.78, h * 0.55)),
        "medals": hopper.crop((w * 0.05, h * 0.55, w * 0.60, h * 1.0)),
        "flag": hopper.crop((w * 0.55, h * 0.45, w * 1.0, h * 1.0)),
        "present": bg.resize((256, 256), Image.BICUBIC),
    }


def _clutter(rng: random.Random, size=(480, 360)) -> Image.Image:
    """A background of random shapes over a colour gradient (no photo of any scene)."""
    w, h = size
    a, b = np.array([rng.randint(0, 255) for _ in range(3)]), np.array([rng.randint(0, 255) for _ in range(3)])
    t = np.linspace(0, 1, w)[None, :, None]
    img = Image.fromarray(np.broadcast_to(a * (1 - t) + b * t, (h, w, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(25):
        x0, y0 = rng.randint(-50, w), rng.randint(-50, h)
        box = (x0, y0, x0 + rng.randint(10, 160), y0 + rng.randint(10, 160))
        col = tuple(rng.randint(0, 255) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=col)
    return img.filter(ImageFilter.GaussianBlur(1))


def _view(obj: Image.Image, rng: random.Random) -> Image.Image:
    w, h = obj.size
    cw, ch = int(w * rng.uniform(0.8, 1.0)), int(h * rng.uniform(0.8, 1.0))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    v = obj.crop((x0, y0, x0 + cw, y0 + ch)).rotate(rng.uniform(-8, 8), resample=Image.BICUBIC, expand=True,
                                                     fillcolor=(128, 128, 128))
    v = ImageEnhance.Brightness(v).enhance(rng.uniform(0.75, 1.25))
    return ImageEnhance.Contrast(v).enhance(rng.uniform(0.8, 1.2))


def make_demo_collection(out: Path, views_per_scene: int = 4, distractors: int = 16, seed: int = 0):
    """Writes OUT/db/*.jpg and OUT/query.jpg; returns (query scene, {db name: scene or None})."""
    rng = random.Random(seed)
    scenes = _sample_photos()
    db = out / "db"
    db.mkdir(parents=True, exist_ok=True)
    truth: dict[str, str | None] = {}
    for name, obj in scenes.items():
        for k in range(views_per_scene):
            bg = _clutter(rng)
            v = _view(obj, rng)
            s = rng.uniform(0.55, 0.8) * bg.height / v.height
            v = v.resize((max(1, int(v.width * s)), max(1, int(v.height * s))), Image.BICUBIC)
            v = v.crop((0, 0, min(v.width, bg.width), v.height))
            bg.paste(v, (rng.randint(0, bg.width - v.width), rng.randint(0, bg.height - v.height)))
            fn = f"{name}_{k}.jpg"
            bg.save(db / fn, quality=rng.randint(75, 95))
            truth[fn] = name
    for k in range(distractors):
        fn = f"clutter_{k:02d}.jpg"
        _clutter(rng).save(db / fn, quality=90)
        truth[fn] = None
    query_scene = "face"
    _view(scenes[query_scene], random.Random(seed + 1)).save(out / "query.jpg", quality=92)
    return query_scene, truth


def run_demo(out: Path, top: int = 8) -> int:
    from glimr.extract.multiscale import extract
    from glimr.index.build import build_index
    from glimr.index.store import IndexStore
    from glimr.models.registry import DEFAULT_MODEL, build_model

    out.mkdir(parents=True, exist_ok=True)
    print(f"1/3  making a demo collection in {out}/db from photos that ship with matplotlib")
    scene, truth = make_demo_collection(out)
    n_rel = sum(1 for s in truth.values() if s == scene)
    print(f"2/3  indexing {len(truth)} images with {DEFAULT_MODEL} (offline weights)")
    model = build_model(DEFAULT_MODEL)
    print("     ", build_index(out / "db", out / "index", model, model_name=DEFAULT_MODEL, workers=0))
    print(f"3/3  searching with {out / 'query.jpg'} (a new view of scene '{scene}'):")
    with IndexStore.open(out / "index") as store:
        q = extract(model, [out / "query.jpg"], workers=0, progress=False).descriptors
        hits = store.search(q, top)[0]
    found = 0
    for r, (p, s) in enumerate(hits, 1):
        ok = truth.get(p) == scene
        found += ok and r <= n_rel
        print(f"  {r:>2}  {s:.3f}  {p:<18} {'<- same scene' if ok else ''}")
    print(f"{found} of the top {n_rel} are views of the query's scene ({n_rel} exist).")
    return 0

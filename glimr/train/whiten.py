"""`glimr whiten`: fit a whitening of a model's descriptors on training images and write a new checkpoint.

Two fits (glimr/models/whiten.py): ``--method pca``, the unsupervised PCA-whitening of the descriptors of
training images, and ``--method learned``, the supervised learned whitening (Lw) of Radenovic et al. (GeM,
TPAMI 2019) from matching pairs, i.e. views of one place or object:

- ``--views K``: K generated views of every training image, made the way real views of one place differ
  (viewpoint warp, crop, lighting and colour, night-like darkening, blur, occlusion, JPEG:
  :func:`glimr.data.transforms.real_view`, seeded, so a fit is reproducible); pairs (image, view) and
  (view, view);
- ``--groups DIR``: every sub-folder of DIR holding two or more images is one place photographed at
  different times (fixed webcams across day, night, weather and seasons); all pairs within a sub-folder
  (at most ``--group-pairs`` of them, drawn evenly).

A fit is a training step, so it lives here, beside training; it is fitted on training images only:
UKBench and evaluation-set folders (holding gnd.json) are refused.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from glimr.config import nonnegative_float, nonnegative_int, positive_int
from glimr.models.whiten import attach_whitening, detach_whitening, fit_learned_whitening, fit_pca_whitening

__all__ = ["group_pairs", "main", "refuse_benchmark", "register", "run", "view_pairs"]

EXAMPLE = """examples:
  glimr whiten gem-lite2 --out runs/gem-lite2-lw.safetensors --method learned \\
      --images ../shared/data/photos ../shared/data/train-real --views 2 --groups ../shared/data/train-real/webcam
  glimr whiten glimr/models/weights/cider-lite0-composites.safetensors --out runs/cider-w.safetensors \\
      --images ../shared/data/photos --dim 512 --query-scales 1,0.7071,0.5
  glimr whiten runs/cider/model.safetensors --out runs/cider-w.safetensors \\
      --cache runs/cache/composites-lite0-384-v4

MODEL is a trained checkpoint (NAME.safetensors + NAME.json) or a model name (e.g. gem-lite2: the written
checkpoint then holds the head and the whitening, the backbone comes from the packaged ImageNet weights).
Descriptors of the training images come either from IMAGES (extracted at scale 1, longest side --max-size,
as `glimr extract` does) or, for --method pca, from a frozen-backbone feature cache folder of `glimr train`.
The written checkpoint returns whitened descriptors everywhere (eval, index, search); an existing whitening
is replaced. UKBench and evaluation-set folders (holding gnd.json) are refused: never fit on a benchmark.

Neither whitening is in the CiDeR, GLAM, UGALR or DPLG papers: both are Radenovic et al.'s (GeM, TPAMI
2019) post-processing, --method learned as their Lw, --method pca its unsupervised variant."""


def refuse_benchmark(path: Path, what: str) -> None:
    """ValueError when ``path`` is (inside) a folder named ukbench, or (inside) an evaluation set folder."""
    p = path.resolve()
    if any(part.lower() == "ukbench" for part in p.parts):
        raise ValueError(f"{what} '{path}' is (inside) a folder named ukbench: UKBench is the benchmark, "
                         "never fit on it; use training images (e.g. ../shared/data/photos)")
    for folder in (p, *p.parents):
        if (folder / "gnd.json").is_file():
            raise ValueError(f"{what} '{path}' is (inside) the evaluation set '{folder}' (it holds gnd.json): "
                             "never fit on a benchmark; use training images")


def register(subparsers) -> argparse.ArgumentParser:
    """Add `whiten` to an argparse subparsers object (from `add_subparsers()`)."""
    p = subparsers.add_parser(
        "whiten", help="learn a whitening of a model's descriptors on training images; write a new checkpoint",
        description="Fit d' = L2((L2(d) - mu) @ P) on descriptors of training images: --method pca (PCA of "
                    "their covariance, P = V[:, :D'] / sqrt(lambda + shrink * mean(lambda))) or --method "
                    "learned (Radenovic et al.'s Lw from matching pairs: P = C_S^-1/2 V[:, :D']) and save the "
                    "checkpoint with this whitening as its last stage.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="MODEL", help="trained checkpoint (NAME.safetensors + NAME.json) or a "
                                                        "model name (e.g. gem-lite2)")
    p.add_argument("--out", required=True, help="the new checkpoint (NEW.safetensors; NEW.json is written too)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", nargs="+", help="folders of training images (searched recursively)")
    src.add_argument("--cache", metavar="DIR", help="a frozen-backbone feature cache folder of `glimr train` "
                                                    "(--method pca only)")
    p.add_argument("--method", default="pca", choices=["pca", "learned"],
                   help="pca: unsupervised PCA-whitening; learned: Lw from matching pairs (--views, --groups)")
    p.add_argument("--views", type=nonnegative_int, default=0,
                   help="learned: generated views per training image (real_view: warp, crop, light, night...)")
    p.add_argument("--groups", metavar="DIR", default=None,
                   help="learned: a folder whose sub-folders each hold photos of one place (e.g. webcams)")
    p.add_argument("--group-pairs", type=positive_int, default=300,
                   help="learned: at most this many pairs per sub-folder of --groups")
    p.add_argument("--reg", type=nonnegative_float, default=0.1,
                   help="learned: shrink C_S by reg * tr(C_S)/D * I (0 = the paper's plain Lw)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated views")
    p.add_argument("--dim", type=positive_int, default=None, help="output dimension D' (default: the descriptor's)")
    p.add_argument("--shrink", type=nonnegative_float, default=0.0,
                   help="pca: eigenvalue shrinkage: divide by sqrt(lambda + shrink * mean(lambda[:D'])) (0 = plain)")
    p.add_argument("--max-size", type=positive_int, default=None,
                   help="with --images: longest image side (default: the model's own, else 512); recorded in the "
                        "output's config as the size the whitened model runs at by default")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="use at most N training images per folder (evenly spaced over the sorted list)")
    p.add_argument("--query-scales", default=None,
                   help="store this query scale pyramid (e.g. 1,0.7071,0.5) in the checkpoint as the model's "
                        "recommended one: eval and search then extract queries at these scales by default "
                        "(the database stays at the index's / --scales)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--workers", type=nonnegative_int, default=None,
                   help="image-decoding processes (default: 0 = in the main process on machines with <= 2 cores, else min(4, cores/2))")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def _spaced(n: int, limit: int | None) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise ValueError(f"--limit must be at least 1, not {limit}")
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def view_pairs(n_images: int, views: int) -> np.ndarray:
    """Pairs of row indices when rows are ``n_images`` images followed by ``views`` blocks of their
    generated views (block k holds view k of every image): (image, view) and (view, view) of each image."""
    rows = [np.arange(n_images) + k * n_images for k in range(views + 1)]
    out = [np.stack([rows[a], rows[b]], axis=1) for a in range(views + 1) for b in range(a + 1, views + 1)]
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def group_pairs(labels: np.ndarray, per_group: int) -> np.ndarray:
    """All pairs of rows with the same label (at most ``per_group`` per label, evenly spaced over the sorted
    pair list, so the choice is deterministic)."""
    out = []
    for g in np.unique(labels):
        idx = np.flatnonzero(labels == g)
        if len(idx) < 2:
            continue
        a, b = np.triu_indices(len(idx), k=1)
        keep = _spaced(len(a), per_group)
        out.append(np.stack([idx[a[keep]], idx[b[keep]]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def _load_net(spec: str):
    from glimr.models.checkpoint import load_model
    from glimr.models.registry import build_model

    path = Path(spec)
    if path.suffix == ".safetensors" or path.exists():
        net = load_model(path)
        partial = net.config.get("partial")
        return net, ([p for p in partial["prefixes"] if p != "pcaw."] if partial else None)
    return build_model(spec), ["head."]         # a model by name: save its head (+ whitening) only


def run(args: argparse.Namespace) -> int:
    from glimr.models.checkpoint import checkpoint_paths, config_path, save_model

    query_scales = None
    if args.query_scales is not None:
        from glimr.extract.multiscale import parse_scales

        query_scales = [float(s) for s in parse_scales(args.query_scales)]
    if args.method == "learned":
        if args.cache:
            raise ValueError("--method learned needs --images (its pairs are views of the images): not --cache")
        if args.views < 1 and not args.groups:
            raise ValueError("--method learned needs matching pairs: give --views K (>= 1) and/or --groups DIR")
    out = Path(args.out)
    if checkpoint_paths(out)[0].resolve() == checkpoint_paths(args.checkpoint)[0].resolve():
        raise ValueError(f"--out '{out}' is the input checkpoint: write the whitened model to a new file")
    srcs = [Path(s) for s in (args.images or [args.cache])]
    for s in srcs:
        refuse_benchmark(s, "--images" if args.images else "--cache")
    if args.groups:
        refuse_benchmark(Path(args.groups), "--groups")
    net, prefixes = _load_net(args.checkpoint)
    if args.max_size is None:
        from glimr.extract.multiscale import model_max_size

        args.max_size = model_max_size(net.config)
    old = detach_whitening(net)
    progress = not args.quiet
    if args.images:
        descs, source, skipped, pairs = _image_descriptors(net, args, srcs, progress)
    else:
        descs, source, skipped = _cache_descriptors(net, args, srcs[0], progress)
        pairs = None
    if args.method == "learned":
        w = fit_learned_whitening(descs, pairs, dim=args.dim, reg=args.reg)
        source = f"learned whitening (Lw, reg {args.reg:g}) from {len(pairs)} pairs; {source}"
    else:
        w = fit_pca_whitening(descs, dim=args.dim, shrink=args.shrink)
    attach_whitening(net, w, source)
    net.config["pca_whiten"]["method"] = args.method
    if query_scales is not None:
        net.config["query_scales"] = query_scales
    if args.images:  # the whitening is fitted at this size: the model runs at it unless told otherwise
        net.config["max_size"] = int(args.max_size)
    st = save_model(net, out, prefixes=prefixes)
    if old is not None:
        print(f"replaced the checkpoint's whitening ({old.in_dim} -> {old.dim})")
    print(f"{'learned' if args.method == 'learned' else 'PCA'}-whitening fitted on {len(descs)} descriptors"
          + (f" and {len(pairs)} matching pairs" if args.method == "learned" else "")
          + (f" ({skipped} unreadable skipped)" if skipped else "")
          + f" from {'cache' if args.cache else 'images'} {', '.join(repr(str(s)) for s in srcs)}"
          + f": {w.in_dim} -> {w.dim} dims")
    if query_scales is not None:
        print(f"recommended query scales: {','.join(f'{s:g}' for s in query_scales)}")
    print(f"wrote {st} and {config_path(st)}"
          + (f" (partial: {', '.join(prefixes + ['pcaw.'])} + pretrained backbone)" if prefixes else ""))
    return 0


def _image_descriptors(net, args, srcs: list[Path], progress: bool):
    """Descriptors of the images of ``srcs`` (+ their generated views, + the --groups photos), the pairs
    between them (None for --method pca), a source line, and the number of unreadable files."""
    from glimr.data.transforms import real_view, sample_rng
    from glimr.extract.multiscale import extract
    from glimr.io.images import ImageError, list_images, load_image

    files: list[Path] = []
    for s in srcs:
        found = list_images(s)
        if not found:
            raise ValueError(f"no images found under '{s}'")
        files += [found[i] for i in _spaced(len(found), args.limit)]
    files = list(dict.fromkeys(files))
    groups = []
    if args.groups:
        gdir = Path(args.groups)
        if not gdir.is_dir():
            raise ValueError(f"--groups '{gdir}' is not a folder")
        for sub in sorted(p for p in gdir.iterdir() if p.is_dir()):
            groups.append(list_images(sub))
        if sum(len(g) >= 2 for g in groups) == 0:
            raise ValueError(f"--groups '{gdir}': no sub-folder holds two or more images")
    for f in files + [f for g in groups for f in g]:   # symlinks into a benchmark count too
        refuse_benchmark(f, "image")
    kw = {"scales": (1.0,), "max_size": args.max_size, "batch_size": args.batch_size, "workers": args.workers,
          "precision": args.precision, "progress": progress}
    res = extract(net, files, desc="descriptors", **kw)
    blocks, ok_blocks = [res.descriptors], [res.ok]
    for k in range(args.views if args.method == "learned" else 0):
        views = []
        for i, f in enumerate(files):
            try:
                img = load_image(f, target_size=args.max_size)
            except ImageError:
                img = None
            views.append(real_view(img, sample_rng(args.seed, k, i)) if img is not None else None)
        got = extract(net, [v for v in views if v is not None], desc=f"views {k + 1}/{args.views}", **kw)
        d = np.zeros_like(res.descriptors)
        d[[i for i, v in enumerate(views) if v is not None]] = got.descriptors
        blocks.append(d)
        ok_blocks.append(np.linalg.norm(d, axis=1) > 0)
    n = len(files)
    pairs = view_pairs(n, len(blocks) - 1)
    if groups:
        offset = n * len(blocks)                 # the group photos' rows follow the images and their views
        gres = extract(net, [f for g in groups for f in g], desc="groups", **kw)
        blocks.append(gres.descriptors)
        ok_blocks.append(gres.ok)
        labels = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
        pairs = np.concatenate([pairs, group_pairs(labels, args.group_pairs) + offset])
    descs, ok = np.concatenate(blocks), np.concatenate(ok_blocks)
    # drop failed rows and the pairs that touch them; renumber the rest
    keep_pairs = ok[pairs].all(axis=1)
    new_index = np.cumsum(ok) - 1
    pairs = new_index[pairs[keep_pairs]]
    descs = descs[ok]
    skipped = int((~res.ok).sum())
    source = (f"images:{', '.join(map(str, srcs))} ({n} images"
              + (f", {args.views} generated views each" if args.method == "learned" and args.views else "")
              + (f", groups {args.groups}: {sum(map(len, groups))} photos in {len(groups)} places" if groups else "")
              + f"; max_size {args.max_size}, scale 1)")
    return descs, source, skipped, (pairs if args.method == "learned" else None)


def _cache_descriptors(net, args, src: Path, progress: bool):
    from glimr.train.cache import CacheError, FeatureCache, cached_descriptors

    try:
        cache = FeatureCache(src)
    except CacheError as e:
        raise ValueError(str(e)) from e
    for p in cache.meta.get("source", {}).get("paths", []):
        refuse_benchmark(Path(p), f"cache '{src}' source image")
    if cache.meta.get("backbone") != net.backbone.name:
        raise ValueError(f"cache '{src}' holds {cache.meta.get('backbone')} maps, the model's backbone is "
                         f"{net.backbone.name}: use a cache of the same backbone, or --images")
    all_descs = cached_descriptors(net, cache, batch_size=args.batch_size, precision=args.precision,
                                   progress=progress)
    all_descs = all_descs[_spaced(len(all_descs), args.limit)]
    ok = np.linalg.norm(all_descs, axis=1) > 0
    return all_descs[ok], f"cache:{src} ({int(ok.sum())} items, stage {cache.meta.get('stage')})", int((~ok).sum())


def main(argv: list[str] | None = None) -> int:
    from glimr.cli import run_subcommand

    return run_subcommand(register, argv, "glimr whiten")


if __name__ == "__main__":
    sys.exit(main())

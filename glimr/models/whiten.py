"""PCA-whitening of a model's global descriptor, learned without labels, and the `glimr whiten` command.

Not part of the CiDeR paper (nor of the other heads' papers): it is the learned whitening of Radenovic
et al.'s GeM paper (TPAMI 2019, "learned whitening" post-processing), here the unsupervised variant, a PCA
of the descriptors of training images (no matching pairs needed)::

    d' = L2( (L2(d) - mu) @ P ),   P = V[:, :D'] / sqrt(lambda[:D'] + shrink * mean(lambda[:D']))

where mu is the mean of the L2-normalised training descriptors, V and lambda the eigenvectors and
eigenvalues (descending) of their covariance, and D' the output dimension. ``shrink`` > 0 damps the
amplification of the weakest kept directions (0: plain PCA-whitening).

The fitted transform is a :class:`PCAWhitening` module (two float32 buffers) that
:func:`attach_whitening` puts into a `RetrievalNet` as ``net.pcaw``: the net then returns whitened
descriptors (at every scale of a multi-scale extraction, before the scales are summed), and
`save_model` / `load_model` save and rebuild it from the checkpoint's ``config["pca_whiten"]``.

The training images must not be the benchmark's: `glimr whiten` refuses UKBench and evaluation-set folders.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from glimr.models.precision import hi, no_autocast

__all__ = ["PCAWhitening", "fit_pca_whitening", "attach_whitening", "detach_whitening", "register", "run"]


class PCAWhitening(nn.Module):
    """``desc (B, D) -> L2((L2(desc) - mean) @ proj)``, (B, D'); buffers ``mean`` (D,) and ``proj`` (D, D')."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(int(in_dim), dtype=torch.float32))
        self.register_buffer("proj", torch.zeros(int(in_dim), int(dim), dtype=torch.float32))

    @property
    def in_dim(self) -> int:
        return int(self.proj.shape[0])

    @property
    def dim(self) -> int:
        return int(self.proj.shape[1])

    def forward(self, desc: torch.Tensor) -> torch.Tensor:
        if desc.shape[-1] != self.in_dim:
            raise ValueError(f"PCA-whitening expects {self.in_dim}-dim descriptors, got {tuple(desc.shape)}")
        with no_autocast(desc):  # fp32: whitening amplifies the weak directions, bf16 would drown them
            x = F.normalize(hi(desc), dim=-1)
            return F.normalize((x - self.mean) @ self.proj, dim=-1)


def fit_pca_whitening(descs: np.ndarray, dim: int | None = None, shrink: float = 0.0) -> PCAWhitening:
    """Fit the PCA-whitening (module doc) on ``descs`` (N, D) in float64; ``dim`` = D' (default D).

    The covariance is the biased one (1/N), so the whitened, not yet re-normalised training descriptors
    ``(L2(d) - mu) @ P`` have exactly the identity covariance (1/N) when ``shrink`` is 0. The sign of each
    eigenvector is fixed (its largest-magnitude entry positive) so that a fit is reproducible.

    Raises ValueError for fewer than D'+1 samples, D' outside 1..D, a negative ``shrink``, zero or
    non-finite rows, or descriptors that span fewer than D' directions (use a smaller ``dim`` or a
    ``shrink`` > 0)."""
    x = np.asarray(descs, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"descriptors must be an (N, D) array, not shape {x.shape}")
    n, d = x.shape
    dim = d if dim is None else int(dim)
    if not 1 <= dim <= d:
        raise ValueError(f"whitening dim {dim} must be between 1 and the descriptor dimension {d}")
    if n < dim + 1:
        raise ValueError(f"PCA-whitening to {dim} dims needs at least {dim + 1} descriptors, got {n}: use more "
                         f"training images or a smaller dim")
    if not (shrink >= 0 and np.isfinite(shrink)):
        raise ValueError(f"shrink must be a finite number >= 0, not {shrink}")
    if not np.isfinite(x).all():
        raise ValueError("descriptors contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{int((norms == 0).sum())} descriptors are all-zero (failed images?): drop them first")
    x = x / norms
    mu = x.mean(axis=0)
    xc = x - mu
    cov = xc.T @ xc / n
    lam, vec = np.linalg.eigh(cov)                 # ascending
    lam, vec = lam[::-1][:dim], vec[:, ::-1][:, :dim]
    if shrink == 0 and lam[-1] <= 1e-12 * max(lam[0], 1e-300):
        rank = int((lam > 1e-12 * max(lam[0], 1e-300)).sum())
        raise ValueError(f"the {n} descriptors span only {rank} directions, fewer than dim {dim}: use "
                         f"--dim {rank} or less, more images, or --shrink > 0")
    lam = np.clip(lam, 0.0, None)
    big = np.abs(vec).argmax(axis=0)
    vec = vec * np.sign(vec[big, np.arange(dim)])   # sign convention: largest entry positive
    proj = vec / np.sqrt(lam + shrink * lam.mean())
    out = PCAWhitening(d, dim)
    out.mean.copy_(torch.from_numpy(mu.astype(np.float32)))
    out.proj.copy_(torch.from_numpy(proj.astype(np.float32)))
    out.shrink = float(shrink)
    return out


def attach_whitening(net, pcaw: PCAWhitening, source: str) -> None:
    """Put ``pcaw`` into ``net`` (``net.pcaw``) and record it in ``net.config["pca_whiten"]``.

    ``pcaw`` must take the descriptors of the net without whitening (its head's dim)."""
    head_dim = int(net.head.dim)
    if pcaw.in_dim != head_dim:
        raise ValueError(f"PCA-whitening takes {pcaw.in_dim}-dim descriptors but {getattr(net, 'name', 'the net')} "
                         f"produces {head_dim}-dim ones")
    p = next(net.parameters(), None)
    net.pcaw = pcaw.to(p.device) if p is not None else pcaw
    net.config["pca_whiten"] = {"dim": pcaw.dim, "in_dim": pcaw.in_dim,
                                "shrink": float(getattr(pcaw, "shrink", 0.0)), "source": str(source)}


def detach_whitening(net) -> PCAWhitening | None:
    """Remove the net's PCA-whitening (and its config record); returns it (None if there was none)."""
    old = getattr(net, "pcaw", None)
    net.pcaw = None
    net.config.pop("pca_whiten", None)
    return old


# ------------------------------------------------------------------------------------------ CLI
EXAMPLE = """example:
  glimr whiten glimr/models/weights/cider-lite0-composites.safetensors --out runs/cider-w.safetensors \\
      --images ../shared/data/photos --dim 512 --query-scales 1,0.7071,0.5
  glimr whiten runs/cider/model.safetensors --out runs/cider-w.safetensors \\
      --cache runs/cache/composites-lite0-384-v4

Descriptors of the training images come either from IMAGES (extracted at scale 1, longest side
--max-size, as `glimr extract` does) or from a frozen-backbone feature cache folder of `glimr train`
(the head run on the cached maps: fast, no image decoding; the cache's backbone must be the model's).
The written checkpoint keeps the input's partial-ness (a head-only checkpoint stays head-only, plus the
whitening) and returns whitened descriptors everywhere (eval, index, search). An existing whitening of
the checkpoint is replaced. UKBench and evaluation-set folders (holding gnd.json) are refused: never
fit anything on the benchmark.

PCA-whitening is not in the CiDeR paper: it is the learned whitening of Radenovic et al. (GeM, TPAMI
2019), here unsupervised (PCA of training descriptors)."""


def _refuse_benchmark(path: Path, what: str) -> None:
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
        "whiten", help="learn a PCA-whitening of a checkpoint's descriptors (no labels); write a new checkpoint",
        description="Fit d' = L2((L2(d) - mu) @ P) on descriptors of training images (PCA of their covariance, "
                    "eigenvalues descending, P = V[:, :D'] / sqrt(lambda + shrink * mean(lambda))) and save the "
                    "checkpoint with this whitening as its last stage.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="trained checkpoint (NAME.safetensors + NAME.json)")
    p.add_argument("--out", required=True, help="the new checkpoint (NEW.safetensors; NEW.json is written too)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="folder of training images (searched recursively)")
    src.add_argument("--cache", metavar="DIR", help="a frozen-backbone feature cache folder of `glimr train`")
    p.add_argument("--dim", type=int, default=None, help="output dimension D' (default: the descriptor's)")
    p.add_argument("--shrink", type=float, default=0.0,
                   help="eigenvalue shrinkage: divide by sqrt(lambda + shrink * mean(lambda[:D'])) (0 = plain)")
    p.add_argument("--max-size", type=int, default=512, help="with --images: longest image side")
    p.add_argument("--limit", type=int, default=None,
                   help="use at most N training images (evenly spaced over the sorted list)")
    p.add_argument("--query-scales", default=None,
                   help="store this query scale pyramid (e.g. 1,0.7071,0.5) in the checkpoint as the model's "
                        "recommended one: eval and search then extract queries at these scales by default "
                        "(the database stays at the index's / --scales)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=None,
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


def run(args: argparse.Namespace) -> int:
    from glimr.models.checkpoint import load_model, save_model

    query_scales = None
    if args.query_scales is not None:
        from glimr.extract.multiscale import parse_scales

        query_scales = [float(s) for s in parse_scales(args.query_scales)]
    out = Path(args.out)
    if out.with_suffix(".safetensors").resolve() == Path(args.checkpoint).with_suffix(".safetensors").resolve():
        raise ValueError(f"--out '{out}' is the input checkpoint: write the whitened model to a new file")
    src = Path(args.images or args.cache)
    _refuse_benchmark(src, "--images" if args.images else "--cache")
    net = load_model(args.checkpoint)
    old = detach_whitening(net)
    partial = net.config.get("partial")
    prefixes = [p for p in partial["prefixes"] if p != "pcaw."] if partial else None
    progress = not args.quiet
    if args.images:
        from glimr.extract.multiscale import extract
        from glimr.io.images import list_images

        files = list_images(src)
        if not files:
            raise ValueError(f"no images found under '{src}'")
        files = [files[i] for i in _spaced(len(files), args.limit)]
        for f in files:  # symlinks into a benchmark count too
            _refuse_benchmark(f, "image")
        res = extract(net, files, scales=(1.0,), max_size=args.max_size, batch_size=args.batch_size,
                      workers=args.workers, precision=args.precision, progress=progress, desc="descriptors")
        descs = res.descriptors[res.ok]
        source = f"images:{src} ({len(descs)} images, max_size {args.max_size}, scale 1)"
        skipped = len(res.errors)
    else:
        from glimr.train.cache import CacheError, FeatureCache, cached_descriptors

        try:
            cache = FeatureCache(src)
        except CacheError as e:
            raise ValueError(str(e)) from e
        for p in cache.meta.get("source", {}).get("paths", []):
            _refuse_benchmark(Path(p), f"cache '{src}' source image")
        if cache.meta.get("backbone") != net.backbone.name:
            raise ValueError(f"cache '{src}' holds {cache.meta.get('backbone')} maps, the model's backbone is "
                             f"{net.backbone.name}: use a cache of the same backbone, or --images")
        all_descs = cached_descriptors(net, cache, batch_size=args.batch_size, precision=args.precision,
                                       progress=progress)
        all_descs = all_descs[_spaced(len(all_descs), args.limit)]
        ok = np.linalg.norm(all_descs, axis=1) > 0
        descs, skipped = all_descs[ok], int((~ok).sum())
        source = f"cache:{src} ({len(descs)} items, stage {cache.meta.get('stage')})"
    pcaw = fit_pca_whitening(descs, dim=args.dim, shrink=args.shrink)
    attach_whitening(net, pcaw, source)
    if query_scales is not None:
        net.config["query_scales"] = query_scales
    st = save_model(net, out, prefixes=prefixes)
    if old is not None:
        print(f"replaced the checkpoint's PCA-whitening ({old.in_dim} -> {old.dim})")
    print(f"PCA-whitening fitted on {len(descs)} descriptors"
          + (f" ({skipped} unreadable skipped)" if skipped else "")
          + f" from {source.split(':', 1)[0]} '{src}': {pcaw.in_dim} -> {pcaw.dim} dims, shrink {args.shrink:g}")
    if query_scales is not None:
        print(f"recommended query scales: {','.join(f'{s:g}' for s in query_scales)}")
    print(f"wrote {st} and {st.with_suffix('.json')}"
          + (f" (partial: {', '.join(prefixes + ['pcaw.'])} + pretrained backbone)" if prefixes else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    from glimr.cli import run_subcommand

    return run_subcommand(register, argv, "glimr whiten")


if __name__ == "__main__":
    sys.exit(main())

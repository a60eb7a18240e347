"""``glimr bench CONFIG.yaml``: models x scale sets x re-rankers x datasets, in the layout of the papers.

Config (YAML; relative paths are relative to the working directory)::

    title: Clutter-UKB dev
    output: benchmarks/results/clutter_dev   # results.md, results.json, plots/
    cache: bench-data/cache                  # descriptor cache (.npz), reused across runs
    max_size: 512                            # optional: longest side; default per dataset, else the model's own
    batch_size: 16
    workers: 2
    device: auto                             # auto = the GPU if there is one
    precision: auto                          # auto (bf16 where the hardware has native bf16) | fp32 | bf16
    datasets:                                # a name or folder, or a mapping
      - bench-data/clutter-dev-medium
      - {name: roxford5k, root: data/datasets, label: ROxf}
      - {name: roxford5k, root: data/datasets, distractors: data/revisitop1m, label: ROxf+1M}
    models:                                  # a registry name, or a mapping
      - gem-lite0
      - {name: gem-lite0, checkpoint: runs/gem/model.safetensors, label: "GeM (trained)"}
      - {name: gem-lite2, max_size: 768, label: "GeM Lite2 at 768"}   # a size for one model (or one dataset)
    scales: ["1", "3"]                       # scale sets (see glimr.extract.multiscale.SCALE_SETS)
    rerank:                                  # re-ranker specs (see glimr.eval.evaluate.RERANKERS)
      - none
      - {spec: "coattention:config=compact", datasets: [ROxf]}   # a costly one on some datasets only
    plots: {grids: true, grid_queries: 6, grid_topk: 8}

Descriptors are extracted once per (model, scale set, dataset) and cached; re-rankers reuse them.
Writes ``results.md`` (main table: mAP per dataset, Revisited Medium then Hard as in the papers, best
in bold; then every metric per dataset; the command, date and settings), ``results.json`` (everything
behind it) and ``plots/`` (mAP per method; ranked-result grids: correct results outlined green, wrong
ones red, ignored/junk grey). A re-ranker limited to some datasets leaves "-" in the others' cells.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glimr.config import check_number, nonnegative_int, positive_int
from glimr.eval.evaluate import (
    EvalSet,
    build_net,
    extract_descriptors,
    load_eval_set,
    model_identity,
    parse_rerank,
    parse_scales_arg,
    score_descriptors,
)
from glimr.io.atomic import atomic_write_bytes

__all__ = ["BenchConfig", "load_config", "run_bench", "render_markdown", "main_columns"]

PROTOCOL_LABEL = {"easy": "E", "medium": "M", "hard": "H"}


@dataclass
class DatasetSpec:
    name: str
    root: str | None = None
    label: str | None = None
    crop: bool = True
    distractors: str | None = None
    images: str | None = None
    max_size: int | None = None


@dataclass
class ModelSpec:
    name: str
    checkpoint: str | None = None
    weights: str = "pretrained"
    label: str | None = None
    max_size: int | None = None   # this model's longest side (default: the model's own, see glimr.extract.multiscale)


@dataclass
class BenchConfig:
    title: str
    output: Path
    datasets: list[DatasetSpec]
    models: list[ModelSpec]
    scales: list[str] = field(default_factory=lambda: ["1"])
    rerank: list[str] = field(default_factory=lambda: ["none"])
    rerank_datasets: dict[str, list[str]] = field(default_factory=dict)  # spec -> the dataset labels it runs on
    cache: Path | None = None
    max_size: int | None = None
    batch_size: int = 16
    workers: int = 2
    device: str = "auto"
    precision: str = "auto"            # auto | fp32 | bf16 (glimr.models.precision)
    grids: bool = True
    grid_queries: int = 6
    grid_topk: int = 8
    source: Path | None = None
    raw: dict = field(default_factory=dict)

    def runs_on(self, rerank: str, label: str) -> bool:
        """Whether the re-ranker ``rerank`` runs on the dataset labelled ``label`` (every one unless limited)."""
        return rerank not in self.rerank_datasets or label in self.rerank_datasets[rerank]


def _as_list(v, what: str) -> list:
    if v is None:
        raise ValueError(f"bench config: '{what}' is required")
    return v if isinstance(v, list) else [v]


def load_config(path: str | os.PathLike, *, output=None, cache=None) -> BenchConfig:
    """Read and check a bench YAML file (see the module doc)."""
    import yaml  # noqa: PLC0415

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise FileNotFoundError(f"bench config {path} not readable ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        raise ValueError(f"bench config {path}: invalid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"bench config {path}: expected a mapping at the top level")
    known = {"title", "output", "cache", "max_size", "batch_size", "workers", "device", "precision", "datasets",
             "models", "scales", "rerank", "plots"}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"bench config {path}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    datasets = []
    for d in _as_list(raw.get("datasets"), "datasets"):
        if isinstance(d, str):
            d = {"name": d}
        if not isinstance(d, dict) or "name" not in d:
            raise ValueError(f"bench config {path}: a dataset is a name/folder or a mapping with 'name' "
                             f"({d!r})")
        bad = set(d) - set(DatasetSpec.__dataclass_fields__)
        if bad:
            raise ValueError(f"bench config {path}: dataset {d['name']}: unknown keys {sorted(bad)}")
        paths = ("name", "root", "distractors", "images")
        d = {k: (str(v) if k in paths and v is not None else v) for k, v in d.items()}
        d["max_size"] = _spec_max_size(path, f"dataset {d['name']}", d.get("max_size"))
        datasets.append(DatasetSpec(**d))
    models = []
    for m in _as_list(raw.get("models", ["gem-lite0"]), "models"):
        if isinstance(m, str):
            m = {"name": m}
        if not isinstance(m, dict) or "name" not in m:
            raise ValueError(f"bench config {path}: a model is a name or a mapping with 'name' ({m!r})")
        bad = set(m) - set(ModelSpec.__dataclass_fields__)
        if bad:
            raise ValueError(f"bench config {path}: model {m['name']}: unknown keys {sorted(bad)}")
        m = {**m, "max_size": _spec_max_size(path, f"model {m['name']}", m.get("max_size"))}
        models.append(ModelSpec(**m))
    scales = [str(s) for s in _as_list(raw.get("scales", ["1"]), "scales")]
    for s in scales:
        parse_scales_arg(s)
    reranks, rerank_datasets = [], {}
    for r in _as_list(raw.get("rerank", ["none"]), "rerank"):
        if isinstance(r, dict):
            if "spec" not in r or set(r) - {"spec", "datasets"}:
                raise ValueError(f"bench config {path}: a re-ranker is a spec or a mapping with 'spec' and "
                                 f"optionally 'datasets' (a list of dataset labels), not {r!r}")
            only = r.get("datasets")
            if only is not None:
                rerank_datasets[str(r["spec"])] = [str(x) for x in _as_list(only, "rerank datasets")]
            r = r["spec"]
        reranks.append(str(r))
        parse_rerank(str(r))
    plots = raw.get("plots") or {}
    if not isinstance(plots, dict):
        raise ValueError(f"bench config {path}: 'plots' must be a mapping, not {plots!r}")  # noqa: TRY004
    precision = str(raw.get("precision", "auto"))
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"bench config {path}: precision must be auto, fp32 or bf16, not {precision!r}")
    try:
        max_size = check_number("max_size", raw.get("max_size"), positive_int, optional=True)
        batch_size = check_number("batch_size", raw.get("batch_size", 16), positive_int)
        workers = check_number("workers", raw.get("workers", 2), nonnegative_int)
        grid_queries = check_number("plots.grid_queries", plots.get("grid_queries", 6), positive_int)
        grid_topk = check_number("plots.grid_topk", plots.get("grid_topk", 8), positive_int)
    except ValueError as e:
        raise ValueError(f"bench config {path}: {e}") from None
    out = output or raw.get("output") or f"bench-results/{path.stem}"
    cache_dir = cache or raw.get("cache")
    return BenchConfig(title=str(raw.get("title") or path.stem), output=Path(out), datasets=datasets,
                       models=models,
                       scales=scales, rerank=reranks, rerank_datasets=rerank_datasets, cache=Path(cache_dir) if cache_dir else None,
                       max_size=max_size, batch_size=batch_size, workers=workers,
                       device=str(raw.get("device", "auto")), precision=precision,
                       grids=bool(plots.get("grids", True)), grid_queries=grid_queries, grid_topk=grid_topk,
                       source=path, raw=raw)


def _spec_max_size(path: Path, what: str, value) -> int | None:
    try:
        return check_number("max_size", value, positive_int, optional=True)
    except ValueError as e:
        raise ValueError(f"bench config {path}: {what}: {e}") from None


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", s).strip("_")


def _git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           timeout=10)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _scales_label(s: str) -> str:
    return {"1": "1", "3": "3 (0.71, 1, 1.41)", "cirtorch3": "3 (0.71, 1, 1.41)", "5": "5 (0.35 .. 1.41)",
            "paper5": "5 (0.35 .. 1.41)", "7": "7 (0.25 .. 2)", "delg7": "7 (0.25 .. 2)"}.get(s, s)


# ------------------------------------------------------------------------------------------ tables
def _dataset_columns(run: dict) -> list[tuple[str | None, str]]:
    """(protocol, metric) columns of one dataset's metrics."""
    m = run["metrics"]
    if all(isinstance(v, dict) for v in m.values()):
        return [(p, k) for p, vals in m.items() for k in vals]
    return [(None, k) for k in m]


def main_columns(runs: list[dict]) -> list[tuple[str, str | None, str, str]]:
    """Main-table columns (dataset label, protocol, metric, header): Revisited Medium then Hard for every
    Revisited dataset (as in Radenovic et al.), then the headline metric of every other dataset."""
    order: list[tuple[str, str]] = []  # (label, kind) in config order
    for r in runs:
        if (r["dataset_label"], r["kind"]) not in order:
            order.append((r["dataset_label"], r["kind"]))
    cols = []
    for proto in ("medium", "hard"):
        for label, kind in order:
            if kind == "revisited":
                cols.append((label, proto, "mAP", f"{label} {PROTOCOL_LABEL[proto]}"))
    for label, kind in order:
        if kind == "ukbench":
            cols.append((label, None, "N-S", f"{label} N-S"))
        elif kind != "revisited":
            cols.append((label, None, "mAP", f"{label} mAP"))
    return cols


def _get(run: dict, proto: str | None, metric: str):
    m = run["metrics"]
    v = m.get(proto, {}) if proto else m
    return v.get(metric) if isinstance(v, dict) else None


def _md_table(header: list[str], rows: list[list[str]], align: list[str]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(a for a in align) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _bold_best(values: list[float | None], fmt: str) -> list[str]:
    shown = [None if v is None else f"{v:{fmt}}" for v in values]
    best = max((v for v in values if v is not None), default=None)
    best_s = None if best is None else f"{best:{fmt}}"
    return ["-" if s is None else (f"**{s}**" if s == best_s and len(values) > 1 else s) for s in shown]


def _cost_lines(runs: list[dict], methods: list[tuple]) -> list[str]:
    """What each method costs: descriptor bytes per image (float32 in the index), extraction images/s on the
    dataset whose extraction took it longest in this run (the most pixels: the most precise timing), else
    the time the cache recorded when it was made, and ranking + re-ranking ms per query on the largest database."""
    rows = []
    for m in methods:
        mine = [r for r in runs if (r["method"]["label"], r["method"]["scales"], r["method"]["rerank"]) == m]
        if not mine:
            continue
        dim = mine[0]["meta"]["dim"]
        timed = [r for r in runs if (r["method"]["label"], r["method"]["scales"]) == m[:2]
                 and r["meta"]["extract_seconds"] > 0]
        fresh = [r for r in timed if not r["meta"].get("descriptors_cached")]
        # the descriptor cache keeps the time its extraction took: shown, marked, when nothing was extracted
        big = max(fresh or timed, key=lambda r: r["meta"]["extract_seconds"], default=None)
        ips = (f"{(big['meta']['n_queries'] + big['meta']['n_db']) / big['meta']['extract_seconds']:.1f} "
               f"({big['dataset_label']}{'' if fresh else ', cached'})" if big else "cached")
        top = max(mine, key=lambda r: r["meta"]["n_db"])
        ms = 1000 * top["meta"]["rank_seconds"] / max(1, top["meta"]["n_queries"])
        rows.append([m[0], _scales_label(m[1]), m[2], str(dim), str(4 * dim), ips,
                     f"{ms:.1f} ({top['dataset_label']})"])
    if not rows:
        return []
    header = ["Method", "Scales", "Re-rank", "dim", "bytes/image", "extraction images/s",
              "ranking + re-rank ms/query"]
    intro = ("Cost: descriptor bytes per image (float32), extraction images/s (queries at their scales and the "
             "database, on the dataset whose extraction took longest; 'cached': the time of the extraction that "
             "made the cache, in an earlier run), ranking and re-ranking ms per query on the largest database. "
             "A re-ranker that works from the images (co-attention, sv) counts in that time its own extraction "
             "of the images it did not have cached, and its fit: an upper bound of its cost per query, not the "
             "cost of a search of an index.")
    return ([intro, ""]
            + _md_table(header, rows, [":--", ":--", ":--", "--:", "--:", "--:", "--:"]) + [""])


def render_markdown(result: dict) -> str:
    """The markdown report (paper layout) from the JSON written by :func:`run_bench`."""
    runs = result["runs"]
    methods: list[tuple] = []
    for r in runs:
        key = (r["method"]["label"], r["method"]["scales"], r["method"]["rerank"])
        if key not in methods:
            methods.append(key)
    by = {(r["method"]["label"], r["method"]["scales"], r["method"]["rerank"], r["dataset_label"]): r
          for r in runs}
    lines = [f"# {result['title']}", ""]
    version = result.get("glimr_version")
    made = [f"glimr {version}"] if version not in (None, "unknown") else []
    made += [f"commit {result['git_commit']}"] if result.get("git_commit") else []
    lines += [f"Made by `{result['command']}` on {result['date']}" + (f" ({', '.join(made)})" if made else "")
              + f"; {result.get('seconds', 0):.0f} s.", ""]
    settings = result["settings"]
    lines += [f"Settings: max image size {settings['max_size']}; descriptors by inner product, full ranking; "
              "metrics in percent (UKBench N-S out of 4). Revisited: Medium (M) and Hard (H) mAP; queries "
              "cropped to their box unless noted.", ""]
    cols = main_columns(runs)
    sizes = {m: "/".join(str(s) for s in sorted({r["meta"]["max_size"] for r in runs
                                                  if (r["method"]["label"], r["method"]["scales"],
                                                      r["method"]["rerank"]) == m}))
             for m in methods}
    by_size = len(set(sizes.values())) > 1  # models run at their own sizes: say which
    header = ["Method", "Scales"] + (["Max size"] if by_size else []) + ["Re-rank"] + [c[3] for c in cols]
    rows = [[m[0], _scales_label(m[1])] + ([sizes[m]] if by_size else []) + [m[2]] for m in methods]
    for c in cols:
        vals = [(_get(by[(m[0], m[1], m[2], c[0])], c[1], c[2]) if (m[0], m[1], m[2], c[0]) in by else None)
                for m in methods]
        for row, cell in zip(rows, _bold_best(vals, ".2f" if c[2] != "N-S" else ".3f")):
            row.append(cell)
    lines += _md_table(header, rows, [":--"] * (4 if by_size else 3) + ["--:"] * len(cols)) + [""]
    lines += _cost_lines(runs, methods)
    # every metric, per dataset
    for label in dict.fromkeys(r["dataset_label"] for r in runs):
        ds_runs = [r for r in runs if r["dataset_label"] == label]
        first = ds_runs[0]
        lines += [f"## {label}: {first['title']}", ""]
        dcols = _dataset_columns(first)
        header = ["Method", "Scales", "Re-rank"] + [
            (f"{PROTOCOL_LABEL.get(p, p)} {k}" if p else k) for p, k in dcols] + ["extract s"]
        rows = []
        for m in methods:
            r = by.get((m[0], m[1], m[2], label))
            if r is None:
                continue
            cells = [m[0], _scales_label(m[1]), m[2]]
            cells += ["-" if _get(r, p, k) is None else f"{_get(r, p, k):{'.3f' if k == 'N-S' else '.2f'}}"
                      for p, k in dcols]
            cached = r["meta"].get("descriptors_cached")
            cells.append("cached" if cached else f"{r['meta']['extract_seconds']:.0f}")
            rows.append(cells)
        lines += _md_table(header, rows, [":--", ":--", ":--"] + ["--:"] * (len(dcols) + 1))
        notes = sorted({n for r in ds_runs for n in r["notes"]})
        meta = first["meta"]
        ds_sizes: dict[int, list[str]] = {}
        for r in ds_runs:
            labels = ds_sizes.setdefault(r["meta"]["max_size"], [])
            if r["method"]["label"] not in labels:
                labels.append(r["method"]["label"])
        size_text = (f"max size {meta['max_size']}" if len(ds_sizes) == 1 else "max size " + "; ".join(
            f"{s}: {', '.join(ls)}" for s, ls in sorted(ds_sizes.items())))
        lines += ["", f"{meta['n_queries']} queries, {meta['n_db']} database images, {size_text}."]
        lines += [f"- note: {n}" for n in notes]
        plots = [p for p in result.get("plots", []) if p.get("dataset") == label]
        for p in plots:
            lines += ["", f"![{p['what']}]({p['file']})"]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------ plots
def _plot_map(runs: list[dict], label: str, out: Path) -> Path:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    ds_runs = [r for r in runs if r["dataset_label"] == label]
    names = [f"{r['method']['label']} s{r['method']['scales']}"
             + (f" +{r['method']['rerank']}" if r["method"]["rerank"] != "none" else "") for r in ds_runs]
    kind = ds_runs[0]["kind"]
    protos = ["easy", "medium", "hard"] if kind == "revisited" else [None]
    key = "N-S" if kind == "ukbench" else "mAP"
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) * len(protos) + 2), 4))
    x = np.arange(len(names))
    width = 0.8 / len(protos)
    for i, p in enumerate(protos):
        vals = [_get(r, p, key) or 0.0 for r in ds_runs]
        bars = ax.bar(x + (i - (len(protos) - 1) / 2) * width, vals, width,
                      label=p.capitalize() if p else key)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(key + (" (out of 4)" if key == "N-S" else " (%)"))
    ax.set_ylim(0, 4.3 if key == "N-S" else 107)
    ax.set_title(f"{label}: {key} per method")
    if len(protos) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _thumb(path, box=None, size: int = 160):
    from glimr.io.images import load_image  # noqa: PLC0415

    if box is not None:
        from glimr.data.revisited import crop_to_box  # noqa: PLC0415

        img = crop_to_box(load_image(path), box)
    else:
        img = load_image(path, target_size=size)
    img.thumbnail((size, size))
    return np.asarray(img)


def plot_ranked_grid(evalset: EvalSet, queries: list[int], top: np.ndarray, title: str, out: Path,
                     size: int = 140) -> Path:
    """Rows: queries (cropped as evaluated) then their top-k results; green = correct, red = wrong,
    grey = ignored (junk). ``top``: [k, len(queries)] database indices."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    k = top.shape[0]
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(1.25 * (k + 1), 1.35 * len(queries) + 0.5),
                             squeeze=False)
    for row, q in enumerate(queries):
        pos, ign = evalset.relevant(q)
        box = evalset.query_boxes[q] if evalset.query_boxes else None
        cells = [(evalset.query_paths[q], box, "#1f4e9c", "query")]
        for j in range(k):
            d = int(top[j, row])
            color = "#1a9e3a" if d in pos else ("#9a9a9a" if d in ign else "#d62020")
            cells.append((evalset.db_paths[d], None, color, str(j + 1)))
        for col, (p, b, color, name) in enumerate(cells):
            ax = axes[row, col]
            try:
                ax.imshow(_thumb(p, b, size))
            except Exception:  # noqa: BLE001 - an unreadable image still gets its cell
                ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=6)
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_edgecolor(color)
                s.set_linewidth(3.5)
            if row == 0:
                ax.set_title(name, fontsize=8)
    fig.suptitle(f"{title}\ngreen: correct, red: wrong, grey: ignored (junk)", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    # photos: JPEG keeps committed result grids small
    fig.savefig(out, dpi=100, **({"pil_kwargs": {"quality": 85}} if out.suffix == ".jpg" else {}))
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------ running
def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def run_bench(config: BenchConfig | str | os.PathLike, *, command: str | None = None, plots: bool = True,
              progress: bool = True, quiet: bool = False) -> dict:
    """Run the grid and write ``results.md``, ``results.json`` and ``plots/`` under ``config.output``.
    Returns the JSON document."""
    if not isinstance(config, BenchConfig):
        config = load_config(config)
    command = command or f"glimr bench {config.source}"
    out = config.output
    # resolve every dataset before any model work: missing data fails fast
    sets: list[tuple[DatasetSpec, EvalSet, str]] = []
    for d in config.datasets:
        es = load_eval_set(d.name, root=d.root, crop=d.crop, distractors=d.distractors, images=d.images)
        sets.append((d, es, d.label or es.name))
    labels = [s[2] for s in sets]
    if len(set(labels)) != len(labels):
        raise ValueError(f"bench config: dataset labels must differ ({labels}); set 'label' for each")
    for rr, only in config.rerank_datasets.items():
        if set(only) - set(labels):
            raise ValueError(f"bench config: re-ranker {rr!r} names dataset(s) {sorted(set(only) - set(labels))}, "
                             f"which are not among the datasets' labels {labels}")
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    grid_data: list[tuple] = []
    t_start = time.perf_counter()
    n_total = len(config.models) * len(config.scales) * sum(
        config.runs_on(rr, s[2]) for s in sets for rr in config.rerank)
    n_done = 0
    for mspec in config.models:
        _log(f"[bench] building {mspec.name}" + (f" from {mspec.checkpoint}" if mspec.checkpoint else ""),
             quiet)
        net = build_net(mspec.name, mspec.checkpoint, mspec.weights, config.device)
        model_name = getattr(net, "name", None) or mspec.name
        mlabel = mspec.label or model_name
        model_id = model_identity(net, model_name, mspec.checkpoint)
        # the model's recommended query scales (its checkpoint config), as `glimr eval` uses them
        rec_q = (getattr(net, "config", None) or {}).get("query_scales")
        for scales in config.scales:
            sc = parse_scales_arg(scales)
            qsc = parse_scales_arg(rec_q) if rec_q else sc
            for dspec, es, dlabel in sets:
                max_size = int(dspec.max_size or mspec.max_size or config.max_size or es.max_size_for(net))
                desc = extract_descriptors(net, es, scales=sc, max_size=max_size,
                                           batch_size=config.batch_size, workers=config.workers,
                                           progress=progress, cache_dir=config.cache, model_id=model_id,
                                           query_scales=qsc, precision=config.precision)
                for rr in config.rerank:
                    if not config.runs_on(rr, dlabel):
                        continue
                    t0 = time.perf_counter()
                    metrics, notes, ranks = score_descriptors(es, desc, rr, cache_dir=config.cache, progress=progress,
                                                              net=net, max_size=max_size,
                                                              precision=config.precision)
                    n_done += 1
                    run = {
                        "method": {"model": model_name, "checkpoint": mspec.checkpoint, "label": mlabel,
                                   "scales": scales, "scale_values": list(sc), "query_scales": list(qsc),
                                   "rerank": rr},
                        "dataset": es.name, "dataset_label": dlabel, "title": es.title, "kind": es.kind,
                        "metrics": metrics, "notes": list(es.notes) + notes,
                        "meta": {"n_queries": len(es.query_paths), "n_db": len(es.db_paths),
                                 "max_size": max_size,
                                 "crop": es.crop, "dim": int(desc.db.shape[1]),
                                 "extract_seconds": round(desc.seconds, 2), "descriptors_cached": desc.cached,
                                 "rank_seconds": round(time.perf_counter() - t0, 3),
                                 "db_errors": len(desc.db_errors)},
                    }
                    runs.append(run)
                    head = _get(run, "medium", "mAP") if es.kind == "revisited" else (
                        _get(run, None, "N-S") if es.kind == "ukbench" else _get(run, None, "mAP"))
                    what = {"revisited": "M mAP", "ukbench": "N-S"}.get(es.kind, "mAP")
                    _log(f"[bench {n_done}/{n_total}] {mlabel} scales {scales} rerank {rr} on {dlabel}: "
                         f"{what} {head:.2f}" + (" (cached descriptors)" if desc.cached else ""), quiet)
                    if plots and config.grids:
                        nq = len(es.query_paths)
                        qs = np.linspace(0, nq - 1, min(config.grid_queries, nq)).astype(int)
                        qs = sorted(set(qs.tolist()))
                        k = min(config.grid_topk, ranks.shape[0])
                        grid_data.append((es, dlabel, run, qs, ranks[:k, qs].copy()))
                    del ranks
        del net
    result = {
        "title": config.title, "command": command,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "glimr_version": _version(), "git_commit": _git_commit(),
        "settings": {"max_size": config.max_size or "per dataset (Revisited/Oxford 1024), else per model (its "
                                                "config's max_size, else 512)",
                     "scales": config.scales, "rerank": config.rerank, "cache": str(config.cache)
                     if config.cache else None, "batch_size": config.batch_size},
        "config": config.raw, "runs": runs, "plots": [],
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    if plots:
        pdir = out / "plots"
        for label in labels:
            f = _plot_map(runs, label, pdir / f"map_{_slug(label)}.png")
            result["plots"].append({"dataset": label, "what": f"{label}: mAP per method",
                                    "file": str(f.relative_to(out))})
        for es, dlabel, run, qs, top in grid_data:
            m = run["method"]
            name = f"{m['label']} s{m['scales']}" + (f" +{m['rerank']}" if m["rerank"] != "none" else "")
            f = plot_ranked_grid(es, qs, top, f"{dlabel}: {name}, top {top.shape[0]}",
                                 pdir / f"grid_{_slug(dlabel)}__{_slug(name)}.jpg")
            result["plots"].append({"dataset": dlabel, "what": f"{dlabel}: ranked results of {name}",
                                    "file": str(f.relative_to(out))})
    atomic_write_bytes(out / "results.json", (json.dumps(result, indent=2) + "\n").encode())
    atomic_write_bytes(out / "results.md", render_markdown(result).encode())
    _log(f"[bench] wrote {out / 'results.md'}, {out / 'results.json'}"
         + (f" and {len(result['plots'])} plots in {out / 'plots'}" if plots else ""), quiet)
    return result


def _version() -> str:
    try:
        from importlib.metadata import version  # noqa: PLC0415

        return version("glimr")
    except Exception:  # noqa: BLE001
        import glimr  # noqa: PLC0415

        return getattr(glimr, "__version__", "unknown")

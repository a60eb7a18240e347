"""Checkpoints: `NAME.safetensors` (tensors only: nothing executable) + `NAME.json` (config).

A net with a PCA-whitening stage (`net.pcaw`, glimr/models/whiten.py) saves its buffers as `pcaw.mean`
and `pcaw.proj` and records `"pca_whiten": {"dim", "in_dim", "shrink", "source"}` in the config; loading
rebuilds the stage from that record. A config may also carry `"query_scales"`, the model's recommended
query scale pyramid (used by `glimr eval` and `glimr search` by default), and `"max_size"`, the longest image
side it runs at unless told otherwise (the size its whitening was fitted at; glimr.extract.multiscale
`model_max_size`); both are kept in `net.config`."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from glimr.io.atomic import atomic_write_bytes

SUFFIXES = (".safetensors", ".json")


class CheckpointError(RuntimeError):
    pass


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(NAME.safetensors, NAME.json) of a checkpoint given as NAME.safetensors, NAME.json or NAME.

    Only a final ``.safetensors`` / ``.json`` is taken off, and the suffixes are appended to the whole name:
    ``ck/model.v2.safetensors`` -> ``ck/model.v2.safetensors`` + ``ck/model.v2.json`` (``Path.with_suffix``
    would turn ``model.v2`` into ``model.safetensors``, another checkpoint)."""
    p = Path(path)
    if p.name in SUFFIXES or p.name in ("", ".", ".."):
        raise CheckpointError(f"'{path}' is not a checkpoint name: give NAME.safetensors")
    if p.suffix in SUFFIXES:
        p = p.with_name(p.name[:-len(p.suffix)])
    if not p.name:
        raise CheckpointError(f"'{path}' is not a checkpoint name: give NAME.safetensors")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def config_path(path: str | Path) -> Path:
    """The JSON sidecar of a checkpoint: ``model.v2.safetensors`` -> ``model.v2.json``."""
    return checkpoint_paths(path)[1]


_paths = checkpoint_paths


def _bad(js: Path, what: str) -> CheckpointError:
    return CheckpointError(f"'{js}' is not a valid glimr checkpoint config: {what}; re-export the checkpoint "
                           "(`glimr train` / `glimr whiten` write NAME.safetensors + NAME.json) or fix the file")


def read_config(js: str | Path) -> dict:
    """The checkpoint config ``js``, checked: a JSON object with a string ``name``, an object ``head_kwargs``,
    and well-formed ``partial``, ``pca_whiten``, ``query_scales`` and ``max_size`` records where present; a
    :class:`CheckpointError` naming the file and the faulty key otherwise."""
    js = Path(js)
    try:
        text = js.read_bytes().decode("utf-8")
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint config '{js}': {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise _bad(js, f"not UTF-8 text ({e.reason} at byte {e.start})") from e
    try:
        cfg = json.loads(text)
    except ValueError as e:
        raise _bad(js, f"not JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise _bad(js, f"the top level is a JSON {type(cfg).__name__}, not an object")
    if not isinstance(cfg.get("name"), str) or not cfg["name"]:
        raise _bad(js, "it needs a 'name' string (the architecture, e.g. \"cider-lite0\")"
                   if "name" not in cfg else f"'name' must be a non-empty string, not {cfg['name']!r}")
    if not isinstance(cfg.get("head_kwargs", {}), dict):
        raise _bad(js, f"'head_kwargs' must be an object, not {cfg['head_kwargs']!r}")
    partial = cfg.get("partial")
    if partial is not None:
        if (not isinstance(partial, dict) or not isinstance(partial.get("prefixes"), list)
                or not all(isinstance(x, str) and x for x in partial["prefixes"])):
            raise _bad(js, f"'partial' must be an object with 'prefixes' (a list of strings), not {partial!r}")
        if partial.get("base_weights", "pretrained") not in ("pretrained", "none"):
            raise _bad(js, f"'partial.base_weights' must be \"pretrained\" or \"none\", "
                       f"not {partial['base_weights']!r}")
    pw = cfg.get("pca_whiten")
    if pw is not None and (not isinstance(pw, dict) or not all(_is_pos_int(pw.get(k)) for k in ("in_dim", "dim"))):
        raise _bad(js, f"'pca_whiten' must be an object with positive integers 'in_dim' and 'dim', not {pw!r}")
    qs = cfg.get("query_scales")
    if qs is not None and (not isinstance(qs, list) or not qs
                           or not all(_is_number(x) and 0 < x and math.isfinite(x) for x in qs)):
        raise _bad(js, f"'query_scales' must be a non-empty list of positive numbers, not {qs!r}")
    ms = cfg.get("max_size")
    from glimr.extract.multiscale import MAX_SIDE  # noqa: PLC0415 (extraction imports the model modules)

    if ms is not None and not (_is_pos_int(ms) and ms <= MAX_SIDE):
        raise _bad(js, f"'max_size' must be a whole number of pixels from 1 to {MAX_SIDE}, not {ms!r}")
    return cfg


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _is_pos_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def save_model(model, path: str | Path, extra: dict | None = None, prefixes=None) -> Path:
    """Write weights + config atomically (temporary files, then rename).

    `prefixes` (e.g. ["head."]): save only the state-dict entries under these prefixes, a "partial"
    checkpoint of the trained parts; loading rebuilds the rest from the packaged pretrained weights
    (the config records `"partial": {"prefixes": [...], "base_weights": "pretrained"}`). A PCA-whitening
    stage (`model.pcaw`) is always saved: "pcaw." is added to `prefixes` when it is not there."""
    st, js = checkpoint_paths(path)
    pcaw = getattr(model, "pcaw", None)
    if prefixes is not None:
        prefixes = list(prefixes)
        if pcaw is not None and "pcaw." not in prefixes:
            prefixes.append("pcaw.")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if prefixes is None or k.startswith(tuple(prefixes))}
    atomic_write_bytes(st, safetensors_bytes(state))
    cfg = dict(model.config)
    cfg.pop("partial", None)
    cfg.pop("pca_whiten", None)
    if pcaw is not None:
        cfg["pca_whiten"] = {**model.config.get("pca_whiten", {}), "dim": pcaw.dim, "in_dim": pcaw.in_dim}
    cfg.update(extra or {})
    if prefixes is not None:
        cfg["partial"] = {"prefixes": list(prefixes), "base_weights": "pretrained"}
    atomic_write_bytes(js, json.dumps(cfg, indent=2, sort_keys=True).encode())
    return st


def load_model(path: str | Path, map_location: str = "cpu"):
    from glimr.models.registry import build_model

    st, js = checkpoint_paths(path)
    for p in (st, js):
        if not p.is_file():
            raise CheckpointError(f"checkpoint file '{p}' not found: a checkpoint is NAME.safetensors + NAME.json "
                                  "as written by `glimr train`")
    cfg = read_config(js)
    name = cfg["name"]
    partial = cfg.get("partial")
    base = partial.get("base_weights", "pretrained") if partial else "none"
    try:
        model = build_model(name, warn_untrained=False, weights=base, **cfg.get("head_kwargs", {}))
    except (ValueError, TypeError) as e:   # unknown architecture, head arguments it does not take
        raise _bad(js, f"cannot build {name!r} with head_kwargs {cfg.get('head_kwargs', {})!r}: {e}") from e
    pw = cfg.get("pca_whiten")
    if pw is not None:  # rebuild the whitening stage first: its buffers are in the state dict
        from glimr.models.whiten import PCAWhitening

        try:
            model.pcaw = PCAWhitening(int(pw["in_dim"]), int(pw["dim"]))
        except (TypeError, KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"'{js}': bad 'pca_whiten' record {pw!r} (needs in_dim and dim): {e}") from e
    try:
        state = load_file(str(st), device=map_location)
    except Exception as e:
        raise CheckpointError(f"cannot read '{st}': {e}; re-export the checkpoint") from e
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"'{st}' does not fit model {name} as its config '{js}' describes it: {e}") from e
    if partial:  # only the saved prefixes must be complete
        missing = [k for k in missing if k.startswith(tuple(partial["prefixes"]))]
    if pw is not None:  # the whitening is never rebuilt from pretrained weights: it must be in the file
        missing += [k for k in ("pcaw.mean", "pcaw.proj") if k not in state and k not in missing]
    if missing or unexpected:
        raise CheckpointError(f"'{st}' does not fit model {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.config.update({k: v for k, v in cfg.items() if k not in ("name", "head_kwargs")})
    return model.eval()


def torch_load_trusted(path: str | Path):
    """The only torch.load in glimr: tensors only (weights_only=True)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def model_fingerprint(model) -> str:
    """SHA-256 of a net's parameters and buffers (names, shapes, dtypes and bytes): equal wherever the same
    weights were built (the Ray driver and its workers), different for any other weights (caches of features
    keyed by a model use it: glimr/rerank/coattention.py)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().to("cpu").reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

"""Checkpoints: `NAME.safetensors` (tensors only: nothing executable) + `NAME.json` (config).

A net with a PCA-whitening stage (`net.pcaw`, glimr/models/whiten.py) saves its buffers as `pcaw.mean`
and `pcaw.proj` and records `"pca_whiten": {"dim", "in_dim", "shrink", "source"}` in the config; loading
rebuilds the stage from that record. A config may also carry `"query_scales"`, the model's recommended
query scale pyramid (used by `glimr eval` and `glimr search` by default); it is kept in `net.config`."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    pass


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_suffix(".safetensors"), p.with_suffix(".json")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model(model, path: str | Path, extra: dict | None = None, prefixes=None) -> Path:
    """Write weights + config atomically (temporary files, then rename).

    `prefixes` (e.g. ["head."]): save only the state-dict entries under these prefixes, a "partial"
    checkpoint of the trained parts; loading rebuilds the rest from the packaged pretrained weights
    (the config records `"partial": {"prefixes": [...], "base_weights": "pretrained"}`). A PCA-whitening
    stage (`model.pcaw`) is always saved: "pcaw." is added to `prefixes` when it is not there."""
    st, js = _paths(path)
    pcaw = getattr(model, "pcaw", None)
    if prefixes is not None:
        prefixes = list(prefixes)
        if pcaw is not None and "pcaw." not in prefixes:
            prefixes.append("pcaw.")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if prefixes is None or k.startswith(tuple(prefixes))}
    st.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=st.parent, prefix=f".{st.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp)
        os.replace(tmp, st)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
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

    st, js = _paths(path)
    for p in (st, js):
        if not p.is_file():
            raise CheckpointError(f"checkpoint file '{p}' not found: a checkpoint is NAME.safetensors + NAME.json "
                                  "as written by `glimr train`")
    try:
        cfg = json.loads(js.read_text())
        name = cfg["name"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"'{js}' is not a glimr checkpoint config (needs a 'name' key): {e}") from e
    partial = cfg.get("partial")
    base = partial.get("base_weights", "pretrained") if partial else "none"
    model = build_model(name, warn_untrained=False, weights=base, **cfg.get("head_kwargs", {}))
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

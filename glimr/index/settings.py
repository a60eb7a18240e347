"""An index's own settings (FAISS structure, chunking, co-attention records) and what index.json holds.

``index.json`` (format 2)::

    {"version": 2, "root": "/abs/images", "extract": ExtractSettings.to_json(), "index": IndexSettings.to_json()}

Both settings objects validate when built and when loaded back, so a hand-edited index.json with a bad value
is reported by name. Format 1 files (flat: model, dim, scales, max_size, checkpoint, factory, root) still load
when they record no checkpoint (no hash to check it against: those are refused with "rebuild").
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

import numpy as np

from glimr.config import whole_number
from glimr.extract.multiscale import ExtractSettings

FORMAT_VERSION = 2
MAX_CHUNK = 1_000_000
MAX_DIM = 65536
_FACTORY_CHARS = re.compile(r"[A-Za-z0-9_,.\-]{1,200}")


def check_factory(dim: int, factory: str) -> None:
    """Build the FAISS structure ``factory`` for ``dim`` on a tiny dummy set (add + search when it needs no
    training): ValueError with FAISS's reason if it cannot be made."""
    if factory == "auto":  # glimr.index.ann.auto_factory: chosen from the index's size when it is built
        return
    if not isinstance(factory, str) or not _FACTORY_CHARS.fullmatch(factory):
        raise ValueError(f"bad FAISS factory string {factory!r} (--factory): use auto, Flat, HNSW32, IVF1024,Flat, "
                         "PCA128,Flat (letters, digits and , _ . - only)")
    import faiss

    try:
        base = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
        if base.is_trained:
            x = np.random.default_rng(0).standard_normal((4, dim)).astype(np.float32)
            ix = faiss.IndexIDMap2(base)
            ix.add_with_ids(x, np.arange(4, dtype=np.int64))
            ix.search(x[:1], 2)
    except RuntimeError as e:
        reason = re.sub(r"^Error in .*? at \S+:\d+: ", "", str(e).strip().splitlines()[-1])[:300]
        raise ValueError(f"bad FAISS factory string {factory!r} (--factory) for dimension {dim}: {reason}") from None


@dataclass(frozen=True)
class IndexSettings:
    """dim: the descriptors' dimension; factory: FAISS index factory string (tried on a dummy index when the
    settings are built), or "auto": the structure glimr.index.ann.auto_factory picks for the index's size; chunk_size: images embedded and committed per transaction; coattention:
    ``{"config": LocalConfig json, "record_bytes": n}`` for indexes with co-attention records, else None."""

    dim: int
    factory: str = "auto"
    chunk_size: int = 256
    coattention: dict | None = None

    def __post_init__(self):
        object.__setattr__(self, "dim", whole_number("dim", self.dim, 1, MAX_DIM))
        object.__setattr__(self, "chunk_size", whole_number("chunk_size (--chunk-size)", self.chunk_size, 1, MAX_CHUNK))
        check_factory(self.dim, self.factory)
        ca = self.coattention
        if ca is not None:
            from glimr.extract.local import LocalConfig

            if not isinstance(ca, dict) or set(ca) != {"config", "record_bytes"}:
                raise ValueError(f"coattention must be {{'config': ..., 'record_bytes': ...}}, got {ca!r}")
            try:
                cfg = LocalConfig.from_json(ca["config"])
                nbytes = cfg.codec().nbytes
            except (TypeError, KeyError, AttributeError, ValueError) as e:
                raise ValueError(f"bad co-attention settings {ca['config']!r}: {e}") from None
            if ca["record_bytes"] != nbytes:
                raise ValueError(f"co-attention record_bytes {ca['record_bytes']!r} does not match its settings "
                                 f"({nbytes} bytes)")

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, d: dict) -> IndexSettings:
        from glimr.config import settings_from_json

        return settings_from_json(cls, d, "index settings")


@dataclass(frozen=True)
class IndexConfig:
    """What index.json holds: the extraction settings, the index settings and the image root."""

    extract: ExtractSettings
    index: IndexSettings
    root: str | None = None  # image folder the relative paths refer to
    version: int = FORMAT_VERSION

    def __post_init__(self):
        if not isinstance(self.extract, ExtractSettings) or not isinstance(self.index, IndexSettings):
            raise TypeError("IndexConfig(extract=ExtractSettings, index=IndexSettings)")
        if self.root is not None and not isinstance(self.root, str):
            raise ValueError(f"root must be a folder path, got {self.root!r}")

    # the names the rest of glimr reads
    model = property(lambda self: self.extract.model)
    checkpoint = property(lambda self: self.extract.checkpoint)
    scales = property(lambda self: self.extract.scales)
    max_size = property(lambda self: self.extract.max_size)
    dim = property(lambda self: self.index.dim)
    factory = property(lambda self: self.index.factory)
    coattention = property(lambda self: self.index.coattention)

    def to_json(self) -> dict:
        return {"version": FORMAT_VERSION, "root": self.root, "extract": self.extract.to_json(),
                "index": self.index.to_json()}

    @classmethod
    def from_json(cls, d) -> IndexConfig:
        """ValueError naming what is wrong (and, for old files that cannot be trusted, to rebuild)."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")  # noqa: TRY004
        version = d.get("version", 1)
        if version == 1:
            if d.get("checkpoint"):
                raise ValueError("this index was built before glimr recorded its checkpoint's sha256, so it "
                                 "cannot check that the checkpoint is unchanged; rebuild it into a new folder")
            ex = ExtractSettings(model=d.get("model"), scales=tuple(d.get("scales", (1.0,))),
                                 max_size=d.get("max_size", 512))
            ix = IndexSettings(dim=d.get("dim"), factory=d.get("factory", "Flat"),
                               coattention=d.get("coattention"))
            return cls(ex, ix, root=d.get("root"))
        if version != FORMAT_VERSION:
            raise ValueError(f"unknown index format version {version!r} (this glimr reads 1 and {FORMAT_VERSION}); "
                             "rebuild the index with this version")
        unknown = set(d) - {"version", "root", "extract", "index"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        if "extract" not in d or "index" not in d:
            raise ValueError("'extract' and 'index' settings are missing")
        return cls(ExtractSettings.from_json(d["extract"]), IndexSettings.from_json(d["index"]), root=d.get("root"))

    def same_descriptors(self, other: IndexConfig) -> bool:
        return self.extract.same_descriptors(other.extract) and self.dim == other.dim


def finite_in(name: str, v, lo: float, hi: float) -> float:
    """A float in [lo, hi] (finite), else ValueError naming the setting."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number from {lo:g} to {hi:g}, got {v!r}") from None
    if not (math.isfinite(f) and lo <= f <= hi):
        raise ValueError(f"{name} must be a finite number from {lo:g} to {hi:g}, got {v!r}")
    return f

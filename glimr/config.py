"""Settings shared by every stage: validated numbers for command-line arguments and config values.

argparse ``type=`` functions (each checks one argument before any work or write, and its error names the
value and the allowed range; argparse prints it with the option's name and exits with status 2)::

    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--workers", type=nonnegative_int, default=None)
    p.add_argument("--alpha", type=finite_float, default=3.0)
    p.add_argument("--shrink", type=float_in(0.0, 1.0), default=0.0)

:func:`check_number` does the same for values read from a config file or a ``key=value`` override.
"""
from __future__ import annotations

import argparse
import math
import numbers

__all__ = ["check_number", "finite_float", "float_in", "int_in", "nonnegative_float", "nonnegative_int",
           "positive_float", "positive_int", "settings_from_json"]


def _int(text) -> int:
    if isinstance(text, bool):
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    if isinstance(text, int):
        return text
    try:
        return int(str(text).strip(), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float(text) -> float:
    if isinstance(text, bool):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def int_in(lo: int | None = None, hi: int | None = None):
    """An argparse type: an integer in [lo, hi] (None: unbounded on that side)."""
    def parse(text) -> int:
        v = _int(text)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range: {_range(lo, hi, 'an integer')}")
        return v
    parse.__name__ = f"int_in_{lo}_{hi}"
    return parse


def float_in(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    """An argparse type: a finite number in [lo, hi] (``lo_open``/``hi_open``: exclude the bound)."""
    def parse(text) -> float:
        v = _float(text)
        bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
        bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
        if bad_lo or bad_hi:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: "
                                             f"{_range(lo, hi, 'a finite number', lo_open, hi_open)}")
        return v
    parse.__name__ = f"float_in_{lo}_{hi}"
    return parse


def _range(lo, hi, what: str, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"use {what} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"use {what} {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"use {what} {'<' if hi_open else '<='} {hi}"
    return f"use {what}"


positive_int = int_in(1)
positive_int.__name__ = "positive_int"
nonnegative_int = int_in(0)
nonnegative_int.__name__ = "nonnegative_int"
finite_float = float_in()
finite_float.__name__ = "finite_float"
positive_float = float_in(0.0, lo_open=True)
positive_float.__name__ = "positive_float"
nonnegative_float = float_in(0.0)
nonnegative_float.__name__ = "nonnegative_float"


def check_number(name: str, value, kind, *, optional: bool = False) -> int | float | None:
    """``kind`` (one of the types above) applied to a config value ``name``: the value, or a ValueError that
    names the key (``None`` passes when ``optional``)."""
    if value is None and optional:
        return None
    try:
        return kind(value)
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"{name}: {e}") from None


def whole_number(name: str, v, lo: int, hi: int, none_ok: bool = False) -> int | None:
    """A settings dataclass's integer field ``name``: ``v`` as an int in [lo, hi] (an integral float passes),
    None when ``none_ok``; else a ValueError naming the field."""
    if v is None and none_ok:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise ValueError(f"{name} must be a whole number from {lo} to {hi}, got {v!r}")
    v = int(v)
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be from {lo} to {hi}, got {v}")
    return v


def settings_from_json(cls, d, what: str):
    """A settings dataclass ``cls`` from a JSON object ``d`` (e.g. a section of index.json): unknown keys and
    bad types are a ValueError naming ``what``; the values are validated by ``cls`` itself."""
    import dataclasses

    if not isinstance(d, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(d).__name__}")  # noqa: TRY004
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what} {sorted(unknown)}")
    try:
        return cls(**d)
    except TypeError as e:
        raise ValueError(f"bad {what}: {e}") from None

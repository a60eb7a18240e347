"""glimr.config: argparse types and config checks for numbers (finite, in range), property-based."""
from __future__ import annotations

import argparse
import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from glimr.config import (
    check_number,
    finite_float,
    float_in,
    int_in,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)


@pytest.mark.parametrize(("kind", "text", "value"), [
    (positive_int, "3", 3), (positive_int, " 16 ", 16), (nonnegative_int, "0", 0), (finite_float, "-2.5", -2.5),
    (positive_float, "1e-3", 1e-3), (nonnegative_float, "0", 0.0), (float_in(0, 1), "1", 1.0),
    (int_in(16, 4096), "4096", 4096),
])
def test_good_values_parse(kind, text, value):
    assert kind(text) == value and type(kind(text)) is type(value)


@pytest.mark.parametrize(("kind", "text", "what"), [
    (positive_int, "0", "out of range: use an integer >= 1"), (positive_int, "-4", "out of range"),
    (positive_int, "2.5", "not an integer"), (positive_int, "abc", "not an integer"), (positive_int, "", "not an"),
    (nonnegative_int, "-1", "use an integer >= 0"), (finite_float, "nan", "not a finite number"),
    (finite_float, "inf", "not a finite number"), (finite_float, "-Infinity", "not a finite"),
    (positive_float, "0", "use a finite number > 0"), (positive_float, "1e999", "not a finite number"),
    (float_in(0, 1, hi_open=True), "1", "in [0, 1)"), (int_in(16, 4096), "8", "in [16, 4096]"),
])
def test_bad_values_say_what_is_allowed(kind, text, what):
    with pytest.raises(argparse.ArgumentTypeError, match=r".*") as e:
        kind(text)
    assert what in str(e.value)


def test_argparse_reports_the_option_and_exits_2(capsys):
    p = argparse.ArgumentParser(prog="glimr x")
    p.add_argument("--batch-size", type=positive_int, default=16)
    assert p.parse_args(["--batch-size", "8"]).batch_size == 8
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--batch-size", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --batch-size: 0 is out of range: use an integer >= 1" in err and "Traceback" not in err


def test_check_number_names_the_key():
    assert check_number("optim.lr", 1, positive_float) == 1.0
    assert check_number("optim.max_steps", None, positive_int, optional=True) is None
    for bad in (None, True, "x", float("nan"), -1):
        with pytest.raises(ValueError, match=r"^optim\.lr: "):
            check_number("optim.lr", bad, positive_float)


KINDS = [(positive_int, lambda v: isinstance(v, int) and v >= 1), (nonnegative_int, lambda v: v >= 0),
         (finite_float, math.isfinite), (positive_float, lambda v: math.isfinite(v) and v > 0),
         (float_in(0.0, 1.0), lambda v: 0 <= v <= 1)]


@given(text=st.text(max_size=12) | st.floats().map(str) | st.integers().map(str), i=st.integers(0, len(KINDS) - 1))
@example(text="-0", i=0)
@example(text="00", i=0)
@example(text="1e400", i=3)
@example(text="-nan", i=2)
def test_any_text_is_a_valid_value_or_an_argument_error(text, i):
    kind, ok = KINDS[i]
    try:
        v = kind(text)
    except argparse.ArgumentTypeError as e:
        assert repr(text) in str(e) or "is out of range: use" in str(e)     # names the text, or the range
        return
    assert ok(v)

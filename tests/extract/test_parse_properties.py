"""Property-based tests of the command-line parsers of glimr.extract.multiscale: crop boxes and scale lists.
Any text gives either a valid value or a ValueError (the CLI's one-line error), never another exception."""
from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from glimr.extract.multiscale import MAX_SCALE, SCALE_SETS, crop_box, parse_box, parse_scales
from glimr.io.images import ImageError

NUMBER = (st.floats(allow_nan=True, allow_infinity=True).map(repr) | st.integers(-10**6, 10**6).map(str)
          | st.sampled_from(["", " ", "1e3", "-0", "0x10", "1_0", "nan", "inf", "1,5", "abc"]))
BOX_TEXT = st.lists(NUMBER, min_size=0, max_size=6).map(",".join) | st.text(max_size=20)


@given(spec=BOX_TEXT)
def test_any_box_text_is_a_box_or_a_value_error(spec):
    try:
        box = parse_box(spec)
    except ValueError as e:
        assert repr(spec) in str(e)
        return
    assert len(box) == 4 and all(isinstance(v, float) for v in box)
    assert box[2] > box[0] and box[3] > box[1]


FINITE = st.floats(-5000, 5000, allow_nan=False)


@given(x0=FINITE, y0=FINITE, w=st.floats(0.01, 5000), h=st.floats(0.01, 5000))
def test_a_finite_box_crops_a_real_sized_image_or_says_it_lies_outside(x0, y0, w, h):
    img = Image.new("RGB", (64, 48))
    box = parse_box(f"{x0!r},{y0!r},{x0 + w!r},{y0 + h!r}")
    try:
        out = crop_box(img, box, "q.jpg")
    except ImageError as e:
        assert "q.jpg" in str(e) and "outside" in str(e)
        return
    assert 1 <= out.width <= 64 and 1 <= out.height <= 48


SCALE_TEXT = (st.lists(NUMBER, min_size=0, max_size=5).map(",".join) | st.text(max_size=16)
              | st.sampled_from(sorted(SCALE_SETS)))


@given(spec=SCALE_TEXT)
def test_any_scale_text_is_positive_finite_scales_or_a_value_error(spec):
    try:
        scales = parse_scales(spec)
    except ValueError as e:
        assert "bad scales" in str(e)
        return
    assert len(scales) >= 1 and all(isinstance(s, float) and s > 0 and math.isfinite(s) for s in scales)


@given(seq=st.lists(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-3, 3), max_size=4))
def test_a_sequence_of_numbers_is_checked_the_same_way(seq):
    try:
        scales = parse_scales(seq)
    except ValueError:
        assert not seq or any(not (0 < s <= MAX_SCALE and math.isfinite(s)) for s in seq)
        return
    assert scales == tuple(float(s) for s in seq) and all(s <= MAX_SCALE for s in scales)


@pytest.mark.parametrize("name", sorted(SCALE_SETS))
def test_the_named_scale_sets_parse(name):
    assert parse_scales(name) == SCALE_SETS[name] and parse_scales(f" {name} ") == SCALE_SETS[name]

"""Random and mutated image bytes through the loader: a valid 3-channel array
or the documented error, nothing else (no decoder internals, no crash)."""

import io
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sktransfer import ImageInputError, Preprocessing
from sktransfer._images import open_image
from sktransfer._inputs import read_item

PREP = Preprocessing(64, 56, "bilinear", (0.5,) * 3, (0.5,) * 3)
DOCUMENTED = (ImageInputError, ValueError, OSError)


def _encoded(fmt, **options):
    x = np.linspace(0, 255, 48)[None, :].repeat(32, 0)
    y = np.linspace(0, 255, 32)[:, None].repeat(48, 1)
    image = Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


SEEDS = [
    _encoded("JPEG"), _encoded("JPEG", progressive=True), _encoded("PNG"), _encoded("GIF"),
    _encoded("BMP"), _encoded("TIFF"), _encoded("WEBP"),
]


def _load(data):
    """What extract_features does with one encoded item, up to the pixel array."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning for mutated sizes
        try:
            _, payload = read_item(data)
            array = PREP.to_array(open_image(payload, min_size=PREP.resize_size))
        except DOCUMENTED:
            return None
    assert isinstance(array, np.ndarray)
    assert array.shape == (56, 56, 3) and array.dtype == np.uint8
    return array


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[max(1, at):]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            chunk = draw(st.binary(min_size=1, max_size=64))
            data[at:at + len(chunk)] = chunk
    return bytes(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_image_bytes_give_an_image_or_the_documented_error(data):
    _load(data)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=2048))
def test_random_bytes_give_the_documented_error(data):
    _load(data)


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(SEEDS), st.binary(min_size=1, max_size=512))
def test_real_header_with_random_body(seed, body):
    _load(seed[:32] + body)


@pytest.mark.parametrize("index", range(len(SEEDS)))
def test_unmutated_seeds_decode(index):
    assert _load(SEEDS[index]) is not None  # the fuzzer starts from valid images

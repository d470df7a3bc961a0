"""Shared sample inputs: real photographs from scikit-image, and broken images made from them."""

import base64
import io

import numpy as np
import pytest
import skimage.data
from PIL import Image


def encode(image: Image.Image | np.ndarray, fmt: str = "JPEG", **params) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="session")
def chelsea_jpeg() -> bytes:
    """scikit-image's photo of Chelsea the cat."""
    return encode(skimage.data.chelsea(), quality=95)


@pytest.fixture(scope="session")
def coffee_jpeg() -> bytes:
    """scikit-image's photo of a cup of espresso."""
    return encode(skimage.data.coffee(), quality=95)


@pytest.fixture(scope="session")
def truncated_jpeg(chelsea_jpeg) -> bytes:
    return chelsea_jpeg[: len(chelsea_jpeg) // 2]


@pytest.fixture(scope="session")
def pixel_bomb_png() -> bytes:
    """A tiny file that would expand to 400 million pixels."""
    return encode(Image.new("1", (20_000, 20_000)), "PNG", optimize=True)

"""Shared sample inputs: real photographs from scikit-image, broken images made from them, and text to read."""

import base64
import difflib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import skimage.color
import skimage.data
from PIL import Image, ImageDraw, ImageFont


def encode(image: Image.Image | np.ndarray, fmt: str = "JPEG", **params) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# scikit-image's page(): a scanned paragraph, as printed on it.
PAGE_LINES = [
    "Region-based segmentation",
    "Let us first determine markers of the coins and the",
    "background. These markers are pixels that we can label",
    "unambiguously as either object or background. Here,",
    "histogram of grey values:",
]


def squeezed(text: str) -> str:
    """Text without whitespace, in lower case: OCR may drop or add a space between words."""
    return "".join(text.split()).lower()


def same_line(read: str, expected: str) -> bool:
    return difflib.SequenceMatcher(None, squeezed(read), squeezed(expected)).ratio() >= 0.9


def rendered_words(words: str, left: int = 30) -> Image.Image:
    """A few words in a large font, black on a white 720x200 image."""
    image = Image.new("RGB", (720, 200), "white")
    ImageDraw.Draw(image).text((left, 50), words, fill="black", font=ImageFont.load_default(size=72))
    return image


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


def exif_rotated_jpeg(pixels: np.ndarray, orientation: int) -> bytes:
    """``pixels`` stored turned as a camera would store them, with the EXIF Orientation that shows them upright."""
    turns = {3: 2, 6: 1, 8: -1}[orientation]  # np.rot90 turns counter-clockwise; 6 means "rotate 90 CW to view"
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(np.ascontiguousarray(np.rot90(pixels, turns)), quality=95, exif=exif)


def chelsea_grey() -> np.ndarray:
    """Chelsea as greyscale floats in [0, 1]."""
    return skimage.color.rgb2gray(skimage.data.chelsea())


def many_frames_gif_bytes(frames: int = 501, size: tuple[int, int] = (2000, 2000)) -> bytes:
    """An animated GIF of ``frames`` (odd) frames covering the canvas, black and white in turn; frame 0 is black."""
    palette = [0, 0, 0, 255, 255, 255] + [0] * 762
    black, white = Image.new("P", size, 0), Image.new("P", size, 1)
    for image in (black, white):
        image.putpalette(palette)
    data = encode(black, "GIF", save_all=True, append_images=[white, black], optimize=False, duration=40, loop=0)
    # Each frame starts with a Graphic Control Extension; repeat frames 1 and 2 rather than encode them all.
    starts = [m.start() for m in re.finditer(rb"\x21\xf9\x04", data)]
    assert len(starts) == 3, "the frames of the template GIF were not found"
    return data[: starts[1]] + data[starts[1] : -1] * ((frames - 1) // 2) + b";"


@pytest.fixture(scope="session")
def thin_png() -> bytes:
    """A 235-byte 1x40000 PNG: within the pixel limit, but 40000:1."""
    return encode(Image.new("RGB", (1, 40000)), "PNG", optimize=True)


@pytest.fixture(scope="session")
def wide_png() -> bytes:
    """A 40000x1 PNG, the thin one lying down."""
    return encode(Image.new("RGB", (40000, 1)), "PNG", optimize=True)


@pytest.fixture(scope="session")
def chelsea_png16() -> bytes:
    """Chelsea as a 16-bit greyscale PNG (Pillow mode I;16)."""
    return encode((chelsea_grey() * 65535).round().astype(np.uint16), "PNG")


@pytest.fixture(scope="session")
def chelsea_png8_grey() -> bytes:
    """The same photo as an 8-bit greyscale PNG."""
    return encode((chelsea_grey() * 255).round().astype(np.uint8), "PNG")


@pytest.fixture(scope="session")
def chelsea_exif_rotated_jpeg() -> bytes:
    """Chelsea stored turned 90 degrees, with EXIF Orientation 6 that shows her upright."""
    return exif_rotated_jpeg(skimage.data.chelsea(), 6)


@pytest.fixture(scope="session")
def many_frames_gif() -> bytes:
    """A 2.3 MB animated GIF of 501 frames of 2000x2000 (2 billion pixels in all); frame 0 is black."""
    return many_frames_gif_bytes()


# --- speech: real recordings, and the same speech in other containers ------------------------------------------

SPEECH_DATA = Path("/usr/share/pocketsphinx/test/data")
"""Debian's pocketsphinx-testdata (BSD-2): LibriVox read speech with transcripts, short spoken commands."""


@dataclass(frozen=True)
class Recording:
    name: str
    wav: bytes  # 16 kHz mono 16-bit
    words: str  # what is said, lower case, as the transcript has it


@pytest.fixture(scope="session")
def librivox() -> list[Recording]:
    """Five LibriVox clips of read speech (3 to 7 s, 24.7 s in all), with what they say."""
    folder = SPEECH_DATA / "librivox"
    if not (folder / "transcription").is_file():
        from tests.serving import missing_system_package

        missing_system_package("the LibriVox recordings of pocketsphinx-testdata", "pocketsphinx-testdata")
    clips = []
    for line in (folder / "transcription").read_text().splitlines():
        found = re.fullmatch(r"<s> (.*) </s> \((\S+)\)", line.strip())
        if found:
            words, name = found.groups()
            clips.append(Recording(name, (folder / f"{name}.wav").read_bytes(), words))
    assert len(clips) == 5
    return clips


def transcode(wav: bytes, fmt: str, rate: int = 44_100, layout: str = "stereo") -> bytes:
    """The speech of a WAV file in another container and codec, resampled (``flac``, ``ogg`` (Opus), ``mp3``)."""
    import av

    muxer, codec = {"flac": ("flac", "flac"), "ogg": ("ogg", "libopus"), "mp3": ("mp3", "libmp3lame")}[fmt]
    out = io.BytesIO()
    with av.open(io.BytesIO(wav)) as source, av.open(out, "w", format=muxer) as target:
        stream = target.add_stream(codec, rate=48_000 if codec == "libopus" else rate, layout=layout)
        resampler = av.AudioResampler(format="s16", layout=layout, rate=rate)
        for frame in [*source.decode(audio=0), None]:
            for resampled in resampler.resample(frame):
                for packet in stream.encode(resampled):
                    target.mux(packet)
        for packet in stream.encode(None):
            target.mux(packet)
    return out.getvalue()

"""Image decoding, validation and the geometric half of preprocessing.

Decoding happens once, in the ingress, so a broken image is answered there with
a 4xx and only a small fixed-size pixel array crosses to the vision replica.
The split follows torchvision's ``ImageClassification`` transform: resize
(short side) and centre crop here, on the PIL image; scaling to [0, 1] and
normalising in the vision replica, batched.

Bounded work per image
----------------------
An upload may not make the ingress allocate or compute much more than its
limits allow, whatever its file size. Before any pixel is decoded:

* width x height, the aspect ratio (long side / short side) and zero sizes are
  checked from the header (``Limits.max_image_pixels``, ``max_aspect_ratio``);
* a JPEG may hold at most ``MAX_JPEG_SCANS`` scans: libjpeg goes over the
  whole image again for every progressive scan, and a 270 kB file repeating
  one scan 1,000 times over 36 MP took 41 s to decode (100 scans take 3 to
  4 s; libtiff stops JPEG-compressed TIFF strips at 100 scans too);
* a TIFF's first directory and the Exif/GPS/Interop directories Pillow reads
  with it may hold at most ``MAX_TIFF_TAG_VALUES`` numbers in all (Pillow turns
  each into a Python object: 1M strip offsets, 8 MB on disk, took 250 MB and
  30 s), and its tiles may not be larger than the image (libtiff allocates a
  whole tile: a 64x64 image with 16384x16384 tiles took 260 MB);
* PNG text chunks may inflate to at most 4 MiB in all (Pillow allows 64 MiB).

Only the first frame of an animation or the first page of a TIFF is decoded;
``n_frames`` and ``seek`` are never used, since they walk or decode every
frame. EXIF metadata is parsed only when at most ``MAX_EXIF_BYTES`` long (the
most a JPEG can carry), because Pillow turns tag values into Python objects:
an 8 MB orientation tag in a PNG took 220 MB. The EXIF orientation is applied
to the decoded pixels before the RGB copy is made. Any exception Pillow raises
on a hostile file becomes an ``InvalidImage`` (422).

Peak memory of one ``decode_image`` at the default limits (40 MP, 6324x6324),
measured above the process's baseline on Pillow 13 (Pillow keeps RGB, RGBA,
CMYK, I and F at 4 bytes per pixel, so the returned RGB image is 160 MB):

    615 MB  WebP, any: libwebp's animation decoder keeps two RGBA canvases
            and Pillow two more copies (a 94-byte file can ask for this)
    460 MB  progressive CMYK JPEG: libjpeg keeps every coefficient
    460 MB  greyscale + alpha PNG (LA), composited on white
    385 MB  progressive RGB JPEG
    350 MB  32-bit integer or float TIFF (I, F)
    345 MB  palette PNG with transparency
    305 MB  RGBA PNG; RGB JPEG turned by its EXIF orientation
    275 MB  16-bit greyscale PNG or TIFF (I;16)
    190 MB  8-bit greyscale PNG
    155 MB  baseline RGB JPEG

So the worst case is about 16 bytes per pixel (WebP), and 12 for every other
format. ``prepare`` then works on the crop only: a few MB (see there).

High bit depths
---------------
Pillow keeps 16-bit greyscale as ``I;16*`` and 32-bit TIFFs as ``I`` (integer)
or ``F`` (float); ``convert("RGB")`` would clip them at 255. They are scaled to
8 bits instead: ``I;16*`` as value/257, rounded; ``I`` likewise when all values
lie in 0..65535 (a 16-bit image in a 32-bit container), else refused; ``F``
times 255 when all values lie in [0, 1], as is in [0, 255], value/257 in
[0, 65535], and refused otherwise (negative, NaN or infinite values). 48-bit
RGB PNGs and 16-bit RGB TIFFs come out of Pillow as 8-bit RGB already (the
high byte of each sample: at most 1 off from rounding).
"""

import base64
import binascii
import io
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum

import numpy as np
from PIL import Image, ImageFile, ImageOps, PngImagePlugin, TiffImagePlugin, UnidentifiedImageError

from deployments.errors import InvalidImage, InvalidInput, MaasError, PayloadTooLarge
from deployments.settings import Limits

# Formats the service decodes. Pillow knows many more; each extra decoder is
# attack surface, so only the common photo and graphics formats are enabled.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

# decode_image checks width x height against the configured limit from the
# header, before any pixel is decoded, and says what the size was. Pillow's own
# global guard would refuse first with a less useful message, so it is off.
Image.MAX_IMAGE_PIXELS = None
# PNG text chunks are compressed metadata, 1 MiB each at most; 64 MiB of them by default is far too many.
PngImagePlugin.MAX_TEXT_MEMORY = 4 * ImageFile.SAFEBLOCK

MAX_JPEG_SCANS = 100
"""Most scans (SOS markers) in a JPEG file, thumbnails included; progressive encoders write about 10."""
MAX_TIFF_TAG_VALUES = 1 << 18
"""Most numeric tag values in the TIFF directories Pillow decodes: room for a 40 MP image in one-row strips."""
MAX_EXIF_BYTES = 64 * 1024
"""Largest EXIF block parsed for the orientation tag: what fits in a JPEG's APP1 segment."""

_TIFF_SUBDIRECTORIES = (34665, 34853, 40965)  # Exif, GPS and Interop: Pillow reads them while loading a TIFF
_TIFF_BYTE_TYPES = (1, 2, 7)  # BYTE, ASCII, UNDEFINED stay bytes or str; other types become Python numbers
_TIFF_WIDTH, _TIFF_HEIGHT, _TIFF_TILE_WIDTH, _TIFF_TILE_HEIGHT = 256, 257, 322, 323

_DIRECT_MODES = ("1", "L", "P", "RGBX", "CMYK", "YCbCr", "LAB")  # convert("RGB") is right for these
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_STRIP_PIXELS = 1 << 20  # high-bit-depth images are scaled in strips of about this many pixels


class Interpolation(str, Enum):
    bilinear = "bilinear"
    bicubic = "bicubic"

    @property
    def pil(self) -> Image.Resampling:
        return Image.Resampling[self.name.upper()]


@dataclass(frozen=True)
class ImageSpec:
    """What a vision model expects: geometry for the ingress, statistics for the replica."""

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Interpolation = Interpolation.bilinear


def decode_base64(data: str, limits: Limits) -> bytes:
    """Decode a base64 image field, refusing anything that is not strict base64."""
    # A data URL prefix ("data:image/png;base64,") is common from browsers.
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    if len(data) > limits.max_image_bytes * 4 // 3 + 4:
        raise PayloadTooLarge(
            f"image is larger than the limit of {limits.max_image_bytes} bytes",
            field="image",
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"image is not valid base64: {exc}", field="image") from None
    return raw


def decode_image(raw: bytes, limits: Limits) -> Image.Image:
    """Decode and fully validate an encoded image, returning it upright, as 8-bit RGB.

    Raises a 4xx error that says what is wrong: empty, too many bytes, not an
    image, an unsupported format or pixel mode, too many pixels or too
    elongated (checked from the header, before any pixel is decoded), more
    structure than any real photo needs (see the module docstring), or
    truncated or corrupt data. Only the first frame of an animation is decoded,
    and the EXIF orientation is applied.
    """
    if not raw:
        raise InvalidImage("image is empty", field="image")
    if len(raw) > limits.max_image_bytes:
        raise PayloadTooLarge(
            f"image is {len(raw)} bytes; the limit is {limits.max_image_bytes} bytes",
            field="image",
        )
    _check_structure(raw)
    try:
        image = Image.open(io.BytesIO(raw), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        raise InvalidImage(
            "image is not a decodable image; supported formats are " + ", ".join(SUPPORTED_FORMATS),
            field="image",
        ) from None
    except Exception as exc:  # Pillow raises many types on hostile headers
        raise InvalidImage(f"image header is corrupt: {_describe(exc)}", field="image") from None

    _check_geometry(*image.size, limits)
    if image.mode not in ("RGB", *_DIRECT_MODES, *_ALPHA_MODES, *_DEEP_MODES):
        raise InvalidImage(f"image pixel mode {image.mode} is not supported", field="image")
    try:
        image.load()  # the first frame only
        _check_exif_size(image)
        try:  # before converting, so on as few bytes per pixel as the file has
            ImageOps.exif_transpose(image, in_place=True)
        except Exception:  # unreadable EXIF is common in real photos: keep the pixels as stored
            pass
        return to_rgb(image)
    except MaasError:
        raise
    except Exception as exc:
        raise InvalidImage(
            f"image data is truncated or corrupt ({image.format}): {_describe(exc)}", field="image"
        ) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image to 8-bit RGB: transparency onto white, high bit depths scaled down.

    Raises ``InvalidImage`` for pixel modes no supported format produces and for
    high-bit-depth values outside the ranges the module docstring lists.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        # Composite transparency onto white rather than letting it turn black.
        if mode == "La":  # premultiplied; Pillow converts it to LA only
            image = image.convert("LA")
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba)  # an RGBA mask means its alpha band
        return background
    if mode in _DEEP_MODES:
        return _to_8bit(image).convert("RGB")
    if mode in _DIRECT_MODES:
        return image.convert("RGB")
    raise InvalidImage(f"image pixel mode {mode} is not supported", field="image")


def prepare(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Resize the short side to ``spec.resize_size`` and centre-crop ``spec.crop_size``.

    Returns a ``(crop, crop, 3)`` uint8 array, equal to torchvision's
    ``F.resize(img, size)`` then ``F.center_crop`` on a PIL image to within 1
    in 255 for bilinear (2 for a few values at a few sizes; the unit tests say
    why); bicubic, whose overshoot is clipped after each pass, differs by more
    than 1 in under 0.1% of values, by at most 9 in 300 sizes tried.
    Only the crop is computed: the crop box is mapped back into source
    coordinates and resampled with the same filter scale and centres as the
    full resize, so time and memory do not grow with how elongated the image
    is (the full resize of a 1x40000 strip would be 256x10,240,000, 10 GB).
    """
    image = to_rgb(image)
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = spec.resize_size, int(spec.resize_size * long / short)
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)

    # The part of the resized image the crop keeps: all of an axis shorter than the crop.
    crop = spec.crop_size
    out_width, out_height = min(crop, new_width), min(crop, new_height)
    left = int(round((new_width - out_width) / 2.0))
    top = int(round((new_height - out_height) / 2.0))
    if (new_width, new_height) == (width, height):  # torchvision skips the resize too
        region = image.crop((left, top, left + out_width, top + out_height))
    else:
        scale_x, scale_y = width / new_width, height / new_height
        box = (
            left * scale_x,
            top * scale_y,
            min((left + out_width) * scale_x, width),
            min((top + out_height) * scale_y, height),
        )
        region = image.resize((out_width, out_height), spec.interpolation.pil, box=box)

    if region.size != (crop, crop):  # only when crop_size > resize_size: pad with black like torchvision
        padded = Image.new("RGB", (crop, crop))
        padded.paste(region, ((crop - out_width) // 2, (crop - out_height) // 2))
        region = padded
    return np.array(region, dtype=np.uint8)


def _check_geometry(width: int, height: int, limits: Limits) -> None:
    if width * height > limits.max_image_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_image_pixels} pixels",
            field="image",
        )
    if width == 0 or height == 0:
        raise InvalidImage(f"image has no pixels ({width}x{height})", field="image")
    short, long = sorted((width, height))
    if long > limits.max_aspect_ratio * short:
        raise InvalidImage(
            f"image is {width}x{height} pixels, an aspect ratio of {long / short:.6g}:1; "
            f"the limit is {limits.max_aspect_ratio:g}:1",
            field="image",
        )


def _check_structure(raw: bytes) -> None:
    """Refuse, before Pillow parses it, a file whose structure alone would cost far more than its pixels."""
    if raw[:2] == b"\xff\xd8":
        # 0xFFDA cannot occur inside entropy-coded data (0xFF is stuffed there), so this
        # counts the scans, plus any in embedded thumbnails or by chance in metadata.
        scans = raw.count(b"\xff\xda")
        if scans > MAX_JPEG_SCANS:
            raise InvalidImage(
                f"image is a JPEG with {scans} scans; at most {MAX_JPEG_SCANS} are accepted", field="image"
            )
    elif raw[:4] in TiffImagePlugin.PREFIXES:
        _check_tiff(raw)


def _check_tiff(raw: bytes) -> None:
    """Count the tag values of the TIFF directories Pillow decodes, and check the tile size."""
    order = "<" if raw[:2] == b"II" else ">"
    big = raw[2] == 43  # as Pillow decides
    count_format, entry_format, offset_format = ("Q", "HHQ8s", "Q") if big else ("H", "HHI4s", "I")
    entry_size = struct.calcsize(order + entry_format)
    # SHORT, LONG, IFD (and in BigTIFF LONG8, IFD8): the types a size or a directory offset can have.
    inline = {3: "H", 4: "I", 13: "I"} | ({16: "Q", 18: "Q"} if big else {})
    try:
        pending = [struct.unpack_from(order + offset_format, raw, 8 if big else 4)[0]]
    except struct.error:
        return  # too short to be a TIFF: Pillow will say so
    seen: set[int] = set()
    values, first = 0, {}
    while pending:
        offset = pending.pop()
        if offset in seen or len(seen) > len(_TIFF_SUBDIRECTORIES):
            continue
        seen.add(offset)
        try:
            (entries,) = struct.unpack_from(order + count_format, raw, offset)
        except struct.error:
            continue  # points outside the file: Pillow skips or refuses it
        position = offset + struct.calcsize(order + count_format)
        for _ in range(min(entries, (len(raw) - position) // entry_size)):
            tag, kind, count, value = struct.unpack_from(order + entry_format, raw, position)
            position += entry_size
            if kind not in _TIFF_BYTE_TYPES:
                values += count
            if count == 1 and kind in inline:
                number = struct.unpack_from(order + inline[kind], value)[0]
                if tag in _TIFF_SUBDIRECTORIES:
                    pending.append(number)
                elif len(seen) == 1:
                    first[tag] = number
    if values > MAX_TIFF_TAG_VALUES:
        raise InvalidImage(
            f"image is a TIFF whose directories hold {values} tag values; at most {MAX_TIFF_TAG_VALUES} are accepted",
            field="image",
        )
    width, height = first.get(_TIFF_WIDTH, 0), first.get(_TIFF_HEIGHT, 0)
    tile_width, tile_height = first.get(_TIFF_TILE_WIDTH, 0), first.get(_TIFF_TILE_HEIGHT, 0)
    # TIFF tiles are multiples of 16; a tile covering a small image whole is common, a larger one never needed.
    if tile_width > max(-(-width // 16) * 16, 1024) or tile_height > max(-(-height // 16) * 16, 1024):
        raise InvalidImage(
            f"image is a {width}x{height} TIFF with {tile_width}x{tile_height} tiles, larger than the image",
            field="image",
        )


def _check_exif_size(image: Image.Image) -> None:
    exif = image.info.get("exif") or b""
    hex_exif = image.info.get("Raw profile type exif") or ""  # PNG text chunk, hexadecimal
    size = max(len(exif), len(hex_exif) // 2)
    if size > MAX_EXIF_BYTES:
        raise InvalidImage(f"image EXIF metadata is {size} bytes; at most {MAX_EXIF_BYTES} are accepted", field="image")


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale a high-bit-depth greyscale image to 8-bit "L" by the depth its values use."""
    mode = image.mode
    if mode.startswith("I;16"):
        return _map_strips(image, lambda a: (a.astype(np.uint32) + 128) // 257)

    if mode == "I":
        low, high = image.getextrema()
        if low < 0 or high > 65535:
            raise InvalidImage(
                f"image is a 32-bit integer image (mode I) with values from {low} to {high}; "
                "only 0 to 65535 (16-bit data) is supported",
                field="image",
            )
        return _map_strips(image, lambda a: (a.astype(np.uint32) + 128) // 257)

    low, high, finite = _float_extrema(image)
    if not finite or low < 0 or high > 65535:
        found = "NaN or infinite values" if not finite else f"values from {low:g} to {high:g}"
        raise InvalidImage(
            f"image is a floating-point image (mode F) with {found}; "
            "supported ranges are 0 to 1, 0 to 255 and 0 to 65535",
            field="image",
        )
    factor = 255.0 if high <= 1 else 1.0 if high <= 255 else 1 / 257
    return _map_strips(image, lambda a: np.rint(a * factor))


def _strips(image: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """The image as numpy arrays of whole rows, a strip at a time, so no full-size temporary is made."""
    rows = max(1, _STRIP_PIXELS // image.width)
    for top in range(0, image.height, rows):
        yield top, np.asarray(image.crop((0, top, image.width, min(top + rows, image.height))))


def _float_extrema(image: Image.Image) -> tuple[float, float, bool]:
    """Minimum, maximum and whether every value is finite (Pillow's getextrema skips NaN)."""
    low, high = np.inf, -np.inf
    for _, strip in _strips(image):
        if not np.isfinite(strip).all():
            return low, high, False
        low, high = min(low, float(strip.min())), max(high, float(strip.max()))
    return low, high, True


def _map_strips(image: Image.Image, to_8bit: Callable[[np.ndarray], np.ndarray]) -> Image.Image:
    out = np.empty((image.height, image.width), dtype=np.uint8)
    for top, strip in _strips(image):
        out[top : top + len(strip)] = np.clip(to_8bit(strip), 0, 255).astype(np.uint8)
    return Image.fromarray(out)  # mode L


def _describe(exc: Exception) -> str:
    """Pillow's message without any bytes it quotes from the file, so the payload is never echoed."""
    message = re.sub(r"""b(['"]).*?(?<!\\)\1""", "<bytes>", str(exc))
    message = re.sub(r"[^ -~]", "?", message)[:160]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


OCR_MAX_SIDE_PX = 2000
"""Long side of the pixels sent to the OCR deployment: its engine reads at most this (RapidOCR's
``max_side_len``), so a larger upload is reduced here and at most 12 MB of pixels cross to the replica."""


def fit_within(image: Image.Image, max_side: int = OCR_MAX_SIDE_PX) -> tuple[np.ndarray, float]:
    """The image as ``(H, W, 3)`` uint8 RGB, reduced (never enlarged) so its long side is at most ``max_side``,
    and the factor that maps its pixel coordinates back to the original's."""
    image = to_rgb(image)
    width, height = image.size
    scale = max(width, height) / max_side
    if scale > 1:
        size = (max(1, round(width / scale)), max(1, round(height / scale)))
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.asarray(image, dtype=np.uint8), width / size[0]
    return np.asarray(image, dtype=np.uint8), 1.0


def crop_region(size: tuple[int, int], resize: int, crop: int) -> tuple[float, float, float, float]:
    """Where the crop ``prepare`` keeps lies in an upload of ``size`` (width, height): x, y, width and height in
    the upload's pixels, by ``prepare``'s own arithmetic (short side resized to ``resize``, centre ``crop``)."""
    width, height = size
    short, long = sorted((width, height))
    new_long = int(resize * long / short)
    new_width, new_height = (resize, new_long) if width <= height else (new_long, resize)
    out_width, out_height = min(crop, new_width), min(crop, new_height)
    left, top = int(round((new_width - out_width) / 2.0)), int(round((new_height - out_height) / 2.0))
    scale_x, scale_y = width / new_width, height / new_height
    return (round(left * scale_x, 1), round(top * scale_y, 1), round(out_width * scale_x, 1),
            round(out_height * scale_y, 1))  # fmt: skip

"""Image decoding, validation and the geometric half of preprocessing.

Decoding happens once, in the ingress, so a broken image is answered there with
a 4xx and only a small fixed-size pixel array crosses to the vision replica.
The split follows torchvision's ``ImageClassification`` transform exactly:
resize (short side) and centre crop here, on the PIL image; scaling to [0, 1]
and normalising in the vision replica, batched.
"""

import base64
import binascii
import io
from dataclasses import dataclass
from enum import Enum

import numpy as np
from PIL import Image, UnidentifiedImageError

from deployments.errors import InvalidImage, InvalidInput, PayloadTooLarge
from deployments.settings import Limits

# Formats the service decodes. Pillow knows many more; each extra decoder is
# attack surface, so only the common photo and graphics formats are enabled.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

# decode_image checks width x height against the configured limit from the
# header, before any pixel is decoded, and says what the size was. Pillow's own
# global guard would refuse first with a less useful message, so it is off.
Image.MAX_IMAGE_PIXELS = None


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
    """Decode and fully validate an encoded image, returning it as RGB.

    Raises a 4xx error that says what is wrong: empty, too many bytes, not an
    image, an unsupported format, too many pixels (checked from the header,
    before any pixel is decoded), or truncated or corrupt data.
    """
    if not raw:
        raise InvalidImage("image is empty", field="image")
    if len(raw) > limits.max_image_bytes:
        raise PayloadTooLarge(
            f"image is {len(raw)} bytes; the limit is {limits.max_image_bytes} bytes",
            field="image",
        )
    try:
        image = Image.open(io.BytesIO(raw), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        raise InvalidImage(
            "image is not a decodable image; supported formats are "
            + ", ".join(SUPPORTED_FORMATS),
            field="image",
        ) from None

    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} = {width * height} pixels; "
            f"the limit is {limits.max_image_pixels} pixels",
            field="image",
        )
    if width == 0 or height == 0:
        raise InvalidImage(f"image has no pixels ({width}x{height})", field="image")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(
            f"image data is truncated or corrupt ({image.format}): {exc}", field="image"
        ) from None
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency onto white rather than letting it turn black.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def prepare(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Resize the short side to ``spec.resize_size`` and centre-crop ``spec.crop_size``.

    Returns a ``(crop, crop, 3)`` uint8 array. Matches torchvision's
    ``F.resize(img, size)`` followed by ``F.center_crop`` on a PIL image.
    """
    image = _to_rgb(image)
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = spec.resize_size, int(spec.resize_size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    if new_size != image.size:
        image = image.resize(new_size, spec.interpolation.pil)

    crop = spec.crop_size
    width, height = image.size
    if width < crop or height < crop:  # Only when crop_size > resize_size: pad like torchvision.
        padded = Image.new("RGB", (max(width, crop), max(height, crop)))
        padded.paste(image, ((padded.width - width) // 2, (padded.height - height) // 2))
        image, (width, height) = padded, padded.size
    top = int(round((height - crop) / 2.0))
    left = int(round((width - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    return np.array(image, dtype=np.uint8)

import numpy as np
import pytest
import skimage.data
import torch
import torchvision
from PIL import Image

from deployments.errors import InvalidImage, InvalidInput, PayloadTooLarge
from deployments.imaging import ImageSpec, decode_base64, decode_image, prepare
from deployments.settings import Limits
from tests.conftest import b64, encode

LIMITS = Limits()
WEIGHTS = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
SPEC = ImageSpec(resize_size=256, crop_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def test_decodes_a_real_photo_to_rgb(chelsea_jpeg):
    image = decode_image(chelsea_jpeg, LIMITS)
    assert image.mode == "RGB"
    assert image.size == (451, 300)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_any_pixel_mode_becomes_rgb(mode):
    raw = encode(Image.new(mode, (40, 30)), "TIFF")
    assert decode_image(raw, LIMITS).mode == "RGB"


def test_transparent_png_is_composited_on_white():
    raw = encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG")
    assert decode_image(raw, LIMITS).getpixel((0, 0)) == (255, 255, 255)


def test_bytes_that_are_not_an_image_are_refused():
    with pytest.raises(InvalidImage, match="not a decodable image"):
        decode_image(b"hello, this is plain text and not a picture", LIMITS)


def test_empty_image_is_refused():
    with pytest.raises(InvalidImage, match="empty"):
        decode_image(b"", LIMITS)


def test_truncated_image_is_refused(truncated_jpeg):
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        decode_image(truncated_jpeg, LIMITS)


def test_pixel_bomb_is_refused_before_decoding(pixel_bomb_png):
    assert len(pixel_bomb_png) < 200_000
    with pytest.raises(PayloadTooLarge, match="20000x20000 = 400000000 pixels"):
        decode_image(pixel_bomb_png, LIMITS)


def test_too_many_bytes_is_refused(chelsea_jpeg):
    with pytest.raises(PayloadTooLarge, match="the limit is 1000 bytes"):
        decode_image(chelsea_jpeg, Limits(max_image_bytes=1000))


def test_unsupported_format_is_refused():
    raw = encode(Image.new("RGB", (8, 8)), "PPM")
    with pytest.raises(InvalidImage, match="supported formats are JPEG"):
        decode_image(raw, LIMITS)


def test_base64_round_trip_and_data_url(chelsea_jpeg):
    assert decode_base64(b64(chelsea_jpeg), LIMITS) == chelsea_jpeg
    assert decode_base64("data:image/jpeg;base64," + b64(chelsea_jpeg), LIMITS) == chelsea_jpeg


def test_bad_base64_is_refused():
    with pytest.raises(InvalidInput, match="not valid base64"):
        decode_base64("this is *not* base64!", LIMITS)


@pytest.mark.parametrize("name", ["chelsea", "coffee", "astronaut", "camera"])
def test_prepare_matches_torchvision_preprocessing(name):
    """Ingress geometry + replica normalisation equals torchvision's official transform."""
    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    pixels = prepare(image, SPEC)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8

    ours = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
    ours = (ours - torch.tensor(SPEC.mean).view(3, 1, 1)) / torch.tensor(SPEC.std).view(3, 1, 1)
    theirs = WEIGHTS.transforms()(image)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_prepare_handles_tall_small_images():
    pixels = prepare(Image.new("RGB", (10, 300), (200, 10, 10)), SPEC)
    assert pixels.shape == (224, 224, 3)
    assert tuple(pixels[112, 112]) == (200, 10, 10)

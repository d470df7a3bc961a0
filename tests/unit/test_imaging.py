import io
import random
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import torchvision
import torchvision.transforms.functional as F
from PIL import Image

from deployments.errors import InvalidImage, InvalidInput, MaasError, PayloadTooLarge
from deployments.imaging import (
    MAX_EXIF_BYTES,
    MAX_JPEG_SCANS,
    MAX_TIFF_TAG_VALUES,
    ImageSpec,
    decode_base64,
    decode_image,
    prepare,
    to_rgb,
)
from deployments.settings import Limits
from tests.conftest import b64, chelsea_grey, encode, exif_rotated_jpeg

LIMITS = Limits()
WEIGHTS = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
SPEC = ImageSpec(resize_size=256, crop_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def test_decodes_a_real_photo_to_rgb(chelsea_jpeg):
    image = decode_image(chelsea_jpeg, LIMITS)
    assert image.mode == "RGB"
    assert image.size == (451, 300)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "I;16", "I;16B", "I", "F"])
def test_any_pixel_mode_becomes_rgb(mode):
    raw = encode(Image.new(mode, (40, 30)), "TIFF")
    assert decode_image(raw, LIMITS).mode == "RGB"


def test_transparent_png_is_composited_on_white():
    raw = encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG")
    assert decode_image(raw, LIMITS).getpixel((0, 0)) == (255, 255, 255)


def test_pixel_modes_no_format_produces_are_refused_with_their_name():
    with pytest.raises(InvalidImage, match="pixel mode HSV is not supported"):
        to_rgb(Image.new("HSV", (8, 8)))


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


# --- Aspect ratio -----------------------------------------------------------------------------------------------


def test_thin_and_wide_images_are_refused_from_the_header(thin_png, wide_png):
    assert len(thin_png) == 235
    with pytest.raises(InvalidImage) as thin:
        decode_image(thin_png, LIMITS)
    assert thin.value.message == "image is 1x40000 pixels, an aspect ratio of 40000:1; the limit is 20:1"
    assert thin.value.status_code == 422
    with pytest.raises(InvalidImage, match=r"40000x1 pixels, an aspect ratio of 40000:1"):
        decode_image(wide_png, LIMITS)
    # From the header: the strip's pixel data is cut off, and the aspect ratio is what is reported.
    with pytest.raises(InvalidImage, match="aspect ratio"):
        decode_image(thin_png[:-40], LIMITS)


def test_aspect_ratio_limit_is_configurable(thin_png, monkeypatch):
    assert decode_image(thin_png, Limits(max_aspect_ratio=40000)).size == (1, 40000)
    monkeypatch.setenv("MAAS_MAX_ASPECT_RATIO", "2.5")
    panorama = encode(skimage.data.chelsea()[:100], "PNG")  # 451x100
    with pytest.raises(InvalidImage, match=r"an aspect ratio of 4\.51:1; the limit is 2\.5:1"):
        decode_image(panorama, Limits())


def test_aspect_ratio_is_checked_whatever_the_exif_orientation():
    sideways_strip = exif_rotated_jpeg(np.zeros((10, 400, 3), np.uint8), 6)  # stored 10x400, shown 400x10
    with pytest.raises(InvalidImage, match="an aspect ratio of 40:1"):
        decode_image(sideways_strip, LIMITS)


# --- prepare: the crop only, from the source -------------------------------------------------------------------


def torchvision_crop(image: Image.Image, spec: ImageSpec = SPEC) -> np.ndarray:
    """torchvision's geometry on a PIL image: resize the short side, centre-crop (padding if need be)."""
    resized = F.resize(image, spec.resize_size, interpolation=F.InterpolationMode.BILINEAR)
    return np.asarray(F.center_crop(resized, spec.crop_size))


@pytest.mark.parametrize("name", ["chelsea", "coffee", "astronaut", "camera"])
def test_prepare_matches_torchvision_preprocessing(name):
    """Ingress geometry + replica normalisation equals torchvision's official transform, to one level in 255.

    ``prepare`` resamples only the crop, through ``Image.resize(box=...)``, where torchvision resizes the whole
    image and then crops. Both use Pillow's filter with the same scale, support and centres, and a numpy copy of
    Pillow's resampler given the box in double precision reproduces torchvision bit for bit. Pillow itself
    cannot, for two reasons, so bit-exactness is impossible through its API:

    * it parses the box as C floats: an edge such as 80 * 451/384 is rounded to 24 bits, moving the filter
      centres by up to about 2e-5 pixel, which flips the rounding of 30 of chelsea's 150,528 values;
    * Pillow 13 chooses per call whether to resample rows or columns first, rounding the intermediate to 8
      bits, and the full resize and the crop-sized one may choose differently: at some sizes up to 18% of
      values differ by one.

    So the tolerance is 1/255 before normalisation (1/255/std after it). Coffee, astronaut and camera, whose
    scales are exact binary fractions, come out identical; ``test_prepare_is_within_two_levels_of_torchvision``
    covers other sizes.
    """
    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    pixels = prepare(image, SPEC)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8

    ours = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
    ours = (ours - torch.tensor(SPEC.mean).view(3, 1, 1)) / torch.tensor(SPEC.std).view(3, 1, 1)
    theirs = WEIGHTS.transforms()(image)
    torch.testing.assert_close(ours, theirs, atol=1 / 255 / min(SPEC.std) + 1e-6, rtol=0)
    assert np.mean(pixels != torchvision_crop(image)) < 0.001


SIZES = [(451, 300), (263, 369), (249, 957), (564, 1044), (1200, 230), (100, 80), (3, 500), (700, 5), (256, 256)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("geometry", [(256, 224), (232, 224), (200, 224)])
def test_prepare_is_within_two_levels_of_torchvision(size, geometry):
    """At any size, shape and geometry (a crop larger than the resize pads with black, as torchvision does).

    Over 1,600 sizes and geometries every value was within 1 in 255, but for at most 4 values in a crop (at
    a few sizes, such as 256x256 resized to 232) that were 2 off: both passes rounded the other way there.
    """
    spec = ImageSpec(*geometry, mean=SPEC.mean, std=SPEC.std)
    image = Image.fromarray(skimage.data.astronaut()).resize(size, Image.Resampling.BICUBIC)
    ours, theirs = prepare(image, spec), torchvision_crop(image, spec)
    assert ours.shape == theirs.shape == (224, 224, 3)
    difference = np.abs(ours.astype(int) - theirs)
    assert difference.max() <= 2 and np.mean(difference > 1) < 1e-4


def test_prepare_handles_tall_small_images():
    pixels = prepare(Image.new("RGB", (10, 300), (200, 10, 10)), SPEC)
    assert pixels.shape == (224, 224, 3)
    assert tuple(pixels[112, 112]) == (200, 10, 10)


def test_prepare_of_a_1x40000_strip_is_quick():
    """Resizing its short side to 256 first would make a 256x10,240,000 image (10 GB); the crop is 224x224."""
    strip = Image.new("RGB", (1, 40000), (30, 60, 90))
    start = time.perf_counter()
    pixels = prepare(strip, SPEC)
    assert time.perf_counter() - start < 1.0  # about 1 ms
    assert pixels.shape == (224, 224, 3) and tuple(pixels[0, 0]) == (30, 60, 90)


PEAK_MEMORY = textwrap.dedent(
    """
    import re, resource
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a regression fails here, not on the machine
    from PIL import Image
    from deployments.imaging import ImageSpec, decode_image, prepare
    from deployments.settings import Limits

    def kib(field):
        return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    work = {work}
    before = kib("VmRSS")
    try:
        open("/proc/self/clear_refs", "w").write("5")  # restart the high-water mark here
    except OSError:
        pass
    work()
    print((kib("VmHWM") - before) / 1024)
    """
)


def peak_memory_mb(setup: str, work: str) -> float:
    """Peak resident memory, in MB above what ``setup`` left, of running ``work`` in a fresh interpreter."""
    code = setup + "\n" + PEAK_MEMORY.format(work=work)
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo)
    assert result.returncode == 0, result.stderr
    return float(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("size", [(1, 40000), (40000, 1), (1, 10_000_000), (6324, 6324)])
def test_prepare_memory_does_not_grow_with_the_image(size):
    """Measured: 1 MB for the strips, 5 MB for a 40 MP photo (the source alone is 160 MB).

    Before, the 1x40000 strip needed 10 GB and the 1x10,000,000 one 2.6 TB.
    """
    setup = f"from PIL import Image\nsource = Image.new('RGB', {size}, (200, 10, 10))"
    spec = "ImageSpec(256, 224, (0.5,) * 3, (0.5,) * 3)"
    assert peak_memory_mb(setup, f"lambda: prepare(source, {spec})") < 50


# --- Hostile files: bounded or refused -------------------------------------------------------------------------


def many_frames_webp(frames: int, size: tuple[int, int]) -> bytes:
    """An animated WebP whose frames all cover the canvas; every frame is one lossless red picture."""
    still = encode(Image.new("RGB", size, (200, 10, 10)), "WEBP", lossless=True)
    assert still[12:16] == b"VP8L"

    def u24(value: int) -> bytes:
        return struct.pack("<I", value)[:3]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return kind + struct.pack("<I", len(data)) + data + b"\0" * (len(data) % 2)

    header = chunk(b"VP8X", bytes([0x02, 0, 0, 0]) + u24(size[0] - 1) + u24(size[1] - 1))
    frame = chunk(b"ANMF", u24(0) + u24(0) + u24(size[0] - 1) + u24(size[1] - 1) + u24(40) + b"\0" + still[12:])
    body = b"WEBP" + header + chunk(b"ANIM", struct.pack("<IH", 0, 0)) + frame * frames
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_only_the_first_frame_of_an_animation_is_decoded(many_frames_gif):
    """Decoding all 501 frames takes about 20 s; the first alone about 50 ms."""
    assert len(many_frames_gif) < 3_000_000 and Image.open(io.BytesIO(many_frames_gif)).n_frames == 501
    start = time.perf_counter()
    image = decode_image(many_frames_gif, LIMITS)
    assert time.perf_counter() - start < 2.0
    assert image.size == (2000, 2000) and image.getpixel((1000, 1000)) == (0, 0, 0)

    webp = many_frames_webp(200, (3000, 3000))
    assert len(webp) < 100_000
    start = time.perf_counter()
    image = decode_image(webp, LIMITS)
    assert time.perf_counter() - start < 2.0
    assert image.size == (3000, 3000) and image.getpixel((1500, 1500)) == (200, 10, 10)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_decoding_an_animation_costs_one_frame(many_frames_gif, tmp_path):
    """Measured: 20 MB for the 2000x2000 GIF (its first frame and the RGB copy), whatever its 501 frames."""
    path = tmp_path / "many.gif"
    path.write_bytes(many_frames_gif)
    setup = f"raw = open({str(path)!r}, 'rb').read()"
    assert peak_memory_mb(setup, "lambda: decode_image(raw, Limits())") < 60


def progressive_jpeg_with_scans(extra: int) -> bytes:
    """coffee as a progressive JPEG with its last scan repeated ``extra`` times (libjpeg warns and decodes them)."""
    parts = encode(skimage.data.coffee(), progressive=True).split(b"\xff\xda")
    last = parts[-1][:-2]  # without EOI
    return b"\xff\xda".join(parts[:-1]) + (b"\xff\xda" + last) * (extra + 1) + b"\xff\xd9"


def test_jpeg_with_too_many_scans_is_refused_before_decoding(coffee_jpeg):
    assert decode_image(progressive_jpeg_with_scans(0), LIMITS).size == (600, 400)
    assert decode_image(coffee_jpeg, LIMITS).size == (600, 400)
    with pytest.raises(InvalidImage, match=f"JPEG with 210 scans; at most {MAX_JPEG_SCANS} are accepted"):
        decode_image(progressive_jpeg_with_scans(200), LIMITS)


def tiff(entries: list[tuple[int, int, int, int]], data: bytes = b"") -> bytes:
    """A little-endian TIFF with one directory of (tag, type, count, value or offset) entries, then ``data``."""
    directory = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + bytes(4)
    return b"II*\0" + struct.pack("<I", 8) + directory + data


@pytest.mark.parametrize("exif_directory", [[], [(34665, 4, 1, 0xFFFFFFF0)]], ids=["plain", "bogus-exif-pointer"])
def test_tiff_with_too_many_strips_is_refused_before_pillow_parses_it(exif_directory):
    """A 16x16 TIFF with 200,000 one-row strips. With a million (8 MB), Pillow spent 250 MB and 30 s."""
    strips = 200_000
    entries = [(256, 4, 1, 16), (257, 4, 1, 16), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), *exif_directory]
    offsets_at = 8 + 2 + 12 * (len(entries) + 3) + 4
    counts_at = offsets_at + 4 * strips
    entries += [(273, 4, strips, offsets_at), (278, 4, 1, 1), (279, 4, strips, counts_at)]
    raw = tiff(entries, struct.pack(f"<{strips}I", *[0] * strips) + struct.pack(f"<{strips}I", *[16] * strips))
    with pytest.raises(InvalidImage, match=f"tag values; at most {MAX_TIFF_TAG_VALUES} are accepted"):
        decode_image(raw, LIMITS)


def test_tiff_with_tiles_larger_than_the_image_is_refused():
    """libtiff allocates whole tiles: 16384x16384 for a 64x64 image took 260 MB."""
    raw = tiff([(256, 3, 1, 64), (257, 3, 1, 64), (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 1),
                (322, 3, 1, 16384), (323, 3, 1, 16384), (324, 4, 1, 0), (325, 4, 1, 0)])  # fmt: skip
    with pytest.raises(InvalidImage, match="64x64 TIFF with 16384x16384 tiles"):
        decode_image(raw, LIMITS)
    tiled = io.BytesIO()
    Image.fromarray(skimage.data.camera()).save(tiled, "TIFF", tile=(256, 256))  # an ordinary tiled TIFF
    assert decode_image(tiled.getvalue(), LIMITS).size == (512, 512)


def png_with_chunks(png: bytes, *chunks: tuple[bytes, bytes]) -> bytes:
    """``png`` with (type, data) chunks inserted after IHDR."""
    inserted = b"".join(
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data)) for kind, data in chunks
    )
    return png[:33] + inserted + png[33:]


def test_oversized_exif_is_refused_before_it_is_parsed():
    """An 8 MB EXIF orientation tag of 4M values: Pillow made 220 MB of Python ints from it."""
    values = 4_000_000
    exif = b"II*\0" + struct.pack("<IHHHII", 8, 1, 0x0112, 3, values, 26) + bytes(4) + bytes(2 * values)
    raw = png_with_chunks(encode(Image.new("RGB", (8, 8)), "PNG"), (b"eXIf", exif))
    with pytest.raises(InvalidImage, match=rf"EXIF metadata is 80000\d\d bytes; at most {MAX_EXIF_BYTES} are"):
        decode_image(raw, LIMITS)


def test_png_text_that_inflates_too_far_is_refused():
    """200 compressed text chunks of 1 MB each: 200 kB on disk. Pillow's own limit is 64 MB; ours is 4 MB."""
    text = [(b"zTXt", b"comment%d\0\0" % i + zlib.compress(b"a" * 1_000_000, 9)) for i in range(200)]
    raw = png_with_chunks(encode(Image.new("RGB", (8, 8)), "PNG"), *text)
    assert len(raw) < 250_000
    with pytest.raises(InvalidImage, match="Too much memory used in text chunks"):
        decode_image(raw, LIMITS)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the damage it works around
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"])
def test_damaged_files_only_ever_raise_client_errors(fmt):
    """Every exception Pillow raises on a damaged file becomes a 4xx; none escapes as a 500."""
    photo = Image.fromarray(skimage.data.chelsea()).resize((90, 60))
    original = encode(photo.convert("P") if fmt == "GIF" else photo, fmt)
    rng = random.Random(fmt)
    for _ in range(150):
        raw = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(min(len(raw), 200))  # headers and metadata, where parsers branch
            raw[at] = rng.randrange(256)
        if rng.random() < 0.2:
            raw = raw[: rng.randrange(len(raw))]
        try:
            image = decode_image(bytes(raw), LIMITS)
        except MaasError as exc:
            assert 400 <= exc.status_code < 500
            assert "\\x" not in exc.message  # no bytes of the file are quoted back
        else:
            assert image.mode == "RGB"


# --- High bit depths -------------------------------------------------------------------------------------------


def decoded(raw: bytes) -> np.ndarray:
    return np.asarray(decode_image(raw, LIMITS)).astype(int)


def png48(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG, written here because Pillow cannot save one."""
    height, width, _ = pixels.shape
    rows = pixels.astype(">u2").reshape(height, width * 6 // 2).view(np.uint8).reshape(height, width * 6)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_16bit_greyscale_png_is_scaled_not_clipped(chelsea_png16, chelsea_png8_grey):
    """Clipped at 255 it was all white, and MobileNetV2 saw a can opener."""
    assert Image.open(io.BytesIO(chelsea_png16)).mode == "I;16"
    deep, shallow = decoded(chelsea_png16), decoded(chelsea_png8_grey)
    assert deep.shape == (300, 451, 3) and 0.3 < deep.mean() / 255 < 0.7
    assert np.abs(deep - shallow).max() <= 1


@pytest.mark.parametrize(
    ("mode", "scale", "dtype"),
    [("I;16", 65535, np.uint16), ("I;16B", 65535, ">u2"), ("I", 65535, np.int32),
     ("F", 1, np.float32), ("F", 255, np.float32), ("F", 65535, np.float32)],
)  # fmt: skip
def test_high_bit_depth_tiffs_equal_the_8bit_photo(mode, scale, dtype, chelsea_png8_grey):
    """16-bit TIFFs, 16-bit data in a 32-bit integer TIFF, and float TIFFs in [0, 1], [0, 255] and [0, 65535]."""
    values = (chelsea_grey() * scale).astype(np.float64)
    values = values if mode == "F" else values.round()
    image = Image.frombytes(mode, (451, 300), values.astype(dtype).tobytes())
    raw = encode(image, "TIFF")
    assert Image.open(io.BytesIO(raw)).mode == mode
    assert np.abs(decoded(raw) - decoded(chelsea_png8_grey)).max() <= 1


def test_48bit_rgb_png_equals_the_8bit_photo():
    photo = skimage.data.chelsea()
    deep = png48((photo / 255 * 65535).round().astype(np.uint16) + 77)  # + 77: not an exact multiple of 257
    assert np.abs(decoded(deep) - decoded(encode(photo, "PNG"))).max() <= 1


@pytest.mark.parametrize(
    ("mode", "values", "message"),
    [("I", [-5, 100], "mode I\\) with values from -5 to 100; only 0 to 65535"),
     ("I", [0, 70000], "mode I\\) with values from 0 to 70000"),
     ("F", [-0.5, 0.5], "mode F\\) with values from -0.5 to 0.5; supported ranges are"),
     ("F", [0, 1e6], "mode F\\) with values from 0 to 1e\\+06"),
     ("F", [0, float("nan")], "mode F\\) with NaN or infinite values")],
)  # fmt: skip
def test_high_bit_depth_values_outside_the_supported_ranges_are_refused(mode, values, message):
    pixels = np.resize(np.array(values, dtype=np.int32 if mode == "I" else np.float32), (30, 40))
    raw = encode(Image.frombytes(mode, (40, 30), pixels.tobytes()), "TIFF")
    with pytest.raises(InvalidImage, match=message):
        decode_image(raw, LIMITS)


# --- EXIF orientation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_orientation_is_applied(orientation, chelsea_jpeg):
    """A phone photo taken sideways is prepared upright (compared through JPEG noise)."""
    upright = prepare(decode_image(chelsea_jpeg, LIMITS), SPEC).astype(int)
    image = decode_image(exif_rotated_jpeg(skimage.data.chelsea(), orientation), LIMITS)
    assert image.size == (451, 300)
    assert np.abs(prepare(image, SPEC) - upright).mean() < 3
    unturned = Image.open(io.BytesIO(exif_rotated_jpeg(skimage.data.chelsea(), orientation))).convert("RGB")
    assert np.abs(prepare(unturned, SPEC) - upright).mean() > 20  # without the orientation it would differ


def test_exif_orientation_fixture_is_upright_once_decoded(chelsea_exif_rotated_jpeg):
    assert Image.open(io.BytesIO(chelsea_exif_rotated_jpeg)).size == (300, 451)
    assert decode_image(chelsea_exif_rotated_jpeg, LIMITS).size == (451, 300)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_exif_orientation_is_applied_in_other_formats_once(fmt, chelsea_jpeg):
    """Pillow already turns TIFFs while loading them; they must not be turned twice."""
    upright = prepare(decode_image(chelsea_jpeg, LIMITS), SPEC).astype(int)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(skimage.data.chelsea())))
    raw = encode(stored, fmt, exif=exif, **({"lossless": True} if fmt == "WEBP" else {}))
    image = decode_image(raw, LIMITS)
    assert image.size == (451, 300)
    assert np.abs(prepare(image, SPEC) - upright).mean() < 3


def test_unreadable_exif_is_ignored(chelsea_jpeg):
    """Damaged EXIF is common in real photos; the pixels are still good."""
    segment = b"Exif\0\0" + b"XX*\0junk"  # not a TIFF header
    broken = chelsea_jpeg[:2] + b"\xff\xe1" + struct.pack(">H", 2 + len(segment)) + segment + chelsea_jpeg[2:]
    assert decode_image(broken, LIMITS).size == (451, 300)

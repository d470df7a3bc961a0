"""The OCR model with its real engine (RapidOCR's PP-OCRv4 on ONNX Runtime; it loads in about a second)."""

import importlib.metadata

import numpy as np
import pytest
from skimage import data

from deployments.errors import InvalidImage
from deployments.ocr import OcrConfig, OcrModel
from tests.conftest import PAGE_LINES, rendered_words, same_line


@pytest.fixture(scope="module")
def model() -> OcrModel:
    return OcrModel(OcrConfig())


@pytest.fixture(scope="module")
def page() -> np.ndarray:
    grey = data.page()
    return np.ascontiguousarray(np.stack([grey] * 3, axis=-1))


@pytest.fixture(scope="module")
def cat() -> np.ndarray:
    return data.chelsea()


@pytest.fixture(scope="module")
def sign() -> np.ndarray:
    return np.asarray(rendered_words("OPEN SESAME", left=20), dtype=np.uint8)


def top(box) -> float:
    return min(y for _, y in box)


def test_a_printed_page_is_read_line_by_line(model, page):
    (result,) = model.read([page])
    texts = [line.text for line in result.lines]
    found = [expected for expected in PAGE_LINES if any(same_line(text, expected) for text in texts)]
    assert len(found) >= 4, texts
    assert not result.truncated
    assert all(0.5 <= line.confidence <= 1.0 for line in result.lines)


def test_lines_come_in_reading_order(model, page):
    (result,) = model.read([page])
    tops = [top(line.box) for line in result.lines]
    assert len(tops) >= 4 and tops == sorted(tops)
    first = result.lines[0].text
    assert same_line(first, PAGE_LINES[0]), first


def test_a_photo_without_text_gives_no_lines(model, cat):
    (result,) = model.read([cat])
    assert result.lines == [] and not result.truncated


def test_rendered_text_is_read_exactly(model, sign):
    (result,) = model.read([sign])
    assert [line.text for line in result.lines] == ["OPEN SESAME"]


def test_the_result_names_the_model_and_its_version(model, sign):
    (result,) = model.read([sign])
    assert result.model == "PP-OCRv4"
    assert result.version.startswith("rapidocr-onnxruntime==") and "/" in result.version
    assert result.seconds > 0


def test_boxes_are_four_corners_within_the_image(model, page, sign):
    for image, (result,) in ((page, model.read([page])), (sign, model.read([sign]))):
        height, width = image.shape[:2]
        assert result.lines
        for line in result.lines:
            assert len(line.box) == 4
            assert all(0 <= x <= width and 0 <= y <= height for x, y in line.box), line.box


def test_the_box_of_rendered_text_surrounds_it(model, sign):
    (line,) = model.read([sign])[0].lines
    xs, ys = [x for x, _ in line.box], [y for _, y in line.box]
    # Drawn at (20, 50) in a 72 px font; the text runs well across the image.
    assert min(xs) < 40 and max(xs) > 400
    assert 30 < min(ys) < 90 and 100 < max(ys) < 170


def test_a_batch_reads_exactly_as_its_images_read_alone(model, page, cat, sign):
    crop = np.ascontiguousarray(page[40:110, 20:300])
    images = [page, cat, sign, crop]
    together = model.read(images)
    alone = [model.read([image])[0] for image in images]
    assert len(together) == len(images)
    assert sum(len(result.lines) for result in together) >= 6  # the case is about real text
    for batched, single in zip(together, alone):
        assert [line.text for line in batched.lines] == [line.text for line in single.lines]
        assert [line.box for line in batched.lines] == [line.box for line in single.lines]
        assert batched.truncated == single.truncated
        for a, b in zip(batched.lines, single.lines):
            assert a.confidence == pytest.approx(b.confidence, abs=1e-5)


def test_lines_beyond_max_lines_are_dropped_and_the_result_says_so(page):
    limited = OcrModel(OcrConfig(max_lines=2))
    (result,) = limited.read([page])
    assert len(result.lines) == 2 and result.truncated
    assert same_line(result.lines[0].text, PAGE_LINES[0])


@pytest.mark.parametrize(
    "pixels",
    [
        pytest.param(np.full((64, 64, 3), 0.5, np.float32), id="float"),
        pytest.param(np.full((64, 64), 255, np.uint8), id="grey-2d"),
        pytest.param(np.full((64, 64, 4), 255, np.uint8), id="rgba"),
    ],
)
def test_pixels_that_are_not_uint8_rgb_are_refused(model, pixels):
    with pytest.raises(InvalidImage) as refused:
        model.read([pixels])
    assert refused.value.field == "image"


def test_an_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="unknown OCR source"):
        OcrModel(OcrConfig(source="package:tesseract"))


def test_exactly_one_opencv_distribution_is_installed():
    """opencv-python and opencv-python-headless both install ``cv2``: with two, one overwrites the other."""
    names = {
        dist.metadata["Name"].lower()
        for dist in importlib.metadata.distributions()
        if dist.metadata["Name"].lower().startswith("opencv")
    }
    assert names == {"opencv-python-headless"}

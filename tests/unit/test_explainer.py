"""The explainer's parts without Ray: saliency maps of the real vision model, their budget, the grid and the
heatmap, where the crop lies in the upload, a text's words, and the exact decomposition of ConSE scores."""

import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from deployments.contracts import FusionInput, VisionResult
from deployments.errors import ExplanationTimeout, InvalidInput
from deployments.fusion import FusionConfig, explain_fusion, fuse
from deployments.imaging import crop_region, prepare
from deployments.saliency import ImageExplainer, grid, heatmap_png
from deployments.scoring import conse_decomposition, conse_embedding, l2_normalize, similarity_scores, softmax
from deployments.vision import VisionConfig
from deployments.words import check_words, without, words

EGYPTIAN_CAT = 285


@pytest.fixture(scope="module")
def explainer() -> ImageExplainer:
    torch.set_num_threads(1)
    return ImageExplainer.load(VisionConfig())


@pytest.fixture(scope="module")
def chelsea(explainer) -> np.ndarray:
    return prepare(Image.fromarray(data.chelsea()), explainer.vision.spec)


def test_grad_cam_runs_on_the_last_spatial_feature_map(explainer):
    assert explainer.layer is explainer.vision.model.features


def test_the_top_class_is_explained_unless_one_is_named_and_names_ignore_case(explainer, chelsea):
    result = explainer.explain(chelsea, None, "gradcam", 16, 10.0)
    assert (result.class_index, result.class_name) == (EGYPTIAN_CAT, "Egyptian cat")
    assert result.probability == pytest.approx(0.72, abs=0.02)
    assert explainer.explain(chelsea, "TABBY", "gradcam", 16, 10.0).class_name == "tabby"


def test_an_unknown_class_is_refused_with_close_matches(explainer, chelsea):
    with pytest.raises(InvalidInput, match="unknown class.*'Egyptian cat'") as refused:
        explainer.explain(chelsea, "egyptian kat", "gradcam", 16, 10.0)
    assert refused.value.field == "label"


@pytest.mark.parametrize("method", ["gradcam", "integrated_gradients"])
def test_a_saliency_map_covers_the_crop_and_peaks_at_one(explainer, chelsea, method):
    result = explainer.explain(chelsea, None, method, 4, 10.0)
    assert result.saliency.shape == (224, 224)
    assert result.saliency.min() >= 0 and result.saliency.max() == pytest.approx(1.0)
    baseline = "the dataset's mean colour (zeros after normalisation)"
    expected = {"layer": "features"} if method == "gradcam" else {"steps": 4, "baseline": baseline}
    assert result.parameters == expected


@pytest.fixture
def passes(explainer):
    """The vision model's forward passes in this test (a one-item list the hook adds to)."""
    count = [0]
    handle = explainer.vision.model.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    yield count
    handle.remove()


def test_an_explanation_over_its_budget_stops_at_the_next_pass_and_leaves_no_hook(explainer, chelsea, passes):
    with pytest.raises(ExplanationTimeout, match=r"budget of 0.001 s; it was stopped after (\d) of its 9 forward"):
        explainer.explain(chelsea, None, "integrated_gradients", 64, 0.001)
    # The class's pass may have started before the deadline; no pass of Integrated Gradients' eight ran.
    assert passes[0] <= 1
    assert not explainer.vision.model._forward_pre_hooks
    assert explainer.explain(chelsea, None, "gradcam", 16, 10.0).class_index == EGYPTIAN_CAT


def test_a_cancelled_explanation_stops_at_its_next_pass(explainer, chelsea, passes):
    """The deployment sets the event when the caller hangs up; here, after the first pass."""
    cancelled = threading.Event()
    handle = explainer.vision.model.register_forward_hook(lambda *_: cancelled.set())
    try:
        with pytest.raises(ExplanationTimeout, match="stopped after 1 of its 9 forward passes"):
            explainer.explain(chelsea, None, "integrated_gradients", 64, 10.0, cancelled)
    finally:
        handle.remove()
    assert passes[0] == 1


@pytest.mark.parametrize(("method", "steps", "planned"), [("gradcam", 16, 2), ("integrated_gradients", 13, 3)])
def test_an_explanation_runs_the_passes_it_plans(explainer, chelsea, passes, method, steps, planned):
    explainer.explain(chelsea, None, method, steps, 10.0)
    assert passes[0] == ImageExplainer.planned_passes(method, steps) == planned


def test_warming_up_leaves_the_model_as_it_was(explainer, chelsea):
    before = explainer.explain(chelsea, None, "gradcam", 16, 10.0)
    explainer.warm_up()
    after = explainer.explain(chelsea, None, "gradcam", 16, 10.0)
    assert not explainer.vision.model._forward_pre_hooks and not explainer.vision.model.training
    np.testing.assert_allclose(after.saliency, before.saliency, atol=1e-6)


def test_the_grid_is_each_cells_share_of_the_map():
    saliency = np.zeros((224, 224), np.float32)
    saliency[:32, :32] = 1.0  # the top left cell of a 7 x 7 grid
    saliency[192:, 192:] = 0.5  # the bottom right one
    cells = grid(saliency, 7)
    assert cells.sum() == pytest.approx(1.0)
    assert cells[0, 0] == pytest.approx(2 / 3) and cells[6, 6] == pytest.approx(1 / 3)
    assert not grid(np.zeros((224, 224), np.float32), 7).any()


def test_the_heatmap_is_a_png_of_the_crop(chelsea):
    image = Image.open(io.BytesIO(heatmap_png(chelsea, np.linspace(0, 1, 224 * 224).reshape(224, 224))))
    assert (image.format, image.size, image.mode) == ("PNG", (224, 224), "RGB")


@pytest.mark.parametrize("size", [(451, 300), (300, 451), (224, 224), (1000, 100), (120, 80)])
def test_the_crop_region_is_where_prepare_takes_its_pixels(explainer, size):
    """Each pixel's red is its x and green its y (in 1/255 of the image), so the crop's corners say where
    they came from."""
    width, height = size
    xs = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    ys = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    image = np.stack([xs, ys, np.zeros_like(xs)], -1).round().astype(np.uint8)
    crop = prepare(Image.fromarray(image), explainer.vision.spec).astype(float)
    x, y, w, h = crop_region(size, 256, 224)
    assert crop[0, 0, 0] / 255 * width == pytest.approx(x, abs=0.02 * width + 2)
    assert crop[0, 0, 1] / 255 * height == pytest.approx(y, abs=0.02 * height + 2)
    assert crop[-1, -1, 0] / 255 * width == pytest.approx(x + w, abs=0.02 * width + 2)
    assert crop[-1, -1, 1] / 255 * height == pytest.approx(y + h, abs=0.02 * height + 2)


def test_a_text_without_one_word_keeps_the_others_as_written():
    text = "Stocks  fell, and bonds rallied."
    found = words(text)
    assert [w.group() for w in found] == ["Stocks", "fell,", "and", "bonds", "rallied."]
    assert [without(text, w) for w in found] == [
        "fell, and bonds rallied.", "Stocks and bonds rallied.", "Stocks  fell, bonds rallied.",
        "Stocks  fell, and rallied.", "Stocks  fell, and bonds",
    ]  # fmt: skip
    assert without("alone", words("alone")[0]) == ""


def test_a_text_of_too_many_words_is_refused_before_any_work():
    assert check_words(" ".join(["word"] * 64)) == 64
    with pytest.raises(InvalidInput, match="the text has 65 words; explanations take at most 64"):
        check_words(" ".join(["word"] * 65))


def test_conse_similarities_split_exactly_into_their_classes():
    rng = np.random.default_rng(0)
    probs = softmax(rng.normal(size=1000) * 3).astype(np.float32)
    classes = l2_normalize(rng.normal(size=(1000, 384))).astype(np.float32)
    labels = rng.normal(size=(6, 384)).astype(np.float32)
    top, weights, contributions = conse_decomposition(probs, classes, labels, top_t=10)
    assert list(top) == list(np.argsort(-probs)[:10])
    assert weights.sum() == pytest.approx(1.0) and np.all(np.diff(weights) <= 0)
    similarity = contributions.sum(axis=0)
    cosines = l2_normalize(labels) @ conse_embedding(probs, classes, 10)
    np.testing.assert_allclose(similarity, cosines, atol=1e-6)
    np.testing.assert_allclose(softmax(similarity / 0.05), similarity_scores(conse_embedding(probs, classes, 10),
                               labels, 0.05), atol=1e-5)  # fmt: skip


def test_a_fused_score_is_the_weighted_sum_of_its_explained_parts():
    rng = np.random.default_rng(1)
    probs = softmax(rng.normal(size=1000) * 3).astype(np.float32)
    vision = VisionResult([("class0", float(probs[0]))], probs, None, "vision", "1")
    config = FusionConfig(vision_weight=0.7, text_weight=0.3)
    item = FusionInput(
        vision=vision,
        label_embeddings=rng.normal(size=(4, 384)).astype(np.float32),
        text_embedding=rng.normal(size=384).astype(np.float32),
        weights={"vision": 0.7, "text": 0.3},
        class_embeddings=l2_normalize(rng.normal(size=(1000, 384))).astype(np.float32),
    )
    (result,) = fuse([item], config)
    explained = explain_fusion(item, [f"class{i}" for i in range(1000)], config)
    vision_scores = softmax(explained.vision_similarity / config.temperature)
    text_scores = softmax(explained.text_similarity / config.temperature)
    np.testing.assert_allclose(vision_scores, result.vision_scores, atol=1e-5)
    np.testing.assert_allclose(text_scores, result.text_scores, atol=1e-5)
    np.testing.assert_allclose(0.7 * vision_scores + 0.3 * text_scores, result.fused, atol=1e-5)
    np.testing.assert_allclose(explained.class_contributions.sum(axis=0), explained.vision_similarity, atol=1e-12)
    assert [name for name, _, _ in explained.classes] == [f"class{i}" for i in np.argsort(-probs)[:10]]

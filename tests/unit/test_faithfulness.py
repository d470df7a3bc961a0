"""The explainers' faithfulness, by the benchmark's own deletion test (benchmarks/faithfulness.py): taking away
what an explanation ranks first must lower the model's answer faster than taking it away in a random order."""

import pytest
import torch

from benchmarks import faithfulness
from deployments.saliency import ImageExplainer
from deployments.text import TextConfig, TextModel
from deployments.vision import VisionConfig


@pytest.fixture(scope="module")
def explainer() -> ImageExplainer:
    torch.set_num_threads(1)
    return ImageExplainer.load(VisionConfig())


@pytest.mark.parametrize("name", ["camera", "coffee", "rocket"])
def test_removing_the_cells_grad_cam_ranks_first_lowers_the_class_faster_than_random(explainer, name):
    """Photographs the model is sure of (a tripod, an espresso) or where one object stands out (the rocket)."""
    row = faithfulness.image_faithfulness(explainer, name, "gradcam")
    assert row["salient_first"] < row["random"] < row["least_salient_first"], row


@pytest.fixture(scope="module")
def text_model() -> TextModel:
    return TextModel(TextConfig())


@pytest.mark.parametrize("sentence", [faithfulness.SENTENCES[0], faithfulness.SENTENCES[12]])
def test_removing_the_words_occlusion_ranks_first_lowers_the_label_faster_than_random(text_model, sentence):
    row = faithfulness.text_faithfulness(text_model, sentence)
    assert row["salient_first"] < row["random"], row

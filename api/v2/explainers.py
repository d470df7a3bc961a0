"""The explainers as the Open Inference Protocol sees them: ``POST /v2/models/{name}/explain``.

KServe routes ``:explain`` to an explainer beside the model (its v1 protocol; v2 has no explain route). Here
each model that can be explained has an explain route of the same shape as its infer route: the same input
tensors, the explanation as output tensors, and the same decoding, limits and errors (the routes share them).
A batch of N inputs is N explanations made together; at most ``max_explanations`` per request, each one to a
hundred model passes.
"""

import asyncio

import numpy as np

from api.v1.schemas import MAX_GRID
from api.v2.models import FusionModel, Tensor, TensorModel, integer, prepared, texts
from api.v2.tensors import BadTensor
from deployments.contracts import DEFAULT_STEPS, IMAGE_METHODS
from deployments.errors import InvalidInput
from deployments.settings import limits

EXPLAIN_ROUTE = "/v2/models/{model_name}/explain"


def text_parameter(parameters: dict, name: str, default: str | None, choices: tuple[str, ...] = ()) -> str | None:
    value = parameters.get(name, default)
    if value is not None and (not isinstance(value, str) or not value.strip() or len(value) > limits().max_label_chars):
        most = limits().max_label_chars
        raise InvalidInput(f"parameter {name!r} must be a non-blank string of at most {most} characters")
    if choices and value not in choices:
        raise InvalidInput(f"parameter {name!r} must be one of: {', '.join(choices)}")
    return value


class VisionExplainer(TensorModel):
    name = "vision"
    platform = "pytorch"
    inputs = (
        Tensor("image", "BYTES", (-1,), "Encoded images, as for the vision model's infer.", limit="max_explanations"),
    )
    outputs = (
        Tensor("label", "BYTES", (-1,), "The class explained for each image."),
        Tensor("probability", "FP32", (-1,), "Its probability."),
        Tensor(
            "saliency",
            "FP32",
            (-1, -1, -1),
            "The saliency's share in each cell of a grid x grid over the crop "
            "the model classified (rows top to bottom); each image's cells sum to 1.",
        ),
    )
    parameters = {
        "label": "The class to explain, by name (default: each image's top class).",
        "method": f"One of {', '.join(IMAGE_METHODS)} (default gradcam).",
        "steps": f"Integration steps of integrated_gradients, 1 to max_explain_steps (default {DEFAULT_STEPS}).",
        "grid": f"Cells per side of the saliency grid, 1 to {MAX_GRID} (default 7).",
    }

    async def infer(self, inputs, parameters, outputs, dataplane, deadline):
        label = text_parameter(parameters, "label", None)
        method = text_parameter(parameters, "method", "gradcam", IMAGE_METHODS)
        steps = integer(parameters, "steps", DEFAULT_STEPS, 1, limits().max_explain_steps)
        grid = integer(parameters, "grid", 7, 1, MAX_GRID)
        pixels = await prepared(dataplane, EXPLAIN_ROUTE, inputs["image"], "image", deadline)
        results = await asyncio.gather(
            *(dataplane.explain_image(p, label, method, steps, grid, False, deadline) for p in pixels)
        )
        return {
            "label": np.array([r.class_name for r in results], dtype=object),
            "probability": np.array([r.probability for r in results], dtype=np.float32),
            "saliency": np.stack([r.grid for r in results]).astype(np.float32),
        }, results[0].version


class TextExplainer(TensorModel):
    name = "text"
    platform = "pytorch"
    inputs = (
        Tensor("text", "BYTES", (-1,), "UTF-8 texts to explain, each of at most max_explain_words words.",
               limit="max_explanations"),
        Tensor("labels", "BYTES", (-1,), "Candidate labels of the zero-shot classification, shared by every text.",
               limit="max_labels"),
    )  # fmt: skip
    outputs = (
        Tensor("label", "BYTES", (-1,), "The label explained for each text (the top one unless named)."),
        Tensor("score", "FP32", (-1,), "Its zero-shot score for the whole text."),
        Tensor("words", "BYTES", (-1, -1), "Each text's words in order, padded with empty strings to the longest."),
        Tensor("contributions", "FP32", (-1, -1), "Each word's contribution to the label's score (0 for padding)."),
    )
    parameters = {"label": "The label to explain, one of the labels input (default: each text's top label)."}

    async def infer(self, inputs, parameters, outputs, dataplane, deadline):
        lim = limits()
        labels = texts(inputs["labels"], "labels", lim.max_label_chars)
        if len(set(labels)) != len(labels):
            raise BadTensor("input 'labels': the labels must be distinct")
        label = text_parameter(parameters, "label", None)
        sentences = texts(inputs["text"], "text", lim.max_text_chars)
        results = await asyncio.gather(*(dataplane.explain_text(t, labels, label, deadline) for t in sentences))
        width = max(len(r.words) for r in results)
        words = np.full((len(results), width), "", dtype=object)
        contributions = np.zeros((len(results), width), np.float32)
        for row, result in enumerate(results):
            for column, word in enumerate(result.words):
                words[row, column], contributions[row, column] = word.word, word.contribution
        return {
            "label": np.array([r.label for r in results], dtype=object),
            "score": np.array([r.score for r in results], dtype=np.float32),
            "words": words,
            "contributions": contributions,
        }, results[0].version


class FusionExplainer(FusionModel):
    outputs = (
        *FusionModel.outputs,
        Tensor("vision_similarity", "FP32", (-1, -1), "Cosine of the image's ConSE embedding with each label "
               "(images sent); vision_scores = softmax(vision_similarity / temperature)."),
        Tensor("classes", "BYTES", (-1, -1), "The classes of each image's ConSE embedding, by weight (images sent)."),
        Tensor("class_weights", "FP32", (-1, -1), "Their weights in the embedding (images sent)."),
        Tensor("class_contributions", "FP32", (-1, -1, -1), "[image, class, label]: each class's part of each "
               "label's vision_similarity, which they sum to (images sent)."),
        Tensor("text_similarity", "FP32", (-1, -1), "Cosine of the text's embedding with each label (texts sent); "
               "text_scores = softmax(text_similarity / temperature)."),
    )  # fmt: skip
    parameters = {
        **FusionModel.parameters,
        "note": "scores = vision_weight x vision_scores + text_weight x text_scores, the weights renormalised over "
        "the modalities sent (exact decomposition, no sampling).",
    }

    def produces(self, inputs: set[str]) -> set[str]:
        image = {"vision_similarity", "classes", "class_weights", "class_contributions"} if "image" in inputs else set()
        return super().produces(inputs) | image | ({"text_similarity"} if "text" in inputs else set())

    async def infer(self, inputs, parameters, outputs, dataplane, deadline):
        analyses = await self.analyses(inputs, parameters, dataplane, deadline, explain=True)
        arrays = self.scores(analyses)
        explained = [a.fusion.explanation for a in analyses]
        if explained[0].vision_similarity is not None:
            arrays["vision_similarity"] = np.stack([e.vision_similarity for e in explained]).astype(np.float32)
            arrays["classes"] = np.array([[name for name, _, _ in e.classes] for e in explained], dtype=object)
            arrays["class_weights"] = np.array([[w for _, _, w in e.classes] for e in explained], dtype=np.float32)
            arrays["class_contributions"] = np.stack([e.class_contributions for e in explained]).astype(np.float32)
        if explained[0].text_similarity is not None:
            arrays["text_similarity"] = np.stack([e.text_similarity for e in explained]).astype(np.float32)
        return arrays, None


EXPLAINERS: dict[str, TensorModel] = {
    model.name: model for model in (VisionExplainer(), TextExplainer(), FusionExplainer())
}
"""The explain route of each model that has one, by its registry name."""

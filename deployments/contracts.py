"""The values that cross deployment boundaries: what the vision and text replicas answer, what fusion takes
and gives back.

Model code, the fusion replica, the ingress and the batch job import them from here, so none of them has to
import another deployment's model-loading code to speak to it. Plain dataclasses of numpy arrays and
Python values: Ray pickles them between processes.
"""

from dataclasses import dataclass

import numpy as np


@dataclass
class VisionResult:
    labels: list[tuple[str, float]]  # top-k (class name, probability), best first
    probs: np.ndarray  # (num_classes,) float32
    embedding: np.ndarray | None
    model: str
    version: str
    batch_size: int = 1  # how many requests shared the forward pass that produced this
    variant: str = "stable"  # which variant answered, where the model has a rollout (set by the ingress)


@dataclass
class TextEmbeddings:
    vectors: np.ndarray  # (n, dim) float32, unit length
    model: str
    version: str
    tokens: int = 0  # tokens the model read for the texts embedded (cached label vectors count none)


@dataclass
class TextScores:
    """How relevant each document is to its query, in the order of the documents."""

    scores: list[float]  # a bi-encoder's: cosine similarities, in [-1, 1]
    model: str
    version: str
    tokens: int = 0  # tokens the model read: each text once per time it was sent (as ``TextEmbeddings.tokens``)


@dataclass
class TextRanking:
    labels: list[tuple[str, float]]  # (label, score), best first
    model: str
    version: str


@dataclass
class FusionInput:
    vision: VisionResult | None
    label_embeddings: np.ndarray  # (L, D)
    text_embedding: np.ndarray | None  # (D,)
    weights: dict[str, float]
    class_embeddings: np.ndarray | None = None  # (C, D): the vision model's class names in the text model's space


@dataclass
class FusionExplanation:
    """How fusion's scores were made, exactly (``scoring.conse_decomposition``).

    For label ``j``: ``fused[j] = sum over modalities m of weights[m] * scores_m[j]``; the image's score is
    ``softmax(vision_similarity / temperature)[j]``, and ``vision_similarity[j]`` is the sum of
    ``class_contributions[:, j]``; the text's score is ``softmax(text_similarity / temperature)[j]``.
    """

    temperature: float
    classes: list[tuple[str, float, float]]  # ConSE's top-T classes: (name, probability, weight in the mix)
    class_contributions: np.ndarray | None  # (T, L) each class's part of each label's similarity
    vision_similarity: np.ndarray | None  # (L,) cosine of the image's ConSE embedding with each label
    text_similarity: np.ndarray | None  # (L,) cosine of the text's embedding with each label


@dataclass
class FusionResult:
    vision_scores: np.ndarray | None  # (L,) ConSE scores of the labels against the image
    text_scores: np.ndarray | None  # (L,) scores of the labels against the text
    fused: np.ndarray  # (L,)
    weights: dict[str, float]
    explanation: FusionExplanation | None = None  # when asked for


@dataclass(frozen=True)
class Grammar:
    """What an answer must be, enforced token by token while it is generated (``deployments.grammar``).

    ``kind`` is ``json_object`` (any JSON object), ``json_schema`` (``source``: the schema as JSON), ``regex``
    (``source``: the expression the whole answer matches) or ``lark`` (``source``: a grammar in llguidance's
    Lark dialect, which can embed JSON schemas: the tool-call format). ``field`` is the request field it came
    from, which an error about it names.
    """

    kind: str
    source: str = ""
    field: tuple = ("response_format",)


@dataclass
class GenerationRequest:
    """A request to the language model: a chat (``messages``) or a raw ``prompt``, and how to sample."""

    # {"role": system|user|assistant|tool, "content": str}; an assistant's may have "tool_calls", a tool's has
    # "tool_call_id" (OpenAI's shapes)
    messages: list[dict] | None = None
    prompt: str | None = None
    max_tokens: int | None = None  # None: the deployment's default
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None  # strings that end the answer; not part of it
    grammar: Grammar | None = None  # None: free text
    tools: list[dict] | None = None  # functions ({"name", "description", "parameters"}) the model is told of
    logprobs: int | None = None  # None: none; k: each token's log probability and the k most likely (0-20)


@dataclass
class TokenLogprob:
    """One generated token and how likely it was, in the distribution it was drawn from (``logprob``: natural
    log); ``top``: the most likely tokens there, as ``(token, bytes, logprob)``, most likely first."""

    token: str
    bytes: list[int]
    logprob: float
    top: list[tuple[str, list[int], float]]


@dataclass
class GenerationChunk:
    """One piece of a streamed answer. The first has no text (the request was accepted: its prompt counted);
    the last has ``finish_reason``."""

    text: str
    prompt_tokens: int
    completion_tokens: int  # so far
    model: str
    version: str
    finish_reason: str | None = None  # "stop" or "length"
    logprobs: list[TokenLogprob] | None = None  # the tokens generated since the last chunk, when asked for


@dataclass
class OcrLine:
    text: str
    confidence: float
    box: list[tuple[float, float]]  # four corners (x, y) in pixels, clockwise from the top left of the text


@dataclass
class OcrResult:
    lines: list[OcrLine]  # in reading order: top to bottom, left to right
    truncated: bool  # more lines were found than the deployment's max_lines
    model: str
    version: str
    seconds: float  # the replica's time per image of the batch this was read in
    batch_size: int = 1


MAX_GROUP_SIZE = 64
"""The most calls one group call carries (``pipelines/grouping.py``, ``ModelDeployment.call_group``)."""

IMAGE_METHODS: tuple[str, ...] = ("gradcam", "integrated_gradients")
"""The explainer's saliency methods (``explain_image``'s ``method``)."""
DEFAULT_STEPS = 16
"""Integrated Gradients' steps when a request names none."""


@dataclass
class ImageExplanation:
    """Why the vision model gave an image a class: a saliency map over the crop it classified."""

    saliency: np.ndarray | None  # (crop, crop) float32 in [0, 1]; not sent back by the deployment (the grid is)
    class_index: int
    class_name: str
    probability: float  # of that class for this image
    method: str  # "gradcam" or "integrated_gradients"
    parameters: dict  # the method's, as run
    model: str
    version: str
    seconds: float  # in the explainer replica
    grid: np.ndarray | None = None  # (G, G) float32: the map's share in each cell, summing to 1
    heatmap_png: bytes | None = None  # the map in colour over the crop


@dataclass
class WordContribution:
    word: str
    start: int  # its first character's index in the text
    contribution: float  # the label's score with the word minus without it


@dataclass
class TextExplanation:
    """Why a text got a zero-shot label: each word's contribution to the label's score, in text order."""

    words: list[WordContribution]
    label: str
    score: float  # the label's score for the whole text
    method: str
    parameters: dict
    model: str
    version: str
    seconds: float


# --- speech ---------------------------------------------------------------------------------------------

LANGUAGES: dict[str, str] = {
    "en": "english",
    "zh": "chinese",
    "de": "german",
    "es": "spanish",
    "ru": "russian",
    "ko": "korean",
    "fr": "french",
    "ja": "japanese",
    "pt": "portuguese",
    "tr": "turkish",
    "pl": "polish",
    "ca": "catalan",
    "nl": "dutch",
    "ar": "arabic",
    "sv": "swedish",
    "it": "italian",
    "id": "indonesian",
    "hi": "hindi",
    "fi": "finnish",
    "vi": "vietnamese",
    "he": "hebrew",
    "uk": "ukrainian",
    "el": "greek",
    "ms": "malay",
    "cs": "czech",
    "ro": "romanian",
    "da": "danish",
    "hu": "hungarian",
    "ta": "tamil",
    "no": "norwegian",
    "th": "thai",
    "ur": "urdu",
    "hr": "croatian",
    "bg": "bulgarian",
    "lt": "lithuanian",
    "la": "latin",
    "mi": "maori",
    "ml": "malayalam",
    "cy": "welsh",
    "sk": "slovak",
    "te": "telugu",
    "fa": "persian",
    "lv": "latvian",
    "bn": "bengali",
    "sr": "serbian",
    "az": "azerbaijani",
    "sl": "slovenian",
    "kn": "kannada",
    "et": "estonian",
    "mk": "macedonian",
    "br": "breton",
    "eu": "basque",
    "is": "icelandic",
    "hy": "armenian",
    "ne": "nepali",
    "mn": "mongolian",
    "bs": "bosnian",
    "kk": "kazakh",
    "sq": "albanian",
    "sw": "swahili",
    "gl": "galician",
    "mr": "marathi",
    "pa": "punjabi",
    "si": "sinhala",
    "km": "khmer",
    "sn": "shona",
    "yo": "yoruba",
    "so": "somali",
    "af": "afrikaans",
    "oc": "occitan",
    "ka": "georgian",
    "be": "belarusian",
    "tg": "tajik",
    "sd": "sindhi",
    "gu": "gujarati",
    "am": "amharic",
    "yi": "yiddish",
    "lo": "lao",
    "uz": "uzbek",
    "fo": "faroese",
    "ht": "haitian creole",
    "ps": "pashto",
    "tk": "turkmen",
    "nn": "nynorsk",
    "mt": "maltese",
    "sa": "sanskrit",
    "lb": "luxembourgish",
    "my": "myanmar",
    "bo": "tibetan",
    "tl": "tagalog",
    "mg": "malagasy",
    "as": "assamese",
    "tt": "tatar",
    "haw": "hawaiian",
    "ln": "lingala",
    "ha": "hausa",
    "ba": "bashkir",
    "jw": "javanese",
    "su": "sundanese",
    "yue": "cantonese",
}
"""The languages Whisper knows: ISO 639-1 code -> its English name, as Whisper names them (a unit test keeps the
codes equal to faster-whisper's)."""
UNKNOWN_LANGUAGE = (
    "unknown language: Whisper's languages are ISO 639-1 codes such as en, de, fr, es, zh (GET /v1/models lists "
    "those of the asr model)"
)
MAX_PROMPT_CHARS = 1000
"""Longest transcription prompt: Whisper reads at most 223 of its tokens."""


@dataclass
class TranscriptionRequest:
    """Speech to text: 16 kHz mono samples (``deployments.audio.decode_audio``) and how to read them."""

    audio: np.ndarray  # (n,) int16 at 16 kHz
    task: str = "transcribe"  # or "translate": any language in, English text out
    language: str | None = None  # one of LANGUAGES; None: detected (one more 30 s encoder pass)
    prompt: str | None = None  # text the speech follows on from: names, spelling, style
    temperature: float = 0.0  # 0: the fallback schedule (greedy first, hotter where it fails)
    word_timestamps: bool = False  # one more alignment pass per window
    timeout_s: float | None = None  # the replica stops past this (the request's deadline)

    @property
    def duration_s(self) -> float:
        return len(self.audio) / 16_000


@dataclass
class TranscriptWord:
    word: str
    start: float  # seconds into the audio
    end: float
    probability: float


@dataclass
class TranscriptSegment:
    """A stretch of speech Whisper wrote in one go, with its times and how sure it was."""

    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[TranscriptWord] | None = None


@dataclass
class TranscriptPiece:
    """One message of a streamed transcription: the first has the language (and no segment); each next one a
    segment, as each 30 s window is decoded; the last ``done`` with the replica's time."""

    language: str
    language_probability: float
    duration: float  # seconds of audio
    model: str
    version: str
    segment: TranscriptSegment | None = None
    done: bool = False
    seconds: float = 0.0  # the replica's time, on the last piece


@dataclass
class Transcript:
    """A whole transcription."""

    text: str
    language: str
    language_probability: float
    duration: float
    segments: list[TranscriptSegment]
    model: str
    version: str
    seconds: float  # the recogniser's time

    @property
    def words(self) -> list[TranscriptWord]:
        return [word for segment in self.segments for word in segment.words or ()]


@dataclass
class SpeechRequest:
    """Text to speech, in a format, at a speed."""

    text: str
    voice: str | None = None  # None: the deployment's voice
    format: str = "wav"  # deployments.audio.OUTPUT_FORMATS
    speed: float = 1.0  # 0.25 to 4.0
    whole: bool = False  # a WAV with its real length in the header (not streamed)
    timeout_s: float | None = None


@dataclass
class SpeechChunk:
    """A piece of synthesised speech: the encoded bytes, and how much speech they hold. The first has no
    audio (the request was accepted); the last is ``done``."""

    audio: bytes
    seconds: float  # of speech in this chunk
    model: str
    version: str
    sample_rate: int
    done: bool = False

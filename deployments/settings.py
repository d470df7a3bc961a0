"""Request limits and defaults, overridable by environment variables.

Every limit bounds one input dimension so that no request can exhaust a
replica's memory or CPU. Override any of them with ``MAAS_<NAME>`` (for
example ``MAAS_MAX_IMAGE_BYTES=20000000``) in the environment of the Ray
cluster, or per application through ``runtime_env.env_vars`` in the Serve YAML.
"""

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Limits(BaseSettings):
    """Bounds on what one HTTP request may carry."""

    model_config = SettingsConfigDict(env_prefix="MAAS_", frozen=True)

    max_request_bytes: int = Field(16 * 1024 * 1024, gt=0)
    """Largest accepted HTTP body (base64 makes images about 4/3 larger)."""
    max_image_bytes: int = Field(10 * 1024 * 1024, gt=0)
    """Largest accepted encoded image, after base64 decoding."""
    max_image_pixels: int = Field(40_000_000, gt=0)
    """Largest accepted width x height; checked from the header before decoding,
    so decompression bombs are refused without being expanded."""
    max_aspect_ratio: float = Field(20.0, ge=1)
    """Largest accepted ratio of an image's long side to its short side; checked
    from the header before decoding. A 1x40000 strip is within the pixel limit
    but is no photograph, and resizing its short side to 256 would multiply it."""
    max_text_chars: int = Field(4096, gt=0)
    """Longest accepted text. The text model itself reads at most its own token
    window (256 tokens for MiniLM); longer inputs are truncated there."""
    max_texts: int = Field(64, gt=0)
    """Most texts in one embedding request; most documents in one rerank request, and texts on each side of a
    score request (``text_1``, ``text_2``): each is embedded, as an embedding request's texts are."""
    max_images: int = Field(16, gt=0)
    """Most images in one inference request (a batch of the Open Inference Protocol)."""
    max_labels: int = Field(32, gt=0)
    """Most candidate labels in one classification request."""
    max_label_chars: int = Field(200, gt=0)
    """Longest accepted candidate label."""
    max_top_k: int = Field(100, gt=0)
    """Largest accepted ``top_k``."""
    max_chat_images: int = Field(4, gt=0)
    """Most images in one chat completion request; each is looked at by the vision and OCR models."""
    max_messages: int = Field(64, gt=0)
    """Most messages in one chat completion request."""
    max_message_chars: int = Field(32_768, gt=0)
    """Longest message (or prompt part) of a chat, in characters as sent."""
    max_prompt_chars: int = Field(65_536, gt=0)
    """Most characters in one chat's messages together, or in one completion prompt. The language model's
    token limits (``max_prompt_tokens``, ``max_tokens``) are its deployment's settings; this bounds the
    tokenizing that checking them costs."""

    max_schema_chars: int = Field(16_384, gt=0)
    """Largest JSON schema (``response_format``, one tool's ``parameters``), as compact JSON. Checked before the
    grammar engine sees it; the engine bounds its own work per token besides."""
    max_schema_depth: int = Field(16, gt=0)
    """Deepest nesting of objects and lists in one JSON schema."""
    max_tools: int = Field(32, gt=0)
    """Most tools (functions) in one chat completion request."""

    max_audio_bytes: int = Field(10 * 1024 * 1024, gt=0)
    """Largest accepted audio file, after base64 decoding (OpenAI's API takes 25 MB: raise this and
    ``max_request_bytes`` together to match it)."""
    max_audio_seconds: float = Field(600.0, gt=0)
    """Longest accepted audio, by the duration its file states and by what it decodes to. Transcribing costs
    about 0.12 to 0.4 CPU-seconds per second of audio on one thread, so 600 s is up to four minutes of a core."""
    min_audio_sample_rate: int = Field(8000, gt=0)
    """Lowest accepted sample rate (telephone audio); below it speech is not intelligible."""
    max_audio_sample_rate: int = Field(192_000, gt=0)
    """Highest accepted sample rate."""
    max_audio_channels: int = Field(8, gt=0)
    """Most channels; they are mixed down to one."""
    max_audio_samples: int = Field(4 * 1024 * 1024, gt=0)
    """Most samples of one clip sent as numbers (the Open Inference Protocol's ``samples``): what 16 MiB of
    float32 holds. Its duration at its sample rate is bounded by ``max_audio_seconds`` too."""
    max_audio_clips: int = Field(4, gt=0)
    """Most audio clips in one request (a chat's ``input_audio`` parts, an inference batch)."""
    max_speech_chars: int = Field(4096, gt=0)
    """Longest text to synthesise, in characters (OpenAI's limit): about four minutes of speech."""

    max_explain_steps: int = Field(64, gt=0)
    """Most integration steps of one Integrated Gradients explanation (each a forward and a backward pass)."""
    max_explanations: int = Field(4, gt=0)
    """Most inputs (images or texts) explained in one Open Inference Protocol explain request."""
    max_explain_words: int = Field(64, gt=0)
    """Most words in a text to explain: each word is removed in turn and the text scored again."""


@lru_cache(maxsize=1)
def limits() -> Limits:
    """The process-wide limits, read once from the environment."""
    return Limits()

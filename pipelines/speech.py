"""The speech half of the request graph: audio heard (``asr``), text spoken (``tts``), and a spoken question
answered (``ask``), for every protocol and the batch job.

``Dataplane`` holds these methods (``SpeechGraph`` is one of its bases), so a route calls
``dataplane.transcribe(...)`` as it calls ``dataplane.classify(...)``. Here, once for all routes:

* uploads are decoded in the dataplane's bounded pool of decode threads, within the audio limits
  (``deployments.audio``), and each refusal is counted by its reason;
* a transcription streams from its replica window by window, within the request's deadline; the audio's
  seconds are the request's usage (``pipelines.usage``), what API keys are charged;
* personal data is masked, where the request asks for masking, in what was heard (each segment, and the words
  of the segment that were masked) and in the text to be spoken, before the model speaks it;
* ``ask``: the audio is heard and the image looked at in parallel, the language model answers the question
  (grounded in what vision and OCR found), and the answer is spoken when asked for; each stage is timed.
"""

import asyncio
import contextlib
import dataclasses
import difflib
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np

from deployments.audio import DecodedAudio, decode_audio, decode_base64_audio, from_samples
from deployments.contracts import (
    SpeechChunk,
    SpeechRequest,
    Transcript,
    TranscriptionRequest,
    TranscriptPiece,
    TranscriptWord,
)
from deployments.downstream import Deadline, api_error, call_models
from deployments.errors import MaasError, ModelTimeout
from deployments.settings import limits
from pipelines import usage
from pipelines.rollouts import SHADOW_TIMEOUT_S


def decode_upload(raw: bytes | None, audio_b64: str | None, field) -> DecodedAudio:
    """Bytes (or base64) to what the recogniser hears, within the limits. CPU-bound: runs in a decode thread."""
    lim = limits()
    raw = raw if raw is not None else decode_base64_audio(audio_b64 or "", lim, field)
    return decode_audio(raw, lim, field)


class SpeechGraph:
    """The speech methods of ``pipelines.dataplane.Dataplane`` (see the module docstring). They use the
    dataplane's ``models`` (``asr``, ``tts``, ``llm``), its ``rollouts`` and ``_variant`` (the recogniser and the
    synthesiser can have a candidate), its decode pool and its metrics."""

    async def prepare_audio(
        self, route: str, deadline: Deadline, raw: bytes | None = None, audio_b64: str | None = None, field="file"
    ) -> DecodedAudio:
        """Decode and check one audio upload (bytes, or base64) for the recogniser; refusals are counted by reason."""
        loop = asyncio.get_running_loop()
        return await self._audio(
            route, lambda: loop.run_in_executor(self._decoder, decode_upload, raw, audio_b64, field)
        )

    async def prepare_samples(self, route: str, samples: np.ndarray, sample_rate: int, field="samples") -> DecodedAudio:
        """Float samples (the Open Inference Protocol's FP32 input) for the recogniser, within the same limits."""
        loop = asyncio.get_running_loop()
        return await self._audio(
            route, lambda: loop.run_in_executor(self._decoder, from_samples, samples, sample_rate, limits(), field)
        )

    async def _audio(self, route: str, decode: Callable[[], Awaitable[DecodedAudio]]) -> DecodedAudio:
        try:
            audio = await decode()
        except MaasError as exc:
            if self.metrics is not None:
                self.metrics.observe_audio_refusal(route, exc.error_type)
            raise
        if self.metrics is not None:
            self.metrics.observe_audio(route, audio.duration_s, audio.seconds)
        return audio

    def refused_text(self, route: str) -> None:
        """Count a text refused for being too long to say."""
        if self.metrics is not None:
            self.metrics.observe_audio_refusal(route, "text_too_long")

    async def transcribe_stream(
        self, audio: DecodedAudio, request: TranscriptionRequest, deadline: Deadline
    ) -> AsyncIterator[TranscriptPiece]:
        """The recogniser's pieces as they come (the language, then each window's segments, then the end), each
        segment masked where the request asks for masking. Closing the iterator early (the client went away)
        stops the transcription in its replica."""
        request = dataclasses.replace(request, audio=audio.samples, timeout_s=deadline.remaining())
        usage.record_audio(audio.duration_s)

        async def opened(variant: str) -> tuple[TranscriptPiece, object]:
            stream = self._variant("asr", variant).options(stream=True).transcribe.remote(request)
            return await stream.__anext__(), stream

        if "asr" not in self.rollouts.configs:
            head, stream = await call_models(lambda: opened("stable"), deadline)
            pieces = relay(head, stream, deadline, "the transcription")
        else:  # the variant the rollout picks hears it; a greedy transcript can be compared with the candidate's
            start = self.rollouts.clock()
            call = await call_models(lambda: self.rollouts.routed("asr", opened), deadline)
            greedy = request.temperature == 0
            copied = dataclasses.replace(request, timeout_s=SHADOW_TIMEOUT_S)  # not the caller's deadline

            def copy() -> Awaitable[str]:
                return _transcribed_text(self._variant("asr", "candidate"), copied)

            relayed = relay(*call.result, deadline, "the transcription")
            pieces = self.rollouts.followed("asr", call, start, relayed, copy if greedy else None, text=_piece_text)
        return pieces if usage.masker() is None else _masked_pieces(pieces)

    async def transcribe(self, audio: DecodedAudio, request: TranscriptionRequest, deadline: Deadline) -> Transcript:
        """A whole transcription (``transcribe_stream``'s pieces gathered)."""
        return await collect_transcript(await self.transcribe_stream(audio, request, deadline))

    async def speak(self, request: SpeechRequest, deadline: Deadline) -> AsyncIterator[SpeechChunk]:
        """The synthesiser's encoded speech as it is made, the text masked first where the request asks for
        masking. Waits for the first chunk (the request accepted, or refused) within the deadline."""
        (text,) = await usage.private([request.text])
        request = dataclasses.replace(request, text=text, timeout_s=deadline.remaining())

        async def opened(variant: str) -> tuple[SpeechChunk, object]:
            stream = self._variant("tts", variant).options(stream=True).synthesize.remote(request)
            return await stream.__anext__(), stream

        if "tts" not in self.rollouts.configs:
            head, stream = await call_models(lambda: opened("stable"), deadline)
            return _counted_speech(relay(head, stream, deadline, "the speech"))
        start = self.rollouts.clock()  # a canary: the variant the rollout picks speaks (no shadow for speech)
        call = await call_models(lambda: self.rollouts.routed("tts", opened), deadline)
        relayed = relay(*call.result, deadline, "the speech")
        return _counted_speech(self.rollouts.followed("tts", call, start, relayed, text=lambda chunk: ""))


def _piece_text(piece: TranscriptPiece) -> str:
    return piece.segment.text if piece.segment is not None else ""


async def _transcribed_text(asr, request: TranscriptionRequest) -> str:
    """The whole text a recogniser hears in the request (a shadow copy's answer), as ``collect_transcript``
    joins it."""
    pieces = [piece async for piece in asr.options(stream=True).transcribe.remote(request)]
    return "".join(_piece_text(piece) for piece in pieces)


async def collect_transcript(pieces: AsyncIterator[TranscriptPiece]) -> Transcript:
    """A whole transcript from its pieces."""
    segments, head, last = [], None, None
    try:
        async for piece in pieces:
            head = head or piece
            last = piece
            if piece.segment is not None:
                segments.append(piece.segment)
    finally:
        await pieces.aclose()
    text = "".join(segment.text for segment in segments).strip()
    return Transcript(text, head.language, head.language_probability, head.duration, segments, head.model,
                      head.version, last.seconds)  # fmt: skip


async def relay(head, stream, deadline: Deadline, what: str) -> AsyncIterator:
    """A streamed model answer after its first message: each message within the deadline, errors as API errors;
    closed early, the call is cancelled in its replica."""
    finished = False
    try:
        yield head
        while True:
            try:
                item = await asyncio.wait_for(stream.__anext__(), timeout=deadline.remaining())
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise ModelTimeout(f"{what} did not finish within the request's deadline") from None
            except Exception as exc:  # noqa: BLE001 - API errors keep their status; the rest are bugs
                error = api_error(exc)
                raise error or exc from None
            yield item
        finished = True
    finally:
        if not finished:
            with contextlib.suppress(Exception):
                stream.cancel()


async def _counted_speech(chunks: AsyncIterator[SpeechChunk]) -> AsyncIterator[SpeechChunk]:
    """The chunks, with the seconds of speech they hold recorded as the request's usage (when it ends)."""
    said = 0.0
    try:
        async for chunk in chunks:
            said += chunk.seconds
            yield chunk
    finally:
        usage.record_audio(said)
        await chunks.aclose()


async def _masked_pieces(pieces: AsyncIterator[TranscriptPiece]) -> AsyncIterator[TranscriptPiece]:
    """Each segment with personal data masked in its text, and the words it masked replaced too."""
    masker = usage.masker()
    try:
        async for piece in pieces:
            segment = piece.segment
            if segment is not None:
                masked, counts = await asyncio.to_thread(masker.mask, segment.text)
                usage.record_masked(counts)
                if masked != segment.text:
                    words = mask_words(segment.words, segment.text, masked) if segment.words else segment.words
                    piece = dataclasses.replace(piece, segment=dataclasses.replace(segment, text=masked, words=words))
            yield piece
    finally:
        await pieces.aclose()


def mask_words(words: list[TranscriptWord], original: str, masked: str) -> list[TranscriptWord]:
    """The words of a segment after its text was masked: each run of words the masking changed becomes one word,
    the masked text over them, from the first's start to the last's end; the rest stay as they were.

    The words' text (``original`` as Whisper split it) and the masked text are aligned character by character,
    so it holds for languages written without spaces between words as for those with them."""
    if not words:
        return words
    spoken = "".join(word.word for word in words)  # ``original``, as its words spell it
    opcodes = difflib.SequenceMatcher(None, spoken, masked, autojunk=False).get_opcodes()
    spans, position = [], 0
    for word in words:
        spans.append((position, position + len(word.word)))
        position += len(word.word)
    changed = [False] * len(words)
    for tag, i1, i2, _, _ in opcodes:
        if tag == "equal":
            continue
        for index, (start, end) in enumerate(spans):
            inside = start < i2 and i1 < end if i2 > i1 else start < i1 < end or (end == i1 and start < end)
            changed[index] = changed[index] or inside

    def in_masked(position: int) -> int:
        for tag, i1, i2, j1, j2 in opcodes:
            if tag == "equal" and i1 <= position <= i2:
                return j1 + position - i1
            if i1 == position:
                return j1
            if i2 == position:
                return j2
        return len(masked)

    result: list[TranscriptWord] = []
    index = 0
    while index < len(words):
        if not changed[index]:
            result.append(words[index])
            index += 1
            continue
        last = index
        while last + 1 < len(words) and changed[last + 1]:
            last += 1
        said = masked[in_masked(spans[index][0]) : in_masked(spans[last][1])]
        if said.strip():
            run = words[index : last + 1]
            result.append(TranscriptWord(said, run[0].start, run[-1].end, min(w.probability for w in run)))
        index = last + 1
    return result

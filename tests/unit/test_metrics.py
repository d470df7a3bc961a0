"""Instrument conventions: prefix, unit suffix, bounded labels, constant buckets."""

from dataclasses import dataclass, field

import pytest

from monitoring import metrics

UNIT_SUFFIXES = ("_seconds", "_bytes", "_pixels", "_tokens", "_items", "_ratio", "_score", "_total")


@dataclass
class Recorded:
    kind: str
    name: str
    tag_keys: tuple = ()
    boundaries: list = field(default_factory=list)


@pytest.fixture
def instruments(monkeypatch) -> list[Recorded]:
    """Every instrument ModelMetrics, RequestMetrics, SpeechMetrics and KeyMetrics declare, recorded instead of
    registered with Ray."""
    created: list[Recorded] = []

    def recorder(kind):
        class Instrument:
            def __init__(self, name, description="", boundaries=None, tag_keys=()):
                assert description, f"{name} has no description"
                created.append(Recorded(kind, name, tuple(tag_keys), list(boundaries or [])))

            def set_default_tags(self, tags):
                pass

        return Instrument

    for kind in ("Counter", "Gauge", "Histogram"):
        monkeypatch.setattr(metrics.metrics, kind, recorder(kind))
    metrics.ModelMetrics("mobilenet_v2", "1")
    metrics.RequestMetrics()
    metrics.SpeechMetrics("in")
    metrics.KeyMetrics()
    metrics.RolloutMetrics()
    metrics.JudgeMetrics()
    return created


def test_names_have_the_prefix_and_a_unit_suffix(instruments):
    assert len(instruments) >= 15
    for instrument in instruments:
        assert instrument.name.startswith(metrics.PREFIX), instrument.name
        assert instrument.name.endswith(UNIT_SUFFIXES), instrument.name
        assert instrument.name.endswith("_total") == (instrument.kind == "Counter"), instrument.name
    assert len({i.name for i in instruments}) == len(instruments)


def test_labels_come_from_the_fixed_set(instruments):
    for instrument in instruments:
        assert set(instrument.tag_keys) <= set(metrics.LABELS), (instrument.name, instrument.tag_keys)


def test_histogram_buckets_are_increasing_constants(instruments):
    histograms = [i for i in instruments if i.kind == "Histogram"]
    constants = {
        tuple(b)
        for b in (
            metrics.LATENCY_BUCKETS_S,
            metrics.BATCH_SIZE_BUCKETS,
            metrics.CONFIDENCE_BUCKETS,
            metrics.IMAGE_BYTES_BUCKETS,
            metrics.IMAGE_PIXELS_BUCKETS,
            metrics.TEXT_TOKENS_BUCKETS,
            metrics.REAL_TIME_FACTOR_BUCKETS,
            metrics.AUDIO_SECONDS_BUCKETS,
            metrics.WORDS_BUCKETS,
            metrics.SIMILARITY_BUCKETS,
        )
    }
    for histogram in histograms:
        assert tuple(histogram.boundaries) in constants, histogram.name
        assert histogram.boundaries == sorted(set(histogram.boundaries)), histogram.name


def test_class_labels_are_bounded():
    assert metrics.class_label(285) == "285"
    assert metrics.class_label(metrics.MAX_CLASS_INDEX_VALUES) == metrics.OTHER
    assert metrics.class_label(-1) == metrics.OTHER


def test_held_gauges_resend_their_last_values_until_a_new_model_version(monkeypatch):
    # Ray drops a gauge series ~20 s after its last set: a drift score that holds between windows must be re-sent.
    sent = []

    class Gauge:
        def __init__(self, name, description="", tag_keys=()):
            pass

        def set(self, value, tags=None):
            sent.append((value, tags))

        def set_default_tags(self, tags):
            pass

    monkeypatch.setattr(metrics.metrics, "Gauge", Gauge)
    gauge = metrics.HeldGauge("maas_test_score", "a test gauge", ("measure",))
    gauge.set(0.1, tags={"measure": "a"})
    gauge.set(0.3, tags={"measure": "a"})
    gauge.set(0.2, tags={"measure": "b"})
    sent.clear()
    gauge.refresh()
    assert sorted(sent, key=lambda s: s[1]["measure"]) == [(0.3, {"measure": "a"}), (0.2, {"measure": "b"})]
    gauge.set_default_tags({"model": "m", "version": "2"})
    sent.clear()
    gauge.refresh()
    assert sent == []


def test_a_synthesis_of_nothing_records_no_zero_increment(monkeypatch):
    """Ray's counters refuse increments that are not positive (a ValueError in the replica, the answer cut
    off): a text with nothing to say is said as no audio, and counts none."""
    increments = []

    class Counter:
        def __init__(self, name, description="", tag_keys=()):
            pass

        def set_default_tags(self, tags):
            pass

        def inc(self, value=1.0, tags=None):
            if value <= 0:
                raise ValueError(f"value must be >0, got {value}")
            increments.append(value)

    monkeypatch.setattr(metrics.metrics, "Counter", Counter)
    speech = metrics.SpeechMetrics("out")
    speech.observe(0.0, 0.01, 0)
    speech.observe(2.5, 0.2, 6)
    assert increments == [2.5]

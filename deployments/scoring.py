"""The math of zero-shot scoring, ConSE and late fusion (numpy, no model, no Ray).

ConSE (Norouzi et al., 2014, "Zero-Shot Learning by Convex Combination of
Semantic Embeddings") maps an image into a text-embedding space as the
probability-weighted mean of the embeddings of its top-T predicted class names.
The image can then be compared with any text by cosine similarity. This is not
CLIP: the image side is an ImageNet classifier, so an image is only as
describable as the 1000 classes it was trained on.
"""

import numpy as np

# Softmax temperature over cosine similarities. Sentence-embedding cosines of
# related and unrelated phrases differ by a few tenths; 0.05 turns that into a
# clear but not saturated ranking.
DEFAULT_TEMPERATURE = 0.05
DEFAULT_CONSE_TOP_T = 10


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def similarity_scores(
    query: np.ndarray, candidates: np.ndarray, temperature: float = DEFAULT_TEMPERATURE
) -> np.ndarray:
    """Softmax over the cosine similarities of one query with each candidate."""
    sims = l2_normalize(candidates) @ l2_normalize(query)
    return softmax(sims / temperature)


def conse_embedding(
    class_probs: np.ndarray, class_embeddings: np.ndarray, top_t: int = DEFAULT_CONSE_TOP_T
) -> np.ndarray:
    """ConSE: the image's embedding as the convex combination of its top-T class embeddings.

    ``class_probs`` is ``(C,)`` or ``(B, C)``; ``class_embeddings`` is ``(C, D)``.
    Returns unit vectors of shape ``(D,)`` or ``(B, D)``.
    """
    probs = np.atleast_2d(class_probs)
    top_t = min(top_t, probs.shape[1])
    top = np.argpartition(-probs, top_t - 1, axis=1)[:, :top_t]
    weights = np.take_along_axis(probs, top, axis=1)
    weights = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
    mixed = np.einsum("bt,btd->bd", weights, class_embeddings[top])
    out = l2_normalize(mixed)
    return out[0] if class_probs.ndim == 1 else out


def conse_decomposition(
    class_probs: np.ndarray, class_embeddings: np.ndarray, label_embeddings: np.ndarray, top_t: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ConSE's image-to-label cosine similarities, split exactly into the image's top-T classes.

    The image's embedding is ``m / |m|`` with ``m = sum_t w_t e_t`` (``conse_embedding``), so its cosine with a
    label ``l`` is ``sum_t w_t (e_t . l/|l|) / |m|``: class ``t`` contributes its term. Returns the classes
    (indices, by weight, largest first), their weights ``w_t`` (summing to 1) and the contributions ``(T, L)``,
    whose columns sum to each label's similarity. In float64: sums agree with the scores to about 1e-7.
    """
    probs = class_probs.astype(np.float64)
    top_t = min(top_t, probs.shape[0])
    top = np.argpartition(-probs, top_t - 1)[:top_t]
    top = top[np.argsort(-probs[top], kind="stable")]
    weights = probs[top] / max(probs[top].sum(), 1e-12)
    mixed = weights @ class_embeddings[top].astype(np.float64)
    labels = l2_normalize(label_embeddings.astype(np.float64))
    contributions = weights[:, None] * (class_embeddings[top].astype(np.float64) @ labels.T)
    return top, weights, contributions / max(np.linalg.norm(mixed), 1e-12)


def late_fusion(scores: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Weighted mean of per-modality label scores, over the modalities present.

    Weights are renormalised over the modalities in ``scores``, so a request
    with only an image is ranked by the image alone.
    """
    present = {name: weights[name] for name in scores}
    total = sum(present.values())
    if total <= 0:
        raise ValueError(f"fusion weights of the present modalities sum to {total}; need > 0")
    return sum(scores[name] * (w / total) for name, w in present.items())


def top_k(scores: np.ndarray, labels: list[str], k: int) -> list[tuple[str, float]]:
    """The k best ``(label, score)`` pairs, best first (ties keep input order)."""
    order = np.argsort(-scores, kind="stable")[:k]
    return [(labels[i], float(scores[i])) for i in order]

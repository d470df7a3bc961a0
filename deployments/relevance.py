"""How relevant texts are to each other, as the text model answers it (``contracts.TextScores``): which texts
may be paired (``paired``), and a bi-encoder's score of a pair (``cosine_pairs``).

Numpy only, no model and no Ray: the ingress checks the pairing and reads the answer without importing the
model's code, as with the types of ``deployments.contracts``.

A pair is a query and a document (``/v1/rerank``), or ``text_1`` and ``text_2`` (``/v1/score``). One query
goes with every document, or each document has its own (vLLM's rule: 1:1, 1:N or N:N).
"""

import numpy as np

from deployments.scoring import l2_normalize

PAIRING = "give one text_1 for every text_2, or as many text_1 as text_2 (1:1, 1:N or N:N)"


def paired(queries: int, documents: int) -> bool:
    """Whether ``queries`` texts can be paired with ``documents``: one for all, or one each."""
    return documents >= 1 and queries in (1, documents)


def cosine_pairs(queries: np.ndarray, documents: np.ndarray) -> np.ndarray:
    """Cosine similarity of each document ``(n, dim)`` with its query: ``queries`` is one row, for every
    document, or a row per document. The scores of a bi-encoder: the texts are embedded apart and compared."""
    documents, queries = (l2_normalize(np.asarray(x, np.float64)) for x in (documents, queries))
    return np.einsum("nd,nd->n", documents, np.broadcast_to(queries, documents.shape))

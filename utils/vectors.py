"""Vector search from scratch: exact top-k, int8 and binary embedding quantization, truncated
embeddings, maximal marginal relevance, and the checks that compare them with a library.

Written for Part 5 ("Embeddings and vector search"), where each function is shown, checked against
FAISS or sentence-transformers, and measured on the embedded Python documentation. Everything here is
plain NumPy on rows of a matrix: one row per text, unit length when the function says so.

Conventions: ``queries`` is ``(q, d)`` (a single ``(d,)`` vector is promoted to one row), ``corpus``
is ``(n, d)``; search functions return ``(scores, ids)``, both ``(q, k)``, best first, and ties are
broken by the smaller id so that results are reproducible. Asking for more neighbours than the corpus
holds returns all ``n``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from utils.checks import check_positive_int


__all__ = [
    "UNIT_ATOL",
    "as_matrix",
    "check_unit_rows",
    "normalize_rows",
    "top_k",
    "exact_search",
    "neighbour_recall",
    "assert_same_neighbours",
    "Int8Codebook",
    "fit_int8",
    "quantize_int8",
    "dequantize_int8",
    "int8_search",
    "binarize",
    "hamming_distances",
    "binary_search",
    "rescore",
    "truncate_dims",
    "mmr",
    "mean_pairwise_similarity",
]


#: How far from length 1 a row may be and still count as normalised (float32 rounding is ~1e-7).
UNIT_ATOL = 1e-3


def as_matrix(x: np.ndarray, name: str = "x") -> np.ndarray:
    """``x`` as a 2-D float32 array (a 1-D vector becomes one row), after checking it is usable."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must hold numbers, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a vector or a (rows, dims) matrix, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}): pass at least one row of at least one dim")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf values; embed or clean the inputs again")
    return arr


def check_unit_rows(x: np.ndarray, name: str = "x", atol: float = UNIT_ATOL) -> np.ndarray:
    """Return ``x`` as a float32 matrix after checking that every row has length 1 (within ``atol``).

    Cosine similarity equals the dot product only for unit rows, so the functions that rely on it call
    this first. Fix a failure with :func:`normalize_rows`.
    """
    arr = as_matrix(x, name)
    norms = np.linalg.norm(arr, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1) > atol)
    if bad.size:
        raise ValueError(f"{name} must have unit-length rows (cosine = dot product only then); row "
                         f"{bad[0]} has length {norms[bad[0]]:.4f}. Call normalize_rows({name}) first")
    return arr


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Divide every row by its Euclidean length: $\\hat x = x / \\lVert x \\rVert_2$."""
    arr = as_matrix(x)
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"row {int(np.flatnonzero(norms[:, 0] == 0)[0])} is all zeros and has no "
                         "direction; drop it before normalising")
    return arr / norms


def _check_dims(queries: np.ndarray, corpus: np.ndarray, what: str = "dims") -> None:
    if queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} {what} but the corpus has {corpus.shape[1]}; "
                         "embed both with the same model (and the same truncation or packing)")


def top_k(scores: np.ndarray, k: int, largest: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best entries of each row of ``scores``: ``(values, column ids)``, best first.

    ``np.argpartition`` finds the ``k`` best in linear time without sorting the row; only those ``k``
    are then sorted. Ties are broken by the smaller id: every column whose score equals the ``k``-th
    best is kept as a candidate, and a stable sort on (score, id) picks among them.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.size == 0:
        raise ValueError(f"scores must be a non-empty (queries, items) matrix, got shape {scores.shape}")
    k = min(check_positive_int("k", k, hint="how many neighbours to return"), scores.shape[1])
    keyed = -scores if largest else scores          # smaller key = better
    if k < scores.shape[1]:
        part = np.argpartition(keyed, k - 1, axis=1)[:, :k]
        part_keys = np.take_along_axis(keyed, part, axis=1)
        ids = np.take_along_axis(part, np.lexsort((part, part_keys), axis=1), axis=1).astype(np.int64)
        kth = part_keys.max(axis=1, keepdims=True)
        tied = np.flatnonzero((keyed <= kth).sum(axis=1) > k)   # rows where the k-th place is shared
        for row in tied:                                        # keep the smallest ids among the ties
            cand = np.flatnonzero(keyed[row] <= kth[row])
            ids[row] = cand[np.lexsort((cand, keyed[row, cand]))[:k]]
    else:
        ids = np.lexsort((np.broadcast_to(np.arange(scores.shape[1]), scores.shape), keyed), axis=1)
    return np.take_along_axis(scores, ids, axis=1), ids


def exact_search(queries: np.ndarray, corpus: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search: $S = Q C^\\top$, then the top ``k`` of each row (:func:`top_k`).

    For unit rows the inner product is the cosine similarity. Returns ``(scores, ids)``, ``(q, k)``.
    """
    queries, corpus = as_matrix(queries, "queries"), as_matrix(corpus, "corpus")
    _check_dims(queries, corpus)
    return top_k(queries @ corpus.T, k)


def neighbour_recall(found_ids: np.ndarray, true_ids: np.ndarray) -> float:
    """Mean fraction of the true neighbours that were found: $|F_i \\cap T_i| / |T_i|$ averaged over rows.

    This is the "recall@k" of approximate search against exact search (``true_ids`` from
    :func:`exact_search` with the same ``k``); it says nothing about whether the neighbours are relevant.
    """
    found, true = np.asarray(found_ids), np.asarray(true_ids)
    if found.ndim != 2 or true.ndim != 2 or found.shape[0] != true.shape[0] or true.size == 0:
        raise ValueError(f"found_ids {found.shape} and true_ids {true.shape} must be (queries, k) "
                         "matrices with the same number of rows")
    hits = [len(np.intersect1d(f[f >= 0], t)) / len(t) for f, t in zip(found, true)]
    return float(np.mean(hits))


def assert_same_neighbours(ids: np.ndarray, scores: np.ndarray, ref_ids: np.ndarray,
                           ref_scores: np.ndarray, atol: float = 1e-5) -> int:
    """Check a top-k result against a reference (e.g. FAISS) and return how many positions differ by a tie.

    ``scores`` must be the true scores of ``ids`` (computed from the vectors, not copied from the
    reference). The result is accepted when, position by position, those scores equal the reference's
    within ``atol`` and each row's ids are distinct: then both lists are correct top-k answers, and any
    position where the ids differ holds items whose scores tie (within ``atol``). Raises
    ``AssertionError`` otherwise.
    """
    ids, ref_ids = np.asarray(ids), np.asarray(ref_ids)
    if ids.shape != ref_ids.shape or np.shape(scores) != ids.shape or np.shape(ref_scores) != ids.shape:
        raise ValueError(f"ids {ids.shape}, scores {np.shape(scores)}, ref_ids {ref_ids.shape} and "
                         f"ref_scores {np.shape(ref_scores)} must all have the same (queries, k) shape")
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=atol,
                               err_msg="the k-th best scores differ: not just a different order of ties")
    for row in ids:
        if len(np.unique(row)) != len(row):
            raise AssertionError(f"an id is returned twice in one row: {row.tolist()}")
    return int((ids != ref_ids).sum())


# --- int8 scalar quantization -------------------------------------------------------------------

@dataclass(frozen=True)
class Int8Codebook:
    """Per-dimension ranges for int8 codes: dimension $j$ maps $[lo_j, hi_j]$ onto 256 buckets."""

    lo: np.ndarray     # (d,) float32, smallest calibration value of each dimension
    step: np.ndarray   # (d,) float32, bucket width (hi - lo) / 255 (1 where hi == lo)

    @property
    def nbytes(self) -> int:
        return int(self.lo.nbytes + self.step.nbytes)


def fit_int8(calibration: np.ndarray) -> Int8Codebook:
    """Calibrate int8 ranges on real embeddings: the minimum and maximum of each dimension.

    Same rule as ``sentence_transformers.quantization.quantize_embeddings(..., "int8")``.
    """
    calibration = as_matrix(calibration, "calibration")
    if calibration.shape[0] < 2:
        raise ValueError("fit_int8 needs at least 2 calibration rows to find a range per dimension")
    lo, hi = calibration.min(axis=0), calibration.max(axis=0)
    step = (hi - lo) / np.float32(255)
    return Int8Codebook(lo=lo, step=np.where(step == 0, np.float32(1), step).astype(np.float32))


def quantize_int8(x: np.ndarray, book: Int8Codebook) -> np.ndarray:
    """int8 codes: bucket $b = \\lfloor (x - lo) / \\text{step} \\rfloor$ clipped to 0..255, stored
    as $b - 128$."""
    x = as_matrix(x, "x")
    if x.shape[1] != book.lo.shape[0]:
        raise ValueError(f"x has {x.shape[1]} dims but the codebook was fitted on {book.lo.shape[0]}")
    buckets = np.clip(np.floor((x - book.lo) / book.step), 0, 255)
    return (buckets - 128).astype(np.int8)


def dequantize_int8(codes: np.ndarray, book: Int8Codebook) -> np.ndarray:
    """Back to floats at each bucket's centre: $\\hat x = lo + (c + 128.5)\\,\\text{step}$."""
    codes = np.asarray(codes)
    if codes.dtype != np.int8 or codes.ndim != 2 or codes.shape[1] != book.lo.shape[0]:
        raise ValueError(f"codes must be an int8 (n, {book.lo.shape[0]}) matrix from quantize_int8, "
                         f"got {codes.dtype} {codes.shape}")
    return book.lo + (codes.astype(np.float32) + np.float32(128.5)) * book.step


def int8_search(queries: np.ndarray, codes: np.ndarray, book: Int8Codebook,
                k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Search int8 codes with float queries (asymmetric): the scores are $q \\cdot \\hat x$.

    Expanding $\\hat x$ gives $q \\cdot \\hat x = (q \\odot \\text{step}) \\cdot c + q \\cdot (lo + 128.5\\,
    \\text{step})$: one product with the codes plus a per-query constant, so the codes are never
    dequantized as a whole. NumPy has no int8 matrix product, so the codes are widened to float32
    for the product; memory at rest is what int8 saves here, not arithmetic.
    """
    queries = as_matrix(queries, "queries")
    codes = np.asarray(codes)
    if codes.dtype != np.int8 or codes.ndim != 2 or codes.shape[0] == 0:
        raise ValueError(f"codes must be a non-empty int8 (n, d) matrix from quantize_int8, "
                         f"got {codes.dtype} {codes.shape}")
    _check_dims(queries, codes)
    if codes.shape[1] != book.lo.shape[0]:
        raise ValueError(f"codes have {codes.shape[1]} dims but the codebook {book.lo.shape[0]}")
    offset = queries @ (book.lo + np.float32(128.5) * book.step)
    scores = (queries * book.step) @ codes.T.astype(np.float32) + offset[:, None]
    return top_k(scores, k)


# --- binary quantization ------------------------------------------------------------------------

def binarize(x: np.ndarray) -> np.ndarray:
    """Keep one bit per dimension, the sign ($x_j > 0$), packed 8 to a byte: ``(n, ceil(d / 8))`` uint8."""
    return np.packbits(as_matrix(x, "x") > 0, axis=1)


def _as_bits(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.dtype != np.uint8 or arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty uint8 (rows, bytes) matrix from binarize, "
                         f"got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


def hamming_distances(query_bits: np.ndarray, corpus_bits: np.ndarray, block: int = 1024) -> np.ndarray:
    """Number of differing bits between every query and corpus row: popcount(q XOR c), ``(q, n)`` int32.

    Rows are compared one machine word at a time (8 bytes as a uint64 when the byte count allows, else
    one byte): XOR a query word with the same word of every corpus row, count the set bits with
    ``np.bitwise_count`` and add up over the words. Queries go ``block`` at a time.
    """
    q, c = _as_bits(query_bits, "query_bits"), _as_bits(corpus_bits, "corpus_bits")
    _check_dims(q, c, "bytes")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    acc_dtype = np.uint16 if 8 * q.shape[1] < 2**16 else np.int32   # the largest distance must fit
    if q.shape[1] % 8 == 0:
        q, c = q.view(np.uint64), c.view(np.uint64)
    words = np.ascontiguousarray(c.T)                    # (words, n): one word of every corpus row
    out = np.empty((q.shape[0], c.shape[0]), dtype=np.int32)
    for start in range(0, q.shape[0], block):
        qb = q[start:start + block]
        acc = np.zeros((qb.shape[0], c.shape[0]), dtype=acc_dtype)
        for w in range(q.shape[1]):
            acc += np.bitwise_count(qb[:, w:w + 1] ^ words[w][None, :])
        out[start:start + block] = acc
    return out


def binary_search(query_bits: np.ndarray, corpus_bits: np.ndarray,
                  k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` corpus rows with the smallest Hamming distance: ``(distances, ids)``, nearest first."""
    return top_k(hamming_distances(query_bits, corpus_bits), k, largest=False)


def rescore(queries: np.ndarray, corpus: np.ndarray, candidate_ids: np.ndarray,
            k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each query's candidates (e.g. a binary search's top ``4k``) by the float inner product
    with the full-precision ``corpus`` rows, and keep the best ``k``: ``(scores, corpus ids)``."""
    queries, corpus = as_matrix(queries, "queries"), as_matrix(corpus, "corpus")
    _check_dims(queries, corpus)
    cand = np.asarray(candidate_ids)
    if cand.ndim != 2 or cand.shape[0] != queries.shape[0] or cand.shape[1] == 0:
        raise ValueError(f"candidate_ids must be a (queries, candidates) matrix with {queries.shape[0]} "
                         f"rows, got shape {cand.shape}")
    if cand.min() < 0 or cand.max() >= corpus.shape[0]:
        raise ValueError(f"candidate ids must index the corpus (0..{corpus.shape[0] - 1})")
    scores = np.einsum("qd,qcd->qc", queries, corpus[cand])
    best, pos = top_k(scores, k)
    return best, np.take_along_axis(cand, pos, axis=1)


# --- truncation and diversity -------------------------------------------------------------------

def truncate_dims(x: np.ndarray, m: int) -> np.ndarray:
    """The first ``m`` dimensions of each row, renormalised to unit length (Matryoshka-style truncation)."""
    x = as_matrix(x, "x")
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 1 <= m <= x.shape[1]:
        raise ValueError(f"m must be an int from 1 to {x.shape[1]} (the full width), got {m!r}")
    return normalize_rows(x[:, :m])


def mmr(query: np.ndarray, candidates: np.ndarray, k: int = 5, lambda_: float = 0.5) -> np.ndarray:
    """Maximal marginal relevance: pick ``k`` candidates one at a time, each maximising

    $$ \\lambda\\,\\mathrm{sim}(q, d) - (1 - \\lambda) \\max_{s \\in S} \\mathrm{sim}(d, s) $$

    over the not-yet-selected candidates $d$, where $S$ is the selection so far (the penalty is 0 for
    the first pick). Similarities are inner products of unit rows. Returns indices into ``candidates``
    in the order picked; $\\lambda = 1$ is plain top-k by similarity.
    """
    q = check_unit_rows(query, "query")
    if q.shape[0] != 1:
        raise ValueError(f"mmr takes one query vector, got {q.shape[0]} rows")
    cand = check_unit_rows(candidates, "candidates")
    _check_dims(q, cand)
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"lambda_ must be in [0, 1] (1 = relevance only), got {lambda_}")
    k = min(check_positive_int("k", k, hint="how many neighbours to return"), cand.shape[0])
    relevance = cand @ q[0]
    pairwise = cand @ cand.T
    chosen: list[int] = []
    redundancy = np.full(cand.shape[0], -np.inf, dtype=np.float32)
    for _ in range(k):
        penalty = np.where(np.isinf(redundancy), 0.0, redundancy)
        gain = lambda_ * relevance - (1 - lambda_) * penalty
        gain[chosen] = -np.inf
        best = int(np.argmax(gain))              # argmax takes the first (smallest index) of ties
        chosen.append(best)
        redundancy = np.maximum(redundancy, pairwise[best])
    return np.array(chosen, dtype=np.int64)


def mean_pairwise_similarity(x: np.ndarray) -> float:
    """Average inner product over distinct pairs of rows (a redundancy measure for a result list)."""
    x = as_matrix(x, "x")
    if x.shape[0] < 2:
        raise ValueError("mean_pairwise_similarity needs at least 2 rows")
    sims = x @ x.T
    n = x.shape[0]
    return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))

"""Vector search from scratch (utils.vectors): exact top-k, int8/binary quantization, MMR."""
import faiss
import numpy as np
import pytest
from sentence_transformers.util.quantization import quantize_embeddings

from utils import vectors as V


def unit(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_as_matrix_promotes_vectors_and_rejects_bad_input():
    assert V.as_matrix(np.ones(3)).shape == (1, 3)
    assert V.as_matrix(np.ones((2, 3), dtype=np.int64)).dtype == np.float32
    with pytest.raises(TypeError, match="numbers"):
        V.as_matrix(np.array(["a"]))
    with pytest.raises(TypeError, match="numbers"):
        V.as_matrix(np.array([True, False]))
    with pytest.raises(ValueError, match="matrix"):
        V.as_matrix(np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="empty"):
        V.as_matrix(np.ones((0, 4)), "corpus")
    with pytest.raises(ValueError, match="NaN"):
        V.as_matrix(np.array([1.0, np.nan]))


def test_normalize_and_check_unit_rows():
    x = np.array([[3.0, 4.0], [0.0, 2.0]])
    np.testing.assert_allclose(V.normalize_rows(x), [[0.6, 0.8], [0.0, 1.0]])
    assert V.check_unit_rows(V.normalize_rows(x)).shape == (2, 2)
    with pytest.raises(ValueError, match="row 0 has length 5"):
        V.check_unit_rows(x)
    with pytest.raises(ValueError, match="all zeros"):
        V.normalize_rows(np.array([[1.0, 0.0], [0.0, 0.0]]))


def test_top_k_sorts_breaks_ties_by_id_and_caps_k():
    s = np.array([[0.1, 0.9, 0.5, 0.9, 0.2], [1.0, 0.0, 0.3, 0.3, 0.3]])
    vals, ids = V.top_k(s, 2)
    assert ids.tolist() == [[1, 3], [0, 2]]
    np.testing.assert_array_equal(vals, [[0.9, 0.9], [1.0, 0.3]])
    _, ids = V.top_k(s, 3)
    assert ids.tolist() == [[1, 3, 2], [0, 2, 3]]          # the k-th place is shared: smaller id wins
    _, ids = V.top_k(s, 99)                                   # k > n: all n, sorted, ties by id
    assert ids.tolist() == [[1, 3, 2, 4, 0], [0, 2, 3, 4, 1]]
    _, ids = V.top_k(s, 2, largest=False)
    assert ids.tolist() == [[0, 4], [1, 2]]
    with pytest.raises(ValueError, match="positive int"):
        V.top_k(s, 0)
    with pytest.raises(ValueError, match="positive int"):
        V.top_k(s, True)
    with pytest.raises(ValueError, match="non-empty"):
        V.top_k(np.ones(3), 1)


def test_exact_search_equals_faiss_flat_ip():
    corpus, queries = unit(300), unit(20, seed=1)
    scores, ids = V.exact_search(queries, corpus, k=10)
    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(corpus)
    ref_scores, ref_ids = index.search(queries, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    assert V.assert_same_neighbours(ids, scores, ref_ids, ref_scores) == 0
    s1, i1 = V.exact_search(queries[0], corpus, k=5000)        # one vector, k > n
    assert i1.shape == (1, 300) and np.all(np.diff(s1[0]) <= 0)
    with pytest.raises(ValueError, match="queries have 8 dims but the corpus has 32"):
        V.exact_search(unit(2, 8), corpus, 3)


def test_assert_same_neighbours_accepts_ties_and_rejects_wrong_lists():
    ref_ids, ref_scores = np.array([[4, 7, 1]]), np.array([[0.9, 0.5, 0.5]])
    assert V.assert_same_neighbours(np.array([[4, 1, 7]]), ref_scores, ref_ids, ref_scores) == 2
    with pytest.raises(AssertionError, match="k-th best"):
        V.assert_same_neighbours(np.array([[4, 7, 2]]), np.array([[0.9, 0.5, 0.4]]), ref_ids, ref_scores)
    with pytest.raises(AssertionError, match="twice"):
        V.assert_same_neighbours(np.array([[4, 7, 7]]), ref_scores, ref_ids, ref_scores)
    with pytest.raises(ValueError, match="same"):
        V.assert_same_neighbours(np.array([[4, 7]]), ref_scores, ref_ids, ref_scores)


def test_neighbour_recall():
    true = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert V.neighbour_recall(true, true) == 1.0
    assert V.neighbour_recall(np.array([[1, 2, 9, -1], [8, 0, 0, 0]]), true) == pytest.approx(0.375)
    with pytest.raises(ValueError, match="same number of rows"):
        V.neighbour_recall(true[:1], true)


def test_int8_codes_equal_sentence_transformers_and_search_ranks_well():
    corpus, queries = unit(400, 48), unit(30, 48, seed=1)
    book = V.fit_int8(corpus)
    codes = V.quantize_int8(corpus, book)
    want = quantize_embeddings(corpus, "int8", calibration_embeddings=corpus)
    np.testing.assert_array_equal(codes, want)
    assert codes.dtype == np.int8 and book.nbytes == 2 * 48 * 4
    err = np.abs(V.dequantize_int8(codes, book) - corpus)
    assert np.all(err <= book.step / 2 + 1e-6)                 # within half a bucket
    scores, ids = V.int8_search(queries, codes, book, k=10)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, V.dequantize_int8(codes, book)[ids]),
                               atol=1e-5)
    assert V.neighbour_recall(ids, V.exact_search(queries, corpus, 10)[1]) > 0.9
    flat = np.zeros((3, 48), dtype=np.float32)
    flat[:, 0] = 1
    assert np.all(V.fit_int8(flat).step[1:] == 1)                # constant dimension: step 1, no 0-division
    with pytest.raises(ValueError, match="at least 2"):
        V.fit_int8(corpus[:1])
    with pytest.raises(ValueError, match="fitted on 48"):
        V.quantize_int8(unit(2, 8), book)
    with pytest.raises(ValueError, match="int8"):
        V.dequantize_int8(codes.astype(np.int16), book)
    with pytest.raises(ValueError, match="int8"):
        V.int8_search(queries, codes.astype(np.float32), book)
    with pytest.raises(ValueError, match="8 dims"):
        V.int8_search(unit(2, 8), codes, book)
    with pytest.raises(ValueError, match="codebook 48"):
        V.int8_search(unit(2, 8), codes[:, :8], book)


@pytest.mark.parametrize("d", [64, 36])                          # whole uint64 words, and not
def test_binary_hamming_equals_faiss_binary_flat(d):
    corpus, queries = unit(200, d), unit(15, d, seed=2)
    cb, qb = V.binarize(corpus), V.binarize(queries)
    np.testing.assert_array_equal(cb, quantize_embeddings(corpus, "ubinary"))
    dist = V.hamming_distances(qb, cb, block=4)
    brute = (np.unpackbits(qb, axis=1)[:, None, :d] != np.unpackbits(cb, axis=1)[None, :, :d]).sum(-1)
    np.testing.assert_array_equal(dist, brute)
    d_top, ids = V.binary_search(qb, cb, k=8)
    if d % 8 == 0:                                               # FAISS binary indexes need whole bytes
        index = faiss.IndexBinaryFlat(d)
        index.add(cb)
        ref_d, ref_ids = index.search(qb, 8)
        V.assert_same_neighbours(ids, d_top, ref_ids, ref_d, atol=0)
    with pytest.raises(ValueError, match="uint8"):
        V.hamming_distances(corpus, cb)
    with pytest.raises(ValueError, match="bytes"):
        V.hamming_distances(qb[:, :2], cb)
    with pytest.raises(ValueError, match="block"):
        V.hamming_distances(qb, cb, block=0)
    assert V.hamming_distances(qb[0], cb).shape == (1, 200)     # one packed vector is one row


def test_hamming_counts_past_the_uint16_range():
    ones, zeros = np.full((1, 8192), 255, dtype=np.uint8), np.zeros((2, 8192), dtype=np.uint8)
    assert V.hamming_distances(ones, zeros).tolist() == [[65536, 65536]]   # accumulated in int32


def test_rescore_recovers_exact_order_among_candidates():
    corpus, queries = unit(300), unit(10, seed=3)
    _, exact_ids = V.exact_search(queries, corpus, 5)
    _, cand = V.binary_search(V.binarize(queries), V.binarize(corpus), 300)  # all: rescoring is exact
    scores, ids = V.rescore(queries, corpus, cand, 5)
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_allclose(scores, V.exact_search(queries, corpus, 5)[0], atol=1e-6)
    with pytest.raises(ValueError, match="10 rows"):
        V.rescore(queries, corpus, cand[:3], 5)
    with pytest.raises(ValueError, match="index the corpus"):
        V.rescore(queries, corpus, cand + 1, 5)


def test_truncate_dims():
    x = unit(5, 16)
    t = V.truncate_dims(x, 4)
    assert t.shape == (5, 4)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(V.truncate_dims(x, 16), x, atol=1e-6)
    for bad in (0, 17, 2.5, True):
        with pytest.raises(ValueError, match="from 1 to 16"):
            V.truncate_dims(x, bad)


def test_mmr_trades_relevance_for_diversity():
    q = np.array([1.0, 0.0, 0.0])
    cands = V.normalize_rows(np.array([[1.0, 0.1, 0.0], [1.0, 0.12, 0.0], [0.7, 0.0, 0.7], [0.0, 1.0, 0.0]]))
    assert V.mmr(q, cands, k=3, lambda_=1.0).tolist() == [0, 1, 2]   # plain top-k by similarity
    picks = V.mmr(q, cands, k=2, lambda_=0.5)
    assert picks.tolist() == [0, 2]                                   # the near-duplicate 1 is skipped
    assert V.mean_pairwise_similarity(cands[picks]) < V.mean_pairwise_similarity(cands[[0, 1]])
    assert len(V.mmr(q, cands, k=10)) == 4
    with pytest.raises(ValueError, match="one query"):
        V.mmr(cands, cands)
    with pytest.raises(ValueError, match="lambda_"):
        V.mmr(q, cands, lambda_=1.5)
    with pytest.raises(ValueError, match="unit-length"):
        V.mmr(q * 2, cands)
    with pytest.raises(ValueError, match="3 dims but the corpus has 2"):
        V.mmr(q, V.normalize_rows(np.ones((2, 2))))
    with pytest.raises(ValueError, match="at least 2"):
        V.mean_pairwise_similarity(cands[:1])

"""Exact re-ranking on compressed indexes: an IVF-PQ build keeps the exact vectors
(vectors.npy), `TrainingIndex.search` re-scores the compressed index's candidates with them,
and the criteria (nL2 included) score against exact vectors, so their verdicts equal a Flat
index's whenever the true neighbours are among the candidates."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from index_helpers import digits_parquet, digits_rgb

from memaudit.common import UserError
from memaudit.criteria import make_criterion
from memaudit.index import TrainingIndex, build_index

N = 300


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same digits as a Flat index and as an IVF4,PQ8x4 index re-ranking every group."""
    tmp = tmp_path_factory.mktemp("rerank")
    data = digits_parquet(tmp / "digits.parquet", n=N)
    kw = dict(batch_size=64, shard_rows=128, calibrate=False)
    flat = build_index(data, "pixels", tmp / "flat", **kw)
    pq = build_index(data, "pixels", tmp / "pq", factory="IVF4,PQ8x4", faiss_params="nprobe=4",
                     rerank=N, **kw)
    return TrainingIndex.open(flat), TrainingIndex.open(pq)


def _queries() -> np.ndarray:
    """12 training digits with noise (copies) and 12 digits the index does not hold, as
    [24, 3, 8, 8] in [0, 1]."""
    imgs, _ = digits_rgb()
    x = np.concatenate([imgs[:12], imgs[1000:1012]]).astype(np.float32).transpose(0, 3, 1, 2)
    x /= 255.0
    noise = np.random.default_rng(0).normal(0, 0.05, x.shape).astype(np.float32)
    return np.clip(x + noise, 0, 1)


def test_exact_vectors_file_and_manifest(pair):
    flat, pq = pair
    assert flat.manifest["exact_vectors"] is None and flat.exact_vectors is None
    assert not (flat.path / "vectors.npy").exists()
    assert pq.manifest["exact_vectors"] == {"file": "vectors.npy", "dtype": "float32",
                                            "rerank_candidates": N}
    assert pq.manifest["faiss_params"] == "nprobe=4"
    # the exact vectors are the Flat index's, row = group id; the PQ codes are not
    np.testing.assert_array_equal(np.load(pq.path / "vectors.npy"), flat.group_vectors())
    np.testing.assert_array_equal(pq.group_vectors(), flat.group_vectors())
    assert np.abs(pq.index.reconstruct_n(0, pq.ntotal) - flat.group_vectors()).max() > 0.01


def test_search_reranks_to_exact_scores(pair):
    flat, pq = pair
    q = _queries().reshape(24, -1)
    want_s, want_i = flat.search(q, 10)
    got_s, got_i = pq.search(q, 10)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-4)
    raw_s, _ = pq.index.search(q, 10)  # what the compressed index alone says
    assert np.abs(raw_s - want_s).max() > 1e-2
    # fewer groups than k: -1 ids at the end, as faiss gives them
    s, i = pq.search(q[:2], N + 3)
    assert (i[:, -3:] == -1).all() and (i[:, :N] >= 0).all()


def test_nl2_on_pq_equals_flat_without_warning(pair):
    flat, pq = pair
    images = torch.from_numpy(_queries())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "compressed vectors" warning any more
        crit_pq = make_criterion("nl2", pq)
    crit_flat = make_criterion("nl2", flat)
    crit_pq.groups.fast = crit_flat.groups.fast = False  # through faiss + re-ranking
    a, b = crit_pq.score(images), crit_flat.score(images)
    np.testing.assert_allclose(a.score, b.score, rtol=1e-9)
    np.testing.assert_array_equal(a.neighbour, b.neighbour)
    np.testing.assert_array_equal(a.is_copy, b.is_copy)
    assert a.is_copy.any() and not a.is_copy.all()


def test_untrusted_exact_vectors_refused(pair, tmp_path):
    import shutil

    _, pq = pair
    bad = tmp_path / "bad"
    shutil.copytree(pq.path, bad)
    np.save(bad / "vectors.npy", np.zeros((pq.ntotal - 1, pq.dim), np.float32))
    with pytest.raises(UserError, match=r"vectors.npy holds .* expected float32"):
        TrainingIndex.open(bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["exact_vectors"]["file"] = "/etc/passwd"
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="exact_vectors must name vectors.npy"):
        TrainingIndex.open(bad)
    m["exact_vectors"] = {"file": "vectors.npy", "rerank_candidates": "all"}
    (bad / "manifest.json").write_text(json.dumps(m))
    np.save(bad / "vectors.npy", np.zeros((pq.ntotal, pq.dim), np.float32))
    with pytest.raises(UserError, match="rerank_candidates must be a positive integer"):
        TrainingIndex.open(bad)


def test_recipe_rerank_and_faiss_params_are_type_checked(tmp_path):
    from memaudit.index.recipe import load_recipe

    recipe = tmp_path / "r.toml"
    base = 'data = "train.parquet"\nembedder = "pixels"\n'
    recipe.write_text(base + 'faiss_params = "nprobe=32"\nrerank = 200\n')
    got = load_recipe(recipe)
    assert got["faiss_params"] == "nprobe=32" and got["rerank"] == 200
    for bad, msg in (("rerank = 0", "rerank must be a positive integer"),
                     ("faiss_params = 32", "faiss_params must be a string")):
        recipe.write_text(base + bad + "\n")
        with pytest.raises(UserError, match=msg):
            load_recipe(recipe)


def test_read_rows_equals_indexing_the_map(tmp_path):
    """Re-ranking reads vectors.npy rows by pread (runs closer than `gap` rows in one read),
    not through the memory map: the same rows, in the order asked."""
    from memaudit.index.training_index import read_rows

    a = np.random.default_rng(0).normal(size=(5000, 12)).astype(np.float32)
    np.save(tmp_path / "v.npy", a)
    m = np.load(tmp_path / "v.npy", mmap_mode="r")
    rng = np.random.default_rng(1)
    for rows in (np.zeros(0, np.int64), np.array([0]), np.array([4999]), np.arange(10, 40),
                 np.array([0, 3, 12, 13, 4990, 4999]),
                 np.unique(rng.integers(0, 5000, 700))):
        for gap in (0, 1, 8, 10_000):
            got = read_rows(m, rows, gap=gap)
            assert got.dtype == np.float32 and np.array_equal(got, a[rows]), (rows, gap)

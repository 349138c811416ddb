"""Sparsification masks keep exactly the documented counts, ties and exact zeros included."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from landscape.merge import sparsify


def _ref_rank_desc(a):
    """Numpy reference: rank by descending |a|, ties by lower index (stable)."""
    order = np.argsort(-np.abs(a), kind="stable")
    r = np.empty_like(order)
    r[order] = np.arange(a.size)
    return r


def _ref_count(f, n):
    return int(np.floor(f * n + 1e-9))


# few distinct magnitudes -> many ties and exact zeros
tied = arrays(np.float32, (3, 7), elements=st.sampled_from([0.0, 1.0, -1.0, 2.0, -2.0, 0.5]))
densities = st.sampled_from([0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0])


@settings(max_examples=25, deadline=None)
@given(x=tied, density=densities)
def test_topk_mask_exact_counts_and_tie_rule(x, density):
    for scope in ["leaf", "row"]:
        m = np.asarray(sparsify.topk_mask({"w": jnp.asarray(x)}, density=density, scope=scope, out_axis=None)["w"])
        groups = x.reshape(-1, x.shape[-1]) if scope == "row" else x.reshape(1, -1)
        mg = m.reshape(groups.shape)
        for g, mrow in zip(groups, mg):
            k = max(1, _ref_count(density, g.size))
            assert mrow.sum() == k
            np.testing.assert_array_equal(mrow, _ref_rank_desc(g) < k)


@settings(max_examples=20, deadline=None)
@given(a=tied, b=arrays(np.float32, (5,), elements=st.sampled_from([0.0, 1.0, -1.0, 3.0])), density=densities)
def test_topk_mask_global_counts(a, b, density):
    m = sparsify.topk_mask({"a": jnp.asarray(a), "b": jnp.asarray(b)}, density=density, scope="global")
    flat = np.concatenate([a.ravel(), b.ravel()])
    k = max(1, _ref_count(density, flat.size))
    got = np.concatenate([np.asarray(m["a"]).ravel(), np.asarray(m["b"]).ravel()])
    assert got.sum() == k
    np.testing.assert_array_equal(got, _ref_rank_desc(flat) < k)


@settings(max_examples=25, deadline=None)
@given(x=tied, density=densities, gamma=st.sampled_from([0.0, 0.01, 0.1, 0.2, 0.4]))
def test_breadcrumbs_mask_counts(x, density, gamma):
    m = np.asarray(sparsify.breadcrumbs_mask({"w": jnp.asarray(x)}, density=density, gamma=gamma, out_axis=None)["w"])
    for g, mrow in zip(x.reshape(-1, x.shape[-1]), m.reshape(-1, x.shape[-1])):
        n = g.size
        n_top = _ref_count(gamma, n)
        k = min(max(1, _ref_count(density, n)), n - n_top)
        r = _ref_rank_desc(g)
        assert mrow.sum() == k
        np.testing.assert_array_equal(mrow, (r >= n_top) & (r < n_top + k))


def test_breadcrumbs_drops_outliers_keeps_next():
    x = jnp.array([[10.0, 0.1, 5.0, 0.2, 4.0, 3.0, 0.0, 2.0, 1.0, -6.0]])
    m = sparsify.breadcrumbs_mask({"w": x}, density=0.3, gamma=0.1, out_axis=None)["w"]
    # drop the largest |x| (10), keep the next 3: -6, 5, 4
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(m[0])), [2, 4, 9])


def test_count_traced_equals_concrete():
    fs = np.round(np.arange(0.01, 1.0001, 0.01), 2)
    ns = [1, 3, 7, 10, 64, 100, 257, 1000]
    traced = jax.jit(jax.vmap(lambda f: jnp.stack([sparsify.count(f, n) for n in ns])))(jnp.asarray(fs, jnp.float32))
    for i, f in enumerate(fs):
        for j, n in enumerate(ns):
            want = int(np.floor(round(f * n, 6)))
            assert sparsify.count(float(f), n) == want == int(traced[i, j]), (f, n)


def test_topk_mask_vmap_over_density():
    x = {"w": jnp.arange(-6.0, 6.0).reshape(3, 4)}
    ds = jnp.array([0.25, 0.5, 1.0])
    out = jax.vmap(lambda d: sparsify.topk_mask(x, density=d))(ds)
    for i, d in enumerate([0.25, 0.5, 1.0]):
        np.testing.assert_array_equal(out["w"][i], sparsify.topk_mask(x, density=d)["w"])
        assert int(out["w"][i].sum()) == int(12 * d)


def test_exact_random_mask_counts_and_bernoulli_rate():
    x = {"a": jnp.ones((7, 9)), "b": jnp.ones(13)}
    for keep in [0.1, 0.77]:
        m = sparsify.exact_random_mask(jax.random.key(1), x, keep=keep)
        assert int(m["a"].sum()) == int(np.floor(keep * 63 + 1e-9))
        assert int(m["b"].sum()) == int(np.floor(keep * 13 + 1e-9))
    big = {"w": jnp.ones((100, 100))}
    rate = float(sparsify.bernoulli_mask(jax.random.key(0), big, keep=0.3)["w"].mean())
    assert abs(rate - 0.3) < 0.02


def test_della_probabilities_formula():
    x = {"w": jnp.array([[3.0, -1.0, 0.0, 2.0, 5.0]]), "b": jnp.array(1.0)}
    p = sparsify.della_probabilities(x, density=0.5, epsilon=0.1, out_axis=None)
    # ascending |x| ranks: 0 -> 0, -1 -> 1, 2 -> 2, 3 -> 3, 5 -> 4; p = 0.4 + 0.2 r / 4
    np.testing.assert_allclose(p["w"][0], [0.55, 0.45, 0.4, 0.5, 0.6], rtol=1e-6)
    np.testing.assert_allclose(p["b"], 0.5)
    assert abs(float(p["w"].mean()) - 0.5) < 1e-6

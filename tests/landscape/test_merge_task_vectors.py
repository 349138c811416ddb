"""Task-vector merges: task arithmetic, TIES, DARE, Breadcrumbs, DELLA against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from landscape import merge, tree

SHAPES = {"dense": {"kernel": (5, 4), "bias": (4,)}, "out": (4, 2)}


def _tree(key, scale=1.0):
    leaves, treedef = jax.tree.flatten(SHAPES, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, s) for k, s in zip(keys, leaves)])


def _setup(seed=0, m=3, ties_and_zeros=False):
    base = _tree(jax.random.key(seed))
    if ties_and_zeros:  # dyadic values: differences are exact in float32 and float64
        base = jax.tree.map(lambda x: jnp.round(4 * x) / 4, base)
    fts = []
    for i in range(m):
        tv = _tree(jax.random.key(seed + 1000 + i))
        if ties_and_zeros:  # few distinct values: many ties, exact zeros, sign conflicts
            tv = jax.tree.map(lambda x: jnp.round(2 * x) / 2, tv)
        fts.append(tree.add(base, tv))
    return base, fts


def _jit(fn, *args, **settings):
    """Call ``fn(*args, **settings)`` under jit (settings baked in): one compile instead of op-by-op."""
    return jax.jit(lambda *a: fn(*a, **settings))(*args)


def _close(a, b, **kw):
    kw.setdefault("atol", 1e-5)
    kw.setdefault("rtol", 1e-5)
    for (na, xa), (_, xb) in zip(tree.named_leaves(a), tree.named_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(xa), np.asarray(xb), err_msg=na, **kw)


def _ref_topk(flat, density):
    k = max(1, int(np.floor(density * flat.size + 1e-9)))
    order = np.argsort(-np.abs(flat), kind="stable")
    keep = np.zeros(flat.size, bool)
    keep[order[:k]] = True
    return keep


def _ref_ties(base, fts, density, lam, scope, elect, merge_kind, weights):
    """Independent numpy TIES: trim (stable top-k), elect, disjoint merge, per leaf or global."""
    names = [n for n, _ in tree.named_leaves(base)]
    b = [np.asarray(x, np.float64) for _, x in tree.named_leaves(base)]
    taus = [[np.asarray(x, np.float64) - bb for (_, x), bb in zip(tree.named_leaves(f), b)] for f in fts]
    w = np.ones(len(fts)) if weights is None else np.asarray(weights, np.float64)
    if scope == "global":
        flat = [np.concatenate([t.ravel() for t in tv]) for tv in taus]
        trimmed = [np.where(_ref_topk(f, density), f, 0.0) for f in flat]
        sizes = np.cumsum([0] + [x.size for x in b])
        trimmed = [[tr[sizes[i] : sizes[i + 1]].reshape(b[i].shape) for i in range(len(b))] for tr in trimmed]
    else:
        trimmed = [[np.where(_ref_topk(t.ravel(), density).reshape(t.shape), t, 0.0) for t in tv] for tv in taus]
    out = {}
    for li, name in enumerate(names):
        v = np.stack([w[i] * trimmed[i][li] for i in range(len(fts))])
        s = np.sign(v)
        if elect == "none":
            keep = np.ones_like(v, bool)
        else:
            cnt = np.sign(s.sum(0))
            g = np.sign(v.sum(0)) if elect == "mass" else cnt
            g = np.where(g == 0, cnt, g)
            g = np.where(g == 0, 1.0, g)
            keep = s == g
        merged = np.where(keep, v, 0).sum(0)
        if merge_kind == "mean":
            den = (w[:, None] * np.ones((1, v[0].size))).reshape(v.shape) if elect == "none" else None
            den = np.where(keep, np.broadcast_to(w.reshape((-1,) + (1,) * (v.ndim - 1)), v.shape), 0).sum(0)
            den = np.where(np.abs(den) < 1e-8, 1.0, den)
            merged = merged / den
        out[name] = b[li] + lam * merged
    return out


@pytest.mark.parametrize("scope", ["leaf", "global"])
@pytest.mark.parametrize(("elect", "merge_kind"), [("mass", "mean"), ("count", "sum"), ("mass", "sum")])
def test_ties_matches_numpy_reference(scope, elect, merge_kind):
    base, fts = _setup(seed=7, ties_and_zeros=True)
    w = [1.0, 0.5, 2.0]
    got = _jit(merge.ties, fts, base=base, density=0.3, lam=0.8, scope=scope, elect=elect, merge=merge_kind, weights=w)
    want = _ref_ties(base, fts, 0.3, 0.8, scope, elect, merge_kind, w)
    for name, x in tree.named_leaves(got):
        np.testing.assert_allclose(np.asarray(x), want[name], rtol=1e-5, atol=1e-5, err_msg=name)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), lam=st.floats(-2.0, 2.0))
def test_ties_density_one_without_election_is_task_arithmetic(seed, lam):
    base, fts = _setup(seed)
    got = _ties_ta(base, tree.stack(fts), lam)
    _close(got[0], got[1])


@jax.jit
def _ties_ta(base, fts, lam):
    return (
        merge.ties(fts, base=base, density=1.0, lam=lam, elect="none", merge="sum"),
        merge.task_arithmetic(fts, base=base, lam=lam),
    )


def test_identical_finetuned_models_return_them():
    base, fts = _setup()
    same = [fts[0]] * 3
    _close(_jit(merge.ties, same, base=base, density=1.0), fts[0])
    _close(_jit(merge.task_arithmetic, same, base=base, lam=1 / 3), fts[0])
    _close(_jit(merge.dare, jax.random.key(0), same, base=base, drop=0.0, lam=1 / 3), fts[0])
    _close(_jit(merge.breadcrumbs, same, base=base, density=1.0, gamma=0.0, lam=1 / 3), fts[0])


def test_task_vector_forms_and_arithmetic():
    base, fts = _setup()
    tv = merge.task_vector(fts[0], base)
    _close(tv, tree.sub(fts[0], base))
    tvs = merge.task_vector(fts, base)
    assert isinstance(tvs, list) and len(tvs) == 3
    stacked = merge.task_vector(tree.stack(fts), base)
    _close(jax.tree.map(lambda x: x[1], stacked), tree.sub(fts[1], base))
    # addition and negation
    added = merge.task_arithmetic(fts[:2], base=base, lam=0.5)
    _close(added, tree.add_scaled(base, tree.add(tvs[0], tvs[1]), 0.5))
    negated = merge.task_arithmetic([fts[0]], base=base, lam=-1.0)
    _close(negated, tree.sub(base, tvs[0]))
    weighted = merge.task_arithmetic(fts[:2], base=base, weights=[1.0, -1.0])
    _close(weighted, tree.add(base, tree.sub(tvs[0], tvs[1])))
    # stacked input == list input
    _close(merge.ties(tree.stack(fts), base=base), merge.ties(fts, base=base))


def test_ties_jit_and_vmap_over_density_and_lam():
    base, fts = _setup(seed=3)
    ds = jnp.array([0.2, 0.5, 1.0])
    ls = jnp.array([0.3, 1.0, 1.5])
    out = jax.jit(jax.vmap(lambda d, l: merge.ties(fts, base=base, density=d, lam=l, scope="global")))(ds, ls)
    for i in range(3):
        want = merge.ties(fts, base=base, density=float(ds[i]), lam=float(ls[i]), scope="global")
        _close(jax.tree.map(lambda x: x[i], out), want)
    out = jax.vmap(lambda l: merge.task_arithmetic(fts, base=base, lam=l))(ls)
    _close(jax.tree.map(lambda x: x[2], out), merge.task_arithmetic(fts, base=base, lam=1.5))


def test_dare_inverse_is_unbiased():
    base, fts = _setup(seed=5, m=2)
    keys = jax.random.split(jax.random.key(0), 3000)
    runs = jax.jit(jax.vmap(lambda k: merge.dare(k, fts, base=base, drop=0.5)))(keys)
    mean = jax.tree.map(lambda x: x.mean(0), runs)
    want = merge.task_arithmetic(fts, base=base)
    sd = jax.tree.map(lambda x: x.std(0) / np.sqrt(3000), runs)
    for (n, a), (_, b), (_, s) in zip(tree.named_leaves(mean), tree.named_leaves(want), tree.named_leaves(sd)):
        assert np.all(np.abs(np.asarray(a) - np.asarray(b)) <= 5 * np.asarray(s) + 1e-5), n
    # one draw is not the mean: the mask really drops entries
    one = jax.tree.map(lambda x: x[0], runs)
    assert not np.allclose(one["out"], want["out"])


def test_dare_l1_preserves_each_task_vector_l1_norm():
    base, fts = _setup(seed=2, m=2)
    for i, ft in enumerate(fts):
        out = _jit(merge.dare, jax.random.key(i), [ft], base=base, drop=0.7, rescale="l1")
        zeros = []
        for (n, a), (_, b), (_, c) in zip(tree.named_leaves(out), tree.named_leaves(ft), tree.named_leaves(base)):
            tau_kept = np.asarray(a, np.float64) - np.asarray(c, np.float64)
            tau = np.asarray(b, np.float64) - np.asarray(c, np.float64)
            zeros.append(np.abs(tau_kept) < 1e-6)
            if np.any(tau_kept != 0):
                np.testing.assert_allclose(np.abs(tau_kept).sum(), np.abs(tau).sum(), rtol=1e-4, err_msg=n)
        assert np.mean(np.concatenate([z.ravel() for z in zeros])) > 0.5  # about 70% dropped


def test_dare_explicit_mask_and_exact_counts():
    base, fts = _setup(seed=4, m=2)
    mask = jax.vmap(lambda k: merge.sparsify.exact_random_mask(k, base, keep=0.25))(jax.random.split(jax.random.key(9), 2))
    out = merge.dare(None, fts, base=base, mask=mask, rescale="none")
    tvs = merge.task_vector(fts, base)
    want = tree.add(base, jax.tree.map(lambda m, a, b: jnp.where(m[0], a, 0) + jnp.where(m[1], b, 0), mask, *tvs))
    _close(out, want)
    # exact sampling keeps exactly floor((1 - drop) n) per tensor and model
    single = _jit(merge.dare, jax.random.key(1), [fts[0]], base=base, drop=0.75, sampling="exact", rescale="none")
    for (n, a), (_, c) in zip(tree.named_leaves(single), tree.named_leaves(base)):
        kept = int(np.sum(np.asarray(a) != np.asarray(c)))
        assert kept == int(np.floor(0.25 * np.size(c))), n
    # same key -> same result; vmap over drop matches the single call
    a = _jit(merge.dare, jax.random.key(3), fts, base=base, drop=0.4, combine="ties")
    drops = jnp.array([0.1, 0.4])
    out = jax.jit(jax.vmap(lambda d: merge.dare(jax.random.key(3), fts, base=base, drop=d, combine="ties")))(drops)
    _close(jax.tree.map(lambda x: x[1], out), a)


def test_breadcrumbs_masks_task_vectors_per_row():
    base, fts = _setup(seed=6, m=2)
    out = _jit(merge.breadcrumbs, fts, base=base, density=0.5, gamma=0.25, lam=1.0, out_axis=None)
    tvs = merge.task_vector(fts, base)
    masks = [merge.sparsify.breadcrumbs_mask(t, density=0.5, gamma=0.25, out_axis=None) for t in tvs]
    want = tree.add(base, jax.tree.map(lambda m0, m1, a, b: jnp.where(m0, a, 0) + jnp.where(m1, b, 0), *masks, *tvs))
    _close(out, want)
    k = _jit(merge.breadcrumbs, [fts[0]], base=base, density=0.5, gamma=0.25, out_axis=None)
    kept = np.asarray(k["dense"]["kernel"]) != np.asarray(base["dense"]["kernel"])
    # rows of 4: drop the top 1, keep the next 2
    np.testing.assert_array_equal(kept.sum(axis=-1), [2] * 5)


def test_della_inverse_is_unbiased_and_ties_variant_runs():
    base, fts = _setup(seed=8, m=1)
    keys = jax.random.split(jax.random.key(0), 2000)
    runs = jax.jit(jax.vmap(lambda k: merge.della(k, fts, base=base, density=0.5, epsilon=0.2,
                                                  combine="task_arithmetic")))(keys)
    mean = jax.tree.map(lambda x: x.mean(0), runs)
    sd = jax.tree.map(lambda x: x.std(0) / np.sqrt(2000), runs)
    for (n, a), (_, b), (_, s) in zip(tree.named_leaves(mean), tree.named_leaves(fts[0]), tree.named_leaves(sd)):
        assert np.all(np.abs(np.asarray(a) - np.asarray(b)) <= 5 * np.asarray(s) + 1e-5), n
    out = _jit(merge.della, jax.random.key(1), _setup(seed=8, m=3)[1], base=base)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(out))

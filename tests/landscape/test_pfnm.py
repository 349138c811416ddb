"""PFNM (arXiv 1905.12022) and FedMA (arXiv 2002.06440): permuted copies, disjoint units, brute force."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from landscape import Objective, align, models, tree
from landscape.align.pfnm import _match_client

_X = np.random.default_rng(0).normal(size=(7, 4)).astype(np.float32)


def _copies(fm, a, n):
    perms = [align.random_permutation(jax.random.key(10 + j), fm.spec, a) for j in range(n - 1)]
    return perms, [a] + [align.apply(fm.spec, p, a) for p in perms]


def test_pfnm_of_permuted_copies_returns_the_model():
    fm, a, _ = models.functional(models.MLP(4, (6, 3), rngs=nnx.Rngs(0)))
    perms, clients = _copies(fm, a, 2)
    res = align.pfnm(jax.random.key(0), fm.spec, clients, sigma0=1e6)  # weak prior: no shrinkage
    assert res.widths == {"P_0": 6} and res.new_units == 0 and res.local_widths == {"P_0": (6, 6)}
    np.testing.assert_array_equal(res.assignments["P_0"][0], np.arange(6))
    np.testing.assert_array_equal(res.assignments["P_0"][1], np.asarray(perms[0]["P_0"]))
    for got, want in zip(jax.tree.leaves(res.params), jax.tree.leaves(a), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # default hyperparameters (sigma = sigma0 = 1): same matching, posterior means shrunk to the prior
    shrunk = align.pfnm(jax.random.key(0), fm.spec, clients)
    assert shrunk.widths == {"P_0": 6}
    k = np.asarray(a["layers"]["0"]["kernel"])
    np.testing.assert_allclose(shrunk.params["layers"]["0"]["kernel"], 2 * k / 3, rtol=1e-5, atol=1e-6)
    # three clients of a two-hidden-layer MLP, matched layer by layer
    fm, a, _ = models.functional(models.MLP(4, (6, 5, 3), rngs=nnx.Rngs(1)))
    _, clients = _copies(fm, a, 3)
    res = align.pfnm(jax.random.key(1), fm.spec, clients, sigma0=1e6)
    assert res.widths == {"P_0": 6, "P_1": 5}
    np.testing.assert_allclose(fm(res.params, _X), fm(a, _X), rtol=1e-4, atol=1e-4)
    assert res.to_dict()["new_units"] == 0


def test_disjoint_units_become_new_global_units():
    fm, a, _ = models.functional(models.MLP(4, (5, 3), rngs=nnx.Rngs(0)))
    _, b, _ = models.functional(models.MLP(4, (5, 3), rngs=nnx.Rngs(7)))
    b = jax.tree.map(lambda t: 20.0 * t, b)  # far from a's units
    res = align.pfnm(jax.random.key(0), fm.spec, [a, b], sigma=0.01, sigma0=1e8)
    assert res.widths == {"P_0": 10} and res.new_units == 5
    # every global unit carries one client's unit (outgoing weights unshrunk at this prior), the
    # output bias is the clients' mean: global logits = sum of the clients' hidden contributions
    wide, _, _ = models.functional(models.MLP(4, (10, 3), rngs=nnx.Rngs(0)))
    bias = [m["layers"]["1"]["bias"] for m in (a, b)]
    want = sum(fm(m, _X) - bm for m, bm in zip((a, b), bias)) + (bias[0] + bias[1]) / 2
    np.testing.assert_allclose(wide(res.params, _X), want, rtol=1e-4, atol=1e-3)


def test_hungarian_step_matches_brute_force_and_closed_form():
    rng = np.random.default_rng(4)
    d, n_clients = 3, 3
    s, p = np.full(d, 2.0), np.full(d, 0.5)
    prior_nat = 0.1 * p
    g_units = rng.normal(size=(2, d))
    g_nat, g_prec = prior_nat + g_units * s, np.tile(p + s, (2, 1))
    counts = np.array([1, 1])
    local = np.vstack([g_units[1] + 0.05, rng.normal(size=(2, d)) * 3])
    cost = align.pfnm_cost(local * s, s, g_nat, g_prec, prior_nat, p, counts, gamma=1.0, n_clients=n_clients)
    assert cost.shape == (3, 5)
    best = max(sum(cost[r, c] for r, c in enumerate(cols)) for cols in itertools.permutations(range(5), 3))
    assign, new_nat, _, new_counts = _match_client(local * s, s, g_nat, g_prec, counts, prior_nat, p, 1.0, n_clients)
    # the chosen assignment attains the brute-force optimum (new units are columns 2, 3, 4)
    cols = [a if a < 2 else 2 + sorted(np.flatnonzero(assign >= 2)).index(r) for r, a in enumerate(assign)]
    np.testing.assert_allclose(sum(cost[r, c] for r, c in enumerate(cols)), best, rtol=1e-12)
    assert assign[0] == 1 and new_counts[1] == 2 and new_nat.shape[0] == 2 + int(np.sum(assign >= 2))
    # weak prior: new-unit score minus match score = s |w_l - w_i|^2 / 2 + 2 log(gamma/J) - log(1/(J-1))
    eps = np.full(d, 1e-12)
    c2 = align.pfnm_cost(local * s, s, g_units * s, np.tile(s, (2, 1)), 0 * eps, eps, counts, gamma=1.0,
                         n_clients=n_clients)
    want = s[0] * np.sum((local[:, None] - g_units[None]) ** 2, -1) / 2 + 2 * np.log(1 / 3) - np.log(1 / 2)
    np.testing.assert_allclose(c2[:, 2:3] - c2[:, :2], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(c2[:, 2] - c2[:, 3], 2 * np.log(2), rtol=1e-12)


def test_fedma_permuted_copies_mlp_and_cnn_keep_the_function():
    fm, a, _ = models.functional(models.MLP(4, (6, 5, 3), rngs=nnx.Rngs(2)))
    _, clients = _copies(fm, a, 2)
    calls = []

    def record(j, params, frozen):
        calls.append((j, sorted(frozen)))
        return params

    res = align.fedma(jax.random.key(0), fm.spec, clients, retrain=record, sigma0=1e6)
    assert res.widths == {"P_0": 6, "P_1": 5} and res.method == "fedma"
    assert calls == [(0, ["layers/0/bias", "layers/0/kernel"]), (1, ["layers/0/bias", "layers/0/kernel"])]
    np.testing.assert_allclose(fm(res.params, _X), fm(a, _X), rtol=1e-4, atol=1e-4)
    cm, c, _ = models.functional(models.CNN(1, 3, widths=(4, 5), norm=None, rngs=nnx.Rngs(3)))
    _, cclients = _copies(cm, c, 2)
    x = np.random.default_rng(1).normal(size=(3, 6, 6, 1)).astype(np.float32)
    res = align.fedma(jax.random.key(1), cm.spec, cclients, sigma0=1e6)
    assert res.widths == {"P_0": 4, "P_1": 5}
    np.testing.assert_allclose(cm(res.params, x), cm(c, x), rtol=1e-4, atol=1e-4)


def test_fedma_retrains_unfrozen_layers_on_client_data():
    fm, a, _ = models.functional(models.MLP(4, (6, 5, 3), rngs=nnx.Rngs(2)))
    _, b, _ = models.functional(models.MLP(4, (6, 5, 3), rngs=nnx.Rngs(5)))
    rng = np.random.default_rng(2)
    objs = [Objective(fm, rng.normal(size=(16, 4)).astype(np.float32), rng.integers(0, 3, 16)) for _ in range(2)]
    seen = {}
    inner = align.objective_retrain(objs, steps=20, learning_rate=0.05)

    def retrain(j, params, frozen):
        out = inner(j, params, frozen)
        seen[j] = (params, out, frozen)
        return out

    res = align.fedma(jax.random.key(0), fm.spec, [a, b], retrain=retrain, class_counts=[[5, 6, 5], [6, 5, 5]])
    for j, (before, after, frozen) in seen.items():
        for (path, old), (_, new) in zip(tree.named_leaves(before), tree.named_leaves(after), strict=True):
            assert (not np.allclose(old, new)) == (path not in frozen), path
        assert float(objs[j].loss(after)) < float(objs[j].loss(before))
    w0, w1 = res.widths["P_0"], res.widths["P_1"]
    assert res.params["layers"]["0"]["kernel"].shape == (4, w0) and res.params["layers"]["2"]["kernel"].shape == (w1, 3)
    wide, _, _ = models.functional(models.MLP(4, (w0, w1, 3), rngs=nnx.Rngs(0)))
    assert np.all(np.isfinite(np.asarray(wide(res.params, _X))))


def test_bad_inputs_are_refused():
    fm, a, _ = models.functional(models.MLP(4, (6, 3), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="at least 2"):
        align.pfnm(jax.random.key(0), fm.spec, [a])
    with pytest.raises(ValueError, match="class_counts"):
        align.pfnm(jax.random.key(0), fm.spec, [a, a], class_counts=[[1, 2]])
    with pytest.raises(ValueError, match="key"):
        align.pfnm(None, fm.spec, [a, a])
    bad = jax.tree.map(lambda t: t.at[0].set(jnp.nan) if t.ndim else t, a)
    with pytest.raises(ValueError, match="non-finite"):
        align.fedma(jax.random.key(0), fm.spec, [a, bad])
    ln, c, _ = models.functional(models.CNN(1, 3, widths=(4,), norm="layer", rngs=nnx.Rngs(3)))
    with pytest.raises(ValueError, match="norm"):
        align.pfnm(jax.random.key(0), ln.spec, [c, c])

"""ZipIt!: greedy matching on known correlations; zipping a model with a permuted copy of itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape import Objective, merge

SIZES = (4, 8, 8, 3)


def _mlp(key):
    ks = jax.random.split(key, 2 * (len(SIZES) - 1))
    return {
        "layers": [
            {"kernel": jax.random.normal(ks[2 * i], (a, b)) / np.sqrt(a), "bias": 0.3 * jax.random.normal(ks[2 * i + 1], (b,))}
            for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:]))
        ]
    }


def _apply(p, x):
    for layer in p["layers"][:-1]:
        x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
    return x @ p["layers"][-1]["kernel"] + p["layers"][-1]["bias"]


def _features(p, x):
    out = {}
    for i, layer in enumerate(p["layers"]):
        out[f"layers/{i}/kernel"] = x
        x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
    return out


def _permuted(p, perms):
    q = jax.tree.map(lambda x: x, p)
    layers = [dict(layer) for layer in p["layers"]]
    for i, perm in enumerate(perms):
        layers[i]["kernel"] = layers[i]["kernel"][:, perm]
        layers[i]["bias"] = layers[i]["bias"][perm]
        layers[i + 1]["kernel"] = layers[i + 1]["kernel"][perm, :]
    q["layers"] = layers
    return q


KERNELS = [f"layers/{i}/kernel" for i in range(3)]


def test_zipit_matching_known_pairs_and_budget():
    rng = np.random.default_rng(0)
    corr = 0.1 * rng.uniform(size=(6, 6))
    corr = (corr + corr.T) / 2
    # model 0 has features 0,1,2; model 1 has 3,4,5. Cross pairs 0-4, 1-5, 2-3; within pair 0-1 strongest.
    for i, j, v in [(0, 4, 0.9), (1, 5, 0.8), (2, 3, 0.7), (0, 1, 0.95)]:
        corr[i, j] = corr[j, i] = v
    m, u = merge.zipit_matching(corr, num_models=2, beta=0.0)
    groups = sorted(tuple(np.flatnonzero(u[:, j]).tolist()) for j in range(u.shape[1]))
    assert groups == [(0, 4), (1, 5), (2, 3)]
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(m, (u / (u.sum(0) + 1e-5)).T)
    # with a budget (beta=1: 1 within-model merge each), 0-1 merge first
    m, u = merge.zipit_matching(corr, num_models=2, beta=1.0)
    groups = [tuple(np.flatnonzero(u[:, j]).tolist()) for j in range(u.shape[1])]
    assert (0, 1) in groups and u.shape == (6, 3)


def test_zipping_a_permuted_copy_recovers_the_model():
    a = _mlp(jax.random.key(0))
    rng = np.random.default_rng(1)
    b = _permuted(a, [rng.permutation(8), rng.permutation(8)])
    x = jax.random.normal(jax.random.key(2), (64, 4))
    obj = Objective(_apply, x, jnp.zeros(64, int), batch_size=20)
    np.testing.assert_allclose(_apply(b, x), _apply(a, x), rtol=1e-5, atol=1e-5)
    res = merge.zipit([a, b], obj, kernels=KERNELS, features_fn=_features, beta=0.0)
    np.testing.assert_allclose(_apply(res.params, x), _apply(a, x), rtol=1e-3, atol=1e-4)
    info = res.to_dict()
    assert all(bd["across_models"] == 8 for bd in info["boundaries"])
    # partial zipping: shared first layer, per-model tails
    part = merge.zipit([a, b], obj, kernels=KERNELS, features_fn=_features, beta=0.0, stop_at=1)
    assert len(part.heads) == 2 and len(part.merges) == 1
    for head in part.heads:
        np.testing.assert_allclose(_apply(head, x), _apply(a, x), rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(part.heads[0]["layers"][0]["kernel"], part.heads[1]["layers"][0]["kernel"])
    np.testing.assert_array_equal(part.heads[1]["layers"][2]["kernel"], b["layers"][2]["kernel"])


def test_zipit_independent_models_and_errors():
    a, b = _mlp(jax.random.key(3)), _mlp(jax.random.key(4))
    x = jax.random.normal(jax.random.key(5), (40, 4))
    obj = Objective(_apply, x, jnp.zeros(40, int), batch_size=40)
    res = merge.zipit([a, b], obj, kernels=KERNELS, features_fn=_features)
    assert jax.tree.map(jnp.shape, res.params) == jax.tree.map(jnp.shape, a)
    assert np.all(np.isfinite(np.asarray(_apply(res.params, x))))
    boundaries = res.to_dict()["boundaries"]
    assert [bd["features"] for bd in boundaries] == [8, 8]
    with pytest.raises(ValueError, match="needs data"):
        merge.zipit([a, b], None, kernels=KERNELS, features_fn=_features)
    with pytest.raises(ValueError, match="do not chain"):
        merge.zipit([a, b], obj, kernels=[KERNELS[1], KERNELS[0]], features_fn=_features)
    with pytest.raises(ValueError, match="stop_at"):
        merge.zipit([a, b], obj, kernels=KERNELS, features_fn=_features, stop_at=3)

"""AdaMerging's mini-batch test-time entropy minimisation (arXiv 2310.02575) against the full-batch mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape import Objective, merge, tree


def _apply(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def _mlp(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"w1": jax.random.normal(k1, (4, 6)), "b1": 0.1 * jax.random.normal(k2, (6,)),
            "w2": jax.random.normal(k3, (6, 3))}


def _setup():
    rng = np.random.default_rng(3)
    base = _mlp(jax.random.key(0))
    fts = [tree.add_scaled(base, _mlp(jax.random.key(1 + i)), 0.5) for i in range(2)]
    objs = [Objective(_apply, rng.normal(size=(20, 4)).astype(np.float32), np.zeros(20, int), batch_size=7)
            for _ in fts]
    return base, fts, objs


def _entropy(params, objs):  # independent numpy reference: summed mean entropy over all examples
    total = 0.0
    for o in objs:
        z = np.asarray(_apply(params, o.x), np.float64)
        z = z - z.max(-1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        total += float(np.mean(-np.sum(p * np.log(p), axis=-1)))
    return total


def test_whole_data_minibatches_equal_full_batch_mode():
    base, fts, objs = _setup()
    full = merge.adamerging(fts, objs, base=base, steps=25, learning_rate=0.05)
    mini = merge.adamerging(fts, objs, base=base, steps=25, learning_rate=0.05, batch_size=64, key=jax.random.key(9))
    np.testing.assert_allclose(mini.losses, full.losses, rtol=1e-5)
    np.testing.assert_allclose(mini.coefficients, full.coefficients, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(full.losses[0]), _entropy(jax.tree.map(
        lambda b, a, c: b + 0.3 * (a - b) + 0.3 * (c - b), base, *fts), objs), rtol=1e-5)
    assert full.batch_size is None and mini.to_dict()["batch_size"] == 64


def test_small_minibatches_lower_entropy_and_are_deterministic():
    base, fts, objs = _setup()
    res = merge.adamerging(fts, objs, base=base, steps=60, learning_rate=0.05, batch_size=4, key=jax.random.key(1))
    init = jax.tree.map(lambda b, a, c: b + 0.3 * (a - b) + 0.3 * (c - b), base, *fts)  # every coefficient 0.3
    assert _entropy(res.params, objs) < 0.9 * _entropy(init, objs)
    again = merge.adamerging(fts, objs, base=base, steps=60, learning_rate=0.05, batch_size=4, key=jax.random.key(1))
    np.testing.assert_array_equal(again.coefficients, res.coefficients)
    other = merge.adamerging(fts, objs, base=base, steps=60, learning_rate=0.05, batch_size=4, key=jax.random.key(2))
    assert not np.array_equal(np.asarray(other.losses), np.asarray(res.losses))


def test_minibatch_needs_key_and_positive_size():
    base, fts, objs = _setup()
    with pytest.raises(ValueError, match="key"):
        merge.adamerging(fts, objs, base=base, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        merge.adamerging(fts, objs, base=base, batch_size=0, key=jax.random.key(0))

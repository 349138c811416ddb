"""Evolutionary merging (arXiv 2403.13187): CMA-ES recovers planted per-layer coefficients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape import Objective, merge

_RNG = np.random.default_rng(0)
_X = jnp.asarray(_RNG.normal(size=(24, 3)), jnp.float32)
_BASE = {"a": {"w": jnp.asarray(_RNG.normal(size=(3, 2)), jnp.float32)},
         "b": {"w": jnp.asarray(_RNG.normal(size=(3, 2)), jnp.float32)}}
_TAUS = [{"a": {"w": jnp.asarray(_RNG.normal(size=(3, 2)), jnp.float32)},
          "b": {"w": jnp.asarray(_RNG.normal(size=(3, 2)), jnp.float32)}} for _ in range(2)]
_FTS = [jax.tree.map(jnp.add, _BASE, t) for t in _TAUS]
# planted optimum: group "a" takes 0.7 tau_1 + 0.2 tau_2, group "b" takes -0.3 tau_1 + 0.9 tau_2
_C_STAR = np.array([[0.7, -0.3], [0.2, 0.9]])


def _apply(p, x):
    return jnp.concatenate([x @ p["a"]["w"], x @ p["b"]["w"]], axis=-1)


def _planted():
    target = {g: {"w": _BASE[g]["w"] + sum(_C_STAR[i, j] * _TAUS[i][g]["w"] for i in range(2))}
              for j, g in enumerate(("a", "b"))}
    return Objective(_apply, _X, _apply(target, _X), loss="mse")


def test_cmaes_recovers_planted_layer_coefficients_and_is_deterministic():
    obj = _planted()
    res = merge.evolutionary_merge(jax.random.key(0), _FTS, obj, base=_BASE, population=12, generations=40)
    assert res.groups == ("a", "b") and res.weights.shape == (2, 2)
    # the loss is a positive-definite quadratic in the 4 coefficients with minimum 0 at _C_STAR
    np.testing.assert_allclose(res.weights, _C_STAR, atol=2e-3)
    assert float(res.best_fitness) < 1e-5 < float(res.init_fitness)
    so_far = np.asarray(res.best_so_far)
    assert np.all(np.diff(so_far) <= 0)
    np.testing.assert_allclose(so_far, np.minimum.accumulate(np.asarray(res.fitness)), rtol=1e-6)
    np.testing.assert_allclose(float(res.best_fitness), so_far[-1], rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(float(obj.loss(res.params)), float(res.best_fitness), rtol=1e-5, atol=1e-9)
    again = merge.evolutionary_merge(jax.random.key(0), _FTS, obj, base=_BASE, population=12, generations=40)
    np.testing.assert_array_equal(again.weights, res.weights)
    np.testing.assert_array_equal(again.fitness, res.fitness)
    other = merge.evolutionary_merge(jax.random.key(1), _FTS, obj, base=_BASE, population=12, generations=40)
    assert not np.array_equal(np.asarray(other.fitness), np.asarray(res.fitness))
    d = res.to_dict()
    assert d["groups"] == ["a", "b"] and len(d["fitness"]) == 40 and len(res.plot().data) == 2


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_one_group_result_is_the_plain_method_at_the_found_weights(method):
    obj = _planted()
    kw = {"dare_key": jax.random.key(5), "settings": {"drop": 0.3}} if method == "dare" else {}
    res = merge.evolutionary_merge(jax.random.key(2), _FTS, [obj, obj], base=_BASE, method=method,
                                   groups="model", metric="accuracy" if method == "ties" else "loss",
                                   population=6, generations=3, **kw)
    w = res.weights[:, 0]
    if method == "dare":  # the fixed key makes the candidates' masks those of the plain call
        want = merge.dare(jax.random.key(5), _FTS, base=_BASE, drop=0.3, weights=w)
        f = 2 * obj.loss(want)
    else:
        want = merge.ties(_FTS, base=_BASE, density=0.2, merge="sum", weights=w)
        f = -2 * obj.evaluate(want)["accuracy"]
    for got, ref in zip(jax.tree.leaves(res.params), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(res.best_fitness), float(f), rtol=1e-5)


def test_nonfinite_models_propagate_as_nan_with_a_count():
    obj = _planted()
    bad = [_FTS[0], jax.tree.map(lambda t: t.at[0, 0].set(jnp.nan), _FTS[1])]
    res = merge.evolutionary_merge(jax.random.key(0), bad, obj, base=_BASE, population=12, generations=40)
    assert int(res.nonfinite) == 12 * 40 and not np.isfinite(float(res.best_fitness))
    assert np.isnan(np.asarray(res.params["a"]["w"])[0, 0])


def test_bad_settings_are_refused():
    obj = _planted()
    with pytest.raises(ValueError, match="dare_key"):
        merge.evolutionary_merge(jax.random.key(0), _FTS, obj, base=_BASE, method="dare")
    with pytest.raises(ValueError, match="search_density"):
        merge.evolutionary_merge(jax.random.key(0), _FTS, obj, base=_BASE, search_density=True)
    with pytest.raises(ValueError, match="weights"):
        merge.evolutionary_merge(jax.random.key(0), _FTS, obj, base=_BASE, settings={"weights": [1, 1]})
    with pytest.raises(ValueError, match="population"):
        merge.evolutionary_merge(jax.random.key(0), _FTS, obj, base=_BASE, population=1)
    with pytest.raises(ValueError, match="groups"):
        merge.evolutionary_merge(jax.random.key(0), _FTS, obj, base=_BASE, groups="blocks")
    assert merge.layer_groups(_BASE, "leaf") == (("a/w", "b/w"), (0, 1))
    assert merge.layer_groups(_BASE, lambda p: "x") == (("x",), (0, 0))

"""PAM check (Tatro et al. 2020): soft permutations, Sinkhorn projection, rounding, local optimality."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from landscape import Objective, align, models
from probes.pam import (
    PAMResult,
    apply_soft,
    pam_check,
    permutation_matrices,
    project_birkhoff,
    round_to_permutation,
)


@pytest.fixture(scope="module")
def zoo():
    apply_fn, a, _ = models.functional(models.MLP(4, (8, 6, 3), rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (96, 4))
    y = jnp.argmax(apply_fn(a, x), axis=-1)  # A classifies its own labels perfectly
    planted = align.random_permutation(jax.random.key(2), apply_fn.spec, a)
    b = align.apply(apply_fn.spec, planted, a)
    return apply_fn, a, b, planted, Objective(apply_fn, x, y, batch_size=32)


def test_apply_soft_with_permutation_matrices_equals_apply(zoo):
    apply_fn, a, _, _, _ = zoo
    for seed in range(3):
        perm = align.random_permutation(jax.random.key(10 + seed), apply_fn.spec, a)
        soft = apply_soft(apply_fn.spec, permutation_matrices(perm), a)
        hard = align.apply(apply_fn.spec, perm, a)
        for s, h in zip(jax.tree.leaves(soft), jax.tree.leaves(hard)):
            np.testing.assert_allclose(s, h, rtol=0, atol=1e-6)


def test_apply_soft_closed_form_for_general_matrices():
    spec = align.PermutationSpec({"w1": (None, "h"), "b1": ("h",), "w2": ("h", None)})
    k = jax.random.split(jax.random.key(0), 4)
    p = {"w1": jax.random.normal(k[0], (3, 5)), "b1": jax.random.normal(k[1], (5,)),
         "w2": jax.random.normal(k[2], (5, 2))}
    m = jax.random.uniform(k[3], (5, 5))
    out = apply_soft(spec, {"h": m}, p)
    np.testing.assert_allclose(out["w1"], p["w1"] @ m.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["b1"], m @ p["b1"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["w2"], m @ p["w2"], rtol=1e-5, atol=1e-6)


def test_projection_is_doubly_stochastic():
    rng = np.random.default_rng(0)
    for n in (1, 3, 8, 20):
        # PAM's input: a doubly-stochastic matrix (mixture of permutations) after a gradient step
        mix = sum(w * np.eye(n)[rng.permutation(n)] for w in rng.dirichlet(np.ones(3)))
        inputs = [mix + eps * rng.normal(size=(n, n)) for eps in (0.01, 0.1, 0.3)]
        inputs += [rng.uniform(0.0, s, size=(n, n)) for s in (0.1, 10.0)]  # positive matrices
        for m in inputs:
            d = np.asarray(project_birkhoff(jnp.asarray(m, dtype=jnp.float32)))
            assert (d >= 0).all()
            np.testing.assert_allclose(d.sum(axis=0), 1.0, atol=1e-3)
            np.testing.assert_allclose(d.sum(axis=1), 1.0, atol=1e-3)
    # a permutation matrix is (up to the floor) a fixed point
    p = permutation_matrices({"h": jnp.array([2, 0, 1])})["h"]
    np.testing.assert_allclose(project_birkhoff(p), p, atol=1e-5)


def test_rounding_agrees_with_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(5):
        m = rng.uniform(size=(4, 4))
        best = max(itertools.permutations(range(4)), key=lambda q: sum(m[i, q[i]] for i in range(4)))
        np.testing.assert_array_equal(np.asarray(round_to_permutation(m)), best)


def test_pam_on_permuted_copy_is_locally_optimal_and_deterministic(zoo):
    apply_fn, a, b, planted, obj = zoo
    correct = align.invert(planted)
    kw = {"outer": 2, "inner_perm": 5, "inner_phi": 10, "batch_size": 32, "num_eval": 5}
    r = pam_check(jax.random.key(0), obj, a, b, correct, **kw)
    assert isinstance(r, PAMResult)
    assert r.locally_optimal
    assert r.changed_fraction == {n: 0.0 for n in apply_fn.spec.names}
    for n in apply_fn.spec.names:
        np.testing.assert_array_equal(r.rounded[n], correct[n])
        d = np.asarray(r.relaxed[n])
        np.testing.assert_allclose(d.sum(axis=1), 1.0, atol=1e-3)
        np.testing.assert_allclose(d.sum(axis=0), 1.0, atol=1e-3)
    assert r.phi_losses.shape == (2, 10) and r.perm_losses.shape == (2, 5)
    # the curve runs from A to A: the endpoints are exact and perfect on A's own labels
    np.testing.assert_allclose(np.asarray(r.before.accuracy)[[0, -1]], 1.0)
    np.testing.assert_allclose(np.asarray(r.after.accuracy)[[0, -1]], 1.0)
    d = r.to_dict()
    assert d["locally_optimal"] is True and d["settings"]["projection"] == "sinkhorn"
    again = pam_check(jax.random.key(0), obj, a, b, correct, **kw)
    for n in apply_fn.spec.names:
        np.testing.assert_array_equal(again.relaxed[n], r.relaxed[n])
    np.testing.assert_array_equal(again.phi_losses, r.phi_losses)
    assert again.to_dict() == d


def test_pam_bad_input(zoo):
    apply_fn, a, b, planted, obj = zoo
    good = align.invert(planted)
    kw = {"inner_perm": 1, "inner_phi": 1}
    with pytest.raises(ValueError, match="spec uses"):
        pam_check(jax.random.key(0), obj, a, b, {"P_0": good["P_0"]}, **kw)
    bad = dict(good, P_0=jnp.zeros_like(good["P_0"]))
    with pytest.raises(ValueError, match=r"'P_0'\]? (must be|is not) a permutation"):
        pam_check(jax.random.key(0), obj, a, b, bad, **kw)
    with pytest.raises(ValueError, match="outer must be an int >= 1"):
        pam_check(jax.random.key(0), obj, a, b, good, outer=0)
    with pytest.raises(ValueError, match="perm_learning_rate must be a positive"):
        pam_check(jax.random.key(0), obj, a, b, good, perm_learning_rate=-1.0)
    plain = Objective(lambda p, x: apply_fn(p, x), obj.x, obj.y)
    with pytest.raises(ValueError, match="needs a PermutationSpec"):
        pam_check(jax.random.key(0), plain, a, b, good, **kw)
    with pytest.raises(ValueError, match="has shape"):
        apply_soft(apply_fn.spec, {n: jnp.eye(2) for n in apply_fn.spec.names}, a)
    with pytest.raises(ValueError, match="square matrix"):
        project_birkhoff(jnp.ones((2, 3)))

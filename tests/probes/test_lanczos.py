"""Oracle tests for probes.lanczos against dense eigendecompositions (float64)."""

from __future__ import annotations

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from probes import lanczos


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def sym(seed: int, n: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(n, n))
    return (a + a.T) / 2


@functools.partial(jax.jit, static_argnames=("steps", "reorthogonalize", "stop"))
def _tridiagonalize(A, v0, key, *, steps, reorthogonalize=True, stop=None):
    return lanczos.tridiagonalize(key, lambda u: A @ u, v0, steps, reorthogonalize=reorthogonalize, stop=stop)


def run(A, key=0, steps=None, v0=None, **kw):
    """Lanczos on a dense symmetric matrix (compiled once per shape and setting)."""
    A = jnp.asarray(A)
    n = A.shape[0]
    v0 = jax.random.normal(jax.random.key(key + 1000), (n,)) if v0 is None else jnp.asarray(v0)
    return _tridiagonalize(A, v0, jax.random.key(key), steps=steps or n, **kw)


def test_full_krylov_space_reproduces_the_spectrum_across_chunks():
    A = sym(0, 40)  # 40 steps: three 16-row chunks of the basis, the last one partly filled
    tri = run(A)
    theta, S, resid = lanczos.ritz(tri)
    np.testing.assert_allclose(theta, np.linalg.eigvalsh(A), rtol=1e-10, atol=1e-10)
    Q = np.asarray(tri.basis[:40])
    np.testing.assert_allclose(Q @ Q.T, np.eye(40), atol=1e-12)  # full reorthogonalisation
    T = np.diag(tri.alpha) + np.diag(tri.beta[:-1], 1) + np.diag(tri.beta[:-1], -1)
    np.testing.assert_allclose(Q @ A @ Q.T, T, atol=1e-10)
    assert int(tri.num_steps) == 40 and bool(tri.finite)


def test_lanczos_identity_and_ritz_residuals():
    A = sym(1, 60)
    K = 25
    tri = run(A, steps=K)
    theta, S, resid = lanczos.ritz(tri)
    Q = np.asarray(tri.basis[:K])
    for i in (0, K - 1):  # extreme Ritz pairs: ‖A y − θ y‖ equals |β_K s_K,i|
        y = S[:, i] @ Q
        explicit = np.linalg.norm(A @ y - theta[i] * y)
        assert explicit == pytest.approx(float(resid[i]), rel=1e-6, abs=1e-12)
    evals = np.linalg.eigvalsh(A)
    assert abs(float(theta[K - 1]) - evals[-1]) <= float(resid[K - 1]) + 1e-12


def test_invariant_subspace_restarts_and_finds_multiplicities():
    # eigenvalue 1 three times: a Krylov space holds one copy; restarts find the other two
    A = np.diag([1.0, 1.0, 1.0, 2.0, 5.0, 7.0])
    tri = run(A)
    theta, S, _ = lanczos.ritz(tri)
    np.testing.assert_allclose(theta, [1, 1, 1, 2, 5, 7], atol=1e-12)
    assert int(tri.restarts) == 2 and bool(tri.finite)
    # a start vector inside an invariant subspace, and the zero matrix: no NaN, exact answers
    tri = run(A, v0=np.array([1.0, 0, 0, 0, 0, 0]), steps=3)
    theta, _, resid = lanczos.ritz(tri)
    assert int(tri.restarts) == 1 and bool(tri.finite)
    assert np.any(np.isclose(np.asarray(theta), 1.0, atol=1e-12))  # the eigenpair found at once, residual zero
    assert float(np.min(np.abs(np.asarray(resid)))) == 0.0
    zero = run(np.zeros((5, 5)), steps=4)
    assert bool(zero.finite) and int(zero.restarts) == 3
    np.testing.assert_allclose(lanczos.ritz(zero)[0], 0.0, atol=1e-15)


def test_restarted_blocks_have_zero_quadrature_weight():
    A = np.diag([1.0, 1.0, 3.0, 3.0])
    v = np.array([1.0, 0, 1.0, 0]) / np.sqrt(2)  # spectral measure: 1/2 at 1, 1/2 at 3
    tri = run(A, v0=v)
    theta, S, _ = lanczos.ritz(tri)
    w = np.asarray(S[0]) ** 2
    assert int(tri.restarts) >= 1
    assert float(np.sum(w * np.asarray(theta))) == pytest.approx(2.0, abs=1e-12)
    assert float(np.sum(w)) == pytest.approx(1.0, abs=1e-12)


def _top_converged(theta, resid, j):
    return resid[j - 1] <= 1e-10 * jnp.abs(theta[j - 1])


def test_early_stop_and_unused_slots():
    A = np.diag(np.r_[np.linspace(0, 1, 195), [3.0, 4.0, 6.0, 10.0, 20.0]])

    tri = run(A, steps=60, stop=_top_converged)
    j = int(tri.num_steps)
    assert 2 <= j < 60
    theta, S, resid = lanczos.ritz(tri)
    assert float(theta[j - 1]) == pytest.approx(20.0, rel=1e-12)
    np.testing.assert_allclose(theta[j:], theta[j - 1])  # unused slots repeat the top: still sorted
    np.testing.assert_allclose(S[0, j:], 0.0)  # and carry no quadrature weight
    assert np.all(np.asarray(resid[j:]) == 0.0)
    assert np.all(np.asarray(tri.alpha[j:]) == 0.0)


def test_non_finite_products_are_reported():
    A = sym(2, 8)
    tri = jax.jit(
        lambda v: lanczos.tridiagonalize(jax.random.key(0), lambda u: A @ u * jnp.nan, v, 8)
    )(jnp.ones(8))
    assert not bool(tri.finite) and int(tri.num_steps) == 1  # stops at the first bad product
    assert np.all(np.isnan(np.asarray(lanczos.ritz(tri)[0])))
    assert not bool(run(A, v0=np.zeros(8)).finite)


def test_without_reorthogonalisation_extremes_still_converge():
    A = np.diag(np.r_[np.linspace(0, 1, 300), [2.0, 3.0]])
    tri = run(A, steps=60, reorthogonalize=False)
    theta, _, _ = lanczos.ritz(tri)
    assert float(theta[-1]) == pytest.approx(3.0, rel=1e-10)
    Q = np.asarray(tri.basis[:60])
    assert np.max(np.abs(Q @ Q.T - np.eye(60))) > 1e-6  # orthogonality is lost, as expected
    ortho = run(A, steps=60)
    Q = np.asarray(ortho.basis[:60])
    assert np.max(np.abs(Q @ Q.T - np.eye(60))) < 1e-12


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.sampled_from([2, 3, 7, 20]))
def test_full_space_matches_dense_eigvalsh(seed, n):
    with jax.enable_x64(True):
        A = sym(seed, n)
        theta, _, _ = lanczos.ritz(run(A, key=seed))
        np.testing.assert_allclose(theta, np.linalg.eigvalsh(A), rtol=1e-8, atol=1e-8 * np.abs(A).max())

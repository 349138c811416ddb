"""Hutch++ (Meyer et al., arXiv 2010.09649) in ``probes.hessian.trace(method="hutchpp")``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from landscape import Objective
from probes import hessian


def _quadratic(A: np.ndarray) -> tuple[Objective, dict]:
    """An objective whose Hessian is exactly ``A``: ``L(w) = ½ wᵀ A w``."""
    A = jnp.asarray(A, jnp.float32)
    obj = Objective(
        lambda p, x: 0.5 * (p["w"] @ A @ p["w"]) * jnp.ones((x.shape[0], 1)),
        jnp.zeros((1, 1)), jnp.zeros((1, 1)), loss=lambda z, y: z[:, 0],
    )
    return obj, {"w": jnp.ones(A.shape[0], jnp.float32)}


def _low_rank(n: int, r: int, seed: int, noise: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.normal(size=(n, r)))
    A = U @ np.diag(np.linspace(10.0, 5.0, r)) @ U.T
    if noise:
        B = rng.normal(size=(n, n))
        A = A + noise * (B + B.T) / 2
    return A


def _estimates(method: str, obj: Objective, p: dict, m: int, num_keys: int) -> np.ndarray:
    keys = jax.random.split(jax.random.key(3), num_keys)
    return np.asarray(jax.vmap(lambda k: hessian.trace(k, obj, p, method=method, num_probes=m).estimate)(keys))


def test_exact_below_sketch_rank():
    A = _low_rank(40, 3, seed=0)  # rank 3 < k = 12 // 3 = 4 sketch vectors
    obj, p = _quadratic(A)
    res = hessian.trace(jax.random.key(0), obj, p, method="hutchpp", num_probes=12)
    assert res.num_matvecs == 12 and res.method == "hutchpp" and bool(res.finite)
    np.testing.assert_allclose(float(res.estimate), np.trace(A), rtol=1e-5)
    assert float(res.stderr) < 1e-4 * np.trace(A)
    assert res.samples.shape == (12 - 2 * 4,)


def test_unbiased_on_tiny_model_dense_hessian():
    ks = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(ks[0], (16, 3))
    y = jax.random.randint(ks[1], (16,), 0, 3)
    p = {"w": 0.8 * jax.random.normal(ks[2], (3, 4)), "v": 0.8 * jax.random.normal(ks[3], (4, 3))}
    obj = Objective(lambda q, xb: jnp.tanh(xb @ q["w"]) @ q["v"], x, y, batch_size=16)
    flat, unravel = ravel_pytree(p)
    exact = float(jnp.trace(jax.hessian(lambda f: obj.loss(unravel(f)))(flat)))
    est = _estimates("hutchpp", obj, p, 6, 300)
    sem = est.std(ddof=1) / np.sqrt(est.size)
    assert abs(est.mean() - exact) < 4 * sem + 1e-6, (est.mean(), exact, sem)


def test_smaller_error_than_hutchinson_at_equal_matvecs():
    A = _low_rank(60, 4, seed=2, noise=0.02)  # a few large eigenvalues over a small bulk
    obj, p = _quadratic(A)
    exact = np.trace(A)
    m = 24
    err_pp = np.sqrt(np.mean((_estimates("hutchpp", obj, p, m, 64) - exact) ** 2))
    err_h = np.sqrt(np.mean((_estimates("hutchinson", obj, p, m, 64) - exact) ** 2))
    assert err_pp < 0.25 * err_h, (err_pp, err_h)


def test_bad_probe_count():
    obj, p = _quadratic(np.eye(5))
    with pytest.raises(ValueError, match="num_probes"):
        hessian.trace(jax.random.key(0), obj, p, method="hutchpp", num_probes=3)
    with pytest.raises(ValueError, match="method"):
        hessian.trace(jax.random.key(0), obj, p, method="hutch++", num_probes=6)

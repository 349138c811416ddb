"""Rematerialised curvature products (``remat=``) and the memory estimate (``probes.memory``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape import Objective, sharding, tree
from probes import hessian, memory

L, H, N = 3, 32, 128


def _mlp(batch_size: int) -> tuple[Objective, dict]:
    ks = jax.random.split(jax.random.key(0), L + 2)
    p = {f"w{i}": 0.3 * jax.random.normal(ks[i], (H, H)) for i in range(L)}
    p["out"] = 0.3 * jax.random.normal(ks[L], (H, 4))

    def apply(q, x):
        for i in range(L):
            x = jnp.tanh(x @ q[f"w{i}"])
        return x @ q["out"]

    x = jax.random.normal(ks[L + 1], (N, H))
    y = jnp.arange(N) % 4
    return Objective(apply, x, y, batch_size=batch_size), p


def test_remat_products_and_eigenvalues_agree():
    obj, p = _mlp(64)
    v = tree.random_like(jax.random.key(1), p)
    plain = hessian.hvp(obj, p, v)
    got = hessian.hvp(obj, p, v, remat="dots")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    key = jax.random.key(2)
    e0 = hessian.eigenvalues(key, obj, p, k=3, num_steps=20, linearize=True)
    e1 = hessian.eigenvalues(key, obj, p, k=3, num_steps=20, linearize=True, remat="full")
    np.testing.assert_allclose(np.asarray(e1.eigenvalues), np.asarray(e0.eigenvalues), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown remat 'some'"):
        hessian.hvp(obj, p, v, remat="some")


def test_estimate_exact_sizes_and_activation_bound(capsys):
    obj, p = _mlp(32)
    n = L * H * H + H * 4
    est = memory.estimate(obj, p, probe="eigenvalues", k=5, num_steps=20, linearize=False, verbose=True)
    assert est.parameter_bytes == 4 * n and est.num_params == n
    assert est.basis_shape == (32, n) and est.basis_bytes == 32 * n * 4  # 20 steps -> 2 chunks of 16 rows
    assert est.activation_source == "xla" and not est.linearize
    assert "memory estimate for eigenvalues" in capsys.readouterr().out
    # the per-batch product's temporaries grow with the batch by c · B · (Σ widths) · 4 bytes, 1 <= c <= 8
    big = memory.estimate(obj.replace(batch_size=64), p, probe="eigenvalues", k=5, num_steps=20, linearize=False)
    slope = (big.activation_bytes - est.activation_bytes) / (32 * L * H * 4)
    assert 1.0 <= slope <= 8.0, slope
    # the hoisted linearisation stores every batch: c · N · (Σ widths) · 4 bytes, 1 <= c <= 8; remat shrinks it
    hoisted = memory.estimate(obj, p, probe="eigenvalues", k=5, num_steps=20, linearize=True)
    assert 1.0 <= hoisted.linearized_bytes / (N * L * H * 4) <= 8.0
    rem = memory.estimate(obj, p, probe="eigenvalues", k=5, num_steps=20, linearize=True, remat="full")
    assert rem.linearized_bytes < 0.75 * hoisted.linearized_bytes
    tr = memory.estimate(obj, p, probe="trace", method="hutchinson", num_probes=8)
    assert tr.basis_shape == (8, n)
    with pytest.raises(ValueError, match="unknown probe"):
        memory.estimate(obj, p, probe="curvature")


def test_estimate_sharded_basis_is_padded_and_split():
    obj, p = _mlp(64)
    ps = sharding.shard_params(p, sharding.make_mesh({"model": 8}), min_size=64)
    est = memory.estimate(obj, ps, probe="density", num_steps=10, num_probes=2, linearize=False)
    n = L * H * H + H * 4  # 3200, a multiple of 8: no padding
    assert est.devices == 8 and est.basis_shape == (10 + 2, n)
    assert est.basis_bytes == (10 + 2) * n * 4
    assert est.per_device_bytes == -(-(est.parameter_bytes + est.basis_bytes) // 8) + est.activation_bytes
    assert est.to_dict()["total_bytes"] == est.total_bytes

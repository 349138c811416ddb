"""Data-parallel Objective over 8 forced CPU devices: sharded numbers equal the single-device ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from landscape import Objective
from probes import hessian

RTOL = 1e-5  # float32; measured max relative difference 9e-8 (loss), 2.4e-7 (grad), 2.8e-7 (HVP)


def mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


@pytest.fixture(scope="module")
def setup():
    if jax.device_count() < 8:
        pytest.fail("the mesh tests need 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
    k = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(k[0], (101, 5))  # 101 examples, batches of 26 -> 32 rows on 8 devices
    y = jax.random.randint(k[1], (101,), 0, 3)
    p = {"w1": jax.random.normal(k[2], (5, 6)), "b1": 0.1 * jax.random.normal(k[3], (6,)),
         "w2": jax.random.normal(k[4], (6, 3))}
    return x, y, p


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def test_sharded_loss_grad_hvp_eigenvalues_equal_unsharded(setup):
    x, y, p = setup
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    plain = Objective(mlp, x, y, batch_size=30)
    sharded = Objective(mlp, x, y, batch_size=30, mesh=mesh, data_axis="data")
    xb, _, mb = sharded.batches()
    assert xb.shape == (4, 28, 5) and int(mb.sum()) == 101  # 26 rounded up to a multiple of 4
    assert xb.sharding.spec == jax.sharding.PartitionSpec(None, "data")
    v = jax.tree.map(jnp.cos, p)
    both = jax.jit(lambda o, q, u: (o.evaluate(q), jax.grad(o.loss)(q), hessian.hvp(o, q, u)))
    compiled = both.lower(sharded, p, v).compile()
    assert "all-reduce" in compiled.as_text()  # XLA reduces across the data shards
    (ea, ga, ha), (eb, gb, hb) = compiled(sharded, p, v), both(plain, p, v)
    for k in ("loss", "accuracy"):
        assert _rel(ea[k], eb[k]) < RTOL
    for u, w in zip(jax.tree.leaves((ga, ha)), jax.tree.leaves((gb, hb))):  # gradient and HVP
        assert _rel(u, w) < RTOL
    es = hessian.eigenvalues(jax.random.key(1), sharded, p, k=2, num_steps=20).eigenvalues
    flat, unravel = ravel_pytree(p)  # against the dense Hessian of the single-device loss
    dense = jax.jit(jax.hessian(lambda f: plain.loss(unravel(f))))(flat)
    np.testing.assert_allclose(es, np.linalg.eigvalsh(np.asarray(dense, np.float64))[::-1][:2], rtol=RTOL)


def test_sharded_token_objective(setup):
    mesh = jax.make_mesh((8,), ("batch",))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 5, (13, 4)), jnp.int32)
    y = jnp.concatenate([ids[:, 1:], jnp.full((13, 1), -100, jnp.int32)], axis=1)
    p = {"e": jax.random.normal(jax.random.key(2), (5, 5))}

    def apply_fn(q, x):
        return jnp.cumsum(q["e"][x], axis=1)

    plain = Objective(apply_fn, ids, y, loss="next_token", batch_size=5)
    sharded = plain.replace(mesh=mesh, data_axis="batch")
    assert sharded.batches()[0].shape == (3, 8, 4)
    assert _rel(sharded.loss(p), plain.loss(p)) < RTOL
    assert _rel(jax.grad(sharded.loss)(p)["e"], jax.grad(plain.loss)(p)["e"]) < RTOL


def test_bad_mesh(setup):
    x, y, _ = setup
    mesh = jax.make_mesh((8,), ("data",))
    with pytest.raises(ValueError, match=r"data_axis 'batch' is not an axis of the mesh; its axes are \('data',\)"):
        Objective(mlp, x, y, mesh=mesh, data_axis="batch")
    with pytest.raises(TypeError, match="jax.sharding.Mesh"):
        Objective(mlp, x, y, mesh="data")

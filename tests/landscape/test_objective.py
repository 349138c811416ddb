"""Objective: full-dataset means with a partial last batch, against hand-written references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape import Objective


def mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


@pytest.fixture
def setup():
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k1, (103, 5))  # 103 = 4 * 25 + 3: a partial last batch
    y = jax.random.randint(k2, (103,), 0, 3)
    params = {
        "w1": jax.random.normal(k3, (5, 7)), "b1": jnp.zeros(7),
        "w2": jax.random.normal(k4, (7, 3)), "b2": jnp.zeros(3),
    }
    return x, y, params


def reference(params, x, y):
    logits = np.asarray(mlp(params, x), np.float64)
    logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    nll = logz - logits[np.arange(len(y)), np.asarray(y)]
    acc = (logits.argmax(1) == np.asarray(y)).mean()
    return nll.mean(), acc


@pytest.mark.parametrize("batch_size", [1, 7, 25, 103, 512])
def test_matches_full_batch_reference(setup, batch_size):
    x, y, params = setup
    obj = Objective(mlp, x, y, batch_size=batch_size)
    ref_loss, ref_acc = reference(params, x, y)
    out = obj.evaluate(params)
    np.testing.assert_allclose(out["loss"], ref_loss, rtol=1e-6)
    np.testing.assert_allclose(out["accuracy"], ref_acc, rtol=1e-6)
    np.testing.assert_allclose(obj.loss(params), ref_loss, rtol=1e-6)


def test_jit_vmap_grad_agree(setup):
    x, y, params = setup
    obj = Objective(mlp, x, y, batch_size=10)
    eager = obj.loss(params)
    np.testing.assert_allclose(jax.jit(obj.loss)(params), eager, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda o, p: o.loss(p))(obj, params), eager, rtol=1e-6)
    scaled = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a]), params)
    batched = jax.vmap(obj.loss)(scaled)
    np.testing.assert_allclose(batched[0], eager, rtol=1e-6)
    np.testing.assert_allclose(batched[1], obj.loss(jax.tree.map(lambda a: 0.5 * a, params)), rtol=1e-6)
    g = jax.grad(obj.loss)(params)
    g_ref = jax.grad(lambda p: jnp.mean(Objective(mlp, x, y, batch_size=103).loss_fn(mlp(p, x), y)))(params)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_mse_and_callable_losses(setup):
    x, y, params = setup
    obj = Objective(mlp, x, y, loss="mse", batch_size=20)
    out = np.asarray(mlp(params, x))
    onehot = np.eye(3)[np.asarray(y)]
    np.testing.assert_allclose(obj.loss(params), ((out - onehot) ** 2).mean(), rtol=1e-6)
    custom = Objective(mlp, x, y, loss=lambda logits, t: jnp.sum(jnp.abs(logits), -1), batch_size=9)
    np.testing.assert_allclose(custom.loss(params), np.abs(out).sum(1).mean(), rtol=1e-6)
    soft = Objective(mlp, x, jax.nn.one_hot(y, 3), batch_size=9)
    np.testing.assert_allclose(soft.loss(params), Objective(mlp, x, y).loss(params), rtol=1e-6)


def test_logits_in_order_and_replace(setup):
    x, y, params = setup
    obj = Objective(mlp, x, y, batch_size=10)
    np.testing.assert_allclose(obj.logits(params), mlp(params, x), rtol=1e-6, atol=1e-6)
    assert obj.replace(batch_size=3).batch_size == 3
    assert obj.replace(x=x[:10], y=y[:10]).num_examples == 10


def test_bad_input():
    x, y = jnp.zeros((4, 2)), jnp.zeros(5, jnp.int32)
    with pytest.raises(ValueError, match=r"\(4, 2\) and \(5,\)"):
        Objective(mlp, x, y)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        Objective(mlp, x, y[:4], loss="hinge")
    with pytest.raises(ValueError, match="batch_size"):
        Objective(mlp, x, y[:4], batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        Objective(mlp, jnp.zeros((0, 2)), jnp.zeros(0, jnp.int32))


def test_batches_are_evened_out_and_masked():
    obj = Objective(mlp, jnp.zeros((1797, 5)), jnp.zeros(1797, jnp.int32), batch_size=512)
    xb, yb, mask = obj.batches()
    assert xb.shape == (4, 450, 5) and yb.shape == (4, 450)
    assert int(mask.sum()) == 1797 and not bool(mask[-1, -1])

"""GGN, Fisher and empirical-Fisher products against dense matrices built from their definitions,
and ``connectivity_vs_width`` against a hand-run of the pairs it promises to train."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from landscape import Objective, data, models
from landscape.objective import LOSSES
from landscape.train import Trainer, make_optimizer
from probes import hessian
from probes.characteristics import connectivity_vs_width
from probes.curves import interpolate


def mlp(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def tiny_problem(loss="cross_entropy"):
    k = jax.random.split(jax.random.key(0), 6)
    params = {"w1": jax.random.normal(k[0], (3, 4)), "b1": 0.1 * jax.random.normal(k[1], (4,)),
              "w2": jax.random.normal(k[2], (4, 3)), "b2": 0.1 * jax.random.normal(k[3], (3,))}
    x = jax.random.normal(k[4], (7, 3))
    y = jax.random.randint(k[5], (7,), 0, 3)
    # 7 examples in batches of 3: the padded last batch must not change the 1/n weights
    return Objective(mlp, x, y, loss=loss, batch_size=3), params, x, y


def dense_references(params, x, y, loss):
    """GGN, Fisher and empirical Fisher from their definitions, example by example (float64 sums)."""
    flat, unravel = ravel_pytree(params)
    loss_fn = LOSSES[loss]
    n = x.shape[0]

    def per_example(xi, yi):
        f = lambda w: mlp(unravel(w), xi[None])[0]  # noqa: E731
        z = f(flat)
        jac = jax.jacobian(f)(flat)  # (C, P)
        h_out = jax.hessian(lambda z_: loss_fn(z_[None], yi[None])[0])(z)  # (C, C)
        g = jax.grad(lambda w: loss_fn(f(w)[None], yi[None])[0])(flat)  # (P,)
        # gradients of log p(c | x_i) for every class c, and p(c | x_i)
        log_p_grads = jax.jacobian(lambda w: jax.nn.log_softmax(f(w)))(flat)  # (C, P)
        return jac, h_out, g, log_p_grads, jax.nn.softmax(z)

    jac, h_out, g, lpg, probs = (np.asarray(a, np.float64) for a in jax.jit(jax.vmap(per_example))(x, y))
    ggn = np.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / n
    emp = g.T @ g / n
    # true Fisher: E_{c ~ p_i} [∇ log p(c|x_i) ∇ log p(c|x_i)^T], the expectation summed over classes
    fisher = np.einsum("nc,ncp,ncq->pq", probs, lpg, lpg) / n
    return ggn, fisher, emp, unravel


def products(fn, obj, params, vs, unravel, **kw):
    return np.stack([np.asarray(ravel_pytree(fn(obj, params, unravel(v), **kw))[0], np.float64) for v in vs])


@pytest.fixture(scope="module")
def ce():
    obj, params, x, y = tiny_problem()
    ggn, fisher, emp, unravel = dense_references(params, x, y, "cross_entropy")
    vs = np.asarray(jax.random.normal(jax.random.key(9), (3, ggn.shape[0])), np.float32)
    return obj, params, vs, ggn, fisher, emp, unravel


def test_ggn_vp_is_jt_h_j(ce):
    obj, params, vs, ggn, _, _, unravel = ce
    got = products(hessian.ggn_vp, obj, params, vs, unravel)
    np.testing.assert_allclose(got, vs @ ggn.T, rtol=1e-4, atol=1e-5)
    assert np.linalg.eigvalsh(ggn).min() > -1e-6  # a GGN of a convex loss is positive semi-definite


def test_fisher_vp_is_the_expected_outer_product(ce):
    obj, params, vs, ggn, fisher, _, unravel = ce
    got = products(hessian.fisher_vp, obj, params, vs, unravel)
    np.testing.assert_allclose(got, vs @ fisher.T, rtol=1e-4, atol=1e-5)
    # for the softmax cross-entropy the true Fisher and the GGN are the same matrix
    np.testing.assert_allclose(fisher, ggn, rtol=1e-4, atol=1e-6)


def test_empirical_fisher_vp_is_the_mean_gradient_outer_product(ce):
    obj, params, vs, _, fisher, emp, unravel = ce
    got = products(hessian.empirical_fisher_vp, obj, params, vs, unravel)
    np.testing.assert_allclose(got, vs @ emp.T, rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(emp - fisher) > 1e-2 * np.linalg.norm(fisher)  # away from a minimum they differ
    assert np.linalg.matrix_rank(emp, tol=1e-8) <= 7  # a sum of 7 rank-one terms


def test_filtered_products_are_the_dense_block(ce):
    obj, params, vs, ggn, _, _, unravel = ce
    flat, _ = ravel_pytree(params)
    mask = np.asarray(ravel_pytree(jax.tree.map(jnp.zeros_like, params) | {"w2": jnp.ones((4, 3))})[0]) > 0
    got = products(hessian.ggn_vp, obj, params, vs, unravel, filter="w2")
    want = (vs * mask) @ (ggn * np.outer(mask, mask)).T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.all(got[:, ~mask] == 0)
    dense = np.asarray(hessian.dense_matrix(obj, params, curvature="ggn", filter="w2"), np.float64)
    np.testing.assert_allclose(dense, ggn[np.ix_(mask, mask)], rtol=1e-4, atol=1e-5)
    assert flat.size == mask.size


def test_ggn_vp_for_mse_uses_the_mse_output_hessian():
    obj, params, x, y = tiny_problem("mse")
    ggn, _, emp, unravel = dense_references(params, x, y, "mse")
    vs = np.asarray(jax.random.normal(jax.random.key(3), (2, ggn.shape[0])), np.float32)
    np.testing.assert_allclose(products(hessian.ggn_vp, obj, params, vs, unravel), vs @ ggn.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(products(hessian.empirical_fisher_vp, obj, params, vs, unravel), vs @ emp.T,
                               rtol=1e-4, atol=1e-5)
    # H_out of the mean squared error over C outputs is (2 / C) I: the GGN is (2 / C) (1/n) Σ J^T J
    flat, _ = ravel_pytree(params)
    jac = np.asarray(jax.jacobian(lambda w: mlp(unravel(w), x))(flat)).reshape(-1, flat.size)
    np.testing.assert_allclose(ggn, (2 / 3) * jac.T @ jac / len(x), rtol=1e-4, atol=1e-6)


def test_connectivity_vs_width_trains_the_promised_pairs():
    ds = data.load("blobs", seed=0, num_samples=96, num_classes=3, dim=4)
    kw = {"seeds": (0,), "epochs": 2, "batch_size": 16, "learning_rate": 1e-2}
    res = connectivity_vs_width(jax.random.key(0), ds, widths=[(4, 3)], methods=("naive",), num=5,
                                singular_k=0, **kw)
    assert list(res) == ["4-3"] and res["4-3"].label == "4-3"
    # by hand: pair 0 has init seeds (0, 1) and data-order seeds (1000, 1001), trained with Adam
    x, y = ds.train
    members = []
    for init in (0, 1):
        fn, p, st = models.functional(models.build("mlp", jax.random.key(init), in_features=4, widths=(4, 3, 3)))
        trainer = Trainer(fn, x, y, optimizer=make_optimizer("adam", learning_rate=1e-2), batch_size=16)
        members.append(trainer.run(jax.random.key(1000 + init), trainer.init(p, st), epochs=2).params)
    direct = interpolate(Objective(fn, x, y), members[0], members[1], num=5)
    sample = res["4-3"].samples[0]
    got = sample.paths["naive"]["train"]
    np.testing.assert_allclose(np.asarray(got.loss), np.asarray(direct.loss), rtol=1e-5, atol=1e-6)
    assert sample.barrier("naive") == pytest.approx(direct.barrier.loss, rel=1e-5, abs=1e-6)
    table = res["4-3"].table()["naive"]["train"]["loss_barrier"]
    assert table["mean"] == pytest.approx(direct.barrier.loss, rel=1e-5, abs=1e-6)
    assert set(sample.paths["naive"]) == {"train", "test"}
    with pytest.raises(ValueError, match="needs at least one width"):
        connectivity_vs_width(jax.random.key(0), ds, widths=[], **kw)

"""MoE merging against closed forms: a router that always picks one expert is that expert; the Switch
load-balancing loss by hand; router gradients; hidden-state prototypes from the zoo model; probes run on it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from landscape import Objective, merge, models, tree
from probes.curves import interpolate
from probes.hessian import eigenvalues

E = 3
WIDTHS = (8, 8, 3)


def _zoo(seed):
    fn, p, _ = models.functional(models.MLP(6, WIDTHS, rngs=nnx.Rngs(seed)))
    return fn, p


def _experts(base):
    """Hidden layers perturbed per expert, the head kept (fine-tuned with a frozen head)."""
    out = []
    for e in range(E):
        key = jax.random.key(100 + e)
        noise = tree.scale(tree.random_like(key, base), 0.5)
        p = tree.add(base, noise)
        p["layers"]["2"] = base["layers"]["2"]
        out.append(p)
    return out


FN, BASE = _zoo(0)
EXPERTS = _experts(BASE)
X = jax.random.uniform(jax.random.key(7), (16, 6), minval=0.1, maxval=1.0)
Y = jnp.arange(16) % 3


_grad = jax.jit(lambda obj, p: jax.grad(obj.loss)(p))
_apply = jax.jit(lambda fn, p, x: fn(p, x), static_argnums=0)
_routing = jax.jit(lambda fn, p, x: fn.routing(p, x), static_argnums=0)


def _force(moe, e, scale):
    """Router kernels whose column e is +scale and the others -scale (inputs are >= 0: e always wins)."""
    params = jax.tree.map(lambda v: v, moe.params)
    for name in map(str, moe.apply_fn.moe_layers):
        k = params["layers"][name]["router"]["kernel"]
        col = jnp.where(jnp.arange(E) == e, scale, -scale).astype(k.dtype)
        params["layers"][name]["router"]["kernel"] = jnp.broadcast_to(col, k.shape)
    return params


@pytest.mark.parametrize("router", ["topk", "switch"])
def test_router_always_picking_one_expert_is_that_expert(router):
    moe = merge.moe_from_mlps(EXPERTS, base=BASE, gate="random", key=jax.random.key(1), router=router, top_k=1)
    for e in range(E):
        params = _force(moe, e, 1e3 if router == "switch" else 1.0)
        routes = _routing(moe.apply_fn, params, X)
        assert sorted(routes) == ["0", "1"]
        for r in routes.values():  # the premise: every layer routes every example to e
            np.testing.assert_array_equal(np.asarray(r.experts[:, 0]), e)
            np.testing.assert_array_equal(np.asarray(r.weights[:, 0]), 1.0)
        got = _apply(moe.apply_fn, params, X)
        want = _apply(FN, EXPERTS[e], X)  # the zoo (flax) forward pass of the expert
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_shared_layers_come_from_base_or_average():
    moe = merge.moe_from_mlps(EXPERTS, base=BASE, examples=[X] * E, moe_layers=[1])
    np.testing.assert_array_equal(moe.params["layers"]["0"]["kernel"], BASE["layers"]["0"]["kernel"])
    avg = merge.moe_from_mlps(EXPERTS, examples=[X] * E, moe_layers=[1])
    assert avg.shared == "average"
    want = sum(np.asarray(p["layers"]["0"]["kernel"]) for p in EXPERTS) / E
    np.testing.assert_allclose(avg.params["layers"]["0"]["kernel"], want, rtol=1e-6)
    np.testing.assert_array_equal(moe.params["layers"]["1"]["experts"]["kernel"][2],
                                  EXPERTS[2]["layers"]["1"]["kernel"])


def test_hidden_gate_is_normalised_mean_hidden_state_of_the_base():
    xs = [X[:5], X[5:11], X[11:]]
    neg = [None, X[:3], None]
    moe = merge.moe_from_mlps(EXPERTS, base=BASE, examples=xs, negative=neg)
    inputs = [FN.intermediates(BASE, x, kind="input") for x in xs]
    neg_in = FN.intermediates(BASE, X[:3], kind="input")
    for layer in ("0", "1"):
        cols = []
        for e in range(E):
            v = np.asarray(inputs[e][f"layers/{layer}/kernel"]).mean(0)
            if e == 1:
                v = v - np.asarray(neg_in[f"layers/{layer}/kernel"]).mean(0)
            cols.append(v / np.linalg.norm(v))
        np.testing.assert_allclose(moe.params["layers"][layer]["router"]["kernel"], np.stack(cols, 1), rtol=1e-5,
                                   atol=1e-6)


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balancing_loss_by_hand(top_k):
    moe = merge.moe_from_mlps(EXPERTS, base=BASE, gate="random", key=jax.random.key(3), top_k=top_k, moe_layers=[0])
    x = np.asarray(X[:5])
    w = np.asarray(moe.params["layers"]["0"]["router"]["kernel"], np.float64)
    p = _softmax(x.astype(np.float64) @ w)
    order = np.argsort(-p, axis=1, kind="stable")[:, :top_k]
    want = 0.0
    for j in range(top_k):
        f = np.bincount(order[:, j], minlength=E) / x.shape[0]
        want += E * np.sum(f * p.mean(0))
    got = float(merge.load_balancing_loss(moe.apply_fn, moe.params, x))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # uniform routing (a zero router) gives P_i = 1/E and, for k = 1, loss exactly 1
    flat = jax.tree.map(lambda v: v, moe.params)
    flat["layers"]["0"]["router"]["kernel"] = jnp.zeros_like(flat["layers"]["0"]["router"]["kernel"])
    np.testing.assert_allclose(float(merge.load_balancing_loss(moe.apply_fn, flat, x)), float(top_k), rtol=1e-6)


def test_switch_routing_gradients_flow_through_the_gate():
    def router_grad(moe):
        g = _grad(Objective(moe.apply_fn, X, Y), moe.params)
        return [np.abs(np.asarray(g["layers"]["0"]["router"]["kernel"])).max()]

    kw = {"base": BASE, "gate": "random", "key": jax.random.key(4), "moe_layers": [0]}
    switch = max(router_grad(merge.moe_from_mlps(EXPERTS, router="switch", top_k=1, **kw)))
    assert switch > 1e-4
    # renormalised top-1 gives the chosen expert weight exactly 1: no gradient reaches the router
    assert max(router_grad(merge.moe_from_mlps(EXPERTS, top_k=1, **kw))) < 1e-6 * switch
    # and the auxiliary loss reaches the router through P_i
    moe = merge.moe_from_mlps(EXPERTS, router="switch", top_k=1, **kw)
    g = jax.jit(jax.grad(lambda p: merge.load_balancing_loss(moe.apply_fn, p, X)))(moe.params)
    assert np.abs(np.asarray(g["layers"]["0"]["router"]["kernel"])).max() > 0


def test_probes_run_on_the_moe():
    fn, base = models.functional(models.MLP(6, (5, 3), rngs=nnx.Rngs(1)))[:2]
    experts = [tree.add(base, tree.scale(tree.random_like(jax.random.key(i), base), 0.3)) for i in range(2)]
    a = merge.moe_from_mlps(experts, base=base, examples=[X[:8], X[8:]], top_k=2)
    b = merge.moe_from_mlps(experts, base=base, gate="random", key=jax.random.key(5), top_k=2)
    obj = Objective(a.apply_fn, X, Y)
    ev = obj.evaluate(a.params)
    assert np.isfinite(float(ev["loss"])) and 0 <= float(ev["accuracy"]) <= 1
    path = interpolate(obj, a.params, b.params, num=5)
    np.testing.assert_allclose(path.loss[0], ev["loss"], rtol=1e-5)
    assert np.isfinite(float(path.barrier.loss))
    spec = eigenvalues(jax.random.key(0), obj, a.params, k=1, num_steps=8, linearize=False)
    flat, unravel = tree.ravel(a.params)
    dense = jax.jit(jax.hessian(lambda v: obj.loss(unravel(v))))(flat)
    np.testing.assert_allclose(float(spec.eigenvalues[0]), float(np.linalg.eigvalsh(np.asarray(dense))[-1]),
                               rtol=1e-3)


def test_bad_input():
    with pytest.raises(ValueError, match="top_k must be 1"):
        merge.moe_from_mlps(EXPERTS, base=BASE, gate="random", key=jax.random.key(0), router="switch", top_k=2)
    with pytest.raises(ValueError, match="at least 2"):
        merge.moe_from_mlps(EXPERTS[:1], base=BASE, examples=[X])
    with pytest.raises(ValueError, match="examples"):
        merge.moe_from_mlps(EXPERTS, base=BASE)
    with pytest.raises(ValueError, match="zoo-MLP"):
        merge.moe_from_mlps([{"w": jnp.ones(2)}, {"w": jnp.ones(2)}], examples=[X, X])
    bad = jax.tree.map(lambda v: v, EXPERTS[1])
    bad["layers"]["1"]["kernel"] = jnp.ones((8, 9))
    with pytest.raises(ValueError, match="layers/1/kernel"):
        merge.moe_from_mlps([EXPERTS[0], bad], examples=[X, X])
    with pytest.raises(ValueError, match="moe_layers"):
        merge.moe_from_mlps(EXPERTS, base=BASE, examples=[X] * E, moe_layers=[2])

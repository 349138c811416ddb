"""Averaging merges against closed forms: average, SWA, greedy soup, Model Stock, SLERP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from landscape import Objective, merge, tree


def _model(key, scale=1.0):
    k1, k2 = jax.random.split(key)
    return {
        "dense": {"kernel": scale * jax.random.normal(k1, (4, 3)), "bias": jax.random.normal(k2, (3,))},
        "scale": jnp.array(2.0),
    }


def _models(n, seed=0):
    return [_model(jax.random.key(seed * 100 + i)) for i in range(n)]


def _close(a, b, **kw):
    kw.setdefault("atol", 1e-6)
    for (na, xa), (_, xb) in zip(tree.named_leaves(a), tree.named_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(xa), np.asarray(xb), err_msg=na, **kw)


@jax.jit
def _merges_of_identical(p, base, t):
    same = tree.stack([p, p, p])
    return (
        merge.average(same, stacked=True),
        merge.average(same, weights=jnp.array([1.0, 2.0, 3.0]), stacked=True),
        merge.swa(same, stacked=True),
        merge.slerp(p, p, t=t),
        merge.model_stock(same, base=base),
        merge.model_stock(same, base=base, scope="row", angle="angle"),
    )


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), t=st.floats(0.0, 1.0))
def test_identical_models_return_them(seed, t):
    p = _model(jax.random.key(seed))
    base = _model(jax.random.key(seed + 1))
    outs = _merges_of_identical(p, base, t)
    for out in outs[:4]:
        _close(out, p, rtol=1e-5)
    for out in outs[4:]:
        _close(out, p, rtol=1e-4, atol=1e-4)


def test_average_closed_forms():
    ms = _models(3)
    w = np.array([1.0, 3.0, 6.0])
    got = merge.average(ms, weights=w)
    want = jax.tree.map(lambda *xs: sum(wi * x for wi, x in zip(w, xs)) / w.sum(), *ms)
    _close(got, want, rtol=1e-6)
    # uniform == FedSGD mean; stacked input gives the same
    _close(merge.average(tree.stack(ms), stacked=True), jax.tree.map(lambda *xs: sum(xs) / 3, *ms), rtol=1e-6)
    # signed combination without normalisation: a - b
    diff = merge.average(ms[:2], weights=[1.0, -1.0], normalize=False)
    _close(diff, tree.sub(ms[0], ms[1]), rtol=1e-6)
    # FedAvg by sample counts
    counts = jnp.array([10, 30, 60])
    _close(merge.average(ms, weights=counts), want, rtol=1e-6)


def test_average_jit_vmap_over_weights():
    ms = _models(2)
    ws = jnp.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    out = jax.jit(jax.vmap(lambda w: merge.average(ms, weights=w)))(ws)
    for i, w in enumerate(ws):
        _close(jax.tree.map(lambda x: x[i], out), merge.average(ms, weights=np.asarray(w)), rtol=1e-6)


def test_average_keeps_dtype():
    ms = [jax.tree.map(lambda x: x.astype(jnp.bfloat16), m) for m in _models(2)]
    out = merge.average(ms)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


def test_swa_running_average_equals_mean():
    ms = _models(5)
    _close(merge.swa(ms), jax.tree.map(lambda *xs: sum(xs) / 5, *ms), rtol=1e-5, atol=1e-6)
    avg = ms[0]
    for k, p in enumerate(ms[1:], start=1):
        avg = merge.swa_update(avg, p, k)
    _close(avg, merge.swa(ms), rtol=1e-5, atol=1e-6)


def test_slerp_closed_form_and_fallback():
    a = {"v": jnp.array([1.0, 0.0, 0.0])}
    b = {"v": jnp.array([0.0, 2.0, 0.0])}
    for t in [0.0, 0.25, 0.5, 1.0]:
        # Omega = pi/2: sin((1-t)pi/2) a + sin(t pi/2) b (unnormalised vectors, mergekit)
        want = np.cos(t * np.pi / 2) * np.array([1, 0, 0]) + np.sin(t * np.pi / 2) * np.array([0, 2, 0])
        np.testing.assert_allclose(merge.slerp(a, b, t=t)["v"], want, atol=1e-6)
    # endpoints exact for generic vectors
    x, y = _models(2)
    _close(merge.slerp(x, y, t=0.0), x, rtol=1e-6)
    _close(merge.slerp(x, y, t=1.0), y, rtol=1e-6)
    # colinear (and antipodal) inputs: lerp
    c = {"v": jnp.array([2.0, 4.0, 6.0])}
    np.testing.assert_allclose(merge.slerp(a | {"v": c["v"] / 2}, c, t=0.3)["v"], 0.7 * c["v"] / 2 + 0.3 * c["v"], rtol=1e-6)
    np.testing.assert_allclose(merge.slerp(c, {"v": -c["v"]}, t=0.25)["v"], 0.5 * c["v"], rtol=1e-6)


def test_slerp_matches_independent_reference():
    x, y = _models(2, seed=3)
    t = 0.37
    got = merge.slerp(x, y, t=t)
    for (name, g), (_, a), (_, b) in zip(tree.named_leaves(got), tree.named_leaves(x), tree.named_leaves(y)):
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        if a.size == 1:  # a scalar leaf is colinear with itself
            continue
        om = np.arccos(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        want = (np.sin((1 - t) * om) * a + np.sin(t * om) * b) / np.sin(om)
        np.testing.assert_allclose(np.asarray(g).ravel(), want, rtol=1e-4, atol=1e-5, err_msg=name)


def test_slerp_vmap_over_t_and_jit():
    x, y = _models(2)
    ts = jnp.linspace(0, 1, 4)
    out = jax.jit(jax.vmap(lambda t: merge.slerp(x, y, t=t)))(ts)
    for i, t in enumerate(ts):
        _close(jax.tree.map(lambda z: z[i], out), merge.slerp(x, y, t=float(t)), rtol=1e-5, atol=1e-6)


def test_model_stock_closed_form():
    base = {"w": jnp.zeros(2)}
    # task vectors at 60 degrees: cos = 1/2, k = 2 -> t = 2 * 0.5 / (1 + 0.5) = 2/3
    t1, t2 = jnp.array([1.0, 0.0]), jnp.array([0.5, np.sqrt(3) / 2])
    out = merge.model_stock([{"w": t1}, {"w": t2}], base=base)
    np.testing.assert_allclose(out["w"], (2 / 3) * (t1 + t2) / 2, rtol=1e-5)
    # orthogonal task vectors: t = 0 -> the base
    out = merge.model_stock([{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 3.0])}], base=base)
    np.testing.assert_allclose(out["w"], [0.0, 0.0], atol=1e-7)


def test_model_stock_k3_cosine_vs_angle_and_rows():
    rng = np.random.default_rng(0)
    base = {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)}
    common = rng.normal(size=(3, 5))
    fts = [{"w": base["w"] + jnp.asarray(common + 0.7 * rng.normal(size=(3, 5)), jnp.float32)} for _ in range(3)]
    taus = [np.asarray(f["w"] - base["w"], np.float64) for f in fts]

    def ref(groups, angle):
        out = []
        for g in groups:
            cs = []
            for i in range(3):
                for j in range(i + 1, 3):
                    a, b = g[i], g[j]
                    cs.append(np.clip(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-6), -1, 1))
            c = np.mean(cs) if angle == "cosine" else np.cos(np.mean(np.arccos(cs)))
            out.append(3 * c / (1 + 2 * c))
        return np.array(out)

    mean_tau = sum(taus) / 3
    stock = jax.jit(merge.model_stock, static_argnames=("scope", "angle"))
    for angle in ["cosine", "angle"]:
        t = ref([[tau.ravel() for tau in taus]], angle)[0]
        got = stock(fts, base=base, angle=angle)["w"]
        np.testing.assert_allclose(got, np.asarray(base["w"]) + t * mean_tau, rtol=1e-4, atol=1e-5)
        rows = [[tau[r] for tau in taus] for r in range(3)]
        tr = ref(rows, angle)
        got = stock(fts, base=base, angle=angle, scope="row", out_axis=None)["w"]
        np.testing.assert_allclose(got, np.asarray(base["w"]) + tr[:, None] * mean_tau, rtol=1e-4, atol=1e-5)
    a = stock(fts, base=base, angle="cosine")["w"]
    b = stock(fts, base=base, angle="angle")["w"]
    assert not np.allclose(a, b, atol=1e-7)


def _linear_objective():
    x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0], [-1.0, 2.0]])
    y = jnp.array([0, 1, 0, 0, 1])
    return Objective(lambda p, x: x @ p["w"] + p["b"], x, y, batch_size=2)


def test_greedy_soup_keeps_only_helpful_models():
    obj = _linear_objective()
    good = {"w": jnp.array([[1.0, -1.0], [-1.0, 1.0]]), "b": jnp.array([0.1, 0.0])}
    ok = {"w": jnp.array([[1.2, -0.8], [-0.9, 1.1]]), "b": jnp.zeros(2)}
    bad = {"w": jnp.array([[-9.0, 9.0], [9.0, -9.0]]), "b": jnp.zeros(2)}
    res = merge.greedy_soup([bad, ok, good], obj)
    assert res.individual_accuracies[0] < 0.5
    assert res.members[0] in (1, 2) and 0 not in res.members
    _close(res.params, merge.average([[bad, ok, good][i] for i in res.members]), rtol=1e-6)
    assert res.accuracy == pytest.approx(float(obj.evaluate(res.params)["accuracy"]))
    # the soup's accuracy never decreases along accepted trials
    accepted = [a for _, a, okd in res.trials if okd]
    assert accepted == sorted(accepted)
    d = res.to_dict()
    assert d["members"] == list(res.members) and len(d["trials"]) == 3
    assert len(res.plot().data) == 2
    # given order starts from model 0 even though it is bad
    assert merge.greedy_soup([bad, ok, good], obj, order="given").members[0] == 0

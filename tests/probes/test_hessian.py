"""Oracle tests for probes.hessian: dense jax.hessian, closed forms and Monte Carlo error bars.

All numerics run in float64 inside ``jax.enable_x64(True)`` (a context manager, so the flag does
not leak into other test files in the same process).
"""

from __future__ import annotations

import json

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import plotly.graph_objects as go
import pytest
from hypothesis import given, settings

from landscape import Objective, tree
from probes import hessian as H

@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def mlp_apply(p, x):
    return jnp.tanh(x @ p["layers"]["0"]["kernel"] + p["layers"]["0"]["bias"]) @ p["layers"]["1"]["kernel"] + p[
        "layers"
    ]["1"]["bias"]


def make_mlp(seed=0, n=37, d=4, h=5, c=3, loss="cross_entropy", batch_size=8):
    """A 2-layer tanh MLP with 4*5+5+5*3+3 = 43 parameters and n=37 examples (a partial batch)."""
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (n, d))
    y = jax.random.randint(ks[1], (n,), 0, c)
    p = {
        "layers": {
            "0": {"kernel": jax.random.normal(ks[2], (d, h)), "bias": 0.1 * jax.random.normal(ks[3], (h,))},
            "1": {"kernel": jax.random.normal(ks[4], (h, c)), "bias": 0.1 * jax.random.normal(ks[5], (c,))},
        }
    }
    return Objective(mlp_apply, x, y, loss=loss, batch_size=batch_size), p


@pytest.fixture(scope="module")
def mlp():
    with jax.enable_x64(True):
        obj, p = make_mlp()
        dense = dense_hessian(obj, p)
        evals = np.linalg.eigvalsh(dense)
        return obj, p, dense, evals


@jax.jit
def _dense_hessian(obj, p):
    flat, unravel = tree.ravel(p)
    return jax.hessian(lambda f: obj.loss(unravel(f)))(flat)


def dense_hessian(obj, p):
    """The independent oracle: jax.hessian of objective.loss on the flattened params."""
    return np.asarray(_dense_hessian(obj, p))


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300))


# ------------------------------------------------------------------------------------ spectra
def test_top5_and_bottom3_match_dense_hessian(mlp):
    obj, p, _, evals = mlp
    # "which" and "k" only pick Ritz pairs: all three calls share one compiled Lanczos run
    top = H.eigenvalues(jax.random.key(1), obj, p, k=5, which="top", num_steps=36)
    bottom = H.eigenvalues(jax.random.key(2), obj, p, k=3, which="bottom", num_steps=36)
    assert rel(top.eigenvalues, evals[::-1][:5]) < 1e-8
    assert rel(bottom.eigenvalues, evals[:3]) < 1e-8
    assert bool(top.converged) and bool(bottom.converged)
    both = H.eigenvalues(jax.random.key(3), obj, p, k=3, which="both", num_steps=36)
    assert rel(both.eigenvalues, np.concatenate([evals[::-1][:3], evals[:3]])) < 1e-8
    assert evals[0] < 0  # the test point has negative curvature, so "bottom" is meaningful


def test_ritz_vectors_and_residuals(mlp):
    obj, p, _, _ = mlp
    res = H.eigenvalues(jax.random.key(4), obj, p, k=3, num_steps=12, vectors=True)
    hv = jax.jit(jax.vmap(lambda w: H.hvp(obj, p, w)))(res.eigenvectors)
    for i in range(3):
        v = jax.tree.map(lambda a, i=i: a[i], res.eigenvectors)
        assert abs(float(tree.norm(v)) - 1) < 1e-10
        hvi = jax.tree.map(lambda a, i=i: a[i], hv)
        explicit = float(tree.norm(tree.add_scaled(hvi, v, -res.eigenvalues[i])))
        # the Lanczos identity |beta_K s_K| equals the explicit residual up to rounding
        assert explicit == pytest.approx(float(res.residuals[i]), rel=1e-6, abs=1e-12)
    # with few steps the smaller Ritz pairs are visibly unconverged, and the residual says so
    assert float(res.residuals[2]) > float(res.residuals[0])


def test_power_iteration_matches_pyhessian_definition(mlp):
    obj, p, _, evals = mlp
    res = H.power_iteration(jax.random.key(5), obj, p, k=2, max_iter=500, tol=1e-8)
    by_magnitude = evals[np.argsort(-np.abs(evals))]
    assert rel(res.eigenvalues, by_magnitude[:2]) < 1e-4
    assert bool(np.all(res.converged))
    assert np.all(np.asarray(res.num_iterations) < 500)


def test_quadratic_hessian_is_its_matrix():
    # mse on a linear model: L(w) = (1/n) sum (x_i.w - y_i)^2, so H = (2/n) X^T X exactly
    x = jax.random.normal(jax.random.key(0), (23, 6))
    y = jax.random.normal(jax.random.key(1), (23, 1))
    obj = Objective(lambda p, x: x @ p["w"], x, y, loss="mse", batch_size=5)
    p = {"w": jax.random.normal(jax.random.key(2), (6, 1))}
    A = 2 * np.asarray(x).T @ np.asarray(x) / 23
    v = {"w": jax.random.normal(jax.random.key(3), (6, 1))}
    mats, hv = jax.jit(
        lambda o, q, w: ({c: H.dense_matrix(o, q, curvature=c) for c in ("hessian", "ggn")}, H.hvp(o, q, w))
    )(obj, p, v)
    for curvature in ("hessian", "ggn"):
        np.testing.assert_allclose(mats[curvature], A, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(hv["w"], A @ np.asarray(v["w"]), rtol=1e-12)
    spec = H.eigenvalues(jax.random.key(4), obj, p, k=6, num_steps=6)
    np.testing.assert_allclose(spec.eigenvalues, np.linalg.eigvalsh(A)[::-1], rtol=1e-10)
    # a full Krylov space reproduces the whole spectrum as SLQ nodes, weights summing to one
    dens = H.density(jax.random.key(5), obj, p, num_probes=3, num_steps=6)
    for row in range(3):
        np.testing.assert_allclose(np.sort(dens.nodes[row]), np.linalg.eigvalsh(A), rtol=1e-9)
        assert float(jnp.sum(dens.weights[row])) == pytest.approx(1.0, abs=1e-12)
    assert float(dens.trace) == pytest.approx(np.trace(A), rel=0.5)  # 3 probes: rough


def test_full_dataset_hvp_equals_single_batch(mlp):
    obj, p, dense, _ = mlp  # batch_size 8 over 37 examples: the last batch is padded
    one = obj.replace(batch_size=37)
    v = tree.random_like(jax.random.key(6), p)
    products = jax.jit(lambda o, w: {c: H.curvature_vp(o, p, w, curvature=c) for c in H.CURVATURES})
    batched, single = products(obj, v), products(one, v)
    for curvature in H.CURVATURES:
        a, b = tree.ravel(batched[curvature])[0], tree.ravel(single[curvature])[0]
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(tree.ravel(batched["hessian"])[0], dense @ tree.ravel(v)[0], rtol=1e-10, atol=1e-13)


def _dense_outer(obj, p, h_out):
    """(1/n) sum_i J_i^T h_out(z_i, y_i) J_i from dense per-example Jacobians."""

    def outer(obj, p):
        flat, unravel = tree.ravel(p)
        J = jax.jacobian(lambda f: obj.apply_fn(unravel(f), obj.x))(flat)  # (n, C, P)
        z = obj.apply_fn(p, obj.x)
        Hout = jax.vmap(h_out)(z, obj.y)  # (n, C, C)
        return jnp.einsum("ncp,ncd,ndq->pq", J, Hout, J) / obj.num_examples

    return np.asarray(jax.jit(outer)(obj, p))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_ggn_and_fisher_equal_dense_jacobian_products(loss):
    obj, p = make_mlp(seed=1, loss=loss)
    per = obj.loss_fn
    ggn = _dense_outer(obj, p, lambda z, y: jax.hessian(lambda zz: per(zz[None], y[None])[0])(z))

    def fisher_out(z, y):
        q = jax.nn.softmax(z)
        return jnp.diag(q) - jnp.outer(q, q)

    fisher = _dense_outer(obj, p, fisher_out)
    names = ("ggn", "fisher", "empirical_fisher")  # one compilation for the three matrices
    mats = jax.jit(lambda o, q: {c: H.dense_matrix(o, q, curvature=c) for c in names})(obj, p)
    np.testing.assert_allclose(mats["ggn"], ggn, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mats["fisher"], fisher, rtol=1e-10, atol=1e-12)
    if loss == "cross_entropy":  # the true Fisher of a softmax model is its GGN
        np.testing.assert_allclose(fisher, ggn, rtol=1e-10, atol=1e-12)
    flat, unravel = tree.ravel(p)
    per_example_grad = jax.grad(lambda f, x, y: per(obj.apply_fn(unravel(f), x[None]), y[None])[0])
    g = jax.jit(jax.vmap(per_example_grad, in_axes=(None, 0, 0)))(flat, obj.x, obj.y)
    emp = np.asarray(g.T @ g / obj.num_examples)
    np.testing.assert_allclose(mats["empirical_fisher"], emp, rtol=1e-10, atol=1e-12)
    if loss == "cross_entropy":
        top = H.eigenvalues(jax.random.key(0), obj, p, k=2, curvature="ggn", num_steps=30)
        assert rel(top.eigenvalues, np.linalg.eigvalsh(ggn)[::-1][:2]) < 1e-8
    assert np.min(np.linalg.eigvalsh(ggn)) > -1e-10  # GGN of a convex loss is PSD


def test_filter_restricts_to_block(mlp):
    obj, p, dense, _ = mlp
    sizes = [x.size for _, x in tree.named_leaves(p)]  # order: 0/bias, 0/kernel, 1/bias, 1/kernel
    names = [nm for nm, _ in tree.named_leaves(p)]
    start = sum(sizes[:2])
    block = dense[start:, start:]
    assert names[2:] == ["layers/1/bias", "layers/1/kernel"]
    for filt in ("layers/1/", lambda name: name.startswith("layers/1")):
        np.testing.assert_allclose(H.dense_matrix(obj, p, filter=filt), block, rtol=1e-10, atol=1e-13)
        res = H.eigenvalues(jax.random.key(0), obj, p, k=2, filter=filt, num_steps=18, vectors=True)
        assert rel(res.eigenvalues, np.linalg.eigvalsh(block)[::-1][:2]) < 1e-8
        assert float(jnp.max(jnp.abs(res.eigenvectors["layers"]["0"]["kernel"]))) == 0.0
    v = tree.random_like(jax.random.key(1), p)
    out = H.hvp(obj, p, v, filter="layers/1/")
    assert float(jnp.max(jnp.abs(out["layers"]["0"]["bias"]))) == 0.0
    np.testing.assert_allclose(tree.ravel(out)[0][start:], block @ tree.ravel(v)[0][start:], rtol=1e-10)


# -------------------------------------------------------------------------------------- trace
@pytest.mark.parametrize(("method", "num_probes"), [("hutchinson", 400), ("xtrace", 12)])
def test_trace_unbiased_within_three_standard_errors(mlp, method, num_probes):
    obj, p, dense, _ = mlp
    exact = np.trace(dense)
    for seed in range(3):
        res = H.trace(jax.random.key(seed), obj, p, method=method, num_probes=num_probes)
        assert bool(res.finite) and float(res.stderr) > 0
        assert abs(float(res.estimate) - exact) < 3 * float(res.stderr)


def test_xtrace_exact_when_probes_cover_half_the_space(mlp):
    obj, p, dense, _ = mlp
    res = H.trace(jax.random.key(0), obj, p, method="xtrace", num_probes=22)
    assert float(res.estimate) == pytest.approx(np.trace(dense), rel=1e-10)
    assert float(res.stderr) == pytest.approx(0.0, abs=1e-10)


# ------------------------------------------------------------------------------------ density
def test_slq_reproduces_dense_spectral_moments(mlp):
    obj, p, _, evals = mlp
    res = H.density(jax.random.key(7), obj, p, num_probes=64, num_steps=8)
    nodes, weights = np.asarray(res.nodes), np.asarray(res.weights)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)
    for power in (1, 2, 3):  # quadrature is exact to degree 15: only the probe average is random
        per_probe = np.sum(weights * nodes**power, axis=1)
        se = per_probe.std(ddof=1) / np.sqrt(len(per_probe))
        assert abs(per_probe.mean() - np.mean(evals**power)) < 3 * se
    assert float(res.moment(2)) == pytest.approx(np.sum(weights * nodes**2, axis=1).mean())
    # extreme nodes converge to the extreme eigenvalues; the smoothed density integrates to one
    assert nodes.max() == pytest.approx(evals[-1], rel=1e-4)
    dx = float(res.grid[1] - res.grid[0])
    assert float(jnp.sum(res.density)) * dx == pytest.approx(1.0, abs=1e-3)
    assert 0.0 < float(res.negative_mass) < 1.0


# ------------------------------------------------------------------------- per layer and path
def test_per_layer_matches_dense_blocks(mlp):
    obj, p, dense, _ = mlp
    res = H.per_layer(jax.random.key(0), obj, p, num_steps=30, num_probes=300)
    assert res.names == ("layers/0", "layers/1") and res.sizes == (25, 18)
    blocks = [dense[:25, :25], dense[25:, 25:]]
    for i, block in enumerate(blocks):
        assert rel(res.top[i], np.linalg.eigvalsh(block)[-1]) < 1e-8
        assert abs(float(res.trace[i]) - np.trace(block)) < 3 * float(res.trace_stderr[i])
    json.dumps(res.to_dict())
    assert isinstance(res.plot(), go.Figure)


def test_along_path_matches_dense_at_each_point(mlp):
    obj, p, _, _ = mlp
    q = tree.scale(p, 0.5)
    # summary(quick=True)'s settings (30 steps, 16 probes): compiled once for both tests
    res = H.along_path(
        jax.random.key(0), obj, lambda t: tree.lerp(p, q, t), [0.0, 0.5, 1.0], k=2, num_steps=30, num_probes=16
    )
    for i, t in enumerate([0.0, 0.5, 1.0]):
        pt = tree.lerp(p, q, t)
        evals = np.linalg.eigvalsh(dense_hessian(obj, pt))
        assert rel(res.top[i], evals[::-1][:2]) < 1e-8
        assert float(res.loss[i]) == pytest.approx(float(obj.loss(pt)), rel=1e-12)
    assert res.top.shape == (3, 2) and bool(jnp.all(res.converged))
    json.dumps(res.to_dict())
    assert isinstance(res.plot(), go.Figure)


# ------------------------------------------------------------------------ algebra and plumbing
@jax.jit
def _products(obj, p, u, v):
    out = {}
    for c in H.CURVATURES:
        cu, cv = H.curvature_vp(obj, p, u, curvature=c), H.curvature_vp(obj, p, v, curvature=c)
        out[c] = (tree.vdot(u, cv), tree.vdot(cu, v))
    return out


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.1, 3.0))
def test_curvature_products_are_symmetric(seed, scale):
    with jax.enable_x64(True):
        obj, p = make_mlp(seed=2)
        p = tree.scale(p, scale)
        ku, kv = jax.random.split(jax.random.key(seed))
        u, v = tree.random_like(ku, p), tree.random_like(kv, p)
        for lhs, rhs in _products(obj, p, u, v).values():
            assert float(lhs) == pytest.approx(float(rhs), rel=1e-10, abs=1e-12)


def test_jit_of_eigenvalues_matches_eager(mlp):
    obj, p, _, _ = mlp
    key = jax.random.key(9)
    eager = H.eigenvalues(key, obj, p, k=2, num_steps=30).eigenvalues
    jitted = jax.jit(lambda prm: H.eigenvalues(key, obj, prm, k=2, num_steps=30).eigenvalues)(p)
    np.testing.assert_allclose(eager, jitted, rtol=1e-12)


def test_results_are_json_safe_and_plot(mlp):
    obj, p, _, _ = mlp
    out = H.summary(jax.random.key(0), obj, p, quick=True)
    text = json.dumps(out)
    assert "NaN" not in text and out["num_params"] == 43
    # the same settings as summary(quick=True): compiled once
    assert isinstance(H.eigenvalues(jax.random.key(0), obj, p, k=3, num_steps=30).plot(), go.Figure)
    fig = H.density(jax.random.key(0), obj, p, num_probes=1, num_steps=40, grid=200).plot()
    assert fig.layout.yaxis.type == "log"


# --------------------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors(mlp):
    obj, p, _, _ = mlp
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="k must be"):
        H.eigenvalues(key, obj, p, k=44)
    with pytest.raises(ValueError, match="k must be"):
        H.eigenvalues(key, obj, p, k=22, which="both")
    with pytest.raises(ValueError, match="num_steps"):
        H.eigenvalues(key, obj, p, k=2, num_steps=50)
    with pytest.raises(ValueError, match="selects no parameters"):
        H.eigenvalues(key, obj, p, filter="conv")
    with pytest.raises(ValueError, match="selects no parameters"):
        H.trace(key, obj, p, filter=lambda name: False)
    with pytest.raises(ValueError, match="accepted"):
        H.eigenvalues(key, obj, p, curvature="kfac")
    with pytest.raises(ValueError, match="accepted"):
        H.eigenvalues(key, obj, p, which="largest")
    with pytest.raises(ValueError, match="accepted"):
        H.trace(key, obj, p, method="hutch++")
    with pytest.raises(ValueError, match="num_probes"):
        H.trace(key, obj, p, method="xtrace", num_probes=44)
    bad = jax.tree.map(lambda a: a, p)
    bad["layers"]["1"]["bias"] = bad["layers"]["1"]["bias"].at[0].set(jnp.nan)
    with pytest.raises(ValueError, match="layers/1/bias"):
        H.eigenvalues(key, obj, bad)


def test_non_finite_loss_is_reported_not_hidden(mlp):
    obj, p, _, _ = mlp
    nan_obj = obj.replace(x=obj.x.at[3, 0].set(jnp.nan))
    key = jax.random.key(0)
    # settings compiled by earlier tests, so this reuses their executables
    spec = H.eigenvalues(key, nan_obj, p, k=2, num_steps=30)
    assert not bool(spec.converged) and not np.isfinite(float(spec.loss))
    assert not bool(H.trace(key, nan_obj, p, method="xtrace", num_probes=12).finite)
    assert not bool(H.density(key, nan_obj, p, num_probes=64, num_steps=8).finite)
    power = H.power_iteration(key, nan_obj, p, k=2, max_iter=500, tol=1e-8)
    assert not bool(np.any(power.converged)) and np.all(np.asarray(power.num_iterations) == 500)


# ----------------------------------------------------------------- early stopping and linearising
def test_default_lanczos_stops_once_the_wanted_pairs_converge(mlp):
    obj, p, _, evals = mlp
    res = H.eigenvalues(jax.random.key(11), obj, p, k=3)  # num_steps=None: stop on tol=1e-3
    assert bool(res.converged) and 3 <= int(res.num_matvecs) < 43
    scale = np.max(np.abs(evals))
    assert np.all(np.asarray(res.residuals) <= 1e-3 * scale)
    for val, r in zip(np.asarray(res.eigenvalues), np.asarray(res.residuals)):
        assert np.min(np.abs(evals - val)) <= r * (1 + 1e-8)  # a Ritz value is within its residual
    tight = H.eigenvalues(jax.random.key(11), obj, p, k=3, which="both", tol=1e-10, max_steps=43)
    assert rel(tight.eigenvalues, np.concatenate([evals[::-1][:3], evals[:3]])) < 1e-8
    assert int(tight.num_matvecs) >= int(res.num_matvecs)
    capped = H.eigenvalues(jax.random.key(11), obj, p, k=3, which="bottom", tol=1e-14, max_steps=8)
    assert int(capped.num_matvecs) == 8 and not bool(capped.converged)  # ran out, and says so
    assert json.loads(json.dumps(res.to_dict()))["num_matvecs"] == int(res.num_matvecs)


@jax.jit
def _hoisted_vs_recomputed(obj, p, u):
    select = (True,) * len(jax.tree.leaves(p))
    out = {}
    for c in H.CURVATURES:
        prob = H._problem(obj, p, select, c)
        out[c] = (prob.operator(True)(u), prob.operator(False)(u))
    return out


def test_hoisted_products_equal_recomputed_ones(mlp):
    obj, p, dense, _ = mlp
    u = jax.random.normal(jax.random.key(12), (43,))
    for curvature, (hoisted, recomputed) in _hoisted_vs_recomputed(obj, p, u).items():
        np.testing.assert_allclose(hoisted, recomputed, rtol=1e-11, atol=1e-13, err_msg=curvature)
    np.testing.assert_allclose(_hoisted_vs_recomputed(obj, p, u)["hessian"][0], dense @ np.asarray(u), rtol=1e-10)
    key = jax.random.key(13)
    a, b = (H.eigenvalues(key, obj, p, k=2, num_steps=20, linearize=lin) for lin in (True, False))
    np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-11)


def test_density_without_reorthogonalisation_keeps_the_moments(mlp):
    obj, p, _, evals = mlp
    full = H.density(jax.random.key(7), obj, p, num_probes=64, num_steps=8)
    plain = H.density(jax.random.key(7), obj, p, num_probes=64, num_steps=8, reorthogonalize=False)
    for power in (1, 2, 3):  # 8 steps on 43 parameters: Gauss quadrature exact either way
        assert float(plain.moment(power)) == pytest.approx(float(full.moment(power)), rel=1e-6)


def test_float32_curvature_at_a_confident_fit_matches_float64():
    """At near-zero loss the cross-entropy's curvature comes from probabilities 1 − p_y ~ 1e-5;
    written as logsumexp(z) − z_y (optax), float32 loses 3-4 digits there; the built-in loss
    (``_cross_entropy_labels``) and the shifted Fisher product keep them."""
    import optax

    with jax.enable_x64(True):
        obj, p = make_mlp(seed=3, n=200, c=3)
        p = {"layers": {"0": p["layers"]["0"], "1": tree.scale(p["layers"]["1"], 20.0)}}
        z = np.asarray(obj.apply_fn(p, obj.x))
        top2 = np.sort(z, axis=-1)[:, -2:]
        keep = top2[:, 1] - top2[:, 0] > 9.0  # confident examples, labelled with the model's prediction
        obj64 = Objective(obj.apply_fn, obj.x[keep], jnp.argmax(z[keep], axis=-1), batch_size=8)
        loss64 = float(obj64.loss(p))
        top64 = np.linalg.eigvalsh(np.asarray(H.dense_matrix(obj64, p)))[::-1][:3]
        fisher64 = np.asarray(H.dense_matrix(obj64, p, curvature="fisher"))
    assert keep.sum() > 50 and loss64 < 1e-4
    with jax.enable_x64(False):
        obj32 = obj64.replace(x=jnp.asarray(obj64.x, jnp.float32), y=jnp.asarray(obj64.y, jnp.int32))
        p32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
        naive = obj32.replace(loss=optax.softmax_cross_entropy_with_integer_labels)
        errors = {}
        for name, o in (("ours", obj32), ("logsumexp", naive)):
            top32 = np.asarray(H.eigenvalues(jax.random.key(0), o, p32, k=3, num_steps=40).eigenvalues, np.float64)
            errors[name] = (abs(float(o.loss(p32)) - loss64) / loss64, np.max(np.abs(top32 - top64) / top64))
        fisher32 = np.asarray(H.dense_matrix(obj32, p32, curvature="fisher"))
    assert errors["ours"][0] < 1e-5 and errors["ours"][1] < 2e-5
    assert errors["logsumexp"][0] > 1e-3 and errors["logsumexp"][1] > 1e-4  # the control: same model, optax loss
    assert np.abs(fisher32 - fisher64).max() < 1e-5 * np.abs(fisher64).max()


def test_stopping_arguments_are_checked(mlp):
    obj, p, _, _ = mlp
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="not both"):
        H.eigenvalues(key, obj, p, num_steps=10, max_steps=20)
    with pytest.raises(ValueError, match="max_steps"):
        H.eigenvalues(key, obj, p, k=3, max_steps=2)
    with pytest.raises(ValueError, match="tol"):
        H.eigenvalues(key, obj, p, tol=0.0)

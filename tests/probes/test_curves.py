"""Paths and barriers: closed forms, hand-computed barriers, jit/vmap, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape import Objective
from probes import paths
from probes.curves import PathResult, evaluate_path, interpolate


def mlp(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"]


@pytest.fixture(scope="module")
def setup():
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (37, 3))
    y = jax.random.randint(k[1], (37,), 0, 2)
    a = {"w1": jax.random.normal(k[2], (3, 4)), "w2": jnp.ones((4, 2))}
    b = {"w1": jax.random.normal(k[3], (3, 4)), "w2": -jnp.ones((4, 2))}
    return Objective(mlp, x, y, batch_size=8), a, b


def test_path_points_closed_forms():
    a, m, b = {"w": jnp.zeros(3)}, {"w": jnp.full(3, 2.0)}, {"w": jnp.ones(3)}
    np.testing.assert_allclose(paths.linear(a, b)(0.3)["w"], 0.3)
    for t in (0.0, 0.2, 0.5, 1.0):
        expected = 2 * t * (1 - t) * 2.0 + t**2 * 1.0  # quadratic Bezier
        np.testing.assert_allclose(paths.bezier([a, m, b])(t)["w"], expected, rtol=1e-6)
    np.testing.assert_allclose(paths.bezier([a, m, b])(1.0)["w"], 1.0)
    chain = paths.polychain([a, m, b])
    np.testing.assert_allclose(chain(0.25)["w"], 1.0)
    np.testing.assert_allclose(chain(0.5)["w"], 2.0)
    np.testing.assert_allclose(chain(0.75)["w"], 1.5)
    np.testing.assert_allclose(chain(1.0)["w"], 1.0)
    np.testing.assert_allclose(np.sum(paths.bernstein(0.37, 4)), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="at least 2 control points"):
        paths.bezier([a])


def test_interpolate_matches_pointwise_and_jit(setup):
    obj, a, b = setup
    res = interpolate(obj, a, b, num=9, chunk=4)
    for t, loss, acc in zip(res.ts, res.loss, res.accuracy):
        ref = obj.evaluate(jax.tree.map(lambda u, v: (1 - t) * u + t * v, a, b))
        np.testing.assert_allclose(loss, ref["loss"], rtol=1e-5)
        np.testing.assert_allclose(acc, ref["accuracy"], rtol=1e-6)
    for chunk in (None, 1, 9):
        other = interpolate(obj, a, b, num=9, chunk=chunk)
        np.testing.assert_allclose(other.loss, res.loss, rtol=1e-6)
    jitted = jax.jit(lambda o, u, v: interpolate(o, u, v, num=9).loss)(obj, a, b)
    np.testing.assert_allclose(jitted, res.loss, rtol=1e-6)


def test_barrier_of_model_with_itself_is_zero(setup):
    obj, a, _ = setup
    res = interpolate(obj, a, a, num=11)
    assert res.barrier.loss == pytest.approx(0.0, abs=1e-6)
    assert res.barrier.error == pytest.approx(0.0, abs=1e-6)
    assert res.barrier_for("mean").loss == pytest.approx(0.0, abs=1e-6)


def test_barrier_hand_computed():
    ts = jnp.array([0.0, 0.25, 0.5, 0.75, 1.0])
    loss = jnp.array([1.0, 2.0, 3.5, 2.5, 2.0])
    acc = jnp.array([0.9, 0.8, 0.5, 0.6, 0.7])
    r = PathResult(ts, loss, acc)
    # linear chord: 1 + t; excess = [0, .75, 2.0, .75, 0] -> 2.0 at t=.5
    assert r.barrier.loss == pytest.approx(2.0)
    assert r.barrier.t_loss == pytest.approx(0.5)
    # mean definition: max L - 1.5 = 2.0
    assert r.barrier_for("mean").loss == pytest.approx(2.0)
    # error: [.1, .2, .5, .4, .3], chord .1 + .2 t -> excess [0, .05, .3, .15, 0]
    assert r.barrier.error == pytest.approx(0.3)
    # mean error: max .5 - .2 = .3; with a path entirely below the chord the barrier is 0
    assert r.barrier_for("mean").error == pytest.approx(0.3)
    below = PathResult(ts, jnp.array([1.0, 0.5, 0.4, 0.5, 1.0]), acc)
    assert below.barrier.loss == 0.0
    d = r.to_dict()
    assert d["barrier"]["linear"]["loss"] == pytest.approx(2.0) and d["midpoint"]["accuracy"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown barrier definition 'max'"):
        r.barrier_for("max")
    with pytest.raises(ValueError, match="from 0 to 1"):
        PathResult(ts[1:], loss[1:], acc[1:]).barrier


def test_plot_and_bad_input(setup):
    obj, a, b = setup
    fig = interpolate(obj, a, b, num=5).plot()
    assert len(fig.data) == 4  # loss, loss chord, error, error chord
    with pytest.raises(ValueError, match="num must be an int >= 2"):
        interpolate(obj, a, b, num=1)
    with pytest.raises(ValueError, match="'w1'"):
        interpolate(obj, a, {"w1": jnp.zeros((3, 5)), "w2": jnp.ones((4, 2))})
    with pytest.raises(ValueError, match="non-empty 1-D"):
        evaluate_path(obj, paths.linear(a, b), jnp.zeros((0,)))


def test_fit_curve_keeps_endpoints_and_lowers_loss(setup):
    from probes.curves import fit_curve

    obj, a, b = setup
    for kind in ("bezier", "polychain"):
        fit = fit_curve(jax.random.key(1), obj, a, b, kind=kind, bends=2, steps=60, batch_size=16,
                        learning_rate=0.05, num_eval=7)
        pts = fit.points
        np.testing.assert_array_equal(pts["w1"][0], a["w1"])
        np.testing.assert_array_equal(pts["w1"][-1], b["w1"])
        assert len(fit.bends) == 2 and fit.losses.shape == (60,) and fit.ts_sampled.shape == (60,)
        assert 0 <= fit.ts_sampled.min() and fit.ts_sampled.max() <= 1
        line = interpolate(obj, a, b, num=7)
        assert float(jnp.mean(fit.result.loss[1:-1])) < float(jnp.mean(line.loss[1:-1])) - 0.01
    again = fit_curve(jax.random.key(1), obj, a, b, kind="polychain", bends=2, steps=60, batch_size=16,
                      learning_rate=0.05, num_eval=7)
    np.testing.assert_array_equal(again.losses, fit.losses)  # deterministic for a key
    with pytest.raises(ValueError, match="unknown curve kind 'spline'"):
        fit_curve(jax.random.key(0), obj, a, b, kind="spline")
    with pytest.raises(ValueError, match="init gives 1 bends"):
        fit_curve(jax.random.key(0), obj, a, b, bends=2, init=[a])


def test_batchnorm_statistics_are_recomputed_at_every_t():
    from landscape import align, models

    x = jax.random.normal(jax.random.key(0), (24, 8, 8, 1))
    y = jax.random.randint(jax.random.key(1), (24,), 0, 3)
    fa, pa, sa = models.functional(models.build("cnn", jax.random.key(2), in_channels=1, num_classes=3,
                                                widths=(4,), norm="batch"))
    _, pb, _ = models.functional(models.build("cnn", jax.random.key(3), in_channels=1, num_classes=3,
                                              widths=(4,), norm="batch"))
    obj = Objective(fa, x, y, batch_size=10)
    res = evaluate_path(obj, paths.linear(pa, pb), jnp.array([0.0, 0.5, 1.0]), reset=x)
    for i, params in ((0, pa), (2, pb)):  # each end equals its own model with RESET statistics
        state = align.reset(fa, params, sa, x)
        ref = obj.replace(apply_fn=fa.with_state(state)).evaluate(params)
        np.testing.assert_allclose(res.loss[i], ref["loss"], rtol=1e-5)
    plain = evaluate_path(obj, paths.linear(pa, pb), jnp.array([0.0, 0.5, 1.0]), stats="given")
    assert abs(float(plain.loss[2]) - float(res.loss[2])) > 1e-6  # stale statistics differ
    with pytest.raises(ValueError, match="BatchNorm state"):
        evaluate_path(Objective(mlp, x.reshape(24, -1)[:, :3], y), paths.linear(
            {"w1": jnp.zeros((3, 4)), "w2": jnp.zeros((4, 2))}, {"w1": jnp.ones((3, 4)), "w2": jnp.ones((4, 2))}),
            jnp.array([0.0, 1.0]), reset=x)

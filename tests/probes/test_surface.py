"""Tests for probes.surface: directions, planes, 1-D / 2-D surfaces, overlays, bad input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from landscape import Objective, tree
from probes import surface


def init_mlp(key, sizes=(4, 6, 3)):
    keys = jax.random.split(key, len(sizes))
    return {
        f"l{i}": {
            "kernel": jax.random.normal(keys[i], (a, b)) / np.sqrt(a),
            "bias": 0.1 * jax.random.normal(jax.random.fold_in(keys[i], 1), (b,)),
        }
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
    }


def apply_mlp(params, x):
    n = len(params)
    for i in range(n):
        x = x @ params[f"l{i}"]["kernel"] + params[f"l{i}"]["bias"]
        if i < n - 1:
            x = jnp.tanh(x)
    return x


@pytest.fixture(scope="module")
def setup():
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (21, 4))
    y = jax.random.randint(ky, (21,), 0, 3)
    obj = Objective(apply_mlp, x, y, batch_size=8)  # 3 batches, the last one padded
    params = init_mlp(kp)
    d1 = surface.random_direction(jax.random.key(1), params)
    d2 = surface.random_direction(jax.random.key(2), params, ignore=None)
    return obj, params, d1, d2


@pytest.fixture(scope="module")
def evaluate(setup):
    obj = setup[0]
    return jax.jit(lambda p: obj.evaluate(p))


def at(center, dirs, coords):
    p = center
    for c, d in zip(coords, dirs):
        p = tree.add_scaled(p, d, c)
    return p


# ------------------------------------------------------------------------- directions
def test_filter_normalisation_matches_each_filter_norm(setup):
    _, params, _, _ = setup
    d = surface.random_direction(jax.random.key(3), params, normalization="filter")
    for layer in params:
        np.testing.assert_allclose(
            np.linalg.norm(d[layer]["kernel"], axis=0),
            np.linalg.norm(params[layer]["kernel"], axis=0),
            rtol=1e-5,
        )
        np.testing.assert_array_equal(d[layer]["bias"], 0.0)  # ignore="biasbn"
    tree.check_match(params, d)


def test_filter_normalisation_conv_and_out_axis():
    key = jax.random.key(4)
    conv = jax.random.normal(key, (3, 3, 2, 5))
    torch_dense = jax.random.normal(jax.random.fold_in(key, 1), (7, 4))  # (out, in)
    params = {"conv": conv, "dense": torch_dense, "scale": jnp.arange(1.0, 6.0)}
    d = surface.random_direction(
        jax.random.key(5), params, out_axis={"dense": 0}, ignore=None
    )
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(d["conv"]).reshape(-1, 5), axis=0),
        np.linalg.norm(np.asarray(conv).reshape(-1, 5), axis=0),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        np.linalg.norm(d["dense"], axis=1), np.linalg.norm(torch_dense, axis=1), rtol=1e-5
    )
    np.testing.assert_array_equal(d["scale"], params["scale"])  # ignore=None copies 1-D leaves
    d0 = surface.random_direction(jax.random.key(5), params, out_axis=0)
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(d0["conv"]).reshape(3, -1), axis=1),
        np.linalg.norm(np.asarray(conv).reshape(3, -1), axis=1),
        rtol=1e-5,
    )


@settings(max_examples=8, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    axis_pick=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_filter_norm_property(shape, axis_pick, seed):
    axis = axis_pick % len(shape)
    w = jax.random.normal(jax.random.key(seed), tuple(shape))
    d = surface.random_direction(jax.random.key(seed + 1), {"w": w}, out_axis=axis)["w"]
    red = tuple(i for i in range(len(shape)) if i != axis)
    np.testing.assert_allclose(
        np.sqrt(np.sum(np.asarray(d) ** 2, axis=red)),
        np.sqrt(np.sum(np.asarray(w) ** 2, axis=red)),
        rtol=1e-4,
        atol=1e-6,
    )


def test_layer_model_and_no_normalisation(setup):
    _, params, _, _ = setup
    key = jax.random.key(6)
    dl = surface.random_direction(key, params, normalization="layer")
    for layer in params:
        np.testing.assert_allclose(
            jnp.linalg.norm(dl[layer]["kernel"]), jnp.linalg.norm(params[layer]["kernel"]), rtol=1e-5
        )
    dm = surface.random_direction(key, params, normalization="model", ignore=None)
    np.testing.assert_allclose(tree.norm(dm), tree.norm(params), rtol=1e-5)
    dn = surface.random_direction(key, params, normalization=None, ignore=None)
    raw = tree.random_like(key, params)
    np.testing.assert_allclose(tree.ravel(dn)[0], tree.ravel(raw)[0])
    dmb = surface.random_direction(key, params, normalization="model")
    kernels = {k: v["kernel"] for k, v in params.items()}
    np.testing.assert_allclose(
        tree.norm({k: v["kernel"] for k, v in dmb.items()}), tree.norm(kernels), rtol=1e-5
    )
    # same key -> same direction, other key -> another one
    again = surface.random_direction(key, params, normalization="layer")
    np.testing.assert_array_equal(tree.ravel(again)[0], tree.ravel(dl)[0])
    other = surface.random_direction(jax.random.key(7), params, normalization="layer")
    assert not np.allclose(tree.ravel(other)[0], tree.ravel(dl)[0])


def test_random_direction_bad_input(setup):
    _, params, _, _ = setup
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="normalization"):
        surface.random_direction(key, params, normalization="filters")
    with pytest.raises(ValueError, match="ignore"):
        surface.random_direction(key, params, ignore="bn")
    with pytest.raises(ValueError, match="l9/kernel"):
        surface.random_direction(key, params, out_axis={"l9/kernel": 0})
    with pytest.raises(ValueError, match="out of range"):
        surface.random_direction(key, params, out_axis=2)
    with pytest.raises(ValueError, match="'step'"):
        surface.random_direction(key, {"w": jnp.ones((2, 2)), "step": jnp.array(3)})


# ------------------------------------------------------------------------- planes
def test_plane_through_three_models_reproduces_their_losses(setup, evaluate):
    obj, _, _, _ = setup
    a, b, c = (init_mlp(jax.random.key(k)) for k in (10, 11, 12))
    plane = surface.plane_through(a, b, c, margin=0.2)
    u, v = plane.directions
    np.testing.assert_allclose(
        [tree.vdot(u, u), tree.vdot(v, v), tree.vdot(u, v)], [1.0, 1.0, 0.0], atol=1e-5
    )
    xs, ys = plane.grid(7)
    assert xs[0] < 0 < plane.coords[1, 0] < xs[-1]
    assert ys[0] < 0 < plane.coords[2, 1] < ys[-1]
    for model, (cx, cy) in zip((a, b, c), np.asarray(plane.coords)):
        s = surface.surface_2d(obj, plane.origin, plane.directions, grid=([cx], [cy]))
        np.testing.assert_allclose(s.loss[0, 0], evaluate(model)["loss"], rtol=1e-5, atol=1e-6)
    s = surface.surface_2d(
        obj, plane.origin, plane.directions, grid=plane.grid(3), overlays={"abc": [a, b, c]}
    )
    (ov,) = s.overlays
    np.testing.assert_allclose(ov.coords, plane.coords, atol=1e-4)
    np.testing.assert_allclose(ov.residual, 0.0, atol=1e-4)
    np.testing.assert_allclose(ov.loss, [evaluate(m)["loss"] for m in (a, b, c)], rtol=1e-6)
    json.dumps(plane.to_dict(), allow_nan=False)


def test_plane_through_bad_input(setup):
    _, params, _, _ = setup
    b = init_mlp(jax.random.key(1))
    with pytest.raises(ValueError, match="b equals a"):
        surface.plane_through(params, params, b)
    on_line = tree.lerp(params, b, 2.5)
    with pytest.raises(ValueError, match="one line"):
        surface.plane_through(params, b, on_line)
    other = init_mlp(jax.random.key(2), sizes=(4, 5, 3))
    with pytest.raises(ValueError, match="l0/bias|l0/kernel"):
        surface.plane_through(params, b, other)
    with pytest.raises(ValueError, match="margin"):
        surface.plane_through(params, b, init_mlp(jax.random.key(3)), margin=-1)


def test_pca_of_straight_trajectory_is_degenerate(setup):
    _, params, d1, _ = setup
    ts = [0.0, 0.3, 0.45, 1.2, 2.0]
    traj = [tree.add_scaled(params, d1, t) for t in ts]
    pca = surface.pca_directions(traj)
    assert pca.degenerate
    assert float(pca.explained_variance_ratio[0]) == pytest.approx(1.0, abs=1e-5)
    assert float(pca.explained_variance_ratio[1]) < 1e-6
    assert float(tree.norm(pca.directions[1])) == 0.0
    np.testing.assert_allclose(abs(tree.cosine(pca.directions[0], d1)), 1.0, atol=1e-5)
    # coordinates of the checkpoints along the line, relative to the last one
    expect = (np.array(ts) - ts[-1]) * float(tree.norm(d1))
    np.testing.assert_allclose(np.abs(pca.coords[:, 0]), np.abs(expect), rtol=1e-4, atol=1e-5)
    assert pca.to_dict()["degenerate"] is True


def test_pca_matches_numpy_svd(setup):
    _, params, _, _ = setup
    traj = [init_mlp(jax.random.key(k)) for k in range(20, 26)]
    pca = surface.pca_directions(tree.stack(traj))  # stacked input
    flat = np.stack([np.asarray(tree.ravel(t)[0], np.float64) for t in traj])
    r = flat - flat[-1]
    rc = r - r.mean(axis=0)
    _, s, vt = np.linalg.svd(rc, full_matrices=False)
    assert not pca.degenerate
    np.testing.assert_allclose(pca.explained_variance_ratio, s[:2] ** 2 / np.sum(s**2), rtol=1e-4)
    np.testing.assert_allclose(pca.explained_variance, s[:2] ** 2 / (len(traj) - 1), rtol=1e-4)
    for k in range(2):
        dk = np.asarray(tree.ravel(pca.directions[k])[0])
        np.testing.assert_allclose(abs(dk @ vt[k]), 1.0, atol=1e-4)
        np.testing.assert_allclose(pca.coords[:, k], r @ dk, rtol=1e-4, atol=1e-4)
    centered = surface.pca_directions(traj, center="mean")
    np.testing.assert_allclose(centered.explained_variance, pca.explained_variance, rtol=1e-4)


def test_pca_bad_input(setup):
    _, params, _, _ = setup
    with pytest.raises(ValueError, match="at least 3"):
        surface.pca_directions([params, params])
    with pytest.raises(ValueError, match="center"):
        surface.pca_directions([params] * 3, center="middle")
    other = init_mlp(jax.random.key(2), sizes=(4, 5, 3))
    with pytest.raises(ValueError, match=r"trajectory\[2\]"):
        surface.pca_directions([params, params, other])


# ------------------------------------------------------------------------- surfaces
def test_surface_1d_equals_pointwise(setup, evaluate):
    obj, params, d1, _ = setup
    alphas = [-1.0, -0.25, 0.0, 0.5, 1.5]
    s = surface.surface_1d(obj, params, d1, grid=alphas)
    for i, a in enumerate(alphas):
        ref = evaluate(tree.add_scaled(params, d1, a))
        np.testing.assert_allclose(s.loss[i], ref["loss"], rtol=1e-5)
        np.testing.assert_allclose(s.accuracy[i], ref["accuracy"])
    np.testing.assert_allclose(s.loss[2], evaluate(params)["loss"], rtol=1e-6)


def test_surface_2d_equals_pointwise_and_chunking(setup, evaluate):
    obj, params, d1, d2 = setup
    xs, ys = jnp.linspace(-0.5, 0.5, 3), jnp.array([-1.0, 0.0, 0.25, 0.75])
    s = surface.surface_2d(obj, params, (d1, d2), grid=(xs, ys), chunk=1)
    assert s.loss.shape == s.accuracy.shape == (3, 4)
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            ref = evaluate(at(params, (d1, d2), (x, y)))
            np.testing.assert_allclose(s.loss[i, j], ref["loss"], rtol=1e-5)
            np.testing.assert_allclose(s.accuracy[i, j], ref["accuracy"])
    for chunk in (None, 5, 64):  # default, remainder (12 = 2 * 5 + 2), more than the 12 points
        sc = surface.surface_2d(obj, params, (d1, d2), grid=(xs, ys), chunk=chunk)
        np.testing.assert_allclose(sc.loss, s.loss, rtol=1e-5)
        np.testing.assert_array_equal(sc.accuracy, s.accuracy)


def test_surface_overlays_projection(setup, evaluate):
    obj, params, d1, d2 = setup
    off = init_mlp(jax.random.key(30))
    on_plane = at(params, (d1, d2), (0.3, -0.2))
    traj = tree.stack([at(params, (d1, d2), (t, t * t)) for t in (0.0, 0.5, 1.0)])
    s = surface.surface_2d(
        obj, params, (d1, d2), grid=([-1.0, 1.0], [-1.0, 1.0]),
        overlays={"on": on_plane, "off": off, "traj": traj},
    )
    ov = {o.name: o for o in s.overlays}
    assert ov["on"].kind == "point" and ov["traj"].kind == "path"
    np.testing.assert_allclose(ov["on"].coords, [[0.3, -0.2]], atol=1e-5)
    np.testing.assert_allclose(ov["on"].residual, 0.0, atol=1e-4)
    np.testing.assert_allclose(ov["traj"].coords, [[0, 0], [0.5, 0.25], [1, 1]], atol=1e-5)
    # least squares against numpy
    dmat = np.stack([np.asarray(tree.ravel(d)[0], np.float64) for d in (d1, d2)], axis=1)
    r = np.asarray(tree.ravel(off)[0], np.float64) - np.asarray(tree.ravel(params)[0], np.float64)
    coef, *_ = np.linalg.lstsq(dmat, r, rcond=None)
    np.testing.assert_allclose(ov["off"].coords[0], coef, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ov["off"].residual[0], np.linalg.norm(r - dmat @ coef), rtol=1e-4)
    np.testing.assert_allclose(ov["off"].loss[0], evaluate(off)["loss"], rtol=1e-6)
    s1 = surface.surface_1d(obj, params, d1, grid=[0.0], overlays={"p": at(params, (d1,), (0.7,))})
    np.testing.assert_allclose(s1.overlays[0].coords, [[0.7]], atol=1e-5)


def test_to_dict_and_plot(setup):
    obj, params, d1, d2 = setup
    s = surface.surface_2d(
        obj, params, (d1, d2), grid=([-1.0, 0.0, 1.0], [-1.0, 1.0]),
        overlays={"model": params, "path": [params, at(params, (d1, d2), (0.5, 0.5))]},
    )
    d = json.loads(json.dumps(s.to_dict(), allow_nan=False))
    assert len(d["loss"]) == 3 and len(d["loss"][0]) == 2 and len(d["overlays"]) == 2
    fig = s.plot()
    assert [t.type for t in fig.data] == ["surface", "scatter3d", "scatter3d"]
    fig = s.plot(kind="contour", log=True)
    assert [t.type for t in fig.data] == ["contour", "scatter", "scatter"]
    np.testing.assert_allclose(np.asarray(fig.data[0].z), np.log10(np.asarray(s.loss).T), rtol=1e-6)
    with pytest.raises(ValueError, match="kind"):
        s.plot(kind="wireframe")
    s1 = surface.surface_1d(obj, params, d1, grid=[-1.0, 0.0, 1.0], overlays={"model": params})
    json.dumps(s1.to_dict(), allow_nan=False)
    assert len(s1.plot(log=True).data) == 3


def test_surface_bad_input(setup):
    obj, params, d1, d2 = setup
    with pytest.raises(ValueError, match="no points"):
        surface.surface_1d(obj, params, d1, grid=[])
    with pytest.raises(ValueError, match="no points"):
        surface.surface_2d(obj, params, (d1, d2), grid=([0.0], jnp.zeros((0,))))
    with pytest.raises(ValueError, match="pair"):
        surface.surface_2d(obj, params, (d1, d2), grid=jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match="two"):
        surface.surface_2d(obj, params, (d1,), grid=([0.0], [0.0]))
    bad = {**d2, "l1": {"kernel": d2["l1"]["kernel"], "bias": jnp.zeros(4)}}
    with pytest.raises(ValueError, match="l1/bias"):
        surface.surface_2d(obj, params, (d1, bad), grid=([0.0], [0.0]))
    with pytest.raises(ValueError, match="l1/bias"):
        surface.surface_1d(obj, params, bad, grid=[0.0])
    with pytest.raises(ValueError, match="chunk"):
        surface.surface_1d(obj, params, d1, grid=[0.0], chunk=0)
    with pytest.raises(ValueError, match="overlays"):
        surface.surface_1d(obj, params, d1, grid=[0.0], overlays={"bad": bad})
    with pytest.raises(ValueError, match="non-finite"):
        surface.surface_1d(obj, params, d1, grid=[0.0, np.nan])

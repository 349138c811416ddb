"""Mode convexity (probes.characteristics.convexity) against direct computations."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from landscape import Objective
from landscape.train import Trainer
from probes import basin
from probes.characteristics import CONVEXITY_METRICS, ConvexityResult, convexity, convexity_from_training
from probes.curves import interpolate
from probes.ensemble import ensemble


def _scalar_objective(f, n=3):
    """An Objective whose loss is ``f(params)`` for every example (accuracy is trivially 1)."""
    return Objective(lambda p, x: jnp.zeros((x.shape[0], 1)) + f(p), jnp.zeros((n, 1)), jnp.zeros(n, jnp.int32),
                     loss=lambda z, y: z[:, 0])


A = np.diag([3.0, 1.0, 0.5, 2.0])
C = np.array([0.5, -1.0, 0.0, 2.0])


def quad(p):
    d = p["w"] - C
    return d @ jnp.asarray(A) @ d


def _points(seed, m, scale=1.0):
    pts = np.random.default_rng(seed).normal(size=(m, 4)) * scale
    return [{"w": jnp.asarray(v, jnp.float32)} for v in pts]


def test_convex_quadratic_all_chords_convex_and_direct():
    obj = _scalar_objective(quad)
    members = _points(0, 5)
    res = convexity(jax.random.key(0), obj, members, curvature=False, num_points=5)
    s = res.samples[0]
    assert len(s.chord_pairs) == 10  # all pairs when num_chords >= M(M-1)/2
    f = lambda w: float((w - C) @ A @ (w - C))  # noqa: E731
    W = [np.asarray(m["w"], np.float64) for m in members]
    for (i, j), ends, mid in zip(s.chord_pairs, s.chord_end_loss, s.chord_mid_loss):
        np.testing.assert_allclose(ends, [f(W[i]), f(W[j])], rtol=1e-5)
        np.testing.assert_allclose(mid, f(0.5 * (W[i] + W[j])), rtol=1e-5)
    assert res.chord_fraction == 1.0 and s.metrics["chord_fraction"] == 1.0
    # hull chords on a convex function pass too
    hull = convexity(jax.random.key(1), obj, members, curvature=False, num_points=5, endpoints="hull", num_chords=20)
    assert hull.chord_fraction == 1.0 and hull.samples[0].chord_mid_loss.shape == (20,)


def test_nonconvex_double_well_matches_direct_fraction():
    # f(w) = (|w|^2 - 1)^2: a ring of minima; chords across the ring rise above their ends
    f_j = lambda p: (jnp.sum(p["w"] ** 2) - 1.0) ** 2  # noqa: E731
    obj = _scalar_objective(f_j)
    members = _points(3, 7, scale=0.8)
    res = convexity(jax.random.key(2), obj, members, curvature=False, num_points=5, num_chords=12, tol=0.01)
    s = res.samples[0]
    assert len(s.chord_pairs) == 12 and len({tuple(p) for p in s.chord_pairs}) == 12
    W = [np.asarray(m["w"], np.float64) for m in members]
    f = lambda w: (w @ w - 1.0) ** 2  # noqa: E731
    direct = np.mean([f(0.5 * (W[i] + W[j])) <= 0.5 * (f(W[i]) + f(W[j])) + 0.01 for i, j in s.chord_pairs])
    assert res.chord_fraction == pytest.approx(direct)
    assert 0.0 < direct < 1.0
    np.testing.assert_array_equal(s.chord_convex, [
        f(0.5 * (W[i] + W[j])) <= 0.5 * (f(W[i]) + f(W[j])) + 0.01 for i, j in s.chord_pairs])


def test_barriers_swa_and_ensemble_numbers_match_references():
    key = jax.random.key(0)
    x = jax.random.normal(key, (40, 3)); y = (x[:, 0] + x[:, 1] > 0).astype(jnp.int32)
    apply_fn = lambda p, xb: jnp.tanh(xb @ p["w"]) @ p["v"]  # noqa: E731
    obj = Objective(apply_fn, x, y)
    test = Objective(apply_fn, x[:20] * 1.5, y[:20])
    members = [{"w": jax.random.normal(jax.random.key(i), (3, 4)), "v": jax.random.normal(jax.random.key(9 + i), (4, 2))}
               for i in range(3)]
    res = convexity(jax.random.key(1), obj, members, eval_objective=test, curvature=False, num_points=7)
    s = res.samples[0]
    for (i, j), bl, be in zip(s.barrier_pairs, s.barrier_loss, s.barrier_error):
        ref = interpolate(obj, members[i], members[j], num=7).barrier
        assert bl == pytest.approx(ref.loss, abs=1e-5) and be == pytest.approx(ref.error, abs=1e-6)
    m = s.metrics
    assert m["barrier_loss"] == pytest.approx(np.mean(s.barrier_loss))
    assert m["barrier_loss_std"] == pytest.approx(np.std(s.barrier_loss))
    avg = jax.tree.map(lambda *v: sum(v) / 3, *members)
    ev = test.evaluate(avg)
    assert m["average_loss"] == pytest.approx(float(ev["loss"]), rel=1e-5)
    member_loss = np.mean([float(test.loss(p)) for p in members])
    assert m["member_loss"] == pytest.approx(member_loss, rel=1e-5)
    assert m["swa_gain_loss"] == pytest.approx(member_loss - float(ev["loss"]), rel=1e-4, abs=1e-6)
    ens = ensemble(test, members)
    assert m["ensemble_accuracy"] == pytest.approx(float(ens.accuracy))
    assert m["disagreement"] == pytest.approx(float(ens.mean_disagreement))
    assert m["ensemble_gain"] == pytest.approx(float(ens.gain), abs=1e-6)
    flat = [np.concatenate([np.ravel(p["v"]), np.ravel(p["w"])]) for p in members]
    dists = [np.linalg.norm(flat[i] - flat[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert m["member_distance"] == pytest.approx(np.mean(dists), rel=1e-4)
    assert m["hessian_top"] is None and m["negative_mass"] is None
    assert set(m) == set(CONVEXITY_METRICS)


def test_curvature_at_the_solution_matches_the_closed_form():
    # loss = ½ wᵀ D w with D = diag(3, 1, -1, -2): Hessian D, top 3, half of the spectrum below zero
    d = jnp.array([3.0, 1.0, -1.0, -2.0])
    obj = _scalar_objective(lambda p: 0.5 * jnp.sum(d * p["w"] ** 2))
    members = _points(1, 3)
    res = convexity(jax.random.key(0), obj, members, center={"w": jnp.zeros(4)}, num_points=3)
    m = res.samples[0].metrics
    assert m["hessian_top"] == pytest.approx(3.0, rel=1e-4)
    assert m["negative_mass"] == pytest.approx(0.5, abs=1e-4)  # Rademacher probe: weights exactly ¼ each
    pos = convexity(jax.random.key(0), _scalar_objective(quad), members, num_points=3)
    assert pos.samples[0].metrics["hessian_top"] == pytest.approx(6.0, rel=1e-4)  # 2 · max(A)
    assert pos.samples[0].metrics["negative_mass"] == pytest.approx(0.0, abs=1e-6)


def test_several_basins_give_spreads_and_json():
    x = jax.random.normal(jax.random.key(0), (48, 3)); y = (x[:, 0] > 0).astype(jnp.int32)
    trainer = Trainer(lambda p, xb: xb @ p["w"] + p["b"], x, y, optimizer=optax.adam(0.1), batch_size=16)
    states = [trainer.run(jax.random.key(s), trainer.init({"w": 0.1 * jax.random.normal(jax.random.key(10 + s), (3, 2)),
                                                           "b": jnp.zeros(2)}), steps=30).state for s in range(2)]
    res = convexity_from_training(jax.random.key(3), trainer, states, method="swa",
                                  sampling={"steps": 12, "every": 4, "learning_rate": 0.05},
                                  curvature=False, num_points=5)
    assert isinstance(res, ConvexityResult) and res.num_seeds == 2
    cf = [s.metrics["chord_fraction"] for s in res.samples]
    assert res.summary["chord_fraction"]["mean"] == pytest.approx(np.mean(cf))
    assert res.summary["chord_fraction"]["std"] == pytest.approx(np.std(cf))
    assert res.summary["barrier_loss"]["samples"] == [s.metrics["barrier_loss"] for s in res.samples]
    # softmax regression is convex: every chord passes
    assert res.chord_fraction == 1.0
    d = json.loads(json.dumps(res.to_dict()))
    assert d["settings"]["sampling"]["method"] == "swa" and d["settings"]["num_members"] == [3, 3]
    assert not any(isinstance(v, float) and math.isnan(v) for v in d["summary"]["chord_fraction"].values()
                   if not isinstance(v, list))
    assert res.plot() is not None
    # BasinResult inputs: their averages are used for the SWA numbers
    b = basin.swa(jax.random.key(4), trainer, states[0], steps=8, every=4, learning_rate=0.05)
    one = convexity(jax.random.key(5), Objective(trainer.apply_fn, x, y), [b], curvature=False, num_points=3)
    avg_loss = float(Objective(trainer.apply_fn, x, y).loss(b.average))
    assert one.samples[0].metrics["average_loss"] == pytest.approx(avg_loss, rel=1e-5)


def test_bad_inputs_raise_clear_errors():
    obj = _scalar_objective(quad)
    members = _points(0, 3)
    with pytest.raises(ValueError, match="at least 2 members"):
        convexity(jax.random.key(0), obj, members[:1])
    with pytest.raises(ValueError, match="non-empty sequence"):
        convexity(jax.random.key(0), obj, [])
    with pytest.raises(ValueError, match=r"members\[2\]"):
        convexity(jax.random.key(0), obj, [members[0], members[1], {"w": jnp.zeros(5)}])
    with pytest.raises(ValueError, match="accepted"):
        convexity(jax.random.key(0), obj, members, endpoints="edges")
    with pytest.raises(ValueError, match="num_chords"):
        convexity(jax.random.key(0), obj, members, num_chords=0)
    with pytest.raises(ValueError, match="Objective"):
        convexity(jax.random.key(0), quad, members)
    with pytest.raises(ValueError, match="accepted"):
        convexity_from_training(jax.random.key(0), None, [], method="sgld")

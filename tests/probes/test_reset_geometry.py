"""BatchNorm-correct geometry: every probed point uses RESET statistics, trained models their own.

Oracles: an independent Python loop that forms each point by hand, recomputes its statistics with
``landscape.align.reset`` (or, for one BatchNorm layer, the population mean / variance of the conv
output computed directly) and evaluates it; the ends with each model's own statistics.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape import Objective, align, models, tree
from landscape.models.base import BATCHNORM_MOMENTUM
from probes import batchnorm as bn
from probes import paths
from probes.basin import BasinResult
from probes.characteristics import connectivity, convexity
from probes.curves import evaluate_path, fit_curve, interpolate
from probes.surface import random_direction, surface_2d

N = 30  # not a multiple of the objective's batch size: the padded batches and the remainder are exercised


def _random_state(key, state):
    """Running statistics far from any RESET value, so 'own' and 'reset' are told apart."""
    leaves, treedef = jax.tree.flatten(state)
    ks = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.uniform(k, v.shape, v.dtype, 0.2, 3.0) for k, v in zip(ks, leaves)])


@pytest.fixture(scope="module")
def bnpair():
    x = jax.random.normal(jax.random.key(0), (N, 8, 8, 1))
    y = jax.random.randint(jax.random.key(1), (N,), 0, 3)
    out = []
    for seed in (2, 3, 4):
        fn, p, s = models.functional(models.build("cnn", jax.random.key(seed), in_channels=1, num_classes=3,
                                                  widths=(4, 4), norm="batch"))
        out.append((fn, p, _random_state(jax.random.key(10 + seed), s)))
    (fa, pa, sa), (_, pb, sb), (_, pc, sc) = out
    obj = Objective(fa.with_state(sa), x, y, batch_size=8)
    return obj, fa, (pa, sa), (pb, sb), (pc, sc)


@jax.jit
def _evaluate(obj, params, state):
    return obj.replace(apply_fn=obj.apply_fn.with_state(state)).evaluate(params)


@jax.jit
def _population(obj, params):
    """RESET by definition for N <= 512: one train-mode pass over all inputs from zero statistics
    gives ``(1 - m) s`` with ``s`` the population statistics of every BatchNorm input."""
    zeros = jax.tree.map(jnp.zeros_like, obj.apply_fn.state)
    new = obj.apply_fn.apply_train(params, zeros, obj.x)[1]
    return jax.tree.map(lambda v: v / (1 - BATCHNORM_MOMENTUM), new)


def _own(obj, fa, params, state):
    return _evaluate(obj, params, state)


def _reset(obj, fa, params):
    return _evaluate(obj, params, _population(obj, params))


def test_interpolate_reset_barrier_equals_hand_recomputation(bnpair):
    obj, fa, (pa, sa), (pb, sb), _ = bnpair
    res = interpolate(obj, pa, pb, num=5, end_states=(None, sb))
    ts = np.linspace(0.0, 1.0, 5)
    ref = []
    for t in ts:
        p = jax.tree.map(lambda u, v, t=t: (1 - t) * u + t * v, pa, pb)
        if t == 0.0:
            ref.append(float(_own(obj, fa, pa, sa)["loss"]))
        elif t == 1.0:
            ref.append(float(_own(obj, fa, pb, sb)["loss"]))
        else:
            ref.append(float(_reset(obj, fa, p)["loss"]))
    ref = np.array(ref)
    p = tree.lerp(pa, pb, 0.5)  # the oracle agrees with landscape.align.reset
    for u, v in zip(jax.tree.leaves(_population(obj, p)), jax.tree.leaves(align.reset(fa, p, sa, obj.x))):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(res.loss), ref, rtol=1e-5, atol=1e-6)
    hand_barrier = max(0.0, float(np.max(ref - ((1 - ts) * ref[0] + ts * ref[-1]))))
    assert abs(res.barrier.loss - hand_barrier) < 1e-5
    assert res.barrier.loss > 0.05  # a real barrier: RESET shows what stale statistics hide
    # the ends are each model's own evaluation
    np.testing.assert_allclose(res.loss[0], _own(obj, fa, pa, sa)["loss"], rtol=1e-6)
    np.testing.assert_allclose(res.loss[-1], _own(obj, fa, pb, sb)["loss"], rtol=1e-6)
    np.testing.assert_allclose(res.accuracy[-1], _own(obj, fa, pb, sb)["accuracy"], rtol=1e-6)
    assert (res.stats, res.end_stats) == ("reset", "own")
    d = res.to_dict()
    assert (d["stats"], d["end_stats"]) == ("reset", "own")


def test_opting_out_reproduces_stale_statistics(bnpair):
    obj, fa, (pa, sa), (pb, _), _ = bnpair
    ts = jnp.linspace(0.0, 1.0, 4)
    given = evaluate_path(obj, paths.linear(pa, pb), ts, stats="given")
    hand = [float(_evaluate(obj, tree.lerp(pa, pb, float(t)), sa)["loss"]) for t in ts]  # A's statistics everywhere
    np.testing.assert_allclose(np.asarray(given.loss), hand, rtol=1e-5)
    assert (given.stats, given.end_stats) == ("given", "given")
    assert given.to_dict()["stats"] == "given"
    # ends="reset" recomputes the ends too (the older reset= form)
    both = evaluate_path(obj, paths.linear(pa, pb), jnp.array([0.0, 1.0]), ends="reset")
    np.testing.assert_allclose(both.loss[1], _reset(obj, fa, pb)["loss"], rtol=1e-5)
    assert both.end_stats == "reset"


def test_reset_state_is_the_population_statistics_of_one_batchnorm_layer():
    x = jax.random.normal(jax.random.key(5), (N, 8, 8, 1))
    fn, p, s = models.functional(models.build("cnn", jax.random.key(6), in_channels=1, num_classes=3,
                                              widths=(5,), norm="batch"))
    obj = Objective(fn, x, jnp.zeros(N, jnp.int32))
    keep = bn.momentum(obj, p)
    got = jax.jit(lambda q: bn.reset_state(fn, q, x, keep, batch_size=bn.RESET_BATCH_SIZE))(p)
    z = jax.lax.conv_general_dilated(x, p["convs"]["0"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(got["norms"]["0"]["mean"], z.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["norms"]["0"]["var"], z.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)


def test_surface_point_and_overlays(bnpair):
    obj, fa, (pa, sa), (pb, sb), _ = bnpair
    d1 = random_direction(jax.random.key(7), pa)
    d2 = random_direction(jax.random.key(8), pa)
    axis = np.array([-0.5, 0.0, 0.5])
    bend = tree.lerp(pa, pb, 0.5)
    s = surface_2d(obj, pa, (d1, d2), grid=(axis, axis), chunk=3,
                   overlays={"B": pb, "bend": bend}, overlay_states={"B": sb})
    assert s.stats == "reset" and s.to_dict()["stats"] == "reset"
    np.testing.assert_allclose(s.loss[1, 1], _own(obj, fa, pa, sa)["loss"], rtol=1e-6)  # the trained center
    p = jax.tree.map(lambda c, u, v: c + 0.5 * u - 0.5 * v, pa, d1, d2)  # grid point (x=0.5, y=-0.5)
    np.testing.assert_allclose(s.loss[2, 0], _reset(obj, fa, p)["loss"], rtol=1e-5)
    ov = {o.name: o for o in s.overlays}
    assert (ov["B"].stats, ov["bend"].stats) == ("own", "reset")
    np.testing.assert_allclose(ov["B"].loss[0], _own(obj, fa, pb, sb)["loss"], rtol=1e-6)
    np.testing.assert_allclose(ov["bend"].loss[0], _reset(obj, fa, bend)["loss"], rtol=1e-5)
    given = surface_2d(obj, pa, (d1, d2), grid=(axis, axis), stats="given")
    np.testing.assert_allclose(given.loss[2, 0], obj.evaluate(p)["loss"], rtol=1e-5)
    assert given.stats == "given"


def test_fitted_bezier_curve_points(bnpair):
    obj, fa, (pa, sa), (pb, sb), _ = bnpair
    fit = fit_curve(jax.random.key(9), obj, pa, pb, steps=3, batch_size=8, num_eval=3, end_states=(sa, sb))
    r = fit.result
    assert (r.stats, r.end_stats) == ("reset", "own")
    mid = paths.bezier(fit.points)(0.5)
    np.testing.assert_allclose(r.loss[1], _reset(obj, fa, mid)["loss"], rtol=1e-5)
    np.testing.assert_allclose(r.loss[0], _own(obj, fa, pa, sa)["loss"], rtol=1e-6)
    np.testing.assert_allclose(r.loss[2], _own(obj, fa, pb, sb)["loss"], rtol=1e-6)


def test_connectivity_aligned_end_keeps_b_own_function(bnpair):
    obj, fa, (pa, sa), (pb, sb), _ = bnpair
    res = connectivity(jax.random.key(0), obj, [(pa, pb)], methods=("naive", "weight_matching"), num=3,
                       singular_k=0, states=[(sa, sb)])
    assert res.stats == "reset" and res.to_dict()["stats"] == "reset"
    own_b = float(_own(obj, fa, pb, sb)["loss"])
    for m in ("naive", "weight_matching"):  # permuting B with its statistics keeps its function
        r = res.samples[0].paths[m]["train"]
        np.testing.assert_allclose(r.loss[-1], own_b, rtol=1e-5)
        np.testing.assert_allclose(r.loss[0], _own(obj, fa, pa, sa)["loss"], rtol=1e-6)
    mid = tree.lerp(pa, res.samples[0].aligned, 0.5)
    np.testing.assert_allclose(res.samples[0].paths["weight_matching"]["train"].loss[1],
                               _reset(obj, fa, mid)["loss"], rtol=1e-5)
    with pytest.raises(ValueError, match="pass states="):
        connectivity(jax.random.key(0), obj, [(pa, pb)], methods=("naive",), num=3, singular_k=0)


def test_convexity_members_own_and_chords_reset(bnpair):
    obj, fa, (pa, sa), (pb, sb), (pc, sc) = bnpair
    members = (pa, pb, pc)
    basin = BasinResult(members=members, average=basin_average(members), start=pa, model_states=(sa, sb, sc),
                        losses=np.zeros(1), method="fge", steps=0, settings=(), stale_model_state=True)
    res = convexity(jax.random.key(1), obj, [basin], curvature=False, num_points=3, num_chords=3, chunk=2)
    smp = res.samples[0]
    assert res.settings["stats"] == "reset" and res.settings["member_stats"] == "own"
    own = {i: float(_own(obj, fa, p, s)["loss"]) for i, (p, s) in enumerate(zip(members, (sa, sb, sc)))}
    for c, (i, j) in enumerate(smp.chord_pairs):
        np.testing.assert_allclose(smp.chord_end_loss[c], [own[int(i)], own[int(j)]], rtol=1e-5)
        mid = tree.lerp(members[int(i)], members[int(j)], 0.5)
        np.testing.assert_allclose(smp.chord_mid_loss[c], _reset(obj, fa, mid)["loss"], rtol=1e-5)
    np.testing.assert_allclose(smp.metrics["member_loss"], np.mean(list(own.values())), rtol=1e-5)
    np.testing.assert_allclose(smp.metrics["average_loss"], _reset(obj, fa, basin.average)["loss"], rtol=1e-5)


def basin_average(members):
    return jax.tree.map(lambda *v: sum(v) / len(v), *members)


def test_bad_input():
    x = jax.random.normal(jax.random.key(0), (6, 3))
    y = jnp.zeros(6, jnp.int32)
    plain = Objective(lambda p, x: x @ p["w"], x, y)
    a, b = {"w": jnp.zeros((3, 2))}, {"w": jnp.ones((3, 2))}
    with pytest.raises(ValueError, match="stats='reset' recomputes BatchNorm running statistics.*has no running"):
        interpolate(plain, a, b, num=3, stats="reset")
    with pytest.raises(ValueError, match="has no running statistics"):
        surface_2d(plain, a, (a, b), grid=([0.0], [0.0]), stats="reset")
    with pytest.raises(ValueError, match="unknown stats 'bogus'"):
        interpolate(plain, a, b, num=3, stats="bogus")
    r = interpolate(plain, a, b, num=3)  # no running statistics: nothing to recompute
    assert (r.stats, r.end_stats) == ("none", "none")


def test_bad_input_batchnorm(bnpair):
    obj, fa, (pa, _), (pb, sb), _ = bnpair
    with pytest.raises(ValueError, match="evaluates t = 1 with that end's own BatchNorm running statistics"):
        interpolate(obj, pa, pb, num=3)
    with pytest.raises(ValueError, match="unknown ends 'both'"):
        interpolate(obj, pa, pb, num=3, ends="both", end_states=(None, sb))
    with pytest.raises(ValueError, match="state leaf 'norms/0/mean' has shape"):
        interpolate(obj, pa, pb, num=3, end_states=(None, jax.tree.map(lambda v: v[:2], sb)))
    with pytest.raises(ValueError, match="reset_x must be inputs"):
        interpolate(obj, pa, pb, num=3, end_states=(None, sb), reset_x=jnp.ones((4, 3)))

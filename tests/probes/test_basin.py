"""Basin sampling: SWA, snapshot ensembles, FGE and simplex ensembles (probes.basin)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from landscape import Objective, tree
from landscape.train import Trainer, make_optimizer
from probes import basin


def _problem(n=96, d=4, classes=3, batch_size=16, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, d))
    y = jnp.argmax(x @ jax.random.normal(kw, (d, classes)), axis=-1).astype(jnp.int32)

    def apply_fn(p, xb):
        return jnp.tanh(xb @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    params = {
        "w1": 0.5 * jax.random.normal(jax.random.key(seed + 1), (d, 8)), "b1": jnp.zeros(8),
        "w2": 0.5 * jax.random.normal(jax.random.key(seed + 2), (8, classes)), "b2": jnp.zeros(classes),
    }
    trainer = Trainer(apply_fn, x, y, optimizer=optax.adam(0.05), batch_size=batch_size)
    return trainer, params, jax.jit(Objective(apply_fn, x, y).loss)


@pytest.fixture(scope="module")
def trained():
    trainer, params, obj = _problem()
    run = trainer.run(jax.random.key(3), trainer.init(params), steps=120)
    return trainer, run.state, obj


def test_swa_of_identical_checkpoints_is_the_checkpoint():
    # zero gradient everywhere: SGD never moves, every checkpoint equals the start
    x = jnp.ones((8, 2)); y = jnp.zeros(8, jnp.int32)
    trainer = Trainer(lambda p, xb: 0.0 * (xb @ p["w"]), x, y, optimizer=optax.sgd(0.1), batch_size=4)
    state = trainer.init({"w": jnp.array([[0.3, -1.7], [2.5, 0.1]])})
    res = basin.swa(jax.random.key(0), trainer, state, steps=12, every=3, learning_rate=0.5)
    assert res.num_members == 4 and res.steps == (3, 6, 9, 12)
    for m in res.members:
        np.testing.assert_array_equal(m["w"], state.params["w"])
    np.testing.assert_array_equal(res.average["w"], state.params["w"])


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 7), st.floats(-1e3, 1e3, allow_nan=False).filter(lambda v: v == 0 or abs(v) > 1e-30))
def test_average_identical_members_exact(m, v):
    # (XLA on CPU flushes subnormals to zero, hence the filter on tiny values)
    p = {"a": jnp.full((3,), v, jnp.float32), "b": jnp.float32(v / 3)}
    avg = basin.average([p] * m)
    np.testing.assert_array_equal(avg["a"], p["a"])
    np.testing.assert_array_equal(avg["b"], p["b"])


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=6))
def test_average_is_the_mean(values):
    members = [{"w": jnp.asarray([v, 2 * v], jnp.float32)} for v in values]
    np.testing.assert_allclose(basin.average(members)["w"], np.mean([[v, 2 * v] for v in values], axis=0),
                               rtol=1e-5, atol=1e-4)


def test_swa_members_are_the_continued_run(trained):
    trainer, state, _ = trained
    res = basin.swa(jax.random.key(5), trainer, state, steps=40, every=10, learning_rate=0.05)
    assert res.steps == (130, 140, 150, 160) and res.method == "swa" and not res.stale_model_state
    assert res.losses.shape == (40,)
    # independent reference: the same continued run by hand
    ref_trainer = Trainer(trainer.apply_fn, trainer.x, trainer.y, batch_size=trainer.batch_size,
                          optimizer=make_optimizer("sgd", learning_rate=0.05, momentum=0.9))
    start = ref_trainer.init(state.params)
    start = type(start)(start.params, start.model_state, start.opt_state, state.step)
    ref = ref_trainer.run(jax.random.key(5), start, steps=160, capture_every=10)
    for m, s in zip(res.members, res.steps):
        np.testing.assert_allclose(m["w1"], ref.checkpoint_at(s).params["w1"], rtol=1e-6, atol=1e-6)
    mean = np.mean([np.asarray(m["w2"]) for m in res.members], axis=0)
    np.testing.assert_allclose(res.average["w2"], mean, rtol=1e-5, atol=1e-6)
    d = res.to_dict()
    assert d["settings"]["learning_rate"] == 0.05 and d["settings"]["every"] == 10
    assert res.plot() is not None


def test_swa_cyclic_and_bad_settings(trained):
    trainer, state, _ = trained
    res = basin.swa(jax.random.key(0), trainer, state, steps=24, every=12, schedule="cyclic", cycle_steps=6,
                    learning_rate=0.05)
    assert res.num_members == 2
    with pytest.raises(ValueError, match="multiple of cycle_steps"):
        basin.swa(jax.random.key(0), trainer, state, steps=24, every=5, schedule="cyclic", cycle_steps=6)
    with pytest.raises(ValueError, match="accepted"):
        basin.swa(jax.random.key(0), trainer, state, steps=24, every=5, schedule="cosine")
    with pytest.raises(ValueError, match="larger than steps"):
        basin.swa(jax.random.key(0), trainer, state, steps=4, every=5)
    with pytest.raises(ValueError, match="optimizer"):
        basin.fge(jax.random.key(0), trainer, state, cycles=2, cycle_steps=4, optimizer="lbfgs")
    with pytest.raises(ValueError, match="TrainState"):
        basin.swa(jax.random.key(0), trainer, state.params, steps=4, every=2)
    with pytest.raises(ValueError, match="learning_rate"):
        basin.snapshot_ensemble(jax.random.key(0), trainer, state, cycles=2, cycle_steps=4, learning_rate=0.0)


def test_snapshot_ensemble_one_member_per_cycle():
    trainer, params, obj = _problem(seed=1)
    state = trainer.init(params)
    res = basin.snapshot_ensemble(jax.random.key(2), trainer, state, cycles=3, cycle_steps=12, learning_rate=0.2)
    assert res.num_members == 3 and res.steps == (12, 24, 36) and res.average is None
    # the member at the end of each cycle is the checkpoint of the same cyclic run
    ref_trainer = Trainer(trainer.apply_fn, trainer.x, trainer.y, batch_size=trainer.batch_size,
                          optimizer=make_optimizer("sgd", learning_rate=0.2, schedule="cyclic", cycle_steps=12))
    ref = ref_trainer.run(jax.random.key(2), ref_trainer.init(params), steps=36, capture_steps=(12, 24, 36))
    for m, s in zip(res.members, res.steps):
        np.testing.assert_allclose(m["w2"], ref.checkpoint_at(s).params["w2"], rtol=1e-6, atol=1e-6)
    # training from scratch: the last snapshot is much better than the initialisation
    assert float(obj(res.members[-1])) < 0.5 * float(obj(params))


def test_fge_average_and_members_stay_good(trained):
    trainer, state, obj = trained
    res = basin.fge(jax.random.key(1), trainer, state, cycles=4, cycle_steps=6, learning_rate=0.05)
    assert res.num_members == 4 and res.steps == (126, 132, 138, 144)
    base = float(obj(state.params))
    assert all(float(obj(m)) < base + 0.1 for m in res.members)
    np.testing.assert_allclose(res.average["b1"], np.mean([np.asarray(m["b1"]) for m in res.members], axis=0),
                               rtol=1e-5, atol=1e-6)


def test_log_volume_matches_closed_forms():
    # right triangle with legs 1 in R^3: area 1/2; regular tetrahedron with edge sqrt(2): volume 1/3
    tri = jnp.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    np.testing.assert_allclose(basin._log_volume(tri), math.log(0.5), rtol=1e-6)
    tet = jnp.array([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(basin._log_volume(tet), math.log(1 / 3), rtol=1e-5)
    # a scalene triangle against Heron's formula
    pts = np.array([[0.0, 0.0], [3.0, 0.0], [0.5, 2.0]])
    a, b, c = (np.linalg.norm(pts[i] - pts[j]) for i, j in ((0, 1), (1, 2), (0, 2)))
    s = (a + b + c) / 2
    np.testing.assert_allclose(basin._log_volume(jnp.asarray(pts)), 0.5 * math.log(s * (s - a) * (s - b) * (s - c)),
                               rtol=1e-5)
    # the masked form used while growing equals the plain one on the active prefix
    padded = jnp.concatenate([tet[:3], 7.0 * jnp.ones((2, 4))])
    for active in (2, 3):
        mask = (jnp.arange(5) < active).astype(jnp.float32)
        np.testing.assert_allclose(basin._masked_log_volume(padded, mask), basin._log_volume(tet[:active]), rtol=1e-5)


def test_simplex_vertices_stay_low_loss(trained):
    trainer, state, obj = trained
    res = basin.simplex(jax.random.key(0), trainer, state.params, num_new=2, steps=100, learning_rate=0.01,
                        volume_weight=1e-2, num_samples=6)
    assert len(res.vertices) == 3 and res.num_members == 6
    base = float(obj(state.params))
    for v in res.vertices + res.members:
        assert float(obj(v)) < base + 0.15
    assert np.all(np.isfinite(res.log_volumes))
    # the simplex is not degenerate: the grown vertices moved away from the start
    assert float(tree.norm(tree.sub(res.vertices[1], res.vertices[0]))) > 0.05
    w = jnp.array([0.2, 0.3, 0.5])
    np.testing.assert_allclose(
        res.point(w)["w1"], sum(wi * v["w1"] for wi, v in zip(w, res.vertices)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.average["b2"], np.mean([np.asarray(v["b2"]) for v in res.vertices], axis=0),
                               rtol=1e-5, atol=1e-6)
    assert len(res.sample(jax.random.key(1), 3)) == 3
    assert res.to_dict()["num_vertices"] == 3 and res.plot() is not None
    with pytest.raises(ValueError, match="one per vertex"):
        res.point(jnp.ones(2))


def test_simplex_bad_inputs(trained):
    trainer, state, _ = trained
    with pytest.raises(ValueError, match="at least one trained vertex"):
        basin.simplex(jax.random.key(0), trainer, [])
    with pytest.raises(ValueError, match="num_new"):
        basin.simplex(jax.random.key(0), trainer, state.params, num_new=0)
    bad = dict(state.params, w1=jnp.zeros((5, 8)))
    with pytest.raises(ValueError, match="w1"):
        basin.simplex(jax.random.key(0), trainer, [state.params, bad])

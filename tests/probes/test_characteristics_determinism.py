"""Mode determinism / instability analysis (probes.characteristics.determinism)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from landscape import Objective, tree
from landscape.train import Trainer, spawn
from probes.characteristics import DeterminismResult, determinism, spawn_ladder
from probes.curves import interpolate


def _setup():
    x = jax.random.normal(jax.random.key(0), (64, 3))
    y = (x[:, 0] * x[:, 1] > 0).astype(jnp.int32)

    def apply_fn(p, xb):
        return jnp.tanh(xb @ p["w1"]) @ p["w2"]

    trainer = Trainer(apply_fn, x, y, optimizer=optax.sgd(0.3, momentum=0.9), batch_size=16)

    def init(key):
        k1, k2 = jax.random.split(key)
        return {"w1": jax.random.normal(k1, (3, 6)), "w2": 0.5 * jax.random.normal(k2, (6, 2))}

    return trainer, init, Objective(apply_fn, x, y)


SETUP = _setup()


def test_shared_data_order_gives_zero_barrier():
    trainer, init, _ = SETUP
    res = determinism(jax.random.key(0), trainer, init, steps=24, spawn_steps=(0, 4, 16), num_seeds=1,
                      share_data_order=True, num_points=5)
    np.testing.assert_array_equal(res.barrier_loss, 0.0)
    np.testing.assert_array_equal(res.barrier_error, 0.0)
    np.testing.assert_array_equal(res.child_distance, 0.0)
    assert res.onset == 0
    assert res.independent_distance[0] > 0
    assert "onset k* = 0" in res.plot().to_json()


def test_barriers_match_an_independent_computation():
    trainer, init, obj = SETUP
    key = jax.random.key(3)
    res = determinism(key, trainer, init, steps=24, spawn_steps=(0, 8), num_seeds=2, num_points=7, threshold=0.01)
    assert res.barrier_loss.shape == (2, 2) and res.independent_distance.shape == (2,)
    for s in range(2):
        k_init, k_parent, k_a, k_b, k_iinit, k_idata = jax.random.split(jax.random.fold_in(key, s), 6)
        parent = trainer.run(k_parent, trainer.init(init(k_init)), steps=24, capture_steps=(0, 8))
        for i, k in enumerate((0, 8)):
            a = spawn(k_a, trainer, parent.checkpoint_at(k), steps=24).params
            b = spawn(k_b, trainer, parent.checkpoint_at(k), steps=24).params
            ref = interpolate(obj, a, b, num=7).barrier
            assert res.barrier_loss[s, i] == pytest.approx(ref.loss, abs=1e-5)
            assert res.barrier_error[s, i] == pytest.approx(ref.error, abs=1e-6)
            assert res.child_distance[s, i] == pytest.approx(float(tree.norm(tree.sub(a, b))), rel=1e-4)
        indep = trainer.run(k_idata, trainer.init(init(k_iinit)), steps=24)
        assert res.independent_distance[s] == pytest.approx(float(tree.norm(tree.sub(parent.params, indep.params))),
                                                            rel=1e-4)
    np.testing.assert_allclose(res.relative_distance, res.child_distance / res.independent_distance[:, None])
    d = json.loads(json.dumps(res.to_dict()))
    assert d["barrier_loss"]["mean"] == pytest.approx(res.barrier_loss.mean(axis=0).tolist())
    assert d["spawn_steps"] == [0, 8]
    assert res.plot() is not None


def _result(barrier, threshold=0.1):
    b = np.asarray(barrier, np.float64)
    z = np.zeros_like(b)
    return DeterminismResult(
        spawn_steps=tuple(range(b.shape[1])), steps=10, barrier_loss=b, barrier_error=b, child_distance=z + 1,
        child_loss=np.zeros(b.shape + (2,)), child_accuracy=np.zeros(b.shape + (2,)),
        independent_distance=np.ones(b.shape[0]) * 2, independent_barrier_loss=np.ones(b.shape[0]),
        independent_barrier_error=np.ones(b.shape[0]), threshold=threshold, measure="error",
        definition="linear", share_data_order=False,
    )


def test_onset_is_where_the_mean_barrier_stays_under_the_threshold():
    assert _result([[0.5, 0.3, 0.05, 0.2, 0.01, 0.0]]).onset == 4  # dips at 2 but rises again
    assert _result([[0.5, 0.1], [0.3, 0.0]]).onset == 1  # seed means 0.4, 0.05
    assert _result([[0.5, 0.3], [0.1, 0.0]]).onset is None  # seed means 0.3, 0.15: one seed alone is not enough
    assert _result([[0.5, 0.3, 0.2]]).onset is None
    assert _result([[0.0, 0.0]]).onset == 0
    np.testing.assert_allclose(_result([[0.5, 0.3, 0.2]]).relative_distance, 0.5)


def test_spawn_ladder():
    assert spawn_ladder(100) == (0, 1, 2, 4, 8, 16, 32, 64)
    assert spawn_ladder(64, base=4, start=2) == (0, 2, 8, 32)
    with pytest.raises(ValueError, match="positive int"):
        spawn_ladder(0)


def test_bad_inputs_raise_before_training():
    trainer, init, _ = SETUP
    with pytest.raises(ValueError, match=r"spawn steps \[30\] lie outside the run"):
        determinism(jax.random.key(0), trainer, init, steps=24, spawn_steps=(0, 30))
    with pytest.raises(ValueError, match="outside the run"):
        determinism(jax.random.key(0), trainer, init, steps=24, spawn_steps=(-1,))
    with pytest.raises(ValueError, match="outside the run"):
        determinism(jax.random.key(0), trainer, init, steps=24, spawn_steps=(24,))
    with pytest.raises(ValueError, match="distinct"):
        determinism(jax.random.key(0), trainer, init, steps=24, spawn_steps=(0, 4, 4))
    with pytest.raises(ValueError, match="accepted"):
        determinism(jax.random.key(0), trainer, init, steps=24, measure="accuracy")
    with pytest.raises(ValueError, match="callable"):
        determinism(jax.random.key(0), trainer, trainer.init(init(jax.random.key(0))), steps=24)
    with pytest.raises(ValueError, match="num_seeds"):
        determinism(jax.random.key(0), trainer, init, steps=24, num_seeds=0)

"""Real training on the digits data: accuracy, determinism and a real (non-zero) naive barrier."""

import jax
import numpy as np
import pytest

from landscape import Objective, data, models
from landscape.train import Trainer, make_optimizer
from probes.curves import interpolate


def train_mlp(ds, init_seed, data_seed, epochs=30):
    apply_fn, params, state = models.functional(
        models.build("mlp", jax.random.key(init_seed), in_features=64, widths=(128, 128, 10))
    )
    trainer = Trainer(apply_fn, *ds.train, optimizer=make_optimizer("adam", learning_rate=1e-3), batch_size=64)
    return apply_fn, trainer.run(jax.random.key(data_seed), trainer.init(params, state), epochs=epochs).params


@pytest.fixture(scope="module")
def trained():
    ds = data.load("digits")
    apply_fn, a = train_mlp(ds, 0, 1000)
    _, b = train_mlp(ds, 1, 1001)
    return ds, apply_fn, a, b


def test_two_independent_mlps_reach_95_percent(trained):
    ds, apply_fn, a, b = trained
    test = Objective(apply_fn, *ds.test)
    for params in (a, b):
        assert float(test.evaluate(params)["accuracy"]) >= 0.95


def test_same_seeds_give_identical_params(trained):
    ds, _, a, _ = trained
    _, again = train_mlp(ds, 0, 1000)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_independent_models_have_a_naive_barrier(trained):
    ds, apply_fn, a, b = trained
    res = interpolate(Objective(apply_fn, *ds.train), a, b, num=11)
    assert res.barrier.loss > 0.05  # independent solutions are not linearly connected
    assert res.loss[5] > max(res.loss[0], res.loss[-1])


def test_fitted_bezier_curve_beats_the_straight_line(trained):
    from probes.curves import fit_curve

    ds, apply_fn, a, b = trained
    train = Objective(apply_fn, *ds.train)
    line = interpolate(train, a, b, num=11)
    curve = fit_curve(jax.random.key(0), train, a, b, kind="bezier", steps=300, learning_rate=1e-3, num_eval=11)
    assert curve.result.barrier.loss < 0.5 * line.barrier.loss
    assert float(curve.result.loss[0]) == pytest.approx(float(line.loss[0]), rel=1e-5)  # endpoints fixed
    assert float(curve.result.loss[-1]) == pytest.approx(float(line.loss[-1]), rel=1e-5)

"""Connectivity probe: a model and a permuted copy are connected once aligned; structure; errors."""

import jax
import numpy as np
import pytest

from landscape import Objective, align, data, models
from landscape.train import Trainer, make_optimizer
from probes.characteristics import CONNECTIVITY_METHODS, connectivity


@pytest.fixture(scope="module")
def setup():
    ds = data.load("digits")
    fn, p, st = models.functional(models.build("mlp", jax.random.key(0), in_features=64, widths=(16, 16, 10)))
    trainer = Trainer(fn, *ds.train, optimizer=make_optimizer("adam", learning_rate=3e-3), batch_size=64)
    a = trainer.run(jax.random.key(1), trainer.init(p, st), epochs=4).params
    perm = align.random_permutation(jax.random.key(2), fn.spec, a)
    b = align.apply(fn.spec, perm, a)  # the same function, other weights
    return ds, fn, a, b


def test_permuted_copy_is_connected_after_alignment(setup):
    ds, fn, a, b = setup
    train, test = Objective(fn, *ds.train), Objective(fn, *ds.test)
    res = connectivity(jax.random.key(0), train, [(a, b)], eval_objectives={"test": test}, num=5,
                       curve_steps=20, singular_k=4)
    s = res.samples[0]
    assert set(s.paths) == set(CONNECTIVITY_METHODS)
    assert s.barrier("naive") > 0.05
    for method in ("weight_matching", "activation_matching", "repair"):
        for split in ("train", "test"):
            assert s.barrier(method, split) == pytest.approx(0.0, abs=1e-4), (method, split)
    # REPAIR keeps the endpoints: their losses equal the trained model's
    rep, naive = np.asarray(s.paths["repair"]["train"].loss), np.asarray(s.paths["naive"]["train"].loss)
    np.testing.assert_allclose(rep[[0, -1]], naive[[0, 0]], rtol=1e-4)
    assert s.wm_objective["matched"] > s.wm_objective["identity"]
    assert s.singular["mean_after"] == pytest.approx(1.0, abs=1e-4)
    assert s.singular["mean_before"] < 0.9
    d = res.to_dict()
    assert d["table"]["naive"]["test"]["loss_barrier"]["mean"] > 0
    assert len(res.plot().data) == 4 * len(CONNECTIVITY_METHODS)


def test_bad_input(setup):
    ds, fn, a, b = setup
    train = Objective(fn, *ds.train)
    with pytest.raises(ValueError, match="unknown connectivity methods"):
        connectivity(jax.random.key(0), train, [(a, b)], methods=("naive", "zipit"))
    with pytest.raises(ValueError, match="at least one"):
        connectivity(jax.random.key(0), train, [])
    with pytest.raises(ValueError, match="need a permutation spec"):
        connectivity(jax.random.key(0), Objective(lambda p, x: fn(p, x), *ds.train), [(a, b)])


def test_tatro_pipeline_fits_the_curve_to_the_activation_matched_model(setup):
    """curve_alignment="activation_matching" (Tatro et al. 2020): the aligned curve ends at the
    activation-matched B, not at the weight-matched B (the two differ for independently trained models)."""
    ds, fn, a, b = setup
    train = Objective(fn, *ds.train)
    # a model trained independently: weight and activation matching disagree on some units
    trainer = Trainer(fn, *ds.train, optimizer=make_optimizer("adam", learning_rate=3e-3), batch_size=64)
    _, p1, st1 = models.functional(models.build("mlp", jax.random.key(5), in_features=64, widths=(16, 16, 10)))
    other = trainer.run(jax.random.key(6), trainer.init(p1, st1), epochs=2).params
    perm_am, _ = align.activation_matching(fn.spec, a, other, train, apply_fn=fn)
    want = align.apply(fn.spec, perm_am, other)
    perm_wm, _ = align.weight_matching(jax.random.split(jax.random.fold_in(jax.random.key(0), 0), 3)[0], fn.spec,
                                       a, other)
    assert any(not np.array_equal(perm_wm[k], perm_am[k]) for k in perm_am)  # the test can tell them apart
    res = connectivity(jax.random.key(0), train, [(a, other)], methods=("naive", "bezier_aligned"), num=3,
                       curve_steps=2, singular_k=0, curve_alignment="activation_matching")
    end = res.samples[0].curves["bezier_aligned"].path(1.0)
    for got, ref in zip(jax.tree.leaves(end), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="curve_alignment"):
        connectivity(jax.random.key(0), train, [(a, b)], curve_alignment="zipit")

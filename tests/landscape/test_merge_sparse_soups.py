"""Sparse Model Soups and SWAMP: exact sparsity schedules, masks kept, reductions to plain training and to
SWA; SWA's BatchNorm update equals RESET of the average (probes.batchnorm, an independent implementation)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from landscape import Objective, data, merge, models
from landscape.train import Trainer, make_optimizer
from probes.batchnorm import momentum, reset_state

DS = data.blobs(jax.random.key(0), num_samples=160, num_classes=3, dim=6)
X, Y = DS.train
FN, P0, _ = models.functional(models.MLP(6, (16, 3), rngs=nnx.Rngs(0)))


def _kernels(p):
    return np.concatenate([np.asarray(p["layers"][i]["kernel"]).ravel() for i in ("0", "1")])


def test_magnitude_mask_is_exact_and_keeps_earlier_pruning():
    n = _kernels(P0).size
    m1 = merge.magnitude_mask(P0, 0.3)
    k = _kernels(m1)
    assert int((k == 0).sum()) == round(0.3 * n)
    mags = np.abs(_kernels(P0))
    assert mags[k == 0].max() <= mags[k == 1].min()  # brute force: pruned are the smallest
    np.testing.assert_array_equal(m1["layers"]["0"]["bias"], 1.0)
    # a later cycle ranks other weights (here reversed magnitudes) yet keeps what was pruned
    flipped = jax.tree.map(lambda v: 1.0 / (jnp.abs(v) + 1e-3), P0)
    m2 = merge.magnitude_mask(flipped, 0.6, mask=m1)
    k2 = _kernels(m2)
    assert int((k2 == 0).sum()) == round(0.6 * n) and np.all(k2[k == 0] == 0)
    layer = merge.magnitude_mask(P0, 0.5, scope="layer")
    for i in ("0", "1"):
        kk = np.asarray(layer["layers"][i]["kernel"])
        assert int((kk == 0).sum()) == round(0.5 * kk.size)
    with pytest.raises(ValueError, match="non-decreasing|fewer than"):
        merge.magnitude_mask(P0, 0.1, mask=m1)
    bad = jax.tree.map(lambda v: v, P0)
    bad["layers"]["1"]["kernel"] = bad["layers"]["1"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="layers/1/kernel"):
        merge.magnitude_mask(bad, 0.5)


def test_schedules():
    np.testing.assert_allclose(merge.imp_sparsities(3, rate=0.2), [0.2, 0.36, 0.488])
    np.testing.assert_allclose(merge.geometric_sparsities(0.75, 2), [0.5, 0.75])


def test_sparse_model_soup_follows_the_schedule_and_keeps_the_mask():
    opt = make_optimizer("adam", learning_rate=1e-2, weight_decay=1e-3)  # decay must not revive pruned weights
    sched = merge.geometric_sparsities(0.8, 3)
    res = merge.sparse_model_soup(jax.random.key(1), FN, P0, X, Y, sparsities=sched, particles=2, epochs=1,
                                  batch_size=32, optimizer=opt, objective=Objective(FN, *DS.test))
    n = _kernels(P0).size
    prev = None
    for c, (rec, soup) in enumerate(zip(res.cycles, res.soups)):
        zeros = _kernels(soup) == 0
        assert int(zeros.sum()) == round(sched[c] * n)  # the schedule, exactly (no trained weight hit 0)
        assert rec.sparsity == pytest.approx(round(sched[c] * n) / n) and rec.target_sparsity == sched[c]
        if prev is not None:
            assert np.all(zeros[prev])  # zeros stay zero from cycle to cycle
        prev = zeros
        assert len(rec.particle_accuracies) == 2 and np.isfinite(rec.soup_accuracy)
    np.testing.assert_array_equal(_kernels(res.params) == 0, _kernels(res.mask) == 0)
    assert json.loads(json.dumps(res.to_dict()))["cycles"][2]["members"] == [0, 1]
    assert len(res.plot().data) == 1 + 3


def test_one_particle_without_pruning_is_plain_training_from_the_rewind_point():
    opt = optax.sgd(0.1, momentum=0.9)
    elsewhere = jax.tree.map(lambda v: 3.0 * v, P0)  # the pruning reference; training restarts from rewind
    res = merge.swamp(jax.random.key(2), FN, elsewhere, X, Y, sparsities=[0.0], particles=1, epochs=2, swa_start=2,
                      batch_size=32, optimizer=opt, rewind=P0)
    tr = Trainer(FN, X, Y, optimizer=opt, batch_size=32)
    want = tr.run(merge.particle_key(jax.random.key(2), 0, 0), tr.init(P0), epochs=2).params
    for i in ("0", "1"):
        np.testing.assert_allclose(res.params["layers"][i]["kernel"], want["layers"][i]["kernel"], rtol=1e-6,
                                   atol=1e-7)


def test_swamp_with_one_particle_and_no_pruning_is_swa_with_bn_update():
    ds = data.digits(image=True)
    x, y = ds.x_train[:64], ds.y_train[:64]
    fn, p, state = models.functional(models.build("cnn", jax.random.key(3), in_channels=1, num_classes=10,
                                                  widths=(4,), norm="batch"))
    opt = optax.sgd(0.05, momentum=0.9)
    key = jax.random.key(4)
    res = merge.swamp(key, fn, p, x, y, sparsities=[0.0], particles=1, epochs=3, swa_start=1, batch_size=32,
                      optimizer=opt, state=state, reset_batch_size=64)
    tr = Trainer(fn, x, y, optimizer=opt, batch_size=32)
    steps = [2, 4, 6]  # epoch ends: 64 examples, batches of 32
    run = tr.run(merge.particle_key(key, 0, 0), tr.init(p, state), epochs=3, capture_steps=steps)
    traj = [c.params for c in run.checkpoints if c.step in steps]
    want = merge.swa_with_bn_update(traj, apply_fn=fn, state=state, x=x, batch_size=64)
    assert want.num_averaged == 3
    for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(want.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(res.state), jax.tree.leaves(want.state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # SWA's BN update is RESET of the average: probes.batchnorm's independent implementation
    obj = Objective(fn, x, y)
    ref = reset_state(fn, want.params, x, momentum(obj, want.params), batch_size=64)
    for a, b in zip(jax.tree.leaves(want.state), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    stale = jax.tree.map(lambda *s: sum(s) / len(s), *[c.model_state for c in run.checkpoints if c.step in steps])
    assert not np.allclose(jax.tree.leaves(stale)[0], jax.tree.leaves(ref)[0])  # averaging statistics is not it


def test_bad_input():
    opt = optax.sgd(0.1)
    with pytest.raises(ValueError, match="non-decreasing"):
        merge.swamp(jax.random.key(0), FN, P0, X, Y, sparsities=[0.5, 0.2], optimizer=opt)
    with pytest.raises(ValueError, match="one per particle"):
        merge.sparse_model_soup(jax.random.key(0), FN, P0, X, Y, sparsities=[0.5], particles=3,
                                optimizer=[opt, opt])
    with pytest.raises(ValueError, match="greedy"):
        merge.sparse_model_soup(jax.random.key(0), FN, P0, X, Y, sparsities=[0.5], optimizer=opt, soup="greedy")

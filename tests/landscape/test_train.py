"""Training: determinism, separate init/data seeds, exact resume, spawning, optimizer settings."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from landscape.train import Trainer, make_optimizer, spawn


def linear(params, x):
    return x @ params["w"] + params["b"]


@pytest.fixture(scope="module")
def problem():
    x = jax.random.normal(jax.random.key(0), (96, 4))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(jnp.int32)
    params = {"w": jnp.zeros((4, 2)), "b": jnp.zeros(2)}
    return x, y, params


def flat(p):
    return np.concatenate([np.ravel(v) for v in jax.tree.leaves(p)])


def test_same_seeds_same_params_and_data_seed_matters(problem):
    x, y, params = problem
    trainer = Trainer(linear, x, y, optimizer=optax.sgd(0.3, momentum=0.9), batch_size=16)
    r1 = trainer.run(jax.random.key(3), trainer.init(params), epochs=3)
    r2 = trainer.run(jax.random.key(3), trainer.init(params), epochs=3)
    r3 = trainer.run(jax.random.key(4), trainer.init(params), epochs=3)
    np.testing.assert_array_equal(flat(r1.params), flat(r2.params))
    assert np.abs(flat(r1.params) - flat(r3.params)).max() > 1e-4
    assert r1.state.step == 3 * trainer.steps_per_epoch == 18
    assert r1.losses.shape == (18,) and r1.losses[-1] < r1.losses[0]


def test_batches_follow_the_documented_order():
    """The batch at step s is slice s mod S of permutation(fold_in(key, s // S), n)."""
    n, bs = 96, 32
    ids = jnp.arange(n)

    def apply_fn(p, xb):  # logits = w[id]: the gradient marks exactly the examples of the batch
        return jnp.stack([p["w"][xb[:, 0].astype(jnp.int32)], jnp.zeros(xb.shape[0])], -1)

    trainer = Trainer(apply_fn, ids[:, None].astype(jnp.float32), ids, optimizer=optax.sgd(1.0),
                      batch_size=bs, loss=lambda logits, t: logits[:, 0])
    key = jax.random.key(9)
    state = trainer.init({"w": jnp.zeros(n)})
    for step in range(5):  # crosses an epoch boundary (3 steps per epoch)
        nxt = trainer.run(key, state, steps=step + 1).state
        touched = np.flatnonzero(np.asarray(nxt.params["w"] - state.params["w"]))
        order = jax.random.permutation(jax.random.fold_in(key, step // 3), n)
        expected = np.sort(np.asarray(order[(step % 3) * bs:(step % 3 + 1) * bs]))
        np.testing.assert_array_equal(touched, expected)
        state = nxt


def test_resume_is_exact_and_spawn_differs_only_after_k(problem):
    x, y, params = problem
    opt = make_optimizer("adam", learning_rate=0.05, schedule="cosine", total_steps=30)
    trainer = Trainer(linear, x, y, optimizer=opt, batch_size=20)  # 4 steps per epoch, drops 16 examples
    parent = trainer.run(jax.random.key(1), trainer.init(params), steps=30, capture_every=5, capture_steps=[7])
    assert [c.step for c in parent.checkpoints] == [0, 5, 7, 10, 15, 20, 25, 30]
    # continuing from a mid-epoch checkpoint with the parent's key reproduces the parent exactly
    again = spawn(jax.random.key(1), trainer, parent.checkpoint_at(7), steps=30)
    np.testing.assert_array_equal(flat(again.params), flat(parent.params))
    np.testing.assert_array_equal(again.losses, parent.losses[7:])
    child = spawn(jax.random.key(2), trainer, parent.checkpoint_at(7), steps=30)
    assert np.abs(flat(child.params) - flat(parent.params)).max() > 1e-5
    with pytest.raises(ValueError, match=r"no checkpoint at step 8; captured steps: \[0, 5, 7"):
        parent.checkpoint_at(8)
    with pytest.raises(ValueError, match="past the requested end"):
        trainer.run(jax.random.key(1), parent.state, steps=10)


def test_bad_settings(problem):
    x, y, params = problem
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        make_optimizer("lamb")
    with pytest.raises(ValueError, match="total_steps"):
        make_optimizer("sgd", schedule="cosine")
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(linear, x, y, optimizer=optax.sgd(0.1), batch_size=1000)
    trainer = Trainer(linear, x, y, optimizer=optax.sgd(0.1), batch_size=16)
    with pytest.raises(ValueError, match="exactly one of steps or epochs"):
        trainer.run(jax.random.key(0), trainer.init(params))
    with pytest.raises(ValueError, match="capture_steps"):
        trainer.run(jax.random.key(0), trainer.init(params), steps=5, capture_steps=[9])


def test_cyclic_schedule_restarts():
    opt = make_optimizer("sgd", learning_rate=1.0, momentum=0.0, schedule="cyclic", cycle_steps=4)
    p = {"w": jnp.zeros(())}
    state = opt.init(p)
    lrs = []
    for _ in range(8):
        upd, state = opt.update({"w": jnp.ones(())}, state, p)
        lrs.append(-float(upd["w"]))
    np.testing.assert_allclose(lrs[:4], lrs[4:], rtol=1e-6)
    np.testing.assert_allclose(lrs[0], 1.0)
    assert lrs[0] > lrs[1] > lrs[2] > lrs[3]


def test_one_compilation_serves_every_epoch(problem):
    x, y, params = problem
    trainer = Trainer(linear, x, y, optimizer=optax.sgd(0.1), batch_size=16)
    trainer.run(jax.random.key(0), trainer.init(params), epochs=4)
    assert trainer._segment._cache_size() == 1

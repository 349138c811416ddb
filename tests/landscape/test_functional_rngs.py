"""``models.functional`` on NNX modules that hold an ``nnx.Rngs`` (Dropout)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from landscape import models
from landscape.train import Trainer


class DropoutNet(nnx.Module):
    def __init__(self, *, rate: float, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(6, 16, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(self.drop(jax.nn.relu(self.hidden(x))))


def manual_forward(params, x, mask=None):
    h = jax.nn.relu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    if mask is not None:
        h = h * mask
    return h @ params["out"]["kernel"] + params["out"]["bias"]


def test_rngs_state_is_plain_uint32_and_eval_is_deterministic():
    apply_fn, params, state = models.functional(DropoutNet(rate=0.5, rngs=nnx.Rngs(3)))
    leaves = dict(jax.tree_util.tree_leaves_with_path(state))
    assert leaves and all(np.asarray(v).dtype == np.uint32 for v in leaves.values())
    x = jax.random.normal(jax.random.key(0), (5, 6))
    # eval mode: dropout is off, so the logits equal the forward pass without any mask
    np.testing.assert_allclose(apply_fn(params, x), manual_forward(params, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(apply_fn(params, x), jax.jit(apply_fn)(params, x))
    assert hash(apply_fn) == hash(models.functional(DropoutNet(rate=0.5, rngs=nnx.Rngs(3)))[0])


def test_train_mode_drops_units_with_a_fresh_mask_each_step():
    rate = 0.5
    apply_fn, params, state = models.functional(DropoutNet(rate=rate, rngs=nnx.Rngs(3)))
    x = jnp.ones((64, 6))
    logits1, state1 = apply_fn.apply_train(params, state, x)
    logits2, state2 = jax.jit(apply_fn.apply_train)(params, state1, x)
    count = lambda s: int(s["drop"]["rngs"]["count"])  # noqa: E731
    assert (count(state), count(state1), count(state2)) == (0, 1, 2)
    np.testing.assert_array_equal(state2["drop"]["rngs"]["key"], state["drop"]["rngs"]["key"])
    assert not np.allclose(logits1, logits2)  # the counter moved: another mask
    # the same state gives the same mask (pure); the mask is inverted dropout with keep prob 1 - rate
    again, _ = apply_fn.apply_train(params, state, x)
    np.testing.assert_array_equal(again, logits1)
    # inverted dropout: the mean over many masks is the eval-mode output (E[mask] = 1)
    counts = jnp.arange(2000, dtype=jnp.uint32)
    batched = jax.vmap(lambda c: apply_fn.apply_train(params, {"drop": {"rngs": {**state["drop"]["rngs"], "count": c}}},
                                                      x[:1])[0])(counts)
    np.testing.assert_allclose(batched.mean(0), apply_fn(params, x[:1]), atol=0.05)
    assert float(jnp.std(batched[:, 0, 0])) > 0.01


def test_trainer_runs_a_dropout_model_and_state_checks():
    apply_fn, params, state = models.functional(DropoutNet(rate=0.2, rngs=nnx.Rngs(1)))
    x = jax.random.normal(jax.random.key(0), (64, 6))
    y = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0).astype(jnp.int32)
    trainer = Trainer(apply_fn, x, y, optimizer=optax.adam(1e-2), batch_size=16)
    res = trainer.run(jax.random.key(2), trainer.init(params, state), steps=12)
    assert int(res.state.model_state["drop"]["rngs"]["count"]) == 12
    assert np.all(np.isfinite(res.losses)) and res.losses[-4:].mean() < res.losses[:4].mean()
    with pytest.raises(ValueError, match="drop/rngs/key"):
        apply_fn.with_state({"drop": {"rngs": {"count": state["drop"]["rngs"]["count"]}}})
    with pytest.raises(ValueError, match=r"drop/rngs/key' has shape \(3,\)"):
        apply_fn.with_state({"drop": {"rngs": {"count": jnp.uint32(0), "key": jnp.zeros(3, jnp.uint32)}}})

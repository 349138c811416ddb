"""Token inputs and the next-token loss of Objective, against hand-written numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from landscape import Objective, models
from landscape.objective import IGNORE_INDEX, LOSSES
from probes import curves, hessian, surface

V, T, N = 7, 5, 11  # 11 sequences at batch_size=4: 3 batches of 4, one padded row
evaluate = jax.jit(lambda obj, p: obj.evaluate(p))  # one compilation per objective layout


def causal(p, x):
    """A tiny causal model: position t sees the mean embedding of the real tokens up to t."""
    ids, mask = x["input_ids"], x["attention_mask"]
    e = p["emb"][ids] * mask[..., None]
    c = jnp.cumsum(e, axis=1) / jnp.maximum(jnp.cumsum(mask, axis=1), 1)[..., None]
    return jnp.tanh(c) @ p["out"] + p["bias"]


def init(key, scale=1.0):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "emb": scale * jax.random.normal(k1, (V, 6)),
        "out": scale * jax.random.normal(k2, (6, V)),
        "bias": 0.1 * jax.random.normal(k3, (V,)),
    }


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (N, T)).astype(np.int32)
    lengths = np.array([5, 3, 5, 1, 4, 5, 2, 5, 5, 3, 5])
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    y = np.concatenate([ids[:, 1:], np.full((N, 1), IGNORE_INDEX)], axis=1).astype(np.int32)
    y[np.arange(N), lengths - 1] = IGNORE_INDEX  # the last real token has no real next token
    # padding positions keep a target: the Objective ignores them through the attention mask
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}, jnp.asarray(y), mask


def reference(params, x, y, mask, apply_fn=causal):
    """Mean token cross-entropy and token accuracy in float64, over tokens with mask 1 and a target."""
    z = np.asarray(apply_fn(params, x), np.float64)
    yy = np.asarray(y)
    real = (yy != IGNORE_INDEX) & (mask == 1)
    logz = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    nll = logz - np.take_along_axis(z, np.where(real, yy, 0)[..., None], -1)[..., 0]
    hit = z.argmax(-1) == yy
    return nll[real].sum() / real.sum(), hit[real].sum() / real.sum(), int(real.sum())


def test_next_token_matches_numpy_on_masked_padded_batches(data):
    x, y, mask = data
    params = init(jax.random.key(0))
    obj = Objective(causal, x, y, loss="next_token", batch_size=4)
    assert obj.batches()[2].shape == (3, 4) and int(obj.batches()[2].sum()) == N  # one padded row
    ref_loss, ref_acc, count = reference(params, x, y, mask)
    assert obj.num_tokens == obj.normaliser == count == int(mask[:, 1:].sum())
    out = evaluate(obj, params)
    np.testing.assert_allclose(out["loss"], ref_loss, rtol=1e-6)
    np.testing.assert_allclose(out["accuracy"], ref_acc, rtol=1e-6)
    assert 0 < ref_acc < 1
    # the mask lives in the targets: masked positions are ignored
    assert np.all(np.asarray(obj.y)[mask == 0] == IGNORE_INDEX)
    # loss_fn: its mean over the n sequences is the token-averaged loss (what Hessian products use)
    np.testing.assert_allclose(jnp.mean(obj.loss_fn(causal(params, x), obj.y)), ref_loss, rtol=1e-6)
    # the stand-alone per-sequence loss: the mean over each sequence's real tokens
    z = np.asarray(causal(params, x), np.float64)
    per = np.asarray(LOSSES["next_token"](causal(params, x), obj.y))
    i = 1  # 3 real tokens: targets at positions 0 and 1
    lz = np.log(np.exp(z[i]).sum(-1))
    np.testing.assert_allclose(per[i], np.mean([lz[t] - z[i, t, int(y[i, t])] for t in (0, 1)]), rtol=1e-6)


def test_jit_vmap_grad(data):
    x, y, mask = data
    obj = Objective(causal, x, y, loss="next_token", batch_size=4)
    stacked = jax.vmap(init)(jax.random.split(jax.random.key(1), 3))
    batched = jax.jit(jax.vmap(obj.loss))(stacked)
    one = jax.jit(lambda o, p: o.loss(p))
    loop = [float(one(obj, jax.tree.map(lambda a, i=i: a[i], stacked))) for i in range(3)]
    np.testing.assert_allclose(batched, loop, rtol=1e-6)
    p0 = jax.tree.map(lambda a: a[0], stacked)
    np.testing.assert_allclose(obj.loss(p0), loop[0], rtol=1e-6)  # eager equals jit
    real = jnp.asarray((np.asarray(y) != IGNORE_INDEX) & (mask == 1))

    def direct(p):  # one full batch, no padding: sum over real tokens / their count
        z = causal(p, x)
        lp = jax.nn.log_softmax(z)
        nll = -jnp.take_along_axis(lp, jnp.where(real, y, 0)[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(real, nll, 0)) / jnp.sum(real)

    g, g_ref = jax.jit(jax.grad(lambda q: obj.loss(q)))(p0), jax.jit(jax.grad(direct))(p0)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_pytree_inputs_classification_match_arrays():
    k1, k2 = jax.random.split(jax.random.key(2))
    xa = jax.random.normal(k1, (23, 5))
    y = jax.random.randint(k2, (23,), 0, 3)
    w = jax.random.normal(jax.random.key(3), (5, 3))
    flat = Objective(lambda p, x: x @ p, xa, y, batch_size=6)
    tree = Objective(lambda p, x: x["a"] @ p[:2] + x["b"][0] @ p[2:], {"a": xa[:, :2], "b": (xa[:, 2:],)}, y,
                     batch_size=6)
    assert tree.num_examples == 23 and tree.batches()[0]["a"].shape == (4, 6, 2)
    for k in ("loss", "accuracy"):
        np.testing.assert_allclose(evaluate(tree, w)[k], evaluate(flat, w)[k], rtol=1e-6)
    np.testing.assert_allclose(tree.logits(w), flat.logits(w), rtol=1e-6)
    np.testing.assert_allclose(jax.tree.leaves(jax.tree.unflatten(jax.tree.structure(tree), jax.tree.leaves(tree)))[0],
                               xa[:, :2])
    with pytest.raises(ValueError, match=r"\['b'\]"):
        Objective(lambda p, x: x, {"a": xa, "b": xa[:5]}, y)


def test_bad_token_inputs(data):
    x, y, _ = data
    params = init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(11, 4\)"):
        Objective(causal, {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"][:, :4]}, y,
                  loss="next_token")
    with pytest.raises(ValueError, match="only 0 and 1"):
        Objective(causal, {**x, "attention_mask": 2 * x["attention_mask"]}, y, loss="next_token")
    with pytest.raises(ValueError, match=r"token ids' shape \(11, 5\)"):
        Objective(causal, x, y[:, :4], loss="next_token")
    with pytest.raises(ValueError, match="got -1 at position"):
        Objective(causal, x, y.at[0, 0].set(-1), loss="next_token")
    with pytest.raises(ValueError, match="no real token"):
        Objective(causal, x, jnp.full_like(y, IGNORE_INDEX), loss="next_token")
    big = Objective(causal, x, y.at[2, 1].set(V), loss="next_token")
    with pytest.raises(ValueError, match=rf"\[0, {V}\).*from 0 to {V}"):
        big.loss(params)
    flat = Objective(lambda p, x: causal(p, x)[:, 0], x, y, loss="next_token")
    with pytest.raises(ValueError, match=r"logits of shape \(N, T, V\)"):
        flat.loss(params)


def test_curves_and_surfaces_run_on_a_zoo_gpt_token_objective(data):
    x, y, mask = data
    gpt = models.build("gpt", jax.random.key(0), vocab_size=V, context=T, width=8, depth=1, heads=2)
    apply_fn, a, _ = models.functional(gpt)
    b = jax.tree.map(lambda v: 0.5 * v, a)
    obj = Objective(apply_fn, x, y, loss="next_token", batch_size=4)
    ea, eb = evaluate(obj, a), evaluate(obj, b)
    ref_loss, ref_acc, _ = reference(a, x, y, mask, apply_fn)  # the GPT on the whole masked batch
    np.testing.assert_allclose([ea["loss"], ea["accuracy"]], [ref_loss, ref_acc], rtol=1e-6)
    path = curves.interpolate(obj, a, b, num=3, chunk=3)
    np.testing.assert_allclose(np.asarray(path.loss)[[0, -1]], [ea["loss"], eb["loss"]], rtol=1e-5)
    np.testing.assert_allclose(path.accuracy[0], ea["accuracy"], rtol=1e-5)
    mid = jax.tree.map(lambda u, v: 0.5 * (u + v), a, b)
    np.testing.assert_allclose(path.loss[1], evaluate(obj, mid)["loss"], rtol=1e-5)
    d = jax.tree.map(lambda u, v: v - u, a, b)
    line = surface.surface_1d(obj, a, d, grid=[0.0, 1.0])
    np.testing.assert_allclose(line.loss, [ea["loss"], eb["loss"]], rtol=1e-5)
    plane = surface.surface_2d(obj, a, [d, jax.tree.map(lambda v: -v, d)], grid=([0.0, 1.0], [0.0]))
    np.testing.assert_allclose(plane.loss[:, 0], [ea["loss"], eb["loss"]], rtol=1e-5)


def test_hessian_top2_of_a_token_objective_equals_dense(data):
    x, y, mask = data
    a = init(jax.random.key(0))
    obj = Objective(causal, x, y, loss="next_token", batch_size=4)
    flat, unravel = ravel_pytree(a)
    real = jnp.asarray((np.asarray(y) != IGNORE_INDEX) & (mask == 1))

    def direct(f):  # the token-averaged loss on the whole unpadded batch, written out
        lp = jax.nn.log_softmax(causal(unravel(f), x))
        nll = -jnp.take_along_axis(lp, jnp.where(real, y, 0)[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(real, nll, 0)) / jnp.sum(real)

    dense = jax.jit(jax.hessian(direct))(flat)
    ref = np.linalg.eigvalsh(np.asarray(dense, np.float64))[::-1][:2]
    res = hessian.eigenvalues(jax.random.key(0), obj, a, k=2, num_steps=16)
    np.testing.assert_allclose(res.eigenvalues, ref, rtol=1e-5)

"""No silent wrong answers in the foundations: non-finite values, labels, broadcasts, truncations.

Each test pins one class of fault of issue 12 that used to return a plausible number.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from landscape import Objective, align, merge, tree
from landscape.train import DivergenceError, Trainer


def linear(p, x):
    return x @ p["w"]


X = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)
Y = jnp.array([0, 1, 2, 0, 1, 2])
W = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)}


# ------------------------------------------------------------------ non-finite logits
def test_nan_logits_give_nan_accuracy_not_class_zero():
    obj = Objective(linear, X, Y, batch_size=4)
    out = obj.evaluate({"w": W["w"].at[0, 0].set(jnp.nan)})  # every row's logit 0 is NaN
    assert np.isnan(float(out["loss"])) and np.isnan(float(out["accuracy"]))
    # one bad row poisons the mean; finite logits keep the exact argmax accuracy
    x_bad = X.at[2].set(jnp.nan)
    assert np.isnan(float(Objective(linear, x_bad, Y).evaluate(W)["accuracy"]))
    want = float(np.mean(np.argmax(np.asarray(X @ W["w"]), 1) == np.asarray(Y)))
    assert float(obj.evaluate(W)["accuracy"]) == pytest.approx(want)


# ------------------------------------------------------------------ labels
def test_labels_outside_the_classes_are_errors_naming_both_shapes():
    with pytest.raises(ValueError, match=r"labels must be >= 0, got labels from -1"):
        Objective(linear, X, Y.at[0].set(-1))  # -1 used to be the last class
    obj = Objective(linear, X, Y.at[0].set(3))  # 3 classes: label 3 is out of range
    with pytest.raises(ValueError, match=r"\[0, 3\), got labels from 0 to 3.*shape \(6,\).*int32.*\(6, 3\) \(3 classes\)"):
        obj.loss(W)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        jax.jit(lambda o, p: o.evaluate(p))(obj, W)  # the same check at trace time under jit


def test_float_labels_and_column_one_hot_are_not_broadcast():
    x3 = X[:3]
    # (N,) float labels with N == C used to be read as one probability row broadcast over the batch
    with pytest.raises(ValueError, match=r"probability rows of shape \(N, C\), got shape \(3,\)"):
        Objective(linear, x3, jnp.array([0.0, 1.0, 2.0]))
    # an (N, 1) "one-hot" column used to broadcast against (N, C) logits
    col = Objective(linear, X, jnp.ones((6, 1)))
    with pytest.raises(ValueError, match=r"exactly the outputs' shape.*\(6, 1\).*\(6, 3\)"):
        col.loss(W)
    with pytest.raises(ValueError, match=r"exactly the outputs' shape.*\(6, 1\)"):
        Objective(linear, X, jnp.ones((6, 1)), loss="mse").loss(W)
    with pytest.raises(ValueError, match=r"row 0 of shape \(6, 3\) sums to 2"):
        Objective(linear, X, 2 * jax.nn.one_hot(Y, 3))
    # probability rows of exactly (N, C) stay accepted and equal the integer-label loss
    soft = Objective(linear, X, jax.nn.one_hot(Y, 3))
    np.testing.assert_allclose(soft.loss(W), Objective(linear, X, Y).loss(W), rtol=1e-6)


def test_callable_loss_with_out_of_range_label_scores_nan():
    obj = Objective(linear, X, Y.at[1].set(7), loss=lambda z, t: jnp.sum(z**2, -1))
    assert np.isnan(float(obj.evaluate(W)["accuracy"]))


def test_trainer_checks_labels_against_the_model():
    trainer = Trainer(linear, X, Y.at[0].set(5), optimizer=optax.sgd(0.1), batch_size=3)
    with pytest.raises(ValueError, match=r"\[0, 3\), got labels from 0 to 5"):
        trainer.run(jax.random.key(0), trainer.init(W), steps=1)


# ------------------------------------------------------------------ broadcasts and truncations
def test_lerp_scale_reject_shaped_coefficients_and_integer_leaves():
    a, b = {"w": jnp.zeros((2, 2))}, {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match=r"t must be a scalar .* shape \(2,\)"):
        tree.lerp(a, b, jnp.array([0.0, 1.0]))  # used to interpolate column-wise
    with pytest.raises(ValueError, match=r"s must be a scalar"):
        tree.scale(a, jnp.ones(2))
    ints = {"w": jnp.zeros(2), "count": jnp.array([0, 1])}
    with pytest.raises(ValueError, match=r"leaf 'count' has dtype int32"):
        tree.lerp(ints, ints, 0.5)  # lerp(0, 1, 0.5) truncated to 0
    with pytest.raises(ValueError, match=r"scale needs floating-point leaves, but params leaf 'count'"):
        tree.scale(ints, 0.5)
    # scalars, traced ones included, still work: a sweep is one vmap
    ts = jnp.array([0.0, 0.25, 1.0])
    got = jax.vmap(lambda t: tree.lerp(a, b, t)["w"])(ts)
    np.testing.assert_allclose(got, ts[:, None, None] * np.ones((3, 2, 2)))


def test_merges_reject_shaped_lam():
    base = {"w": jnp.zeros(3)}
    fts = [{"w": jnp.array([1.0, -2.0, 0.5])}, {"w": jnp.array([3.0, 1.0, 0.0])}]
    lam = jnp.array([1.0, 0.0, 1.0])
    for fn in (
        lambda: merge.task_arithmetic(fts, base=base, lam=lam),
        lambda: merge.ties(fts, base=base, lam=lam),
        lambda: merge.dare(jax.random.key(0), fts, base=base, lam=lam),
        lambda: merge.slerp(fts[0], fts[1], t=lam),
    ):
        with pytest.raises(ValueError, match=r"(lam|t) must be a scalar"):
            fn()
    out = jax.vmap(lambda l: merge.task_arithmetic(fts, base=base, lam=l)["w"])(jnp.array([0.5, 2.0]))
    np.testing.assert_allclose(out, [[2.0, -0.5, 0.25], [8.0, -2.0, 1.0]])


def test_one_unlisted_model_is_not_read_as_a_stack():
    one = {"a": jnp.arange(4.0).reshape(2, 2), "b": jnp.array([1.0, 3.0])}  # leaves share leading size 2
    with pytest.raises(ValueError, match=r"models is one params tree, not a list.*stacked=True"):
        merge.average(one)  # used to return the mean over the first axis
    with pytest.raises(ValueError, match=r"trajectory is one params tree"):
        merge.swa(one)
    with pytest.raises(ValueError, match=r"finetuned is one params tree shaped like base"):
        merge.ties(one, base=one)
    ms = [one, tree.scale(one, 3.0)]
    want = tree.scale(one, 2.0)
    for got in (merge.average(ms), merge.average(tree.stack(ms), stacked=True), merge.swa(tree.stack(ms), stacked=True)):
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(x, y, rtol=1e-6)


def test_align_apply_rejects_index_arrays_that_are_not_permutations():
    params = {"l0": {"kernel": jnp.arange(6.0).reshape(2, 3)}, "l1": {"kernel": jnp.arange(6.0).reshape(3, 2)}}
    spec = align.PermutationSpec({"l0/kernel": (None, "h"), "l1/kernel": ("h", None)})
    with pytest.raises(ValueError, match=r"'h' is not a permutation of 0..2: out of range \[\], repeated \[0\]"):
        align.apply(spec, {"h": jnp.array([0, 0, 2])}, params)
    with pytest.raises(ValueError, match=r"out of range \[3\]"):
        align.apply(spec, {"h": jnp.array([0, 1, 3])}, params)
    perm = {"h": jnp.array([2, 0, 1])}
    eager = align.apply(spec, perm, params)
    jitted = jax.jit(lambda p, q: align.apply(spec, p, q))(perm, params)  # traced: values not checked
    np.testing.assert_array_equal(eager["l0"]["kernel"], np.asarray(params["l0"]["kernel"])[:, [2, 0, 1]])
    np.testing.assert_array_equal(jitted["l1"]["kernel"], eager["l1"]["kernel"])


# ------------------------------------------------------------------ non-finite merges
def test_ties_and_dare_propagate_a_nan_entry_of_one_model():
    base = {"w": jnp.zeros(4)}
    bad = {"w": jnp.array([1.0, jnp.nan, 3.0, 0.5])}
    good = {"w": jnp.ones(4)}
    out = np.asarray(merge.ties([bad, good], base=base, density=1.0)["w"])
    assert np.isnan(out[1])  # used to be 1.0: the NaN lost the sign election and vanished
    ref = np.asarray(merge.ties([{"w": bad["w"].at[1].set(0.0)}, good], base=base, density=1.0)["w"])
    np.testing.assert_allclose(out[[0, 2, 3]], ref[[0, 2, 3]])
    assert np.isnan(np.asarray(merge.ties([bad, good], base=base, density=0.25)["w"])[1])
    keep = [{"w": jnp.array([True, False, True, True])}, {"w": jnp.ones(4, bool)}]  # drops the NaN entry
    dared = np.asarray(merge.dare(None, [bad, good], base=base, mask=keep, rescale="none")["w"])
    assert np.isnan(dared[1]) and np.allclose(dared[[0, 2, 3]], [2.0, 4.0, 1.5])
    assert np.isnan(np.asarray(merge.breadcrumbs([bad, good], base=base, density=0.5, gamma=0.0)["w"])[1])


# ------------------------------------------------------------------ training
def test_epochs_must_be_whole():
    trainer = Trainer(linear, X, Y, optimizer=optax.sgd(0.1), batch_size=3)
    with pytest.raises(ValueError, match=r"epochs: must be an int >= 0, got 2.9"):
        trainer.run(jax.random.key(0), trainer.init(W), epochs=2.9)  # used to run 2 epochs
    with pytest.raises(ValueError, match=r"steps: must be an int"):
        trainer.run(jax.random.key(0), trainer.init(W), steps=True)


def test_divergence_stops_with_the_step_and_epoch():
    x = 10.0 * X
    y = jnp.asarray(np.random.default_rng(2).normal(size=(6, 3)), jnp.float32)
    trainer = Trainer(linear, x, y, optimizer=optax.sgd(1.0), batch_size=3, loss="mse")  # 2 steps per epoch
    state = trainer.init(W)
    with pytest.raises(DivergenceError, match=r"training diverged at global step \d+ \(epoch \d+") as info:
        trainer.run(jax.random.key(0), state, steps=400)
    err = info.value
    assert err.epoch == err.step // 2 and 0 < err.step < 400
    assert not tree.nonfinite_leaves(err.state.params) and err.state.step <= err.step
    # independent check: the step before the reported one is still finite and the loss there is huge
    before = trainer.run(jax.random.key(0), state, steps=err.step)
    assert not tree.nonfinite_leaves(before.params) and np.all(np.isfinite(before.losses))
    assert before.losses[-1] > 1e6

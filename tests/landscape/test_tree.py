"""The pytree vector space: algebraic identities (hypothesis), check_match messages, jit/vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from landscape import tree

floats = st.floats(-10, 10, allow_nan=False, allow_subnormal=False, width=32)  # XLA flushes subnormals
scalars = st.floats(-3, 3, allow_nan=False, width=32)


@st.composite
def tree_pairs(draw):
    """Two matching params trees (nested dict + list) with random shapes and float32 values."""
    shapes = draw(st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=4))
    def one():
        leaves = [jnp.asarray(draw(arrays(np.float32, tuple(s), elements=floats))) for s in shapes]
        return {"layers": leaves[:-1], "head": {"kernel": leaves[-1]}}
    return one(), one()


def close(a, b, tol=1e-4):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@settings(max_examples=30, deadline=None)
@given(tree_pairs(), scalars)
def test_lerp_endpoints_and_linearity(pair, t):
    a, b = pair
    for x, y in zip(jax.tree.leaves(tree.lerp(a, b, 0.0)), jax.tree.leaves(a)):
        np.testing.assert_array_equal(x, y)  # exact at t=0
    for x, y in zip(jax.tree.leaves(tree.lerp(a, b, 1.0)), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)  # exact at t=1
    close(tree.lerp(a, b, t), tree.add(a, tree.scale(tree.sub(b, a), t)))
    close(tree.add_scaled(a, b, t), tree.add(a, tree.scale(b, t)))


@settings(max_examples=30, deadline=None)
@given(tree_pairs(), scalars, scalars)
def test_vdot_bilinear_and_norm_identities(pair, s, r):
    a, b = pair
    lhs = tree.vdot(tree.add(tree.scale(a, s), tree.scale(b, r)), b)
    rhs = s * tree.vdot(a, b) + r * tree.vdot(b, b)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(tree.vdot(a, b), tree.vdot(b, a), rtol=1e-6)
    np.testing.assert_allclose(tree.norm(a) ** 2, tree.vdot(a, a), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(tree.norm(tree.scale(a, s)), abs(s) * tree.norm(a), rtol=1e-4, atol=1e-4)
    # triangle inequality and Cauchy-Schwarz
    assert tree.norm(tree.add(a, b)) <= tree.norm(a) + tree.norm(b) + 1e-3
    assert abs(tree.vdot(a, b)) <= tree.norm(a) * tree.norm(b) * (1 + 1e-5) + 1e-3


@settings(max_examples=30, deadline=None)
@given(tree_pairs())
def test_ravel_roundtrip_and_norm_matches_flat(pair):
    a, b = pair
    flat, unravel = tree.ravel(a)
    assert flat.shape == (tree.num_params(a),)
    close(unravel(flat), a, tol=0)
    fb, _ = tree.ravel(b)
    np.testing.assert_allclose(tree.vdot(a, b), jnp.dot(flat, fb), rtol=1e-5, atol=1e-3)
    if float(tree.norm(a)) > 1e-3 and float(tree.norm(b)) > 1e-3:
        c = float(tree.cosine(a, b))
        assert -1 - 1e-5 <= c <= 1 + 1e-5
        np.testing.assert_allclose(tree.cosine(a, tree.scale(a, 2.5)), 1.0, rtol=1e-5)


def test_stack_unstack_roundtrip_and_errors():
    a = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.zeros(3)}
    b = tree.scale(a, 2.0)
    s = tree.stack([a, b])
    assert s["w"].shape == (2, 2, 3)
    back = tree.unstack(s)
    close(back[0], a, tol=0)
    close(back[1], b, tol=0)
    with pytest.raises(ValueError, match="empty"):
        tree.stack([])
    with pytest.raises(ValueError, match=r"models\[1\]"):
        tree.stack([a, {"w": jnp.zeros((2, 2)), "b": jnp.zeros(3)}])


def test_check_match_names_path_shape_and_dtype():
    a = {"enc": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}, "head": [jnp.zeros((4, 2))]}
    bad_shape = {"enc": {"kernel": jnp.zeros((3, 5)), "bias": jnp.zeros(4)}, "head": [jnp.zeros((4, 2))]}
    with pytest.raises(ValueError, match=r"'enc/kernel'.*\(3, 4\).*\(3, 5\)"):
        tree.check_match(a, bad_shape)
    bad_dtype = jax.tree.map(lambda x: x, a)
    bad_dtype["head"] = [jnp.zeros((4, 2), jnp.int32)]
    with pytest.raises(ValueError, match=r"'head/0'.*float32.*int32"):
        tree.check_match(a, bad_dtype)
    missing = {"enc": {"kernel": jnp.zeros((3, 4))}, "head": [jnp.zeros((4, 2))]}
    with pytest.raises(ValueError, match=r"enc/bias"):
        tree.check_match(a, missing)
    with pytest.raises(ValueError, match="enc/kernel"):
        tree.add(a, bad_shape)
    tree.check_match(a, tree.zeros_like(a))  # no error


def test_random_like_is_keyed_and_gaussian():
    a = {"w": jnp.zeros((200, 50)), "b": jnp.zeros(10)}
    r1 = tree.random_like(jax.random.key(0), a)
    r2 = tree.random_like(jax.random.key(0), a)
    r3 = tree.random_like(jax.random.key(1), a)
    close(r1, r2, tol=0)
    assert not np.allclose(r1["w"], r3["w"])
    assert abs(float(r1["w"].mean())) < 0.02 and abs(float(r1["w"].std()) - 1) < 0.02
    assert not np.allclose(r1["w"][:10, 0], r1["b"])  # leaves get different subkeys


def test_jit_and_vmap():
    a = {"w": jnp.ones((3, 2)), "b": jnp.arange(2.0)}
    b = tree.scale(a, -1.0)
    np.testing.assert_allclose(jax.jit(tree.vdot)(a, b), tree.vdot(a, b))
    ts = jnp.linspace(0, 1, 5)
    norms = jax.vmap(lambda t: tree.norm(tree.lerp(a, b, t)))(ts)
    expected = [float(tree.norm(tree.lerp(a, b, float(t)))) for t in ts]
    np.testing.assert_allclose(norms, expected, rtol=1e-6)
    stacked = tree.stack([a, b])
    np.testing.assert_allclose(jax.vmap(tree.norm)(stacked), [tree.norm(a), tree.norm(b)], rtol=1e-6)
    assert tree.key_name(jax.tree.leaves_with_path(a)[0][0]) == "b"
    assert [n for n, _ in tree.named_leaves({"x": [a]})] == ["x/0/b", "x/0/w"]

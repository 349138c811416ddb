"""Tests for landscape.align.spec: permutation algebra, apply, and the spec checks."""

import pathlib
import re

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from landscape import align
from landscape.align import PermutationSpec

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "permutation-specs.md"

SPEC = PermutationSpec(
    {"w1": (None, "h"), "b1": ("h",), "w2": ("h", "g"), "b2": ("g",), "w3": ("g", None)},
    {"mean": ("h",)},
)


def params_of(rng: np.random.Generator, h: int = 5, g: int = 3) -> dict:
    return {
        "w1": jnp.asarray(rng.normal(size=(4, h)), jnp.float32),
        "b1": jnp.asarray(rng.normal(size=(h,)), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(h, g)), jnp.float32),
        "b2": jnp.asarray(rng.normal(size=(g,)), jnp.float32),
        "w3": jnp.asarray(rng.normal(size=(g, 2)), jnp.float32),
    }


def forward(p: dict, x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    g = jax.nn.relu(h @ p["w2"] + p["b2"])
    return g @ p["w3"]


def perms(n: int) -> st.SearchStrategy:
    return st.permutations(list(range(n))).map(lambda p: jnp.asarray(p, jnp.int32))


def perm_pair_strategy() -> st.SearchStrategy:
    return st.fixed_dictionaries({"h": perms(5), "g": perms(3)})


def matrix(p: jax.Array) -> np.ndarray:
    """P with (P v)_i = v_{p_i}: the matrix that take(v, p) applies."""
    n = len(p)
    m = np.zeros((n, n))
    m[np.arange(n), np.asarray(p)] = 1
    return m


# ---------------------------------------------------------------------------- algebra
@settings(max_examples=30, deadline=None)
@given(perm_pair_strategy(), perm_pair_strategy(), perm_pair_strategy())
def test_invert_compose_identities(p, q, r):
    ident = {"h": jnp.arange(5), "g": jnp.arange(3)}
    eq = lambda a, b: all(np.array_equal(a[k], b[k]) for k in a)  # noqa: E731
    assert eq(align.invert(align.invert(p)), p)
    assert eq(align.compose(p, align.invert(p)), ident)
    assert eq(align.compose(align.invert(p), p), ident)
    assert eq(align.compose(p, ident), p) and eq(align.compose(ident, p), p)
    assert eq(align.compose(align.compose(p, q), r), align.compose(p, align.compose(q, r)))
    assert eq(align.invert(align.compose(p, q)), align.compose(align.invert(q), align.invert(p)))
    # matrix reference: compose(p, q) acts as P_p @ P_q
    for k in p:
        np.testing.assert_array_equal(
            matrix(align.compose(p, q)[k]), matrix(p[k]) @ matrix(q[k])
        )


@settings(max_examples=20, deadline=None)
@given(perm_pair_strategy(), perm_pair_strategy())
def test_apply_composes_and_inverts(p, q):
    params = params_of(np.random.default_rng(0))
    lhs = align.apply(SPEC, align.compose(p, q), params)
    rhs = align.apply(SPEC, p, align.apply(SPEC, q, params))
    for k in params:
        np.testing.assert_array_equal(lhs[k], rhs[k])
    back = align.apply(SPEC, align.invert(p), align.apply(SPEC, p, params))
    for k in params:
        np.testing.assert_array_equal(back[k], params[k])


def test_apply_matches_permutation_matrices_and_keeps_function():
    rng = np.random.default_rng(1)
    params = params_of(rng)
    perm = align.random_permutation(jax.random.key(0), SPEC, params)
    out = align.apply(SPEC, perm, params)
    ph, pg = matrix(perm["h"]), matrix(perm["g"])
    np.testing.assert_allclose(out["w1"], params["w1"] @ ph.T, atol=1e-7)
    np.testing.assert_allclose(out["b1"], ph @ params["b1"], atol=1e-7)
    np.testing.assert_allclose(out["w2"], ph @ params["w2"] @ pg.T, atol=1e-7)
    np.testing.assert_allclose(out["w3"], pg @ params["w3"], atol=1e-7)
    x = jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)
    np.testing.assert_allclose(forward(out, x), forward(params, x), atol=1e-5)
    state = {"mean": jnp.arange(5.0)}
    np.testing.assert_array_equal(
        align.apply_state(SPEC, perm, state)["mean"], np.arange(5.0)[np.asarray(perm["h"])]
    )


def test_apply_jit_and_vmap():
    params = params_of(np.random.default_rng(2))
    keys = jax.random.split(jax.random.key(3), 4)
    stacked = jax.vmap(lambda k: align.random_permutation(k, SPEC, params))(keys)
    out = jax.jit(jax.vmap(align.apply, (None, 0, None)), static_argnums=0)(SPEC, stacked, params)
    for i, k in enumerate(keys):
        ref = align.apply(SPEC, align.random_permutation(k, SPEC, params), params)
        for name in params:
            np.testing.assert_array_equal(out[name][i], ref[name])


def test_identity_random_and_sizes():
    params = params_of(np.random.default_rng(3), h=6, g=2)
    assert SPEC.sizes(params) == {"g": 2, "h": 6}
    assert SPEC.names == ("g", "h")
    ident = align.identity(SPEC, params)
    out = align.apply(SPEC, ident, params)
    assert all(np.array_equal(out[k], params[k]) for k in params)
    a = align.random_permutation(jax.random.key(5), SPEC, params)
    b = align.random_permutation(jax.random.key(5), SPEC, params)
    c = align.random_permutation(jax.random.key(6), SPEC, params)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(np.sort(a[k]), np.arange(SPEC.sizes(params)[k]))
    assert not np.array_equal(a["h"], c["h"])
    assert dict(SPEC.perm_to_axes) == {
        "g": (("b2", 0), ("w2", 1), ("w3", 0)),
        "h": (("b1", 0), ("w1", 1), ("w2", 0)),
    }


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda p: {k: v for k, v in p.items() if k != "b2"}, "'b2'"),  # spec entry without leaf
        (lambda p: {**p, "extra": jnp.zeros(3)}, "'extra'"),  # leaf missing from spec
        (lambda p: {**p, "b1": jnp.zeros((5, 1))}, "'b1'"),  # wrong number of axes
        (lambda p: {**p, "w2": jnp.zeros((4, 3))}, "'w2'"),  # size conflict for 'h'
    ],
)
def test_check_spec_names_the_path(mutate, pattern):
    params = mutate(params_of(np.random.default_rng(4)))
    with pytest.raises(ValueError, match=re.escape(pattern)):
        align.check_spec(SPEC, params)
    perm = {"h": jnp.arange(5), "g": jnp.arange(3)}
    with pytest.raises(ValueError, match=re.escape(pattern)):
        align.apply(SPEC, perm, params)


def test_check_spec_nested_paths_and_state():
    spec = PermutationSpec({"layers/0/kernel": (None, "P"), "layers/0/bias": ("P",)})
    good = {"layers": {"0": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}}}
    align.check_spec(spec, good)
    bad = {"layers": {"0": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(4)}}}
    with pytest.raises(ValueError, match="layers/0/bias"):
        align.check_spec(spec, bad)
    with pytest.raises(ValueError, match="'mean'"):
        align.check_spec(SPEC, {"mean": jnp.zeros((5, 2))}, part="state")
    with pytest.raises(ValueError, match="accepted"):
        align.check_spec(SPEC, good, part="buffers")


def test_bad_permutations_and_specs():
    params = params_of(np.random.default_rng(5))
    with pytest.raises(ValueError, match=r"missing \['g'\]"):
        align.apply(SPEC, {"h": jnp.arange(5)}, params)
    with pytest.raises(ValueError, match="'h'"):
        align.apply(SPEC, {"h": jnp.arange(4), "g": jnp.arange(3)}, params)
    with pytest.raises(ValueError, match="integer"):
        align.apply(SPEC, {"h": jnp.arange(5.0), "g": jnp.arange(3)}, params)
    with pytest.raises(ValueError, match="'g'"):
        align.compose({"h": jnp.arange(5), "g": jnp.arange(3)}, {"h": jnp.arange(5), "g": jnp.arange(4)})
    with pytest.raises(ValueError, match="'b'"):
        PermutationSpec({"b": "h"})
    with pytest.raises(ValueError, match="'mean'"):
        PermutationSpec({"b": ("h",)}, {"mean": ("other",)})


def test_spec_is_hashable_and_round_trips():
    again = PermutationSpec.from_dict(SPEC.to_dict())
    assert again == SPEC and hash(again) == hash(SPEC)
    assert PermutationSpec({"b": ("h",)}) != SPEC


def test_doc_example_runs():
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"no python block in {DOC}"
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), {})  # noqa: S102

"""Tests for landscape.align.ot_fusion (Singh & Jaggi 2020, arXiv 1910.05653)."""

import importlib
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from landscape import Objective, align, models
from landscape.align.ot_fusion import ot_fusion

otf_module = importlib.import_module("landscape.align.ot_fusion")


def max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def wide_fn():
    return models.functional(models.MLP(12, (20, 16, 3), rngs=nnx.Rngs(0)))[0]


@pytest.fixture(scope="module")
def mlp():
    fm, a, _ = models.functional(models.MLP(12, (10, 8, 3), rngs=nnx.Rngs(0)))
    _, c, _ = models.functional(models.MLP(12, (10, 8, 3), rngs=nnx.Rngs(1)))
    x = jax.random.normal(jax.random.key(2), (40, 12))
    return fm, a, c, x


def widen(p: dict) -> dict:
    """Net2Net-style copy twice as wide: every hidden unit duplicated, its outgoing weights halved."""
    l0, l1, l2 = p["layers"]["0"], p["layers"]["1"], p["layers"]["2"]
    k1 = jnp.concatenate([l1["kernel"], l1["kernel"]], axis=0) / 2
    return {
        "layers": {
            "0": {
                "kernel": jnp.concatenate([l0["kernel"], l0["kernel"]], axis=1),
                "bias": jnp.concatenate([l0["bias"], l0["bias"]]),
            },
            "1": {
                "kernel": jnp.concatenate([k1, k1], axis=1),
                "bias": jnp.concatenate([l1["bias"], l1["bias"]]),
            },
            "2": {"kernel": jnp.concatenate([l2["kernel"], l2["kernel"]], axis=0) / 2, "bias": l2["bias"]},
        }
    }


# ---------------------------------------------------------------------------- equal widths
def test_fusing_a_permuted_copy_returns_the_model_and_a_permutation(mlp):
    fm, a, _, _ = mlp
    p = align.random_permutation(jax.random.key(3), fm.spec, a)
    b = align.apply(fm.spec, p, a)
    fused, info = ot_fusion(fm.spec, a, b)
    assert max_diff(fused, a) < 1e-6
    assert info.is_permutation
    for name, t in info.transport.items():
        t = np.asarray(t)
        assert set(np.unique(t).tolist()) <= {0.0, 1.0}
        np.testing.assert_array_equal(t.sum(0), 1.0)
        np.testing.assert_array_equal(t.sum(1), 1.0)
        np.testing.assert_allclose(np.asarray(info.plans[name]), t / t.shape[0], atol=1e-7)
        # the recovered map undoes the planted permutation
        np.testing.assert_array_equal(np.asarray(info.perm[name]), np.asarray(align.invert(p)[name]))
    assert info.order == ("P_0", "P_1")
    assert all(info.converged)
    assert max(info.costs) < 1e-5


@settings(max_examples=8, deadline=None)
@given(st.permutations(list(range(10))), st.permutations(list(range(8))), st.floats(0.0, 1.0))
def test_property_fusing_any_permuted_copy_returns_the_model(mlp, p0, p1, w):
    fm, a, _, _ = mlp
    perm = {"P_0": jnp.asarray(p0, jnp.int32), "P_1": jnp.asarray(p1, jnp.int32)}
    fused, info = ot_fusion(fm.spec, a, align.apply(fm.spec, perm, a), weights=(w, 1.0 - w) if w < 1 else (1.0, 0.0))
    assert max_diff(fused, a) < 1e-5
    assert {n: np.asarray(q).tolist() for n, q in info.perm.items()} == {
        n: np.asarray(q).tolist() for n, q in align.invert(perm).items()
    }


def test_equal_widths_exact_is_weight_matching_layer_by_layer(mlp):
    """Two different models: the aligned source is exactly a permutation of b (same function)."""
    fm, a, c, x = mlp
    fused, info = ot_fusion(fm.spec, a, c)
    assert info.is_permutation
    assert max_diff(info.aligned, align.apply(fm.spec, info.perm, c)) == 0.0
    np.testing.assert_allclose(fm(info.aligned, x), fm(c, x), atol=1e-5)
    expected = jax.tree.map(lambda u, v: 0.5 * u + 0.5 * v, a, info.aligned)
    assert max_diff(fused, expected) < 1e-7


def test_exact_assignment_agrees_with_brute_force():
    """One hidden group of 5 units: the exact plan minimises the squared-distance cost over all 120 perms."""
    rng = np.random.default_rng(0)
    spec = align.PermutationSpec({"w1": (None, "h"), "b1": ("h",), "w2": ("h", None)})
    a = {"w1": rng.normal(size=(3, 5)), "b1": rng.normal(size=5), "w2": rng.normal(size=(5, 2))}
    b = {"w1": rng.normal(size=(3, 5)), "b1": rng.normal(size=5), "w2": rng.normal(size=(5, 2))}
    a = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), a)
    b = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), b)
    _, info = ot_fusion(spec, a, b)
    feats_a = np.concatenate([np.asarray(a["w1"]).T, np.asarray(a["b1"])[:, None]], axis=1)
    feats_b = np.concatenate([np.asarray(b["w1"]).T, np.asarray(b["b1"])[:, None]], axis=1)
    cost = ((feats_b[:, None, :] - feats_a[None, :, :]) ** 2).sum(-1)  # (source, target)
    best = min(itertools.permutations(range(5)), key=lambda q: sum(cost[q[j], j] for j in range(5)))
    np.testing.assert_array_equal(np.asarray(info.perm["h"]), np.asarray(best))
    np.testing.assert_allclose(info.costs[0], sum(cost[best[j], j] for j in range(5)) / 5, rtol=1e-5)


def test_sinkhorn_approaches_the_exact_result(mlp):
    fm, a, c, _ = mlp
    exact, info_exact = ot_fusion(fm.spec, a, c)
    errors = []
    for eps in (0.5, 0.05, 0.002):
        fused, info = ot_fusion(fm.spec, a, c, solver="sinkhorn", epsilon=eps)
        assert info.solver == "sinkhorn"
        for name, t in info.transport.items():  # barycentric: every column sums to one
            np.testing.assert_allclose(np.asarray(t).sum(0), 1.0, atol=1e-5)
        errors.append(
            max(float(np.abs(np.asarray(info.plans[n]) - np.asarray(info_exact.plans[n])).max()) for n in info.order)
        )
    assert errors[0] > errors[-1]
    assert errors[-1] < 1e-3 * 10  # plan entries are 1/n = 0.1 or 0.125 where matched
    fused, _ = ot_fusion(fm.spec, a, c, solver="sinkhorn", epsilon=0.002)
    assert max_diff(fused, exact) < 0.05


# ---------------------------------------------------------------------------- unequal widths
def test_unequal_widths_fuse_into_the_target_and_keep_the_function(mlp, wide_fn):
    fm, a, _, x = mlp
    fm_wide = wide_fn
    wide = widen(a)
    np.testing.assert_allclose(fm_wide(wide, x), fm(a, x), atol=1e-5)
    wide = align.apply(fm.spec, align.random_permutation(jax.random.key(4), fm.spec, wide), wide)

    fused, info = ot_fusion(fm.spec, a, wide)
    assert jax.tree.map(jnp.shape, fused) == jax.tree.map(jnp.shape, a)
    assert {n: t.shape for n, t in info.transport.items()} == {"P_0": (20, 10), "P_1": (16, 8)}
    assert not info.is_permutation and info.perm is None
    for t in info.transport.values():
        np.testing.assert_allclose(np.asarray(t).sum(0), 1.0, atol=1e-6)
    np.testing.assert_allclose(fm(info.aligned, x), fm(a, x), atol=1e-4)
    np.testing.assert_allclose(fm(fused, x), fm(a, x), atol=1e-4)

    # the paper's literal rule averages the outgoing weights of merged units: not function-preserving
    fused_bary, _ = ot_fusion(fm.spec, a, wide, incoming="barycentric")
    assert float(jnp.max(jnp.abs(fm(fused_bary, x) - fm(a, x)))) > 0.05

    # fusing into the wider model instead (target="b") keeps b's shapes and the function too
    fused_b, info_b = ot_fusion(fm.spec, a, wide, target="b")
    assert jax.tree.map(jnp.shape, fused_b) == jax.tree.map(jnp.shape, wide)
    assert {n: t.shape for n, t in info_b.transport.items()} == {"P_0": (10, 20), "P_1": (8, 16)}
    np.testing.assert_allclose(fm_wide(fused_b, x), fm(a, x), atol=1e-4)


def test_linear_program_route_agrees_with_replicated_assignment(monkeypatch):
    rng = np.random.default_rng(1)
    cost = rng.random((6, 4))
    plan_assign = otf_module._exact_plan(cost)
    monkeypatch.setattr(otf_module, "_ASSIGNMENT_MAX", 0)
    plan_lp = otf_module._exact_plan(cost)
    for plan in (plan_assign, plan_lp):
        np.testing.assert_allclose(plan.sum(1), 1 / 6, atol=1e-9)
        np.testing.assert_allclose(plan.sum(0), 1 / 4, atol=1e-9)
    np.testing.assert_allclose((plan_assign * cost).sum(), (plan_lp * cost).sum(), rtol=1e-9)


# ---------------------------------------------------------------------------- other grounds / models
def test_activation_ground_recovers_a_permutation(mlp):
    fm, a, _, x = mlp
    p = align.random_permutation(jax.random.key(5), fm.spec, a)
    b = align.apply(fm.spec, p, a)
    obj = Objective(fm, x, jnp.zeros(x.shape[0], jnp.int32), batch_size=16)
    fused, info = ot_fusion(fm.spec, a, b, ground="activations", objective=obj, num_samples=30)
    assert info.ground == "activations" and info.is_permutation
    assert max_diff(fused, a) < 1e-6


def test_activation_ground_with_unequal_widths_takes_a_pair_of_models(mlp, wide_fn):
    fm, a, _, x = mlp
    fm_wide = wide_fn
    obj = Objective(fm, x, jnp.zeros(x.shape[0], jnp.int32))
    fused, _ = ot_fusion(fm.spec, a, widen(a), ground="activations", objective=obj, apply_fn=(fm, fm_wide))
    np.testing.assert_allclose(fm(fused, x), fm(a, x), atol=1e-4)


def test_layernorm_cnn_permuted_copy():
    fm, a, _ = models.functional(models.CNN(1, 3, widths=(4, 6), norm="layer", rngs=nnx.Rngs(0)))
    b = align.apply(fm.spec, align.random_permutation(jax.random.key(6), fm.spec, a), a)
    fused, info = ot_fusion(fm.spec, a, b)
    assert info.is_permutation and max_diff(fused, a) < 1e-6


def test_weights_and_json(mlp):
    fm, a, c, _ = mlp
    fused, info = ot_fusion(fm.spec, a, c, weights=(3.0, 7.0))
    expected = jax.tree.map(lambda u, v: 0.3 * u + 0.7 * v, a, info.aligned)
    assert max_diff(fused, expected) < 1e-6
    d = json.loads(json.dumps(info.to_dict()))
    assert d["order"] == ["P_0", "P_1"] and d["groups"]["P_0"]["is_permutation"]


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ground": "gradients"}, "unknown ground 'gradients'; accepted"),
        ({"solver": "emd"}, "unknown solver 'emd'"),
        ({"ground_metric": "l1"}, "unknown ground_metric"),
        ({"target": "c"}, "unknown target"),
        ({"incoming": "sum"}, "unknown incoming"),
        ({"epsilon": 0.0}, "epsilon must be"),
        ({"weights": (0.5,)}, "weights must be two"),
        ({"weights": (-1.0, 2.0)}, "weights must be two"),
        ({"ground": "activations"}, "needs objective="),
    ],
)
def test_bad_settings(mlp, kwargs, match):
    fm, a, c, _ = mlp
    with pytest.raises(ValueError, match=match):
        ot_fusion(fm.spec, a, c, **kwargs)


def test_bad_models(mlp):
    fm, a, c, x = mlp
    bad = jax.tree.map(lambda v: v, c)
    bad["layers"]["2"]["kernel"] = jnp.zeros((8, 4))
    with pytest.raises(ValueError, match="layers/2/kernel"):
        ot_fusion(fm.spec, a, bad)
    missing = {"layers": {k: v for k, v in c["layers"].items() if k != "2"}}
    with pytest.raises(ValueError, match="model b: spec entry 'layers/2/bias'"):
        ot_fusion(fm.spec, a, missing)
    with pytest.raises(ValueError, match="PermutationSpec"):
        ot_fusion({"layers/0/kernel": (None, "P_0")}, a, c)
    obj = Objective(lambda p, xb: xb, x, jnp.zeros(x.shape[0], jnp.int32))
    with pytest.raises(ValueError, match="intermediates"):
        ot_fusion(fm.spec, a, c, ground="activations", objective=obj)


def test_unsupported_architectures_are_rejected(mlp):
    """Residual streams (one permutation on a block's input and output, as the zoo ResNet's spec)
    and BatchNorm state are refused before any work."""
    rng = np.random.default_rng(0)
    residual = align.PermutationSpec(
        {"stem": (None, "R"), "conv1": ("R", "H"), "conv2": ("H", "R"), "head": ("R", None)}
    )
    p = {k: jnp.asarray(rng.normal(size=(4, 4)), jnp.float32) for k in ("stem", "conv1", "conv2", "head")}
    with pytest.raises(ValueError, match="cycle.*ResNet"):
        ot_fusion(residual, p, p)
    self_loop = align.PermutationSpec({"w": ("R", "R")})
    with pytest.raises(ValueError, match="residual stream"):
        ot_fusion(self_loop, {"w": p["stem"]}, {"w": p["stem"]})
    fm, a, _, _ = mlp
    bn = align.PermutationSpec(dict(fm.spec.axes), {"norm/mean": ("P_0",)})
    with pytest.raises(ValueError, match="BatchNorm"):
        ot_fusion(bn, a, a)

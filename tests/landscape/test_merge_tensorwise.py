"""Tensor-wise (mergekit) merge methods and recipe parsing: closed forms, invariants, errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from landscape.merge import tensorwise as tw
from landscape.merge.recipe import evaluate_setting, parse_recipe, resolve_parameters

E1 = np.array([1.0, 0.0, 0.0], np.float32)
E2 = np.array([0.0, 1.0, 0.0], np.float32)


def _defaults(name: str, **shared: object) -> dict:
    out = {p.name: p.default for p in tw.METHODS[name].parameters if p.scope == "shared"}
    out.update(shared)
    return out


def test_linear_is_weighted_average_or_sum() -> None:
    xs = np.array([[1.0, 2.0], [3.0, 6.0], [-1.0, 0.0]], np.float32)
    w = np.array([1.0, 2.0, 1.0], np.float32)
    np.testing.assert_allclose(tw.linear(xs, weight=w), (w[:, None] * xs).sum(0) / 4.0, rtol=1e-6)
    np.testing.assert_allclose(tw.linear(xs, weight=w, normalize=False), (w[:, None] * xs).sum(0), rtol=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0])
def test_slerp_on_orthogonal_vectors_follows_the_great_circle(t: float) -> None:
    out = tw.slerp(E1, E2, t=t)
    np.testing.assert_allclose(out, math.cos(t * math.pi / 2) * E1 + math.sin(t * math.pi / 2) * E2, atol=1e-6)


def test_slerp_of_colinear_vectors_is_the_lerp() -> None:
    np.testing.assert_allclose(tw.slerp(E1, 3 * E1, t=0.5), 2 * E1, rtol=1e-6)


def test_nuslerp_t_from_weights_and_task_vectors() -> None:
    base = np.array([1.0, 1.0, 1.0], np.float32)
    out = tw.nuslerp([base + E1, base + E2], weight=np.array([1.0, 3.0]), base=base)
    t = 0.75
    np.testing.assert_allclose(out, base + math.cos(t * math.pi / 2) * E1 + math.sin(t * math.pi / 2) * E2, atol=1e-6)
    # row-wise (vectors along the last axis): each row interpolated on its own
    rows = tw.nuslerp([np.stack([E1, 2 * E1]), np.stack([E2, 2 * E1])], weight=np.array([1.0, 1.0]), flatten=False)
    np.testing.assert_allclose(rows[0], (E1 + E2) / math.sqrt(2), atol=1e-6)
    np.testing.assert_allclose(rows[1], 2 * E1, atol=1e-6)


def test_multislerp_and_karcher_give_the_geodesic_midpoint() -> None:
    mid = (E1 + E2) / math.sqrt(2)
    np.testing.assert_allclose(tw.multislerp([E1, E2], weight=np.array([0.5, 0.5])), mid, atol=1e-6)
    np.testing.assert_allclose(tw.karcher([2 * E1, 2 * E2]), 2 * mid, atol=1e-5)
    # three directions at the corners of the octant: Karcher mean is the symmetric direction
    e3 = np.array([0.0, 0.0, 1.0], np.float32)
    np.testing.assert_allclose(tw.karcher([E1, E2, e3], max_iter=50, tol=1e-7), np.ones(3) / math.sqrt(3), atol=1e-5)


def test_ties_at_density_one_is_task_arithmetic_with_sign_election() -> None:
    base = np.zeros(4, np.float32)
    d = np.array([[1.0, -2.0, 0.5, 0.0], [3.0, 1.0, -1.0, 2.0], [-1.0, 1.0, -0.25, 0.0]], np.float32)
    w = np.array([1.0, 0.5, 2.0], np.float32)
    out = tw.generalized_task_arithmetic(None, base + d, base=base, weight=w, sparsification="magnitude", consensus="sum", normalize=True)
    v = w[:, None] * d
    sign = np.where(v.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(v) == sign
    expected = (v * agree).sum(0) / np.where((w[:, None] * agree).sum(0) == 0, 1, (w[:, None] * agree).sum(0))
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    ta = tw.generalized_task_arithmetic(None, base + d, base=base, weight=w, lam=0.5)
    np.testing.assert_allclose(ta, 0.5 * v.sum(0), rtol=1e-6)


def test_magnitude_counts_use_mergekit_floor() -> None:
    x = np.arange(1, 101, dtype=np.float32)[None]
    out = np.asarray(tw.generalized_task_arithmetic(None, x, base=np.zeros(100, np.float32), weight=[1.0], density=0.29, sparsification="magnitude"))
    assert int((out != 0).sum()) == 28  # int(0.29 * 100) == 28, not 29
    np.testing.assert_array_equal(out[-28:], np.arange(73, 101))


def test_breadcrumbs_mask_drops_outliers_then_keeps_density() -> None:
    d = jnp.array([5.0, -1.0, 9.0, 2.0, -7.0, 3.0, 0.5, 8.0, -4.0, 6.0])
    keep = np.asarray(tw.breadcrumbs_mask(d, n_bot=4, target=5))  # n=10, density .5, gamma .1
    np.testing.assert_array_equal(np.abs(np.asarray(d))[keep], [5.0, 7.0, 8.0, 4.0, 6.0])


def test_della_probabilities_are_rank_linear_per_row() -> None:
    d = jnp.array([[0.1, -3.0, 2.0], [5.0, 1.0, -0.5]])
    p = np.asarray(tw.della_keep_probabilities(d, density=0.5, epsilon=0.2))
    np.testing.assert_allclose(p, [[0.3, 0.7, 0.5], [0.7, 0.5, 0.3]], atol=1e-6)
    np.testing.assert_allclose(p.mean(axis=1), 0.5, atol=1e-6)


def test_dare_with_given_mask_rescales_to_l1_norm() -> None:
    base = np.zeros(4, np.float32)
    d = np.array([[1.0, -2.0, 3.0, 4.0]], np.float32)
    mask = np.array([[True, False, True, False]])
    out = tw.generalized_task_arithmetic(None, d, base=base, weight=[1.0], density=0.5, sparsification="random", rescale=True, masks=mask)
    np.testing.assert_allclose(out, [1.0 * 10 / 4, 0.0, 3.0 * 10 / 4, 0.0], rtol=1e-6)


def test_dare_masks_are_reproducible_and_keep_the_density() -> None:
    x = np.ones((2, 20000), np.float32)
    base = np.zeros(20000, np.float32)
    kw = {"base": base, "weight": [1.0, 1.0], "density": 0.3, "sparsification": "random"}
    k = tw.tensor_key(jax.random.key(0), "model.layers.0.mlp.up_proj.weight")
    a = np.asarray(tw.generalized_task_arithmetic(k, x, **kw))
    b = np.asarray(tw.generalized_task_arithmetic(k, x, **kw))
    c = np.asarray(tw.generalized_task_arithmetic(tw.tensor_key(jax.random.key(1), "model.layers.0.mlp.up_proj.weight"), x, **kw))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # each model keeps ~30 %: the sum of two independent masks has mean 0.6 (binomial sd 0.005)
    assert abs(a.mean() - 0.6) < 0.03
    assert tw.tensor_key(jax.random.key(0), "x").dtype == jax.random.key(0).dtype
    assert not np.array_equal(jax.random.key_data(tw.tensor_key(jax.random.key(0), "a")), jax.random.key_data(tw.tensor_key(jax.random.key(0), "b")))


@pytest.mark.parametrize("cos", [0.0, 0.5, -0.3])
def test_model_stock_on_known_angles(cos: float) -> None:
    base = np.array([1.0, -1.0, 2.0], np.float32)
    d1 = 2 * E1
    d2 = 3 * (cos * E1 + math.sqrt(1 - cos**2) * E2)
    out = tw.model_stock([base + d1, base + d2], base=base)
    t = 2 * cos / (1 + cos)
    np.testing.assert_allclose(out, t * (base + (d1 + d2) / 2) + (1 - t) * base, atol=1e-6)


def test_nearswap_closed_form() -> None:
    a = np.array([0.0, 0.0, 0.0], np.float32)
    b = np.array([0.1, 1.0, 4.0], np.float32)
    np.testing.assert_allclose(tw.nearswap(a, b, t=0.5), [0.1, 0.5, 0.5], rtol=1e-6)


def test_sce_weights_by_mean_square_after_sign_erase() -> None:
    base = np.zeros(2, np.float32)
    d = np.array([[1.0, -1.0], [3.0, 1.0]], np.float32)
    out = np.asarray(tw.sce(d, base=base))
    w = np.array([1.0, 5.0]) / 6.0  # mean squares 1 and 5
    # entry 0: both +, weighted mean; entry 1: sum 0 -> + elected, only model 1 agrees
    np.testing.assert_allclose(out, [(w[0] * 1 + w[1] * 3) / 1.0, 1.0], rtol=1e-6)


_ARR = hnp.arrays(np.float32, (3, 4), elements=st.floats(-8, 8, width=32).filter(lambda v: abs(v) > 1e-2))
_IDENTITY = [
    ("linear", {}, False),
    ("slerp", {"t": 0.3}, True),
    ("nuslerp", {}, False),
    ("karcher", {}, False),
    ("multislerp", {}, False),
    ("task_arithmetic", {}, True),
    ("ties", {}, True),
    ("dare_ties", {}, True),
    ("breadcrumbs", {}, True),
    ("della", {}, True),
    ("sce", {}, True),
    ("model_stock", {}, True),
    ("nearswap", {"t": 0.5}, True),
]


@settings(max_examples=8, deadline=None)
@given(x=_ARR)
def test_merging_identical_models_returns_them(x: np.ndarray) -> None:
    for name, shared, with_base in _IDENTITY:
        spec = tw.METHODS[name]
        n_models = 3 if name not in ("slerp", "nearswap", "nuslerp") else 2
        tensors = [x] * (n_models + (1 if with_base and name not in ("slerp", "nearswap") else 0))
        if name in ("slerp", "nearswap"):
            tensors = [x, x]
        base_index = 0 if with_base else None
        per_input = []
        for i in range(len(tensors)):
            d = {}
            for p in spec.parameters:
                if p.scope == "input" or (p.scope == "non_base" and i != base_index):
                    d[p.name] = 1.0 if p.default is tw.REQUIRED else (p.default if p.name != "density" else 0.5)
            if name == "della":
                d.update(density=0.5, epsilon=0.1)
            per_input.append(d)
        out = tw.apply(name, jax.random.key(0), tensors, base_index=base_index, shared=_defaults(name, **shared), per_input=per_input)
        np.testing.assert_allclose(out, x, rtol=2e-5, atol=2e-5, err_msg=name)


# ----------------------------------------------------------------------------------------------
# recipes


_RECIPE = """\
merge_method: ties
base_model: base
models:
  - model: a
    parameters:
      weight: [0.0, 0.5, 1.0]
      density:
        - filter: self_attn
          value: 0.3
        - value: [0.2, 0.6]
  - model: b
    parameters: {weight: 1.0}
parameters:
  density: 0.9
  lambda: 1.5
dtype: float32
seed: 7
"""


def test_recipe_parses_gradients_filters_and_precedence() -> None:
    r = parse_recipe(_RECIPE)
    assert r.merge_method == "ties" and r.seed == 7 and r.dtype == "float32"
    a, b = r.models
    assert evaluate_setting(a.parameters["weight"], "x", 0.25) == pytest.approx(0.25)
    assert evaluate_setting(a.parameters["weight"], "x", 1.0) == pytest.approx(1.0)
    assert evaluate_setting(a.parameters["density"], "model.layers.0.self_attn.q_proj.weight", 0.7) == pytest.approx(0.3)
    assert evaluate_setting(a.parameters["density"], "model.layers.1.mlp.up_proj.weight", 0.5) == pytest.approx(0.4)
    shared, per = resolve_parameters(
        r.spec,
        tensor_name="model.layers.1.mlp.up_proj.weight",
        t=1.0,
        shared_sources=[r.parameters],
        input_sources=[[a.parameters, r.parameters], [b.parameters, r.parameters], [r.parameters]],
        input_names=["model.layers.1.mlp.up_proj.weight"] * 3,
        base_index=2,
    )
    assert shared == {"lambda": 1.5, "normalize": True, "rescale": False, "int8_mask": False}
    assert per[0] == {"weight": 1.0, "density": pytest.approx(0.6)}
    assert per[1] == {"weight": 1.0, "density": 0.9}  # falls through to the top level
    assert per[2] == {}  # the base has no per-model parameters


def test_toml_recipe_equals_yaml() -> None:
    toml = """
merge_method = "ties"
base_model = "base"
dtype = "float32"
seed = 7
[parameters]
density = 0.9
lambda = 1.5
[[models]]
model = "a"
parameters = { weight = [0.0, 0.5, 1.0], density = [{ filter = "self_attn", value = 0.3 }, { value = [0.2, 0.6] }] }
[[models]]
model = "b"
parameters = { weight = 1.0 }
"""
    y, t = parse_recipe(_RECIPE), parse_recipe(toml, format="toml")
    assert [(m.model, {k: v.conditions for k, v in m.parameters.items()}) for m in y.models] == [
        (m.model, {k: v.conditions for k, v in m.parameters.items()}) for m in t.models
    ]
    assert {k: v.conditions for k, v in y.parameters.items()} == {k: v.conditions for k, v in t.parameters.items()}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("merge_method: ties\nbase_model: b\nmodels: [a]\nfoo: 1\n", r"<recipe>:4: foo: unknown key 'foo'"),
        ("merge_method: tie\nmodels: [a]\n", r"<recipe>:1: merge_method: unknown merge_method 'tie'"),
        ("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters:\n      densty: 0.5\n", r":6: models\[0\]\.parameters\.densty: unknown parameter 'densty'"),
        ("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {lambda: 2}\n", r"'lambda' is one value for all models"),
        ("merge_method: ties\nmodels: [a, b]\n", r"needs a base_model"),
        ("merge_method: slerp\nbase_model: a\nmodels: [a, b, c]\nparameters: {t: 0.5}\n", r"at most 2 models"),
        ("merge_method: linear\nmodels: [a]\ndtype: fp8\n", r":3: dtype: dtype must be one of"),
        ("merge_method: ties\nbase_model: b\nmodels: [a]\nparameters: {normalize: 3}\n", r"normalize must be true or false"),
        ("merge_method: ties\nbase_model: b\nmodels: [a]\nparameters: {density: [{filter: x, valu: 1}]}\n", r"unknown key 'valu' in a conditional parameter"),
        ("merge_method: linear\nmodels: [a]\nmodules: {}\n", r"'modules' .* is not supported"),
        ("merge_method: linear\nmodels: [a]\nslices: []\n", r"exactly one of 'models' or 'slices'"),
        ("merge_method: passthrough\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2]}\n      - {model: b, layer_range: [0, 3]}\n", r"same number of layers"),
        ("merge_method: linear\nmodels: [a]\nseed: -1\n", r"seed must be a non-negative integer"),
        ("merge_method: ties\nbase_model: x\nslices:\n  - sources: [{model: a, layer_range: [0, 1]}]\n", r":4: slices\[0\]\.sources: the base model 'x' must be one of the slice's sources"),
        ("merge_method: linear\nmodels: [a]\ntokenizer_source: union\n", r"'union' .* is not supported"),
    ],
)
def test_recipe_errors_name_the_key_and_line(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_recipe(text)


def test_required_parameter_missing_names_model_and_tensor() -> None:
    r = parse_recipe("merge_method: ties\nbase_model: b\nmodels: [a]\n")
    with pytest.raises(ValueError, match=r"needs parameter 'weight' for model 'a', tensor 'w'"):
        resolve_parameters(
            r.spec, tensor_name="w", t=0.0, shared_sources=[r.parameters], input_sources=[[{}], [{}]],
            input_names=["w", "w"], base_index=1, input_labels=["a", "b"],
        )


def test_unknown_method_and_bad_masks_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown merge method 'nope'"):
        tw.apply("nope", None, [E1], base_index=None, shared={}, per_input=[{}])
    with pytest.raises(ValueError, match=r"masks have shape \(2, 2\), expected \(1, 3\)"):
        tw.generalized_task_arithmetic(None, E1[None], base=E1, weight=[1.0], density=0.5, sparsification="random", masks=np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        tw.generalized_task_arithmetic(None, E1[None], base=E1, weight=[1.0], density=0.5, sparsification="random")

"""Tests for REPAIR and RESET (landscape.align.repair)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from landscape import Objective, align, models, tree


@functools.lru_cache(maxsize=None)
def zoo(kind: str, seed: int):
    if kind == "mlp":
        model = models.MLP(4, (16, 12, 3), rngs=nnx.Rngs(seed))
    elif kind == "cnn":
        model = models.CNN(1, 3, widths=(4, 6), norm="layer", rngs=nnx.Rngs(seed))
    elif kind == "cnn-bn":
        model = models.CNN(1, 3, widths=(3, 5), norm="batch", rngs=nnx.Rngs(seed))
    else:
        model = models.ResNet(1, 3, base_width=4, rngs=nnx.Rngs(seed))
    return models.functional(model)


def inputs(kind: str, n: int = 61):
    shape = (n, 4) if kind == "mlp" else (n, 8, 8, 1)
    return jax.random.normal(jax.random.key(3), shape)


def leaves_equal(p, q) -> bool:
    return all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(p), jax.tree.leaves(q)))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_repair_leaves_endpoints_unchanged(kind):
    apply_fn, a, _ = zoo(kind, 0)
    _, b, _ = zoo(kind, 1)
    x = inputs(kind)
    assert leaves_equal(align.repair(x, apply_fn, a, b, tree.lerp(a, b, 0.0), t=0.0, batch_size=16), a)
    assert leaves_equal(align.repair(x, apply_fn, a, b, tree.lerp(a, b, 1.0), t=1.0, batch_size=16), b)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_repaired_model_has_target_statistics(kind):
    apply_fn, a, _ = zoo(kind, 0)
    _, b, _ = zoo(kind, 1)
    x = inputs(kind)
    t = 0.3
    merged = tree.lerp(a, b, t)
    obj = Objective(apply_fn, x, jnp.zeros(x.shape[0], jnp.int32), batch_size=16)  # 4 batches, padded
    repaired = align.repair(obj, apply_fn, a, b, merged, t=t)
    assert jax.tree.structure(repaired) == jax.tree.structure(merged)

    # independent reference: full-batch pre-activations in float64
    def moments(p):
        out = {}
        for n, z in apply_fn.intermediates(p, x, kind="pre").items():
            z = np.asarray(z, np.float64).reshape(-1, z.shape[-1])
            out[n] = (z.mean(0), z.std(0))
        return out

    ma, mb, mr, mm = moments(a), moments(b), moments(repaired), moments(merged)
    for n in apply_fn.spec.names:
        target_mean = (1 - t) * ma[n][0] + t * mb[n][0]
        target_std = (1 - t) * ma[n][1] + t * mb[n][1]  # standard deviations, not variances
        np.testing.assert_allclose(mr[n][0], target_mean, atol=2e-5 * (1 + np.abs(target_mean).max()))
        np.testing.assert_allclose(mr[n][1], target_std, rtol=1e-4, atol=1e-6)
    # the merged model had collapsed / shifted statistics that REPAIR changed
    assert any(np.abs(mm[n][1] - mr[n][1]).max() > 1e-3 for n in apply_fn.spec.names)
    # only the producing layers changed: the MLP's output layer and the CNN's convs and head stay
    changed = {k for (k, u), (_, v) in zip(tree.named_leaves(repaired), tree.named_leaves(merged)) if not np.array_equal(u, v)}
    expected = (
        {"layers/0/kernel", "layers/0/bias", "layers/1/kernel", "layers/1/bias"}
        if kind == "mlp"
        else {"norms/0/scale", "norms/0/bias", "norms/1/scale", "norms/1/bias"}
    )
    assert changed == expected
    # statistics agree with the library's own exact statistics over the padded batches
    lib = align.unit_statistics(obj, apply_fn, repaired)
    for n in apply_fn.spec.names:
        np.testing.assert_allclose(lib[n][1], mr[n][1], rtol=1e-4, atol=1e-6)


def test_repair_of_identical_models_is_the_identity():
    apply_fn, a, _ = zoo("mlp", 0)
    x = inputs("mlp")
    repaired = align.repair(x, apply_fn, a, a, tree.lerp(a, a, 0.5))
    for u, v in zip(jax.tree.leaves(repaired), jax.tree.leaves(a)):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def test_repair_layers_and_residual_streams():
    apply_fn, params, _ = zoo("resnet", 0)
    spec = apply_fn.spec
    with pytest.raises(ValueError, match="P_stage0"):
        align.repair_layers(spec, params)
    inner = [n for n in spec.names if "block" in n]
    layers = align.repair_layers(spec, params, names=inner)
    assert layers["P_stage0_block0"] == ("stages/0/blocks/0/norm1/scale", "stages/0/blocks/0/norm1/bias")
    mlp_fn, mlp, _ = zoo("mlp", 0)
    assert align.repair_layers(mlp_fn.spec, mlp) == {
        "P_0": ("layers/0/kernel", "layers/0/bias"),
        "P_1": ("layers/1/kernel", "layers/1/bias"),
    }


def test_repair_of_chosen_layers_only():
    apply_fn, a, _ = zoo("cnn", 0)
    _, b, _ = zoo("cnn", 1)
    x = inputs("cnn")
    merged = tree.lerp(a, b, 0.5)
    layers = align.repair_layers(apply_fn.spec, a, names=["P_1"])
    repaired = align.repair(x, apply_fn, a, b, merged, layers=layers, batch_size=16)
    changed = {k for (k, u), (_, v) in zip(tree.named_leaves(repaired), tree.named_leaves(merged)) if not np.array_equal(u, v)}
    assert changed == {"norms/1/scale", "norms/1/bias"}
    stats = align.unit_statistics(x, apply_fn, repaired, batch_size=16)
    sa = align.unit_statistics(x, apply_fn, a, batch_size=16)
    sb = align.unit_statistics(x, apply_fn, b, batch_size=16)
    np.testing.assert_allclose(stats["P_1"][1], 0.5 * (sa["P_1"][1] + sb["P_1"][1]), rtol=1e-4, atol=1e-6)


def test_repair_bad_input():
    apply_fn, a, _ = zoo("mlp", 0)
    _, b, _ = zoo("mlp", 1)
    x = inputs("mlp")
    with pytest.raises(ValueError, match="intermediates"):
        align.repair(x, lambda p, xb: xb, a, b, a, spec=apply_fn.spec)
    with pytest.raises(ValueError, match="finite real"):
        align.repair(x, apply_fn, a, b, a, t=float("nan"))
    with pytest.raises(ValueError, match="not a params leaf"):
        align.repair(x, apply_fn, a, b, a, layers={"P_0": ("layers/0/w", "layers/0/bias")})
    with pytest.raises(ValueError, match="unknown unit groups"):
        align.repair_layers(apply_fn.spec, a, names=["P_9"])


# ---------------------------------------------------------------------------- RESET
def _conv(h, k):
    return jax.lax.conv_general_dilated(h, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_reset_single_batch_is_the_population_statistics():
    apply_fn, p, state = zoo("cnn-bn", 0)
    x = inputs("cnn-bn", n=37)
    new = align.reset(apply_fn, p, state, x, batch_size=100)
    assert jax.tree.structure(new) == jax.tree.structure(state)
    # direct train-mode forward by hand, float64
    xd = np.asarray(x, np.float64)
    h0 = np.asarray(_conv(jnp.asarray(xd, jnp.float32), p["convs"]["0"]["kernel"]), np.float64)
    m0, v0 = h0.mean((0, 1, 2)), h0.var((0, 1, 2))
    np.testing.assert_allclose(new["norms"]["0"]["mean"], m0, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new["norms"]["0"]["var"], v0, rtol=1e-4)
    z = (h0 - m0) / np.sqrt(v0 + 1e-5) * np.asarray(p["norms"]["0"]["scale"]) + np.asarray(p["norms"]["0"]["bias"])
    h = np.maximum(z, 0)
    h = h.reshape(37, 4, 2, 4, 2, 3).max(axis=(2, 4))  # 2x2 max-pool, stride 2
    h1 = np.asarray(_conv(jnp.asarray(h, jnp.float32), p["convs"]["1"]["kernel"]), np.float64)
    np.testing.assert_allclose(new["norms"]["1"]["mean"], h1.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["norms"]["1"]["var"], h1.var((0, 1, 2)), rtol=1e-4)
    # with the new statistics, eval mode normalises the first BatchNorm's input exactly
    pre = apply_fn.intermediates(p, x, kind="pre", state=new)["P_0"]
    expected = (h0 - m0) / np.sqrt(v0 + 1e-5) * np.asarray(p["norms"]["0"]["scale"]) + np.asarray(p["norms"]["0"]["bias"])
    np.testing.assert_allclose(pre, expected, rtol=1e-4, atol=1e-4)


def test_reset_averages_batch_statistics_weighted_by_size():
    apply_fn, p, state = zoo("cnn-bn", 0)
    x = inputs("cnn-bn", n=37)
    new = align.reset(apply_fn, p, state, Objective(apply_fn, x, jnp.zeros(37, jnp.int32)), batch_size=10)
    hs = [np.asarray(_conv(x[i : i + 10], p["convs"]["0"]["kernel"]), np.float64) for i in range(0, 37, 10)]
    sizes = [h.shape[0] for h in hs]
    assert sizes == [10, 10, 10, 7]
    mean = sum(h.mean((0, 1, 2)) * len(h) for h in hs) / 37
    var = sum(h.var((0, 1, 2)) * len(h) for h in hs) / 37
    np.testing.assert_allclose(new["norms"]["0"]["mean"], mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new["norms"]["0"]["var"], var, rtol=1e-4)


def test_reset_without_state_and_bad_input():
    apply_fn, p, state = zoo("mlp", 0)
    assert state == {}
    assert align.reset(apply_fn, p, state, inputs("mlp")) == {}
    with pytest.raises(ValueError, match="apply_train"):
        align.reset(lambda q, xb: xb, p, state, inputs("mlp"))
    with pytest.raises(ValueError, match="batch_size"):
        align.reset(apply_fn, p, state, inputs("mlp"), batch_size=0)

"""Traced permutation specs and activations (landscape.align.trace) against hand-written oracles.

Oracles: the zoo's hand-written ``permutation_spec()`` and ``intermediates`` taps, the invariant
"a model permuted under its spec computes the same function" on Linen / NNX / Equinox / plain-JAX
models, and the zoo's own results for activation matching, REPAIR and TACT on the equivalent
plain-JAX model.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from landscape import Objective, align, merge, models, tree

ZOO = {
    "mlp": dict(in_features=12, widths=(5, 6, 3)),
    "cnn": dict(in_channels=1, num_classes=3, widths=(4, 6)),
    "resnet": dict(in_channels=1, num_classes=3, base_width=4, blocks_per_stage=(2, 1)),
    "resnet20": dict(in_channels=1, num_classes=3),
    "vgg": dict(in_channels=1, num_classes=3, depth=13, base_width=2, norm=None),
    "vgg11": dict(in_channels=1, num_classes=3, base_width=2),
    "vgg16": dict(in_channels=1, num_classes=3, base_width=2, norm="layer"),
}
VARIANTS = [
    ("cnn", {"norm": "batch"}),
    ("cnn", {"norm": None}),
    ("resnet", {"norm": "batch"}),
]


def _zoo(name: str, seed: int = 0, **extra):
    fm, p, s = models.functional(models.build(name, jax.random.key(seed), **{**ZOO[name], **extra}))
    x = jax.random.normal(jax.random.key(seed + 10), (3, 12) if name == "mlp" else (3, 8, 8, 1))
    return fm, p, s, x


def _max_delta(a, b) -> float:
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_every_zoo_model_is_covered():
    # the transformers' specs are traced by permutation_spec() itself: tests/landscape/test_align_attention.py
    assert set(ZOO) == set(models.MODELS) - {"gpt", "vit"}


@pytest.mark.parametrize(("name", "extra"), [(n, {}) for n in ZOO] + VARIANTS)
def test_traced_spec_equals_hand_written(name, extra):
    fm, p, s, x = _zoo(name, **extra)
    traced = align.trace_spec(fm, p, x)
    # same groups, up to the names (ResNet's hand spec names its streams P_stage<i>)
    assert align.match_names(traced, fm.spec) == fm.spec
    if name in ("mlp", "cnn", "vgg", "vgg11", "vgg16"):
        assert traced == fm.spec  # chains: forward-order names are the zoo's own
    assert len(traced.names) == len(fm.spec.names)


@pytest.mark.parametrize(("name", "extra"), [("mlp", {}), ("cnn", {"norm": "batch"}), ("resnet", {"norm": "batch"})])
def test_traced_activations_equal_zoo_intermediates(name, extra):
    fm, p, s, x = _zoo(name, **extra)
    kinds = align.ACTIVATION_KINDS

    @jax.jit
    def both(params, xb):
        traced = {k: align.activations(fm, params, xb, spec=fm.spec, kind=k) for k in kinds}
        zoo = {k: fm.intermediates(params, xb, kind=k) for k in kinds}
        return traced, zoo

    traced, zoo = both(p, x)
    for k in kinds:
        assert set(traced[k]) == set(zoo[k]), k
        for n in zoo[k]:
            assert traced[k][n].shape == zoo[k][n].shape, (k, n)
            np.testing.assert_allclose(traced[k][n], zoo[k][n], rtol=1e-6, atol=1e-6, err_msg=f"{k} {n}")


# ------------------------------------------------------------------ any framework
def _layer_norm(h, p):
    mu = jnp.mean(h, -1, keepdims=True)
    var = jnp.mean((h - mu) ** 2, -1, keepdims=True)
    return (h - mu) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def residual_mlp(p, x):
    h = x @ p["embed"]["kernel"] + p["embed"]["bias"]
    for blk in p["blocks"]:
        u = jax.nn.gelu(_layer_norm(h, blk["ln"]) @ blk["fc1"]["kernel"] + blk["fc1"]["bias"])
        h = h + u @ blk["fc2"]["kernel"] + blk["fc2"]["bias"]
    return _layer_norm(h, p["ln_f"]) @ p["head"]["kernel"] + p["head"]["bias"]


def _dense(key, i, o):
    k1, k2 = jax.random.split(key)
    return {"kernel": jax.random.normal(k1, (i, o)) / np.sqrt(i), "bias": 0.1 * jax.random.normal(k2, (o,))}


def _ln(key, d):
    k1, k2 = jax.random.split(key)
    return {"scale": 1 + 0.1 * jax.random.normal(k1, (d,)), "bias": 0.1 * jax.random.normal(k2, (d,))}


def _residual_params(key, d_in=5, d=6, hidden=7, out=3, blocks=2):
    ks = jax.random.split(key, 3 + 3 * blocks)
    return {
        "embed": _dense(ks[0], d_in, d),
        "blocks": [
            {"ln": _ln(ks[3 + 3 * i], d), "fc1": _dense(ks[4 + 3 * i], d, hidden), "fc2": _dense(ks[5 + 3 * i], hidden, d)}
            for i in range(blocks)
        ],
        "ln_f": _ln(ks[1], d),
        "head": _dense(ks[2], d, out),
    }


def _assert_invariant(spec, apply_fn, params, x, *, state=None, key=jax.random.key(3)):
    perm = align.random_permutation(key, spec, params)
    assert any(not np.array_equal(v, np.arange(v.shape[0])) for v in perm.values())
    permuted = align.apply(spec, perm, params)
    if state is None:
        before, after = apply_fn(params, x), apply_fn(permuted, x)
    else:
        before = apply_fn(params, state, x)
        after = apply_fn(permuted, align.apply_state(spec, perm, state), x)
    assert _max_delta(before, after) <= 1e-5
    assert float(jnp.max(jnp.abs(before))) > 1e-3  # a non-trivial output


def test_plain_jax_residual_mlp_with_layernorm():
    params = _residual_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 5))
    spec = align.trace_spec(residual_mlp, params, x)
    stream = ("P_s",)
    expected = {
        "embed/kernel": (None, "P_s"), "embed/bias": stream,
        "ln_f/scale": stream, "ln_f/bias": stream, "head/kernel": ("P_s", None), "head/bias": (None,),
    }
    for i in range(2):
        b = f"blocks/{i}"
        expected |= {
            f"{b}/ln/scale": stream, f"{b}/ln/bias": stream,
            f"{b}/fc1/kernel": ("P_s", f"P_{i}"), f"{b}/fc1/bias": (f"P_{i}",),
            f"{b}/fc2/kernel": (f"P_{i}", "P_s"), f"{b}/fc2/bias": stream,
        }
    assert align.match_names(spec, align.PermutationSpec(expected)) == align.PermutationSpec(expected)
    _assert_invariant(spec, residual_mlp, params, x)
    align.check_spec(spec, params, apply_fn=residual_mlp, x=x)
    # activations: the inner group's pre-activation is fc1's output, its post the gelu of it
    inner = align.match_names(spec, align.PermutationSpec(expected))
    pre = align.activations(residual_mlp, params, x, spec=inner, kind="pre")
    post = align.activations(residual_mlp, params, x, spec=inner, kind="post")
    blk = params["blocks"][1]
    h = x @ params["embed"]["kernel"] + params["embed"]["bias"]
    u0 = jax.nn.gelu(_layer_norm(h, params["blocks"][0]["ln"]) @ params["blocks"][0]["fc1"]["kernel"] + params["blocks"][0]["fc1"]["bias"])
    h = h + u0 @ params["blocks"][0]["fc2"]["kernel"] + params["blocks"][0]["fc2"]["bias"]
    z1 = _layer_norm(h, blk["ln"]) @ blk["fc1"]["kernel"] + blk["fc1"]["bias"]
    np.testing.assert_allclose(pre["P_1"], z1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(post["P_1"], jax.nn.gelu(z1), rtol=1e-5, atol=1e-6)


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        for w in (6, 5):
            x = nn.Conv(w, (3, 3), use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=True)(x)
            x = nn.relu(x)
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


def test_linen_cnn_with_batchnorm():
    module = LinenCNN()
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 2))
    variables = module.init(jax.random.key(1), x)
    params = variables["params"]
    # non-trivial running statistics, so a mis-permuted statistic would show
    stats = jax.tree.map(lambda v: v + 0.5 * jax.random.uniform(jax.random.key(2), v.shape), variables["batch_stats"])

    def apply_fn(p, s, xb):
        return module.apply({"params": p, "batch_stats": s}, xb)

    spec = align.trace_spec(apply_fn, params, x, state=stats)
    assert len(spec.names) == 2
    assert spec.axes["Conv_1/kernel"] == (None, None, "P_0", "P_1")
    assert spec.state_axes["BatchNorm_0/mean"] == ("P_0",)
    assert spec.axes["Dense_0/kernel"] == ("P_1", None)
    _assert_invariant(spec, apply_fn, params, x, state=stats)
    align.check_spec(spec, params, apply_fn=apply_fn, x=x, state=stats)
    # closing over the statistics instead of passing them: a clear error, not a silent cut
    with pytest.raises(ValueError, match="closed-over constant.*state="):
        align.trace_spec(lambda p, xb: module.apply({"params": p, "batch_stats": stats}, xb), params, x)


class NNXDropoutNet(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(5, 8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.fc2 = nnx.Linear(8, 7, rngs=rngs)
        self.fc3 = nnx.Linear(7, 3, rngs=rngs)

    def __call__(self, x):
        h = self.drop(nnx.relu(self.fc1(x)))
        return self.fc3(nnx.tanh(self.fc2(h)))


def test_nnx_model_with_dropout():
    apply_fn, params, state = models.functional(NNXDropoutNet(rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (4, 5))
    spec = align.trace_spec(apply_fn, params, x)
    assert dict(spec.axes) == {
        "fc1/kernel": (None, "P_0"), "fc1/bias": ("P_0",),
        "fc2/kernel": ("P_0", "P_1"), "fc2/bias": ("P_1",),
        "fc3/kernel": ("P_1", None), "fc3/bias": (None,),
    }
    assert all(all(n is None for n in v) for v in spec.state_axes.values())  # the dropout RNG
    _assert_invariant(spec, apply_fn, params, x)


def test_equinox_mlp():
    model = eqx.nn.MLP(5, 3, width_size=8, depth=2, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def apply_fn(p, xb):
        return jax.vmap(eqx.combine(p, static))(xb)

    x = jax.random.normal(jax.random.key(1), (4, 5))
    spec = align.trace_spec(apply_fn, params, x)
    assert spec.axes["layers/0/weight"] == ("P_0", None)  # Equinox weights are (out, in)
    assert spec.axes["layers/1/weight"] == ("P_1", "P_0")
    assert spec.axes["layers/2/weight"] == (None, "P_1")
    _assert_invariant(spec, apply_fn, params, x)
    # layer inputs follow the (out, in) layout too: unit axis last
    inputs = align.activations(apply_fn, params, x, spec=spec, kind="input")
    np.testing.assert_allclose(inputs["layers/0/weight"], x, rtol=1e-6)


# ------------------------------------------------------------------ the functional check
def test_check_spec_rejects_swapped_square_kernel():
    fm, p, _, x = _zoo("mlp", widths=(6, 6, 3))
    align.check_spec(fm.spec, p, apply_fn=fm, x=x)  # the true spec passes
    axes = dict(fm.spec.axes)
    axes["layers/1/kernel"] = ("P_1", "P_0")  # swapped: the shapes (6, 6) still fit
    wrong = align.PermutationSpec(axes)
    align.check_spec(wrong, p)  # shape-only check cannot tell
    with pytest.raises(ValueError, match=r"max \|Δoutput\| = [0-9.]+"):
        align.check_spec(wrong, p, apply_fn=fm, x=x)


def test_check_spec_with_batchnorm_state_of_a_zoo_model():
    fm, p, s, x = _zoo("cnn", norm="batch")
    # random params and statistics (non-trivial statistics, so a mis-permuted one would show)
    p = jax.tree.map(lambda v: v + 0.3 * jax.random.normal(jax.random.key(1), v.shape), p)
    s = jax.tree.map(lambda v: v + jax.random.uniform(jax.random.key(0), v.shape), s)
    align.check_spec(fm.spec, p, apply_fn=fm, x=x, state=s)
    bad = align.PermutationSpec(fm.spec.axes, {k: (None,) for k in fm.spec.state_axes})
    with pytest.raises(ValueError, match="Δoutput"):
        align.check_spec(bad, p, apply_fn=fm, x=x, state=s)


# ------------------------------------------------------------------ mixing and escapes
def _mixing_model(p, x):
    h = jax.nn.relu(x @ p["w1"])
    h = jax.nn.relu(h @ p["w2"])
    h = h.reshape(h.shape[0], 2, 4).sum(axis=1)  # mixes w2's output units
    return h @ p["w3"]


def test_reshape_across_units_is_an_error_with_an_escape():
    ks = jax.random.split(jax.random.key(0), 3)
    p = {"w1": jax.random.normal(ks[0], (5, 6)), "w2": jax.random.normal(ks[1], (6, 8)), "w3": jax.random.normal(ks[2], (4, 3))}
    x = jax.random.normal(jax.random.key(1), (4, 5))
    with pytest.raises(ValueError, match=r"'reshape'.*w2 \(axis 1\).*unpermuted=\['w2'\]"):
        align.trace_spec(_mixing_model, p, x)
    spec = align.trace_spec(_mixing_model, p, x, unpermuted=["w2"])
    assert dict(spec.axes) == {"w1": (None, "P_0"), "w2": ("P_0", None), "w3": (None, None)}
    align.check_spec(spec, p, apply_fn=_mixing_model, x=x)
    with pytest.raises(ValueError, match="not params leaves"):
        align.trace_spec(_mixing_model, p, x, unpermuted=["w9"])


def test_flatten_into_dense_names_reshape():
    def flat_cnn(p, x):
        h = jax.nn.relu(jax.lax.conv_general_dilated(x, p["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
        return h.reshape(h.shape[0], -1) @ p["dense"]

    p = {"conv": jnp.ones((3, 3, 1, 4)), "dense": jnp.ones((4 * 4 * 4, 2))}
    with pytest.raises(ValueError, match="'reshape'.*conv.*flattening"):
        align.trace_spec(flat_cnn, p, jnp.ones((2, 4, 4, 1)))


def test_bad_input():
    p = {"w1": jnp.ones((5, 6)), "w2": jnp.ones((6, 3))}
    fn = lambda q, x: jax.nn.relu(x @ q["w1"]) @ q["w2"]  # noqa: E731
    with pytest.raises(ValueError, match=r"cannot be traced.*\(4, 7\)"):
        align.trace_spec(fn, p, jnp.ones((4, 7)))
    with pytest.raises(ValueError, match="cannot be traced"):
        align.activations(fn, p, jnp.ones((4, 7)))
    with pytest.raises(ValueError, match="permutation 'h' has size 6 .* but size 3"):
        align.check_spec(align.PermutationSpec({"w1": (None, "h"), "w2": ("h", "h")}), p)
    with pytest.raises(ValueError, match="unknown activation kind"):
        align.activations(fn, p, jnp.ones((4, 5)), kind="gram")
    with pytest.raises(ValueError, match="needs x="):
        align.check_spec(align.trace_spec(fn, p, jnp.ones((4, 5))), p, apply_fn=fn)


# ------------------------------------------------------------------ methods on a user's model
def plain_mlp(p, x):
    """The zoo MLP's function, written by a user: same params tree, no ``intermediates``."""
    h = x.reshape(x.shape[0], -1)
    n = len(p["layers"])
    for i in range(n):
        h = h @ p["layers"][str(i)]["kernel"] + p["layers"][str(i)]["bias"]
        if i < n - 1:
            h = jax.nn.relu(h)
    return h


@pytest.fixture(scope="module")
def pair():
    fm, a, _, _ = _zoo("mlp", 0, widths=(10, 9, 3))
    _, b, _, _ = _zoo("mlp", 1, widths=(10, 9, 3))
    x = jax.random.normal(jax.random.key(5), (64, 12))
    y = jax.random.randint(jax.random.key(6), (64,), 0, 3)
    return fm, a, b, x, y


def test_activation_matching_on_plain_jax_equals_zoo(pair):
    fm, a, b, x, y = pair
    np.testing.assert_allclose(plain_mlp(a, x), fm(a, x), rtol=1e-6)
    spec = align.trace_spec(plain_mlp, a, x[:2])
    assert spec == fm.spec
    for method in align.ACTIVATION_METHODS:
        p_zoo, i_zoo = align.activation_matching(fm.spec, a, b, Objective(fm, x, y, batch_size=32), method=method)
        p_usr, i_usr = align.activation_matching(spec, a, b, Objective(plain_mlp, x, y, batch_size=32), method=method)
        for n in spec.names:
            np.testing.assert_array_equal(p_zoo[n], p_usr[n])
            np.testing.assert_allclose(i_zoo.correlation[n], i_usr.correlation[n], rtol=1e-5)


def test_repair_and_tact_on_plain_jax_equal_zoo(pair):
    fm, a, b, x, _ = pair
    merged = tree.lerp(a, b, 0.5)
    zoo = align.repair(x, fm, a, b, merged, t=0.5, batch_size=32)
    usr = align.repair(x, plain_mlp, a, b, merged, t=0.5, batch_size=32)  # spec traced
    assert _max_delta(zoo, usr) <= 1e-5
    assert _max_delta(zoo, merged) > 1e-3  # REPAIR did change the model
    t_zoo = merge.tact(merged, [a, b], [x[:32], x[32:]], apply_fn=fm)
    t_usr = merge.tact(merged, [a, b], [x[:32], x[32:]], apply_fn=plain_mlp)
    for u, v in zip(t_zoo, t_usr):
        assert _max_delta(u, v) <= 1e-5


def test_layer_inputs_feed_regmean_and_zipit(pair):
    fm, a, b, x, y = pair
    obj_zoo, obj_usr = Objective(fm, x, y, batch_size=32), Objective(plain_mlp, x, y, batch_size=32)
    g_zoo = merge.gram_matrices(obj_zoo, a, lambda p, xb: fm.intermediates(p, xb, kind="input"))
    g_usr = merge.gram_matrices(obj_usr, a)  # default features: traced layer inputs
    assert set(g_zoo) == set(g_usr) == {f"layers/{i}/kernel" for i in range(3)}
    for k in g_zoo:
        np.testing.assert_allclose(g_usr[k], g_zoo[k], rtol=1e-5, atol=1e-4)
    kernels = [f"layers/{i}/kernel" for i in range(3)]
    z_usr = merge.zipit([a, b], obj_usr, kernels=kernels)
    z_zoo = merge.zipit([a, b], obj_zoo, kernels=kernels, features_fn=align.LayerInputs(fm))
    assert _max_delta(z_usr.params, z_zoo.params) <= 1e-5


def test_ot_fusion_activations_on_plain_jax(pair):
    fm, a, b, x, y = pair
    f_zoo, _ = align.ot_fusion(fm.spec, a, b, ground="activations", objective=Objective(fm, x, y), num_samples=64)
    f_usr, _ = align.ot_fusion(fm.spec, a, b, ground="activations", objective=Objective(plain_mlp, x, y), num_samples=64)
    assert _max_delta(f_zoo, f_usr) <= 1e-5

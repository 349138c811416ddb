"""Tests for the NNX zoo, functional(), and the zoo's permutation specs."""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from landscape import Objective, align, models, tree

CONFIGS = {
    "mlp": ("mlp", {"in_features": 64, "widths": (16, 8, 10)}),
    "cnn-layer": ("cnn", {"in_channels": 1, "num_classes": 10, "widths": (8, 16)}),
    "cnn-batch": ("cnn", {"in_channels": 1, "num_classes": 10, "widths": (8, 16), "norm": "batch"}),
    "resnet-layer": (
        "resnet",
        {"in_channels": 1, "num_classes": 10, "base_width": 8, "blocks_per_stage": (2, 1)},
    ),
    "resnet-batch": (
        "resnet",
        {"in_channels": 1, "num_classes": 10, "base_width": 4, "width_multiplier": 2,
         "blocks_per_stage": (1, 2), "norm": "batch"},
    ),
}
KINDS = models.INTERMEDIATE_KINDS


def inputs(seed, n=6):
    """Host-side random inputs (numpy, so no XLA compile per shape)."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 8, 8, 1)), jnp.float32)


def perturbed(params, seed, scale):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(np.asarray(a) + scale * rng.normal(size=a.shape), a.dtype), params
    )


def numpy_permutation(spec, params, seed):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.permutation(n), jnp.int32) for k, n in spec.sizes(params).items()}


@dataclasses.dataclass
class Zoo:
    key: str
    apply_fn: models.FunctionalModel
    params: dict
    state: dict
    eval: Callable  # jitted apply_with_state(params, state, x)
    train: Callable  # jitted apply_train(params, state, x)
    inter: Callable  # jitted {kind: intermediates(params, x, kind=kind, state=state)}


@pytest.fixture(scope="module", params=list(CONFIGS))
def zoo(request):
    """A zoo model with non-trivial params and BatchNorm statistics, and its jitted functions.

    Everything runs jitted, one compile per function and config: op-by-op dispatch of these
    small models costs more than compiling them once.
    """
    name, kwargs = CONFIGS[request.param]
    apply_fn, params, state = models.functional(models.build(name, jax.random.key(0), **kwargs))
    # perturb every param (norm scales/biases start at 1/0) so permutation errors would show
    params = perturbed(params, 1, 0.1)
    train = jax.jit(apply_fn.apply_train)
    for i in range(2):
        _, state = train(params, state, 2.0 * inputs(10 + i) + 1)
    apply_fn = apply_fn.with_state(state)
    inter = jax.jit(
        lambda p, x, s: {k: apply_fn.intermediates(p, x, kind=k, state=s) for k in KINDS}
    )
    return Zoo(
        request.param, apply_fn, params, state, jax.jit(apply_fn.apply_with_state), train, inter
    )


def test_permuted_copy_computes_the_same_function(zoo):
    apply_fn, params, state = zoo.apply_fn, zoo.params, zoo.state
    spec = apply_fn.spec
    x = inputs(2)
    perm = numpy_permutation(spec, params, 3)
    permute = jax.jit(lambda pm, p, s: (align.apply(spec, pm, p), align.apply_state(spec, pm, s)))
    p2, s2 = permute(perm, params, state)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(params)))
    np.testing.assert_allclose(zoo.eval(p2, s2, x), zoo.eval(params, state, x), atol=1e-5, rtol=1e-5)
    # train mode: same logits, and the updated statistics are the permuted updated statistics
    logits, new_state = zoo.train(params, state, x)
    logits2, new_state2 = zoo.train(p2, s2, x)
    np.testing.assert_allclose(logits2, logits, atol=1e-5, rtol=1e-5)
    _, expected = permute(perm, params, new_state)
    for (k, a), (_, b) in zip(tree.named_leaves(new_state2), tree.named_leaves(expected)):
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=k)
    # hidden activations are the permuted activations, unit axis last
    pre, pre2 = zoo.inter(params, x, state)["pre"], zoo.inter(p2, x, s2)["pre"]
    assert sorted(pre) == list(spec.names)
    for k in pre:
        expected_k = np.take(np.asarray(pre[k]), np.asarray(perm[k]), axis=-1)
        np.testing.assert_allclose(pre2[k], expected_k, atol=1e-5)


def test_functional_equals_module_call(zoo):
    x = inputs(4)
    call = nnx.jit(lambda m, x: m(x))
    name, kwargs = CONFIGS[zoo.key]
    module = models.build(name, jax.random.key(0), **kwargs)
    f0, p0, s0 = models.functional(module)
    module.eval()
    np.testing.assert_allclose(call(module, x), zoo.eval(p0, s0, x), atol=1e-6)
    # the apply_fn's own captured state is the module's state
    jax.tree.map(np.testing.assert_array_equal, f0.state, s0)
    if s0:  # train mode: the module's in-place BatchNorm update equals apply_train
        module.train()
        logits_module = call(module, x)
        logits, new_state = zoo.train(p0, s0, x)
        np.testing.assert_allclose(logits_module, logits, atol=1e-6)
        _, _, s_module = models.functional(module)
        for (k, a), (_, b) in zip(tree.named_leaves(s_module), tree.named_leaves(new_state)):
            np.testing.assert_allclose(a, b, atol=1e-6, err_msg=k)
        assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(s0)))
    else:
        logits, new_state = zoo.train(p0, s0, x)
        assert new_state == {}
        np.testing.assert_allclose(logits, zoo.eval(p0, s0, x), atol=1e-6)


def test_params_are_pure_string_keyed_dicts(zoo):
    apply_fn, params, state = zoo.apply_fn, zoo.params, zoo.state

    def check(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                assert isinstance(k, str), f"non-string key {k!r} under {path}"
                check(v, f"{path}/{k}")
        else:
            assert isinstance(node, jax.Array), f"{path} is {type(node).__name__}"
    check(params, "params")
    check(state, "state")
    align.check_spec(apply_fn.spec, params)
    align.check_spec(apply_fn.spec, state, part="state")
    assert apply_fn.spec == models.permutation_spec(apply_fn)


def test_jit_vmap_grad_over_stacked_params(zoo):
    apply_fn, params = zoo.apply_fn, zoo.params
    x = inputs(5)
    other = perturbed(params, 6, 0.1)
    stacked = jax.tree.map(lambda a, b: jnp.asarray(np.stack([a, b])), params, other)

    def loss(p):
        logits = apply_fn(p, x)
        return jnp.sum(logits**2), logits

    (values, logits), grads = jax.jit(jax.vmap(jax.value_and_grad(loss, has_aux=True)))(stacked)
    np.testing.assert_allclose(logits[0], zoo.eval(params, zoo.state, x), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logits[1], zoo.eval(other, zoo.state, x), atol=1e-5, rtol=1e-5)
    tree.check_match(grads, stacked)
    # directional derivative against a central finite difference (host-side arithmetic)
    rng = np.random.default_rng(7)
    direction = jax.tree.map(lambda a: rng.normal(size=a.shape), params)
    scale = 1.0 / np.sqrt(sum(np.sum(d**2) for d in jax.tree.leaves(direction)))
    direction = jax.tree.map(lambda d: d * scale, direction)
    eps = 1e-2

    def shifted(sign):
        step = lambda p, d: jnp.asarray(np.asarray(p) + sign * eps * d, p.dtype)  # noqa: E731
        return jax.tree.map(step, params, direction)

    f_plus = np.sum(np.asarray(zoo.eval(shifted(1), zoo.state, x), np.float64) ** 2)
    f_minus = np.sum(np.asarray(zoo.eval(shifted(-1), zoo.state, x), np.float64) ** 2)
    directional = sum(
        np.sum(np.asarray(g[0], np.float64) * d)
        for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction))
    )
    np.testing.assert_allclose(directional, (f_plus - f_minus) / (2 * eps), rtol=1e-2, atol=1e-2)


def test_intermediates_keys_and_sizes(zoo):
    apply_fn, params = zoo.apply_fn, zoo.params
    x = inputs(7, n=3)
    spec = apply_fn.spec
    sizes = spec.sizes(params)
    out = zoo.inter(params, x, zoo.state)
    pre, post, layer_inputs = out["pre"], out["post"], out["input"]
    assert sorted(pre) == sorted(post) == list(spec.names)
    for k, v in pre.items():
        assert v.shape[0] == 3 and v.shape[-1] == sizes[k], k
        np.testing.assert_allclose(post[k], jax.nn.relu(v), atol=1e-6)
    leaves = dict(tree.named_leaves(params))
    kernels = sorted(k for k in leaves if k.endswith("kernel"))
    assert sorted(layer_inputs) == kernels
    for k, v in layer_inputs.items():
        assert v.shape[0] == 3 and v.shape[-1] == leaves[k].shape[-2], k
    # the head sees the global average of the last hidden group's output
    if "head/kernel" in layer_inputs:
        last = spec.axes["head/kernel"][0]
        np.testing.assert_allclose(layer_inputs["head/kernel"], post[last].mean(axis=(1, 2)), atol=1e-5)
    with pytest.raises(ValueError, match="accepted"):
        apply_fn.intermediates(params, x, kind="gram")


def test_mlp_intermediates_against_manual_forward():
    apply_fn, params, _ = models.functional(models.build("mlp", jax.random.key(3), **CONFIGS["mlp"][1]))
    x = inputs(0, n=7)[..., 0]  # (7, 8, 8): trailing dims are flattened
    h0 = np.asarray(x).reshape(7, 64)
    w = {i: np.asarray(params["layers"][str(i)]["kernel"]) for i in range(3)}
    b = {i: np.asarray(params["layers"][str(i)]["bias"]) for i in range(3)}
    z0 = h0 @ w[0] + b[0]
    z1 = np.maximum(z0, 0) @ w[1] + b[1]
    logits = np.maximum(z1, 0) @ w[2] + b[2]
    pre = apply_fn.intermediates(params, x)
    np.testing.assert_allclose(pre["P_0"], z0, atol=1e-5)
    np.testing.assert_allclose(pre["P_1"], z1, atol=1e-5)
    np.testing.assert_allclose(apply_fn(params, x), logits, atol=1e-5)
    inputs_ = apply_fn.intermediates(params, x, kind="input")
    np.testing.assert_allclose(inputs_["layers/2/kernel"], np.maximum(z1, 0), atol=1e-5)
    assert apply_fn.spec.axes["layers/1/kernel"] == ("P_0", "P_1")
    with pytest.raises(ValueError, match="64 features"):
        apply_fn(params, jnp.ones((2, 5)))


def test_resnet_spec_shares_stream_permutation():
    abstract = nnx.eval_shape(
        lambda: models.ResNet(1, 3, base_width=4, blocks_per_stage=(2, 1), rngs=nnx.Rngs(0))
    )
    spec = abstract.permutation_spec()
    assert spec.axes["stem/kernel"][-1] == "P_stage0"
    assert spec.axes["stages/0/blocks/0/conv2/kernel"][-1] == "P_stage0"
    assert spec.axes["stages/0/blocks/1/conv1/kernel"][-2] == "P_stage0"
    assert spec.axes["stages/1/blocks/0/shortcut/conv/kernel"] == (None, None, "P_stage0", "P_stage1")
    assert spec.axes["head/kernel"] == ("P_stage1", None)
    assert "stages/0/blocks/0/shortcut/conv/kernel" not in spec.axes  # identity shortcut
    assert spec.names == ("P_stage0", "P_stage0_block0", "P_stage0_block1", "P_stage1", "P_stage1_block0")


def test_build_errors_and_determinism():
    key = jax.random.key(0)
    with pytest.raises(
        ValueError, match=r"accepted: \['cnn', 'gpt', 'mlp', 'resnet', 'resnet20', 'vgg', 'vgg11', 'vgg16', 'vit'\]"
    ):
        models.build("bert", key)
    with pytest.raises(ValueError, match=r"unknown \['depth'\].*optional"):
        models.build("mlp", key, in_features=4, widths=(3,), depth=2)
    with pytest.raises(ValueError, match=r"missing \['widths'\]"):
        models.build("mlp", key, in_features=4)
    with pytest.raises(ValueError, match="typed key"):
        models.build("mlp", jax.random.PRNGKey(0), in_features=4, widths=(3,))
    with pytest.raises(ValueError, match="accepted"):
        models.build("cnn", key, in_channels=1, num_classes=2, norm="group")
    with pytest.raises(ValueError, match="accepted"):
        models.build("resnet", key, in_channels=1, num_classes=2, norm=None)
    with pytest.raises(ValueError, match="accepted"):
        models.build("mlp", key, in_features=4, widths=(3,), activation="swish")
    _, a, _ = models.functional(models.build("mlp", key, in_features=4, widths=(3, 2)))
    _, b, _ = models.functional(models.build("mlp", key, in_features=4, widths=(3, 2)))
    _, c, _ = models.functional(models.build("mlp", jax.random.key(1), in_features=4, widths=(3, 2)))
    assert float(tree.norm(tree.sub(a, b))) == 0.0
    assert float(tree.norm(tree.sub(a, c))) > 0.0


def test_functional_model_hashing_state_checks_and_objective():
    module = models.build("cnn", jax.random.key(0), **CONFIGS["cnn-batch"][1])
    f1, params, state = models.functional(module)
    f2, _, _ = models.functional(module)
    assert f1 == f2 and hash(f1) == hash(f2)
    bumped = jax.tree.map(lambda v: v + 1.0, state)
    assert f1.with_state(bumped) != f1
    assert f1.with_state(bumped) == f2.with_state(bumped)
    with pytest.raises(ValueError, match="norms/0/mean"):
        f1.with_state({"norms": {"0": {"var": state["norms"]["0"]["var"]}}})
    with pytest.raises(ValueError, match="head/kernel"):
        f1({**params, "head": {"kernel": jnp.zeros((5, 10)), "bias": jnp.zeros(10)}}, jnp.ones((1, 8, 8, 1)))
    # eval with an explicit, traced state equals with_state
    x, y = inputs(1, n=5), jnp.array([0, 1, 2, 9, 1])
    np.testing.assert_allclose(
        jax.jit(f1.apply_with_state)(params, bumped, x),
        jax.jit(f1.with_state(bumped))(params, x),
        atol=1e-6,
    )
    # the FunctionalModel is a static, hashable part of an Objective: it jits and vmaps
    obj = Objective(f1, x, y, batch_size=2)
    other = perturbed(params, 2, 0.5)
    stacked = jax.tree.map(lambda a, b: jnp.asarray(np.stack([a, b])), params, other)
    losses = jax.jit(jax.vmap(obj.loss))(stacked)
    for i, p in enumerate((params, other)):
        logits = np.asarray(jax.jit(f1)(p, x), np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        logp = shifted - np.log(np.sum(np.exp(shifted), -1, keepdims=True))
        np.testing.assert_allclose(losses[i], -np.mean(logp[np.arange(5), np.asarray(y)]), rtol=1e-5)


def test_cnn_without_norm_spec():
    abstract = nnx.eval_shape(lambda: models.CNN(3, 2, widths=(4, 6), norm=None, rngs=nnx.Rngs(0)))
    spec = abstract.permutation_spec()
    assert spec.axes["convs/1/kernel"] == (None, None, "P_0", "P_1")
    assert spec.axes["convs/1/bias"] == ("P_1",)
    assert not any(k.startswith("norms") for k in spec.axes) and not spec.state_axes


def test_functional_on_a_plain_nnx_module():
    layer = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    apply_fn, params, state = models.functional(layer)
    x = jnp.ones((4, 16))
    np.testing.assert_allclose(apply_fn(params, x), layer(x), atol=1e-6)
    assert state == {} and apply_fn.spec is None
    with pytest.raises(ValueError, match="zoo model"):
        apply_fn.intermediates(params, x)
    with pytest.raises(ValueError, match="no permutation spec"):
        models.permutation_spec(layer)

"""Tests for the zoo's width ladder: ResNet-20 xk and VGG-11/16 with BatchNorm.

Parameter counts are checked against the closed-form counts of the architectures (written out
here layer by layer, independently of the model code), the hand-written permutation specs by
"a randomly permuted model computes the same function" (logits, BatchNorm updates and hidden
activations), and BatchNorm's train / eval modes against a hand recomputation from the taps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from landscape import align, models, tree

EPS = 1e-5  # nnx.BatchNorm's default epsilon


def count(module_fn):
    """``(number of params, number of state entries)`` of a module built abstractly (no compute)."""
    abstract = nnx.eval_shape(module_fn)
    _, params, state = nnx.split(abstract, nnx.Param, ...)
    n = lambda s: sum(int(np.prod(v.shape)) for v in jax.tree.leaves(s))  # noqa: E731
    return n(params), n(state)


def resnet20_formula(in_channels, num_classes, k):
    """He et al.'s CIFAR ResNet-20 with option-B (1x1 conv + BN) projections, BN after every conv."""
    widths = (16 * k, 32 * k, 64 * k)
    total = 9 * in_channels * widths[0] + 2 * widths[0]  # stem conv (no bias) + BN scale/bias
    bn_units = widths[0]
    cin = widths[0]
    for stage, c in enumerate(widths):
        for block in range(3):
            total += 9 * cin * c + 2 * c + 9 * c * c + 2 * c
            bn_units += 2 * c
            if cin != c or (stage > 0 and block == 0):
                total += cin * c + 2 * c
                bn_units += c
            cin = c
    return total + widths[-1] * num_classes + num_classes, 2 * bn_units


VGG11_WIDTHS = (64, 128, 256, 256, 512, 512, 512, 512)
VGG16_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


def vgg_formula(in_channels, num_classes, widths):
    dims = (in_channels, *widths)
    convs = sum(9 * a * b + 2 * b for a, b in zip(dims[:-1], dims[1:]))  # no conv bias before BN
    return convs + widths[-1] * num_classes + num_classes, 2 * sum(widths)


def test_resnet20_parameter_counts_match_the_formula():
    n1, _ = count(lambda: models.ResNet20(3, 10, rngs=nnx.Rngs(0)))
    assert n1 == 272_474  # the "0.27M" of He et al. (Table 6), with the two projection shortcuts
    for k in (1, 2, 4):
        got = count(lambda k=k: models.ResNet20(3, 10, width_multiplier=k, rngs=nnx.Rngs(0)))
        assert got == resnet20_formula(3, 10, k)
    assert count(lambda: models.ResNet20(1, 10, width_multiplier=2, rngs=nnx.Rngs(0))) == resnet20_formula(1, 10, 2)
    # LayerNorm: same params, no running statistics
    assert count(lambda: models.ResNet20(3, 10, norm="layer", rngs=nnx.Rngs(0))) == (272_474, 0)


def test_vgg_parameter_counts_match_the_formula():
    assert count(lambda: models.VGG11(3, 10, rngs=nnx.Rngs(0))) == vgg_formula(3, 10, VGG11_WIDTHS)
    assert count(lambda: models.VGG16(3, 10, rngs=nnx.Rngs(0))) == vgg_formula(3, 10, VGG16_WIDTHS)
    wide = count(lambda: models.build("vgg", jax.random.key(0), in_channels=3, num_classes=10, depth=16, width_multiplier=2))
    assert wide == vgg_formula(3, 10, tuple(2 * w for w in VGG16_WIDTHS))
    assert count(lambda: models.VGG11(3, 10, rngs=nnx.Rngs(0)))[0] == 9_228_362  # about 9.2M, as REPAIR's VGG-11
    # without BatchNorm every conv has a bias instead of BN's scale and shift: same count, no state
    assert count(lambda: models.VGG11(3, 10, norm=None, rngs=nnx.Rngs(0))) == (
        vgg_formula(3, 10, VGG11_WIDTHS)[0] - sum(VGG11_WIDTHS), 0
    )


def test_registry_builds_the_ladder_and_specs_cover_every_leaf():
    key = jax.random.key(0)
    r = nnx.eval_shape(lambda: models.build("resnet20", key, in_channels=1, num_classes=10, width_multiplier=2))
    assert r.stage_widths == (32, 64, 128) and r.blocks_per_stage == (3, 3, 3)
    spec = r.permutation_spec()
    assert len(spec.names) == 3 + 9  # one stream per stage, one inner group per block
    assert spec.axes["stages/1/blocks/0/shortcut/conv/kernel"] == (None, None, "P_stage0", "P_stage1")
    assert "stages/1/blocks/1/shortcut/conv/kernel" not in spec.axes
    v = nnx.eval_shape(lambda: models.build("vgg16", key, in_channels=3, num_classes=10, base_width=4))
    assert v.widths == tuple(w // 16 for w in VGG16_WIDTHS) and sum(v.pool_after) == 5
    assert set(v.permutation_spec().names) == {f"P_{i}" for i in range(13)}
    for m in (r, v):
        _, params, state = nnx.split(m, nnx.Param, ...)
        flat = {k for k, _ in tree.named_leaves(nnx.to_pure_dict(params))}
        flat_state = {k for k, _ in tree.named_leaves(nnx.to_pure_dict(state))}
        assert set(m.permutation_spec().axes) == flat
        assert set(m.permutation_spec().state_axes) == flat_state


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: models.VGG(3, 10, depth=12, rngs=nnx.Rngs(0)), r"unknown VGG depth 12; accepted: \[11, 13, 16, 19\]"),
        (lambda: models.VGG11(3, 10, width_multiplier=0, rngs=nnx.Rngs(0)), "VGG width_multiplier must be a positive int"),
        (lambda: models.ResNet20(3, 10, width_multiplier=1.5, rngs=nnx.Rngs(0)), "ResNet width_multiplier must be a positive int"),
        (lambda: models.ResNet20(3, 10, norm=None, rngs=nnx.Rngs(0)), r"unknown norm None; accepted"),
        (lambda: models.VGG16(3, 10, norm="group", rngs=nnx.Rngs(0)), r"unknown norm 'group'; accepted"),
        (lambda: models.build("resnet20", jax.random.key(0), in_channels=1, num_classes=10, base_width=8),
         r"unknown \['base_width'\]"),
    ],
)
def test_bad_settings(call, match):
    with pytest.raises(ValueError, match=match):
        call()


LADDER = {
    "resnet20-x1": (lambda: models.ResNet20(1, 10, rngs=nnx.Rngs(1)), (8, 8)),
    "vgg11": (lambda: models.VGG11(1, 10, base_width=4, rngs=nnx.Rngs(2)), (16, 16)),
    "vgg16-x2": (lambda: models.VGG16(1, 10, base_width=2, width_multiplier=2, rngs=nnx.Rngs(3)), (12, 12)),
}


def _perturbed(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a) + 0.2 * rng.normal(size=a.shape), a.dtype), params)


def _statistics(state, seed):
    """Distinct running statistics: means ~ N(0, 0.2^2), variances exp(N(0, 0.3^2)) > 0."""
    rng = np.random.default_rng(seed)

    def one(path, a):
        noise = rng.normal(size=a.shape)
        value = np.exp(0.3 * noise) if path[-1].key == "var" else 0.2 * noise
        return jnp.asarray(value, a.dtype)

    return jax.tree_util.tree_map_with_path(one, state)


@pytest.fixture(scope="module")
def ladder():
    """Build each LADDER model once per module (initialising a deep model costs seconds on CPU)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = LADDER[name][0]()
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(LADDER))
def test_random_permutation_under_the_hand_spec_keeps_the_function(ladder, name):
    hw = LADDER[name][1]
    apply_fn, params, state = models.functional(ladder(name))
    params = _perturbed(params, 0)  # BN scales start at 1 and shifts at 0: make them distinct
    state = _statistics(state, 1)
    spec = apply_fn.spec
    x = jnp.asarray(np.random.default_rng(5).normal(size=(4, *hw, 1)), jnp.float32)
    perm = align.random_permutation(jax.random.key(7), spec, params)
    p2, s2 = align.apply(spec, perm, params), align.apply_state(spec, perm, state)
    assert not np.array_equal(p2["head"]["kernel"], params["head"]["kernel"])
    evaluate = jax.jit(apply_fn.apply_with_state)
    out, out2 = evaluate(params, state, x), evaluate(p2, s2, x)
    assert float(jnp.std(out)) > 1e-2
    np.testing.assert_allclose(out2, out, atol=1e-5, rtol=1e-5)
    train = jax.jit(apply_fn.apply_train)
    (logits, new), (logits2, new2) = train(params, state, x), train(p2, s2, x)
    # train mode normalises deep 1x1 maps by the statistics of 4 examples, which amplifies the
    # float32 reduction-order differences of the permuted copy to ~2e-5: tolerance 1e-4 here
    np.testing.assert_allclose(logits2, logits, atol=1e-4, rtol=1e-4)
    expected = align.apply_state(spec, perm, new)
    for (k, a), (_, b) in zip(tree.named_leaves(new2), tree.named_leaves(expected)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=k)


@nnx.jit
def _first_pre(model, x):
    """Conv 0's normalised output ``"P_0"`` (pre-ReLU) in eval mode, then in train mode (updating BN)."""
    out = []
    for train in (False, True):
        taps = models.Taps()
        model.forward(x, train=train, taps=taps)
        out.append(taps.pre["P_0"])
    return out


def test_batchnorm_train_and_eval_modes_against_hand_recomputation(ladder):
    model = ladder("vgg11")
    x = jnp.asarray(np.random.default_rng(6).normal(size=(5, 8, 8, 1)), jnp.float32)
    kernel = model.convs[0].kernel.get_value()
    conv = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    bn = model.norms[0]
    mean0, var0 = jnp.linspace(-0.5, 0.5, 4), jnp.linspace(0.5, 2.0, 4)
    bn.mean.set_value(mean0)
    bn.var.set_value(var0)
    pre_eval, pre_train = _first_pre(model, x)
    # eval: the running statistics normalise
    np.testing.assert_allclose(pre_eval, (conv - mean0) / jnp.sqrt(var0 + EPS), atol=1e-5)
    # train: batch statistics normalise, and the running ones move by momentum 0.9 (only once:
    # the eval pass left them alone)
    mu, var = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
    np.testing.assert_allclose(pre_train, (conv - mu) / jnp.sqrt(var + EPS), atol=1e-4)
    np.testing.assert_allclose(bn.mean.get_value(), 0.9 * mean0 + 0.1 * mu, atol=1e-6)
    np.testing.assert_allclose(bn.var.get_value(), 0.9 * var0 + 0.1 * var, atol=1e-5)


def test_resnet20_shapes_and_taps_on_mnist_sized_inputs(ladder):
    apply_fn, params, state = models.functional(ladder("resnet20-x1"))
    x = jnp.zeros((2, 28, 28, 1))
    inter = jax.eval_shape(lambda p, x: apply_fn.intermediates(p, x, kind="pre"), params, x)
    assert jax.eval_shape(apply_fn, params, x).shape == (2, 10)
    assert inter["P_stage0"].shape == (2, 28, 28, 16)
    assert inter["P_stage1_block0"].shape == (2, 14, 14, 32)
    assert inter["P_stage2"].shape == (2, 7, 7, 64)
    assert sorted(inter) == sorted(apply_fn.spec.names)
    with pytest.raises(ValueError, match=r"ResNet expects NHWC inputs \(N, H, W, 1\)"):
        apply_fn(params, jnp.zeros((2, 784)))

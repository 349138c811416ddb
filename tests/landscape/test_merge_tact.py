"""TACT (arXiv 2410.12766): fixed points, exact statistics matching, which leaves change, alignment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape import Objective, align, merge, models, tree


def _mlp(seed, widths=(8, 8, 3)):
    return models.functional(models.build("mlp", jax.random.key(seed), in_features=5, widths=widths))


@pytest.fixture(scope="module")
def setup():
    apply_fn, a, _ = _mlp(0)
    _, b, _ = _mlp(1)
    xa = jax.random.normal(jax.random.key(2), (70, 5))
    xb = 0.5 + 2.0 * jax.random.normal(jax.random.key(3), (90, 5))
    return apply_fn, a, b, xa, xb


def _numpy_moments(apply_fn, params, x):
    acts = apply_fn.intermediates(params, x, kind="pre")
    return {k: (np.asarray(v, np.float64).mean(0), np.asarray(v, np.float64).std(0)) for k, v in acts.items()}


def test_single_expert_equal_to_merged_is_a_fixed_point(setup):
    apply_fn, a, _, xa, _ = setup
    (out,) = merge.tact(a, [a], [xa], apply_fn=apply_fn)
    for (p, x), (_, y) in zip(tree.named_leaves(out), tree.named_leaves(a), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5, err_msg=p)


@pytest.mark.parametrize("merge_fn", ["average", "task_arithmetic"])
def test_corrected_statistics_equal_the_experts(setup, merge_fn):
    apply_fn, a, b, xa, xb = setup
    if merge_fn == "average":
        merged = merge.average([a, b])
    else:
        base = tree.lerp(a, b, 0.3)
        merged = merge.task_arithmetic([a, b], base=base, lam=0.4)
    objs = [Objective(apply_fn, xa, jnp.zeros(70, jnp.int32), batch_size=32), xb]
    out = merge.tact(merged, [a, b], objs, apply_fn=apply_fn)
    for params, expert, x in ((out[0], a, xa), (out[1], b, xb)):
        got, want = _numpy_moments(apply_fn, params, x), _numpy_moments(apply_fn, expert, x)
        before = _numpy_moments(apply_fn, merged, x)
        for k in want:
            np.testing.assert_allclose(got[k][0], want[k][0], atol=1e-4)
            np.testing.assert_allclose(got[k][1], want[k][1], rtol=1e-4, atol=1e-5)
            assert not np.allclose(before[k][1], want[k][1], rtol=1e-3)
    # the head: expert's own (paper), so the full function on the task is close to... its logits head
    np.testing.assert_array_equal(out[1]["layers"]["2"]["kernel"], b["layers"]["2"]["kernel"])


def test_copies_differ_only_in_corrected_layers(setup):
    apply_fn, a, b, xa, xb = setup
    merged = merge.average([a, b])
    out = merge.tact(merged, [a, b], [xa, xb], apply_fn=apply_fn, head="merged")
    for params in out:
        for (p, x), (_, y) in zip(tree.named_leaves(params), tree.named_leaves(merged), strict=True):
            if p.startswith("layers/2/"):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=p)
            else:
                assert not np.allclose(np.asarray(x), np.asarray(y)), p
    # restricting the layers leaves the others untouched
    (only0,) = merge.tact(merged, [a], [xa], apply_fn=apply_fn, head="merged",
                          layers={"P_0": ("layers/0/kernel", "layers/0/bias")})
    np.testing.assert_array_equal(only0["layers"]["1"]["kernel"], merged["layers"]["1"]["kernel"])
    assert merge.head_leaves(apply_fn.spec, a) == ("layers/2/bias", "layers/2/kernel")


def test_fold_matches_inserted_affine(setup):
    """Independent reference for one layer: the affine map applied to the activations directly."""
    apply_fn, a, b, xa, _ = setup
    merged = merge.average([a, b])
    (out,) = merge.tact(merged, [a], [xa], apply_fn=apply_fn, head="merged",
                        layers={"P_0": ("layers/0/kernel", "layers/0/bias")})
    z = np.asarray(xa @ merged["layers"]["0"]["kernel"] + merged["layers"]["0"]["bias"], np.float64)
    za = np.asarray(xa @ a["layers"]["0"]["kernel"] + a["layers"]["0"]["bias"], np.float64)
    want = (z - z.mean(0)) / z.std(0) * za.std(0) + za.mean(0)
    got = np.asarray(apply_fn.intermediates(out, xa, kind="pre")["P_0"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_align_experts_recovers_a_permuted_copy(setup):
    apply_fn, a, b, xa, _ = setup
    spec = apply_fn.spec
    perm = align.random_permutation(jax.random.key(5), spec, a)
    pa, pb = align.apply(spec, perm, a), align.apply(spec, perm, b)
    out, bases, perms = merge.align_experts(jax.random.key(0), [a, pa], spec=spec)
    assert bases is None and len(perms) == 2
    np.testing.assert_allclose(out[1]["layers"]["0"]["kernel"], a["layers"]["0"]["kernel"], atol=1e-6)
    out, bases, _ = merge.align_experts(jax.random.key(0), [a, pa], spec=spec, bases=[b, pb], match="bases")
    np.testing.assert_allclose(bases[1]["layers"]["1"]["kernel"], b["layers"]["1"]["kernel"], atol=1e-6)
    np.testing.assert_allclose(np.asarray(apply_fn(out[1], xa)), np.asarray(apply_fn(a, xa)), atol=1e-5)


def test_bad_input(setup):
    apply_fn, a, b, xa, xb = setup
    with pytest.raises(ValueError, match="at least one expert"):
        merge.tact(a, [], [], apply_fn=apply_fn)
    with pytest.raises(ValueError, match="one objective"):
        merge.tact(a, [a, b], [xa], apply_fn=apply_fn)
    with pytest.raises(ValueError, match="accepted"):
        merge.tact(a, [a], [xa], apply_fn=apply_fn, head="mean")
    _, other, _ = _mlp(0, widths=(8, 4, 3))
    with pytest.raises(ValueError, match="layers/1"):
        merge.tact(a, [other], [xa], apply_fn=apply_fn)
    with pytest.raises(ValueError, match="bases"):
        merge.align_experts(jax.random.key(0), [a, b], spec=apply_fn.spec, match="bases")
    with pytest.raises(ValueError, match="accepted"):
        merge.align_experts(jax.random.key(0), [a, b], spec=apply_fn.spec, match="inits")
    assert merge.METHODS["tact"].arxiv == "2410.12766"

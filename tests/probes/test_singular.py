"""Tests for probes.singular: singular-direction alignment (Ito et al. 2024, arXiv 2402.04051)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from landscape import align
from probes.singular import SingularAlignment, layer_alignment, singular_alignment

SPEC = align.PermutationSpec(
    {
        "l0/kernel": (None, "P_0"),
        "l0/bias": ("P_0",),
        "l1/kernel": ("P_0", "P_1"),
        "l1/bias": ("P_1",),
        "conv/kernel": (None, None, "P_1", "P_2"),
        "l2/kernel": ("P_2", None),
    }
)


def make(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    shapes = {"l0": (10, 16), "l1": (16, 12), "l2": (6, 5)}
    p = {n: {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32)} for n, s in shapes.items()}
    p["l0"]["bias"] = jnp.asarray(rng.normal(size=16), jnp.float32)
    p["l1"]["bias"] = jnp.asarray(rng.normal(size=12), jnp.float32)
    p["conv"] = {"kernel": jnp.asarray(rng.normal(size=(3, 3, 12, 6)), jnp.float32)}
    return p


@pytest.fixture(scope="module")
def models_():
    a = make(0)
    p = align.random_permutation(jax.random.key(1), SPEC, a)
    return a, p, align.apply(SPEC, p, a)


def test_self_alignment_is_one_and_angles_zero(models_):
    a, _, _ = models_
    res = singular_alignment(a, a, k=4)
    assert res.layers == ("conv/kernel", "l0/kernel", "l1/kernel", "l2/kernel")
    assert res.k == (4, 4, 4, 4)
    for n in res.layers:
        np.testing.assert_allclose(res.before.u[n], 1.0, atol=1e-4)
        np.testing.assert_allclose(res.before.v[n], 1.0, atol=1e-4)
        np.testing.assert_allclose(res.before.angles_u[n], 0.0, atol=2e-2)
        np.testing.assert_allclose(res.before.angles_v[n], 0.0, atol=2e-2)
    assert res.after is None and res.summary()["mean_after"] is None
    assert res.summary()["mean_before"] == pytest.approx(1.0, abs=1e-4)


def test_permuted_copy_low_before_and_one_after_true_permutation(models_):
    a, p, b = models_
    res = singular_alignment(a, b, k=3, perm=align.invert(p), spec=SPEC)
    # sides acted on by a hidden permutation: l0's outputs, l1 both sides, conv's both, l2's inputs
    permuted = [("l0/kernel", "v"), ("l1/kernel", "u"), ("l1/kernel", "v"), ("conv/kernel", "u"),
                ("conv/kernel", "v"), ("l2/kernel", "u")]
    for n, side in permuted:
        assert float(np.mean(getattr(res.before, side)[n])) < 0.6, (n, side)
        np.testing.assert_allclose(getattr(res.after, side)[n], 1.0, atol=1e-4)
        angles = getattr(res.after, "angles_" + side)[n]
        np.testing.assert_allclose(angles, 0.0, atol=2e-2)
    # unpermuted sides (network input, logits) are aligned already before
    np.testing.assert_allclose(res.before.u["l0/kernel"], 1.0, atol=1e-4)
    np.testing.assert_allclose(res.before.v["l2/kernel"], 1.0, atol=1e-4)
    s = res.summary()
    assert s["mean_after"] == pytest.approx(1.0, abs=1e-4) and s["mean_before"] < 0.9
    assert s["subspace_mean_after"] == pytest.approx(1.0, abs=1e-3)
    assert s["subspace_mean_before"] < s["subspace_mean_after"] - 0.05
    # spectra are permutation invariant
    for n in res.layers:
        np.testing.assert_allclose(res.singular_a[n], res.singular_b[n], rtol=1e-4, atol=1e-4)


def test_agrees_with_numpy_svd_and_scipy_subspace_angles():
    rng = np.random.default_rng(3)
    wa, wb = rng.normal(size=(3, 3, 5, 7)), rng.normal(size=(3, 3, 5, 7))
    k = 4
    out = layer_alignment(jnp.asarray(wa, jnp.float32), jnp.asarray(wb, jnp.float32), k=k)
    ma, mb = wa.reshape(-1, 7), wb.reshape(-1, 7)
    ua, sa, vha = np.linalg.svd(ma, full_matrices=False)
    ub, sb, vhb = np.linalg.svd(mb, full_matrices=False)
    np.testing.assert_allclose(out["s_a"], sa, rtol=1e-4)
    np.testing.assert_allclose(out["s_b"], sb, rtol=1e-4)
    np.testing.assert_allclose(out["u"], np.abs(np.sum(ua[:, :k] * ub[:, :k], 0)), atol=1e-4)
    np.testing.assert_allclose(out["v"], np.abs(np.sum(vha[:k] * vhb[:k], 1)), atol=1e-4)
    ang_u = np.sort(scipy.linalg.subspace_angles(ua[:, :k], ub[:, :k]))
    ang_v = np.sort(scipy.linalg.subspace_angles(vha[:k].T, vhb[:k].T))
    np.testing.assert_allclose(out["angles_u"], ang_u, atol=1e-3)
    np.testing.assert_allclose(out["angles_v"], ang_v, atol=1e-3)


def test_k_is_clipped_per_layer_and_layers_selectable(models_):
    a, _, b = models_
    res = singular_alignment(a, b, k=100, layers=("l2/kernel", "l1/kernel"))
    assert res.layers == ("l2/kernel", "l1/kernel") and res.k == (5, 12)
    assert res.singular_a["l2/kernel"].shape == (5,)


def test_to_dict_plot_and_pytree(models_):
    a, p, b = models_
    res = singular_alignment(a, b, k=3, perm=align.invert(p), spec=SPEC)
    d = json.loads(json.dumps(res.to_dict()))
    assert set(d["summary"]["after"]) == set(res.layers)
    fig = res.plot()
    assert len(fig.data) == 4 + 2  # bars u/v x before/after, two heat maps
    leaves = jax.tree.leaves(res)
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)
    assert isinstance(jax.tree.map(lambda x: x, res), SingularAlignment)


def test_bad_input(models_):
    a, p, b = models_
    with pytest.raises(ValueError, match="k must be a positive int"):
        singular_alignment(a, b, k=0)
    with pytest.raises(ValueError, match="perm and spec go together"):
        singular_alignment(a, b, perm=p)
    with pytest.raises(ValueError, match="perm and spec go together"):
        singular_alignment(a, b, spec=SPEC)
    other = jax.tree.map(lambda x: x, b)
    other["l1"]["kernel"] = jnp.zeros((16, 11))
    with pytest.raises(ValueError, match="l1/kernel"):
        singular_alignment(a, other)
    with pytest.raises(ValueError, match="l0/bias.*>= 2 axes"):
        singular_alignment(a, b, layers=("l0/bias",))
    with pytest.raises(ValueError, match="'nope' is not a leaf"):
        singular_alignment(a, b, layers=("nope",))
    with pytest.raises(ValueError, match="no weight matrices"):
        singular_alignment({"b": jnp.ones(3)}, {"b": jnp.ones(3)})

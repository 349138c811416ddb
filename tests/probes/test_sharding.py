"""Sharded parameters (``landscape.sharding``) through probes and merges, on 8 forced CPU devices.

References are independent where they can be: the dense Hessian of the tiny model (``jax.hessian``)
for products, eigenvalues, Hutchinson (the same probe draws) and SLQ (Lanczos on the dense matrix
from the same probes); unsharded runs for paths, surfaces and merges.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from matfree import stochtrace

from landscape import Objective, merge, sharding, tree
from probes import curves, hessian, lanczos, paths, surface

D = 8


@pytest.fixture(scope="module")
def setup():
    assert jax.device_count() >= D, "tests run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (32, 8))
    y = jax.random.randint(ks[1], (32,), 0, 4)
    p = {"w1": 0.6 * jax.random.normal(ks[2], (8, 16)), "b1": 0.1 * jnp.ones(16),
         "w2": 0.6 * jax.random.normal(ks[3], (16, 4)), "b2": jnp.zeros(4)}

    def apply(q, xb):
        return jnp.tanh(xb @ q["w1"] + q["b1"]) @ q["w2"] + q["b2"]

    obj = Objective(apply, x, y, batch_size=32)
    mesh = sharding.make_mesh({"model": D})
    ps = sharding.shard_params(p, mesh, min_size=16)
    flat, unravel = ravel_pytree(p)
    H = np.asarray(jax.hessian(lambda f: obj.loss(unravel(f)))(flat), np.float64)
    return {"obj": obj, "p": p, "ps": ps, "mesh": mesh, "H": (H + H.T) / 2, "unravel": unravel, "key": ks[4]}


def _norm(spec):
    """A PartitionSpec as a tuple without trailing ``None`` (``P(None, "m", None) == P(None, "m")``)."""
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def _specs(t):
    return jax.tree.map(lambda a: _norm(a.sharding.spec), t)


def _close(a, b, tol=1e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------- layouts
def test_param_specs_choose_largest_divisible_dim(setup):
    mesh = setup["mesh"]
    specs = sharding.param_specs(setup["p"], mesh, min_size=16)
    assert specs == {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}
    specs = jax.tree.map(_norm, specs)
    assert _specs(setup["ps"]) == specs
    odd = {"a": jnp.ones((33, 5)), "tiny": jnp.ones(3)}
    assert sharding.param_specs(odd, mesh, min_size=8) == {"a": P(), "tiny": P()}  # left replicated
    with pytest.raises(ValueError, match=r"'a' of shape \(33, 5\).*size 8 of mesh axis 'model'"):
        sharding.param_specs(odd, mesh, min_size=8, indivisible="raise")
    with pytest.raises(ValueError, match=r"'a' of shape \(33, 5\): dimension 0 \(size 33\) is not divisible"):
        sharding.shard_params(odd, mesh, specs={"a": P("model"), "tiny": P()})
    with pytest.raises(ValueError, match="no axis 'data'"):
        sharding.param_specs(odd, mesh, axis="data")
    with pytest.raises(ValueError, match="need 6 devices, there are 8"):
        sharding.make_mesh({"a": 2, "b": 3})
    assert dict(sharding.make_mesh({"data": 2, "model": -1}).shape) == {"data": 2, "model": 4}


def test_flat_layout_pads_to_the_axis(setup):
    lay = sharding.flat_layout(setup["ps"], 212)
    assert (lay.size, lay.padded, lay.axis) == (212, 216, "model")
    assert sharding.flat_layout(setup["p"], 212) is None  # single-device params: nothing to keep
    v = lay.pad(jnp.arange(212.0))
    assert v.shape == (216,) and v.sharding.spec == P("model") and float(v[212:].sum()) == 0.0


# ---------------------------------------------------------------------------------------- products
def test_loss_gradient_and_products(setup):
    obj, p, ps, H = setup["obj"], setup["p"], setup["ps"], setup["H"]
    np.testing.assert_allclose(float(obj.loss(ps)), float(obj.loss(p)), rtol=1e-6)
    _close(jax.grad(obj.loss)(ps), jax.grad(obj.loss)(p))
    v = tree.random_like(jax.random.key(1), p)
    hv = hessian.hvp(obj, ps, v)
    assert _specs(hv) == _specs(ps)
    _close(ravel_pytree(hv)[0], H @ np.asarray(ravel_pytree(v)[0], np.float64), tol=2e-5)
    gv = hessian.ggn_vp(obj, ps, v)
    assert _specs(gv) == _specs(ps)
    _close(gv, hessian.ggn_vp(obj, p, v))
    _close(hessian.fisher_vp(obj, ps, v), gv)  # cross-entropy: Fisher = GGN


def test_lanczos_top5_and_basis_sharded_like_params(setup):
    obj, ps, H, key = setup["obj"], setup["ps"], setup["H"], setup["key"]
    res = hessian.eigenvalues(key, obj, ps, k=5, num_steps=40, vectors=True)
    np.testing.assert_allclose(np.asarray(res.eigenvalues), np.linalg.eigvalsh(H)[::-1][:5], rtol=1e-4, atol=1e-5)
    assert _specs(res.eigenvectors) == jax.tree.map(lambda s: _norm(P(None, *s)), _specs(ps))
    mode = hessian._mode(ps, (True,) * 4, None)
    basis = hessian._lanczos_impl(
        key, obj, ps, num_steps=40, stop=None, curvature="hessian", select=(True,) * 4, linearize=None,
        vectors=True, mode=mode,
    )[2]  # the compiled Lanczos loop's own basis, (K, n_pad)
    assert basis.shape == (40, 216) and basis.sharding.spec == P(None, "model")


def test_hutchinson_same_probes_and_slq_nodes(setup):
    obj, ps, H, key = setup["obj"], setup["ps"], setup["H"], setup["key"]
    template = jnp.zeros(212)
    probes = np.asarray(stochtrace.sampler_signs(template, num=8)(key), np.float64)
    est = hessian.trace(key, obj, ps, num_probes=8)
    np.testing.assert_allclose(float(est.estimate), np.mean(np.einsum("mi,ij,mj->m", probes, H, probes)), rtol=1e-5)
    dens = hessian.density(key, obj, ps, num_probes=1, num_steps=12, grid=50)
    k_probes, k_restart = jax.random.split(key)
    v = stochtrace.sampler_signs(template, num=1)(k_probes)[0]
    Hj = jnp.asarray(H, jnp.float32)
    tri = lanczos.tridiagonalize(jax.random.split(k_restart, 1)[0], lambda u: Hj @ u, v, 12)
    np.testing.assert_allclose(np.asarray(dens.nodes[0]), np.asarray(lanczos.ritz(tri)[0]), rtol=1e-4, atol=1e-5)
    assert dens.dim == 212


# ------------------------------------------------------------------------------ paths and surfaces
def test_linear_path_and_curve(setup):
    obj, p, ps = setup["obj"], setup["p"], setup["ps"]
    b = tree.scale(p, -0.5)
    bs = sharding.shard_params(b, setup["mesh"], min_size=16)
    mid = paths.linear(ps, bs)(0.3)
    assert _specs(mid) == _specs(ps)
    _close(mid, tree.lerp(p, b, 0.3))
    r1, r0 = curves.interpolate(obj, ps, bs, num=5), curves.interpolate(obj, p, b, num=5)
    np.testing.assert_allclose(np.asarray(r1.loss), np.asarray(r0.loss), rtol=1e-5)


def test_surface_sharded_params_and_sharded_grid(setup):
    obj, p, ps = setup["obj"], setup["p"], setup["ps"]
    d1, d2 = tree.random_like(jax.random.key(5), p), tree.random_like(jax.random.key(6), p)
    xs, ys = jnp.linspace(-1, 1, 5), jnp.linspace(-1, 1, 4)  # 20 points: not a multiple of 8 (padded)
    ref = surface.surface_2d(obj, p, (d1, d2), grid=(xs, ys))
    shard_dirs = [sharding.shard_params(d, setup["mesh"], min_size=16) for d in (d1, d2)]
    s1 = surface.surface_2d(obj, ps, shard_dirs, grid=(xs, ys))
    np.testing.assert_allclose(np.asarray(s1.loss), np.asarray(ref.loss), rtol=1e-5)
    grid_mesh = sharding.make_mesh({"grid": D})
    gx, gy = np.meshgrid(np.asarray(xs), np.asarray(ys), indexing="ij")
    out = sharding.evaluate_grid(obj, p, (d1, d2), np.stack([gx.ravel(), gy.ravel()], -1), mesh=grid_mesh)
    np.testing.assert_allclose(np.asarray(out["loss"]).reshape(5, 4), np.asarray(ref.loss), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["accuracy"]).reshape(5, 4), np.asarray(ref.accuracy), atol=1e-6)
    with pytest.raises(ValueError, match=r"coords must be \(points, 2\)"):
        sharding.evaluate_grid(obj, p, (d1, d2), np.zeros((4, 3)), mesh=grid_mesh)


# ----------------------------------------------------------------------------------------- merges
def test_ties_and_dare_keep_shardings(setup):
    p, mesh = setup["p"], setup["mesh"]
    fts = [tree.add(p, tree.scale(tree.random_like(jax.random.key(10 + i), p), 0.1)) for i in range(3)]
    shard = lambda t: sharding.shard_params(t, mesh, min_size=16)  # noqa: E731
    base_s, fts_s = shard(p), [shard(f) for f in fts]
    ties = jax.jit(lambda f, b: merge.ties(f, base=b, density=0.3))  # merges are jittable: one program each
    t1, t0 = ties(fts_s, base_s), ties(fts, p)
    _close(t1, t0, tol=1e-6)
    assert _specs(t1) == _specs(base_s)
    key = jax.random.key(7)
    dare = jax.jit(lambda k, f, b: merge.dare(k, f, base=b, drop=0.5))
    d1, d0 = dare(key, fts_s, base_s), dare(key, fts, p)
    _close(d1, d0, tol=1e-6)
    assert _specs(d1) == _specs(base_s)
    assert all(isinstance(a.sharding, NamedSharding) for a in jax.tree.leaves(d1))

"""Exact references for the pytree merges: mergekit 0.1.5's own outputs (tests/data/mergekit, from
benchmarks/mergekit_reference.py) for NuSLERP / Multi-SLERP / Karcher / SCE / NearSwap / Breadcrumbs /
DELLA / Model Stock filter-wise; "a row is an output unit" in Flax and PyTorch layouts alike; TIES'
original trimming count against a numpy transcription of the original ``topk_values_mask``.

Measured max abs error against mergekit: below 1e-6 (float32); the tolerance is 2e-6.
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from landscape import merge
from landscape.merge import sparsify
from landscape.merge import tensorwise as tw

DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "mergekit"
TOL = 2e-6


def _model(name: str) -> dict:
    return {k: jnp.asarray(v) for k, v in load_file(str(DATA / "models" / name / "model.safetensors")).items()}


BASE, A, B, C = (_model(n) for n in ("llama_base", "llama_a", "llama_b", "llama_c"))


def _masks(name: str) -> list[dict]:
    raw = load_file(str(DATA / "expected" / f"{name}.masks.safetensors"))
    return [{k: jnp.asarray(raw[f"{k}::{i}"].reshape(BASE[k].shape)).astype(bool) for k in BASE} for i in range(3)]


CASES = {
    "nuslerp": lambda: merge.nuslerp([A, B], weights=[0.3, 0.7], base=BASE),
    "nuslerp_rows": lambda: merge.nuslerp([A, B], weights=[0.6, 0.4], flatten=False, out_axis=0),
    "nuslerp_row_wise": lambda: merge.nuslerp([A, B], weights=[0.5, 0.5], base=BASE, flatten=False, out_axis=-1),
    "multislerp": lambda: merge.multislerp([A, B, C], weights=[0.2, 0.5, 0.3], base=BASE),
    "multislerp_nobase": lambda: merge.multislerp([A, B, C], weights=[1.0, 2.0, 1.0]),
    "karcher": lambda: merge.karcher([A, B, C]),
    "sce": lambda: merge.sce([A, B, C], base=BASE, select_topk=0.5),
    "nearswap": lambda: merge.nearswap(BASE, A, t=0.5),
    "model_stock_filter_wise": lambda: merge.model_stock([A, B, C], base=BASE, scope="row", out_axis=0),
    "breadcrumbs": lambda: merge.breadcrumbs([A, B, C], base=BASE, density=0.5, gamma=0.1, scope="leaf",
                                             weights=[0.5, 0.3, 0.2]),
    "della": lambda: merge.della(None, [A, B, C], base=BASE, density=0.5, epsilon=0.2, weights=[0.5, 0.3, 0.2],
                                 rescale="l1", mask=_masks("della"), out_axis=0),
    "della_linear": lambda: merge.della(None, [A, B, C], base=BASE, density=0.6, epsilon=0.1,
                                        weights=[0.5, 0.3, 0.2], rescale="l1", combine="task_arithmetic",
                                        mask=_masks("della_linear"), out_axis=0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pytree_merge_equals_mergekit(case):
    expected = load_file(str(DATA / "expected" / f"{case}.safetensors"))
    out = CASES[case]()
    assert set(out) == set(expected)
    err = max(float(np.max(np.abs(np.asarray(out[k], np.float32) - expected[k]))) for k in expected)
    assert err < TOL, err


def _flax(p: dict) -> dict:
    return {k: (v.T if v.ndim == 2 else v) for k, v in p.items()}


def test_output_units_are_the_same_in_flax_and_pytorch_layouts():
    """Breadcrumbs, DELLA and Model Stock filter-wise on PyTorch (out, in) leaves with out_axis=0 and on
    the same weights stored Flax-style (in, out) with the default out_axis=-1 agree (transposed)."""
    runs = {
        "breadcrumbs": lambda fts, base, ax: merge.breadcrumbs(fts, base=base, density=0.5, gamma=0.2, out_axis=ax),
        "model_stock": lambda fts, base, ax: merge.model_stock(fts, base=base, scope="row", out_axis=ax),
        "ties_row": lambda fts, base, ax: merge.ties(fts, base=base, density=0.3, scope="row", out_axis=ax),
    }
    keys = ("lm_head.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight")  # (16, 6), (6, 6), (6,)
    sub = lambda p: {k: p[k] for k in keys}  # noqa: E731
    base, fts = sub(BASE), [sub(A), sub(B), sub(C)]
    for name, run in runs.items():
        torch_out = run(fts, base, 0)
        flax_out = run([_flax(f) for f in fts], _flax(base), -1)
        for k in keys:
            np.testing.assert_allclose(_flax(flax_out)[k], torch_out[k], atol=1e-6, err_msg=f"{name} {k}")
    w = B["model.layers.0.mlp.up_proj.weight"] - BASE["model.layers.0.mlp.up_proj.weight"]  # (out, in)
    p_torch = sparsify.della_probabilities({"w": w}, density=0.5, epsilon=0.2, out_axis=0)["w"]
    p_flax = sparsify.della_probabilities({"w": w.T}, density=0.5, epsilon=0.2)["w"]
    np.testing.assert_allclose(p_flax.T, p_torch, atol=1e-7)
    np.testing.assert_allclose(p_torch, tw.della_keep_probabilities(w, density=0.5, epsilon=0.2), atol=1e-6)
    # each output unit (a column of the Flax kernel) keeps exactly round(0.5 n) - its outliers
    m = sparsify.breadcrumbs_mask({"w": w.T}, density=0.5, gamma=0.2)["w"]
    np.testing.assert_array_equal(np.asarray(m).sum(axis=0), [3] * w.shape[0])  # n=6: drop 1, keep 3
    with pytest.raises(ValueError, match="out_axis=3 is out of range"):
        merge.breadcrumbs([A, B], base=BASE, out_axis=3)
    with pytest.raises(TypeError, match="out_axis must be an int"):
        merge.della(None, [A, B], base=BASE, out_axis=1.0, mask=_masks("della")[:2])


def _original_topk_values_mask(m: np.ndarray, k_percent: float) -> np.ndarray:
    """prateeky2806/ties-merging ``topk_values_mask`` (torch ``kthvalue``), transcribed to numpy."""
    k_frac = k_percent / 100 if k_percent > 1 else k_percent
    n, d = m.shape
    k = d - int(d * k_frac)
    kth = np.sort(np.abs(m), axis=1)[:, k - 1 : k]
    return np.abs(m) >= kth


def _original_ties(tvs: np.ndarray, k_percent: float, lam: float) -> np.ndarray:
    trimmed = tvs * _original_topk_values_mask(tvs, k_percent)
    sign = np.sign(trimmed.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    agree = np.where(sign > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * agree
    return lam * sel.sum(0) / np.maximum((sel != 0).sum(0), 1)


def test_ties_original_trim_count_and_merge():
    rng = np.random.default_rng(3)
    d = 2176
    x = rng.normal(size=d).astype(np.float32)
    orig = sparsify.topk_mask({"w": jnp.asarray(x)}, density=0.2, scope="global", rule="original")["w"]
    assert int(orig.sum()) == 436
    assert int(sparsify.topk_mask({"w": jnp.asarray(x)}, density=0.2, scope="global")["w"].sum()) == 435
    # ties at the threshold are all kept (one more than k plus ties)
    tied = np.array([5.0, 1.0, -1.0, 1.0, 0.5, 0.0, 2.0, 1.0, 0.1, 0.2], np.float32)
    got = np.asarray(sparsify.topk_mask({"w": jnp.asarray(tied)}, density=0.2, rule="original")["w"])
    np.testing.assert_array_equal(got, _original_topk_values_mask(tied[None], 20)[0])
    assert got.sum() == 6  # int(2) + 1 = 3, plus the other entries tied at |1|
    # the whole merge over a two-leaf model, trimmed globally, equals the original pipeline
    base = {"a": jnp.zeros((7, 5)), "b": jnp.zeros(9)}
    tvs = rng.normal(size=(3, 44)).astype(np.float32)
    tvs[:, :6] = np.abs(np.round(tvs[:, :6])) + 1.0  # ties in magnitude (same sign: no exact cancellation)
    fts = [{"a": jnp.asarray(t[:35].reshape(7, 5)), "b": jnp.asarray(t[35:])} for t in tvs]
    out = merge.ties(fts, base=base, density=0.2, lam=1.3, scope="global", trim="original")
    flat = np.concatenate([np.asarray(out["a"]).ravel(), np.asarray(out["b"])])
    np.testing.assert_allclose(flat, _original_ties(tvs, 20, 1.3), atol=1e-6)
    with pytest.raises(ValueError, match="trim must be one of"):
        merge.ties(fts, base=base, trim="kthvalue")


def test_mats_on_a_conv_kernel_equals_the_dense_kronecker_solve():
    """MaTS with K-FAC blocks on a Flax conv kernel (kh, kw, in, out), read as (kh*kw*in, out):
    (sum_i A_i kron G_i) vec W = sum_i (A_i kron G_i) vec W_i, solved densely in numpy."""
    rng = np.random.default_rng(4)
    shape = (2, 2, 2, 3)
    d, o = 8, 3
    models, blocks = [], []
    for _ in range(2):
        models.append({"conv": jnp.asarray(rng.normal(size=shape), jnp.float32), "b": jnp.asarray(rng.normal(size=o))})
        pa, pg = rng.normal(size=(d, d)), rng.normal(size=(o, o))
        blocks.append({"conv": merge.KroneckerFactors(a=jnp.asarray(pa @ pa.T + 0.5 * np.eye(d), jnp.float32),
                                                      g=jnp.asarray(pg @ pg.T + 0.5 * np.eye(o), jnp.float32)),
                       "b": jnp.ones(o)})
    out = merge.mats(models, blocks, maxiter=500, tol=1e-10)
    # row-major vec of W (d, o): (A kron G) vec W = vec(A W G) for symmetric G
    lhs = sum(np.kron(np.asarray(f["conv"].a, np.float64), np.asarray(f["conv"].g, np.float64)) for f in blocks)
    rhs = sum(np.kron(np.asarray(f["conv"].a, np.float64), np.asarray(f["conv"].g, np.float64))
              @ np.asarray(p["conv"], np.float64).reshape(-1) for p, f in zip(models, blocks))
    want = np.linalg.solve(lhs, rhs).reshape(shape)
    np.testing.assert_allclose(out["conv"], want, rtol=1e-3, atol=1e-3)
    assert out["conv"].shape == shape
    with pytest.raises(ValueError, match="conv kernel"):
        merge.mats(models, [{"conv": merge.KroneckerFactors(a=jnp.eye(2), g=jnp.eye(3)), "b": jnp.ones(o)}] * 2)


def test_catalogue_lists_every_method_with_its_provenance():
    doc = (DATA.parent.parent.parent / "docs" / "merging.md").read_text()
    for name, m in merge.METHODS.items():
        assert f"`{name}`" in doc, f"docs/merging.md does not list {name!r}"
        assert m.architectures and m.checked_against, f"add {name!r} to catalogue._PROVENANCE"
        d = m.to_dict()
        assert d["jittable"] in (True, False, None) and d["checked_against"] == m.checked_against
    for name in ("tsv_merge", "iso_c", "iso_cts", "wudi", "cart", "nuslerp", "multislerp", "karcher", "sce",
                 "nearswap"):
        assert merge.METHODS[name].jittable is True and merge.METHODS[name].fn is getattr(merge, name)
    small = [{"w": A["lm_head.weight"]}, {"w": B["lm_head.weight"]}]
    np.testing.assert_array_equal(merge.METHODS["iso_c"](small, base={"w": BASE["lm_head.weight"]})["w"],
                                  merge.iso_c(small, base={"w": BASE["lm_head.weight"]})["w"])

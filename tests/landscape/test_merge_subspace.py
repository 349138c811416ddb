"""TSV-Merge, Iso-C, Iso-CTS, WUDI, CART: FusionBench 0.2.33's own outputs, closed forms, layouts, errors.

The reference files in ``tests/data/fusionbench`` come from ``benchmarks/fusionbench_reference.py``
(FusionBench's algorithm functions run on fixed PyTorch-layout state dicts). Measured max abs error
against them: 2.4e-7 (float32); the tolerance is 2e-6.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from landscape import merge
from landscape.merge import subspace

DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "fusionbench"
TOL = 2e-6


def _models() -> tuple[dict, list[dict]]:
    raw = load_file(str(DATA / "inputs.safetensors"))

    def model(m: str) -> dict:
        return {k.split("/", 1)[1]: jnp.asarray(v) for k, v in raw.items() if k.startswith(m + "/")}

    return model("base"), [model(m) for m in ("a", "b", "c")]


BASE, FTS = _models()
CASES = {
    "tsv": lambda b, f, **kw: merge.tsv_merge(f, base=b, **kw),
    "tsv_2tasks": lambda b, f, **kw: merge.tsv_merge(f[:2], base=b, **kw),
    "iso_c": lambda b, f, **kw: merge.iso_c(f, base=b, **kw),
    "iso_cts": lambda b, f, **kw: merge.iso_cts(f, base=b, common_fraction=0.8, **kw),
    "iso_cts_f05": lambda b, f, **kw: merge.iso_cts(f, base=b, common_fraction=0.5, **kw),
    "wudi": lambda b, f, **kw: merge.wudi(f, base=b, steps=300, **kw),
}


def _max_err(out: dict, expected: dict) -> float:
    assert set(out) == set(expected)
    return max(float(np.max(np.abs(np.asarray(out[k]) - expected[k]))) for k in expected)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_fusionbench_in_pytorch_and_flax_layouts(case):
    expected = load_file(str(DATA / "expected" / f"{case}.safetensors"))
    out = CASES[case](BASE, FTS, out_axis=0, conv="average")
    assert _max_err(out, expected) < TOL
    # the same weights stored Flax-style (in, out): out_axis=-1 gives the transposed answer
    flax = lambda p: {k: (v.T if v.ndim == 2 else v) for k, v in p.items()}  # noqa: E731
    out_f = CASES[case](flax(BASE), [flax(f) for f in FTS], conv="average")
    assert _max_err(flax(out_f), expected) < TOL


def test_references_are_not_trivial():
    """Each reference differs from the plain task-vector sum (and WUDI's 300 Adam steps moved it)."""
    ta = merge.task_arithmetic(FTS, base=BASE)
    for case in CASES:
        expected = load_file(str(DATA / "expected" / f"{case}.safetensors"))
        assert np.max(np.abs(expected["tall.weight"] - np.asarray(ta["tall.weight"]))) > 1e-3, case
    wudi0 = merge.wudi(FTS, base=BASE, steps=0, out_axis=0)
    np.testing.assert_allclose(wudi0["tall.weight"], ta["tall.weight"], atol=1e-6)


def test_wudi_lowers_its_loss_and_is_not_transpose_equivariant():
    tv = jnp.stack([f["tall.weight"] - BASE["tall.weight"] for f in FTS])
    before = subspace.wudi_loss(jnp.sum(tv, 0), tv)
    out = merge.wudi(FTS, base=BASE, steps=300, learning_rate=1e-3, out_axis=0)
    after = subspace.wudi_loss(out["tall.weight"] - BASE["tall.weight"], tv)
    assert float(after) < 0.5 * float(before)
    other = merge.wudi(FTS, base=BASE, steps=300, learning_rate=1e-3, out_axis=-1)
    assert np.max(np.abs(np.asarray(other["tall.weight"] - out["tall.weight"]))) > 1e-4


def test_closed_forms():
    rng = np.random.default_rng(0)
    base = {"w": jnp.zeros((6, 4)), "b": jnp.zeros(4)}
    one = {"w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32), "b": jnp.ones(4)}
    # TSV of one task keeps all its singular triplets: the task itself
    out = merge.tsv_merge([one], base=base)
    np.testing.assert_allclose(out["w"], one["w"], atol=1e-5)
    # Iso-C: mean singular value times the polar factor of the sum (numpy SVD)
    two = {"w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32), "b": -jnp.ones(4)}
    u, s, vh = np.linalg.svd(np.asarray(one["w"] + two["w"]).T, full_matrices=False)
    np.testing.assert_allclose(merge.iso_c([one, two], base=base, lam=0.5)["w"], 0.5 * (s.mean() * u @ vh).T,
                               atol=1e-5)
    np.testing.assert_allclose(merge.iso_c([one, two], base=base)["b"], 0.0, atol=1e-7)  # vectors averaged
    assert subspace.iso_cts_sizes(5, 3, 0.8) == (5, 0) and subspace.iso_cts_sizes(4, 3, 0.5) == (1, 1)
    assert subspace.iso_cts_sizes(768, 8, 0.8) == (616, 19)


def test_cart_closed_form_and_invariants():
    rng = np.random.default_rng(1)
    fts = [{"w": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32), "b": jnp.asarray(rng.normal(size=3), jnp.float32)}
           for _ in range(3)]
    xs = np.stack([np.asarray(f["w"]) for f in fts])
    avg = xs.mean(0)
    want = avg.copy()
    for x in xs:  # rank-1 truncation of each centred task vector (numpy SVD)
        u, s, vh = np.linalg.svd((x - avg).T, full_matrices=False)
        want += 0.7 * (s[0] * np.outer(u[:, 0], vh[0])).T
    out = merge.cart(fts, lam=0.7, rank_fraction=0.2)  # round(0.2 * 5) = 1
    np.testing.assert_allclose(out["w"], want, atol=1e-5)
    np.testing.assert_allclose(out["b"], np.mean([np.asarray(f["b"]) for f in fts], 0), atol=1e-6)
    full = merge.cart(fts, lam=3.0, rank_fraction=1.0)  # centred vectors sum to zero: the average
    np.testing.assert_allclose(full["w"], avg, atol=1e-5)
    two = merge.cart(fts[:2], lam=2.0, rank_fraction=0.2)  # two models: the truncations cancel
    np.testing.assert_allclose(two["w"], xs[:2].mean(0), atol=1e-5)


def test_conv_kernels_group_by_output_filter_in_either_layout():
    """A Flax conv kernel (kh, kw, in, out) and the same kernel in PyTorch layout (out, in, kh, kw)
    merge to the same weights: the matrix rule sees one row per output filter."""
    rng = np.random.default_rng(2)
    base = {"k": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)}
    fts = [{"k": base["k"] + 0.1 * jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)} for _ in range(2)]
    to_torch = lambda p: {"k": jnp.transpose(p["k"], (3, 2, 0, 1))}  # noqa: E731
    for fn in (merge.tsv_merge, merge.iso_c, merge.iso_cts, merge.wudi):
        flax_out = fn(fts, base=base)
        torch_out = fn([to_torch(f) for f in fts], base=to_torch(base), out_axis=0)
        np.testing.assert_allclose(to_torch(flax_out)["k"], torch_out["k"], atol=2e-5, err_msg=fn.__name__)
        avg = fn(fts, base=base, conv="average")
        np.testing.assert_allclose(avg["k"], base["k"] + sum(f["k"] - base["k"] for f in fts) / 2, atol=1e-6)
    np.testing.assert_allclose(to_torch(merge.cart(fts))["k"], merge.cart([to_torch(f) for f in fts], out_axis=0)["k"],
                               atol=2e-5)


def test_nonfinite_input_poisons_the_leaf_and_jit_matches():
    bad = [dict(FTS[0], **{"tall.weight": FTS[0]["tall.weight"].at[1, 2].set(jnp.nan)}), FTS[1], FTS[2]]
    for name in ("tsv_merge", "iso_c", "iso_cts", "wudi"):
        out = getattr(merge, name)(bad, base=BASE, out_axis=0)
        assert np.all(np.isnan(out["tall.weight"])), name
        assert np.all(np.isfinite(out["wide.weight"])), name
    vec = [dict(FTS[0], **{"tall.bias": FTS[0]["tall.bias"].at[3].set(jnp.inf)}), FTS[1]]
    out = merge.iso_c(vec, base=BASE, out_axis=0)
    assert np.isnan(out["tall.bias"][3]) and np.all(np.isfinite(np.delete(np.asarray(out["tall.bias"]), 3)))
    assert np.all(np.isnan(merge.cart(bad, out_axis=0)["tall.weight"]))
    run = jax.jit(lambda f, b, lam: merge.iso_cts(f, base=b, lam=lam, common_fraction=0.5, out_axis=0))
    jitted = run(FTS, BASE, 1.0)
    eager = merge.iso_cts(FTS, base=BASE, common_fraction=0.5, out_axis=0)
    assert _max_err(jitted, {k: np.asarray(v) for k, v in eager.items()}) < 1e-6


def test_bad_input():
    with pytest.raises(ValueError, match="lam must be a scalar"):
        merge.tsv_merge(FTS, base=BASE, lam=jnp.ones(2))
    with pytest.raises(ValueError, match="lam must be a scalar"):
        merge.cart(FTS, lam=jnp.ones(3))
    with pytest.raises(ValueError, match="conv must be one of"):
        merge.iso_c(FTS, base=BASE, conv="flatten")
    with pytest.raises(TypeError, match="out_axis must be an int"):
        merge.wudi(FTS, base=BASE, out_axis="last")
    with pytest.raises(ValueError, match="out_axis=2 is out of range for leaf 'tall.weight'"):
        merge.iso_c(FTS, base=BASE, out_axis=2)
    with pytest.raises(ValueError, match="common_fraction"):
        merge.iso_cts(FTS, base=BASE, common_fraction=1.5)
    with pytest.raises(ValueError, match="rank_fraction"):
        merge.cart(FTS, rank_fraction=0.0)
    with pytest.raises(ValueError, match="steps must be"):
        merge.wudi(FTS, base=BASE, steps=-1)
    with pytest.raises(ValueError, match="weights must have one entry per model"):
        merge.tsv_merge(FTS, base=BASE, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="do not match at 'tall.bias'"):
        merge.iso_c([FTS[0], dict(FTS[1], **{"tall.bias": jnp.zeros(3)})], base=BASE)

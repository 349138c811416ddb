r"""mergekit's spherical and newer per-tensor merges as pytree transforms: NuSLERP, Multi-SLERP,
Karcher mean, SCE and NearSwap (Goddard et al. 2024, "Arcee's MergeKit", arXiv 2403.13257).

Each function applies the per-tensor kernel of :mod:`landscape.merge.tensorwise` (mergekit 0.1.5's
exact definitions, checked there against mergekit's own outputs) to every leaf of a params tree, so
``merge.karcher([a, b, c])`` equals ``tensorwise.karcher`` leaf by leaf. Arithmetic runs in float32
(float64 under x64 for float64 leaves); each result leaf has the first model's dtype.

**Vectors.** NuSLERP, Multi-SLERP and Karcher treat each whole leaf as one vector (mergekit's
default). ``nuslerp(..., flatten=False)`` instead interpolates one vector per **output unit**,
whatever the layout: the axis named by ``out_axis`` (default ``-1``, Flax ``(…, in, out)``; ``0``
for PyTorch ``(out, in, …)``) is moved first and the rest of the leaf flattened. On a PyTorch
``(out, in)`` weight, mergekit's ``nuslerp_flatten: false`` is ``out_axis=0`` and its
``nuslerp_row_wise: true`` (vectors along dim 0) is ``out_axis=-1``. 0-D and 1-D leaves are one vector.

**Non-finite input.** Where any input (the base included) has a NaN or ±inf in a leaf, the whole
merged leaf is NaN for NuSLERP, Multi-SLERP, Karcher and SCE (their norms, angles and weights mix
every entry; Karcher would otherwise drop the model from its mean), and that entry is NaN for
NearSwap (entrywise). ``t`` must be a scalar.

**Jit.** All are jittable with the structural options (``flatten``, ``out_axis``, ``max_iter``,
``tol``, ``select_topk``, ``normalize_weights``, ``eps``) static; ``weights`` and ``t`` may be traced.

Example:
    >>> import jax.numpy as jnp
    >>> from landscape import merge
    >>> a, b = {"w": jnp.array([2.0, 0.0])}, {"w": jnp.array([0.0, 2.0])}
    >>> [round(v, 4) for v in merge.karcher([a, b])["w"].tolist()]
    [1.4142, 1.4142]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from landscape import tree
from landscape._types import Array, Params
from landscape.merge import tensorwise
from landscape.merge._inputs import as_stacked, check_weights

__all__ = ["karcher", "multislerp", "nearswap", "nuslerp", "sce"]


def _nan_where_any(out: Array, inputs: Sequence[Array], *, entrywise: bool) -> Array:
    finite = jnp.all(jnp.stack([jnp.isfinite(x) for x in inputs]), axis=0)
    ok = finite if entrywise else jnp.all(finite)
    return jnp.where(ok, out, jnp.asarray(jnp.nan, out.dtype))


def _map(
    fn: Callable[..., Array],
    stacked: Params,
    base: Params | None,
    *,
    entrywise: bool = False,
) -> Params:
    """``fn(stacked_leaf, base_leaf_or_None, name)`` on every leaf, with the non-finite rule and the
    first model's dtype."""

    def leaf(path: Any, x: Array, *b: Array) -> Array:
        b0 = b[0] if b else None
        out = fn(x, b0, tree.key_name(path))
        ins = [x[i] for i in range(x.shape[0])] + ([b0] if b0 is not None else [])
        return _nan_where_any(out, ins, entrywise=entrywise).astype(x.dtype)

    if base is None:
        return jax.tree_util.tree_map_with_path(leaf, stacked)
    return jax.tree_util.tree_map_with_path(leaf, stacked, base)


def _weights(weights: Any, m: int) -> Array:
    w = check_weights(weights, m)
    return jnp.ones((m,), jnp.float32) if w is None else jnp.asarray(w, jnp.float32)


def _stack(models: Any, base: Params | None, what: str) -> tuple[Params, int]:
    stacked, m = as_stacked(models, what=what, base=base, stacked=True)
    tree.check_float("merge", stacked, what=what)
    return stacked, m


def nuslerp(
    finetuned: Sequence[Params] | Params,
    *,
    weights: Any = None,
    base: Params | None = None,
    flatten: bool = True,
    out_axis: int = -1,
) -> Params:
    r"""mergekit ``nuslerp``: SLERP of two models, or of their task vectors when ``base`` is given
    (then added back), at :math:`t = w_1/(w_0+w_1)` (:func:`landscape.merge.tensorwise.nuslerp`).

    Args:
        finetuned: exactly two models (list or stacked).
        weights: their relative weights (default equal: ``t = 0.5``; may be traced).
        base: optional base model.
        flatten: one vector per leaf (default); ``False``: one per output unit along ``out_axis``.
        out_axis: output-unit axis for ``flatten=False`` (-1: Flax, 0: PyTorch).
    """
    stacked, m = _stack(finetuned, base, "finetuned")
    if m != 2:
        msg = f"nuslerp merges exactly 2 models, got {m}"
        raise ValueError(msg)
    w = _weights(weights, m)

    def fn(x: Array, b: Array | None, name: str) -> Array:
        if flatten or x.ndim < 3:
            return tensorwise.nuslerp(x, weight=w, base=b, flatten=True)
        nd = x.ndim - 1
        if not -nd <= out_axis < nd:
            msg = f"out_axis={out_axis} is out of range for leaf {name!r} of shape {x.shape[1:]}"
            raise ValueError(msg)
        ax = out_axis % nd
        xm = jnp.moveaxis(x, 1 + ax, 1)
        moved = xm.shape[1:]
        xr = xm.reshape(2, moved[0], -1)
        br = None if b is None else jnp.moveaxis(b, ax, 0).reshape(moved[0], -1)
        out = tensorwise.nuslerp(xr, weight=w, base=br, flatten=False)
        return jnp.moveaxis(out.reshape(moved), 0, ax)

    return _map(fn, stacked, base)


def multislerp(
    models: Sequence[Params] | Params,
    *,
    weights: Any = None,
    base: Params | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> Params:
    r"""mergekit ``multislerp``: barycentric interpolation of the models (or of their task vectors
    when ``base`` is given) on the hypersphere, per leaf
    (:func:`landscape.merge.tensorwise.multislerp`); ``weights`` default equal."""
    stacked, m = _stack(models, base, "models")
    w = _weights(weights, m)
    return _map(
        lambda x, b, _: tensorwise.multislerp(x, weight=w, base=b, normalize_weights=normalize_weights, eps=eps),
        stacked,
        base,
    )


def karcher(models: Sequence[Params] | Params, *, max_iter: int = 10, tol: float = 1e-5) -> Params:
    r"""mergekit ``karcher``: the Riemannian (Karcher) mean of each leaf's direction on the unit
    sphere, equal weights, times the mean norm (:func:`landscape.merge.tensorwise.karcher`)."""
    stacked, _ = _stack(models, None, "models")
    return _map(lambda x, _b, _n: tensorwise.karcher(x, max_iter=max_iter, tol=tol), stacked, None)


def sce(finetuned: Sequence[Params] | Params, *, base: Params, select_topk: float = 1.0) -> Params:
    r"""mergekit ``sce`` (Select, Calculate, Erase; arXiv 2408.07990) per leaf: keep the
    highest-variance fraction ``select_topk`` of entries, weight models by their task vectors' mean
    square, TIES sign consensus, disjoint weighted mean (:func:`landscape.merge.tensorwise.sce`)."""
    stacked, _ = _stack(finetuned, base, "finetuned")
    return _map(lambda x, b, _: tensorwise.sce(x, base=b, select_topk=float(select_topk)), stacked, base)


def nearswap(base: Params, other: Params, *, t: Array | float) -> Params:
    r"""mergekit ``nearswap``: per entry, take ``other``'s value where it is near the base,
    :math:`w = \mathrm{clip}(t/\max(|a-b|, 10^{-6}), 0, 1)`, :math:`wb + (1-w)a`
    (:func:`landscape.merge.tensorwise.nearswap`); ``t`` a scalar (may be traced)."""
    tree.check_scalar("t", t)
    tree.check_match(base, other, names=("base", "other"))
    tree.check_float("nearswap", base, what="base")
    stacked = jax.tree.map(lambda x: x[None], other)
    return _map(lambda x, b, _: tensorwise.nearswap(b, x[0], t=t), stacked, base, entrywise=True)

"""The vector space over parameter pytrees.

Every function here treats a params pytree as one vector in R^n, n = total number of entries, without
flattening it: operations map leaf by leaf and reductions (``vdot``, ``norm``) sum over leaves in
float32 or wider. All functions are pure, jittable and vmappable; the functions that combine two
trees call :func:`check_match` first (a trace-time check that costs nothing at run time).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from landscape import tree
    >>> a = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
    >>> b = tree.scale(a, 3.0)
    >>> float(tree.cosine(a, b))
    1.0
    >>> float(tree.norm(tree.lerp(a, b, 0.5)))  # 2 * ||a|| = 2 * 2
    4.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.tree_util import keystr

from landscape._checks import check_array_leaves
from landscape._types import Array, Key, Params

__all__ = [
    "add",
    "add_scaled",
    "check_float",
    "check_match",
    "check_scalar",
    "cosine",
    "key_name",
    "lerp",
    "offset",
    "named_leaves",
    "nonfinite_leaves",
    "norm",
    "num_params",
    "random_like",
    "ravel",
    "scale",
    "stack",
    "sub",
    "unstack",
    "vdot",
    "zeros_like",
]


def key_name(path: Sequence[Any]) -> str:
    """Readable name of a key path, components joined by ``/`` (``"layers/0/kernel"``)."""
    return keystr(tuple(path), simple=True, separator="/") if path else "<root>"


def named_leaves(params: Params) -> list[tuple[str, Array]]:
    """``[(key_name(path), leaf), ...]`` in the canonical flattening order."""
    return [(key_name(p), x) for p, x in jax.tree.leaves_with_path(params)]


def num_params(params: Params) -> int:
    """Total number of scalar entries over all leaves."""
    return int(sum(jnp.size(x) for x in jax.tree.leaves(params)))


def check_match(a: Params, b: Params, *, names: tuple[str, str] = ("a", "b")) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have the same structure, shapes and dtypes.

    The message names the first key path where the two trees differ and what differs there
    (a key present in only one tree, or both shapes / dtypes). Works on traced arrays: only static
    information (structure, shape, dtype) is inspected.
    """
    la, ta = jax.tree.flatten_with_path(a)
    lb, tb = jax.tree.flatten_with_path(b)
    na, nb = names
    check_array_leaves(a, what=na)
    check_array_leaves(b, what=nb)
    for (pa, xa), (pb, xb) in zip(la, lb):
        if key_name(pa) != key_name(pb) or type(pa[-1:]) is not type(pb[-1:]):
            msg = (
                f"params do not match: {na} has leaf {key_name(pa)!r} where {nb} has "
                f"{key_name(pb)!r}"
            )
            raise ValueError(msg)
        sa, sb = jnp.shape(xa), jnp.shape(xb)
        if sa != sb:
            msg = f"params do not match at {key_name(pa)!r}: {na} has shape {sa}, {nb} has shape {sb}"
            raise ValueError(msg)
        da, db = jnp.result_type(xa), jnp.result_type(xb)
        if da != db:
            msg = f"params do not match at {key_name(pa)!r}: {na} has dtype {da}, {nb} has dtype {db}"
            raise ValueError(msg)
    if len(la) != len(lb):
        longer, name, other = (la, na, nb) if len(la) > len(lb) else (lb, nb, na)
        extra = key_name(longer[min(len(la), len(lb))][0])
        msg = f"params do not match: {name} has leaf {extra!r} that {other} lacks"
        raise ValueError(msg)
    if ta != tb:
        msg = f"params do not match: tree structures differ ({na}: {ta}; {nb}: {tb})"
        raise ValueError(msg)


def _map2(fn: Callable[[Array, Array], Array], a: Params, b: Params) -> Params:
    check_match(a, b)
    return jax.tree.map(fn, a, b)


def add(a: Params, b: Params) -> Params:
    """``a + b``."""
    return _map2(jnp.add, a, b)


def sub(a: Params, b: Params) -> Params:
    """``a - b``."""
    return _map2(jnp.subtract, a, b)


def check_scalar(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a scalar (0-d; traced values are checked by shape).

    A coefficient with a shape would broadcast against each leaf's last axis (one coefficient per
    column), which no caller means: sweep with ``jax.vmap`` over scalars instead.
    """
    if jnp.ndim(value) != 0:
        msg = f"{name} must be a scalar (use jax.vmap for a sweep), got shape {jnp.shape(value)}"
        raise ValueError(msg)


def check_float(op: str, a: Params, *, what: str = "params") -> None:
    """Raise ``ValueError`` naming the first leaf of ``a`` that is not floating point.

    Scaling or interpolating an integer or boolean leaf would truncate the result back to the
    leaf's dtype (``lerp`` of 0 and 1 at ``t=0.5`` giving 0); such leaves (step counters, index
    buffers) do not belong in a params tree that is combined.
    """
    for name, x in named_leaves(a):
        dt = jnp.result_type(x)
        if not jnp.issubdtype(dt, jnp.inexact):
            msg = (
                f"{op} needs floating-point leaves, but {what} leaf {name!r} has dtype {dt}: the result "
                "would be truncated; keep integer state out of the params tree"
            )
            raise ValueError(msg)


def nonfinite_leaves(a: Params) -> list[str]:
    """Names of the floating-point leaves of a concrete tree that hold a NaN or ±inf entry."""
    return [
        name
        for name, x in named_leaves(a)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact) and not bool(jnp.all(jnp.isfinite(x)))
    ]


def scale(a: Params, s: Array | float) -> Params:
    """``s * a`` for a scalar ``s`` (may be traced); leaf dtypes are kept.

    Raises ``ValueError`` for a non-scalar ``s`` or an integer leaf (:func:`check_scalar`,
    :func:`check_float`)."""
    check_scalar("s", s)
    check_float("scale", a)
    return jax.tree.map(lambda x: (s * x).astype(x.dtype), a)


def add_scaled(a: Params, b: Params, s: Array | float) -> Params:
    """``a + s * b`` (the axpy of BLAS) for a scalar ``s``; float leaves only, like :func:`scale`."""
    check_scalar("s", s)
    check_float("add_scaled", a)
    return _map2(lambda x, y: (x + s * y).astype(x.dtype), a, b)


def offset(center: Params, directions: Sequence[Params], coeffs: Array) -> Params:
    """``center + Σ_k coeffs[k] · directions[k]``, leaf by leaf in each leaf's dtype: the point of a
    plane (or line) of directions at coordinates ``coeffs`` (shape ``(len(directions),)``, may be traced)."""

    def leaf(x: Array, *ds: Array) -> Array:
        y = x
        for k, d in enumerate(ds):
            y = y + coeffs[k].astype(x.dtype) * d
        return y.astype(x.dtype)

    return jax.tree.map(leaf, center, *directions)


def lerp(a: Params, b: Params, t: Array | float) -> Params:
    """Linear interpolation ``(1 - t) a + t b``, exact at both ends (``t=0`` gives ``a``, ``t=1`` gives ``b``).

    ``t`` must be a scalar (may be traced; ``jax.vmap`` for a sweep) and every leaf floating point:
    a shaped ``t`` or an integer leaf is a ``ValueError`` (:func:`check_scalar`, :func:`check_float`).
    """
    check_scalar("t", t)
    check_float("lerp", a)
    return _map2(lambda x, y: ((1 - t) * x + t * y).astype(x.dtype), a, b)


def _acc_dtype(x: Array) -> Any:
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def vdot(a: Params, b: Params) -> Array:
    """Euclidean inner product ``sum_i a_i b_i`` over all entries, accumulated in >= float32."""
    check_match(a, b)
    parts = jax.tree.leaves(
        jax.tree.map(lambda x, y: jnp.vdot(x.astype(_acc_dtype(x)), y.astype(_acc_dtype(y))), a, b)
    )
    return sum(parts, jnp.zeros((), parts[0].dtype)) if parts else jnp.zeros(())


def norm(a: Params) -> Array:
    """Euclidean norm ``sqrt(<a, a>)`` over all entries."""
    return jnp.sqrt(vdot(a, a))


def cosine(a: Params, b: Params, *, eps: float = 0.0) -> Array:
    """Cosine similarity ``<a, b> / (||a|| ||b|| + eps)``; NaN for a zero vector when ``eps=0``."""
    return vdot(a, b) / (norm(a) * norm(b) + eps)


def ravel(a: Params) -> tuple[Array, Callable[[Array], Params]]:
    """Flatten to one vector; returns ``(flat, unravel)`` with ``unravel(flat)`` rebuilding the tree."""
    return ravel_pytree(a)


def zeros_like(a: Params) -> Params:
    """A tree of zeros with ``a``'s structure, shapes and dtypes."""
    return jax.tree.map(jnp.zeros_like, a)


def random_like(key: Key, a: Params) -> Params:
    """Standard Gaussian entries with ``a``'s structure, shapes and dtypes; one subkey per leaf."""
    leaves, treedef = jax.tree.flatten(a)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = [jax.random.normal(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, out)


def stack(trees: Sequence[Params]) -> Params:
    """Stack matching trees along a new leading model axis."""
    trees = list(trees)
    if not trees:
        msg = "stack needs at least one params tree, got an empty sequence"
        raise ValueError(msg)
    for i, t in enumerate(trees[1:], start=1):
        check_match(trees[0], t, names=("models[0]", f"models[{i}]"))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(stacked: Params) -> list[Params]:
    """Inverse of :func:`stack`: split the leading model axis into a list of trees."""
    leaves, treedef = jax.tree.flatten(stacked)
    if not leaves:
        return []
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        named = {k: jnp.shape(x) for k, x in named_leaves(stacked)}
        msg = f"unstack needs one shared leading model axis on every leaf, got shapes {named}"
        raise ValueError(msg)
    (m,) = sizes
    return [jax.tree.unflatten(treedef, [x[i] for x in leaves]) for i in range(m)]

"""Validation and stacking of the models a merge receives (checked at entry, before any work).

A merge takes ``finetuned`` either as a Python ``list``/``tuple`` of params trees or as one params
tree whose leaves carry a leading model axis (``landscape.tree.stack``). A params tree whose top level
is itself a list must therefore be passed stacked (or as a list of such trees). A stacked tree is
accepted where it cannot be mistaken for one model: beside a ``base`` (its leaves have one more
axis), or with an explicit ``stacked=True`` (``average``, ``swa``, ``greedy_soup``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landscape import tree
from landscape._types import Array, Params


def is_concrete(x: Any) -> bool:
    """True when ``x`` holds a value known at trace time (not a ``jax`` tracer)."""
    return not isinstance(x, jax.core.Tracer)


def check_choice(name: str, value: Any, accepted: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of the ``accepted`` strings."""
    if not isinstance(value, str) or value not in accepted:
        msg = f"{name} must be one of {list(accepted)}, got {value!r}"
        raise ValueError(msg)


def check_range(
    name: str,
    value: Any,
    lo: float,
    hi: float,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """Check a numeric setting lies in the interval; traced values cannot be checked and pass."""
    if not is_concrete(value):
        return
    arr = np.asarray(value, dtype=np.float64)
    if arr.size == 0:
        return
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    vmin, vmax = float(np.min(arr)), float(np.max(arr))
    bad_lo = vmin <= lo if lo_open else vmin < lo
    bad_hi = vmax >= hi if hi_open else vmax > hi
    if bad_lo or bad_hi or not np.all(np.isfinite(arr)):
        msg = f"{name} must lie in {left}{lo}, {hi}{right}, got {value!r}"
        raise ValueError(msg)


def as_stacked(
    models: Any, *, what: str = "models", base: Params | None = None, stacked: bool | None = None
) -> tuple[Params, int]:
    """Return ``(stacked, m)``: the models stacked on a leading axis and their number.

    A list/tuple is always a list of models. A single params tree is read as a stack only when
    that is unambiguous: with ``base``, its leaves must be ``base``'s with a leading model axis (a
    tree shaped like ``base`` itself is one model, and an error); without ``base``, the caller
    must say so with ``stacked=True`` — ``stacked=False`` rejects it, since one model whose leaves
    happen to share a leading size would otherwise be averaged over its first axis.
    (``stacked=None`` keeps the old inference for the callers that have not adopted the keyword.)

    Raises ``ValueError`` for an empty list, mismatched trees (naming the first differing path) or
    a stacked tree whose leaves disagree on the model axis; with ``base``, checks every model
    matches it.
    """
    if isinstance(models, (list, tuple)):
        if len(models) == 0:
            msg = f"{what} is empty: a merge needs at least one params tree"
            raise ValueError(msg)
        if base is not None:
            tree.check_match(base, models[0], names=("base", f"{what}[0]"))
        for i, t in enumerate(models[1:], start=1):
            tree.check_match(models[0], t, names=(f"{what}[0]", f"{what}[{i}]"))
        return jax.tree.map(lambda *xs: jnp.stack(xs), *models), len(models)
    if base is None and stacked is False:
        msg = (
            f"{what} is one params tree, not a list: pass a list of models ([params] for one), or "
            "stacked=True if its leaves carry a leading model axis (landscape.tree.stack)"
        )
        raise ValueError(msg)
    if base is not None and [jnp.shape(x) for x in jax.tree.leaves(models)] == [
        jnp.shape(x) for x in jax.tree.leaves(base)
    ]:
        msg = (
            f"{what} is one params tree shaped like base, not a list or a stack: pass a list of "
            "models ([params] for one) or landscape.tree.stack(models)"
        )
        raise ValueError(msg)
    leaves = tree.named_leaves(models)
    if not leaves:
        msg = f"{what} has no array leaves: pass a list of params trees or one stacked params tree"
        raise ValueError(msg)
    sizes = {}
    for name, x in leaves:
        if jnp.ndim(x) == 0:
            msg = (
                f"{what} is not a list, so it must be a stacked params tree with a leading model "
                f"axis, but leaf {name!r} is a scalar"
            )
            raise ValueError(msg)
        sizes[name] = jnp.shape(x)[0]
    if len(set(sizes.values())) != 1:
        msg = f"{what}: stacked leaves disagree on the leading model axis: {sizes}"
        raise ValueError(msg)
    m = next(iter(sizes.values()))
    if m == 0:
        msg = f"{what} is empty: the stacked model axis has length 0"
        raise ValueError(msg)
    if base is not None:
        first = jax.tree.map(lambda x: x[0], models)
        tree.check_match(base, first, names=("base", f"{what}[0]"))
    return models, m


def check_weights(weights: Any, m: int, *, name: str = "weights") -> Array | None:
    """``weights`` as an ``(m,)`` array (or None); raises if its length is not the number of models."""
    if weights is None:
        return None
    if not is_concrete(weights):
        if jnp.ndim(weights) != 1 or jnp.shape(weights)[0] != m:
            msg = f"{name} must have one entry per model ({m}), got shape {jnp.shape(weights)}"
            raise ValueError(msg)
        return weights
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.shape[0] != m:
        msg = f"{name} must have one entry per model ({m}), got shape {w.shape}"
        raise ValueError(msg)
    if not np.all(np.isfinite(w)):
        msg = f"{name} must be finite, got {weights!r}"
        raise ValueError(msg)
    return np.asarray(w, np.float32)


def acc_dtype(x: Array) -> Any:
    """Accumulation dtype: the leaf's float dtype promoted to at least float32."""
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def bcast(w: Array, x: Array) -> Array:
    """Reshape a per-model vector ``(m,)`` to broadcast against a stacked leaf ``(m, ...)``."""
    return jnp.reshape(w, (-1,) + (1,) * (jnp.ndim(x) - 1))


def check_shapes(a: Params, b: Params, *, names: tuple[str, str]) -> None:
    """Like ``tree.check_match`` but ignoring dtypes (statistics may be kept in float32)."""
    la, lb = tree.named_leaves(a), tree.named_leaves(b)
    na, nb = names
    for (ka, xa), (kb, xb) in zip(la, lb):
        if ka != kb:
            msg = f"{na} has leaf {ka!r} where {nb} has {kb!r}"
            raise ValueError(msg)
        if jnp.shape(xa) != jnp.shape(xb):
            msg = f"{na} and {nb} differ at {ka!r}: shapes {jnp.shape(xa)} and {jnp.shape(xb)}"
            raise ValueError(msg)
    if len(la) != len(lb):
        msg = f"{na} has {len(la)} leaves but {nb} has {len(lb)}"
        raise ValueError(msg)

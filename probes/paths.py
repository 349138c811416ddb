"""Paths in weight space: functions ``t -> params`` for ``t`` in [0, 1].

A path is an ordinary Python callable, so evaluating a curve is one ``jax.vmap`` (or ``lax.map``)
over ``t`` of ``objective.evaluate(path(t))``. Paths are built from control points that are any
matching params pytrees; nothing about the model's layers is rewritten (unlike Garipov et al.'s
curve modules), so every model that the toolkit can evaluate can be connected.

* :func:`linear` — ``θ(t) = (1 − t) θ_0 + t θ_1``.
* :func:`bezier` — ``θ(t) = Σ_i C(m, i) (1 − t)^{m−i} t^i θ_i`` over ``m + 1`` control points
  (Garipov et al. 2018, arXiv 1802.10026; quadratic with one bend is their default).
* :func:`polychain` — piecewise-linear through the control points at equally spaced ``t``.

Example:
    >>> import jax.numpy as jnp
    >>> from probes import paths
    >>> a, b = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
    >>> paths.linear(a, b)(0.25)["w"].tolist()
    [0.25, 0.25]
    >>> paths.bezier([a, {"w": jnp.full(2, 2.0)}, b])(0.5)["w"].tolist()  # ¼·0 + ½·2 + ¼·1
    [1.25, 1.25]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import comb

import jax
import jax.numpy as jnp

from landscape import tree
from landscape._types import Array, Params

__all__ = ["Path", "bernstein", "bezier", "linear", "polychain"]

Path = Callable[[Array | float], Params]
"""A function ``t -> params``."""


def linear(a: Params, b: Params) -> Path:
    """The straight segment ``t -> (1 − t) a + t b`` (exact at both ends)."""
    tree.check_match(a, b)
    return lambda t: tree.lerp(a, b, t)


def _control_points(points: Sequence[Params] | Params, *, min_points: int) -> Params:
    """Stack a sequence of control points along a leading axis (or accept an already stacked tree)."""
    if isinstance(points, (list, tuple)):
        if len(points) < min_points:
            msg = f"need at least {min_points} control points, got {len(points)}"
            raise ValueError(msg)
        return tree.stack(points)
    leaves = jax.tree.leaves(points)
    if not leaves or jnp.ndim(leaves[0]) == 0 or jnp.shape(leaves[0])[0] < min_points:
        msg = f"stacked control points need a leading axis of at least {min_points}"
        raise ValueError(msg)
    return points


def bernstein(t: Array | float, degree: int) -> Array:
    """Bernstein basis ``b_i(t) = C(m, i) (1 − t)^{m−i} t^i`` for ``i = 0..m``; shape ``(m + 1,)``."""
    t = jnp.asarray(t)
    i = jnp.arange(degree + 1)
    coef = jnp.array([comb(degree, k) for k in range(degree + 1)], dtype=jnp.result_type(t, jnp.float32))
    return coef * (1 - t) ** (degree - i) * t**i


def bezier(points: Sequence[Params] | Params) -> Path:
    """Bezier curve through ``points[0]`` and ``points[-1]`` with the inner points as bends.

    ``points`` is a sequence of matching params (endpoints first and last) or one tree stacked
    along a leading control-point axis. Degree ``m = len(points) − 1``.
    """
    stacked = _control_points(points, min_points=2)
    degree = jnp.shape(jax.tree.leaves(stacked)[0])[0] - 1

    def path(t: Array | float) -> Params:
        w = bernstein(t, degree)
        return jax.tree.map(lambda p: jnp.tensordot(w.astype(p.dtype), p, axes=1), stacked)

    return path


def polychain(points: Sequence[Params] | Params) -> Path:
    """Polygonal chain through the control points, reached at ``t = i / (len(points) − 1)``."""
    stacked = _control_points(points, min_points=2)
    segments = jnp.shape(jax.tree.leaves(stacked)[0])[0] - 1

    def path(t: Array | float) -> Params:
        s = jnp.clip(jnp.asarray(t) * segments, 0, segments)
        i = jnp.clip(jnp.floor(s).astype(jnp.int32), 0, segments - 1)
        u = s - i
        return jax.tree.map(lambda p: ((1 - u) * p[i] + u * p[i + 1]).astype(p.dtype), stacked)

    return path

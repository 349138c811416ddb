"""Loss surfaces: directions in weight space and loss/accuracy on 1-D and 2-D grids.

A surface is the loss restricted to a line or a plane through a model ``θ`` (Li et al. 2018,
"Visualizing the Loss Landscape of Neural Nets", arXiv 1712.09913):

.. math::  f(\\alpha) = L(\\theta + \\alpha d), \\qquad f(\\alpha, \\beta) = L(\\theta + \\alpha d_1 + \\beta d_2)

where ``L`` is the full-dataset loss of an :class:`~landscape.Objective`. Three ways to pick the
directions:

* :func:`random_direction` — a Gaussian direction, normalised per filter (Li et al.'s filter
  normalisation, the default), per layer, per model or not at all.
* :func:`pca_directions` — the two principal components of a training trajectory's checkpoint
  differences from its final point (Li et al. §7), with the explained variance and a ``degenerate``
  flag when the trajectory spans less than a plane.
* :func:`plane_through` — the plane through three models (Garipov et al. 2018, arXiv 1802.10026):
  origin at the first, orthonormal axes by Gram–Schmidt, grid ranges with margins.

:func:`surface_1d` and :func:`surface_2d` evaluate loss and accuracy at every grid point, with the
grid points run by ``lax.map`` and ``chunk`` points at a time evaluated together with ``vmap``
inside each step; both return frozen result dataclasses holding the projections (coordinates and
off-plane distance) of any models, curves or trajectories given as ``overlays``, with
``.to_dict()`` and an interactive plotly ``.plot()``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from landscape import Objective
    >>> from probes import surface
    >>> params = {"w": jnp.eye(3), "b": jnp.zeros(3)}
    >>> obj = Objective(lambda p, x: x @ p["w"] + p["b"], jnp.eye(3), jnp.arange(3))
    >>> d1 = surface.random_direction(jax.random.key(0), params)
    >>> d2 = surface.random_direction(jax.random.key(1), params)
    >>> s = surface.surface_2d(obj, params, (d1, d2), grid=(jnp.linspace(-1, 1, 5),) * 2)
    >>> s.loss.shape
    (5, 5)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landscape import tree
from landscape._types import Array, Key, Params
from landscape.objective import Objective

__all__ = [
    "DEFAULT_CHUNK",
    "IGNORES",
    "NORMALIZATIONS",
    "Overlay",
    "PCAPlane",
    "Plane",
    "Surface1D",
    "Surface2D",
    "pca_directions",
    "plane_through",
    "project",
    "random_direction",
    "surface_1d",
    "surface_2d",
]

NORMALIZATIONS = ("filter", "layer", "model", None)
"""Accepted ``normalization`` values of :func:`random_direction`."""
IGNORES = ("biasbn", None)
"""Accepted ``ignore`` values of :func:`random_direction`."""

DEFAULT_CHUNK = {"cpu": 1, "gpu": 8}
"""Grid points vmapped together inside each ``lax.map`` step when ``chunk=None``, by backend.

Chosen by measurement (``benchmarks/surface.py``: digits MLP 64-512-512-10, 41x41 grid, full
dataset). CPU: one point per step ran at 110% of the matmul floor on the 2-core development
machine (chunk 2: 104%, 4: 84%, 8: 25%, 15x15 grid) — vmapping points turns every matmul into a
batched matmul that XLA's CPU backend runs more slowly; on a 2-core slice of a Xeon, chunk 2 was
within 5% of chunk 1. H100: 0.12 s with chunk 1, 0.07 s with 8, 0.06 s with 32 to 512; 8 keeps
most of the gain at an eighth of the memory of 64. Backends not listed use 1.
"""

_EPS = 1e-10  # Li et al.'s guard in d * ||θ|| / (||d|| + eps)


# ---------------------------------------------------------------------------------------------
# directions
# ---------------------------------------------------------------------------------------------
def _check_float_leaves(params: Params, what: str) -> list[tuple[str, Array]]:
    named = tree.named_leaves(params)
    if not named:
        msg = f"{what} has no array leaves"
        raise ValueError(msg)
    for name, x in named:
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            msg = f"{what} leaf {name!r} has dtype {jnp.result_type(x)}; directions need float leaves"
            raise ValueError(msg)
    return named


def _sq(x: Array, axes: tuple[int, ...] | None = None) -> Array:
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return jnp.sum(x * x, axis=axes, keepdims=axes is not None)


def random_direction(
    key: Key,
    params: Params,
    *,
    normalization: str | None = "filter",
    ignore: str | None = "biasbn",
    out_axis: int | Mapping[str, int] = -1,
) -> Params:
    """A random Gaussian direction in weight space, normalised to the scale of ``params``.

    Draws ``d ~ N(0, I)`` with the structure of ``params`` and rescales it (Li et al. 2018,
    arXiv 1712.09913, §4):

    * ``"filter"``: for every filter ``f`` of every leaf with ``ndim >= 2``,
      ``d_f <- d_f ||θ_f|| / (||d_f|| + 1e-10)``. A filter is one slice along the *output* axis:
      for a Flax ``Dense`` kernel of shape ``(in, out)`` a column, for a ``Conv`` kernel
      ``(h, w, in, out)`` one ``(h, w, in)`` block. The output axis is the last one (Flax
      convention, ``out_axis=-1``); pass an int for another layout (PyTorch's ``(out, in)`` is
      ``out_axis=0``) or a mapping ``{"path/to/kernel": axis}`` to set it per leaf (leaves not
      named keep ``-1``).
    * ``"layer"``: per leaf, ``d_l <- d_l ||θ_l|| / ||d_l||``.
    * ``"model"``: once over the whole tree, ``d <- d ||θ|| / ||d||`` (loss-landscapes' ``model``).
    * ``None``: the raw Gaussian.

    Leaves with ``ndim <= 1`` (biases, norm scales and offsets): ``ignore="biasbn"`` sets their
    direction to zero under every normalisation. With ``ignore=None`` they are copied from
    ``params`` under ``"filter"`` and ``"layer"`` (``d_l = θ_l``, as in Li et al.'s code), and stay
    Gaussian and take part in the scaling under ``"model"`` and ``None``. Under ``"model"`` with
    ``"biasbn"``, the norm matched is that of the leaves that are kept.

    Args:
        key: typed PRNG key.
        params: the model ``θ`` (any pytree of float arrays).
        normalization: ``"filter"``, ``"layer"``, ``"model"`` or ``None``.
        ignore: ``"biasbn"`` or ``None``.
        out_axis: the output (filter) axis of multi-dimensional leaves: an int for all, or a mapping
            from leaf path (``"layers/0/kernel"``) to int.

    Returns:
        A pytree matching ``params`` (structure, shapes, dtypes).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> p = {"kernel": jnp.arange(1.0, 7.0).reshape(2, 3), "bias": jnp.ones(3)}
        >>> d = random_direction(jax.random.key(0), p)
        >>> bool(jnp.allclose(jnp.linalg.norm(d["kernel"], axis=0), jnp.linalg.norm(p["kernel"], axis=0)))
        True
        >>> float(jnp.abs(d["bias"]).sum())
        0.0
    """
    if normalization not in NORMALIZATIONS:
        msg = f"unknown normalization {normalization!r}; accepted: {list(NORMALIZATIONS)}"
        raise ValueError(msg)
    if ignore not in IGNORES:
        msg = f"unknown ignore {ignore!r}; accepted: {list(IGNORES)}"
        raise ValueError(msg)
    named = _check_float_leaves(params, "params")
    names = [n for n, _ in named]
    if isinstance(out_axis, Mapping):
        unknown = sorted(set(out_axis) - set(names))
        if unknown:
            msg = f"out_axis names leaves {unknown} that params lacks; params has {names}"
            raise ValueError(msg)
        axes = {n: out_axis.get(n, -1) for n in names}
    elif isinstance(out_axis, int) and not isinstance(out_axis, bool):
        axes = dict.fromkeys(names, out_axis)
    else:
        msg = f"out_axis must be an int or a mapping from leaf path to int, got {out_axis!r}"
        raise ValueError(msg)
    if normalization == "filter":
        for name, x in named:
            nd = jnp.ndim(x)
            if nd >= 2 and not -nd <= axes[name] < nd:
                msg = f"out_axis {axes[name]} is out of range for leaf {name!r} of shape {jnp.shape(x)}"
                raise ValueError(msg)

    # the Gaussian draw runs eagerly (its per-shape kernels are cached across calls; jitting it
    # would recompile threefry for every new tree), the rescaling as one jitted function
    d = tree.random_like(key, params)
    return _normalize(
        d, params, normalization=normalization, ignore=ignore, axes=tuple(axes[n] for n in names)
    )


@functools.partial(jax.jit, static_argnames=("normalization", "ignore", "axes"))
def _normalize(
    d: Params, params: Params, *, normalization: str | None, ignore: str | None, axes: tuple[int, ...]
) -> Params:
    leaves_d, treedef = jax.tree.flatten(d)
    leaves_p = jax.tree.leaves(params)
    out: list[Array] = []
    for ax, dl, pl in zip(axes, leaves_d, leaves_p):
        pl = jnp.asarray(pl)
        if jnp.ndim(pl) <= 1 and ignore == "biasbn":
            out.append(jnp.zeros_like(dl))
        elif jnp.ndim(pl) <= 1 and normalization in ("filter", "layer"):
            out.append(jnp.asarray(pl, dl.dtype))
        elif normalization == "filter":
            ax = ax % pl.ndim
            red = tuple(i for i in range(pl.ndim) if i != ax)
            s = jnp.sqrt(_sq(pl, red)) / (jnp.sqrt(_sq(dl, red)) + _EPS)
            out.append((dl * s).astype(dl.dtype))
        elif normalization == "layer":
            s = jnp.sqrt(_sq(pl)) / (jnp.sqrt(_sq(dl)) + _EPS)
            out.append((dl * s).astype(dl.dtype))
        else:
            out.append(dl)
    if normalization == "model":
        kept = [
            (dl, pl)
            for dl, pl in zip(out, leaves_p)
            if not (ignore == "biasbn" and jnp.ndim(pl) <= 1)
        ]
        nd = jnp.sqrt(sum((_sq(dl) for dl, _ in kept), jnp.zeros((), jnp.float32)))
        npar = jnp.sqrt(sum((_sq(jnp.asarray(pl)) for _, pl in kept), jnp.zeros((), jnp.float32)))
        s = npar / (nd + _EPS)
        out = [(dl * s).astype(dl.dtype) for dl in out]
    return jax.tree.unflatten(treedef, out)




def _as_sequence(models: Any, what: str) -> list[Params]:
    """A list of params from a list/tuple of params or one stacked params (leading model axis)."""
    if isinstance(models, (list, tuple)):
        models = list(models)
        for i, m in enumerate(models[1:], start=1):
            tree.check_match(models[0], m, names=(f"{what}[0]", f"{what}[{i}]"))
        return models
    return tree.unstack(models)


def _gram(vectors: Sequence[Params]) -> np.ndarray:
    k = len(vectors)
    g = np.zeros((k, k))
    for i in range(k):
        for j in range(i, k):
            g[i, j] = g[j, i] = float(tree.vdot(vectors[i], vectors[j]))
    return g


def _combine(vectors: Sequence[Params], weights: Sequence[float]) -> Params:
    """``sum_i w_i v_i`` accumulated in float32 or wider, returned in the leaves' dtypes."""

    def leaf(*xs: Array) -> Array:
        acc = sum(
            (float(w) * x.astype(jnp.promote_types(x.dtype, jnp.float32)) for w, x in zip(weights, xs)),
            jnp.zeros((), jnp.float32),
        )
        return acc.astype(xs[0].dtype)

    return jax.tree.map(leaf, *vectors)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["origin", "directions", "coords"],
    meta_fields=["xlim", "ylim"],
)
@dataclasses.dataclass(frozen=True)
class Plane:
    """A plane in weight space through three models, from :func:`plane_through`.

    Attributes:
        origin: the first model ``a`` (coordinates ``(0, 0)``).
        directions: ``(u, v)``, orthonormal: ``u = (b-a)/||b-a||``, ``v`` = the part of ``c-a``
            orthogonal to ``u``, normalised. Coordinates are therefore Euclidean distances.
        coords: ``(3, 2)`` coordinates of ``a``, ``b``, ``c`` in the plane.
        xlim, ylim: grid ranges ``(lo, hi)`` covering the three models plus the margins.
    """

    origin: Params
    directions: tuple[Params, Params]
    coords: Array
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    def grid(self, num: int | tuple[int, int] = 21) -> tuple[Array, Array]:
        """``(xs, ys)`` spanning ``xlim`` x ``ylim`` with ``num`` points per axis (or ``(nx, ny)``)."""
        nx, ny = (num, num) if isinstance(num, int) else num
        return jnp.linspace(*self.xlim, nx), jnp.linspace(*self.ylim, ny)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (the directions themselves are not included)."""
        return {
            "coords": _json(self.coords),
            "xlim": list(self.xlim),
            "ylim": list(self.ylim),
        }


def plane_through(a: Params, b: Params, c: Params, *, margin: float = 0.2) -> Plane:
    """The plane through three models, with orthonormal axes (Gram–Schmidt).

    .. math::  u = \\frac{b - a}{\\|b - a\\|}, \\quad
               v = \\frac{(c - a) - \\langle c - a, u\\rangle u}{\\|(c - a) - \\langle c - a, u\\rangle u\\|}

    The models sit at ``a = (0, 0)``, ``b = (||b-a||, 0)`` and
    ``c = (<c-a, u>, ||(c-a) - <c-a, u> u||)``; the grid ranges extend the models' bounding box by
    ``margin`` times its width (height) on each side, as in Garipov et al. 2018 (arXiv 1802.10026),
    whose plots use ``margin=0.2``.

    Args:
        a, b, c: matching params; ``a`` is the origin.
        margin: non-negative fraction of the box added on each side.

    Raises:
        ValueError: params that do not match (naming the path), ``b == a``, ``c`` on the line
            through ``a`` and ``b``, or a negative margin.
    """
    tree.check_match(a, b, names=("a", "b"))
    tree.check_match(a, c, names=("a", "c"))
    if not (isinstance(margin, (int, float)) and margin >= 0):
        msg = f"margin must be a non-negative number, got {margin!r}"
        raise ValueError(msg)
    e1, e2 = tree.sub(b, a), tree.sub(c, a)
    n1 = float(tree.norm(e1))
    if n1 == 0.0:
        msg = "plane_through needs three distinct models: b equals a"
        raise ValueError(msg)
    u = tree.scale(e1, 1.0 / n1)
    cx = float(tree.vdot(e2, u))
    w = tree.add_scaled(e2, u, -cx)
    cy = float(tree.norm(w))
    if cy <= 1e-6 * max(n1, float(tree.norm(e2))):
        msg = "plane_through needs three models not on one line: c lies on the line through a and b"
        raise ValueError(msg)
    v = tree.scale(w, 1.0 / cy)
    coords = np.array([[0.0, 0.0], [n1, 0.0], [cx, cy]])
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    span = hi - lo
    xlim = (float(lo[0] - margin * span[0]), float(hi[0] + margin * span[0]))
    ylim = (float(lo[1] - margin * span[1]), float(hi[1] + margin * span[1]))
    return Plane(origin=a, directions=(u, v), coords=jnp.asarray(coords), xlim=xlim, ylim=ylim)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["center", "directions", "coords", "explained_variance", "explained_variance_ratio"],
    meta_fields=["degenerate"],
)
@dataclasses.dataclass(frozen=True)
class PCAPlane:
    """The PCA plane of a trajectory, from :func:`pca_directions`.

    Attributes:
        center: the point the differences are taken from (the final checkpoint by default).
        directions: two orthonormal principal directions ``(d1, d2)``; when ``degenerate``, ``d2``
            is all zeros (the trajectory spans no second direction).
        coords: ``(m, 2)`` coordinates of every checkpoint, ``<θ_i - center, d_k>``.
        explained_variance: ``(2,)`` variance along each direction.
        explained_variance_ratio: ``(2,)`` fraction of the total variance of the differences.
        degenerate: True when the second component carries no variance (ratio of the second to
            the first variance below ``tol``), e.g. a trajectory on a straight line.
    """

    center: Params
    directions: tuple[Params, Params]
    coords: Array
    explained_variance: Array
    explained_variance_ratio: Array
    degenerate: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (the directions themselves are not included)."""
        return {
            "coords": _json(self.coords),
            "explained_variance": _json(self.explained_variance),
            "explained_variance_ratio": _json(self.explained_variance_ratio),
            "degenerate": bool(self.degenerate),
        }


def pca_directions(
    trajectory: Sequence[Params] | Params,
    *,
    center: str | Params = "last",
    tol: float = 1e-6,
) -> PCAPlane:
    """The two principal directions of a training trajectory (Li et al. 2018, arXiv 1712.09913, §7).

    With checkpoints ``θ_1 … θ_m`` and a center ``θ_c`` (the final checkpoint by default), form
    the differences ``r_i = θ_i - θ_c``, subtract their mean (as Li et al.'s code does through
    ``sklearn.decomposition.PCA``) and take the top two right singular vectors of the ``m x n``
    matrix ``R``. The work is done on the ``m x m`` Gram matrix ``R R^T`` (``m`` inner products of
    pytrees, no ``m x n`` matrix is formed): ``R R^T = U Σ² U^T`` and ``d_k = R^T u_k / σ_k``.
    The explained variance is ``σ_k² / (m - 1)`` and its ratio ``σ_k² / Σ_j σ_j²``.

    Args:
        trajectory: a sequence of at least 3 matching params, or one stacked params (leading
            checkpoint axis).
        center: ``"last"``, ``"first"``, ``"mean"`` or a params tree matching the checkpoints.
        tol: the plane is reported ``degenerate`` when ``σ_2² / σ_1² < tol`` (or ``σ_1 = 0``).

    Returns:
        A :class:`PCAPlane`; on a degenerate trajectory ``degenerate=True``, the second explained
        variance is ~0 and the second direction is zero.

    Raises:
        ValueError: fewer than 3 checkpoints, checkpoints or center that do not match, an unknown
            center string.
    """
    models = _as_sequence(trajectory, "trajectory")
    if len(models) < 3:
        msg = f"pca_directions needs a trajectory of at least 3 checkpoints, got {len(models)}"
        raise ValueError(msg)
    if isinstance(center, str):
        choices = {"last": lambda: models[-1], "first": lambda: models[0],
                   "mean": lambda: _combine(models, [1.0 / len(models)] * len(models))}
        if center not in choices:
            msg = f"unknown center {center!r}; accepted: {sorted(choices)} or a params tree"
            raise ValueError(msg)
        c = choices[center]()
    else:
        tree.check_match(models[0], center, names=("trajectory[0]", "center"))
        c = center
    m = len(models)
    diffs = [tree.sub(t, c) for t in models]
    g = _gram(diffs)
    h = np.eye(m) - 1.0 / m  # centring matrix: rows of R minus their mean
    gc = h @ g @ h
    evals, evecs = np.linalg.eigh(gc)
    order = np.argsort(evals)[::-1]
    evals, evecs = np.clip(evals[order], 0.0, None), evecs[:, order]
    total = float(evals.sum())
    top = evals[:2]
    degenerate = bool(top[0] <= 0.0 or top[1] < tol * top[0])
    directions = []
    for k in range(2):
        if k == 1 and degenerate or top[k] <= 0.0:
            directions.append(tree.zeros_like(c))
            continue
        wts = (h @ evecs[:, k]) / math.sqrt(top[k])  # d_k = R^T H u_k / σ_k
        directions.append(_combine(diffs, wts))
    coords = np.array([[float(tree.vdot(r, d)) for d in directions] for r in diffs])
    var = top / (m - 1)
    ratio = top / total if total > 0 else np.zeros(2)
    return PCAPlane(
        center=c,
        directions=(directions[0], directions[1]),
        coords=jnp.asarray(coords),
        explained_variance=jnp.asarray(var),
        explained_variance_ratio=jnp.asarray(ratio),
        degenerate=degenerate,
    )


# ---------------------------------------------------------------------------------------------
# projection of models onto a line / plane
# ---------------------------------------------------------------------------------------------
def project(
    params: Params, center: Params, directions: Sequence[Params]
) -> tuple[Array, Array]:
    """Least-squares coordinates of ``params`` in the affine span ``center + span(directions)``.

    Solves ``G c = D^T (θ - center)`` with the Gram matrix ``G = D^T D`` (pseudo-inverse, so
    non-orthogonal or zero directions are fine) and reports the off-plane distance
    ``||θ - center - D c||``.

    Args:
        params: the model to project.
        center: the origin of the line / plane.
        directions: one or more directions matching ``center``.

    Returns:
        ``(coords, residual)``: ``(k,)`` coordinates and the scalar residual distance.
    """
    tree.check_match(center, params, names=("center", "params"))
    r = tree.sub(params, center)
    g = _gram(list(directions))
    rhs = np.array([float(tree.vdot(d, r)) for d in directions])
    coef = np.linalg.pinv(g) @ rhs
    res = _combine([r, *directions], [1.0, *(-coef)])
    return jnp.asarray(coef), tree.norm(res)


# ---------------------------------------------------------------------------------------------
# grid evaluation
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("chunk",))
def _evaluate_points(
    objective: Objective, center: Params, directions: tuple[Params, ...], coords: Array, *, chunk: int
) -> dict[str, Array]:
    """``objective.evaluate(center + sum_k coords[i, k] d_k)`` for every row ``i`` of ``coords``."""

    def at(c: Array) -> dict[str, Array]:
        return objective.evaluate(tree.offset(center, directions, c))

    if chunk == 1:
        return jax.lax.map(at, coords)
    return jax.lax.map(at, coords, batch_size=chunk)


def _grid_and_overlays(
    objective: Objective, center: Params, directions: tuple[Params, ...], coords: Array, chunk: int,
    resolved: list[tuple[str, str, list[Params]]], *, stats: str | None, overlay_states: Mapping[str, Any] | None,
    reset_x: Any,
) -> tuple[dict[str, Array], str, tuple[Overlay, ...]]:
    """Grid values, the statistics used and the overlays, under the resolved ``stats``."""
    from probes import batchnorm as bn

    mode = bn.resolve_stats(objective, stats)
    own = _overlay_states(resolved, overlay_states, mode)
    if mode != "reset":
        values = _evaluate_points(objective, center, directions, coords, chunk=chunk)
        return values, mode, _project_overlays(objective, center, directions, resolved, mode=mode)
    x, bs = bn.reset_inputs(objective, reset_x)
    keep = bn.momentum(objective, center)
    values = _evaluate_points_reset(objective, center, directions, coords, x, keep, chunk=chunk, batch_size=bs)
    at_center = np.all(np.asarray(coords) == 0.0, axis=-1)
    if at_center.any():  # the trained model at the origin keeps its own statistics
        own_center = bn.evaluate_at(objective, center, objective.apply_fn.state)
        values = {k: jnp.where(jnp.asarray(at_center), own_center[k], v) for k, v in values.items()}
    ov = _project_overlays(objective, center, directions, resolved, mode=mode, own=own, reset=(x, bs))
    return values, mode, ov


@functools.partial(jax.jit, static_argnames=("chunk", "batch_size"))
def _evaluate_points_reset(
    objective: Objective, center: Params, directions: tuple[Params, ...], coords: Array, x: Array, keep: Params,
    *, chunk: int, batch_size: int,
) -> dict[str, Array]:
    """As :func:`_evaluate_points`, with RESET statistics recomputed at every point."""
    from probes.batchnorm import evaluate_reset

    def at(c: Array) -> dict[str, Array]:
        def leaf(v: Array, *ds: Array) -> Array:
            y = v
            for k, d in enumerate(ds):
                y = y + c[k].astype(v.dtype) * d
            return y.astype(v.dtype)

        return evaluate_reset(objective, jax.tree.map(leaf, center, *directions), x, keep, batch_size=batch_size)

    if chunk == 1:
        return jax.lax.map(at, coords)
    return jax.lax.map(at, coords, batch_size=chunk)


@jax.jit
def _evaluate_models(objective: Objective, stacked: Params) -> dict[str, Array]:
    return jax.lax.map(objective.evaluate, stacked)


def _check_chunk(chunk: int | None) -> int:
    if chunk is None:
        return DEFAULT_CHUNK.get(jax.default_backend(), 1)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        msg = f"chunk must be a positive int (grid points vmapped per lax.map step) or None, got {chunk!r}"
        raise ValueError(msg)
    return chunk


def _check_axis(values: Any, what: str) -> Array:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        msg = f"{what} must be a 1-D sequence of coordinates, got shape {arr.shape}"
        raise ValueError(msg)
    if arr.size == 0:
        msg = f"{what} has no points; pass at least one coordinate (e.g. jnp.linspace(-1, 1, 41))"
        raise ValueError(msg)
    if not np.all(np.isfinite(arr)):
        msg = f"{what} has non-finite coordinates"
        raise ValueError(msg)
    return jnp.asarray(arr, jnp.float32)


def _check_directions(center: Params, directions: Sequence[Params]) -> None:
    _check_float_leaves(center, "center")
    for k, d in enumerate(directions):
        tree.check_match(center, d, names=("center", f"directions[{k}]"))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["coords", "residual", "loss", "accuracy"],
    meta_fields=["name", "kind", "stats"],
)
@dataclasses.dataclass(frozen=True)
class Overlay:
    """A model (``kind="point"``) or a sequence of models (``kind="path"``: a curve or a trajectory)
    projected onto a surface's line / plane.

    Attributes:
        name: the overlay's label.
        kind: ``"point"`` or ``"path"``.
        coords: ``(m, k)`` least-squares coordinates (``k`` = 1 or 2), see :func:`project`.
        residual: ``(m,)`` distance of each model from the line / plane.
        loss, accuracy: ``(m,)`` the models' own full-dataset loss and accuracy (equal to the
            surface's value at ``coords`` when ``residual`` is 0).
        stats: BatchNorm statistics of those evaluations: ``"own"`` (the models' own, from
            ``overlay_states``), ``"reset"`` (recomputed), ``"given"`` (the objective's) or
            ``"none"`` (no running statistics).
    """

    name: str
    kind: str
    coords: Array
    residual: Array
    loss: Array
    accuracy: Array
    stats: str = "none"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {
            "name": self.name,
            "kind": self.kind,
            "coords": _json(self.coords),
            "residual": _json(self.residual),
            "loss": _json(self.loss),
            "accuracy": _json(self.accuracy),
            "stats": self.stats,
        }


def _resolve_overlays(
    center: Params, overlays: Mapping[str, Any] | None
) -> list[tuple[str, str, list[Params]]]:
    """Check every overlay against ``center`` (before any work) -> ``[(name, kind, models)]``."""
    if overlays is None:
        return []
    if not isinstance(overlays, Mapping):
        msg = (
            "overlays must be a mapping name -> params (a model), a list of params or stacked "
            f"params (a curve / trajectory), got {type(overlays).__name__}"
        )
        raise ValueError(msg)
    out = []
    for name, value in overlays.items():
        try:
            tree.check_match(center, value, names=("center", f"overlays[{name!r}]"))
            models, kind = [value], "point"
        except ValueError as single_error:
            if isinstance(value, (list, tuple)) and value:
                for i, m in enumerate(value):
                    tree.check_match(center, m, names=("center", f"overlays[{name!r}][{i}]"))
                models, kind = list(value), "path"
            else:
                try:
                    models = tree.unstack(value)
                except ValueError:
                    raise single_error from None
                if not models:
                    raise single_error from None
                tree.check_match(center, models[0], names=("center", f"overlays[{name!r}][0]"))
                kind = "path"
        out.append((str(name), kind, models))
    return out


def _overlay_states(
    resolved: list[tuple[str, str, list[Params]]], overlay_states: Mapping[str, Any] | None, mode: str
) -> dict[str, list[Params]]:
    """``{name: [state per model]}`` for the overlays given their own statistics, checked."""
    if overlay_states is None:
        return {}
    if not isinstance(overlay_states, Mapping):
        msg = (f"overlay_states must be a mapping overlay name -> state (or list of states), "
               f"got {type(overlay_states).__name__}")
        raise ValueError(msg)
    names = {name: models for name, _, models in resolved}
    unknown = sorted(set(overlay_states) - set(names))
    if unknown:
        msg = f"overlay_states names overlays {unknown} that overlays lacks; overlays has {sorted(names)}"
        raise ValueError(msg)
    if mode != "reset":
        return {}
    out = {}
    for name, value in overlay_states.items():
        states = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(states) != len(names[name]):
            msg = f"overlay_states[{name!r}] gives {len(states)} states for {len(names[name])} models"
            raise ValueError(msg)
        out[name] = states
    return out


def _project_overlays(
    objective: Objective,
    center: Params,
    directions: tuple[Params, ...],
    resolved: list[tuple[str, str, list[Params]]],
    *,
    mode: str = "none",
    own: Mapping[str, list[Params]] | None = None,
    reset: tuple[Array, int] | None = None,
) -> tuple[Overlay, ...]:
    from probes import batchnorm as bn

    own = own or {}
    out = []
    for name, kind, models in resolved:
        proj = [project(m, center, directions) for m in models]
        stacked = tree.stack(models)
        if mode == "reset" and name in own:
            stats = bn.evaluate_stacked_given(objective, stacked, tree.stack(own[name]), chunk=8)
            used = "own"
        elif mode == "reset":
            x, bs = reset
            keep = bn.momentum(objective, models[0])
            stats = bn.evaluate_stacked_reset(objective, stacked, x=x, keep=keep, chunk=8, batch_size=bs)
            used = "reset"
        else:
            stats, used = _evaluate_models(objective, stacked), mode
        out.append(
            Overlay(
                name=name,
                kind=kind,
                coords=jnp.stack([p[0] for p in proj]).astype(jnp.float32),
                residual=jnp.stack([p[1] for p in proj]),
                loss=jnp.asarray(stats["loss"]),
                accuracy=jnp.asarray(stats["accuracy"]),
                stats=used,
            )
        )
    return tuple(out)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["alphas", "loss", "accuracy", "overlays"],
    meta_fields=["stats"],
)
@dataclasses.dataclass(frozen=True)
class Surface1D:
    """Loss and accuracy along ``center + α d``, from :func:`surface_1d`.

    Attributes:
        alphas: ``(n,)`` grid coordinates.
        loss, accuracy: ``(n,)`` full-dataset values at each ``α``.
        overlays: projected models / curves (coordinates are ``(m, 1)``).
        stats: BatchNorm statistics of the grid points (:mod:`probes.batchnorm`): ``"reset"``
            (recomputed at every point but the center, ``α = 0``, which uses the objective's),
            ``"given"`` (the objective's everywhere) or ``"none"``.
    """

    alphas: Array
    loss: Array
    accuracy: Array
    overlays: tuple[Overlay, ...] = ()
    stats: str = "none"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {
            "alphas": _json(self.alphas),
            "loss": _json(self.loss),
            "accuracy": _json(self.accuracy),
            "overlays": [o.to_dict() for o in self.overlays],
            "stats": self.stats,
        }

    def plot(self, *, log: bool = False) -> Any:
        """Interactive plotly figure: loss (left axis) and accuracy (right axis) against ``α``,
        with overlays drawn at their coordinates and own loss; ``log`` puts loss on a log axis."""
        import plotly.graph_objects as go

        a = np.asarray(self.alphas)
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=a, y=np.asarray(self.loss), name="loss", mode="lines"))
        fig.add_trace(
            go.Scatter(x=a, y=np.asarray(self.accuracy), name="accuracy", mode="lines",
                       yaxis="y2", line={"dash": "dot"})
        )
        for o in self.overlays:
            fig.add_trace(
                go.Scatter(
                    x=np.asarray(o.coords)[:, 0], y=np.asarray(o.loss), name=o.name,
                    mode="markers" if o.kind == "point" else "lines+markers",
                    marker={"size": 9},
                    customdata=np.asarray(o.residual),
                    hovertemplate="α=%{x:.3g}<br>loss=%{y:.4g}<br>off-line distance=%{customdata:.3g}",
                )
            )
        fig.update_layout(
            xaxis_title="α",
            yaxis={"title": "loss", "type": "log" if log else "linear"},
            yaxis2={"title": "accuracy", "overlaying": "y", "side": "right", "range": [0, 1]},
            legend={"x": 1.08},
        )
        return fig


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["xs", "ys", "loss", "accuracy", "overlays"],
    meta_fields=["stats"],
)
@dataclasses.dataclass(frozen=True)
class Surface2D:
    """Loss and accuracy on the grid ``center + x d1 + y d2``, from :func:`surface_2d`.

    Attributes:
        xs, ys: ``(nx,)`` and ``(ny,)`` grid coordinates.
        loss, accuracy: ``(nx, ny)`` values, ``loss[i, j]`` at ``(xs[i], ys[j])`` (``ij`` indexing).
        overlays: projected models / curves / trajectories (coordinates are ``(m, 2)``).
        stats: BatchNorm statistics of the grid points (:mod:`probes.batchnorm`): ``"reset"``
            (recomputed at every point but the center ``(0, 0)``, which uses the objective's),
            ``"given"`` (the objective's everywhere) or ``"none"``.
    """

    xs: Array
    ys: Array
    loss: Array
    accuracy: Array
    overlays: tuple[Overlay, ...] = ()
    stats: str = "none"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (``loss`` and ``accuracy`` as nested lists indexed ``[i][j]``)."""
        return {
            "xs": _json(self.xs),
            "ys": _json(self.ys),
            "loss": _json(self.loss),
            "accuracy": _json(self.accuracy),
            "overlays": [o.to_dict() for o in self.overlays],
            "stats": self.stats,
        }

    def plot(self, *, kind: str = "surface", log: bool = False, metric: str = "loss") -> Any:
        """Interactive plotly figure of the surface.

        Args:
            kind: ``"surface"`` (3-D surface, overlays as 3-D markers / lines at their own loss)
                or ``"contour"`` (filled contours, overlays as 2-D markers / lines).
            log: plot ``log10`` of the values (losses must be positive).
            metric: ``"loss"`` or ``"accuracy"``.
        """
        import plotly.graph_objects as go

        if kind not in ("surface", "contour"):
            msg = f"unknown kind {kind!r}; accepted: ['contour', 'surface']"
            raise ValueError(msg)
        if metric not in ("loss", "accuracy"):
            msg = f"unknown metric {metric!r}; accepted: ['accuracy', 'loss']"
            raise ValueError(msg)

        def tf(v: Any) -> np.ndarray:
            v = np.asarray(v, dtype=np.float64)
            return np.log10(np.maximum(v, np.finfo(np.float64).tiny)) if log else v

        z = tf(getattr(self, metric)).T  # plotly wants z[row = y][col = x]
        label = f"log10 {metric}" if log else metric
        xs, ys = np.asarray(self.xs), np.asarray(self.ys)
        fig = go.Figure()
        if kind == "surface":
            fig.add_trace(go.Surface(x=xs, y=ys, z=z, colorscale="Viridis", name=metric,
                                     colorbar={"title": label}, opacity=0.9))
        else:
            fig.add_trace(go.Contour(x=xs, y=ys, z=z, colorscale="Viridis", name=metric,
                                     colorbar={"title": label}, ncontours=30))
        for o in self.overlays:
            c = np.asarray(o.coords)
            mode = "markers" if o.kind == "point" else "lines+markers"
            hover = np.asarray(o.residual)
            tmpl = "x=%{x:.3g}<br>y=%{y:.3g}<br>off-plane distance=%{customdata:.3g}"
            if kind == "surface":
                fig.add_trace(go.Scatter3d(
                    x=c[:, 0], y=c[:, 1], z=tf(getattr(o, metric)), name=o.name, mode=mode,
                    marker={"size": 5}, customdata=hover, hovertemplate=tmpl))
            else:
                fig.add_trace(go.Scatter(
                    x=c[:, 0], y=c[:, 1], name=o.name, mode=mode, marker={"size": 10},
                    customdata=hover, hovertemplate=tmpl))
        if kind == "surface":
            fig.update_layout(scene={"xaxis_title": "x (d1)", "yaxis_title": "y (d2)",
                                     "zaxis_title": label})
        else:
            fig.update_layout(xaxis_title="x (d1)", yaxis_title="y (d2)",
                              legend={"x": 1.15})
        return fig


def surface_1d(
    objective: Objective,
    center: Params,
    direction: Params,
    *,
    grid: Any,
    chunk: int | None = None,
    overlays: Mapping[str, Any] | None = None,
    stats: str | None = None,
    overlay_states: Mapping[str, Any] | None = None,
    reset_x: Any = None,
) -> Surface1D:
    """Loss and accuracy along a line, ``f(α) = L(θ + α d)`` for every ``α`` in ``grid``.

    Every point is a full-dataset :meth:`~landscape.Objective.evaluate`. The points are run with
    ``lax.map``, ``chunk`` of them vmapped together per step (``None``: :data:`DEFAULT_CHUNK` for
    the default backend, chosen by measurement). Li et al. (arXiv 1712.09913) plot
    ``α ∈ [-0.5, 1.5]`` with 401 points between two checkpoints (``d = θ_1 - θ_0``) and
    ``[-1, 1]`` along a filter-normalised random direction.

    Args:
        objective: the full-dataset objective.
        center: ``θ``.
        direction: ``d``, matching ``center``.
        grid: 1-D sequence of coordinates ``α`` (at least one).
        chunk: grid points vmapped together inside each ``lax.map`` step.
        overlays: ``{name: params}`` (a model) or ``{name: [params, ...] | stacked params}`` (a
            curve / trajectory) to project onto the line (see :class:`Overlay`).
        stats, overlay_states, reset_x: BatchNorm statistics, see :func:`surface_2d`.

    Raises:
        ValueError: an empty grid, a direction or overlay that does not match ``center`` (naming
            the path), a bad ``chunk``, ``stats="reset"`` for a model without running statistics.
    """
    alphas = _check_axis(grid, "grid")
    _check_directions(center, [direction])
    c = _check_chunk(chunk)
    resolved = _resolve_overlays(center, overlays)
    values, mode, ov = _grid_and_overlays(objective, center, (direction,), alphas[:, None], c, resolved,
                                          stats=stats, overlay_states=overlay_states, reset_x=reset_x)
    return Surface1D(alphas=alphas, loss=values["loss"], accuracy=values["accuracy"], overlays=ov, stats=mode)


def surface_2d(
    objective: Objective,
    center: Params,
    directions: Sequence[Params],
    *,
    grid: tuple[Any, Any],
    chunk: int | None = None,
    overlays: Mapping[str, Any] | None = None,
    stats: str | None = None,
    overlay_states: Mapping[str, Any] | None = None,
    reset_x: Any = None,
) -> Surface2D:
    """Loss and accuracy on a plane, ``f(x, y) = L(θ + x d_1 + y d_2)`` on the grid ``xs x ys``.

    Every point is a full-dataset :meth:`~landscape.Objective.evaluate`; the ``nx * ny`` points
    (``ij`` order) run through one jitted ``lax.map``, ``chunk`` points vmapped together per step
    (``None``: :data:`DEFAULT_CHUNK` for the default backend, chosen by measurement — on CPU one
    point per step, since vmapping points turns each matmul into a slower batched matmul; 8 on
    GPU). Memory is that of ``chunk`` simultaneous evaluations.

    Li et al. (arXiv 1712.09913) use ``[-1, 1]²`` at 51 x 51 with two filter-normalised random
    directions; :class:`Plane` and :class:`PCAPlane` supply directions and ranges for the plane
    through three models and the PCA plane of a trajectory.

    Args:
        objective: the full-dataset objective.
        center: ``θ`` (the grid origin).
        directions: ``(d_1, d_2)``, each matching ``center``.
        grid: ``(xs, ys)``, two 1-D sequences of coordinates (at least one point each).
        chunk: grid points vmapped together inside each ``lax.map`` step.
        overlays: ``{name: params}`` (a model) or ``{name: [params, ...] | stacked params}`` (a
            curve / trajectory) to project onto the plane (see :class:`Overlay`).
        stats: BatchNorm running statistics (:mod:`probes.batchnorm`). ``"reset"`` (the default
            for a model with them): every grid point but the center is evaluated with statistics
            recomputed there on ``reset_x`` (default: the objective's inputs), the center with the
            objective's (it is the trained model the objective carries the state of), and each
            overlay model with its own from ``overlay_states`` or, without, with RESET.
            ``"given"``: the objective's statistics everywhere.
        overlay_states: ``{overlay name: state}`` (a model) or ``{name: [state, ...]}`` (one per
            model of a curve), the overlays' own running statistics.
        reset_x: inputs (or an Objective: inputs and batch size) for RESET.

    Returns:
        A :class:`Surface2D` with ``loss[i, j]`` at ``(xs[i], ys[j])``.

    Raises:
        ValueError: an empty grid, not exactly two directions, directions or overlays that do not
            match ``center`` (naming the path), a bad ``chunk``.
    """
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        msg = f"grid must be a pair (xs, ys) of 1-D coordinate sequences, got {type(grid).__name__}"
        raise ValueError(msg)
    xs, ys = _check_axis(grid[0], "grid xs"), _check_axis(grid[1], "grid ys")
    if not isinstance(directions, (tuple, list)) or len(directions) != 2:
        msg = "surface_2d needs directions=(d1, d2): a tuple or list of two params trees"
        raise ValueError(msg)
    dirs = tuple(directions)
    _check_directions(center, dirs)
    c = _check_chunk(chunk)
    resolved = _resolve_overlays(center, overlays)
    gx, gy = jnp.meshgrid(xs, ys, indexing="ij")
    coords = jnp.stack([gx.ravel(), gy.ravel()], axis=-1)
    values, mode, ov = _grid_and_overlays(objective, center, dirs, coords, c, resolved, stats=stats,
                                          overlay_states=overlay_states, reset_x=reset_x)
    shape = (xs.shape[0], ys.shape[0])
    return Surface2D(
        xs=xs,
        ys=ys,
        loss=values["loss"].reshape(shape),
        accuracy=values["accuracy"].reshape(shape),
        overlays=ov,
        stats=mode,
    )


def _json(x: Any) -> Any:
    """Nested lists of floats with NaN / inf as None (:func:`probes.numerics.json_safe`)."""
    from probes.numerics import json_safe

    return json_safe(np.asarray(x, dtype=np.float64))

r"""Sparsification masks for task vectors: magnitude top-k, Breadcrumbs, DARE and DELLA.

Every mask here is computed on one params-like tree (no model axis; ``jax.vmap`` over models) and
keeps **exactly** the documented number of entries per group, whatever ties or exact zeros the
tensor holds.

**Groups.** ``scope="leaf"``: each tensor is one group; ``"global"``: the whole tree is one group
(TIES' original code); ``"row"``: one group per **output unit**, whatever the layout (Breadcrumbs,
DELLA, Model Stock ``filter_wise``): the unit axis is ``out_axis`` (default ``-1``, Flax kernels
``(…, in, out)``, where unit ``j`` is ``x[..., j]``; ``out_axis=0`` for PyTorch ``(out, in, …)``
weights, unit ``i`` is ``x[i]``), every other axis flattened into the group; ``out_axis=None``
takes the rows ``x[..., i, :]`` along the last axis as stored (mergekit's tensor-wise convention).
No key-name convention is used: the caller says the layout. 0-D and 1-D tensors are one group.

**Counts.** For a fraction ``f`` of a group of ``n`` entries the count is :math:`\lfloor f n\rceil`,
the floor of :math:`f n` where a product within float rounding (relative :math:`5\cdot 10^{-7}`)
of an integer counts as that integer, so ``density=0.7`` keeps 7 of 10 whether ``density`` is a
Python float or a traced float32.

**Tie rule.** Entries are ranked by :math:`|x|` in descending order with a stable sort: equal
magnitudes are ranked by their flat (row-major) index, lower index first. Exact zeros therefore
rank last and are selected only when a group has fewer non-zero entries than the count; NaN and
±inf rank as the largest magnitudes (``+inf``), so a top-k mask keeps them and the merges that use
these masks propagate them as NaN (``landscape.merge.task_vectors.propagate_nonfinite``).

Example:
    >>> import jax.numpy as jnp
    >>> from landscape.merge import sparsify
    >>> sparsify.topk_mask({"w": jnp.array([1.0, -3.0, 3.0, 0.0])}, density=0.5)["w"].tolist()
    [False, True, True, False]
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from landscape._types import Array, Key, Params
from landscape.merge._inputs import check_choice, check_range, is_concrete

__all__ = [
    "bernoulli_mask",
    "breadcrumbs_mask",
    "check_della",
    "check_out_axis",
    "count",
    "della_probabilities",
    "exact_random_mask",
    "topk_mask",
    "unit_groups",
]

_REL_TOL = 5e-7


def count(fraction: Array | float, n: int, *, at_least_one: bool = False) -> Array | int:
    """Number of entries a ``fraction`` of ``n`` keeps: ``floor(fraction * n)`` with float rounding
    snapped to the nearest integer (see the module docstring); ``max(1, .)`` with ``at_least_one``."""
    if is_concrete(fraction) and jnp.ndim(fraction) == 0:
        p = float(fraction) * n
        r = round(p)
        k = r if abs(p - r) <= _REL_TOL * max(p, 1.0) else math.floor(p)
        return max(1, k) if at_least_one else k
    p = jnp.asarray(fraction, jnp.float32) * n
    r = jnp.round(p)
    k = jnp.where(jnp.abs(p - r) <= _REL_TOL * jnp.maximum(p, 1.0), r, jnp.floor(p)).astype(jnp.int32)
    return jnp.maximum(k, 1) if at_least_one else k


def check_out_axis(out_axis: Any) -> int | None:
    """``out_axis`` as given: an int (the output-unit axis) or None (stored rows, see module docstring)."""
    if out_axis is not None and (isinstance(out_axis, bool) or not isinstance(out_axis, int)):
        msg = f"out_axis must be an int (the output-unit axis) or None (rows along the last axis), got {out_axis!r}"
        raise TypeError(msg)
    return out_axis


def unit_groups(x: Array, out_axis: int | None, *, name: str = "leaf") -> tuple[Array, Any]:
    """``(groups (G, L), inverse)``: one group per output unit of ``x`` (module docstring, "Groups").

    ``inverse(g)`` maps a ``(G, L)`` array back to ``x``'s shape. 0-D and 1-D tensors are one group;
    ``out_axis=None`` gives the rows ``x[..., i, :]`` along the last axis as stored.
    """
    shape = jnp.shape(x)
    if len(shape) < 2:
        return jnp.reshape(x, (1, -1)), lambda g: jnp.reshape(g, shape)
    if out_axis is None:
        return jnp.reshape(x, (-1, shape[-1])), lambda g: jnp.reshape(g, shape)
    if not -len(shape) <= out_axis < len(shape):
        msg = f"out_axis={out_axis} is out of range for {name!r} of shape {shape}"
        raise ValueError(msg)
    ax = out_axis % len(shape)
    moved = jnp.moveaxis(x, ax, 0)
    mshape = moved.shape
    return moved.reshape(mshape[0], -1), lambda g: jnp.moveaxis(jnp.reshape(g, mshape), 0, ax)


def _groups(x: Array, scope: str, out_axis: int | None = None) -> tuple[Array, Any]:
    if scope == "row":
        return unit_groups(x, out_axis)
    shape = jnp.shape(x)
    return jnp.reshape(x, (1, -1)), lambda g: jnp.reshape(g, shape)


def _rank_desc(a: Array) -> Array:
    """Rank along the last axis by descending value, 0 = largest, ties by lower index."""
    order = jnp.argsort(a, axis=-1, descending=True, stable=True)
    return jnp.argsort(order, axis=-1)


def _magnitude(x: Array) -> Array:
    """``|x|`` in float32 with NaN and ±inf ranked as ``+inf`` (the largest magnitude)."""
    a = jnp.abs(x).astype(jnp.float32)
    return jnp.where(jnp.isfinite(a), a, jnp.inf)


def _map_groups(fn: Any, params: Params, scope: str, out_axis: int | None = None) -> Params:
    """Apply ``fn(groups (G, L)) -> (G, L)`` to every leaf, or once to the whole tree (global)."""
    leaves, treedef = jax.tree.flatten(params)
    if scope == "global":
        flat = jnp.concatenate([_magnitude(x).ravel() for x in leaves])
        out = fn(flat[None])[0]
        parts, start = [], 0
        for x in leaves:
            parts.append(out[start : start + x.size].reshape(x.shape))
            start += x.size
        return jax.tree.unflatten(treedef, parts)
    outs = []
    for x in leaves:
        g, inverse = _groups(_magnitude(x), scope, out_axis)
        outs.append(inverse(fn(g)))
    return jax.tree.unflatten(treedef, outs)


def topk_mask(
    params: Params,
    *,
    density: Array | float,
    scope: str = "leaf",
    out_axis: int | None = -1,
    rule: str = "exact",
) -> Params:
    r"""Boolean mask keeping the :math:`k = \max(1, \lfloor \text{density}\cdot n\rceil)` largest
    :math:`|x|` of each group (TIES trimming, mergekit ``magnitude``).

    ``rule="exact"``: ties and exact zeros follow the module's tie rule, so every group keeps exactly
    ``k`` entries (mergekit's count). ``rule="original"``: the original TIES code's
    ``topk_values_mask`` (also FusionBench's): with :math:`k' = n - \mathrm{int}(\text{density}\cdot n)`,
    keep every entry with :math:`|x| \ge` the :math:`k'`-th smallest :math:`|x|` (``kthvalue``), i.e.
    ``int(density n) + 1`` entries plus every tie at the threshold (all entries when :math:`k' \le 0`).
    The count uses Python's ``int`` of the float product for a concrete ``density`` (exactly as the
    original), ``floor`` in float32 for a traced one. ``density`` may be traced.

    Args:
        params: a params-like tree (one model).
        density: kept fraction in (0, 1].
        scope: ``"leaf"``, ``"global"`` or ``"row"`` (one group per output unit).
        out_axis: output-unit axis for ``scope="row"`` (module docstring).
        rule: ``"exact"`` or ``"original"`` (see above).
    """
    check_choice("scope", scope, ("leaf", "global", "row"))
    check_choice("rule", rule, ("exact", "original"))
    check_range("density", density, 0.0, 1.0, lo_open=True)
    out_axis = check_out_axis(out_axis)

    def fn(a: Array) -> Array:
        n = a.shape[-1]
        if rule == "original":
            if is_concrete(density) and jnp.ndim(density) == 0:
                k_small = n - int(n * float(density))
            else:
                k_small = n - jnp.floor(jnp.asarray(density, jnp.float32) * n).astype(jnp.int32)
            srt = jnp.sort(a, axis=-1)
            idx = jnp.clip(jnp.asarray(k_small) - 1, 0, n - 1)
            thr = jnp.take(srt, idx, axis=-1)[..., None]
            return jnp.where(jnp.asarray(k_small) <= 0, True, a >= thr)
        k = count(density, n, at_least_one=True)
        return _rank_desc(a) < k

    return _map_groups(fn, params, scope, out_axis)


def breadcrumbs_mask(
    params: Params,
    *,
    density: Array | float,
    gamma: Array | float,
    scope: str = "row",
    out_axis: int | None = -1,
) -> Params:
    r"""Model Breadcrumbs mask (Davari & Belilovsky, arXiv 2312.06795): in each group of ``n``
    entries, drop the :math:`n_{top} = \lfloor\gamma n\rceil` largest :math:`|x|` (outliers), then
    keep the next :math:`k = \min(\max(1, \lfloor\beta n\rceil), n - n_{top})` (``density`` = β, the
    final density, as in the paper). Exactly the entries with descending rank in
    :math:`[n_{top}, n_{top} + k)` are kept (module tie rule).

    Args:
        params: a params-like tree (one model).
        density: β in (0, 1].
        gamma: γ in [0, 1).
        scope: ``"row"`` (one group per output unit, the authors' code: rows of PyTorch ``(out, in)``
            weights) or ``"leaf"``.
        out_axis: output-unit axis for ``scope="row"`` (module docstring).
    """
    check_choice("scope", scope, ("row", "leaf"))
    out_axis = check_out_axis(out_axis)
    check_range("density", density, 0.0, 1.0, lo_open=True)
    check_range("gamma", gamma, 0.0, 1.0, hi_open=True)

    def fn(a: Array) -> Array:
        n = a.shape[-1]
        n_top = count(gamma, n)
        k = jnp.minimum(count(density, n, at_least_one=True), n - n_top)
        r = _rank_desc(a)
        return (r >= n_top) & (r < n_top + k)

    return _map_groups(fn, params, scope, out_axis)


def check_della(density: Array | float, epsilon: Array | float) -> None:
    """Raise ``ValueError`` unless ``0 < density - epsilon``, ``density + epsilon < 1``, ``epsilon >= 0``
    (concrete values only)."""
    if is_concrete(density) and is_concrete(epsilon):
        d, e = float(density), float(epsilon)
        if not (0.0 < d - e and d + e < 1.0 and e >= 0.0):
            msg = (
                "della needs 0 < density - epsilon, density + epsilon < 1 and epsilon >= 0, got "
                f"density={d}, epsilon={e}"
            )
            raise ValueError(msg)


def della_probabilities(
    params: Params, *, density: Array | float, epsilon: Array | float, out_axis: int | None = -1
) -> Params:
    r"""DELLA's MAGPRUNE keep probabilities (Deep et al., arXiv 2406.11617; mergekit ``della``).

    Within each output unit (``out_axis``, module docstring; mergekit ranks within ``x[i, :]`` of
    PyTorch ``(out, in)`` weights, i.e. ``out_axis=0``; 0-D/1-D tensors are one group) entries are
    ranked by ascending
    :math:`|x|` (ties by index), :math:`r \in \{0, \dots, n-1\}`, and

    .. math:: p_{keep} = (\text{density} - \epsilon) + 2\epsilon \cdot \frac{r}{n-1},

    so larger magnitudes are kept more often and the mean keep probability is ``density``
    (a row of length 1 gets ``density``). Needs :math:`0 < \text{density} \pm \epsilon < 1`.
    """
    check_della(density, epsilon)
    out_axis = check_out_axis(out_axis)

    def leaf(x: Array) -> Array:
        g, inverse = _groups(_magnitude(x), "row", out_axis)
        n = g.shape[-1]
        r = jnp.argsort(jnp.argsort(g, axis=-1, stable=True), axis=-1).astype(jnp.float32)
        rn = r / (n - 1) if n > 1 else jnp.full_like(r, 0.5)
        p = (density - epsilon) + 2 * epsilon * rn
        return inverse(p)

    return jax.tree.map(leaf, params)


def _uniform_like(key: Key, leaves: list[Array]) -> list[Array]:
    """One i.i.d. U[0, 1) draw for all leaves at once (a single random call), split per leaf."""
    sizes = [int(jnp.size(x)) for x in leaves]
    u = jax.random.uniform(key, (max(sum(sizes), 1),))
    out, start = [], 0
    for x, n in zip(leaves, sizes, strict=True):
        out.append(u[start : start + n].reshape(jnp.shape(x)))
        start += n
    return out


def bernoulli_mask(key: Key, params: Params, *, keep: Array | float | Params) -> Params:
    """Independent Bernoulli keep-mask: entry kept with probability ``keep`` (a scalar or a tree of
    per-entry probabilities, e.g. :func:`della_probabilities`), from one uniform draw over the
    whole tree (DARE, arXiv 2311.03099)."""
    leaves, treedef = jax.tree.flatten(params)
    probs = jax.tree.leaves(keep)
    if len(probs) == 1 and jnp.ndim(probs[0]) == 0:
        probs = probs * len(leaves)
    if len(probs) != len(leaves):
        msg = f"keep has {len(probs)} leaves but params has {len(leaves)}"
        raise ValueError(msg)
    us = _uniform_like(key, leaves)
    return jax.tree.unflatten(treedef, [u < p for u, p in zip(us, probs, strict=True)])


def exact_random_mask(key: Key, params: Params, *, keep: Array | float) -> Params:
    r"""Uniformly random keep-mask with exactly :math:`\lfloor \text{keep}\cdot n\rceil` entries kept
    in each tensor (a fixed-count DARE variant): the entries with the smallest i.i.d. uniform draws
    are kept (one uniform draw over the whole tree)."""
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for u, x in zip(_uniform_like(key, leaves), leaves, strict=True):
        kk = count(keep, jnp.size(x))
        out.append((_rank_desc(-u.reshape(1, -1)) < kk).reshape(jnp.shape(x)))
    return jax.tree.unflatten(treedef, out)

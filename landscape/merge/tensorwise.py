r"""Tensor-wise merge methods with mergekit 0.1.5's exact definitions, on one tensor at a time.

Every function here merges the **same tensor** taken from several models: ``tensors`` is an array
with a leading model axis ``(m, *shape)`` (or a list of ``m`` arrays of one shape), ``base`` the
base model's tensor where the method has one. They are pure ``jax.numpy`` functions, jittable with
the structural options static; numeric settings (weights, densities, ``t``) may be traced, and
integer counts are passed in already computed with mergekit's rounding (``int(density * n)``,
Python floats), so the kept counts agree with mergekit's to the element.

**Dtypes.** Arithmetic runs in float32 (float64 when the inputs are float64 and JAX runs with
x64); the result is float32 and the caller casts it to the recipe's ``out_dtype`` / ``dtype`` /
the input dtype. mergekit computes the task-arithmetic family, SCE, Model Stock, NearSwap,
NuSLERP and Multi-SLERP in the *input* dtype (bf16 arithmetic for bf16 inputs unless the recipe
says ``dtype: float32``) and Linear, SLERP and Karcher in float32; so for bf16 inputs our outputs
are at least as accurate and agree with mergekit's ``dtype: float32`` outputs to one bf16 ulp.

**Rows.** mergekit's row-wise operations act on the tensor as stored: DELLA ranks within
``x[i, :]`` (dim 1), ``filter_wise`` Model Stock and ``nuslerp_flatten: false`` take vectors along
the last axis, ``nuslerp_row_wise: true`` along dim 0. In PyTorch ``Linear`` weights ``(out, in)``
``x[i, :]`` is output unit i; GPT-2's ``Conv1D`` weights are stored ``(in, out)`` and mergekit
(and we) still use the stored axes.

**Randomness** (DARE's Bernoulli masks, DELLA's MAGPRUNE) comes from an explicit typed key; the
driver derives one key per tensor with ``fold_in(key(seed), crc32(name))`` and one per model with
``fold_in(tensor_key, model_index)`` (:func:`tensor_key`), so a merge is reproducible across runs
and independent of the order tensors are visited. An explicit ``masks`` array replaces the draw
(used to compare against masks recorded from mergekit, whose torch RNG we cannot reproduce).

Methods (mergekit names): ``linear`` (model soups, arXiv 2203.05482), ``slerp``, ``nuslerp``,
``multislerp``, ``karcher`` (the Riemannian centre of mass of Karcher 1977), ``task_arithmetic`` (arXiv 2212.04089), ``ties``
(arXiv 2306.01708), ``dare_linear`` / ``dare_ties`` (arXiv 2311.03099), ``breadcrumbs`` /
``breadcrumbs_ties`` (arXiv 2312.06795), ``della`` / ``della_linear`` (arXiv 2406.11617), ``sce``
(arXiv 2408.07990), ``model_stock`` (arXiv 2403.19522), ``nearswap``, ``passthrough``.
:data:`METHODS` holds each method's parameters, defaults and input contract; :func:`apply` runs
one by name on one tensor group.

Where mergekit differs from the papers: DARE and DELLA rescale kept entries to the task vector's
L1 norm (``rescale: true``), not by ``1/p`` (the papers; :func:`landscape.merge.dare` /
:func:`landscape.merge.della` with ``rescale="inverse"`` give the paper's form on pytrees);
Breadcrumbs here works on the whole tensor (mergekit), the authors' code per row
(:func:`landscape.merge.breadcrumbs`); TIES trims per tensor (mergekit), the original code over
the whole model (``landscape.merge.ties(scope="global")``).

Example:
    >>> import jax.numpy as jnp
    >>> from landscape.merge import tensorwise
    >>> xs = jnp.array([[1.0, 2.0], [3.0, 6.0]])
    >>> tensorwise.linear(xs, weight=jnp.array([1.0, 3.0])).tolist()
    [2.5, 5.0]
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landscape._types import Array, Key
from landscape.merge import averaging

__all__ = [
    "METHODS",
    "MethodSpec",
    "Parameter",
    "REQUIRED",
    "apply",
    "breadcrumbs_mask",
    "della_keep_probabilities",
    "describe",
    "generalized_task_arithmetic",
    "karcher",
    "linear",
    "magnitude_mask",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "passthrough",
    "sce",
    "sign_consensus",
    "slerp",
    "tensor_key",
]


def _compute_dtype(x: Any) -> Any:
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _stack(tensors: Array | Sequence[Array]) -> Array:
    if isinstance(tensors, (list, tuple)):
        shapes = {tuple(jnp.shape(t)) for t in tensors}
        if len(shapes) != 1:
            msg = f"tensors to merge must share one shape, got {sorted(shapes)}"
            raise ValueError(msg)
        tensors = jnp.stack([jnp.asarray(t) for t in tensors])
    x = jnp.asarray(tensors)
    return x.astype(_compute_dtype(x))


def _bcast(w: Array, x: Array) -> Array:
    return jnp.reshape(w, (-1,) + (1,) * (x.ndim - 1))


def tensor_key(key: Key, name: str) -> Key:
    """Per-tensor key ``fold_in(key, crc32(name) & 0x7fffffff)``: stable across runs and processes
    (never Python's salted ``hash``) and independent of the order tensors are merged in."""
    return jax.random.fold_in(key, zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF)


# --------------------------------------------------------------------------------------------
# Interpolations


@functools.partial(jax.jit, static_argnames=('normalize',))
def linear(tensors: Array | Sequence[Array], *, weight: Array, normalize: bool = True) -> Array:
    r"""mergekit ``linear`` (model soups, arXiv 2203.05482): :math:`\sum_i w_i x_i / \sum_i w_i`
    with ``normalize`` (default), :math:`\sum_i w_i x_i` without. No base model; a divisor of 0
    gives inf/nan exactly as mergekit (the recipe layer rejects weights summing to 0)."""
    x = _stack(tensors)
    w = jnp.asarray(weight, x.dtype)
    out = jnp.sum(_bcast(w, x) * x, axis=0)
    return out / jnp.sum(w) if normalize else out


@jax.jit
def slerp(base: Array, other: Array, *, t: Array | float) -> Array:
    r"""mergekit ``slerp`` (Shoemake 1985): the whole tensor is one vector,

    .. math:: \mathrm{slerp}(a, b; t) = \frac{\sin((1-t)\Omega)}{\sin\Omega} a
              + \frac{\sin(t\Omega)}{\sin\Omega} b, \quad \cos\Omega = \hat a\cdot\hat b,

    with the lerp when :math:`|\cos\Omega| > 0.9995`; ``t=0`` is the base. Reuses
    :func:`landscape.merge.slerp` (same definition, vectors normalised only above norm 1e-8)."""
    a = jnp.asarray(base)
    b = jnp.asarray(other)
    dt = _compute_dtype(a)
    return averaging.slerp({"w": a.astype(dt)}, {"w": b.astype(dt)}, t=t)["w"]


def _nuslerp_vectors(t: Array, v0: Array, v1: Array, eps: float = 1e-8) -> Array:
    def unit(x: Array) -> Array:
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-7)

    cos = jnp.clip(jnp.sum(unit(v0) * unit(v1), axis=-1, keepdims=True), -1.0, 1.0)
    colinear = (1 - cos * cos) <= eps**2
    theta = jnp.arccos(jnp.where(colinear, 0.0, cos))
    sin_t = jnp.sin(theta)
    safe = jnp.where(colinear, 1.0, sin_t)
    spherical = (jnp.sin((1 - t) * theta) * v0 + jnp.sin(t * theta) * v1) / safe
    return jnp.where(colinear, (1 - t) * v0 + t * v1, spherical)


@functools.partial(jax.jit, static_argnames=('flatten', 'row_wise',))
def nuslerp(
    tensors: Array | Sequence[Array],
    *,
    weight: Array,
    base: Array | None = None,
    flatten: bool = True,
    row_wise: bool = False,
) -> Array:
    r"""mergekit ``nuslerp``: SLERP of two models (or of their task vectors when ``base`` is
    given, then added back) at :math:`t = w_1/(w_0+w_1)` (0.5 when :math:`|w_0+w_1|<10^{-6}`).

    ``flatten`` (``nuslerp_flatten``, default): one vector per tensor; otherwise one vector per
    slice along the last axis, or along dim 0 with ``row_wise`` (``nuslerp_row_wise``). Vectors are
    normalised by ``max(norm, 1e-7)``; colinear when :math:`1-\cos^2 \le 10^{-16}` (then lerp).
    """
    x = _stack(tensors)
    if x.shape[0] != 2:
        msg = f"nuslerp merges exactly 2 non-base models, got {x.shape[0]}"
        raise ValueError(msg)
    w = jnp.asarray(weight, x.dtype)
    total = w[0] + w[1]
    t = jnp.where(jnp.abs(total) < 1e-6, 0.5, w[1] / jnp.where(total == 0, 1.0, total))
    v0, v1 = x[0], x[1]
    b = None if base is None else jnp.asarray(base).astype(x.dtype)
    if b is not None:
        v0, v1 = v0 - b, v1 - b
    shape = v0.shape
    if flatten:
        out = _nuslerp_vectors(t, v0.reshape(-1), v1.reshape(-1)).reshape(shape)
    elif row_wise and v0.ndim >= 1:
        out = jnp.swapaxes(
            _nuslerp_vectors(t, jnp.swapaxes(v0, 0, -1), jnp.swapaxes(v1, 0, -1)), 0, -1
        )
    else:
        out = _nuslerp_vectors(t, v0, v1)
    return out if b is None else b + out


@functools.partial(jax.jit, static_argnames=('normalize_weights', 'eps',))
def multislerp(
    tensors: Array | Sequence[Array],
    *,
    weight: Array,
    base: Array | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> Array:
    r"""mergekit ``multislerp``: barycentric interpolation on the hypersphere.

    With :math:`u_i = x_i/(\|x_i\|+\epsilon)` (task vectors when ``base`` is given) and weights
    :math:`w` (normalised to sum 1 by default): mean direction :math:`\mu = \sum w_i u_i /
    \|\sum w_i u_i\|`, tangent :math:`v = \sum_i w_i (u_i - (u_i\cdot\mu)\mu)`, result
    :math:`(\mu\cos\|v\|' + v \sin\|v\|'/\|v\|')\sum_i w_i\|x_i\|` with :math:`\|v\|' = \|v\| +
    \epsilon`. A single model is returned unchanged. If :math:`\|\sum w_i u_i\| < \epsilon`, two
    models fall back to :math:`w_0x_0 + w_1x_1`; more give NaN (mergekit raises; the recipe layer
    cannot know in advance, so the driver reports the non-finite tensor).
    """
    x = _stack(tensors)
    m = x.shape[0]
    b = None if base is None else jnp.asarray(base).astype(x.dtype)
    if m == 1:
        return x[0]
    if b is not None:
        x = x - b[None]
    flat = x.reshape(m, -1)
    w = jnp.asarray(weight, x.dtype)
    if normalize_weights:
        w = w / jnp.sum(w)
    norms = jnp.linalg.norm(flat, axis=-1, keepdims=True)
    units = flat / (norms + eps)
    mean = jnp.sum(units * w[:, None], axis=0)
    mean_norm = jnp.linalg.norm(mean)
    degenerate = mean_norm < eps
    mean = mean / jnp.where(degenerate, 1.0, mean_norm)
    dots = jnp.sum(units * mean, axis=-1, keepdims=True)
    tangent = jnp.sum((units - dots * mean) * w[:, None], axis=0)
    tn = jnp.linalg.norm(tangent) + eps
    res = mean * jnp.cos(tn) + tangent * (jnp.sin(tn) / tn)
    res = (res * jnp.sum(norms[:, 0] * w)).reshape(x.shape[1:])
    if m == 2:
        fallback = x[0] * w[0] + x[1] * w[1]
    else:
        fallback = jnp.full(x.shape[1:], jnp.nan, x.dtype)
    res = jnp.where(degenerate, fallback, res)
    return res if b is None else res + b


@functools.partial(jax.jit, static_argnames=('max_iter', 'tol',))
def karcher(tensors: Array | Sequence[Array], *, max_iter: int = 10, tol: float = 1e-5) -> Array:
    r"""mergekit ``karcher``: the Karcher (Riemannian) mean of the tensors' directions on the unit
    sphere (Karcher 1977, as in mergekit), equal weights :math:`1/N`, times the mean norm.

    Directions of norm ≤ ``tol`` are left out of the mean (but their norms still count in the
    scale). Start from the normalised weighted mean of the units (or the first unit if that is
    shorter than ``tol``); each step moves along the exponential map of the tangent
    :math:`\sum_i \alpha_i \frac{\theta_i}{\sin\theta_i}(u_i - \cos\theta_i\,\mu)` (terms with
    :math:`\theta_i <` ``tol`` skipped), stopping when its norm is below ``tol`` or after
    ``max_iter`` steps. All models at norm ≤ ``tol`` give zeros.
    """
    x = _stack(tensors)
    n = x.shape[0]
    if n == 1:
        return x[0]
    flat = x.reshape(n, -1)
    norms = jnp.linalg.norm(flat, axis=-1)
    units = jnp.where((norms == 0)[:, None], 0.0, flat / jnp.where(norms == 0, 1.0, norms)[:, None])
    valid = norms > tol
    alphas = jnp.full((n,), 1.0 / n, x.dtype)
    va = jnp.where(valid, alphas, 0.0)
    na = va / jnp.where(jnp.sum(va) == 0, 1.0, jnp.sum(va))
    mean = jnp.sum(na[:, None] * units, axis=0)
    mn = jnp.linalg.norm(mean)
    first = units[jnp.argmax(valid)]
    mean = jnp.where(mn < tol, first, mean / jnp.where(mn < tol, 1.0, mn))

    def step(_: int, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        mu, done = carry
        dot = jnp.clip(units @ mu, -1.0, 1.0)
        theta = jnp.arccos(dot)
        use = valid & (theta >= tol)
        coef = jnp.where(use, na * theta / jnp.where(use, jnp.sin(theta), 1.0), 0.0)
        tangent = jnp.sum(coef[:, None] * (units - dot[:, None] * mu), axis=0)
        tnorm = jnp.linalg.norm(tangent)
        stop = tnorm < tol
        new = jnp.cos(tnorm) * mu + jnp.sin(tnorm) * (tangent / jnp.where(stop, 1.0, tnorm))
        un = jnp.linalg.norm(new)
        new = jnp.where(un > tol, new / jnp.where(un > tol, un, 1.0), new)
        keep = done | stop
        return jnp.where(keep, mu, new), keep

    mean, _ = jax.lax.fori_loop(0, max_iter, step, (mean, jnp.zeros((), bool)))
    scale = jnp.sum(alphas * norms)
    out = (scale * mean).reshape(x.shape[1:])
    return jnp.where(jnp.any(valid), out, jnp.zeros_like(out))


@jax.jit
def nearswap(base: Array, other: Array, *, t: Array | float) -> Array:
    r"""mergekit ``nearswap``: take the other model's value where it is near the base,
    :math:`w = \mathrm{clip}(t/\max(|a-b|, 10^{-6}), 0, 1)`, result :math:`wb + (1-w)a`."""
    a = jnp.asarray(base)
    dt = _compute_dtype(a)
    a, b = a.astype(dt), jnp.asarray(other).astype(dt)
    w = jnp.clip(t / jnp.maximum(jnp.abs(a - b), 1e-6), 0.0, 1.0)
    return w * b + (1 - w) * a


def passthrough(tensor: Array, *, scale: Array | float | None = None) -> Array:
    """mergekit ``passthrough``: the one input tensor, times ``scale`` when given."""
    x = jnp.asarray(tensor)
    x = x.astype(_compute_dtype(x))
    return x if scale is None else x * scale


@functools.partial(jax.jit, static_argnames=('filter_wise',))
def model_stock(
    tensors: Array | Sequence[Array], *, base: Array, filter_wise: bool = False
) -> Array:
    r"""mergekit ``model_stock`` (Jang et al., arXiv 2403.19522):
    :math:`t = k\cos\theta/(1+(k-1)\cos\theta)` from the mean pairwise cosine of the task vectors,
    result :math:`t\,\bar x + (1-t)\,x_0` (t = 0 where :math:`|1+(k-1)\cos\theta| < 10^{-6}`);
    ``filter_wise``: one t per vector along the last axis (1-D tensors: one). Reuses
    :func:`landscape.merge.model_stock` (``angle="cosine"``, the same definition)."""
    x = _stack(tensors)
    if x.shape[0] < 2:
        msg = f"model_stock needs at least 2 non-base models, got {x.shape[0]}"
        raise ValueError(msg)
    b = jnp.asarray(base).astype(x.dtype)
    return averaging.model_stock(
        {"w": x}, base={"w": b}, scope="row" if filter_wise else "leaf", angle="cosine", out_axis=None
    )["w"]


# --------------------------------------------------------------------------------------------
# Task-vector family (mergekit's generalised task arithmetic)


def _rank_desc(a: Array) -> Array:
    """0 = largest along the last axis, ties by lower index (stable)."""
    order = jnp.argsort(a, axis=-1, descending=True, stable=True)
    return jnp.argsort(order, axis=-1, stable=True)


def _rank_asc(a: Array) -> Array:
    order = jnp.argsort(a, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True)


def magnitude_mask(delta: Array, *, k: Array | int) -> Array:
    """Keep the ``k`` largest :math:`|\\delta|` of the whole tensor (mergekit ``magnitude``, with
    ``k = max(1, int(density * n))``); ties by lower flat index."""
    r = _rank_desc(jnp.abs(delta).reshape(-1))
    return (r < k).reshape(delta.shape)


def breadcrumbs_mask(delta: Array, *, n_bot: Array | int, target: Array | int) -> Array:
    """mergekit ``magnitude_outliers``: ascending :math:`|\\delta|` ranks in
    ``[n_bot, n_bot + target)`` over the whole tensor, with ``target = int(density n)``,
    ``n_top = int(gamma n)``, ``n_bot = max(0, n - target - n_top)``."""
    r = _rank_asc(jnp.abs(delta).reshape(-1))
    return ((r >= n_bot) & (r < n_bot + target)).reshape(delta.shape)


def della_keep_probabilities(delta: Array, *, density: Array | float, epsilon: Array | float) -> Array:
    r"""DELLA's MAGPRUNE keep probabilities as mergekit computes them: within each slice along
    dim 1 (a 1-D tensor is one row), ascending :math:`|\delta|` rank :math:`r \in 0..n-1`,

    .. math:: p = (\text{density} - \epsilon) + 2\epsilon\, r/(n-1)

    (a row of one entry gets ``density - epsilon``; mergekit would fail on it)."""
    x = delta[None] if delta.ndim < 2 else delta
    moved = jnp.moveaxis(jnp.abs(x), 1, -1)
    n = moved.shape[-1]
    r = _rank_asc(moved).astype(delta.dtype)
    rn = r / (n - 1) if n > 1 else jnp.zeros_like(r)
    p = (density - epsilon) + rn * 2 * epsilon
    return jnp.moveaxis(p, -1, 1).reshape(delta.shape)


def _rescale_l1(delta: Array, masked: Array) -> Array:
    before = jnp.sum(jnp.abs(delta))
    after = jnp.sum(jnp.abs(masked))
    ok = (before >= 1e-7) & (after >= 1e-7)
    return jnp.where(ok, masked * (before / jnp.where(ok, after, 1.0)), masked)


def sign_consensus(deltas: Array, *, method: str = "sum") -> Array:
    """mergekit ``get_mask``: the elected sign is + where ``sum(deltas) >= 0`` (``"sum"``, TIES)
    or ``sum(sign(deltas)) >= 0`` (``"count"``), else −; an entry agrees when its sign equals it
    (exact zeros never agree)."""
    s = jnp.sign(deltas)
    if method == "sum":
        major = jnp.where(jnp.sum(deltas, axis=0) >= 0, 1.0, -1.0)
    elif method == "count":
        major = jnp.where(jnp.sum(s, axis=0) >= 0, 1.0, -1.0)
    else:
        msg = f"consensus must be one of ['sum', 'count'], got {method!r}"
        raise ValueError(msg)
    return s == major[None].astype(s.dtype)


_SPARSIFY = ("none", "magnitude", "random", "magnitude_outliers", "della_magprune")


@functools.partial(jax.jit, static_argnames=("sparsification", "consensus", "normalize", "rescale"))
def _gta(
    key: Key,
    x: Array,
    base: Array,
    weight: Array,
    density: Array,
    counts: Array,
    epsilon: Array,
    lam: Array,
    masks: Array | None,
    *,
    sparsification: str,
    consensus: str | None,
    normalize: bool,
    rescale: bool,
) -> Array:
    m = x.shape[0]
    deltas = x - base[None]
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(m))

    def sparsify_one(d: Array, dens: Array, count: Array, eps: Array, k: Key, given: Array | None) -> Array:
        if sparsification == "magnitude":
            keep = magnitude_mask(d, k=count[0])
        elif sparsification == "magnitude_outliers":
            keep = breadcrumbs_mask(d, n_bot=count[1], target=count[0])
        elif sparsification == "random":
            keep = given if given is not None else jax.random.bernoulli(k, dens, d.shape)
        else:  # della_magprune
            p = della_keep_probabilities(d, density=dens, epsilon=eps)
            keep = given if given is not None else jax.random.uniform(k, d.shape) < p
        masked = jnp.where(keep, d, 0.0)
        if rescale:
            masked = _rescale_l1(d, masked)
        if sparsification != "magnitude_outliers":
            masked = jnp.where(dens <= 0, 0.0, masked)
        return jnp.where(dens >= 1, d, masked)

    if sparsification != "none":
        deltas = jax.vmap(sparsify_one)(deltas, density, counts, epsilon, keys, masks)
    w = _bcast(weight.astype(x.dtype), deltas)
    deltas = deltas * w
    if consensus is not None:
        mask = sign_consensus(deltas, method=consensus)
        mixed = jnp.sum(jnp.where(mask, deltas, 0.0), axis=0)
        divisor = jnp.sum(jnp.where(mask, w, 0.0), axis=0)
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    else:
        mixed = jnp.sum(deltas, axis=0)
        divisor = jnp.sum(weight.astype(x.dtype))
        divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1.0, divisor)
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def generalized_task_arithmetic(
    key: Key | None,
    tensors: Array | Sequence[Array],
    *,
    base: Array,
    weight: Array | Sequence[float],
    density: Sequence[float] | float = 1.0,
    sparsification: str = "none",
    consensus: str | None = None,
    normalize: bool = False,
    rescale: bool = False,
    lam: float = 1.0,
    gamma: Sequence[float] | float = 0.01,
    epsilon: Sequence[float] | float = 0.15,
    masks: Array | None = None,
) -> Array:
    r"""mergekit's generalised task arithmetic: the ``task_arithmetic``, ``ties``, ``dare_*``,
    ``breadcrumbs*`` and ``della*`` methods are this with fixed ``sparsification`` /
    ``consensus`` and their own defaults (:data:`METHODS`).

    For each non-base model i: :math:`\delta_i = x_i - x_0`, sparsified with density
    :math:`d_i` (``"magnitude"``: top :math:`\max(1,\lfloor d_i n\rfloor)` of :math:`|\delta_i|`;
    ``"random"``: Bernoulli(:math:`d_i`) keep mask, DARE; ``"magnitude_outliers"``: Breadcrumbs,
    :func:`breadcrumbs_mask`; ``"della_magprune"``: Bernoulli with
    :func:`della_keep_probabilities`), nothing dropped when :math:`d_i \ge 1` and everything when
    :math:`d_i \le 0`; with ``rescale`` the kept entries are scaled back to
    :math:`\|\delta_i\|_1` (mergekit; skipped when either L1 norm is below 1e-7). Then
    :math:`v_i = w_i\delta_i` (weights before the election, mergekit #474); with a ``consensus``
    (``"sum"`` for TIES, ``"count"``) only the entries agreeing with the elected sign
    (:func:`sign_consensus`) are summed and ``normalize`` divides by the agreeing weights (a zero
    divisor becomes 1); without, all are summed and ``normalize`` divides by :math:`\sum_i w_i`
    (1 when below 1e-8 in magnitude). Result :math:`x_0 + \lambda\,\mathrm{mixed}`.

    Args:
        key: typed PRNG key (per tensor; model i uses ``fold_in(key, i)``); needed for
            ``"random"`` / ``"della_magprune"`` unless ``masks`` is given.
        tensors: ``(m, *shape)`` non-base tensors.
        base: the base tensor.
        weight, density, gamma, epsilon: per non-base model (scalars broadcast).
        masks: optional ``(m, *shape)`` bool keep masks replacing the random draw.
    """
    x = _stack(tensors)
    m = x.shape[0]
    b = jnp.asarray(base).astype(x.dtype)
    if b.shape != x.shape[1:]:
        msg = f"base has shape {b.shape} but the models' tensors have shape {x.shape[1:]}"
        raise ValueError(msg)
    if sparsification not in _SPARSIFY:
        msg = f"sparsification must be one of {list(_SPARSIFY)}, got {sparsification!r}"
        raise ValueError(msg)
    if consensus not in (None, "sum", "count"):
        msg = f"consensus must be None, 'sum' or 'count', got {consensus!r}"
        raise ValueError(msg)

    def per_model(v: Any, name: str) -> list[float]:
        vals = [float(v)] * m if np.ndim(v) == 0 else [float(u) for u in v]
        if len(vals) != m:
            msg = f"{name} needs one value per non-base model ({m}), got {len(vals)}"
            raise ValueError(msg)
        return vals

    dens = per_model(density, "density")
    gam = per_model(gamma, "gamma")
    eps = per_model(epsilon, "epsilon")
    n = math.prod(x.shape[1:])
    counts = []
    for d, g in zip(dens, gam, strict=True):
        if sparsification == "magnitude_outliers":
            target = int(d * n)
            counts.append((target, max(0, n - target - int(g * n))))
        else:
            counts.append((max(1, int(d * n)), 0))
    if sparsification == "della_magprune":
        for d, e in zip(dens, eps, strict=True):
            if 0 < d < 1 and (d + e >= 1 or d - e <= 0):
                msg = f"della needs density ± epsilon in (0, 1), got density={d}, epsilon={e}"
                raise ValueError(msg)
    needs_key = sparsification in ("random", "della_magprune") and masks is None
    if needs_key and key is None:
        msg = f"{sparsification} sparsification needs a PRNG key (or explicit masks)"
        raise ValueError(msg)
    if masks is not None:
        masks = jnp.asarray(masks).astype(bool)
        if masks.size == x.size:  # e.g. mergekit's (1, n) masks of 1-D tensors
            masks = masks.reshape(x.shape)
        if masks.shape != x.shape:
            msg = f"masks have shape {masks.shape}, expected {x.shape}"
            raise ValueError(msg)
    w = jnp.asarray(per_model(weight, "weight"), x.dtype)
    return _gta(
        key if key is not None else jax.random.key(0),
        x,
        b,
        w,
        jnp.asarray(dens, x.dtype),
        jnp.asarray(counts, jnp.int32),
        jnp.asarray(eps, x.dtype),
        jnp.asarray(lam, x.dtype),
        masks,
        sparsification=sparsification,
        consensus=consensus,
        normalize=bool(normalize),
        rescale=bool(rescale),
    )


@functools.partial(jax.jit, static_argnames=('select_topk',))
def sce(
    tensors: Array | Sequence[Array],
    *,
    base: Array,
    select_topk: float = 1.0,
) -> Array:
    r"""mergekit ``sce`` (Select, Calculate, Erase; arXiv 2408.07990).

    Task vectors :math:`\delta_i = x_i - x_0`. **Select** (``select_topk`` < 1): keep the
    :math:`\lfloor \text{select\_topk}\cdot\#\{\mathrm{Var}_i\delta_i \ne 0\}\rfloor` entries of
    largest variance across models (none when that count is 0). **Calculate**: model weights
    :math:`\omega_i = \overline{\delta_i^2} / \sum_j \overline{\delta_j^2}` (uniform when the sum
    is below 1e-6). **Erase**: TIES sign consensus (``"sum"``). Result
    :math:`x_0 + \sum_i \omega_i m_i \delta_i / \max(\sum_i \omega_i m_i, 10^{-6})`.
    """
    x = _stack(tensors)
    b = jnp.asarray(base).astype(x.dtype)
    tv = x - b[None]
    m = tv.shape[0]
    if select_topk <= 0:
        tv = tv * 0.0
    elif select_topk < 1:
        var = jnp.var(tv, axis=0)
        k = jnp.floor(jnp.count_nonzero(var).astype(jnp.float32) * select_topk).astype(jnp.int32)
        keep = (_rank_desc(jnp.abs(var).reshape(-1)) < k).reshape(var.shape)
        tv = jnp.where(keep[None], tv, 0.0)
    erase = sign_consensus(tv, method="sum")
    ms = jnp.mean(tv.reshape(m, -1) ** 2, axis=1)
    total = jnp.sum(ms)
    omega = jnp.where(jnp.abs(total) < 1e-6, jnp.full((m,), 1.0 / m, x.dtype), ms / jnp.where(total == 0, 1.0, total))
    ew = jnp.where(erase, _bcast(omega, tv), 0.0)
    merged = jnp.sum(tv * ew, axis=0) / jnp.maximum(jnp.sum(ew, axis=0), 1e-6)
    return b + merged


# --------------------------------------------------------------------------------------------
# Registry: parameters, defaults, input contracts


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Marker default of a parameter the recipe must give."""


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One recipe parameter of a method.

    Attributes:
        name: the recipe key (``lambda``, ``weight``, ...).
        kind: ``float``, ``int`` or ``bool``.
        scope: ``"shared"`` (one value for the tensor), ``"input"`` (one per input model,
            base included) or ``"non_base"`` (one per non-base model).
        default: the value when the recipe gives none, :data:`REQUIRED`, or None (optional).
        help: one line for ``landscape merge --help``.
    """

    name: str
    kind: type
    scope: str
    default: Any
    help: str = ""


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A tensor-wise method: its parameters and input contract (mergekit 0.1.5's).

    Attributes:
        name: mergekit's method name.
        parameters: the recipe parameters it accepts.
        base: ``"required"``, ``"optional"`` or ``"ignored"`` (the base model, if any, is then
            just one more input).
        min_inputs, max_inputs: bounds on all inputs (base included); max None = unbounded.
        min_non_base, max_non_base: bounds on the non-base inputs.
        random: draws random masks (needs a seed).
        reference: paper or page.
    """

    name: str
    parameters: tuple[Parameter, ...]
    base: str = "required"
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int = 0
    max_non_base: int | None = None
    random: bool = False
    reference: str = ""

    def parameter(self, name: str) -> Parameter | None:
        """The parameter called ``name``, or None."""
        return next((p for p in self.parameters if p.name == name), None)


def _gta_spec(name: str, *, normalize: bool, rescale: bool, extra: tuple[Parameter, ...] = (), random: bool = False, ref: str = "") -> MethodSpec:
    params = (
        Parameter("weight", float, "non_base", REQUIRED, "scale of each task vector"),
        Parameter("density", float, "non_base", 1.0, "fraction of each task vector kept"),
        *extra,
        Parameter("lambda", float, "shared", 1.0, "scale of the merged task vector"),
        Parameter("normalize", bool, "shared", normalize, "divide by the (agreeing) weights"),
        Parameter("rescale", bool, "shared", rescale, "rescale kept entries to the L1 norm"),
        Parameter("int8_mask", bool, "shared", False, "int8 sign mask (memory only; same result)"),
    )
    return MethodSpec(name, params, base="required", random=random, reference=ref)


_GAMMA = Parameter("gamma", float, "non_base", 0.01, "fraction of largest entries removed")
_EPS = Parameter("epsilon", float, "non_base", 0.15, "spread of the keep probabilities")

_GTA = {
    "task_arithmetic": ("none", None),
    "ties": ("magnitude", "sum"),
    "dare_ties": ("random", "sum"),
    "dare_linear": ("random", None),
    "breadcrumbs": ("magnitude_outliers", None),
    "breadcrumbs_ties": ("magnitude_outliers", "sum"),
    "della": ("della_magprune", "sum"),
    "della_linear": ("della_magprune", None),
}

METHODS: Mapping[str, MethodSpec] = {
    "linear": MethodSpec(
        "linear",
        (
            Parameter("weight", float, "input", REQUIRED, "weight of each model"),
            Parameter("normalize", bool, "shared", True, "divide by the sum of weights"),
        ),
        base="ignored",
        reference="arXiv 2203.05482",
    ),
    "slerp": MethodSpec(
        "slerp",
        (Parameter("t", float, "shared", REQUIRED, "0 = base model, 1 = the other"),),
        base="required",
        min_inputs=2,
        max_inputs=2,
        reference="Shoemake 1985",
    ),
    "nuslerp": MethodSpec(
        "nuslerp",
        (
            Parameter("weight", float, "non_base", REQUIRED, "relative weight of each model"),
            Parameter("nuslerp_flatten", bool, "shared", True, "one vector per tensor"),
            Parameter("nuslerp_row_wise", bool, "shared", False, "vectors along dim 0, not the last"),
        ),
        base="optional",
        min_non_base=2,
        max_non_base=2,
    ),
    "multislerp": MethodSpec(
        "multislerp",
        (
            Parameter("weight", float, "non_base", REQUIRED, "weight of each model"),
            Parameter("normalize_weights", bool, "shared", True, "weights sum to 1"),
            Parameter("eps", float, "shared", 1e-8, "numerical floor"),
        ),
        base="optional",
        min_non_base=1,
    ),
    "karcher": MethodSpec(
        "karcher",
        (
            Parameter("max_iter", int, "shared", 10, "Riemannian mean iterations"),
            Parameter("tol", float, "shared", 1e-5, "convergence tolerance"),
        ),
        base="ignored",
        reference="Karcher 1977; mergekit (arXiv 2403.13257)",
    ),
    "task_arithmetic": _gta_spec("task_arithmetic", normalize=False, rescale=False, ref="arXiv 2212.04089"),
    "ties": _gta_spec("ties", normalize=True, rescale=False, ref="arXiv 2306.01708"),
    "dare_ties": _gta_spec("dare_ties", normalize=False, rescale=True, random=True, ref="arXiv 2311.03099"),
    "dare_linear": _gta_spec("dare_linear", normalize=False, rescale=True, random=True, ref="arXiv 2311.03099"),
    "breadcrumbs": _gta_spec("breadcrumbs", normalize=False, rescale=False, extra=(_GAMMA,), ref="arXiv 2312.06795"),
    "breadcrumbs_ties": _gta_spec("breadcrumbs_ties", normalize=False, rescale=False, extra=(_GAMMA,), ref="arXiv 2312.06795"),
    "della": _gta_spec("della", normalize=True, rescale=True, extra=(_EPS,), random=True, ref="arXiv 2406.11617"),
    "della_linear": _gta_spec("della_linear", normalize=False, rescale=True, extra=(_EPS,), random=True, ref="arXiv 2406.11617"),
    "sce": MethodSpec(
        "sce",
        (
            Parameter("select_topk", float, "shared", 1.0, "fraction of highest-variance entries kept"),
            Parameter("int8_mask", bool, "shared", False, "int8 sign mask (memory only; same result)"),
        ),
        base="required",
        reference="arXiv 2408.07990",
    ),
    "model_stock": MethodSpec(
        "model_stock",
        (Parameter("filter_wise", bool, "shared", False, "one ratio per row (last axis)"),),
        base="required",
        min_inputs=3,
        reference="arXiv 2403.19522",
    ),
    "nearswap": MethodSpec(
        "nearswap",
        (Parameter("t", float, "shared", REQUIRED, "similarity threshold"),),
        base="required",
        min_inputs=2,
        max_inputs=2,
    ),
    "passthrough": MethodSpec(
        "passthrough",
        (Parameter("scale", float, "input", None, "multiply the tensor (optional)"),),
        base="ignored",
        max_inputs=1,
    ),
}
"""Every tensor-wise method by mergekit name."""


def apply(
    name: str,
    key: Key | None,
    tensors: Sequence[Array],
    *,
    base_index: int | None,
    shared: Mapping[str, Any],
    per_input: Sequence[Mapping[str, Any]],
    masks: Array | None = None,
) -> Array:
    """Run method ``name`` on one tensor group.

    Args:
        name: a key of :data:`METHODS`.
        key: per-tensor PRNG key (random methods), e.g. :func:`tensor_key`.
        tensors: one array per input model, in recipe order.
        base_index: position of the base model in ``tensors`` (None without one; ignored by
            methods whose ``base`` is ``"ignored"``).
        shared: resolved shared parameters (defaults filled in).
        per_input: resolved per-input parameters, one mapping per entry of ``tensors`` (the
            base's holds only ``"input"``-scope ones).
        masks: explicit keep masks for DARE / DELLA, ``(non_base, *shape)``.

    Returns:
        The merged tensor in float32 (float64 for float64 inputs under x64).
    """
    if name not in METHODS:
        msg = f"unknown merge method {name!r}; accepted: {sorted(METHODS)}"
        raise ValueError(msg)
    spec = METHODS[name]
    if spec.base == "ignored":
        base_index = None
    others = [i for i in range(len(tensors)) if i != base_index]
    base = None if base_index is None else tensors[base_index]

    def nb(pname: str) -> list[Any]:
        return [per_input[i][pname] for i in others]

    if name == "linear":
        return linear(list(tensors), weight=jnp.asarray(nb("weight"), jnp.float32), normalize=shared["normalize"])
    if name == "slerp":
        return slerp(base, tensors[others[0]], t=shared["t"])
    if name == "nearswap":
        return nearswap(base, tensors[others[0]], t=shared["t"])
    if name == "passthrough":
        return passthrough(tensors[0], scale=per_input[0].get("scale"))
    if name == "karcher":
        return karcher(list(tensors), max_iter=int(shared["max_iter"]), tol=float(shared["tol"]))
    xs = [tensors[i] for i in others]
    if name == "nuslerp":
        return nuslerp(
            xs,
            weight=jnp.asarray(nb("weight"), jnp.float32),
            base=base,
            flatten=shared["nuslerp_flatten"],
            row_wise=shared["nuslerp_row_wise"],
        )
    if name == "multislerp":
        return multislerp(
            xs,
            weight=jnp.asarray(nb("weight"), jnp.float32),
            base=base,
            normalize_weights=shared["normalize_weights"],
            eps=float(shared["eps"]),
        )
    if not xs:
        b = jnp.asarray(base)
        return b.astype(_compute_dtype(b))
    if name == "model_stock":
        return model_stock(xs, base=base, filter_wise=shared["filter_wise"])
    if name == "sce":
        return sce(xs, base=base, select_topk=float(shared["select_topk"]))
    sparsification, consensus = _GTA[name]
    return generalized_task_arithmetic(
        key,
        xs,
        base=base,
        weight=nb("weight"),
        density=nb("density"),
        gamma=nb("gamma") if spec.parameter("gamma") else 0.0,
        epsilon=nb("epsilon") if spec.parameter("epsilon") else 0.0,
        sparsification=sparsification,
        consensus=consensus,
        normalize=shared["normalize"],
        rescale=shared["rescale"],
        lam=float(shared["lambda"]),
        masks=masks,
    )


def _describe() -> str:
    lines = []
    for spec in METHODS.values():
        base = {"required": "base model required", "optional": "base model optional", "ignored": "no base model"}[spec.base]
        lines.append(f"  {spec.name}  ({base}{', random: uses the seed' if spec.random else ''})")
        for p in spec.parameters:
            d = "required" if p.default is REQUIRED else ("unset" if p.default is None else repr(p.default))
            scope = {"shared": "", "input": ", per model", "non_base": ", per model"}[p.scope]
            lines.append(f"      {p.name} ({p.kind.__name__}{scope}; default {d}): {p.help}")
    return "\n".join(lines)


describe: Callable[[], str] = _describe
"""Text listing every method and its parameters (for ``landscape merge --help``)."""

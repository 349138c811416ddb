"""REPAIR and RESET: undo the variance collapse of interpolated networks.

Jordan, Sedghi, Saukh, Entezari & Neyshabur 2022, *REPAIR: REnormalizing Permuted Activations for
Interpolation Repair* (arXiv:2211.08403). Interpolating two aligned networks shrinks the spread
of every hidden unit's pre-activation layer after layer ("variance collapse"), which accounts for
much of the barrier that remains after alignment. REPAIR restores, for every unit ``j`` of the
merged model at ``t``, the statistics the interpolation *should* have,

.. math::  μ^\\star_j = (1 - t)\\, μ^A_j + t\\, μ^B_j, \\qquad
           σ^\\star_j = (1 - t)\\, σ^A_j + t\\, σ^B_j

(standard deviations interpolated, not variances, as in the reference notebooks), by the affine
map :math:`z' = s_j (z - μ^M_j) + μ^\\star_j` with :math:`s_j = σ^\\star_j / \\sqrt{(σ^M_j)^2 + ε}`.
The map is folded into the layer that produces the pre-activation, so the result is an ordinary
params pytree with the same structure (the reference's ``fuse_conv_bn`` step):

* a dense / conv layer ``z = h W + b`` (no norm after it, e.g. the zoo MLP): the output columns
  of the kernel and the bias, :math:`W'_{\\cdot j} = s_j W_{\\cdot j}`,
  :math:`b'_j = s_j (b_j - μ^M_j) + μ^\\star_j`;
* a layer followed by a norm (the zoo CNN / ResNet with LayerNorm or BatchNorm, where the tapped
  pre-activation is the norm's output ``z = γ n + β``): the norm's scale and shift,
  :math:`γ'_j = s_j γ_j`, :math:`β'_j = s_j (β_j - μ^M_j) + μ^\\star_j` — the conv is left alone
  (a per-channel scale of a conv feeding a LayerNorm would change what the norm computes).

:func:`repair_layers` finds these layers from the permutation spec; a residual stream (one
permutation written by several layers plus identity skips) has no single layer to fold into and
is rejected by name (pass ``layers=`` without it), unless ``shared="layers"``: then the stream is
corrected at every normalisation point that writes it — each LayerNorm / BatchNorm on it, keyed by
the norm's path (``"blocks/0/ln1"``), measured at that norm's output
(:func:`landscape.align.trace.layer_outputs`) — which is what Jordan et al. do for ResNets (every
BatchNorm) and what "REPAIR with LayerNorm statistics" means on a transformer (every LayerNorm of
the residual stream; attention queries and keys, which have two producers and no norm, are
corrected at each projection's output). A scale-only RMSNorm cannot take a shift and is skipped. The statistics are exact: population mean and
standard deviation over every example (and spatial position) of the dataset, accumulated with
:meth:`~landscape.Objective.map_batches` with padded rows masked. Layers are corrected in forward
order and the merged model's statistics of each layer are recomputed after correcting the earlier
ones (the reference recomputes them in one train-mode pass through its inserted BatchNorms, which
is the same sequential dependence).

RESET (same paper; for networks that already have BatchNorm) only recomputes the BatchNorm
running statistics of the interpolated network on the data: :func:`reset`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from landscape import Objective, align, models, tree
    >>> apply_fn, a, _ = models.functional(models.MLP(4, (8, 3), rngs=nnx.Rngs(0)))
    >>> _, b, _ = models.functional(models.MLP(4, (8, 3), rngs=nnx.Rngs(1)))
    >>> x = jax.random.normal(jax.random.key(2), (100, 4))
    >>> repaired = align.repair(x, apply_fn, a, b, tree.lerp(a, b, 0.5), t=0.5)
    >>> sorted(repaired["layers"]["0"])
    ['bias', 'kernel']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landscape import tree
from landscape._types import Array, Params
from landscape.align.activation_matching import _rows, intermediates_fn
from landscape.align.spec import PermutationSpec, check_spec
from landscape.align.trace import LayerOutputs, trace_spec, with_activations
from landscape.objective import Objective

__all__ = ["repair", "repair_layers", "reset", "unit_statistics"]

_NORM_LEAVES = frozenset({"scale", "bias"})


def _as_objective(objective_or_x: Any, apply_fn: Any, batch_size: int) -> Objective:
    if isinstance(objective_or_x, Objective):
        return objective_or_x.replace(apply_fn=apply_fn)
    x = jnp.asarray(objective_or_x)
    if x.ndim < 1 or x.shape[0] == 0:
        msg = f"data must be an Objective or an array of inputs (N, ...), got shape {x.shape}"
        raise ValueError(msg)
    return Objective(apply_fn, x, jnp.zeros(x.shape[0], jnp.int32), batch_size=batch_size)


def _unit_moments(
    objective: Objective, params: Params, names: tuple[str, ...], kind: str
) -> dict[str, tuple[Array, Array]]:
    apply_fn = objective.apply_fn

    def first(xb: Array, yb: Array, mask: Array) -> dict[str, Any]:
        acts = apply_fn.intermediates(params, xb, kind=kind)
        out = {}
        for n in names:
            z, w = _rows(acts[n], mask)
            out[n] = (jnp.sum(w), w @ z)
        return out

    sums = objective.map_batches(first)
    means = {n: s / c for n, (c, s) in sums.items()}

    def second(xb: Array, yb: Array, mask: Array) -> dict[str, Array]:
        acts = apply_fn.intermediates(params, xb, kind=kind)
        out = {}
        for n in names:
            z, w = _rows(acts[n], mask)
            out[n] = w @ (z - means[n]) ** 2
        return out

    sq = objective.map_batches(second)
    return {n: (means[n], jnp.sqrt(sq[n] / sums[n][0])) for n in names}


_unit_moments_jit = jax.jit(_unit_moments, static_argnames=("names", "kind"))


def _tapped(apply_fn: Any, params: Params, x: Array, kind: str) -> dict[str, Any]:
    return jax.eval_shape(lambda p, xb: apply_fn.intermediates(p, xb, kind=kind), params, x[:1])


def unit_statistics(
    objective_or_x: Any,
    apply_fn: Any,
    params: Params,
    *,
    kind: str = "pre",
    names: Sequence[str] | None = None,
    batch_size: int = 512,
) -> dict[str, tuple[Array, Array]]:
    """Exact per-unit mean and standard deviation of every tapped unit group over the dataset.

    Args:
        objective_or_x: an :class:`~landscape.Objective` (its inputs and batch size are used) or
            an input array ``(N, ...)``.
        apply_fn: the model: a zoo ``FunctionalModel``'s ``intermediates`` are used, any other
            ``apply_fn(params, x)`` is traced (:func:`landscape.align.activations`, groups named
            as by :func:`landscape.align.trace_spec`).
        params: the model's params.
        kind: ``"pre"`` (default) or ``"post"`` activations.
        names: the unit groups (permutation names) to measure; default every tapped group.
        batch_size: batch size when an array is given.

    Returns:
        ``{name: (mean, std)}``, population moments (1/N) over every example and spatial position.
    """
    intermediates_fn(apply_fn, "unit_statistics")
    apply_fn = with_activations(apply_fn)
    if kind not in ("pre", "post"):
        msg = f"unknown activation kind {kind!r}; accepted: ['pre', 'post']"
        raise ValueError(msg)
    objective = _as_objective(objective_or_x, apply_fn, batch_size)
    tapped = _tapped(apply_fn, params, objective.x, kind)
    names = tuple(tapped) if names is None else tuple(names)
    missing = [n for n in names if n not in tapped]
    if missing:
        msg = f"unit groups {missing} are not tapped by apply_fn.intermediates; it taps {sorted(tapped)}"
        raise ValueError(msg)
    return _unit_moments_jit(objective, params, names, kind)


_SHARED = ("error", "layers")


def repair_layers(
    spec: PermutationSpec, params: Params, *, names: Sequence[str] | None = None, shared: str = "error"
) -> dict[str, tuple[str, str]]:
    """For each unit group, the ``(scale leaf, shift leaf)`` that produce its pre-activation.

    Read off the spec: the producers of group ``p`` are the leaves whose *last* axis carries
    ``p`` (output units), grouped by parent path. If exactly one group is a norm layer (its leaves
    are a 1-D ``scale`` and ``bias``), the correction goes there (the tapped pre-activation is the
    norm's output); otherwise there must be exactly one producing layer, with a 1-D ``bias`` leaf
    and one other leaf (its kernel), e.g. ``("layers/0/kernel", "layers/0/bias")``.

    Args:
        spec: the permutation spec (checked against ``params``).
        params: the params (only shapes are read).
        names: the groups to resolve; default all of ``spec.names``.
        shared: what to do with a group that has no single producer (a residual stream, the
            queries and keys of attention): ``"error"`` (default) raises; ``"layers"`` corrects
            each of its normalisation points instead — one entry per norm layer writing the group
            (LayerNorm / BatchNorm with ``scale`` and ``bias``: every LayerNorm of a transformer's
            residual stream, every norm of a ResNet stage), keyed by the norm's parent path (e.g.
            ``"blocks/0/ln1"``), or, when the group has no norm (queries and keys), one entry per
            producing dense layer with a 1-D bias (``"blocks/0/attn/query"``). Producers without
            a shift (embeddings, a scale-only RMSNorm) are left alone. Such entries are measured at
            the layer's output (:func:`landscape.align.trace.layer_outputs`).

    Raises:
        ValueError: naming the group and its producing leaves when it has no unique producer
            (e.g. a ResNet residual stream ``P_stage0``, written by several layers and identity
            skips, or a layer without a bias).
    """
    if shared not in _SHARED:
        msg = f"unknown shared={shared!r}; accepted: {list(_SHARED)}"
        raise ValueError(msg)
    check_spec(spec, params)
    leaves = dict(tree.named_leaves(params))
    names = spec.names if names is None else tuple(names)
    unknown = [n for n in names if n not in spec.names]
    if unknown:
        msg = f"unknown unit groups {unknown}; the spec has {list(spec.names)}"
        raise ValueError(msg)
    out: dict[str, tuple[str, str]] = {}
    for n in names:
        groups: dict[str, dict[str, str]] = {}
        for path, axes in spec.axes.items():
            if axes and axes[-1] == n and axes.count(n) == 1:
                parent, _, leaf = path.rpartition("/")
                groups.setdefault(parent, {})[leaf] = path
        norms = [
            g for g in groups.values() if set(g) == _NORM_LEAVES and all(jnp.ndim(leaves[p]) == 1 for p in g.values())
        ]
        plain = [g for g in groups.values() if g not in norms]
        if len(norms) == 1:
            out[n] = (norms[0]["scale"], norms[0]["bias"])
            continue
        if not norms and len(plain) == 1 and "bias" in plain[0] and len(plain[0]) == 2:
            g = plain[0]
            weight = next(p for k, p in g.items() if k != "bias")
            if jnp.ndim(leaves[g["bias"]]) == 1:
                out[n] = (weight, g["bias"])
                continue
        if shared == "layers":
            chosen = norms or [g for g in plain if "bias" in g and len(g) == 2 and jnp.ndim(leaves[g["bias"]]) == 1]
            for g in chosen:
                scale = g["scale"] if g in norms else next(p for k, p in g.items() if k != "bias")
                out[g["bias"].rpartition("/")[0]] = (scale, g["bias"])
            if chosen:
                continue
        producers = sorted(p for g in groups.values() for p in g.values())
        msg = (
            f"unit group {n!r} has no single layer to fold a REPAIR correction into: its output "
            f"units are written by {producers} (a residual stream, several norms, or a layer "
            f"without a 1-D bias); pass layers= with the groups to correct, e.g. "
            f"repair_layers(spec, params, names=[...]) without {n!r}"
        )
        raise ValueError(msg)
    return out


def layer_taps(
    apply_fn: Any, spec: PermutationSpec | None, layers: Mapping[str, tuple[str, str]], *, params: Params | None = None, x: Any = None
) -> Any:
    """The model whose ``intermediates(kind="pre")`` measure every entry of ``layers``.

    When every key is a group of ``spec`` this is :func:`landscape.align.with_activations` (the
    zoo's taps or the traced groups); when some key is a layer (``repair_layers(...,
    shared="layers")``, e.g. a transformer's LayerNorms) it is a
    :class:`~landscape.align.trace.LayerOutputs` over the trace, in forward order.
    """
    spec = spec if isinstance(spec, PermutationSpec) else None
    names = set(spec.names) if spec is not None else set(getattr(getattr(apply_fn, "spec", None), "names", ()))
    if all(k in names for k in layers):
        return with_activations(apply_fn, spec, params=params, x=x)
    base = getattr(apply_fn, "apply_fn", apply_fn) if isinstance(apply_fn, LayerOutputs) else apply_fn
    return LayerOutputs(base, tuple(sorted((k, tuple(v)) for k, v in layers.items())), spec)


def check_layers(layers: Mapping[str, tuple[str, str]], params: Params) -> None:
    """Every ``(scale leaf, shift leaf)`` of ``layers`` must name a leaf of ``params`` (ValueError otherwise)."""
    leaves = dict(tree.named_leaves(params))
    for n, pair in layers.items():
        for p in pair:
            if p not in leaves:
                msg = f"layers[{n!r}] names {p!r}, which is not a params leaf; leaves: {sorted(leaves)}"
                raise ValueError(msg)


def fold_affine(params: Params, scale_path: str, bias_path: str, s: np.ndarray, c: np.ndarray) -> Params:
    """Fold the per-unit affine map ``z -> s z + c`` of a layer's output into its parameters:
    the leaf at ``scale_path`` (kernel columns or norm scale) is multiplied by ``s`` and the leaf at
    ``bias_path`` becomes ``s · bias + c``. Shared by REPAIR and TACT."""

    def one(path: Any, x: Array) -> Array:
        name = tree.key_name(path)
        if name == scale_path:
            return (x * jnp.asarray(s, x.dtype)).astype(x.dtype)
        if name == bias_path:
            return (x * jnp.asarray(s, x.dtype) + jnp.asarray(c, x.dtype)).astype(x.dtype)
        return x

    return jax.tree.map_with_path(one, params)


def repair(
    objective_or_x: Any,
    apply_fn: Any,
    a: Params,
    b: Params,
    merged: Params,
    *,
    t: float = 0.5,
    spec: PermutationSpec | None = None,
    layers: Mapping[str, tuple[str, str]] | None = None,
    eps: float = 0.0,
    batch_size: int = 512,
    shared: str = "error",
) -> Params:
    """REPAIR ``merged`` (the model at ``t`` between ``a`` and aligned ``b``): renormalise every unit.

    Jordan et al. 2022 (arXiv:2211.08403); see the module docstring for the statistics and where
    the correction is folded.

    Args:
        objective_or_x: the data the statistics are taken on: an :class:`~landscape.Objective`
            (its inputs and batch size) or an input array ``(N, ...)`` (typically the training set).
        apply_fn: the model: a zoo ``FunctionalModel`` (its ``intermediates``) or any
            ``apply_fn(params, x)``, whose activations are traced (:func:`landscape.align.activations`).
        a: params of endpoint A.
        b: params of endpoint B, already aligned to A.
        merged: params of the model to repair, usually ``tree.lerp(a, b, t)``.
        t: the interpolation weight of B in the targets ``(1−t)·A + t·B``.
        spec: the permutation spec used to find the producing layers; default ``apply_fn.spec``,
            else :func:`landscape.align.trace_spec` of ``apply_fn``.
        layers: ``{group: (scale leaf, shift leaf)}`` to correct, overriding :func:`repair_layers`.
        eps: added to the merged model's variance, :math:`s = σ^\\star / \\sqrt{σ_M^2 + ε}`
            (0 by default so the endpoints are fixed points; a unit with zero variance only has
            its mean shifted).
        batch_size: batch size when an array is given.
        shared: for the default layers (:func:`repair_layers`): ``"layers"`` corrects a group
            without a single producer — a residual stream (ResNet stage, transformer) or attention
            queries / keys — at each of its normalisation points (every norm writing it, measured at
            the norm's output) or producing projections; ``"error"`` (default) rejects it.

    Returns:
        The repaired params, same structure, shapes and dtypes as ``merged``.

    Raises:
        ValueError: before any work, for mismatched params, a spec that does not fit them (naming
            the path), a group without a unique producing layer, or a bad ``t`` / ``eps``.
    """
    fn = intermediates_fn(apply_fn, "repair")
    del fn
    tree.check_match(a, b, names=("a", "b"))
    tree.check_match(a, merged, names=("a", "merged"))
    if isinstance(t, bool) or not isinstance(t, (int, float, np.floating)) or not np.isfinite(t):
        msg = f"t must be a finite real number (the weight of b, usually in [0, 1]), got {t!r}"
        raise ValueError(msg)
    if not eps >= 0:
        msg = f"eps must be >= 0, got {eps!r}"
        raise ValueError(msg)
    if spec is None:
        spec = getattr(apply_fn, "spec", None)
    objective = _as_objective(objective_or_x, apply_fn, batch_size)
    if spec is None and layers is None:
        spec = trace_spec(apply_fn, merged, objective.x[:1])
    if layers is None:
        if not isinstance(spec, PermutationSpec):
            msg = "repair needs spec= (or an apply_fn with a .spec, or layers=) to find the layers to correct"
            raise ValueError(msg)
        layers = repair_layers(spec, merged, shared=shared)
    else:
        check_layers(layers, merged)
    apply_fn = layer_taps(apply_fn, spec, layers, params=merged, x=objective.x[:1])
    objective = objective.replace(apply_fn=apply_fn)
    tapped = _tapped(apply_fn, merged, objective.x, "pre")
    for n, (scale_path, bias_path) in layers.items():
        if n not in tapped:
            msg = f"unit group {n!r} is not tapped by apply_fn.intermediates; it taps {sorted(tapped)}"
            raise ValueError(msg)
        width = tapped[n].shape[-1]
        leaves = dict(tree.named_leaves(merged))
        for p in (scale_path, bias_path):
            if jnp.shape(leaves[p])[-1] != width:
                msg = f"leaf {p!r} has shape {jnp.shape(leaves[p])} but group {n!r} has {width} units (last axis)"
                raise ValueError(msg)
    order = tuple(n for n in tapped if n in layers)
    if isinstance(apply_fn, LayerOutputs):
        order = apply_fn.order(merged, objective.x[:1])

    stats_a = _unit_moments_jit(objective, a, order, "pre")
    stats_b = _unit_moments_jit(objective, b, order, "pre")
    out = merged
    for n in order:
        # all groups in every pass: one compilation serves every layer (only group n is used)
        mu_m, sd_m = (np.asarray(v, np.float64) for v in _unit_moments_jit(objective, out, order, "pre")[n])
        mu_a, sd_a = (np.asarray(v, np.float64) for v in stats_a[n])
        mu_b, sd_b = (np.asarray(v, np.float64) for v in stats_b[n])
        mu_t = (1 - t) * mu_a + t * mu_b
        sd_t = (1 - t) * sd_a + t * sd_b
        denom = np.sqrt(sd_m**2 + eps)
        s = np.where(denom > 0, sd_t / np.where(denom > 0, denom, 1.0), 1.0)
        c = mu_t - s * mu_m
        scale_path, bias_path = layers[n]
        out = fold_affine(out, scale_path, bias_path, s, c)
    return out


def reset(apply_fn: Any, params: Params, state: Params, x: Any, *, batch_size: int = 512) -> Params:
    """RESET: recompute every BatchNorm running statistic of ``params`` on the data.

    Jordan et al. 2022 (arXiv:2211.08403), Sec. 3; the same as Garipov et al.'s ``update_bn`` and
    PyTorch's ``momentum=None`` cumulative average. The data are cut into ``ceil(N / batch_size)``
    batches (the last one smaller, never padded); each runs ``apply_fn.apply_train`` (train mode:
    every BatchNorm normalises with its batch statistics, earlier layers included) and yields its
    batch mean and (biased) variance per BatchNorm; the new running statistics are their exact
    average weighted by batch size,

    .. math::  \\hat μ = \\sum_k \\frac{n_k}{N} μ_k, \\qquad \\hat v = \\sum_k \\frac{n_k}{N} v_k,

    with no momentum smoothing. With ``batch_size >= N`` they are the population mean and variance
    of every BatchNorm's input.

    The batch statistics are read through the model's own running-average update
    ``r ← m r + (1 − m) s``: a train step from ``r = 0`` returns ``(1 − m) s``, and one from
    ``r = 1`` gives ``m`` (per entry, so every layer may have its own momentum).

    Args:
        apply_fn: a model with ``apply_train(params, state, x) -> (logits, new_state)`` (a zoo
            ``FunctionalModel``).
        params: the (interpolated / merged) params.
        state: its BatchNorm state (only its structure is used; ``{}`` returns ``{}``).
        x: inputs ``(N, ...)`` or an :class:`~landscape.Objective` (its inputs).
        batch_size: examples per train-mode pass.

    Returns:
        The new state, same structure as ``state``.
    """
    train = getattr(apply_fn, "apply_train", None)
    if not callable(train):
        msg = f"reset needs apply_fn.apply_train(params, state, x) (a zoo FunctionalModel), got {type(apply_fn).__name__}"
        raise ValueError(msg)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        msg = f"batch_size must be a positive int, got {batch_size!r}"
        raise ValueError(msg)
    x = x.x if isinstance(x, Objective) else jnp.asarray(x)
    if x.ndim < 1 or x.shape[0] == 0:
        msg = f"reset needs inputs (N, ...) with N > 0, got shape {x.shape}"
        raise ValueError(msg)
    if not jax.tree.leaves(state):
        return state
    n = int(x.shape[0])
    bs = min(batch_size, n)
    full, rest = divmod(n, bs)
    zeros = jax.tree.map(jnp.zeros_like, state)
    ones = jax.tree.map(jnp.ones_like, state)

    @jax.jit
    def scaled(xb: Array) -> Params:
        """``(1 − m) · s`` for the batch ``xb``, times the batch size."""
        return jax.tree.map(lambda v: v * xb.shape[0], train(params, zeros, xb)[1])

    step = jax.jit(lambda s, xb: train(params, s, xb)[1])
    new0, new1 = step(zeros, x[:bs]), step(ones, x[:bs])
    keep = jax.tree.map(lambda u, v: v - u, new0, new1)  # the momentum m, per entry
    for path, m in jax.tree.leaves_with_path(keep):
        m = np.asarray(m)
        if not np.all((m >= 0) & (m < 1 - 1e-6)):
            msg = (
                f"state leaf {tree.key_name(path)!r} is not updated as r <- m r + (1 - m) s with "
                f"0 <= m < 1 in train mode (found m in [{m.min()}, {m.max()}]); reset handles BatchNorm statistics"
            )
            raise ValueError(msg)

    xs = x[: full * bs].reshape((full, bs) + x.shape[1:])

    def body(acc: Params, xb: Array) -> tuple[Params, None]:
        return jax.tree.map(jnp.add, acc, scaled(xb)), None

    total, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, state), xs)
    if rest:
        total = jax.tree.map(jnp.add, total, scaled(x[full * bs :]))
    return jax.tree.map(lambda tot, m, s: (tot / (n * (1 - m))).astype(s.dtype), total, keep, state)

"""Activation matching: pair up hidden units that respond alike on the data.

For every permutation name ``p`` (a group of hidden units), collect the units' activations of
model A and model B on the whole dataset and solve one linear assignment that maximises the
summed similarity of matched units, layer by layer and independently. B's activations are those
of B's own weights: each layer's matching needs only the *set* of B's units, which a permutation
of earlier layers does not change (Tatro et al. 2020; Ainsworth et al. 2022, Sec. 3.1).

Two similarities, both from exact full-dataset statistics (two passes of
:meth:`~landscape.Objective.map_batches`: means first, then centred products; padded rows
masked):

* ``method="correlation"`` — Tatro, Chen, Das, Melnyk, Sattigeri & Lai 2020, *Optimizing Mode
  Connectivity via Neuron Alignment* (arXiv:2009.02439): the cross-correlation of z-scored
  post-activations,

  .. math::  \\rho_{ij} = \\frac{E[(a^A_i - μ^A_i)(a^B_j - μ^B_j)]}{(σ^A_i + ε)(σ^B_j + ε)},

  with ``ε = 1e-5``; the Hungarian solution on ρ (Tatro et al. minimise ``1.01 − ρ``, the same
  assignment). Jordan et al. (REPAIR, arXiv:2211.08403) use the same Pearson matching.
* ``method="second_moment"`` — Ainsworth et al. 2022 (arXiv:2209.04836), Eq. (1): the raw
  second moment :math:`E[a^A (a^B)^\\top]`, i.e. minimising :math:`E\\lVert a^A - P a^B\\rVert^2`.

For convolutional units every spatial position counts as a sample (statistics over N·H·W, as
in the REPAIR code). Activations come from ``apply_fn.intermediates(params, x, kind=kind)``,
a zoo model's tap of every unit group, or, for any other ``apply_fn`` (plain JAX, Linen, NNX,
Equinox), from :func:`landscape.align.activations` on its trace, keyed by the spec's names;
``kind="post"`` (default, what both papers match) or
``"pre"``. For a residual stream (one permutation shared by a ResNet stage) the zoo's tap is the
stage's last residual output.

**Attention heads** (a spec with ``blocks``): each layer's blockwise groups are matched together
with one head permutation, as in weight matching (:func:`~landscape.align.weight_matching.blockwise_assignment`
on the similarity matrices: a head pair scores the best within-head matching of its units, summed
over the layer's groups; Verma & Elbayad 2024, arXiv:2403.00986). The statistics of queries and
keys pool the query and key projections' outputs (every token of both counts as a sample); those of
values / output projection are the concatenated heads the output projection reads.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from landscape import Objective, align, models
    >>> apply_fn, a, _ = models.functional(models.MLP(4, (16, 3), rngs=nnx.Rngs(0)))
    >>> x = jax.random.normal(jax.random.key(1), (200, 4)); y = jnp.zeros(200, jnp.int32)
    >>> planted = align.random_permutation(jax.random.key(2), apply_fn.spec, a)
    >>> b = align.apply(apply_fn.spec, planted, a)
    >>> perm, info = align.activation_matching(apply_fn.spec, a, b, Objective(apply_fn, x, y))
    >>> bool((perm["P_0"] == align.invert(planted)["P_0"]).all())
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from landscape._types import Array, Params
from landscape.align.spec import Permutation, PermutationSpec
from landscape.align.weight_matching import _coordinates, blockwise_assignment, check_inputs
from landscape.objective import Objective

__all__ = ["ACTIVATION_METHODS", "ActivationMatchingInfo", "activation_matching", "cross_statistics"]

ACTIVATION_METHODS = ("correlation", "second_moment")
"""Accepted ``method`` values of :func:`activation_matching`."""

_KINDS = ("post", "pre")


@dataclasses.dataclass(frozen=True)
class ActivationMatchingInfo:
    """Per unit group (permutation name): how well the matched units agree.

    Attributes:
        method: ``"correlation"`` or ``"second_moment"``.
        kind: which activations were matched (``"post"`` or ``"pre"``).
        correlation: mean Pearson correlation of matched unit pairs (A's unit ``i`` with B's
            unit ``perm[i]``), per name.
        correlation_before: the same for the identity pairing (unaligned), per name.
        objective: the maximised sum of the chosen similarity over matched pairs, per name.
        iterations: 1 (one assignment per name, no iteration).
    """

    method: str
    kind: str
    correlation: dict[str, float]
    correlation_before: dict[str, float]
    objective: dict[str, float]
    iterations: int = 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of all fields."""
        return dataclasses.asdict(self)

    def plot(self, *, title: str | None = None) -> Any:
        """Plotly bar chart of the mean matched correlation per unit group, before and after."""
        import plotly.graph_objects as go

        names = list(self.correlation)
        fig = go.Figure(
            [
                go.Bar(x=names, y=[self.correlation_before[n] for n in names], name="identity"),
                go.Bar(x=names, y=[self.correlation[n] for n in names], name="matched"),
            ]
        )
        fig.update_layout(
            title=title or f"Activation matching ({self.method}): mean correlation of matched units",
            xaxis_title="unit group",
            yaxis_title="mean correlation",
            barmode="group",
        )
        return fig


def _rows(z: Array, mask: Array) -> tuple[Array, Array]:
    """``(N, ..., units) -> (N·…, units)`` and the per-row weight (0 for padded examples)."""
    n = z.shape[-1]
    w = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (z.ndim - 2)), z.shape[:-1])
    return z.reshape(-1, n), w.reshape(-1).astype(z.dtype)


def intermediates_fn(apply_fn: Any, what: str) -> Callable[..., dict[str, Array]]:
    """``apply_fn.intermediates``: the zoo's taps, or :func:`landscape.align.activations` traced from any ``apply_fn``."""
    from landscape.align.trace import with_activations

    if callable(apply_fn):
        apply_fn = with_activations(apply_fn)
    fn = getattr(apply_fn, "intermediates", None)
    if not callable(fn):
        msg = (
            f"{what} needs apply_fn.intermediates(params, x, kind=...) (a landscape.models "
            f"FunctionalModel of a zoo model); got {type(apply_fn).__name__}"
        )
        raise ValueError(msg)
    return fn


def _cross_statistics(
    objective: Objective, a: Params, b: Params, names: tuple[str, ...], apply_fn: Any, kind: str
) -> dict[str, dict[str, Array]]:
    def acts(xb: Array) -> tuple[dict[str, Array], dict[str, Array]]:
        return (
            apply_fn.intermediates(a, xb, kind=kind),
            apply_fn.intermediates(b, xb, kind=kind),
        )

    def first(xb: Array, yb: Array, mask: Array) -> dict[str, Any]:
        ia, ib = acts(xb)
        out = {}
        for n in names:
            za, w = _rows(ia[n], mask)
            zb, _ = _rows(ib[n], mask)
            out[n] = {"count": jnp.sum(w), "sum_a": w @ za, "sum_b": w @ zb}
        return out

    sums = objective.map_batches(first)
    means = {n: (s["sum_a"] / s["count"], s["sum_b"] / s["count"]) for n, s in sums.items()}

    def second(xb: Array, yb: Array, mask: Array) -> dict[str, Any]:
        ia, ib = acts(xb)
        out = {}
        for n in names:
            za, w = _rows(ia[n], mask)
            zb, _ = _rows(ib[n], mask)
            ca = (za - means[n][0]) * w[:, None]
            cb = zb - means[n][1]
            out[n] = {"ab": ca.T @ cb, "aa": jnp.sum(ca * ca, 0), "bb": w @ (cb * cb)}
        return out

    prods = objective.map_batches(second)
    return {
        n: {
            "count": sums[n]["count"],
            "mean_a": means[n][0],
            "mean_b": means[n][1],
            "cov": prods[n]["ab"] / sums[n]["count"],
            "var_a": prods[n]["aa"] / sums[n]["count"],
            "var_b": prods[n]["bb"] / sums[n]["count"],
        }
        for n in names
    }


_cross_statistics_jit = jax.jit(_cross_statistics, static_argnames=("names", "apply_fn", "kind"))


def cross_statistics(
    objective: Objective,
    a: Params,
    b: Params,
    *,
    apply_fn: Any = None,
    kind: str = "post",
    names: tuple[str, ...] | None = None,
) -> dict[str, dict[str, Array]]:
    """Exact full-dataset activation statistics of two models, per unit group.

    Returns ``{name: {"count", "mean_a", "mean_b", "var_a", "var_b", "cov"}}`` with population
    (1/N) moments over every example (and spatial position), ``cov[i, j] = E[(a_i − μ_i)(b_j − μ_j)]``.
    Two jitted passes of ``objective.map_batches``; padded rows are masked.
    """
    from landscape.align.trace import with_activations

    apply_fn = with_activations(objective.apply_fn if apply_fn is None else apply_fn)
    intermediates_fn(apply_fn, "cross_statistics")
    if kind not in _KINDS:
        msg = f"unknown activation kind {kind!r}; accepted: {list(_KINDS)}"
        raise ValueError(msg)
    if names is None:
        shapes = jax.eval_shape(lambda p, x: apply_fn.intermediates(p, x, kind=kind), a, objective.x[:1])
        names = tuple(shapes)
    return _cross_statistics_jit(objective, a, b, tuple(names), apply_fn, kind)


def activation_matching(
    spec: PermutationSpec,
    a: Params,
    b: Params,
    objective: Objective,
    *,
    apply_fn: Any = None,
    method: str = "correlation",
    kind: str = "post",
    eps: float = 1e-5,
) -> tuple[Permutation, ActivationMatchingInfo]:
    """Match every unit group of B to A by activation similarity over the whole dataset.

    See the module docstring for the two methods (Tatro et al. 2020, arXiv:2009.02439;
    Ainsworth et al. 2022, arXiv:2209.04836).

    Args:
        spec: the models' permutation spec.
        a: params of the reference model A.
        b: params of model B.
        objective: the data (its ``x``; batches of ``objective.batch_size``).
        apply_fn: the model, default ``objective.apply_fn``: a zoo model's ``intermediates`` are
            used, any other ``apply_fn(params, x)`` is traced (:func:`landscape.align.activations`).
        method: ``"correlation"`` (Tatro et al.) or ``"second_moment"`` (Ainsworth et al.).
        kind: ``"post"`` (after the nonlinearity, default) or ``"pre"``.
        eps: added to each standard deviation in the correlation's denominator.

    Returns:
        ``(perm, info)``: ``align.apply(spec, perm, b)`` is B aligned to A;
        ``info`` is an :class:`ActivationMatchingInfo`.

    Raises:
        ValueError: before any work, for an unknown ``method`` / ``kind``, a spec that does not fit
            ``a`` or ``b`` (naming the key path), mismatched models, an ``apply_fn`` without
            ``intermediates``, or a permutation name the model does not tap.
    """
    if method not in ACTIVATION_METHODS:
        msg = f"unknown activation-matching method {method!r}; accepted: {list(ACTIVATION_METHODS)}"
        raise ValueError(msg)
    if kind not in _KINDS:
        msg = f"unknown activation kind {kind!r}; accepted: {list(_KINDS)}"
        raise ValueError(msg)
    if not isinstance(objective, Objective):
        msg = f"objective must be a landscape.Objective (the data to match on), got {type(objective).__name__}"
        raise ValueError(msg)
    check_inputs(spec, a, b)
    if not eps >= 0:
        msg = f"eps must be >= 0, got {eps!r}"
        raise ValueError(msg)
    from landscape.align.trace import with_activations

    apply_fn = with_activations(objective.apply_fn if apply_fn is None else apply_fn, spec, params=a, x=objective.x[:1])
    intermediates_fn(apply_fn, "activation_matching")
    sizes = spec.sizes(a)
    shapes = jax.eval_shape(lambda p, x: apply_fn.intermediates(p, x, kind=kind), a, objective.x[:1])
    for n, size in sizes.items():
        if n not in shapes:
            msg = f"permutation {n!r} of the spec has no activations in apply_fn.intermediates (it taps {sorted(shapes)})"
            raise ValueError(msg)
        if shapes[n].shape[-1] != size:
            msg = f"activations of {n!r} have {shapes[n].shape[-1]} units but the spec's params have {size}"
            raise ValueError(msg)

    stats = _cross_statistics_jit(objective, a, b, tuple(spec.names), apply_fn, kind)
    perm: Permutation = {}
    corr_after: dict[str, float] = {}
    corr_before: dict[str, float] = {}
    objective_reached: dict[str, float] = {}
    corrs: dict[str, np.ndarray] = {}
    sims: dict[str, np.ndarray] = {}
    for n in spec.names:
        s = {k: np.asarray(v, np.float64) for k, v in stats[n].items()}
        sd_a, sd_b = np.sqrt(np.maximum(s["var_a"], 0)), np.sqrt(np.maximum(s["var_b"], 0))
        corrs[n] = s["cov"] / np.outer(sd_a + eps, sd_b + eps)
        sims[n] = corrs[n] if method == "correlation" else s["cov"] + np.outer(s["mean_a"], s["mean_b"])
    for group in _coordinates(spec):
        if group[0] in spec.blocks:  # attention heads: one head permutation for the layer's groups
            cols_all, _ = blockwise_assignment(
                [sims[n] for n in group], spec.blocks[group[0]][1], [spec.blocks[n][2] for n in group]
            )
        else:
            cols_all = [linear_sum_assignment(sims[group[0]], maximize=True)[1]]
        for n, cols in zip(group, cols_all):
            rows = np.arange(cols.shape[0])
            perm[n] = jnp.asarray(cols, jnp.int32)
            corr_after[n] = float(np.mean(corrs[n][rows, cols]))
            corr_before[n] = float(np.mean(np.diag(corrs[n])))
            objective_reached[n] = float(sims[n][rows, cols].sum())
    info = ActivationMatchingInfo(
        method=method,
        kind=kind,
        correlation=corr_after,
        correlation_before=corr_before,
        objective=objective_reached,
    )
    return perm, info

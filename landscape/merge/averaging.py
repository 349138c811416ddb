"""Averaging merges: uniform and weighted averages, SWA, greedy soups, Model Stock and SLERP.

All functions take models first and settings keyword-only; ``models`` is a list/tuple of matching
params trees or one stacked tree (leading model axis) — the latter with ``stacked=True`` where no
``base`` tells the two apart (``average``, ``swa``, ``greedy_soup``). Arithmetic runs in float32 or wider and the
result keeps each leaf's dtype.

Example:
    >>> import jax.numpy as jnp
    >>> from landscape import merge
    >>> a, b = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
    >>> merge.average([a, b], weights=[1.0, 3.0])["w"].tolist()
    [0.75, 0.75]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landscape import tree
from landscape._types import Array, Params
from landscape.merge._inputs import (
    acc_dtype,
    as_stacked,
    bcast,
    check_choice,
    check_weights,
    is_concrete,
)
from landscape.objective import Objective

__all__ = [
    "GreedySoupResult",
    "average",
    "greedy_soup",
    "model_stock",
    "slerp",
    "swa",
    "swa_update",
]


def _weighted_sum(stacked: Params, coef: Array) -> Params:
    def leaf(x: Array) -> Array:
        dt = acc_dtype(x)
        return jnp.sum(bcast(coef.astype(dt), x) * x.astype(dt), axis=0).astype(x.dtype)

    return jax.tree.map(leaf, stacked)


def average(
    models: Sequence[Params] | Params, *, weights: Any = None, normalize: bool = True, stacked: bool = False
) -> Params:
    r"""Uniform or weighted parameter average (FedSGD / uniform soup, FedAvg, mergekit ``linear``).

    .. math:: \theta = \frac{\sum_i w_i \theta_i}{\sum_i w_i} \quad (\text{normalize}), \qquad
              \theta = \sum_i w_i \theta_i \quad (\text{not normalize}).

    FedAvg (McMahan et al., arXiv 1602.05629) is ``weights=sample_counts``; the uniform model soup
    (Wortsman et al., arXiv 2203.05482) is ``weights=None``. Negative weights (e.g. to subtract a
    model) are only meaningful without normalisation and are rejected when ``normalize=True``.

    Args:
        models: list of matching params trees, or one stacked tree (leading model axis) with
            ``stacked=True``.
        weights: one weight per model (may be traced), default uniform.
        normalize: divide by ``sum(weights)``.
        stacked: ``models`` is one tree stacked on a leading model axis. Without it a single
            params tree is an error: one model whose leaves share a leading size is not a stack.

    Returns:
        The merged params, each leaf in its original dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> average([{"w": jnp.ones(1)}, {"w": 3 * jnp.ones(1)}])["w"].tolist()
        [2.0]
    """
    stacked_models, m = as_stacked(models, stacked=stacked)
    w = check_weights(weights, m)
    if w is None:
        w = jnp.ones((m,), jnp.float32)
    if normalize:
        if is_concrete(w):
            if bool(np.any(np.asarray(w) < 0)):
                msg = (
                    f"weights {np.asarray(w).tolist()} contain negative entries: use "
                    "normalize=False for signed combinations (mergekit #213)"
                )
                raise ValueError(msg)
            if float(np.sum(np.asarray(w))) == 0.0:
                msg = "weights sum to 0: cannot normalise"
                raise ValueError(msg)
        w = w / jnp.sum(w)
    return _weighted_sum(stacked_models, w)


def swa_update(average_params: Params, params: Params, count: Array | int) -> Params:
    r"""One step of the running average: :math:`\bar\theta_{k+1} = \bar\theta_k + (\theta - \bar\theta_k)/(k+1)`.

    ``count`` is the number of models already in ``average_params`` (k); jittable, so it can sit in
    a training loop to average checkpoints without storing them.
    """
    tree.check_match(average_params, params, names=("average_params", "params"))

    def leaf(a: Array, x: Array) -> Array:
        dt = acc_dtype(a)
        return (a.astype(dt) + (x.astype(dt) - a.astype(dt)) / (count + 1)).astype(a.dtype)

    return jax.tree.map(leaf, average_params, params)


def swa(trajectory: Sequence[Params] | Params, *, stacked: bool = False) -> Params:
    r"""Stochastic Weight Averaging (Izmailov et al., arXiv 1803.05407) of a trajectory.

    The equal-weight average of the checkpoints, computed as the running average of
    :func:`swa_update` over the sequence (a ``lax.scan`` over the leading axis), as in the SWA
    paper's Algorithm 1. Select the averaging window (e.g. every cycle's end) by slicing the
    trajectory beforehand.

    Args:
        trajectory: list of params, or a tree with a leading step axis and ``stacked=True``.
        stacked: ``trajectory`` is one stacked tree (a single params tree is an error otherwise).

    Returns:
        The averaged params.
    """
    steps, _ = as_stacked(trajectory, what="trajectory", stacked=stacked)
    first = jax.tree.map(lambda x: x[0], steps)
    rest = jax.tree.map(lambda x: x[1:], steps)

    def body(carry: tuple[Params, Array], p: Params) -> tuple[tuple[Params, Array], None]:
        avg, k = carry
        return (swa_update(avg, p, k), k + 1), None

    (avg, _), _ = jax.lax.scan(body, (first, jnp.ones((), jnp.float32)), rest)
    return avg


@dataclasses.dataclass(frozen=True)
class GreedySoupResult:
    """Outcome of :func:`greedy_soup`.

    Attributes:
        params: the soup (uniform average of the members).
        members: indices of the models in the soup, in the order they were added.
        accuracy: held-out accuracy of the soup.
        individual_accuracies: held-out accuracy of each input model.
        trials: ``(index, accuracy of the soup with it, accepted)`` for every candidate tried.
    """

    params: Params
    members: tuple[int, ...]
    accuracy: float
    individual_accuracies: tuple[float, ...]
    trials: tuple[tuple[int, float, bool], ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no parameters)."""
        return {
            "members": list(self.members),
            "accuracy": self.accuracy,
            "individual_accuracies": list(self.individual_accuracies),
            "trials": [
                {"index": i, "accuracy": a, "accepted": ok} for i, a, ok in self.trials
            ],
        }

    def plot(self) -> Any:
        """Plotly bar chart: each model's accuracy and the soup's accuracy after each trial."""
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_bar(
            x=[f"model {i}" for i in range(len(self.individual_accuracies))],
            y=list(self.individual_accuracies),
            name="individual",
        )
        fig.add_scatter(
            x=[f"model {i}" for i, _, _ in self.trials],
            y=[a for _, a, _ in self.trials],
            mode="markers+lines",
            marker={"symbol": ["circle" if ok else "x" for _, _, ok in self.trials]},
            name="soup with candidate",
        )
        fig.update_layout(title="Greedy soup", yaxis_title="held-out accuracy")
        return fig


jax.tree_util.register_dataclass(
    GreedySoupResult,
    data_fields=["params"],
    meta_fields=["members", "accuracy", "individual_accuracies", "trials"],
)


def greedy_soup(
    models: Sequence[Params] | Params,
    objective: Objective | None,
    *,
    order: str = "by_accuracy",
    stacked: bool = False,
) -> GreedySoupResult:
    """Greedy model soup (Wortsman et al., arXiv 2203.05482, Recipe 1).

    Sort the models by held-out accuracy (``order="by_accuracy"``, descending, ties by index) or
    keep the given order (``"given"``); start the soup with the first one and add each next model
    only if the uniform average of the soup with it has held-out accuracy **not lower** than the
    current soup's (``>=``, as in the paper's code).

    Args:
        models: list of matching params trees, or one stacked tree with ``stacked=True``.
        objective: the held-out data (:class:`~landscape.Objective`) that decides.
        order: ``"by_accuracy"`` or ``"given"``.
        stacked: ``models`` is one tree stacked on a leading model axis.

    Returns:
        :class:`GreedySoupResult` with the soup and the decisions.
    """
    check_choice("order", order, ("by_accuracy", "given"))
    if not isinstance(objective, Objective):
        msg = (
            "greedy_soup needs held-out data: pass an Objective as the second argument, got "
            f"{type(objective).__name__}"
        )
        raise ValueError(msg)
    stacked_models, m = as_stacked(models, stacked=stacked)
    members_params = tree.unstack(stacked_models)
    acc_fn = jax.jit(lambda obj, p: obj.evaluate(p)["accuracy"])
    accs = [float(acc_fn(objective, p)) for p in members_params]
    idx = sorted(range(m), key=lambda i: -accs[i]) if order == "by_accuracy" else list(range(m))

    def to_acc(p: Params) -> Params:
        return jax.tree.map(lambda x: x.astype(acc_dtype(x)), p)

    total = to_acc(members_params[idx[0]])
    members = [idx[0]]
    best = accs[idx[0]]
    soup = members_params[idx[0]]
    trials: list[tuple[int, float, bool]] = [(idx[0], best, True)]
    for i in idx[1:]:
        cand_total = tree.add(total, to_acc(members_params[i]))
        cand = jax.tree.map(
            lambda s, ref: (s / (len(members) + 1)).astype(ref.dtype), cand_total, soup
        )
        a = float(acc_fn(objective, cand))
        ok = a >= best
        trials.append((i, a, ok))
        if ok:
            total, soup, best = cand_total, cand, a
            members.append(i)
    return GreedySoupResult(
        params=soup,
        members=tuple(members),
        accuracy=best,
        individual_accuracies=tuple(accs),
        trials=tuple(trials),
    )


def _rows(x: Array, scope: str, out_axis: int | None = None) -> Array:
    """``(m, ...)`` -> ``(m, R, L)`` groups: one per output unit along ``out_axis`` (``scope="row"``;
    ``out_axis=None``: one per row ``x[..., i, :]`` as stored) or one."""
    m = x.shape[0]
    if scope == "row" and x.ndim >= 3:
        if out_axis is None:
            return x.reshape(m, -1, x.shape[-1])
        moved = jnp.moveaxis(x, 1 + out_axis % (x.ndim - 1), 1)
        return moved.reshape(m, moved.shape[1], -1)
    return x.reshape(m, 1, -1)


def model_stock(
    finetuned: Sequence[Params] | Params,
    *,
    base: Params,
    scope: str = "leaf",
    angle: str = "cosine",
    out_axis: int | None = -1,
) -> Params:
    r"""Model Stock (Jang et al., arXiv 2403.19522): move the average of k fine-tuned models toward
    the base by the ratio the angle between their task vectors predicts.

    For each group (a whole tensor for ``scope="leaf"``; each output unit along ``out_axis`` for
    ``scope="row"``, mergekit's ``filter_wise``; 1-D tensors are one group):

    .. math:: t = \frac{k\cos\theta}{1 + (k-1)\cos\theta}, \qquad
              \theta_{\text{merged}} = t\,\overline{\theta_i} + (1-t)\,\theta_0,

    where :math:`\cos\theta` comes from the pairwise cosines of the task vectors
    :math:`\tau_i = \theta_i - \theta_0` (denominator clamped at 1e-6, cosines clipped to [-1, 1]):
    ``angle="cosine"`` averages the pairwise cosines (mergekit), ``angle="angle"`` averages the
    pairwise angles and takes their cosine (FusionBench). If :math:`|1 + (k-1)\cos\theta| < 10^{-6}`,
    :math:`t = 0` (mergekit 0.1.5).

    Args:
        finetuned: at least two fine-tuned models (list or stacked).
        base: the pre-trained model :math:`\theta_0`.
        scope: ``"leaf"`` or ``"row"``.
        angle: ``"cosine"`` or ``"angle"``.
        out_axis: for ``scope="row"``, the output-unit axis: one ratio per unit ``x[..., j]`` (-1,
            Flax ``(in, out)``) or ``x[i]`` (0, PyTorch ``(out, in)``; mergekit's ``filter_wise`` on a
            2-D weight); None keeps the rows ``x[..., i, :]`` along the stored last axis (mergekit's
            tensor-as-stored rule, used by ``tensorwise.model_stock``).
    """
    check_choice("scope", scope, ("leaf", "row"))
    if out_axis is not None and (isinstance(out_axis, bool) or not isinstance(out_axis, int)):
        msg = f"out_axis must be an int or None, got {out_axis!r}"
        raise TypeError(msg)
    check_choice("angle", angle, ("cosine", "angle"))
    stacked, k = as_stacked(finetuned, what="finetuned", base=base)
    if k < 2:
        msg = f"model_stock needs at least 2 fine-tuned models, got {k}"
        raise ValueError(msg)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    pi = jnp.array([p[0] for p in pairs])
    pj = jnp.array([p[1] for p in pairs])

    def leaf(x: Array, x0: Array) -> Array:
        dt = acc_dtype(x)
        xs, b = x.astype(dt), x0.astype(dt)
        if scope == "row" and out_axis is not None and x0.ndim >= 2 and not -x0.ndim <= out_axis < x0.ndim:
            msg = f"out_axis={out_axis} is out of range for a leaf of shape {x0.shape}"
            raise ValueError(msg)
        d = _rows(xs - b[None], scope, out_axis)
        n = jnp.sqrt(jnp.sum(d * d, axis=-1))
        dots = jnp.sum(d[pi] * d[pj], axis=-1)
        cos = jnp.clip(dots / jnp.maximum(n[pi] * n[pj], 1e-6), -1.0, 1.0)
        c = jnp.mean(cos, axis=0) if angle == "cosine" else jnp.cos(jnp.mean(jnp.arccos(cos), axis=0))
        den = 1.0 + (k - 1) * c
        small = jnp.abs(den) < 1e-6
        t = jnp.where(small, 0.0, k * c / jnp.where(small, 1.0, den))
        mean = jnp.mean(xs, axis=0)
        rows = _rows(jnp.stack([mean, b]), scope, out_axis)
        out = t[:, None] * rows[0] + (1 - t[:, None]) * rows[1]
        if scope == "row" and out_axis is not None and x0.ndim >= 2:
            ax = out_axis % x0.ndim
            moved = jnp.moveaxis(x0, ax, 0).shape
            return jnp.moveaxis(out.reshape(moved), 0, ax).astype(x0.dtype)
        return out.reshape(x0.shape).astype(x0.dtype)

    return jax.tree.map(leaf, stacked, base)


def slerp(
    a: Params,
    b: Params,
    *,
    t: Array | float,
    eps: float = 1e-8,
    dot_threshold: float = 0.9995,
) -> Params:
    r"""Spherical linear interpolation, tensor by tensor (mergekit ``slerp``; Shoemake 1985).

    Each leaf is one vector. With :math:`u = a/\|a\|`, :math:`v = b/\|b\|` (a vector is normalised
    only if its norm exceeds ``eps``), :math:`\Omega = \arccos(u\cdot v)`:

    .. math:: \mathrm{slerp}(a, b; t) = \frac{\sin((1-t)\Omega)}{\sin\Omega}\, a
              + \frac{\sin(t\Omega)}{\sin\Omega}\, b,

    falling back to the lerp :math:`(1-t)a + tb` when :math:`|u\cdot v| >` ``dot_threshold``
    (near-colinear or antipodal). ``t=0`` gives ``a`` and ``t=1`` gives ``b``. ``t`` may be traced,
    so a sweep is one ``jax.vmap``.

    Args:
        a, b: matching params trees.
        t: interpolation parameter.
        eps: norm below which a vector is not normalised.
        dot_threshold: colinearity threshold for the lerp fallback.
    """
    tree.check_match(a, b, names=("a", "b"))
    tree.check_scalar("t", t)

    def leaf(x0: Array, x1: Array) -> Array:
        dt = acc_dtype(x0)
        v0, v1 = x0.astype(dt).ravel(), x1.astype(dt).ravel()
        n0, n1 = jnp.linalg.norm(v0), jnp.linalg.norm(v1)
        u0 = jnp.where(n0 > eps, v0 / jnp.where(n0 > eps, n0, 1.0), v0)
        u1 = jnp.where(n1 > eps, v1 / jnp.where(n1 > eps, n1, 1.0), v1)
        dot = jnp.sum(u0 * u1)
        colinear = jnp.abs(dot) > dot_threshold
        omega = jnp.arccos(jnp.where(colinear, 0.0, jnp.clip(dot, -1.0, 1.0)))
        sin_o = jnp.sin(omega)
        s0 = jnp.sin((1 - t) * omega) / sin_o
        s1 = jnp.sin(t * omega) / sin_o
        lerp = (1 - t) * v0 + t * v1
        out = jnp.where(colinear, lerp, s0 * v0 + s1 * v1)
        return out.reshape(x0.shape).astype(x0.dtype)

    return jax.tree.map(leaf, a, b)

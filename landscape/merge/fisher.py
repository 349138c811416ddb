r"""Fisher information: exact per-example diagonal Fisher and Fisher-weighted averaging.

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", arXiv 2111.09832.

Example:
    >>> import jax.numpy as jnp
    >>> from landscape import Objective, merge
    >>> obj = Objective(lambda p, x: x @ p["w"], jnp.eye(2), jnp.array([0, 1]))
    >>> f = merge.fisher_diagonal(obj, {"w": jnp.zeros((2, 2))})
    >>> f["w"].tolist()  # p = (1/2, 1/2): sum_c p_c (e_c - p)_j^2 x_i^2 / n
    [[0.125, 0.125], [0.125, 0.125]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from landscape._types import Array, Params
from landscape.merge._inputs import (
    acc_dtype,
    as_stacked,
    bcast,
    check_choice,
    check_range,
    check_shapes,
    check_weights,
)
from landscape.objective import Objective

__all__ = ["fisher_average", "fisher_diagonal"]


def _labels(y: Array) -> Array:
    return y if jnp.issubdtype(y.dtype, jnp.integer) else jnp.argmax(y, axis=-1)


def fisher_diagonal(objective: Objective | None, params: Params, *, kind: str = "true") -> Params:
    r"""Exact diagonal of the Fisher information over the objective's whole dataset.

    For a classifier :math:`p_\theta(c\mid x) = \mathrm{softmax}(f_\theta(x))_c`:

    * ``kind="true"`` (the model's own predictive distribution; Matena & Raffel):
      :math:`F = \frac1n\sum_n \sum_c p_\theta(c\mid x_n)\,(\nabla_\theta\log p_\theta(c\mid x_n))^2`;
    * ``kind="empirical"`` (the observed labels):
      :math:`F = \frac1n\sum_n (\nabla_\theta\log p_\theta(y_n\mid x_n))^2`.

    Per-example gradients are computed with ``jax.vmap`` over the examples of each fixed batch of
    ``objective.map_batches`` (all classes at once with ``jax.jacrev`` for the true Fisher), so the
    result is exact and memory is bounded by the batch size times the number of classes. This is
    not FusionBench's estimate (the squared gradient of a batch sum, which mixes examples).
    Jittable.

    Args:
        objective: the data; ``apply_fn`` must return ``(batch, classes)`` logits.
        params: the model :math:`\theta`.
        kind: ``"true"`` or ``"empirical"`` (uses integer labels, or the argmax of one-hot ones).

    Returns:
        A tree like ``params`` (float32 or wider) holding the Fisher diagonal.
    """
    check_choice("kind", kind, ("true", "empirical"))
    if not isinstance(objective, Objective):
        msg = f"fisher_diagonal needs data: pass an Objective, got {type(objective).__name__}"
        raise ValueError(msg)
    apply_fn = objective.apply_fn

    def log_probs(p: Params, x: Array) -> Array:
        out = apply_fn(p, x[None])
        if out.ndim != 2:
            msg = f"fisher_diagonal needs (batch, classes) logits, apply_fn returned shape {out.shape}"
            raise ValueError(msg)
        return jax.nn.log_softmax(out[0].astype(jnp.promote_types(out.dtype, jnp.float32)))

    def per_example(x: Array, y: Array) -> Params:
        if kind == "empirical":
            g = jax.grad(lambda p: log_probs(p, x)[y])(params)
            return jax.tree.map(lambda t: jnp.square(t.astype(acc_dtype(t))), g)
        jac = jax.jacrev(log_probs)(params, x)
        prob = jax.lax.stop_gradient(jnp.exp(log_probs(params, x)))
        return jax.tree.map(
            lambda j: jnp.tensordot(prob.astype(acc_dtype(j)), jnp.square(j.astype(acc_dtype(j))), 1),
            jac,
        )

    return dataset_mean(objective, per_example)


def dataset_mean(objective: Objective, per_example: Any) -> Any:
    """``(1/n) Σ_i per_example(x_i, y_i)`` over the objective's whole dataset (integer labels, or the
    argmax of one-hot targets), vmapped within the fixed batches, padded rows masked out."""

    def fn(xb: Array, yb: Array, mb: Array) -> Any:
        per = jax.vmap(per_example)(xb, _labels(yb))
        return jax.tree.map(lambda t: jnp.sum(bcast(mb.astype(t.dtype), t) * t, axis=0), per)

    total = objective.map_batches(fn)
    return jax.tree.map(lambda t: t / objective.num_examples, total)


def fisher_average(
    models: Sequence[Params] | Params,
    fishers: Sequence[Params] | Params,
    *,
    weights: Any = None,
    floor: float = 1e-6,
    floor_mode: str = "add",
    target: int = 0,
    normalize: bool = True,
) -> Params:
    r"""Fisher-weighted averaging (Matena & Raffel, arXiv 2111.09832), entry by entry:

    .. math:: \theta = \frac{\sum_i \lambda_i \tilde F_i \odot \theta_i}{\sum_i \lambda_i \tilde F_i},
              \qquad \lambda_i = \frac{w_i}{\|F_i\|} \ (\text{normalize}) \text{ or } w_i.

    The floor keeps the division defined where every Fisher vanishes; the two published variants:

    * ``floor_mode="add"``: :math:`\tilde F_i = F_i + \text{floor}` for every model (FusionBench,
      ``minimal_fisher_weight=1e-6``);
    * ``floor_mode="target"``: :math:`\tilde F_t = \max(F_t, \text{floor})` on the ``target`` model
      only (the original code, ``favor_target_model=True``, ``fisher_floor=1e-6``);
    * ``floor_mode="max"``: :math:`\max(F_i, \text{floor})` for every model.

    ``normalize`` divides each model's coefficient by its Fisher's norm over all parameters (the
    original ``normalize_fishers`` and FusionBench's ``normalize_fisher_weight``, both default on).
    Where the denominator is still 0 (``floor=0``), the plain ``weights`` average is used.

    Args:
        models: list of matching params trees or a stacked tree.
        fishers: one diagonal Fisher per model (:func:`fisher_diagonal`), list or stacked.
        weights: per-model weights :math:`w_i` (default 1).
        floor: the floor value (>= 0).
        floor_mode: ``"add"``, ``"target"`` or ``"max"``.
        target: the model index the ``"target"`` floor applies to.
        normalize: divide coefficients by :math:`\|F_i\|`.
    """
    check_choice("floor_mode", floor_mode, ("add", "target", "max"))
    check_range("floor", floor, 0.0, float("inf"))
    stacked, m = as_stacked(models)
    fs, mf = as_stacked(fishers, what="fishers")
    if mf != m:
        msg = f"got {m} models but {mf} Fishers: pass one Fisher per model"
        raise ValueError(msg)
    check_shapes(stacked, fs, names=("models", "fishers"))
    if not 0 <= target < m:
        msg = f"target must index a model in [0, {m}), got {target}"
        raise ValueError(msg)
    w = check_weights(weights, m)
    w = jnp.ones((m,), jnp.float32) if w is None else w.astype(jnp.float32)
    w_plain = w
    if normalize:
        sq = sum(
            jnp.sum(jnp.square(f.astype(jnp.float32)).reshape(m, -1), axis=1)
            for f in jax.tree.leaves(fs)
        )
        nrm = jnp.sqrt(sq)
        w = w / jnp.where(nrm > 0, nrm, 1.0)
    idx = jnp.arange(m)

    def leaf(x: Array, f: Array) -> Array:
        dt = acc_dtype(x)
        f = f.astype(dt)
        if floor_mode == "add":
            f = f + floor
        elif floor_mode == "max":
            f = jnp.maximum(f, floor)
        else:
            f = jnp.where(bcast(idx == target, f), jnp.maximum(f, floor), f)
        c = bcast(w.astype(dt), f) * f
        num = jnp.sum(c * x.astype(dt), axis=0)
        den = jnp.sum(c, axis=0)
        wb = bcast(w_plain.astype(dt), f)
        plain = jnp.sum(wb * x.astype(dt), axis=0) / jnp.sum(w_plain.astype(dt))
        out = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), plain)
        return out.astype(x.dtype)

    return jax.tree.map(leaf, stacked, fs)

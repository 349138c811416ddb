"""Straight-through estimator (STE) matching: learn the permutation that flattens the midpoint.

Git Re-Basin (Ainsworth et al. 2022, arXiv:2209.04836, Sec. 3.3, Algorithm 2) searches for the
permutation of B whose midpoint with A has the lowest *loss*, not the closest weights. It keeps a
free copy θ̃ of the weights, projects it onto B's orbit by weight matching,

.. math::  \\mathrm{proj}(\\tilde θ) = π^\\star(θ_B), \\qquad
           π^\\star = \\arg\\max_π \\langle \\tilde θ, π(θ_B) \\rangle ,

and minimises :math:`L(½(θ_A + \\mathrm{proj}(\\tilde θ)))` with the straight-through gradient:
the forward pass uses :math:`\\mathrm{proj}(\\tilde θ)`, the backward pass treats the projection
as the identity, implemented (as in git-re-basin's ``mnist_mlp_ste2.py``) by

.. math::  θ_{\\text{ste}} = \\mathrm{sg}(π^\\star(θ_B)) + \\tilde θ - \\mathrm{sg}(\\tilde θ),\\qquad
           \\text{loss} = L_{\\text{batch}}\\big(½ (θ_A + θ_{\\text{ste}})\\big).

As in the reference: θ̃ starts at θ_A, so the first projection *is* weight matching of B to A;
every later projection is warm-started from the previous permutation; the optimiser is SGD with
momentum 0.9 (learning rate 1e-2 there); and the permutation kept is the one with the lowest
minibatch midpoint loss seen (the reference trains 250 epochs with batch 1000 on MNIST; here
``steps`` and ``batch_size`` are explicit and small by default). Minibatches are drawn without
replacement from ``jax.random.permutation(fold_in(data_key, epoch), n)`` and every projection's
weight matching gets ``fold_in(match_key, step)`` (integer keys only, so runs are reproducible —
the reference's string-hash keys are not).

The model is evaluated with ``objective.apply_fn(params, x)``; for BatchNorm models the midpoint
uses whatever running statistics ``apply_fn`` carries.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from landscape import Objective, align, models
    >>> apply_fn, a, _ = models.functional(models.MLP(4, (8, 3), rngs=nnx.Rngs(0)))
    >>> _, b, _ = models.functional(models.MLP(4, (8, 3), rngs=nnx.Rngs(1)))
    >>> x = jax.random.normal(jax.random.key(2), (64, 4)); y = (x[:, 0] > 0).astype(jnp.int32)
    >>> perm, info = align.ste_matching(jax.random.key(3), apply_fn.spec, a, b,
    ...                                 Objective(apply_fn, x, y), steps=5, batch_size=32)
    >>> len(info.losses)
    5
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from landscape import tree
from landscape._types import Array, Key, Params
from landscape.align.spec import Permutation, PermutationSpec, apply
from landscape.align.weight_matching import check_inputs, check_key, weight_matching
from landscape.objective import Objective

__all__ = ["STE_SELECT", "STEInfo", "ste_matching"]

STE_SELECT = ("minibatch", "dataset")
"""Accepted ``select`` values of :func:`ste_matching`."""


@dataclasses.dataclass(frozen=True)
class STEInfo:
    """The STE run.

    Attributes:
        losses: minibatch midpoint loss :math:`L_b(½(θ_A + π_s(θ_B)))` at every step ``s``
            (before that step's update).
        best_step: the step whose permutation was kept.
        best_loss: the loss it was selected by (minibatch, or full dataset with ``select="dataset"``).
        midpoint_loss: full-dataset loss of ``½(θ_A + π(θ_B))`` for the returned permutation.
        initial_midpoint_loss: the same for the weight-matching permutation of step 0.
        matching_iterations: weight-matching sweeps used by each step's projection.
        iterations: number of steps run.
    """

    losses: tuple[float, ...]
    best_step: int
    best_loss: float
    midpoint_loss: float
    initial_midpoint_loss: float
    matching_iterations: tuple[int, ...]
    iterations: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of all fields."""
        out = dataclasses.asdict(self)
        out["losses"] = list(self.losses)
        out["matching_iterations"] = list(self.matching_iterations)
        return out

    def plot(self, *, title: str | None = None) -> Any:
        """Plotly figure of the minibatch midpoint loss per step."""
        import plotly.graph_objects as go

        fig = go.Figure(go.Scatter(x=list(range(len(self.losses))), y=list(self.losses), mode="lines"))
        fig.update_layout(
            title=title or "STE matching: minibatch loss at the midpoint",
            xaxis_title="step",
            yaxis_title="loss",
        )
        return fig


def ste_matching(
    key: Key,
    spec: PermutationSpec,
    a: Params,
    b: Params,
    objective: Objective,
    *,
    steps: int = 100,
    learning_rate: float = 1e-2,
    momentum: float = 0.9,
    batch_size: int | None = None,
    max_iter: int = 100,
    select: str = "minibatch",
) -> tuple[Permutation, STEInfo]:
    """Permutation of ``b`` minimising the loss of the midpoint with ``a`` (straight-through).

    Ainsworth et al. 2022 (arXiv:2209.04836), Algorithm 2; see the module docstring.

    Args:
        key: typed PRNG key; fixes the minibatch order and each projection's sweep order, so the
            result is deterministic for a given key.
        spec: the models' permutation spec.
        a: params of model A (kept fixed).
        b: params of model B (the permutation applies to it).
        objective: data and loss; ``objective.apply_fn`` evaluates the midpoint.
        steps: optimisation steps (one projection and one SGD update each).
        learning_rate: SGD learning rate (the reference uses 1e-2).
        momentum: SGD momentum (the reference uses 0.9).
        batch_size: examples per step; default ``objective.batch_size`` (capped at ``n``).
        max_iter: weight-matching sweeps per projection.
        select: which visited permutation to return: ``"minibatch"`` (the reference: lowest
            minibatch loss at its step) or ``"dataset"`` (lowest full-dataset midpoint loss,
            evaluated once for every distinct permutation visited; less noisy with small batches).

    Returns:
        ``(perm, info)`` with ``align.apply(spec, perm, b)`` aligned to ``a``; ``info`` an
        :class:`STEInfo`.

    Raises:
        ValueError: before any work, for a bad key, a spec that does not fit the params (naming the
            path), mismatched models or non-positive settings.
    """
    check_key(key, "ste_matching")
    if not isinstance(objective, Objective):
        msg = f"objective must be a landscape.Objective, got {type(objective).__name__}"
        raise ValueError(msg)
    check_inputs(spec, a, b)
    for name, v in (("steps", steps), ("max_iter", max_iter)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            msg = f"{name} must be a positive int, got {v!r}"
            raise ValueError(msg)
    if not learning_rate > 0 or not 0 <= momentum < 1:
        msg = f"need learning_rate > 0 and 0 <= momentum < 1, got {learning_rate!r} and {momentum!r}"
        raise ValueError(msg)
    if select not in STE_SELECT:
        msg = f"unknown select {select!r}; accepted: {list(STE_SELECT)}"
        raise ValueError(msg)
    n = objective.num_examples
    bs = min(objective.batch_size if batch_size is None else batch_size, n)
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        msg = f"batch_size must be a positive int, got {batch_size!r}"
        raise ValueError(msg)

    data_key, match_key = jax.random.split(key)
    steps_per_epoch = n // bs
    optimizer = optax.sgd(learning_rate, momentum=momentum or None)
    apply_fn, loss_fn = objective.apply_fn, objective.loss_fn

    @jax.jit
    def update(theta: Params, opt_state: Any, projected: Params, xb: Array, yb: Array) -> tuple[Params, Any, Array]:
        def loss(th: Params) -> Array:
            ste = jax.tree.map(
                lambda p, t: jax.lax.stop_gradient(p) + t - jax.lax.stop_gradient(t), projected, th
            )
            return jnp.mean(loss_fn(apply_fn(tree.lerp(a, ste, 0.5), xb), yb))

        value, grads = jax.value_and_grad(loss)(theta)
        updates, opt_state = optimizer.update(grads, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state, value

    midpoint_loss = jax.jit(lambda pb: objective.loss(tree.lerp(a, pb, 0.5)))

    theta = a
    opt_state = optimizer.init(theta)
    perm: Permutation | None = None
    best: tuple[float, int, Permutation] | None = None
    losses: list[float] = []
    sweeps: list[int] = []
    order = None
    first_perm: Permutation | None = None
    seen: dict[tuple, float] = {}
    for s in range(steps):
        epoch, i = divmod(s, steps_per_epoch)
        if i == 0:
            order = jax.random.permutation(jax.random.fold_in(data_key, epoch), n)
        idx = order[i * bs : (i + 1) * bs]
        perm, wm = weight_matching(jax.random.fold_in(match_key, s), spec, theta, b, max_iter=max_iter, init=perm)
        if first_perm is None:
            first_perm = perm
        sweeps.append(wm.iterations)
        projected = apply(spec, perm, b)
        theta, opt_state, value = update(theta, opt_state, projected, objective.x[idx], objective.y[idx])
        v = float(value)
        losses.append(v)
        if select == "dataset":
            key_ = tuple(tuple(np.asarray(perm[nm]).tolist()) for nm in spec.names)
            if key_ not in seen:
                seen[key_] = float(midpoint_loss(projected))
            v = seen[key_]
        if best is None or v < best[0]:
            best = (v, s, perm)
    assert best is not None and first_perm is not None
    best_loss, best_step, best_perm = best
    info = STEInfo(
        losses=tuple(losses),
        best_step=best_step,
        best_loss=best_loss,
        midpoint_loss=float(midpoint_loss(apply(spec, best_perm, b))),
        initial_midpoint_loss=float(midpoint_loss(apply(spec, first_perm, b))),
        matching_iterations=tuple(sweeps),
        iterations=steps,
    )
    return best_perm, info

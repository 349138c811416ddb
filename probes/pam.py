"""Is an alignment locally optimal for a curve? The PAM check of Tatro et al. 2020.

Tatro, Chen, Das, Melnyk, Sattigeri & Lai, *Optimizing Mode Connectivity via Neuron Alignment*
(arXiv 2009.02439), fit a quadratic Bezier curve between ``θ_A`` and a permuted ``P(θ_B)`` and
ask whether the permutation ``P`` found by activation matching is a local optimum of the curve
objective jointly in the bend and the permutation:

.. math::  \\min_{φ, P} \\; E_{t \\sim U(0,1)} L\\big(r(t)\\big), \\qquad
           r(t) = (1-t)^2 θ_A + 2t(1-t)\\big(\\tfrac12 θ_A + \\tfrac12 P(θ_B) + φ\\big) + t^2 P(θ_B).

Each permutation (one per unit group of the :class:`~landscape.align.PermutationSpec`) is relaxed
to a doubly-stochastic matrix ``M`` (the Birkhoff polytope, the convex hull of the permutation
matrices), starting at the given permutation's matrix. ``M`` acts on the parameters by matrix
products along every axis that the spec tags with its name (:func:`apply_soft`); with a
permutation matrix this is exactly :func:`landscape.align.apply`. Proximal alternating
minimisation (PAM) then runs ``outer`` rounds of

(a) ``inner_phi`` Adam steps on ``φ`` (``M`` fixed), one ``t ~ U(0,1)`` and one minibatch per
    step — the curve loss of :func:`probes.curves.fit_curve`;
(b) ``inner_perm`` projected gradient steps on every ``M`` (``φ`` fixed), each on a fresh ``t`` and
    minibatch, of the proximal objective ``L + (ρ/2) ‖M − M_k‖_F^2`` (``M_k`` the matrices at the
    start of the round, ``ρ = proximal``):

    .. math::  M \\leftarrow \\Pi_{\\mathcal B}\\big(M − η (∇_M L + ρ (M − M_k))\\big).

The projection ``Π_B`` used here is **Sinkhorn normalisation**, not the exact Euclidean projection:
entries are clipped below at ``floor`` (a positive matrix), then rows and columns are alternately
rescaled to sum to one (Sinkhorn & Knopp 1967), ending with the rows, until the column sums are
within ``1e-6`` of one or after ``sinkhorn_iters`` iterations. For a positive matrix this converges
to the unique doubly-stochastic ``D_1 M D_2``.

Finally each ``M`` is rounded to the permutation of the largest Birkhoff–von Neumann term, i.e.
the maximum-weight matching ``argmax_P ⟨P, M⟩`` (:func:`scipy.optimize.linear_sum_assignment`).
The alignment is *locally optimal* when every rounded permutation equals the initial one. The
defaults are the reference's: one outer round, 20 permutation steps, 250 bend steps.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from landscape import align
    >>> from probes.pam import apply_soft, permutation_matrices
    >>> spec = align.PermutationSpec({"w1": (None, "h"), "b1": ("h",), "w2": ("h", None)})
    >>> params = {"w1": jnp.ones((3, 4)), "b1": jnp.arange(4.0), "w2": jnp.ones((4, 2))}
    >>> perm = {"h": jnp.array([3, 2, 1, 0])}
    >>> apply_soft(spec, permutation_matrices(perm), params)["b1"].tolist()
    [3.0, 2.0, 1.0, 0.0]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.optimize import linear_sum_assignment

from landscape import align, tree
from landscape._types import Array, Key, Params
from landscape.align.spec import Permutation, PermutationSpec
from landscape.objective import Objective
from probes.curves import PathResult, _train_forward, evaluate_path
from probes.paths import bezier

__all__ = ["PAMResult", "apply_soft", "pam_check", "permutation_matrices", "project_birkhoff", "round_to_permutation"]


# ---------------------------------------------------------------------------- relaxed permutations
def permutation_matrices(perm: Permutation) -> dict[str, Array]:
    """The matrices ``M[i, j] = 1`` iff ``j = perm[name][i]`` (float32), so that ``apply_soft`` equals ``apply``."""
    align.check_permutation(perm)
    return {n: jax.nn.one_hot(p, p.shape[0], dtype=jnp.float32) for n, p in perm.items()}


def _contract(table: Mapping[str, tuple[str | None, ...]], mats: Mapping[str, Array], params: Params) -> Params:
    def one(path: Any, x: Array) -> Array:
        for ax, n in enumerate(table[tree.key_name(path)]):
            if n is not None:
                x = jnp.moveaxis(jnp.tensordot(mats[n].astype(x.dtype), x, axes=([1], [ax])), 0, ax)
        return x

    return jax.tree.map_with_path(one, params)


def _check_mats(spec: PermutationSpec, mats: Mapping[str, Array], sizes: dict[str, int]) -> None:
    if not isinstance(mats, Mapping) or set(mats) != set(spec.names):
        got = sorted(mats) if isinstance(mats, Mapping) else type(mats).__name__
        msg = f"mats must be a dict with exactly the spec's permutation names {list(spec.names)}, got {got}"
        raise ValueError(msg)
    for n, size in sizes.items():
        if jnp.shape(mats[n]) != (size, size):
            msg = f"matrix {n!r} has shape {jnp.shape(mats[n])} but the model has {size} units there; expected ({size}, {size})"
            raise ValueError(msg)


def apply_soft(spec: PermutationSpec, mats: Mapping[str, Array], params: Params) -> Params:
    """Act on ``params`` with (relaxed) permutation matrices: contract every tagged axis with its matrix.

    Along every axis tagged ``name``, ``new[..., i, ...] = Σ_j M[i, j] old[..., j, ...]``. With
    ``M = permutation_matrices(perm)`` this is :func:`landscape.align.apply` (new unit ``i`` is old unit
    ``perm[i]``); with a doubly-stochastic ``M`` every new unit is a convex combination of old units.

    Args:
        spec: the model's permutation spec.
        mats: ``{name: (size, size) matrix}`` with exactly the names of ``spec.names``.
        params: the params tree described by ``spec.axes``.

    Returns:
        Params of the same structure, shapes and dtypes. Jittable and differentiable in ``mats``.
    """
    sizes = spec.sizes(params)
    _check_mats(spec, mats, sizes)
    return _contract(spec.axes, mats, params)


def project_birkhoff(m: Array, *, iters: int = 200, floor: float = 1e-6, tol: float = 1e-6) -> Array:
    """Map a square matrix onto the Birkhoff polytope by Sinkhorn normalisation of ``max(m, floor)``.

    Alternately divides by column sums and row sums, ending with the rows, until the largest column
    sum error is below ``tol`` or after ``iters`` iterations. The result is nonnegative with rows
    summing to one exactly and columns to within the Sinkhorn residual. For a matrix near the
    polytope (a doubly-stochastic matrix after a small gradient step, PAM's use) the residual falls
    geometrically; if the entries above ``floor`` admit no doubly-stochastic pattern (no total
    support) convergence is slow and is carried by the floor. Not the Euclidean projection.
    """
    if jnp.ndim(m) != 2 or m.shape[0] != m.shape[1]:
        msg = f"project_birkhoff needs a square matrix, got shape {jnp.shape(m)}"
        raise ValueError(msg)
    if not isinstance(iters, int) or iters < 1:
        msg = f"iters must be an int >= 1, got {iters!r}"
        raise ValueError(msg)
    if not floor > 0:
        msg = f"floor must be > 0 (Sinkhorn needs a positive matrix), got {floor!r}"
        raise ValueError(msg)
    if not tol > 0:
        msg = f"tol must be > 0, got {tol!r}"
        raise ValueError(msg)
    return _sinkhorn(m, iters, floor, tol)


def _sinkhorn(m: Array, iters: int, floor: float, tol: float = 1e-6) -> Array:
    def error(x: Array) -> Array:
        return jnp.max(jnp.abs(jnp.sum(x, axis=0) - 1.0))

    def cond(carry: tuple[Array, Array]) -> Array:
        i, x = carry
        return (i < iters) & (error(x) > tol)

    def body(carry: tuple[Array, Array]) -> tuple[Array, Array]:
        i, x = carry
        x = x / jnp.sum(x, axis=0, keepdims=True)
        return i + 1, x / jnp.sum(x, axis=1, keepdims=True)

    x = jnp.maximum(m, floor)
    return jax.lax.while_loop(cond, body, (jnp.asarray(0), x / jnp.sum(x, axis=1, keepdims=True)))[1]


def round_to_permutation(m: Array) -> Array:
    """The permutation ``p`` maximising ``Σ_i M[i, p[i]]`` (the Birkhoff–von Neumann largest term), int32."""
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        msg = f"round_to_permutation needs a square matrix, got shape {m.shape}"
        raise ValueError(msg)
    rows, cols = linear_sum_assignment(m, maximize=True)
    out = np.empty(m.shape[0], dtype=np.int32)
    out[rows] = cols
    return jnp.asarray(out)


# ---------------------------------------------------------------------------- result
@dataclasses.dataclass(frozen=True)
class PAMResult:
    """Outcome of :func:`pam_check`.

    Attributes:
        initial: the permutation the check started from.
        rounded: each relaxed matrix rounded to its maximum-weight permutation.
        locally_optimal: ``True`` when ``rounded`` equals ``initial`` for every name.
        changed_fraction: ``{name: fraction of units whose assignment changed}``.
        relaxed: the final doubly-stochastic matrices.
        before: the curve with the initial permutation and the bend after the first ``φ`` phase.
        after: the curve with the rounded permutation and the final bend.
        phi_losses: training loss of every ``φ`` step, ``(outer, inner_phi)``.
        perm_losses: training loss of every permutation step, ``(outer, inner_perm)``.
        settings: the settings used.
    """

    initial: Permutation
    rounded: Permutation
    locally_optimal: bool
    changed_fraction: dict[str, float]
    relaxed: dict[str, Array]
    before: PathResult
    after: PathResult
    phi_losses: np.ndarray
    perm_losses: np.ndarray
    settings: dict[str, Any]

    @property
    def distance_from_initial(self) -> dict[str, float]:
        """``‖M − P_0‖_F / √n`` per name: how far the relaxed matrices moved."""
        p0 = permutation_matrices(self.initial)
        return {n: float(jnp.linalg.norm(self.relaxed[n] - p0[n]) / np.sqrt(p0[n].shape[0])) for n in p0}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary: the verdict, changed fractions, barriers and accuracy before and after."""

        def curve(r: PathResult) -> dict[str, Any]:
            acc = np.asarray(r.accuracy)
            return {"loss_barrier": r.barrier.loss, "error_barrier": r.barrier.error,
                    "mean_accuracy": float(acc.mean()), "min_accuracy": float(acc.min()),
                    "path": r.to_dict()}

        return {
            "locally_optimal": bool(self.locally_optimal),
            "changed_fraction": dict(self.changed_fraction),
            "distance_from_initial": self.distance_from_initial,
            "initial": {n: np.asarray(p).tolist() for n, p in self.initial.items()},
            "rounded": {n: np.asarray(p).tolist() for n, p in self.rounded.items()},
            "before": curve(self.before),
            "after": curve(self.after),
            "final_phi_loss": float(np.mean(self.phi_losses[-1][-max(1, self.phi_losses.shape[1] // 10):])),
            "settings": dict(self.settings),
        }

    def plot(self, *, title: str | None = None) -> Any:
        """Loss and error along the curve before and after the PAM rounds."""
        from probes.plot import path_figure

        return path_figure([("initial permutation", self.before), ("after PAM", self.after)],
                           title=title or "PAM check")


# ---------------------------------------------------------------------------- the check
def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        msg = f"{name} must be an int >= {low}, got {value!r}"
        raise ValueError(msg)


def _check_is_permutation(perm: Permutation, sizes: dict[str, int]) -> None:
    align.check_permutation(perm, names=tuple(sizes))
    for n, size in sizes.items():
        p = np.asarray(perm[n])
        if p.shape != (size,) or not np.array_equal(np.sort(p), np.arange(size)):
            msg = f"perm[{n!r}] must be a permutation of range({size}) (the model's units), got shape {p.shape}"
            raise ValueError(msg)


def pam_check(
    key: Key,
    objective: Objective,
    a: Params,
    b: Params,
    perm: Permutation,
    *,
    spec: PermutationSpec | None = None,
    outer: int = 1,
    inner_perm: int = 20,
    inner_phi: int = 250,
    batch_size: int = 128,
    learning_rate: float = 1e-2,
    perm_learning_rate: float = 0.1,
    proximal: float = 0.0,
    sinkhorn_iters: int = 200,
    floor: float = 1e-6,
    num_eval: int = 25,
    eval_objective: Objective | None = None,
    stats: str | None = None,
    end_states: tuple[Params | None, Params | None] | None = None,
) -> PAMResult:
    """Proximal alternating minimisation over the bend and relaxed permutations (Tatro et al. 2020).

    Starting from ``perm`` (e.g. :func:`landscape.align.activation_matching`), alternate Adam steps on
    the bend offset ``φ`` and projected gradient steps on doubly-stochastic relaxations of every
    permutation (see the module docstring for the objective and the Sinkhorn projection), then round
    each relaxation to its maximum-weight permutation and compare with ``perm``.

    Args:
        key: randomness for ``t`` and the minibatches (the result is a function of it).
        objective: training data, model and loss.
        a, b: the endpoints (matching params); ``b`` is permuted (softly) towards ``a``.
        perm: the initial permutation, ``{name: int array}`` as for :func:`landscape.align.apply`.
        spec: the permutation spec; default ``objective.apply_fn.spec``.
        outer: PAM rounds (reference: 1).
        inner_perm: projected gradient steps on the matrices per round (reference: 20).
        inner_phi: Adam steps on ``φ`` per round (reference: 250).
        batch_size: minibatch size of every step.
        learning_rate: Adam step size for ``φ``.
        perm_learning_rate: gradient step size ``η`` for the matrices.
        proximal: weight ``ρ`` of the proximal term ``(ρ/2)‖M − M_k‖²`` in the matrix steps.
        sinkhorn_iters, floor: the Sinkhorn projection's iterations and positivity floor.
        num_eval: evenly spaced ``t`` at which the curves before and after are evaluated.
        eval_objective: Objective for those evaluations (default: ``objective``).
        stats: BatchNorm running statistics of those evaluations (:mod:`probes.batchnorm`):
            ``"reset"`` (the default for a model with them: recomputed on the training inputs at
            every ``t`` between the ends) or ``"given"``.
        end_states: ``(state_a, state_b)``, the endpoints' own statistics under ``"reset"``
            (``state_a=None``: the objective's); B's are permuted with the permutation whose
            curve is evaluated (:func:`landscape.align.apply_state`).

    The verdict is local: it says that no small relaxed move of the permutations, at these step
    sizes, ends nearer another vertex of the Birkhoff polytope. On digits MLPs (64-64, 5 epochs) even
    the identity (unaligned) start rounds back to itself at ``perm_learning_rate`` 0.1 and 1.0, so
    ``True`` is necessary, not sufficient, for a good alignment.

    Returns:
        :class:`PAMResult` with the verdict ``locally_optimal``, the fraction of changed units per
        name, and the curve before (initial permutation) and after (rounded permutation).
    """
    tree.check_match(a, b)
    spec = getattr(objective.apply_fn, "spec", None) if spec is None else spec
    if not isinstance(spec, PermutationSpec):
        msg = f"pam_check needs a PermutationSpec (pass spec= or use a zoo apply_fn), got {type(spec).__name__}"
        raise ValueError(msg)
    sizes = spec.sizes(a)
    _check_is_permutation(perm, sizes)
    _check_int("outer", outer, 1)
    _check_int("inner_perm", inner_perm, 0)
    _check_int("inner_phi", inner_phi, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("num_eval", num_eval, 2)
    _check_int("sinkhorn_iters", sinkhorn_iters, 1)
    for name, value in (("learning_rate", learning_rate), ("perm_learning_rate", perm_learning_rate),
                        ("floor", floor)):
        if not (isinstance(value, (int, float)) and value > 0):
            msg = f"{name} must be a positive number, got {value!r}"
            raise ValueError(msg)
    if not (isinstance(proximal, (int, float)) and proximal >= 0):
        msg = f"proximal must be a number >= 0, got {proximal!r}"
        raise ValueError(msg)

    n = objective.num_examples
    bs = min(batch_size, n)
    loss_fn = objective.loss_fn
    table = spec.axes
    opt = optax.adam(learning_rate)

    def curve_points(phi: Params, mats: dict[str, Array]) -> Params:
        pb = _contract(table, mats, b)
        bend = jax.tree.map(lambda x, y, f: 0.5 * x + 0.5 * y + f, a, pb, phi)
        return tree.stack([a, bend, pb])

    def batch_loss(phi: Params, mats: dict[str, Array], k: Key, x: Array, y: Array) -> Array:
        kt, kb = jax.random.split(k)
        t = jax.random.uniform(kt)
        idx = jax.random.choice(kb, n, (bs,), replace=False)
        theta = bezier(curve_points(phi, mats))(t)
        return jnp.mean(loss_fn(_train_forward(objective.apply_fn, theta, x[idx]), y[idx]))

    @jax.jit
    def phi_phase(phi: Params, mats: dict[str, Array], k: Key, x: Array, y: Array) -> tuple[Params, Array]:
        def step(carry: tuple[Params, Any], i: Array) -> tuple[tuple[Params, Any], Array]:
            p, ostate = carry
            loss, g = jax.value_and_grad(batch_loss)(p, mats, jax.random.fold_in(k, i), x, y)
            updates, ostate = opt.update(g, ostate, p)
            return (optax.apply_updates(p, updates), ostate), loss

        (phi, _), losses = jax.lax.scan(step, (phi, opt.init(phi)), jnp.arange(inner_phi))
        return phi, losses

    @jax.jit
    def perm_phase(phi: Params, mats: dict[str, Array], k: Key, x: Array, y: Array) -> tuple[dict[str, Array], Array]:
        anchor = mats

        def step(m: dict[str, Array], i: Array) -> tuple[dict[str, Array], Array]:
            loss, g = jax.value_and_grad(batch_loss, argnums=1)(phi, m, jax.random.fold_in(k, i), x, y)
            m = {nm: _sinkhorn(m[nm] - perm_learning_rate * (g[nm] + proximal * (m[nm] - anchor[nm])),
                               sinkhorn_iters, floor) for nm in m}
            return m, loss

        return jax.lax.scan(step, mats, jnp.arange(inner_perm))

    from landscape.align import apply_state
    from probes.batchnorm import resolve_stats
    from probes.curves import _end_states

    ev = eval_objective if eval_objective is not None else objective
    mode = resolve_stats(ev, stats)
    if mode == "reset":
        _end_states(ev, np.array([0.0, 1.0]), end_states)  # fail before any work
        state_a, state_b = end_states

    def evaluate_curve(points: Params, p: Permutation) -> PathResult:
        if mode != "reset":
            return evaluate_path(ev, bezier(points), ts, chunk=5, stats="given" if mode == "given" else None)
        return evaluate_path(ev, bezier(points), ts, chunk=5, stats="reset", reset_x=objective.x,
                             end_states=(state_a, apply_state(spec, p, state_b)))

    ts = jnp.linspace(0.0, 1.0, num_eval)
    mats = permutation_matrices({nm: jnp.asarray(perm[nm]) for nm in spec.names})
    phi = tree.zeros_like(a)
    phi_losses, perm_losses = [], []
    before = None
    for r in range(outer):
        k_phi, k_perm = jax.random.split(jax.random.fold_in(key, r))
        phi, losses = phi_phase(phi, mats, k_phi, objective.x, objective.y)
        phi_losses.append(np.asarray(losses))
        if before is None:
            before = evaluate_curve(curve_points(phi, mats), perm)
        if inner_perm:
            mats, losses = perm_phase(phi, mats, k_perm, objective.x, objective.y)
            perm_losses.append(np.asarray(losses))
        else:
            perm_losses.append(np.zeros(0, dtype=np.float32))

    rounded = {nm: round_to_permutation(mats[nm]) for nm in spec.names}
    initial = {nm: jnp.asarray(perm[nm], dtype=jnp.int32) for nm in spec.names}
    changed = {nm: float(np.mean(np.asarray(rounded[nm]) != np.asarray(initial[nm]))) for nm in spec.names}
    after = evaluate_curve(curve_points(phi, permutation_matrices(rounded)), rounded)
    settings = {"outer": outer, "inner_perm": inner_perm, "inner_phi": inner_phi, "batch_size": bs,
                "learning_rate": learning_rate, "perm_learning_rate": perm_learning_rate, "proximal": proximal,
                "sinkhorn_iters": sinkhorn_iters, "floor": floor, "num_eval": num_eval,
                "projection": "sinkhorn", "stats": mode}
    return PAMResult(
        initial=initial,
        rounded=rounded,
        locally_optimal=all(v == 0.0 for v in changed.values()),
        changed_fraction=changed,
        relaxed=dict(mats),
        before=before,
        after=after,
        phi_losses=np.stack(phi_losses),
        perm_losses=np.stack(perm_losses),
        settings=settings,
    )

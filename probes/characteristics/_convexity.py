"""Mode convexity (survey §6.1.1): is the basin around a solution convex and full of diverse solutions?

Given basin members ``θ_1 … θ_M`` collected around a trained solution ``θ*`` (SWA/FGE checkpoints,
simplex samples: :mod:`probes.basin`), :func:`convexity` measures

* **chord convexity** — for random chords ``(a, b)`` between members, whether the midpoint is no
  higher than the chord: ``L(½(a + b)) ≤ ½ (L(a) + L(b)) + tol``. A convex function passes every
  chord, so the fraction passing is 1 on a convex basin;
* **linear barriers** between pairs of members (survey Eq. 1, :mod:`probes.curves`), loss and
  error: their mean, spread and every value;
* **SWA gain** — loss and accuracy of the members' average ``θ̄ = (1/M) Σ θ_m`` against the
  members' mean (Izmailov et al. 2018, arXiv 1803.05407): positive when averaging lands lower
  in a convex basin;
* **diversity and ensemble gain** — pairwise prediction disagreement and the accuracy / NLL gain of
  the probability-averaging ensemble (:mod:`probes.ensemble`; Garipov et al. 2018, arXiv
  1802.10026; Fort et al. 2019, arXiv 1912.02757): "diverse solutions" in the survey's sense;
* **curvature at the solution** — the top Hessian eigenvalue ``λ_max`` (Lanczos) and the spectral
  mass below ``−negative_tol · λ_max`` (stochastic Lanczos quadrature; Ghorbani et al. 2019,
  arXiv 1901.10159), from :mod:`probes.hessian`.

Chords, barriers and curvature use ``objective`` (the training loss: the landscape itself); SWA and
ensemble gains use ``eval_objective`` (held-out data, where the gains of averaging and ensembling
are claimed; ``objective`` when not given). Several basins (one per seed) give each number's mean,
standard deviation and samples.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landscape import tree
from landscape._types import Key, Params
from landscape.objective import Objective
from landscape.train import TrainState, Trainer
from probes import basin as basin_lib
from probes.characteristics._mixtures import evaluate_mixtures
from probes.curves import PathResult
from probes.ensemble import ensemble
from probes.numerics import json_safe, spread

__all__ = [
    "CONVEXITY_METRICS",
    "ConvexityResult",
    "ConvexitySample",
    "convexity",
    "convexity_from_training",
    "quick_convexity",
]

ENDPOINTS = ("members", "hull")
SAMPLERS = ("fge", "swa", "snapshot")

CONVEXITY_METRICS = (
    "chord_fraction",
    "barrier_loss",
    "barrier_loss_std",
    "barrier_error",
    "barrier_error_std",
    "member_loss",
    "member_accuracy",
    "average_loss",
    "average_accuracy",
    "swa_gain_loss",
    "swa_gain_accuracy",
    "ensemble_accuracy",
    "ensemble_nll",
    "ensemble_gain",
    "ensemble_nll_gain",
    "disagreement",
    "member_distance",
    "hessian_top",
    "negative_mass",
)
"""Per-basin numbers of a :class:`ConvexitySample` (``metrics``), summarised over seeds."""


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    """Spread over seeds (:func:`probes.numerics.spread`: finite samples, ``ddof=1``, counts)."""
    return spread(values).to_dict()


def _within(values: np.ndarray) -> tuple[float, float]:
    """Mean and ``ddof=1`` std inside one basin; NaN when any value is non-finite (propagated)."""
    sp = spread(values)
    return (sp.mean, sp.std) if sp.finite else (float("nan"), float("nan"))


@dataclasses.dataclass(frozen=True)
class ConvexitySample:
    """The convexity measurements of one basin (one seed).

    Attributes:
        chord_pairs: ``(C, 2)`` member indices of each chord (``endpoints="members"``), or the
            chord number twice for hull chords.
        chord_end_loss: ``(C, 2)`` loss at the two chord endpoints (``objective``).
        chord_mid_loss: ``(C,)`` loss at each chord midpoint.
        tol: the tolerance of the chord test.
        barrier_pairs: ``(P, 2)`` member pairs whose linear path was evaluated.
        barrier_loss: ``(P,)`` loss barrier (Eq. 1) of each pair.
        barrier_error: ``(P,)`` error-rate barrier of each pair.
        metrics: the headline numbers (see :data:`CONVEXITY_METRICS`; ``None`` where not measured).
    """

    chord_pairs: np.ndarray
    chord_end_loss: np.ndarray
    chord_mid_loss: np.ndarray
    tol: float
    barrier_pairs: np.ndarray
    barrier_loss: np.ndarray
    barrier_error: np.ndarray
    metrics: dict[str, float | None]

    @property
    def chord_convex(self) -> np.ndarray:
        """``(C,)`` whether each chord passes: midpoint ≤ mean endpoint loss + tol (False also for a
        chord with a non-finite loss; :attr:`chord_finite` tells them apart)."""
        return self.chord_mid_loss <= self.chord_end_loss.mean(axis=1) + self.tol

    @property
    def chord_finite(self) -> np.ndarray:
        """``(C,)`` whether the chord's endpoint and midpoint losses are all finite."""
        return np.isfinite(self.chord_mid_loss) & np.all(np.isfinite(self.chord_end_loss), axis=1)

    def to_dict(self) -> dict[str, Any]:
        return json_safe({
            "metrics": dict(self.metrics),
            "tol": self.tol,
            "chord_pairs": self.chord_pairs.tolist(),
            "chord_end_loss": self.chord_end_loss.tolist(),
            "chord_mid_loss": self.chord_mid_loss.tolist(),
            "barrier_pairs": self.barrier_pairs.tolist(),
            "barrier_loss": self.barrier_loss.tolist(),
            "barrier_error": self.barrier_error.tolist(),
        })


@dataclasses.dataclass(frozen=True)
class ConvexityResult:
    """Convexity of one or several basins (one per seed), from :func:`convexity`.

    The headline is :attr:`chord_fraction` (mean over seeds); :attr:`summary` gives every metric's
    mean, standard deviation and per-seed samples.
    """

    samples: tuple[ConvexitySample, ...]
    settings: dict[str, Any]

    @property
    def num_seeds(self) -> int:
        return len(self.samples)

    @property
    def summary(self) -> dict[str, dict[str, Any]]:
        """``metric -> {"mean", "std", "n", "n_nonfinite", "samples"}`` over seeds
        (:func:`probes.numerics.spread`)."""
        return {m: _stats([s.metrics.get(m) for s in self.samples]) for m in CONVEXITY_METRICS}

    @property
    def chord_fraction(self) -> float:
        """Fraction of chords passing the midpoint test, averaged over seeds (NaN if a seed's is)."""
        return float(np.mean([s.metrics["chord_fraction"] for s in self.samples]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: the settings, the summary over seeds and every seed's raw measurements."""
        return json_safe({
            "settings": dict(self.settings),
            "num_seeds": self.num_seeds,
            "chord_fraction": self.chord_fraction,
            "summary": self.summary,
            "samples": [s.to_dict() for s in self.samples],
        })

    def plot(self) -> Any:
        """Plotly figure: chords (midpoint vs mean endpoint loss), pair barriers, accuracy of members,
        their average and their ensemble, one colour per seed."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        from probes.plot import COLORS

        fig = make_subplots(rows=1, cols=3, subplot_titles=(
            "chords: midpoint vs mean endpoint loss", "linear barriers between members (loss)",
            "accuracy (eval data)"))
        lo, hi = np.inf, -np.inf
        for i, s in enumerate(self.samples):
            c = COLORS[i % len(COLORS)]
            ends = s.chord_end_loss.mean(axis=1)
            lo, hi = min(lo, ends.min(), s.chord_mid_loss.min()), max(hi, ends.max(), s.chord_mid_loss.max())
            fig.add_trace(go.Scatter(x=ends, y=s.chord_mid_loss, mode="markers", marker_color=c,
                                     name=f"seed {i}", legendgroup=str(i)), row=1, col=1)
            fig.add_trace(go.Box(y=s.barrier_loss, name=f"seed {i}", marker_color=c, legendgroup=str(i),
                                 showlegend=False, boxpoints="all"), row=1, col=2)
            m = s.metrics
            fig.add_trace(go.Bar(x=["members (mean)", "average (SWA)", "ensemble"],
                                 y=[m["member_accuracy"], m["average_accuracy"], m["ensemble_accuracy"]],
                                 marker_color=c, name=f"seed {i}", legendgroup=str(i), showlegend=False),
                          row=1, col=3)
        if np.isfinite(lo):
            fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line={"dash": "dash", "color": "gray"},
                                     name="midpoint = chord"), row=1, col=1)
        fig.update_xaxes(title_text="mean endpoint loss", row=1, col=1)
        fig.update_yaxes(title_text="midpoint loss", row=1, col=1)
        fig.update_layout(title=f"mode convexity: {self.chord_fraction:.3f} of chords convex "
                                f"({self.num_seeds} seed{'s' if self.num_seeds != 1 else ''})", barmode="group")
        return fig


_eval = jax.jit(lambda objective, params: objective.evaluate(params))


def _check_objective(name: str, obj: Any) -> None:
    if not isinstance(obj, Objective):
        msg = f"{name} must be a landscape.Objective, got {type(obj).__name__}"
        raise ValueError(msg)


def _basins(members: Any, center: Params | None) -> list[tuple[list[Params], Params | None, Params]]:
    """``[(members, average or None, center)]`` per seed, validated."""
    if not isinstance(members, (list, tuple)) or not members:
        msg = "members must be a non-empty sequence of params (one basin) or of BasinResult/SimplexResult (one per seed)"
        raise ValueError(msg)
    kinds = (basin_lib.BasinResult, basin_lib.SimplexResult)
    if all(isinstance(m, kinds) for m in members):
        if center is not None:
            msg = "center is taken from each BasinResult/SimplexResult; pass center only with a plain list of members"
            raise ValueError(msg)
        out = []
        for m in members:
            start = m.start if isinstance(m, basin_lib.BasinResult) else m.vertices[0]
            out.append((list(m.members), m.average, start))
    elif any(isinstance(m, kinds) for m in members):
        msg = "members mixes BasinResult/SimplexResult with plain params; give one kind"
        raise ValueError(msg)
    else:
        out = [(list(members), None, members[0] if center is None else center)]
    for s, (ms, _, c) in enumerate(out):
        if len(ms) < 2:
            msg = f"convexity needs at least 2 members per basin, got {len(ms)} (basin {s})"
            raise ValueError(msg)
        for i, m in enumerate(ms[1:], start=1):
            tree.check_match(ms[0], m, names=(f"basin {s} members[0]", f"basin {s} members[{i}]"))
        tree.check_match(ms[0], c, names=(f"basin {s} members[0]", f"basin {s} center"))
    return out


def _chords(key: Key, m: int, num_chords: int, endpoints: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights of chord endpoints a, b ``(C, M)`` and the pair indices ``(C, 2)``."""
    if endpoints == "members":
        pairs = np.array([(i, j) for i in range(m) for j in range(i + 1, m)])
        if num_chords < len(pairs):
            pick = np.asarray(jax.random.choice(key, len(pairs), (num_chords,), replace=False))
            pairs = pairs[np.sort(pick)]
        eye = np.eye(m)
        return eye[pairs[:, 0]], eye[pairs[:, 1]], pairs
    g = np.asarray(jax.random.exponential(key, (2, num_chords, m)), np.float64)
    wa, wb = g / g.sum(axis=-1, keepdims=True)  # uniform on the simplex: normalised Exp(1) = Dirichlet(1, ..., 1)
    idx = np.arange(num_chords)
    return wa, wb, np.stack([idx, idx], axis=1)


def _measure(
    key: Key, objective: Objective, eval_objective: Objective, members: list[Params], avg: Params | None,
    center: Params, *, num_chords: int, tol: float, endpoints: str, num_points: int, max_pairs: int,
    curvature: bool, lanczos_steps: int, slq_steps: int, negative_tol: float, chunk: int,
    mode: str = "none", member_states: list[Params] | None = None,
) -> ConvexitySample:
    k_chord, k_pairs, k_eig, k_slq = jax.random.split(key, 4)
    m = len(members)
    stacked = tree.stack(members)
    wa, wb, chord_pairs = _chords(k_chord, m, num_chords, endpoints)
    c = len(chord_pairs)
    all_pairs = np.array([(i, j) for i in range(m) for j in range(i + 1, m)])
    if len(all_pairs) > max_pairs:
        pick = np.asarray(jax.random.choice(k_pairs, len(all_pairs), (max_pairs,), replace=False))
        all_pairs = all_pairs[np.sort(pick)]
    # one compiled evaluation for chord endpoints, midpoints and every point of the pair paths
    ts = np.linspace(0.0, 1.0, num_points)
    eye = np.eye(m)
    path_w = np.concatenate([np.outer(1 - ts, eye[i]) + np.outer(ts, eye[j]) for i, j in all_pairs])
    weights = np.concatenate([wa, wb, 0.5 * (wa + wb), path_w])
    if mode == "reset":
        loss, acc = _mixtures_reset(objective, stacked, weights, member_states, chunk=chunk)
    else:
        loss, acc = evaluate_mixtures(objective, stacked, weights, chunk=chunk)
    end_loss = np.stack([loss[:c], loss[c:2 * c]], axis=1)
    mid_loss = loss[2 * c:3 * c]
    # a chord with a non-finite loss neither passes nor fails: it makes the fraction NaN
    chord_ok = np.isfinite(mid_loss) & np.all(np.isfinite(end_loss), axis=1)
    convex = np.where(chord_ok, mid_loss <= end_loss.mean(axis=1) + tol, np.nan)
    pl, pa = loss[3 * c:].reshape(len(all_pairs), num_points), acc[3 * c:].reshape(len(all_pairs), num_points)
    paths = [PathResult(ts=ts, loss=pl[p], accuracy=pa[p]) for p in range(len(all_pairs))]
    bl = np.array([p.barrier.loss for p in paths])
    be = np.array([p.barrier.error for p in paths])

    ens = ensemble(eval_objective, stacked)
    member_acc = float(jnp.mean(ens.member_accuracy))
    avg = basin_lib.average(members) if avg is None else avg
    if mode == "reset":  # members with their own statistics (RESET without them), the average with RESET
        from probes import batchnorm as bn

        x, bs = bn.reset_inputs(eval_objective, objective.x)
        keep = bn.momentum(eval_objective, avg)
        if member_states is not None:
            member_eval = [bn.evaluate_at(eval_objective, p, st) for p, st in zip(members, member_states)]
        else:
            out = bn.evaluate_stacked_reset(eval_objective, stacked, x=x, keep=keep, chunk=chunk, batch_size=bs)
            member_eval = [{k: v[i] for k, v in out.items()} for i in range(m)]
        avg_eval = {k: v[0] for k, v in bn.evaluate_stacked_reset(
            eval_objective, tree.stack([avg]), x=x, keep=keep, chunk=1, batch_size=bs).items()}
    else:
        member_eval = [_eval(eval_objective, p) for p in members]
        avg_eval = _eval(eval_objective, avg)
    member_loss = float(np.mean([float(e["loss"]) for e in member_eval]))
    flat = jnp.stack([tree.ravel(p)[0] for p in members])
    iu = np.triu_indices(m, k=1)
    dist = jnp.linalg.norm(flat[iu[0]] - flat[iu[1]], axis=1)

    top = neg = None
    if curvature:
        from probes import hessian

        n = tree.num_params(center)
        spec = hessian.eigenvalues(k_eig, objective, center, k=1, num_steps=min(lanczos_steps, n))
        dens = hessian.density(k_slq, objective, center, num_probes=1, num_steps=min(slq_steps, n), grid=64)
        top = float(spec.top)
        cut = -negative_tol * abs(top)
        nodes, wts = np.asarray(dens.nodes, np.float64), np.asarray(dens.weights, np.float64)
        neg = float(np.mean(np.sum(wts * (nodes < cut), axis=-1)))

    metrics: dict[str, float | None] = {
        "chord_fraction": float(np.mean(convex)),
        "barrier_loss": _within(bl)[0],
        "barrier_loss_std": _within(bl)[1],
        "barrier_error": _within(be)[0],
        "barrier_error_std": _within(be)[1],
        "member_loss": member_loss,
        "member_accuracy": member_acc,
        "average_loss": float(avg_eval["loss"]),
        "average_accuracy": float(avg_eval["accuracy"]),
        "swa_gain_loss": member_loss - float(avg_eval["loss"]),
        "swa_gain_accuracy": float(avg_eval["accuracy"]) - member_acc,
        "ensemble_accuracy": float(ens.accuracy),
        "ensemble_nll": float(ens.nll),
        "ensemble_gain": float(ens.gain),
        "ensemble_nll_gain": float(ens.nll_gain),
        "disagreement": float(ens.mean_disagreement),
        "member_distance": float(jnp.mean(dist)),
        "hessian_top": top,
        "negative_mass": neg,
    }
    return ConvexitySample(
        chord_pairs=chord_pairs, chord_end_loss=end_loss, chord_mid_loss=mid_loss, tol=float(tol),
        barrier_pairs=all_pairs, barrier_loss=bl, barrier_error=be, metrics=metrics,
    )


def _mixtures_reset(
    objective: Objective, stacked: Params, weights: np.ndarray, member_states: list[Params] | None, *, chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mixture rows with RESET statistics (on the objective's inputs); a row that is one member
    (``w = e_i``) uses that member's own statistics when ``member_states`` gives them."""
    from probes import batchnorm as bn

    loss = np.full(len(weights), np.nan)
    acc = np.full(len(weights), np.nan)
    one_hot = np.isclose(weights.max(axis=1), 1.0) & np.isclose(weights.sum(axis=1), 1.0) if member_states else (
        np.zeros(len(weights), bool))
    inner = np.flatnonzero(~one_hot)
    if inner.size:
        x, bs = bn.reset_inputs(objective, None)
        keep = bn.momentum(objective, jax.tree.map(lambda v: v[0], stacked))
        li, ai = bn.evaluate_mixtures_reset(objective, stacked, jnp.asarray(weights[inner], jnp.float32), x, keep,
                                            chunk=chunk, batch_size=bs)
        loss[inner], acc[inner] = np.asarray(li, np.float64), np.asarray(ai, np.float64)
    if one_hot.any():
        own = [bn.evaluate_at(objective, jax.tree.map(lambda v, i=i: v[i], stacked), st)
               for i, st in enumerate(member_states)]
        for r in np.flatnonzero(one_hot):
            i = int(np.argmax(weights[r]))
            loss[r], acc[r] = float(own[i]["loss"]), float(own[i]["accuracy"])
    return loss, acc


def _member_states(members: Any) -> list[list[Params] | None]:
    """Each basin's members' own model states (a BasinResult keeps them), else None."""
    if isinstance(members, (list, tuple)) and members and all(isinstance(m, basin_lib.BasinResult) for m in members):
        return [list(m.model_states) if all(jax.tree.leaves(st) for st in m.model_states) else None for m in members]
    n = len(members) if isinstance(members, (list, tuple)) and members and isinstance(
        members[0], (basin_lib.BasinResult, basin_lib.SimplexResult)) else 1
    return [None] * n


def convexity(
    key: Key,
    objective: Objective,
    members: Sequence[Params] | Sequence[basin_lib.BasinResult | basin_lib.SimplexResult],
    *,
    eval_objective: Objective | None = None,
    center: Params | None = None,
    num_chords: int = 64,
    tol: float = 0.0,
    endpoints: str = "members",
    num_points: int = 11,
    max_pairs: int = 28,
    curvature: bool = True,
    lanczos_steps: int = 20,
    slq_steps: int = 30,
    negative_tol: float = 1e-3,
    chunk: int = 4,
    stats: str | None = None,
) -> ConvexityResult:
    """Measure mode convexity of given basin members (survey §6.1.1).

    Chord test: a chord joins two endpoints ``a, b`` (members, or with ``endpoints="hull"``
    uniform random points ``Σ_m w_m θ_m`` of the members' convex hull); it passes when

    .. math::  L(\\tfrac12 (a + b)) \\le \\tfrac12 (L(a) + L(b)) + \\text{tol}.

    With ``endpoints="members"`` all ``M(M−1)/2`` member pairs are used when ``num_chords`` is at
    least that many, else ``num_chords`` distinct pairs drawn at random. Linear barriers use at most
    ``max_pairs`` pairs and ``num_points`` points per path. See the module docstring for the other
    numbers (SWA gain, ensemble gain and disagreement, curvature at the solution).

    Args:
        key: randomness for chords, pair subsets and the Lanczos / SLQ probes.
        objective: the loss whose landscape is measured (training data).
        members: one basin's members (matching params, at least 2), or one
            :class:`~probes.basin.BasinResult` / :class:`~probes.basin.SimplexResult` per seed
            (their averages and start points are used; the summary spreads over them).
        eval_objective: held-out data for SWA and ensemble gains (default ``objective``).
        center: the solution the curvature is measured at, for a plain list of members
            (default ``members[0]``).
        num_chords, tol, endpoints: the chord test.
        num_points, max_pairs: the barrier paths.
        curvature: measure the top Hessian eigenvalue (``lanczos_steps`` Lanczos steps) and the
            spectral mass below zero (SLQ, one probe, ``slq_steps`` steps) at the solution.
        negative_tol: the spectral mass counts quadrature nodes below ``−negative_tol · |λ_max|``:
            at a minimum most eigenvalues are ≈ 0 and SLQ lumps them into one node of weight ≈ 1
            whose sign is rounding noise, so "below zero" needs a scale.
        chunk: points evaluated together (vmapped) per sequential step.
        stats: BatchNorm running statistics (:mod:`probes.batchnorm`): ``"reset"`` (the default
            for a model with them) evaluates every chord point, path point and the average with
            statistics recomputed there on the training inputs (RESET; SWA's ``bn_update``), and
            the members with their own (kept by a :class:`~probes.basin.BasinResult`; RESET when
            none are known); ``"given"`` uses the objective's everywhere. ``settings["stats"]``
            and ``settings["member_stats"]`` record them. Ensemble scores and the curvature at
            the solution use the objective's statistics.

    Returns:
        :class:`ConvexityResult` (``.summary`` mean/std/samples over seeds, ``.to_dict()``, ``.plot()``).

    Raises:
        ValueError: fewer than 2 members in a basin, members that do not match, bad settings.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from landscape import Objective
        >>> obj = Objective(lambda p, x: jnp.zeros((x.shape[0], 1)) + jnp.sum(p["w"] ** 2),
        ...                 jnp.zeros((4, 1)), jnp.zeros((4, 1)), loss=lambda z, y: z[:, 0])
        >>> pts = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}, {"w": jnp.array([-1.0, 0.0])}]
        >>> res = convexity(jax.random.key(0), obj, pts, curvature=False, num_points=5)
        >>> res.chord_fraction
        1.0
    """
    _check_objective("objective", objective)
    ev = objective if eval_objective is None else eval_objective
    _check_objective("eval_objective", ev)
    if endpoints not in ENDPOINTS:
        msg = f"unknown endpoints {endpoints!r}; accepted: {list(ENDPOINTS)}"
        raise ValueError(msg)
    for name, value, low in (("num_chords", num_chords, 1), ("num_points", num_points, 2),
                             ("max_pairs", max_pairs, 1), ("lanczos_steps", lanczos_steps, 1),
                             ("slq_steps", slq_steps, 1), ("chunk", chunk, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            msg = f"{name} must be an int >= {low}, got {value!r}"
            raise ValueError(msg)
    if not (isinstance(negative_tol, (int, float)) and negative_tol >= 0):
        msg = f"negative_tol must be a float >= 0, got {negative_tol!r}"
        raise ValueError(msg)
    if not (isinstance(tol, (int, float)) and math.isfinite(tol)):
        msg = f"tol must be a finite float, got {tol!r}"
        raise ValueError(msg)
    from probes.batchnorm import resolve_stats

    mode = resolve_stats(objective, stats)
    resolve_stats(ev, mode if mode != "none" else None)
    basins = _basins(members, center)
    own = _member_states(members) if mode == "reset" else [None] * len(basins)
    samples = tuple(
        _measure(jax.random.fold_in(key, s), objective, ev, ms, avg, c, num_chords=num_chords, tol=float(tol),
                 endpoints=endpoints, num_points=num_points, max_pairs=max_pairs, curvature=curvature,
                 lanczos_steps=lanczos_steps, slq_steps=slq_steps, negative_tol=float(negative_tol), chunk=chunk,
                 mode=mode, member_states=own[s])
        for s, (ms, avg, c) in enumerate(basins)
    )
    settings = {"num_chords": num_chords, "tol": float(tol), "endpoints": endpoints, "num_points": num_points,
                "max_pairs": max_pairs, "curvature": bool(curvature), "lanczos_steps": lanczos_steps,
                "slq_steps": slq_steps, "negative_tol": float(negative_tol), "num_members": [len(b[0]) for b in basins],
                "stats": mode,
                "member_stats": mode if mode != "reset" else ("own" if all(o is not None for o in own) else "reset")}
    return ConvexityResult(samples=samples, settings=settings)


def convexity_from_training(
    key: Key,
    trainer: Trainer,
    states: TrainState | Sequence[TrainState],
    *,
    method: str = "fge",
    sampling: dict[str, Any] | None = None,
    eval_objective: Objective | None = None,
    **options: Any,
) -> ConvexityResult:
    """Sample a basin around each trained state with :mod:`probes.basin`, then :func:`convexity`.

    Args:
        key: randomness for the sampling runs (data order) and the measurement.
        trainer: model, data, batch size and loss of the trained states; the measured ``objective``
            is its training set under its loss.
        states: one trained :class:`~landscape.train.TrainState` per seed.
        method: ``"fge"`` (:func:`~probes.basin.fge`), ``"swa"`` (:func:`~probes.basin.swa`) or
            ``"snapshot"`` (:func:`~probes.basin.snapshot_ensemble`).
        sampling: keyword arguments of that sampler (e.g. ``{"cycles": 6, "cycle_steps": 22}``
            for FGE/snapshot, ``{"steps": 120, "every": 20}`` for SWA).
        eval_objective: held-out data for SWA and ensemble gains.
        **options: further settings of :func:`convexity` (``num_chords``, ``tol``, ``curvature`` ...).

    Returns:
        :class:`ConvexityResult` with one sample per state; ``settings["sampling"]`` records the
        sampler and its settings.
    """
    if method not in SAMPLERS:
        msg = f"unknown method {method!r}; accepted: {list(SAMPLERS)}"
        raise ValueError(msg)
    states = [states] if isinstance(states, TrainState) else list(states)
    if not states:
        msg = "states must hold at least one trained TrainState"
        raise ValueError(msg)
    fn = {"fge": basin_lib.fge, "swa": basin_lib.swa, "snapshot": basin_lib.snapshot_ensemble}[method]
    kw = dict(sampling or {})
    k_sample, k_measure = jax.random.split(key)
    basins = [fn(jax.random.fold_in(k_sample, i), trainer, st, **kw) for i, st in enumerate(states)]
    objective = Objective(trainer.apply_fn, trainer.x, trainer.y, loss=trainer.loss)
    res = convexity(k_measure, objective, basins, eval_objective=eval_objective, **options)
    settings = dict(res.settings)
    settings["sampling"] = {"method": method, **basins[0].settings_dict}
    return dataclasses.replace(res, settings=settings)


QUICK_CONVEXITY: dict[str, Any] = {
    "method": "fge",
    "sampling": {"cycles": 6, "learning_rate": 0.05, "final_fraction": 0.01},
    "num_chords": 15,
    "num_points": 9,
    "lanczos_steps": 20,
    "slq_steps": 24,
}
"""Settings of :func:`quick_convexity` (the report's quick section)."""


def quick_convexity(
    key: Key, trainer: Trainer, states: TrainState | Sequence[TrainState], *, eval_objective: Objective | None = None
) -> ConvexityResult:
    """:func:`convexity_from_training` with :data:`QUICK_CONVEXITY`: six FGE cycles of one epoch
    (``trainer.steps_per_epoch`` steps) per state (a few seconds per state on digits, 2-core CPU)."""
    kw = dict(QUICK_CONVEXITY)
    sampling = {**kw.pop("sampling"), "cycle_steps": trainer.steps_per_epoch}
    return convexity_from_training(key, trainer, states, method=kw.pop("method"), sampling=sampling,
                                   eval_objective=eval_objective, **kw)

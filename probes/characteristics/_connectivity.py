"""Mode connectivity (survey §6.1.4): are independently trained solutions connected?

For each pair ``(A, B)`` of independently initialised models, :func:`connectivity` measures the
linear loss barrier (survey Eq. 1, :mod:`probes.curves`) on the training set and, when given, on
held-out data, for

* ``naive`` — the straight line from A to B as trained;
* ``weight_matching`` — B permuted to A by weight matching (Ainsworth et al. 2022, arXiv
  2209.04836), the function of B unchanged;
* ``activation_matching`` — B permuted by the correlation of z-scored activations (Tatro et al.
  2020, arXiv 2009.02439);
* ``repair`` — every point of the weight-matched line REPAIRed: each unit's pre-activation mean
  and standard deviation reset to the interpolation of the endpoints' (Jordan et al. 2022, arXiv
  2211.08403);
* ``bezier`` / ``bezier_aligned`` — a quadratic Bezier curve fitted between A and B, before and
  after weight matching (Garipov et al. 2018, arXiv 1802.10026; aligning first is Tatro et al.'s
  proposal);

plus the weight-matching objective and the singular-direction alignment of corresponding layers
before and after the permutation (Ito et al. 2024, arXiv 2402.04051). Several pairs (seeds) give
means and spreads; :func:`connectivity_vs_width` trains pairs at several widths.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landscape import align, tree
from landscape._types import Key, Params
from landscape.objective import Objective
from probes.curves import PathResult, evaluate_path, fit_curve, interpolate
from probes.numerics import json_safe, spread

__all__ = ["CONNECTIVITY_METHODS", "ConnectivityResult", "ConnectivitySample", "connectivity", "connectivity_vs_width"]

CONNECTIVITY_METHODS = ("naive", "weight_matching", "activation_matching", "repair", "bezier", "bezier_aligned")


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    """Spread over pairs (:func:`probes.numerics.spread`: finite samples, ``ddof=1``, counts)."""
    return spread(values).to_dict()


@dataclasses.dataclass(frozen=True)
class ConnectivitySample:
    """One pair's measurements.

    Attributes:
        paths: ``{method: {split: PathResult}}`` for every measured method and split.
        wm_objective: ``<θ_A, π(θ_B)>`` reached by weight matching and its value at the identity.
        wm_sweeps: coordinate-descent sweeps weight matching used.
        singular: singular-alignment summary before/after weight matching (``None`` if skipped).
        seconds: wall time of each step.
        aligned: B permuted by weight matching (``None`` when no method needed it).
        curves: the fitted curves by method name (``"bezier"``, ``"bezier_aligned"``).
        aligned_state: B's running statistics permuted like ``aligned`` (``None`` without them).
    """

    paths: dict[str, dict[str, PathResult]]
    wm_objective: dict[str, float]
    wm_sweeps: int
    singular: dict[str, Any] | None
    seconds: dict[str, float]
    aligned: Params | None = None
    curves: dict[str, Any] = dataclasses.field(default_factory=dict)
    aligned_state: Params | None = None

    def barrier(self, method: str, split: str = "train", metric: str = "loss") -> float:
        b = self.paths[method][split].barrier
        return b.loss if metric == "loss" else b.error

    def to_dict(self) -> dict[str, Any]:
        return json_safe({
            "paths": {m: {s: r.to_dict() for s, r in d.items()} for m, d in self.paths.items()},
            "wm_objective": self.wm_objective,
            "wm_sweeps": self.wm_sweeps,
            "singular": self.singular,
            "seconds": self.seconds,
        })


@dataclasses.dataclass(frozen=True)
class ConnectivityResult:
    """Connectivity of several independently trained pairs, with spreads over pairs."""

    samples: tuple[ConnectivitySample, ...]
    label: str = ""
    stats: str = "none"
    """BatchNorm statistics of the paths' points (:mod:`probes.batchnorm`): reset, given or none."""

    @property
    def methods(self) -> list[str]:
        return [m for m in CONNECTIVITY_METHODS if m in self.samples[0].paths]

    @property
    def splits(self) -> list[str]:
        return list(self.samples[0].paths["naive"])

    def table(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{method: {split: {"loss_barrier", "error_barrier", "midpoint_accuracy": stats}}}``."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for m in self.methods:
            out[m] = {}
            for s in self.splits:
                rs = [smp.paths[m][s] for smp in self.samples]
                out[m][s] = {
                    "loss_barrier": _stats([r.barrier.loss for r in rs]),
                    "error_barrier": _stats([r.barrier.error for r in rs]),
                    "midpoint_accuracy": _stats([r.midpoint["accuracy"] for r in rs]),
                }
        return out

    def to_dict(self) -> dict[str, Any]:
        sing = [s.singular for s in self.samples if s.singular]
        return json_safe({
            "label": self.label,
            "stats": self.stats,
            "num_pairs": len(self.samples),
            "table": self.table(),
            "wm_objective": _stats([s.wm_objective["matched"] for s in self.samples]),
            "singular_mean_before": _stats([s["mean_before"] for s in sing]),
            "singular_mean_after": _stats([s["mean_after"] for s in sing]),
            "seconds": {k: _stats([s.seconds[k] for s in self.samples]) for k in self.samples[0].seconds},
            "samples": [s.to_dict() for s in self.samples],
        })

    def plot(self, *, split: str = "train", title: str | None = None) -> Any:
        """Loss and error along every method's path (first pair), on ``split``."""
        from probes.plot import path_figure

        first = self.samples[0].paths
        return path_figure([(m, first[m][split]) for m in self.methods], title=title or f"connectivity ({split})")


def _evaluate(objectives: dict[str, Objective], path: Any, ts: jax.Array, **bn: Any) -> dict[str, PathResult]:
    return {s: evaluate_path(o, path, ts, chunk=5, **bn) for s, o in objectives.items()}


def _evaluate_points(objective: Objective, stacked: Params, ts: jax.Array, mode: str, bn: dict[str, Any]) -> PathResult:
    """Evaluate stacked points of a path (e.g. REPAIRed ones): the ends with their own statistics and
    RESET between them (``mode="reset"``), or the objective's statistics everywhere."""
    if mode != "reset":
        ev = jax.lax.map(objective.evaluate, stacked)
        return PathResult(ts=ts, loss=ev["loss"], accuracy=ev["accuracy"], stats=mode, end_stats=mode)
    from probes import batchnorm as bnorm

    t_np = np.asarray(ts)
    loss, acc = np.full(t_np.size, np.nan, np.float32), np.full(t_np.size, np.nan, np.float32)
    inner = np.flatnonzero((t_np != 0.0) & (t_np != 1.0))
    if inner.size:
        pts = jax.tree.map(lambda v: v[inner], stacked)
        keep = bnorm.momentum(objective, jax.tree.map(lambda v: v[0], pts))
        out = bnorm.evaluate_stacked_reset(objective, pts, x=bn["reset_x"], keep=keep, chunk=5)
        loss[inner], acc[inner] = out["loss"], out["accuracy"]
    for i, state in ((0, bn["end_states"][0]), (t_np.size - 1, bn["end_states"][1])):
        if t_np[i] in (0.0, 1.0):
            state = objective.apply_fn.state if state is None else state
            out = bnorm.evaluate_at(objective, jax.tree.map(lambda v, i=i: v[i], stacked), state)
            loss[i], acc[i] = float(out["loss"]), float(out["accuracy"])
    return PathResult(ts=ts, loss=jnp.asarray(loss), accuracy=jnp.asarray(acc), stats="reset", end_stats="own")


def connectivity(
    key: Key,
    objective: Objective,
    pairs: Sequence[tuple[Params, Params]],
    *,
    eval_objectives: dict[str, Objective] | None = None,
    apply_fn: Any = None,
    spec: align.PermutationSpec | None = None,
    methods: Sequence[str] = CONNECTIVITY_METHODS,
    num: int = 25,
    curve_steps: int = 500,
    curve_learning_rate: float = 1e-3,
    singular_k: int = 10,
    label: str = "",
    stats: str | None = None,
    states: Sequence[tuple[Params, Params]] | None = None,
    curve_alignment: str = "weight_matching",
) -> ConnectivityResult:
    """Barriers between independently trained pairs, naive and after alignment, REPAIR and curves.

    Args:
        key: randomness for weight matching's visiting order and the curve fits.
        objective: the training set (matching statistics, REPAIR statistics and curve fitting use it;
            its barriers are reported under ``"train"``).
        pairs: ``[(A, B), ...]`` independently trained params of one architecture.
        eval_objectives: further splits to report barriers on, e.g. ``{"test": test_objective}``.
        apply_fn: the zoo model (``intermediates`` and ``spec``); default ``objective.apply_fn``.
        spec: permutation spec; default ``apply_fn.spec``.
        methods: which of :data:`CONNECTIVITY_METHODS` to run (``"naive"`` always runs).
        num: points per path.
        curve_steps, curve_learning_rate: Bezier fitting settings.
        singular_k: top singular directions compared (0 skips the singular alignment).
        label: a name for the setting (e.g. the width).
        stats: BatchNorm running statistics (:mod:`probes.batchnorm`): ``"reset"`` (the default
            for a model with them) evaluates every point between the ends of every path and curve,
            on every split, with statistics recomputed there on the training inputs (RESET,
            Jordan et al. 2022), and the ends with their own (``states``; an aligned B's are
            permuted with :func:`landscape.align.apply_state`); ``"given"`` uses the objective's
            statistics everywhere.
        states: ``[(state_a, state_b), ...]``, each pair's own running statistics (needed under
            ``stats="reset"``).
        curve_alignment: which aligned B the ``"bezier_aligned"`` curve is fitted to:
            ``"weight_matching"`` (default) or ``"activation_matching"`` — Tatro et al. 2020's
            pipeline (arXiv 2009.02439): align hidden units by the correlation of their activations
            on the training inputs, then fit the curve between A and the aligned B.

    Returns:
        :class:`ConnectivityResult` with every path, means and spreads over the pairs.
    """
    unknown = [m for m in methods if m not in CONNECTIVITY_METHODS]
    if unknown:
        msg = f"unknown connectivity methods {unknown}; accepted: {list(CONNECTIVITY_METHODS)}"
        raise ValueError(msg)
    if not pairs:
        msg = "connectivity needs at least one (A, B) pair"
        raise ValueError(msg)
    if curve_alignment not in ("weight_matching", "activation_matching"):
        msg = f"curve_alignment must be 'weight_matching' or 'activation_matching', got {curve_alignment!r}"
        raise ValueError(msg)
    apply_fn = objective.apply_fn if apply_fn is None else apply_fn
    spec = getattr(apply_fn, "spec", None) if spec is None else spec
    needs_spec = {"weight_matching", "activation_matching", "repair", "bezier_aligned"} & set(methods)
    if needs_spec and spec is None:
        msg = f"methods {sorted(needs_spec)} need a permutation spec (pass spec= or a zoo apply_fn)"
        raise ValueError(msg)
    for i, (a, b) in enumerate(pairs):
        tree.check_match(a, b, names=(f"pairs[{i}][0]", f"pairs[{i}][1]"))
        if spec is not None:
            align.check_spec(spec, a)
    objectives = {"train": objective, **(eval_objectives or {})}
    from probes.batchnorm import resolve_stats

    mode = resolve_stats(objective, stats)
    for o in objectives.values():
        resolve_stats(o, mode if mode != "none" else None)
    if mode == "reset" and (states is None or len(states) != len(pairs)):
        got = "none" if states is None else f"{len(states)}"
        msg = (
            "connectivity with stats='reset' evaluates every path's ends with their own BatchNorm running "
            f"statistics: pass states=[(state_a, state_b), ...], one pair per model pair ({len(pairs)}; got "
            f"{got}), or stats='given'"
        )
        raise ValueError(msg)
    ts = jnp.linspace(0.0, 1.0, num)
    samples = []
    for i, (a, b) in enumerate(pairs):
        k_wm, k_curve, k_curve2 = jax.random.split(jax.random.fold_in(key, i), 3)
        s_a, s_b = states[i] if mode == "reset" else (None, None)

        def bn_for(state_b: Params | None) -> dict[str, Any]:
            if mode != "reset":
                return {"stats": mode if mode != "none" else None}
            return {"stats": "reset", "end_states": (s_a, state_b), "reset_x": objective.x}

        paths: dict[str, dict[str, PathResult]] = {}
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        paths["naive"] = {s: interpolate(o, a, b, num=num, **bn_for(s_b)) for s, o in objectives.items()}
        seconds["naive"] = time.perf_counter() - t0
        wm_obj: dict[str, float] = {}
        sweeps = 0
        b_wm = s_wm = None
        singular = None
        if needs_spec:
            t0 = time.perf_counter()
            perm, info = align.weight_matching(k_wm, spec, a, b)
            b_wm = align.apply(spec, perm, b)
            s_wm = align.apply_state(spec, perm, s_b) if mode == "reset" else None
            seconds["weight_matching_solve"] = time.perf_counter() - t0
            wm_obj = {"matched": float(tree.vdot(a, b_wm)), "identity": float(tree.vdot(a, b))}
            sweeps = int(getattr(info, "iterations", 0))
            if "weight_matching" in methods:
                t0 = time.perf_counter()
                paths["weight_matching"] = {s: interpolate(o, a, b_wm, num=num, **bn_for(s_wm))
                                            for s, o in objectives.items()}
                seconds["weight_matching"] = time.perf_counter() - t0
            if singular_k:
                from probes.singular import singular_alignment

                t0 = time.perf_counter()
                singular = singular_alignment(a, b, k=singular_k, perm=perm, spec=spec).summary()
                seconds["singular"] = time.perf_counter() - t0
        b_am = s_am = None
        tatro = curve_alignment == "activation_matching" and "bezier_aligned" in methods
        if "activation_matching" in methods or tatro:
            t0 = time.perf_counter()
            perm_am, _ = align.activation_matching(spec, a, b, objective, apply_fn=apply_fn)
            b_am = align.apply(spec, perm_am, b)
            s_am = align.apply_state(spec, perm_am, s_b) if mode == "reset" else None
            am_solve = time.perf_counter() - t0
        if "activation_matching" in methods:
            t0 = time.perf_counter()
            paths["activation_matching"] = {s: interpolate(o, a, b_am, num=num, **bn_for(s_am))
                                            for s, o in objectives.items()}
            seconds["activation_matching"] = time.perf_counter() - t0 + am_solve
        if "repair" in methods:
            t0 = time.perf_counter()
            repaired = [
                align.repair(objective, apply_fn, a, b_wm, tree.lerp(a, b_wm, float(t)), t=float(t), spec=spec)
                for t in np.asarray(ts)
            ]
            stacked = tree.stack(repaired)
            paths["repair"] = {s: _evaluate_points(o, stacked, ts, mode, bn_for(s_wm)) for s, o in objectives.items()}
            seconds["repair"] = time.perf_counter() - t0
        curves = {}
        aligned, s_aligned = (b_am, s_am) if tatro else (b_wm, s_wm)
        for name, other, k, s_other in (("bezier", b, k_curve, s_b), ("bezier_aligned", aligned, k_curve2, s_aligned)):
            if name in methods:
                t0 = time.perf_counter()
                bn = bn_for(s_other)
                fit = fit_curve(k, objective, a, other, kind="bezier", steps=curve_steps,
                                learning_rate=curve_learning_rate, num_eval=num, stats=bn["stats"],
                                end_states=bn.get("end_states"))
                paths[name] = _evaluate(objectives, fit.path, ts, **bn)
                curves[name] = fit
                seconds[name] = time.perf_counter() - t0
        samples.append(ConnectivitySample(paths, wm_obj, sweeps, singular, seconds, b_wm, curves, s_wm))
    return ConnectivityResult(tuple(samples), label, stats=mode)


def connectivity_vs_width(
    key: Key,
    dataset: Any,
    *,
    widths: Sequence[Sequence[int]],
    seeds: Sequence[int] = (0, 1),
    epochs: int = 30,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    **kwargs: Any,
) -> dict[str, ConnectivityResult]:
    """Train MLP pairs at several hidden widths on ``dataset`` and measure :func:`connectivity`.

    Each width trains ``len(seeds)`` pairs; pair ``j`` uses init seeds ``(2j, 2j+1)`` offset by
    ``seeds[j]`` and data-order seeds ``1000 +`` those. Returns ``{"64-64-64": result, ...}``.
    """
    from landscape import models
    from landscape.train import Trainer, make_optimizer

    if not widths:
        msg = "connectivity_vs_width needs at least one width"
        raise ValueError(msg)
    x, y = dataset.train
    in_features = int(np.prod(dataset.input_shape))
    out: dict[str, ConnectivityResult] = {}
    for hidden in widths:
        pairs = []
        for s in seeds:
            members = []
            for j in (0, 1):
                init = 2 * s + j
                fn, p, st = models.functional(
                    models.build("mlp", jax.random.key(init), in_features=in_features,
                                 widths=(*hidden, dataset.num_classes)))
                trainer = Trainer(fn, x, y, optimizer=make_optimizer("adam", learning_rate=learning_rate),
                                  batch_size=batch_size)
                members.append(trainer.run(jax.random.key(1000 + init), trainer.init(p, st), epochs=epochs).params)
            pairs.append((members[0], members[1]))
        label = "-".join(str(w) for w in hidden)
        train = Objective(fn, x, y)
        evals = {"test": Objective(fn, *dataset.test)} if len(dataset.test[0]) else None
        out[label] = connectivity(jax.random.fold_in(key, len(out)), train, pairs, eval_objectives=evals,
                                  apply_fn=fn, label=label, **kwargs)
    return out

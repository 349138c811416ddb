"""Mode determinism (survey §6.1.2): when in training is the final linearly connected basin fixed?

The instability analysis of Frankle et al. 2020 (arXiv 1912.05671): train a parent from
initialisation; at spawn steps ``k`` (0 and a geometric ladder) copy its full training state
(parameters, optimizer state, model state, step) into two children that share everything but the
data-order key, train both to the end, and measure the linear barrier between the children
(survey Eq. 1, loss and error rate). At ``k = 0`` the children differ in SGD noise from the first
step; once the barrier between children stays under a threshold, the network is *stable*: SGD
noise no longer decides which basin it ends in. The onset ``k*`` is the first spawn step from which
the (seed-averaged) barrier stays under the threshold.

The children's L2 distance ``‖θ_A − θ_B‖`` is reported relative to the distance between two
independent runs (different initialisation and data order), ``‖θ_P − θ_I‖``: children spawned
from a common checkpoint end closer to each other than independent solutions do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from landscape import tree
from landscape._types import Key, Params
from landscape.objective import Objective
from landscape.train import TrainState, Trainer, spawn
from probes.characteristics._mixtures import pair_paths
from probes.curves import BARRIER_DEFINITIONS
from probes.numerics import json_safe, spread

__all__ = ["DeterminismResult", "determinism", "quick_determinism", "spawn_ladder"]

MEASURES = ("error", "loss")


def spawn_ladder(steps: int, *, base: int = 2, start: int = 1) -> tuple[int, ...]:
    """``(0, start, start·base, start·base², …)``: the geometric spawn ladder below ``steps``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        msg = f"steps must be a positive int, got {steps!r}"
        raise ValueError(msg)
    if not (isinstance(base, int) and base >= 2 and isinstance(start, int) and start >= 1):
        msg = f"base must be an int >= 2 and start an int >= 1, got base={base!r}, start={start!r}"
        raise ValueError(msg)
    out, k = [0], start
    while k < steps:
        out.append(k)
        k *= base
    return tuple(out)


def _mean_std(a: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-column mean and ``ddof=1`` std over seeds (:func:`probes.numerics.spread`), for plots."""
    sp = spread(a, axis=0)
    return np.asarray(sp.mean, np.float64).tolist(), np.asarray(sp.std, np.float64).tolist()


@dataclasses.dataclass(frozen=True)
class DeterminismResult:
    """Instability analysis from :func:`determinism`; arrays have a leading seed axis ``S``.

    Attributes:
        spawn_steps: the ``K`` spawn steps ``k``.
        steps: the training length (global step every run ends at).
        barrier_loss: ``(S, K)`` loss barrier between the two children spawned at each ``k``.
        barrier_error: ``(S, K)`` error-rate barrier.
        child_distance: ``(S, K)`` ``‖θ_A − θ_B‖`` between the children.
        child_loss, child_accuracy: ``(S, K, 2)`` the children's final loss and accuracy.
        independent_distance: ``(S,)`` ``‖θ_P − θ_I‖`` between the parent and an independent run.
        independent_barrier_loss, independent_barrier_error: ``(S,)`` barrier between them.
        threshold: the stability threshold on ``measure``.
        measure: ``"error"`` or ``"loss"``: which barrier the onset uses.
        definition: barrier definition (``"linear"`` or ``"mean"``, see :mod:`probes.curves`).
        share_data_order: the children shared the data order too (a check: barrier 0).
    """

    spawn_steps: tuple[int, ...]
    steps: int
    barrier_loss: np.ndarray
    barrier_error: np.ndarray
    child_distance: np.ndarray
    child_loss: np.ndarray
    child_accuracy: np.ndarray
    independent_distance: np.ndarray
    independent_barrier_loss: np.ndarray
    independent_barrier_error: np.ndarray
    threshold: float
    measure: str
    definition: str
    share_data_order: bool

    @property
    def num_seeds(self) -> int:
        return int(self.barrier_loss.shape[0])

    @property
    def barrier(self) -> np.ndarray:
        """``(S, K)`` the barrier named by ``measure``."""
        return self.barrier_error if self.measure == "error" else self.barrier_loss

    @property
    def relative_distance(self) -> np.ndarray:
        """``(S, K)`` children's distance over the independent runs' distance (same seed)."""
        return self.child_distance / self.independent_distance[:, None]

    @property
    def onset(self) -> int | None:
        """First spawn step ``k*`` from which the seed-mean barrier stays ``<= threshold``
        (``None`` if the barrier at the last spawn step is still above it). A spawn step whose
        barrier is non-finite for any seed is never counted as stable (see :attr:`finite`)."""
        mean = np.mean(self.barrier, axis=0)
        above = np.nonzero(~(mean <= self.threshold))[0]
        if above.size == 0:
            return self.spawn_steps[0]
        last = int(above[-1])
        return None if last == len(self.spawn_steps) - 1 else self.spawn_steps[last + 1]

    @property
    def finite(self) -> bool:
        """True when every barrier, distance and child loss is finite."""
        arrays = (self.barrier_loss, self.barrier_error, self.child_distance, self.child_loss,
                  self.independent_distance, self.independent_barrier_loss, self.independent_barrier_error)
        return bool(all(np.all(np.isfinite(np.asarray(a, np.float64))) for a in arrays))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: settings, onset, ``finite``, barrier and distance curves (spreads over seeds:
        :func:`probes.numerics.spread`)."""
        out: dict[str, Any] = {
            "spawn_steps": list(self.spawn_steps), "steps": self.steps, "num_seeds": self.num_seeds,
            "threshold": self.threshold, "measure": self.measure, "definition": self.definition,
            "share_data_order": self.share_data_order, "onset": self.onset, "finite": self.finite,
        }
        for name in ("barrier_loss", "barrier_error", "child_distance", "relative_distance",
                     "independent_distance", "independent_barrier_loss", "independent_barrier_error"):
            out[name] = spread(np.asarray(getattr(self, name), np.float64), axis=0).to_dict()
        out["child_loss"] = np.asarray(self.child_loss).tolist()
        out["child_accuracy"] = np.asarray(self.child_accuracy).tolist()
        return json_safe(out)

    def plot(self) -> Any:
        """Plotly figure: barrier (loss, error) vs spawn step on a log axis (k = 0 drawn at ½),
        with ±1 std over seeds, the threshold and the onset; and the relative distance."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        from probes.plot import COLORS

        ks = np.asarray(self.spawn_steps, np.float64)
        xs = np.where(ks == 0, 0.5, ks)
        fig = make_subplots(rows=1, cols=2, subplot_titles=(
            "barrier between children", "‖θ_A − θ_B‖ / ‖θ_P − θ_I‖"))
        for i, (name, arr) in enumerate((("loss barrier", self.barrier_loss), ("error barrier", self.barrier_error))):
            mean, std = _mean_std(np.asarray(arr, np.float64))
            fig.add_trace(go.Scatter(x=xs, y=mean, error_y={"type": "data", "array": std}, mode="lines+markers",
                                     name=name, line_color=COLORS[i]), row=1, col=1)
        fig.add_hline(y=self.threshold, line_dash="dash", line_color="gray", row=1, col=1)
        if self.onset is not None:  # a trace, not a shape: shapes on log axes take log10 coordinates
            x_on = 0.5 if self.onset == 0 else float(self.onset)
            tops = np.concatenate([np.mean(self.barrier_loss, axis=0), np.mean(self.barrier_error, axis=0),
                                   [self.threshold]])
            top = float(np.max(tops[np.isfinite(tops)]))
            fig.add_trace(go.Scatter(x=[x_on, x_on], y=[0.0, top], mode="lines", name=f"onset k* = {self.onset}",
                                     line={"dash": "dot", "color": "black"}), row=1, col=1)
        mean, std = _mean_std(np.asarray(self.relative_distance, np.float64))
        fig.add_trace(go.Scatter(x=xs, y=mean, error_y={"type": "data", "array": std}, mode="lines+markers",
                                 name="relative distance", line_color=COLORS[2]), row=1, col=2)
        ticks = {"type": "log", "tickvals": xs.tolist(), "ticktext": [str(k) for k in self.spawn_steps],
                 "title_text": "spawn step k"}
        fig.update_xaxes(**ticks, row=1, col=1)
        fig.update_xaxes(**ticks, row=1, col=2)
        onset = "never" if self.onset is None else f"k* = {self.onset}"
        fig.update_layout(title=f"instability analysis ({self.num_seeds} seeds, {self.steps} steps): "
                                f"{self.measure} barrier <= {self.threshold:g} from {onset}")
        return fig


def _init_state(init: Callable[[Key], Any], key: Key, trainer: Trainer) -> TrainState:
    out = init(key)
    return out if isinstance(out, TrainState) else trainer.init(out)


def _final(result: Any) -> Params:
    return result.params


def determinism(
    key: Key,
    trainer: Trainer,
    init: Callable[[Key], TrainState | Params],
    *,
    steps: int,
    spawn_steps: Sequence[int] | None = None,
    num_seeds: int = 2,
    threshold: float = 0.02,
    measure: str = "error",
    objective: Objective | None = None,
    num_points: int = 11,
    definition: str = "linear",
    share_data_order: bool = False,
    chunk: int = 4,
) -> DeterminismResult:
    """Instability analysis (Frankle et al. 2020, arXiv 1912.05671): barrier between children vs spawn step.

    For each seed ``s`` (keys folded from ``key``): a parent is trained from ``init(k_init)`` for
    ``steps`` steps, keeping its full state at every spawn step; from each kept state two children
    are trained to ``steps`` with data-order keys ``k_A ≠ k_B`` (``k_B = k_A`` with
    ``share_data_order=True``, where the children are identical and the barrier is 0); the barrier
    between the children is measured on ``objective`` along ``num_points`` points of the segment.
    One independent run (another ``init`` key and data order) gives the reference distance and
    barrier to the parent.

    Args:
        key: all randomness (inits, data orders).
        trainer: model, data, optimizer, batch size and loss shared by every run.
        init: ``init(key) -> TrainState`` (or params, then ``trainer.init(params)``): the
            initialisation of a parent (and of the independent run).
        steps: the global step every run ends at.
        spawn_steps: distinct steps ``0 <= k < steps``; default :func:`spawn_ladder` ``(0, 1, 2, 4, …)``.
        num_seeds: independent replicates (parents) for the spreads.
        threshold: stability threshold on the seed-mean barrier of ``measure`` (Frankle et al.
            call a network stable when the error barrier is within ~2%).
        measure: ``"error"`` or ``"loss"``.
        objective: data and loss for the barriers (default: the trainer's training set and loss).
        num_points: points on each segment (both ends included).
        definition: ``"linear"`` (Eq. 1) or ``"mean"`` barrier.
        share_data_order: give both children the same data order (a sanity check: barrier 0).
        chunk: points evaluated together per sequential step.

    Returns:
        :class:`DeterminismResult` (``.onset``, ``.to_dict()``, ``.plot()``).

    Raises:
        ValueError: spawn steps outside ``[0, steps)`` or repeated, bad settings; before training.
    """
    if not isinstance(trainer, Trainer):
        msg = f"trainer must be a landscape.train.Trainer, got {type(trainer).__name__}"
        raise ValueError(msg)
    if not callable(init):
        msg = f"init must be a callable init(key) -> TrainState or params, got {type(init).__name__}"
        raise ValueError(msg)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        msg = f"steps must be a positive int, got {steps!r}"
        raise ValueError(msg)
    ks = spawn_ladder(steps) if spawn_steps is None else tuple(spawn_steps)
    if not ks:
        msg = "spawn_steps is empty; give at least one step in [0, steps)"
        raise ValueError(msg)
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < steps]
    if bad:
        msg = f"spawn steps {bad} lie outside the run: each must be an int in [0, steps={steps})"
        raise ValueError(msg)
    if len(set(ks)) != len(ks):
        msg = f"spawn_steps must be distinct, got {list(ks)}"
        raise ValueError(msg)
    ks = tuple(sorted(int(k) for k in ks))
    if isinstance(num_seeds, bool) or not isinstance(num_seeds, int) or num_seeds < 1:
        msg = f"num_seeds must be a positive int, got {num_seeds!r}"
        raise ValueError(msg)
    if measure not in MEASURES:
        msg = f"unknown measure {measure!r}; accepted: {list(MEASURES)}"
        raise ValueError(msg)
    if definition not in BARRIER_DEFINITIONS:
        msg = f"unknown barrier definition {definition!r}; accepted: {list(BARRIER_DEFINITIONS)}"
        raise ValueError(msg)
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        msg = f"num_points must be an int >= 2, got {num_points!r}"
        raise ValueError(msg)
    if not threshold >= 0:
        msg = f"threshold must be >= 0, got {threshold!r}"
        raise ValueError(msg)
    if objective is None:
        objective = Objective(trainer.apply_fn, trainer.x, trainer.y, loss=trainer.loss)
    elif not isinstance(objective, Objective):
        msg = f"objective must be a landscape.Objective, got {type(objective).__name__}"
        raise ValueError(msg)

    rows: dict[str, list[Any]] = {n: [] for n in ("bl", "be", "cd", "cl", "ca", "idist", "ibl", "ibe")}
    for s in range(num_seeds):
        k_init, k_parent, k_a, k_b, k_iinit, k_idata = jax.random.split(jax.random.fold_in(key, s), 6)
        start = _init_state(init, k_init, trainer)
        parent = trainer.run(k_parent, start, steps=steps, capture_steps=ks)
        indep = trainer.run(k_idata, _init_state(init, k_iinit, trainer), steps=steps)
        tree.check_match(parent.params, indep.params, names=("parent", "independent run"))
        finals: list[Params] = []
        for k in ks:
            ck = parent.checkpoint_at(k)
            finals.append(_final(spawn(k_a, trainer, ck, steps=steps)))
            finals.append(_final(spawn(k_a if share_data_order else k_b, trainer, ck, steps=steps)))
        finals += [parent.params, indep.params]
        stacked = tree.stack(finals)
        pairs = np.array([(2 * i, 2 * i + 1) for i in range(len(ks) + 1)])
        paths = pair_paths(objective, stacked, pairs, len(finals), num=num_points, chunk=chunk)
        bars = [p.barrier_for(definition) for p in paths]
        flat = [tree.ravel(p)[0] for p in finals]
        dist = [float(np.linalg.norm(np.asarray(flat[2 * i] - flat[2 * i + 1]))) for i in range(len(ks) + 1)]
        rows["bl"].append([b.loss for b in bars[:-1]])
        rows["be"].append([b.error for b in bars[:-1]])
        rows["cd"].append(dist[:-1])
        rows["cl"].append([[float(p.loss[0]), float(p.loss[-1])] for p in paths[:-1]])
        rows["ca"].append([[float(p.accuracy[0]), float(p.accuracy[-1])] for p in paths[:-1]])
        rows["idist"].append(dist[-1])
        rows["ibl"].append(bars[-1].loss)
        rows["ibe"].append(bars[-1].error)
    arr = {n: np.asarray(v, np.float64) for n, v in rows.items()}
    return DeterminismResult(
        spawn_steps=ks, steps=steps, barrier_loss=arr["bl"], barrier_error=arr["be"], child_distance=arr["cd"],
        child_loss=arr["cl"], child_accuracy=arr["ca"], independent_distance=arr["idist"],
        independent_barrier_loss=arr["ibl"], independent_barrier_error=arr["ibe"], threshold=float(threshold),
        measure=measure, definition=definition, share_data_order=bool(share_data_order),
    )


QUICK_DETERMINISM: dict[str, Any] = {
    "epochs": 6,
    "spawn_steps": (0, 2, 8, 32),
    "num_seeds": 2,
    "num_points": 9,
    "threshold": 0.02,
}
"""Settings of :func:`quick_determinism` (the report's quick section); ``epochs`` sets ``steps``."""


def quick_determinism(
    key: Key,
    trainer: Trainer,
    init: Callable[[Key], TrainState | Params],
    *,
    objective: Objective | None = None,
) -> DeterminismResult:
    """:func:`determinism` with :data:`QUICK_DETERMINISM`: 2 seeds, spawn steps (0, 2, 8, 32),
    ``6 · trainer.steps_per_epoch`` steps (digits MLP: ~20 s on a 2-core CPU)."""
    kw = dict(QUICK_DETERMINISM)
    steps = kw.pop("epochs") * trainer.steps_per_epoch
    kw["spawn_steps"] = tuple(k for k in kw["spawn_steps"] if k < steps)
    return determinism(key, trainer, init, steps=steps, objective=objective, **kw)

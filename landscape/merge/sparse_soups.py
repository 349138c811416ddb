r"""Sparse Model Soups, SWAMP and SWA with its BatchNorm update: averaging inside iterative magnitude pruning.

Iterative magnitude pruning (IMP; Han et al. 2015, Frankle & Carbin 2019) alternates pruning the
smallest-magnitude weights and retraining. Averaging fits into IMP because models retrained from one
pruned model under one mask share the mask, so their average is as sparse as each of them:

* **Sparse Model Soups** (Zimmer, Spiegel & Pokutta 2023, arXiv 2306.16788), :func:`sparse_model_soup`:
  start from a trained dense model; in cycle ``c`` prune it to sparsity :math:`s_c` (mask
  :math:`m_c`), retrain ``particles`` copies of the pruned model under the mask with different
  data-order seeds (or different optimizers: hyper-parameters), average them (uniform soup, or the
  greedy soup of Wortsman et al. on held-out data) and start the next cycle from the soup.
* **SWAMP** (Choi et al. 2023, arXiv 2305.14852, Algorithm 1), :func:`swamp`: the same cycle, but each
  particle is trained with stochastic weight averaging (the average of its epoch-end checkpoints from
  epoch ``swa_start`` on) and the particles' SWA solutions are averaged; the next mask prunes that
  average, and the particles of the next cycle start from the rewinding point ``rewind`` under the
  new mask (IMP with weight rewinding, as SWAMP does) or, without ``rewind``, from the pruned average.
* **SWA with the BatchNorm update** (Izmailov et al. 2018, arXiv 1803.05407, Sec. 3.2),
  :func:`swa_with_bn_update`: the SWA average's running statistics are recomputed on the training
  inputs (:func:`landscape.align.reset`, the ``bn_update`` of the SWA code), since the average of the
  checkpoints' statistics is not the statistics of the averaged weights.

Pruning (:func:`magnitude_mask`) is unstructured: ``scope="global"`` ranks all prunable entries
together (the default of both papers), ``"layer"`` ranks each leaf alone. Prunable leaves are the
kernels (``ndim >= 2``) unless ``prunable`` (a name predicate) says otherwise; biases and norm
parameters stay dense. Cycle ``c`` leaves exactly ``round(s_c N)`` of the ``N`` prunable entries at
zero (entries pruned earlier are pruned first, then the smallest ``|w|``, ties by position), so the
sparsity after each cycle is the schedule. Training under the mask runs ``apply_fn(w ⊙ m, x)`` with
the mask a constant: gradients, momentum and Adam moments of pruned entries are exactly zero, so
they stay zero, and every average of masked models keeps the mask.

Models with BatchNorm (an ``apply_fn`` with ``apply_train`` and a non-empty ``state``, a zoo
``FunctionalModel``) train their statistics with the :class:`~landscape.train.Trainer`; every soup,
SWA average and cycle result gets RESET statistics on the training inputs.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from landscape import merge
    >>> p = {"w": jnp.array([[0.1, -2.0], [0.5, 3.0]]), "b": jnp.ones(2)}
    >>> m = merge.magnitude_mask(p, 0.5)
    >>> m["w"].tolist(), m["b"].tolist()
    ([[0.0, 1.0], [0.0, 1.0]], [1.0, 1.0])
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from landscape import tree
from landscape._checks import check_float, check_int
from landscape._types import ApplyFn, Array, Key, LossFn, Params
from landscape.merge._inputs import check_choice
from landscape.merge.averaging import average, greedy_soup, swa
from landscape.objective import Objective
from landscape.train import Trainer

__all__ = [
    "CycleRecord",
    "SWAResult",
    "SparseSoupResult",
    "apply_mask",
    "geometric_sparsities",
    "imp_sparsities",
    "magnitude_mask",
    "mask_sparsity",
    "particle_key",
    "sparse_model_soup",
    "swa_with_bn_update",
    "swamp",
]

Prunable = Callable[[str], bool] | str | None


# ----------------------------------------------------------------------------- masks and schedules
def _selected(params: Params, prunable: Prunable) -> list[tuple[str, Array, bool]]:
    out = []
    for name, x in tree.named_leaves(params):
        if prunable is None:
            sel = jnp.ndim(x) >= 2
        elif isinstance(prunable, str):
            sel = re.search(prunable, name) is not None
        elif callable(prunable):
            sel = bool(prunable(name))
        else:
            msg = f"prunable must be None, a regex string or a callable on the leaf name, got {type(prunable).__name__}"
            raise ValueError(msg)
        out.append((name, x, sel))
    if not any(s for _, _, s in out):
        msg = f"prunable selects no leaf; leaves: {[n for n, _, _ in out][:10]}"
        raise ValueError(msg)
    return out


def _check_sparsity(name: str, s: Any) -> float:
    return check_float(name, s, low=0.0, high=1.0, high_open=True)


def magnitude_mask(
    params: Params, sparsity: float, *, mask: Params | None = None, scope: str = "global", prunable: Prunable = None
) -> Params:
    """The 0/1 mask keeping the largest-magnitude entries at ``sparsity`` (computed on the host).

    Exactly ``round(sparsity * N)`` of the ``N`` prunable entries (per leaf for ``scope="layer"``)
    are zero. Entries already zero in ``mask`` are pruned first (IMP never revives a weight), then the
    smallest ``|w|``, ties by position in the flattened leaves.

    Args:
        params: the weights ranked.
        sparsity: fraction of prunable entries to prune, in ``[0, 1)``.
        mask: the previous cycle's mask (same structure); default all ones.
        scope: ``"global"`` or ``"layer"``.
        prunable: which leaves are pruned: ``None`` (``ndim >= 2``), a regex on the leaf name, or a
            predicate on it.

    Returns:
        A mask tree like ``params`` (each leaf in its dtype); non-prunable leaves are all ones.

    Raises:
        ValueError: a bad sparsity or scope, a non-finite weight (naming the leaf), a mask that does
            not match, or a sparsity below the mask's own.
    """
    s = _check_sparsity("sparsity", sparsity)
    check_choice("scope", scope, ("global", "layer"))
    bad = tree.nonfinite_leaves(params)
    if bad:
        msg = f"magnitude pruning needs finite weights; non-finite values in {bad[:5]}"
        raise ValueError(msg)
    if mask is not None:
        tree.check_match(params, mask, names=("params", "mask"))
    leaves = _selected(params, prunable)
    old = dict(tree.named_leaves(mask)) if mask is not None else {}
    scores, sizes = [], []
    for name, x, sel in leaves:
        if not sel:
            continue
        sc = np.abs(np.asarray(x, np.float64)).ravel()
        if name in old:
            sc = np.where(np.asarray(old[name]).ravel() == 0, -1.0, sc)
        scores.append(sc)
        sizes.append(sc.size)

    def keep_of(sc: np.ndarray) -> np.ndarray:
        k = int(np.floor(s * sc.size + 0.5))
        already = int(np.sum(sc < 0))
        if k < already:
            msg = f"sparsity {s} prunes {k} entries, fewer than the {already} the mask already prunes"
            raise ValueError(msg)
        keep = np.ones(sc.size, bool)
        keep[np.argsort(sc, kind="stable")[:k]] = False
        return keep

    if scope == "global":
        flat = keep_of(np.concatenate(scores))
        keeps = np.split(flat, np.cumsum(sizes)[:-1])
    else:
        keeps = [keep_of(sc) for sc in scores]
    out, j = [], 0
    for _, x, sel in leaves:
        if sel:
            out.append(jnp.asarray(keeps[j].reshape(jnp.shape(x)), jnp.result_type(x)))
            j += 1
        else:
            out.append(jnp.ones(jnp.shape(x), jnp.result_type(x)))
    return jax.tree.unflatten(jax.tree.structure(params), out)


def mask_sparsity(mask: Params, *, prunable: Prunable = None) -> float:
    """Fraction of zeros among the prunable entries of ``mask`` (or of a params tree)."""
    zeros = total = 0
    for _, x, sel in _selected(mask, prunable):
        if sel:
            a = np.asarray(x)
            zeros += int(np.sum(a == 0))
            total += a.size
    return zeros / total


def apply_mask(params: Params, mask: Params) -> Params:
    """``params ⊙ mask`` (jittable)."""
    tree.check_match(params, mask, names=("params", "mask"))
    return jax.tree.map(lambda p, m: p * m.astype(p.dtype), params, mask)


def imp_sparsities(cycles: int, *, rate: float = 0.2) -> tuple[float, ...]:
    """IMP's schedule: prune ``rate`` of the remaining weights each cycle, :math:`s_c = 1 - (1 - r)^c`."""
    c = check_int("cycles", cycles, low=1)
    r = check_float("rate", rate, low=0.0, high=1.0, low_open=True, high_open=True)
    return tuple(1.0 - (1.0 - r) ** i for i in range(1, c + 1))


def geometric_sparsities(target: float, cycles: int) -> tuple[float, ...]:
    r"""Reach ``target`` in ``cycles`` equal-ratio steps: :math:`s_c = 1 - (1 - S)^{c / C}`."""
    t = _check_sparsity("target", target)
    c = check_int("cycles", cycles, low=1)
    return tuple(1.0 - (1.0 - t) ** (i / c) for i in range(1, c + 1))


def _check_schedule(sparsities: Sequence[float]) -> tuple[float, ...]:
    if isinstance(sparsities, (str, bytes)) or not isinstance(sparsities, Sequence) or not sparsities:
        msg = f"sparsities must be a non-empty sequence of floats in [0, 1), got {sparsities!r}"
        raise ValueError(msg)
    out = tuple(_check_sparsity(f"sparsities[{i}]", s) for i, s in enumerate(sparsities))
    if any(b < a for a, b in zip(out, out[1:])):
        msg = f"sparsities must be non-decreasing (IMP never revives weights), got {list(out)}"
        raise ValueError(msg)
    return out


# ----------------------------------------------------------------------------- SWA with BN update
def _has_state(apply_fn: Any, state: Any) -> bool:
    return bool(state) and bool(jax.tree.leaves(state)) and callable(getattr(apply_fn, "apply_train", None))


def _reset(apply_fn: Any, params: Params, state: Any, x: Array, batch_size: int) -> Any:
    if not _has_state(apply_fn, state):
        return {} if not state else state
    from landscape.align.repair import reset

    return reset(apply_fn, params, state, x, batch_size=batch_size)


@dataclasses.dataclass(frozen=True)
class SWAResult:
    """SWA average with its recomputed BatchNorm statistics.

    Attributes:
        params: the equal-weight average of the checkpoints.
        state: RESET running statistics of ``params`` on the given inputs (``{}`` without BatchNorm).
        num_averaged: number of checkpoints averaged.
    """

    params: Params
    state: Any
    num_averaged: int


jax.tree_util.register_dataclass(SWAResult, data_fields=["params", "state"], meta_fields=["num_averaged"])


def swa_with_bn_update(
    trajectory: Sequence[Params], *, apply_fn: ApplyFn, state: Any, x: Any, batch_size: int = 512
) -> SWAResult:
    """Stochastic Weight Averaging with its BatchNorm update (Izmailov et al., arXiv 1803.05407, Alg. 1).

    The checkpoints' running average (:func:`landscape.merge.swa`), then one pass over ``x`` that
    recomputes every BatchNorm statistic at the average (RESET, :func:`landscape.align.reset`:
    batch statistics averaged with weights ``n_k / N``, the SWA code's ``bn_update`` with
    cumulative averaging).

    Args:
        trajectory: the checkpoints (list of params).
        apply_fn: a model with ``apply_train`` (zoo ``FunctionalModel``); without BatchNorm state the
            update is skipped.
        state: the model's BatchNorm state (structure and dtypes; ``{}`` when none).
        x: training inputs ``(N, ...)`` (or an Objective: its inputs).
        batch_size: examples per train-mode pass.
    """
    if not isinstance(trajectory, (list, tuple)) or not trajectory:
        msg = "trajectory must be a non-empty list of params (the checkpoints to average)"
        raise ValueError(msg)
    avg = swa(list(trajectory))
    xs = x.x if isinstance(x, Objective) else jnp.asarray(x)
    return SWAResult(params=avg, state=_reset(apply_fn, avg, state, xs, batch_size), num_averaged=len(trajectory))


# ----------------------------------------------------------------------------- masked training
@dataclasses.dataclass(frozen=True)
class _Masked:
    """``apply_fn`` of ``{"params": w, "mask": m}``: runs ``inner(w ⊙ stop_gradient(m), x)``."""

    inner: Any

    def __call__(self, pm: Params, x: Array) -> Array:
        return self.inner(_masked(pm), x)


@dataclasses.dataclass(frozen=True)
class _MaskedStateful(_Masked):
    def apply_train(self, pm: Params, state: Any, x: Array) -> tuple[Array, Any]:
        return self.inner.apply_train(_masked(pm), state, x)


def _masked(pm: Params) -> Params:
    return jax.tree.map(lambda p, m: p * jax.lax.stop_gradient(m).astype(p.dtype), pm["params"], pm["mask"])


def particle_key(key: Key, cycle: int, particle: int) -> Key:
    """Data-order key of ``particle`` in ``cycle`` (0-based): ``fold_in(fold_in(fold_in(key, 2), cycle), particle)``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 2), cycle), particle)


@dataclasses.dataclass(frozen=True)
class CycleRecord:
    """One prune-retrain cycle.

    Attributes:
        cycle: 0-based index.
        target_sparsity: the schedule's :math:`s_c`.
        sparsity: measured fraction of zeros among the prunable entries of the cycle's soup mask.
        soup_loss, soup_accuracy: the soup on the held-out objective (NaN without one).
        particle_accuracies: each particle (after SWA for SWAMP) on the held-out objective.
        members: indices of the particles in the soup (all of them for the uniform soup).
    """

    cycle: int
    target_sparsity: float
    sparsity: float
    soup_loss: float
    soup_accuracy: float
    particle_accuracies: tuple[float, ...]
    members: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        def f(v: float) -> float | None:
            return float(v) if np.isfinite(v) else None

        return {
            "cycle": self.cycle,
            "target_sparsity": self.target_sparsity,
            "sparsity": self.sparsity,
            "soup_loss": f(self.soup_loss),
            "soup_accuracy": f(self.soup_accuracy),
            "particle_accuracies": [f(a) for a in self.particle_accuracies],
            "members": list(self.members),
        }


@dataclasses.dataclass(frozen=True)
class SparseSoupResult:
    """Outcome of :func:`sparse_model_soup` / :func:`swamp`.

    Attributes:
        params: the last cycle's soup (zero wherever ``mask`` is).
        mask: its 0/1 mask.
        state: its RESET BatchNorm statistics (``{}`` without BatchNorm).
        method: ``"sparse_model_soup"`` or ``"swamp"``.
        cycles: one :class:`CycleRecord` per cycle.
        soups: every cycle's soup params, in order.
    """

    params: Params
    mask: Params
    state: Any
    method: str
    cycles: tuple[CycleRecord, ...]
    soups: tuple[Params, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no parameters)."""
        return {"method": self.method, "cycles": [c.to_dict() for c in self.cycles]}

    def plot(self) -> Any:
        """Plotly figure: soup and particle accuracy against sparsity, one point per cycle."""
        import plotly.graph_objects as go

        fig = go.Figure()
        xs = [c.sparsity for c in self.cycles]
        fig.add_scatter(x=xs, y=[c.soup_accuracy for c in self.cycles], mode="lines+markers", name="soup")
        for c in self.cycles:
            fig.add_scatter(x=[c.sparsity] * len(c.particle_accuracies), y=list(c.particle_accuracies),
                            mode="markers", marker={"symbol": "x"}, name=f"particles, cycle {c.cycle}",
                            showlegend=False)
        fig.update_layout(title=self.method, xaxis_title="sparsity", yaxis_title="held-out accuracy")
        return fig


jax.tree_util.register_dataclass(
    SparseSoupResult, data_fields=["params", "mask", "state", "soups"], meta_fields=["method", "cycles"]
)


@jax.jit
def _eval_plain(objective: Objective, params: Params) -> dict[str, Array]:
    return objective.evaluate(params)


@jax.jit
def _eval_state(objective: Objective, params: Params, state: Any) -> dict[str, Array]:
    return objective.replace(apply_fn=objective.apply_fn.with_state(state)).evaluate(params)


def _evaluate(objective: Objective | None, params: Params, state: Any, stateful: bool) -> tuple[float, float]:
    if objective is None:
        return float("nan"), float("nan")
    out = _eval_state(objective, params, state) if stateful else _eval_plain(objective, params)
    return float(out["loss"]), float(out["accuracy"])


def _imp(
    key: Key, method: str, apply_fn: ApplyFn, params: Params, x: Any, y: Any, *, sparsities: Sequence[float],
    particles: int, epochs: int, batch_size: int, optimizer: Any, loss: str | LossFn, state: Any,
    objective: Objective | None, prunable: Prunable, scope: str, soup: str, rewind: Params | None,
    swa_start: int | None, reset_batch_size: int,
) -> SparseSoupResult:
    schedule = _check_schedule(sparsities)
    particles = check_int("particles", particles, low=1)
    epochs = check_int("epochs", epochs, low=1)
    check_choice("scope", scope, ("global", "layer"))
    check_choice("soup", soup, ("uniform", "greedy"))
    single = isinstance(optimizer, optax.GradientTransformation)  # a NamedTuple: test it before list/tuple
    optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) and not single else [optimizer]
    if len(optimizers) not in (1, particles) or not all(isinstance(o, optax.GradientTransformation)
                                                          for o in optimizers):
        msg = (f"optimizer must be one optax.GradientTransformation or one per particle ({particles}), got "
               f"{len(optimizers)} of types {[type(o).__name__ for o in optimizers]}")
        raise ValueError(msg)
    state = {} if state is None else state
    stateful = _has_state(apply_fn, state)
    if state and jax.tree.leaves(state) and not stateful:
        msg = "state is given but apply_fn has no apply_train(params, state, x): it cannot train BatchNorm statistics"
        raise ValueError(msg)
    if soup == "greedy" and (objective is None or stateful):
        msg = "soup='greedy' needs held-out data (objective=...) and a model without BatchNorm state"
        raise ValueError(msg)
    if rewind is not None:
        tree.check_match(params, rewind, names=("params", "rewind"))
    if objective is not None and not isinstance(objective, Objective):
        msg = f"objective must be an Objective (held-out data) or None, got {type(objective).__name__}"
        raise ValueError(msg)
    xs = jnp.asarray(x)
    wrapped = _MaskedStateful(apply_fn) if stateful else _Masked(apply_fn)
    route = {"params": True, "mask": False}
    trainers = [Trainer(wrapped, xs, jnp.asarray(y), optax.masked(o, route), batch_size=batch_size, loss=loss)
                for o in optimizers]
    spe = trainers[0].steps_per_epoch
    if method == "swamp":
        start_epoch = max(1, (3 * epochs) // 4) if swa_start is None else check_int(
            "swa_start", swa_start, low=1, high=epochs)
        capture = [e * spe for e in range(start_epoch, epochs + 1)]

    current, current_state = params, state
    mask = None
    records, soups = [], []
    for c, s in enumerate(schedule):
        mask = magnitude_mask(current, s, mask=mask, scope=scope, prunable=prunable)
        start = apply_mask(rewind if rewind is not None else current, mask)
        members = []
        for i in range(particles):
            tr = trainers[i % len(trainers)]
            ts = tr.init({"params": start, "mask": mask}, current_state if stateful else None)
            if method == "swamp":
                run = tr.run(particle_key(key, c, i), ts, epochs=epochs, capture_steps=capture)
                p = swa([ck.params["params"] for ck in run.checkpoints if ck.step in capture])
            else:
                run = tr.run(particle_key(key, c, i), ts, epochs=epochs)
                p = run.params["params"]
            members.append(apply_mask(p, mask))
        member_states = [_reset(apply_fn, p, state, xs, reset_batch_size) if stateful else {} for p in members]
        accs = tuple(_evaluate(objective, p, st, stateful)[1] for p, st in zip(members, member_states))
        if soup == "greedy":
            g = greedy_soup(members, objective)
            soup_params, chosen = g.params, g.members
        else:
            soup_params, chosen = (members[0] if particles == 1 else average(members)), tuple(range(particles))
        soup_params = apply_mask(soup_params, mask)
        soup_state = member_states[0] if particles == 1 else (
            _reset(apply_fn, soup_params, state, xs, reset_batch_size) if stateful else {})
        loss_v, acc_v = _evaluate(objective, soup_params, soup_state, stateful)
        records.append(CycleRecord(cycle=c, target_sparsity=s, sparsity=mask_sparsity(mask, prunable=prunable),
                                   soup_loss=loss_v, soup_accuracy=acc_v, particle_accuracies=accs, members=chosen))
        soups.append(soup_params)
        current, current_state = soup_params, soup_state
    return SparseSoupResult(params=current, mask=mask, state=current_state, method=method, cycles=tuple(records),
                            soups=tuple(soups))


def sparse_model_soup(
    key: Key,
    apply_fn: ApplyFn,
    params: Params,
    x: Any,
    y: Any,
    *,
    sparsities: Sequence[float],
    particles: int = 3,
    epochs: int = 1,
    batch_size: int = 64,
    optimizer: optax.GradientTransformation | Sequence[optax.GradientTransformation],
    loss: str | LossFn = "cross_entropy",
    state: Any = None,
    objective: Objective | None = None,
    soup: str = "uniform",
    prunable: Prunable = None,
    scope: str = "global",
    reset_batch_size: int = 512,
) -> SparseSoupResult:
    """Sparse Model Soups (Zimmer et al. 2023, arXiv 2306.16788): IMP whose every cycle retrains a soup.

    Cycle ``c`` (``s_c = sparsities[c]``): prune the current model to ``s_c`` (global magnitude,
    keeping earlier pruning), retrain ``particles`` copies for ``epochs`` epochs under the mask, each
    with its data-order key :func:`particle_key` and optimizer (one for all, or one per particle for
    a hyper-parameter soup; a fresh optimizer state each cycle, i.e. the learning-rate schedule
    restarts), average them (``soup="uniform"``, or ``"greedy"`` on ``objective``) and continue
    from the soup. Variant: the paper's uniform/greedy soups with retraining from the previous
    cycle's soup (no rewinding); the particles vary by seed or by optimizer.

    Args:
        key: PRNG key for the data order.
        apply_fn: ``apply_fn(params, x)``; a zoo ``FunctionalModel`` with BatchNorm trains its statistics.
        params: the trained dense model.
        x, y: training data.
        sparsities: the schedule, non-decreasing in ``[0, 1)`` (:func:`geometric_sparsities`,
            :func:`imp_sparsities`).
        particles: models per soup.
        epochs: retraining epochs per cycle.
        batch_size: minibatch size.
        optimizer: optax optimizer, or one per particle.
        loss: training loss.
        state: BatchNorm state of ``params`` (``None``/``{}`` without BatchNorm).
        objective: held-out data for the per-cycle accuracies and the greedy soup.
        soup: ``"uniform"`` or ``"greedy"``.
        prunable: which leaves are pruned (see :func:`magnitude_mask`).
        scope: ``"global"`` or ``"layer"``.
        reset_batch_size: batch size of the RESET passes (BatchNorm models).

    Returns:
        :class:`SparseSoupResult`.
    """
    return _imp(key, "sparse_model_soup", apply_fn, params, x, y, sparsities=sparsities, particles=particles,
                epochs=epochs, batch_size=batch_size, optimizer=optimizer, loss=loss, state=state,
                objective=objective, prunable=prunable, scope=scope, soup=soup, rewind=None, swa_start=None,
                reset_batch_size=reset_batch_size)


def swamp(
    key: Key,
    apply_fn: ApplyFn,
    params: Params,
    x: Any,
    y: Any,
    *,
    sparsities: Sequence[float],
    particles: int = 4,
    epochs: int = 2,
    swa_start: int | None = None,
    batch_size: int = 64,
    optimizer: optax.GradientTransformation | Sequence[optax.GradientTransformation],
    rewind: Params | None = None,
    loss: str | LossFn = "cross_entropy",
    state: Any = None,
    objective: Objective | None = None,
    prunable: Prunable = None,
    scope: str = "global",
    reset_batch_size: int = 512,
) -> SparseSoupResult:
    """SWAMP (Choi et al. 2023, arXiv 2305.14852, Algorithm 1): IMP with SWA particles averaged each cycle.

    Cycle ``c``: mask ``m_c`` from the current model at ``sparsities[c]``; ``particles`` runs of
    ``epochs`` epochs from ``rewind ⊙ m_c`` (or the current model ⊙ ``m_c``), each with its key
    :func:`particle_key`, each reduced to the SWA average of its epoch-end checkpoints from epoch
    ``swa_start`` (default ``max(1, floor(3 epochs / 4))``, SWA's last quarter) to ``epochs``; the
    particles are averaged (uniformly) and the next cycle prunes that average. A schedule starting at
    ``0.0`` trains dense particles first, as SWAMP's first IMP round does. With BatchNorm every SWA
    average and the soup get RESET statistics (SWA's BN update). One particle and ``sparsities=[0.0]``
    is plain SWA (:func:`swa_with_bn_update`).

    Args:
        key, apply_fn, params, x, y, sparsities, batch_size, optimizer, loss, state, objective,
        prunable, scope, reset_batch_size: as in :func:`sparse_model_soup`.
        particles: SWA particles per cycle.
        epochs: training epochs per particle per cycle.
        swa_start: first epoch end (1-based) whose checkpoint enters the SWA average.
        rewind: the rewinding point (e.g. the dense model's weights early in training); ``None``
            retrains from the pruned average.

    Returns:
        :class:`SparseSoupResult` (``method="swamp"``).
    """
    return _imp(key, "swamp", apply_fn, params, x, y, sparsities=sparsities, particles=particles, epochs=epochs,
                batch_size=batch_size, optimizer=optimizer, loss=loss, state=state, objective=objective,
                prunable=prunable, scope=scope, soup="uniform", rewind=rewind, swa_start=swa_start,
                reset_batch_size=reset_batch_size)

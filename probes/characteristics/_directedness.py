r"""Directedness (survey §6.1): do directions in weight space carry task behaviour?

From a base model trained on a task mix, fine-tune one expert per task and seed and study the
*task vectors* :math:`τ_{i,s} = θ_{i,s} - θ_0` (Ilharco et al. 2023, *Editing models with task
arithmetic*, arXiv 2212.04089):

* **cosine matrix** of all task vectors; same-task pairs (same task, different seeds) against
  cross-task pairs. Task vectors of different tasks are close to orthogonal in the paper's CLIP
  experiments; same-task vectors are much more aligned.
* **±λ curves**: accuracy on every task of :math:`θ_0 + λτ_{i,s}` and :math:`θ_0 - λτ_{i,s}`
  over λ (addition learns the task, negation forgets it).
* **merges**: multi-task accuracy of each merge method (uniform average, task arithmetic, TIES
  arXiv 2306.01708, DARE arXiv 2311.03099) of the experts of one seed, with λ chosen by the mean
  accuracy over tasks on each task's *validation* split and reported on the test split.
* **magnitude masks**: the share of the expert's gain over the base kept by
  :math:`θ_0 + m_k\odot τ` where :math:`m_k` keeps the top k% entries of :math:`|τ|` over the whole
  model, :math:`(acc_k - acc_0)/(acc_{expert} - acc_0)`.
* **sign conflicts** (TIES): among the entries where at least two of a seed's task vectors are
  non-zero, the share whose non-zero signs disagree.
* **effective rank** (Roy & Vetterli 2007, *The effective rank: a measure of effective
  dimensionality*): :math:`\exp H(p)` with :math:`p_k = σ_k/\sum σ`, the singular values of the
  stacked task vectors; 1 for identical (or parallel) vectors, ``n`` for ``n`` orthogonal vectors of
  equal norm.

Every number comes with its spread over seeds.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landscape import data as ldata
from landscape import merge, models, tree
from landscape._types import Key, Params
from landscape.data import Dataset
from landscape.merge import sparsify
from landscape.objective import Objective
from landscape.train import Trainer, make_optimizer
from probes.numerics import json_safe, spread

__all__ = [
    "DIRECTEDNESS_METHODS",
    "QUICK_DIRECTEDNESS",
    "DirectednessResult",
    "directedness",
    "effective_rank",
    "quick_directedness",
    "select_by_validation",
    "sign_conflict_rate",
    "standard_directedness",
]

DIRECTEDNESS_METHODS = ("average", "task_arithmetic", "ties", "dare")
"""Merge methods :func:`directedness` compares (λ-swept except ``average``)."""


def effective_rank(vectors: Any) -> float:
    r"""Entropy effective rank (Roy & Vetterli 2007) of the rows of ``vectors`` ``(n, P)``.

    :math:`\mathrm{erank} = \exp(-\sum_k p_k \log p_k)`, :math:`p_k = σ_k / \sum_l σ_l` over the
    non-zero singular values; 0 for an all-zero matrix.
    """
    v = np.asarray(vectors, np.float64)
    if v.ndim != 2 or v.shape[0] == 0:
        msg = f"vectors must be a non-empty (n, P) matrix, got shape {v.shape}"
        raise ValueError(msg)
    s = np.linalg.svd(v, compute_uv=False)
    s = s[s > s.max(initial=0.0) * 1e-12] if s.max(initial=0.0) > 0 else s[:0]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def sign_conflict_rate(vectors: Any) -> float:
    """Share of entries, among those where >= 2 rows are non-zero, whose non-zero signs disagree."""
    v = np.sign(np.asarray(vectors, np.float64))
    if v.ndim != 2 or v.shape[0] == 0:
        msg = f"vectors must be a non-empty (n, P) matrix, got shape {v.shape}"
        raise ValueError(msg)
    active = (v != 0).sum(0) >= 2
    if not active.any():
        return 0.0
    conflict = (v > 0).any(0) & (v < 0).any(0)
    return float(conflict[active].mean())


def select_by_validation(val: Any, test: Any) -> tuple[np.ndarray, np.ndarray]:
    """Pick each row's setting by mean validation accuracy over tasks; report its test accuracy.

    Args:
        val: ``(S, L, T)`` validation accuracy per seed, setting and task.
        test: ``(S, L, T)`` test accuracy, same layout.

    Returns:
        ``(index (S,), test accuracy at that index (S, T))``; the test split never influences the
        choice (ties go to the first setting).
    """
    val, test = np.asarray(val, np.float64), np.asarray(test, np.float64)
    if val.shape != test.shape or val.ndim != 3:
        msg = f"val and test must both be (seeds, settings, tasks), got {val.shape} and {test.shape}"
        raise ValueError(msg)
    idx = np.argmax(val.mean(-1), axis=1)
    return idx, test[np.arange(val.shape[0]), idx]


def _ms(a: np.ndarray, axis: int = 0) -> dict[str, Any]:
    """Spread over ``axis`` (:func:`probes.numerics.spread`: finite samples, ``ddof=1``, counts of
    finite and non-finite samples; the samples themselves are in the raw arrays)."""
    return spread(np.asarray(a, np.float64), axis=axis).to_dict(samples=False)


@dataclasses.dataclass(frozen=True)
class DirectednessResult:
    """Task-vector measurements from :func:`directedness`.

    ``T`` tasks, ``S`` seeds per task, ``L`` λ values, ``K`` mask percentages, ``M`` methods.
    Task vectors are ordered task-major: vector ``i·S + s`` is task ``i``, seed ``s``.

    Attributes:
        cosine: ``(T·S, T·S)`` cosine similarity of the task vectors.
        curves: ``(T, S, 2, L, T)`` test accuracy on task ``j`` (last axis) of
            ``θ_0 + λτ_{i,s}`` (sign index 0) and ``θ_0 − λτ_{i,s}`` (sign index 1).
        base_accuracy: ``(T,)`` test accuracy of the base on each task.
        expert_accuracy: ``(T, S)`` test accuracy of each expert on its task.
        merge_val: ``(M, S, L, T)`` validation accuracy of each method's merge of seed ``s``'s experts.
        merge_test: ``(M, S, L, T)`` the same on the test splits.
        merge_choice: ``(M, S)`` index of the λ chosen on validation.
        mask_gain: ``(T, S, K)`` share of the expert's gain kept by the top-k% magnitude mask.
        sign_conflicts: ``(S,)`` sign-conflict rate of each seed's task vectors.
        erank_all: effective rank of all ``T·S`` task vectors.
        erank_per_seed: ``(S,)`` effective rank of each seed's ``T`` task vectors.
        erank_per_task: ``(T,)`` effective rank of each task's ``S`` vectors.
        lams: the λ grid; percents: the mask percentages; methods, task_names: labels.
    """

    cosine: np.ndarray
    curves: np.ndarray
    base_accuracy: np.ndarray
    expert_accuracy: np.ndarray
    merge_val: np.ndarray
    merge_test: np.ndarray
    merge_choice: np.ndarray
    mask_gain: np.ndarray
    sign_conflicts: np.ndarray
    erank_all: np.ndarray
    erank_per_seed: np.ndarray
    erank_per_task: np.ndarray
    lams: tuple[float, ...] = dataclasses.field(metadata={"static": True}, default=())
    percents: tuple[float, ...] = dataclasses.field(metadata={"static": True}, default=())
    methods: tuple[str, ...] = dataclasses.field(metadata={"static": True}, default=())
    task_names: tuple[str, ...] = dataclasses.field(metadata={"static": True}, default=())

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def num_seeds(self) -> int:
        return int(self.expert_accuracy.shape[1])

    def _pairs(self, same: bool) -> np.ndarray:
        s = self.num_seeds
        n = self.cosine.shape[0]
        out = [self.cosine[a, b] for a in range(n) for b in range(a + 1, n) if (a // s == b // s) == same]
        return np.asarray(out, np.float64)

    @property
    def same_task_cosine(self) -> tuple[float, float]:
        """Mean and ``ddof=1`` std of the cosine over same-task pairs (nan with one seed per task)."""
        sp = spread(self._pairs(True))
        return sp.mean, sp.std

    @property
    def cross_task_cosine(self) -> tuple[float, float]:
        """Mean and ``ddof=1`` std of the cosine over cross-task pairs (nan with one task)."""
        sp = spread(self._pairs(False))
        return sp.mean, sp.std

    @property
    def chosen_test(self) -> np.ndarray:
        """``(M, S, T)`` test accuracy of each method at its validation-chosen λ."""
        return np.stack([select_by_validation(v, t)[1] for v, t in zip(self.merge_val, self.merge_test, strict=True)])

    @property
    def chosen_lam(self) -> np.ndarray:
        """``(M, S)`` the λ chosen on validation (nan for ``average``, which has none)."""
        lams = np.asarray(self.lams, np.float64)
        out = lams[self.merge_choice]
        return np.where(np.asarray(self.methods)[:, None] == "average", np.nan, out)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary with means and spreads over seeds and the raw arrays."""
        chosen = self.chosen_test
        return json_safe({
            "task_names": list(self.task_names),
            "lams": list(self.lams),
            "percents": list(self.percents),
            "methods": list(self.methods),
            "cosine": np.asarray(self.cosine).tolist(),
            "same_task_cosine": spread(self._pairs(True)).to_dict(samples=False),
            "cross_task_cosine": spread(self._pairs(False)).to_dict(samples=False),
            "base_accuracy": np.asarray(self.base_accuracy).tolist(),
            "expert_accuracy": _ms(self.expert_accuracy.T),
            "curves": {"plus": _ms(self.curves[:, :, 0].transpose(1, 0, 2, 3)),
                       "minus": _ms(self.curves[:, :, 1].transpose(1, 0, 2, 3))},
            "merges": {
                m: {
                    "per_task": _ms(chosen[k]),
                    "average": _ms(chosen[k].mean(-1)),
                    "lam": _ms(self.chosen_lam[k]),
                }
                for k, m in enumerate(self.methods)
            },
            "mask_gain": _ms(self.mask_gain.transpose(1, 0, 2)),
            "sign_conflicts": _ms(self.sign_conflicts),
            "effective_rank": {
                "all": float(self.erank_all),
                "per_seed": _ms(self.erank_per_seed),
                "per_task": np.asarray(self.erank_per_task).tolist(),
            },
        })

    def plot(self) -> Any:
        """Plotly figure: cosine matrix, ±λ curves on the own task, mask gain, merges."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=2, cols=2, subplot_titles=(
            "task-vector cosine", "own-task accuracy along θ0 ± λτ", "gain kept by top-k% mask",
            "merged multi-task test accuracy (λ on val)"))
        labels = [f"{t}/s{s}" for t in self.task_names for s in range(self.num_seeds)]
        fig.add_trace(go.Heatmap(z=np.asarray(self.cosine), x=labels, y=labels, zmin=-1, zmax=1,
                                 colorscale="RdBu", showscale=False), row=1, col=1)
        lams = np.asarray(self.lams)
        for i, name in enumerate(self.task_names):
            own = self.curves[i, :, :, :, i]
            x = np.concatenate([-lams[::-1], lams])
            y = np.concatenate([own[:, 1, ::-1], own[:, 0]], axis=1)
            sy = spread(y, axis=0)
            fig.add_trace(go.Scatter(x=x, y=sy.mean, error_y={"array": sy.std}, name=name,
                                     mode="lines+markers"), row=1, col=2)
            gain = _ms(self.mask_gain[i])
            fig.add_trace(go.Scatter(x=list(self.percents), y=gain["mean"],
                                     error_y={"array": gain["std"]}, name=f"{name} mask",
                                     mode="lines+markers", showlegend=False), row=2, col=1)
        avg = spread(self.chosen_test.mean(-1), axis=1)
        fig.add_trace(go.Bar(x=list(self.methods), y=avg.mean, error_y={"array": avg.std},
                             name="merges", showlegend=False), row=2, col=2)
        fig.update_xaxes(type="log", title_text="k (%)", row=2, col=1)
        fig.update_xaxes(title_text="signed λ", row=1, col=2)
        fig.update_layout(title="Directedness", height=700)
        return fig


jax.tree_util.register_dataclass(
    DirectednessResult,
    data_fields=[f.name for f in dataclasses.fields(DirectednessResult) if not f.metadata.get("static")],
    meta_fields=[f.name for f in dataclasses.fields(DirectednessResult) if f.metadata.get("static")],
)


@jax.jit
def _accuracies(objective: Objective, stacked: Params) -> jax.Array:
    return jax.vmap(lambda p: objective.evaluate(p)["accuracy"])(stacked)


def _merge(method: str, key: Key, experts: list[Params], base: Params, lam: float, *,
           density: float, drop: float) -> Params:
    if method == "average":
        return merge.average(experts)
    if method == "task_arithmetic":
        return merge.task_arithmetic(experts, base=base, lam=lam)
    if method == "ties":
        return merge.ties(experts, base=base, density=density, lam=lam)
    return merge.dare(key, experts, base=base, drop=drop, lam=lam)


def _check(tasks: Sequence[Dataset], base_data: Dataset, *, seeds_per_task: Any, lams: Any, methods: Any,
           percents: Any, task_names: Any) -> None:
    if not isinstance(base_data, Dataset):
        msg = f"base_data must be a landscape.data.Dataset, got {type(base_data).__name__}"
        raise ValueError(msg)
    if len(tasks) == 0:
        msg = "directedness needs at least one task (a list of landscape.data.Dataset), got an empty list"
        raise ValueError(msg)
    for i, t in enumerate(tasks):
        if not isinstance(t, Dataset):
            msg = f"tasks[{i}] must be a landscape.data.Dataset, got {type(t).__name__}"
            raise ValueError(msg)
        if tuple(t.x_train.shape[1:]) != tuple(base_data.x_train.shape[1:]):
            msg = (f"tasks[{i}] ({t.name}) has inputs of shape {tuple(t.x_train.shape[1:])}, the base data "
                   f"{tuple(base_data.x_train.shape[1:])}")
            raise ValueError(msg)
        if t.num_classes > base_data.num_classes:
            msg = (f"tasks[{i}] ({t.name}) has {t.num_classes} classes, more than the base model's "
                   f"{base_data.num_classes} outputs")
            raise ValueError(msg)
        if np.shape(t.y_test)[0] == 0:
            msg = f"tasks[{i}] ({t.name}) has an empty test split"
            raise ValueError(msg)
    if isinstance(seeds_per_task, bool) or not isinstance(seeds_per_task, int) or seeds_per_task < 1:
        msg = f"seeds_per_task must be a positive int, got {seeds_per_task!r}"
        raise ValueError(msg)
    if len(lams) == 0 or not all(np.isfinite(float(v)) and float(v) >= 0 for v in lams):
        msg = f"lams must be a non-empty sequence of finite λ >= 0, got {lams!r}"
        raise ValueError(msg)
    unknown = [m for m in methods if m not in DIRECTEDNESS_METHODS]
    if unknown or len(methods) == 0:
        msg = f"unknown merge methods {unknown or methods!r}; accepted: {list(DIRECTEDNESS_METHODS)}"
        raise ValueError(msg)
    if len(percents) == 0 or not all(0 < float(k) <= 100 for k in percents):
        msg = f"mask_percents must be a non-empty sequence in (0, 100], got {percents!r}"
        raise ValueError(msg)
    if task_names is not None and len(task_names) != len(tasks):
        msg = f"task_names must name every task: got {len(task_names)} names for {len(tasks)} tasks"
        raise ValueError(msg)


def directedness(
    key: Key,
    base_data: Dataset,
    tasks: Sequence[Dataset],
    *,
    seeds_per_task: int = 3,
    lams: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0),
    methods: Sequence[str] = DIRECTEDNESS_METHODS,
    mask_percents: Sequence[float] = (1, 2, 5, 10, 20, 50, 100),
    widths: Sequence[int] = (64, 64),
    base_epochs: int = 20,
    epochs: int = 10,
    learning_rate: float = 1e-3,
    batch_size: int = 64,
    val_fraction: float = 0.2,
    ties_density: float = 0.2,
    dare_drop: float = 0.5,
    task_names: Sequence[str] | None = None,
) -> DirectednessResult:
    r"""Measure directedness: task vectors of experts fine-tuned from one base (module docstring).

    An MLP (``widths`` hidden units, ``base_data.num_classes`` outputs) is trained on
    ``base_data.train`` (Adam); for every task and seed an expert is fine-tuned from it on the
    task's training split (seeds differ in data order). Tasks without a validation split get one
    (``val_fraction`` of their training set, stratified); λ of each merge is chosen on those
    validation splits only.

    Args:
        key: typed PRNG key (initialisation, validation splits, data orders, DARE masks).
        base_data: the task mix the base is trained on (e.g. all digits classes).
        tasks: one :class:`~landscape.data.Dataset` per task with the base's input shape and at
            most its number of classes (``data.class_subset(ds, c, relabel=False)``,
            ``data.permuted_inputs``, ``data.relabelled``).
        seeds_per_task: experts per task.
        lams: λ grid of the ±λ curves and of the merges' λ search.
        methods: merges to compare, from :data:`DIRECTEDNESS_METHODS`.
        mask_percents: k of the top-k% magnitude masks, in (0, 100].
        widths: hidden widths of the MLP.
        base_epochs, epochs: training of the base and of each expert.
        learning_rate, batch_size: Adam and minibatch settings (for all training).
        val_fraction: held-out share for tasks without a validation split.
        ties_density, dare_drop: TIES density and DARE drop rate (λ is searched).
        task_names: labels (default the datasets' names).

    Returns:
        :class:`DirectednessResult`.

    Raises:
        ValueError: before any work, for no tasks, an unknown method, a task of the wrong input
            shape or with too many classes, bad seeds / λ / percentages.
    """
    tasks = list(tasks)
    lams = tuple(float(v) for v in lams)
    methods = tuple(methods)
    percents = tuple(float(k) for k in mask_percents)
    _check(tasks, base_data, seeds_per_task=seeds_per_task, lams=lams, methods=methods, percents=percents,
           task_names=task_names)
    names = tuple(task_names) if task_names is not None else tuple(t.name for t in tasks)
    k_init, k_base, k_val, k_ft, k_dare = jax.random.split(key, 5)
    tasks = [t if t.has_val else ldata.with_validation(jax.random.fold_in(k_val, i), t, fraction=val_fraction)
             for i, t in enumerate(tasks)]
    in_features = int(np.prod(base_data.x_train.shape[1:]))
    model = models.build("mlp", k_init, in_features=in_features, widths=(*widths, base_data.num_classes))
    apply_fn, params, state = models.functional(model)
    opt = make_optimizer("adam", learning_rate=learning_rate)

    def fit(k: Key, x: Any, y: Any, start: Params, n_epochs: int, trainer: Trainer | None = None) -> Params:
        tr = trainer or Trainer(apply_fn, x, y, optimizer=opt, batch_size=min(batch_size, int(x.shape[0])))
        return tr.run(k, tr.init(start, state), epochs=n_epochs).params

    base = fit(k_base, base_data.x_train, base_data.y_train, params, base_epochs)
    experts: list[list[Params]] = []
    for i, t in enumerate(tasks):
        x, y = t.train
        tr = Trainer(apply_fn, x, y, optimizer=opt, batch_size=min(batch_size, int(x.shape[0])))
        experts.append([fit(jax.random.fold_in(k_ft, i * seeds_per_task + s), x, y, base, epochs, tr)
                        for s in range(seeds_per_task)])
    T, S, L = len(tasks), seeds_per_task, len(lams)
    test_obj = [Objective(apply_fn, *t.test) for t in tasks]
    val_obj = [Objective(apply_fn, *t.val) for t in tasks]

    def acc(obj: Objective, ps: list[Params]) -> np.ndarray:
        return np.asarray(_accuracies(obj, tree.stack(ps)), np.float64)

    tvs = [[tree.sub(e, base) for e in row] for row in experts]
    flat = np.stack([np.asarray(tree.ravel(tv)[0], np.float64) for row in tvs for tv in row])
    norms = np.linalg.norm(flat, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    cosine = (flat @ flat.T) / np.outer(safe, safe)
    np.fill_diagonal(cosine, 1.0)

    base_acc = np.asarray([acc(o, [base])[0] for o in test_obj])
    expert_acc = np.asarray([acc(test_obj[i], experts[i]) for i in range(T)])
    curves = np.zeros((T, S, 2, L, T))
    for i, s in itertools.product(range(T), range(S)):
        ps = [tree.add_scaled(base, tvs[i][s], sign * lam) for sign in (1.0, -1.0) for lam in lams]
        for j in range(T):
            curves[i, s, :, :, j] = acc(test_obj[j], ps).reshape(2, L)

    merge_val = np.zeros((len(methods), S, L, T))
    merge_test = np.zeros((len(methods), S, L, T))
    for m, method in enumerate(methods):
        for s in range(S):
            ex = [experts[i][s] for i in range(T)]
            ps = [_merge(method, jax.random.fold_in(k_dare, s), ex, base, lam, density=ties_density,
                         drop=dare_drop) for lam in lams]
            for j in range(T):
                merge_val[m, s, :, j] = acc(val_obj[j], ps)
                merge_test[m, s, :, j] = acc(test_obj[j], ps)
    choice = np.stack([select_by_validation(v, t)[0] for v, t in zip(merge_val, merge_test, strict=True)])

    mask_gain = np.zeros((T, S, len(percents)))
    for i, s in itertools.product(range(T), range(S)):
        ps = [tree.add(base, jax.tree.map(lambda t, k: jnp.where(k, t, 0.0), tvs[i][s],
                                          sparsify.topk_mask(tvs[i][s], density=k / 100.0, scope="global")))
              for k in percents]
        gain = expert_acc[i, s] - base_acc[i]
        mask_gain[i, s] = (acc(test_obj[i], ps) - base_acc[i]) / gain if abs(gain) > 1e-12 else np.nan

    per_seed = [flat[[i * S + s for i in range(T)]] for s in range(S)]
    return DirectednessResult(
        cosine=cosine,
        curves=curves,
        base_accuracy=base_acc,
        expert_accuracy=expert_acc,
        merge_val=merge_val,
        merge_test=merge_test,
        merge_choice=choice,
        mask_gain=mask_gain,
        sign_conflicts=np.asarray([sign_conflict_rate(v) for v in per_seed]) if T > 1 else np.full(S, np.nan),
        erank_all=np.asarray(effective_rank(flat)),
        erank_per_seed=np.asarray([effective_rank(v) for v in per_seed]),
        erank_per_task=np.asarray([effective_rank(flat[i * S:(i + 1) * S]) for i in range(T)]),
        lams=lams,
        percents=percents,
        methods=methods,
        task_names=names,
    )


QUICK_DIRECTEDNESS: dict[str, Any] = {
    "seeds_per_task": 2,
    "lams": (0.0, 0.5, 1.0, 1.5),
    "mask_percents": (1, 5, 20, 100),
    "widths": (32,),
    "base_epochs": 6,
    "epochs": 5,
}
"""Settings of :func:`quick_directedness` (the report's quick section)."""


def standard_directedness(key: Key, dataset: Dataset | None = None, **settings: Any) -> DirectednessResult:
    """:func:`directedness` on three tasks built from ``dataset`` (default: digits).

    The base is trained on all of ``dataset``'s classes; the tasks are the first half of the
    classes, the second half (both ``relabel=False``) and the whole dataset with permuted inputs.
    ``settings`` are passed on to :func:`directedness` (its defaults otherwise).
    """
    if dataset is None:
        dataset = ldata.load("digits")
    if not isinstance(dataset, Dataset):
        msg = f"dataset must be a landscape.data.Dataset or None, got {type(dataset).__name__}"
        raise ValueError(msg)
    c = dataset.num_classes
    k_perm, k_run = jax.random.split(key)
    tasks = [
        ldata.class_subset(dataset, list(range(c // 2)), relabel=False),
        ldata.class_subset(dataset, list(range(c // 2, c)), relabel=False),
        ldata.permuted_inputs(k_perm, dataset),
    ]
    names = ("first-half", "second-half", "permuted")
    return directedness(k_run, dataset, tasks, task_names=names, **settings)


def quick_directedness(key: Key, dataset: Dataset | None = None) -> DirectednessResult:
    """:func:`standard_directedness` with :data:`QUICK_DIRECTEDNESS` (digits: a one-hidden-layer
    32-unit MLP, about 20 s on a 2-core CPU)."""
    return standard_directedness(key, dataset, **QUICK_DIRECTEDNESS)

r"""Evolutionary merging: CMA-ES over per-layer merge coefficients, scored by Objectives.

Akiba et al., "Evolutionary Optimization of Model Merging Recipes", arXiv 2403.13187, the
parameter-space part: a merge method (task arithmetic, TIES, DARE) gets one weight per model and
per *layer group*, optionally one density per group, and CMA-ES (Hansen 2016, arXiv 1604.00772;
evosax's ``CMA_ES``) searches them to minimise a fitness computed on data:

.. math:: \theta^{(g)}(c) = \Big[\mathrm{merge}\big(\tau_1,\dots,\tau_m;\ w = c_{:,g},\
          \text{density}=d_g\big)\Big]^{(g)}, \qquad
          c^\star = \arg\min_c \sum_k F_k(\theta(c)),

where :math:`[\cdot]^{(g)}` keeps the leaves of group :math:`g` and :math:`F_k` is the loss of the
task objective :math:`k` (``metric="loss"``) or minus its accuracy (``metric="accuracy"``). The
weights enter the method as its ``weights`` with ``lam=1``, so for task arithmetic group ``g``
is :math:`\theta_0^{(g)} + \sum_i c_{ig}\tau_i^{(g)}`; TIES defaults to the disjoint *sum*
(``merge="sum"``, FusionBench) because the disjoint mean is invariant to scaling the weights.
Each group's leaves come from a whole-model call of the method, so model-level choices (TIES'
``scope="global"`` trimming, DARE's masks) are exactly those of the plain method; under ``jit``
XLA drops the unused leaves of each call.

DARE's randomness comes from ``dare_key``, the same for every candidate of every generation, so
the fitness is a deterministic function of the coefficients (the paper's search also fixes the
merge seed). Every generation is one ``jax.vmap`` of merge + objectives over the population and
the whole search is one ``lax.scan`` under ``jax.jit`` (compiled once per setting). NaN fitness
(a diverged merge) counts as ``+inf`` for the search and is counted in the result.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from landscape import Objective, merge
    >>> base = {"w": jnp.zeros((2, 2))}
    >>> fts = [{"w": jnp.eye(2)}, {"w": -jnp.eye(2)}]
    >>> obj = Objective(lambda p, x: x @ p["w"], jnp.eye(2), 0.7 * jnp.eye(2), loss="mse")
    >>> res = merge.evolutionary_merge(jax.random.key(0), fts, obj, base=base, generations=15)
    >>> bool(res.best_fitness < 1e-3)
    True
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landscape._types import Array, Key, Params
from landscape.merge._inputs import as_stacked, check_choice, check_range
from landscape.merge.task_vectors import dare, task_arithmetic, ties
from landscape.objective import Objective
from landscape.tree import named_leaves

__all__ = ["EvolutionaryResult", "evolutionary_merge", "layer_groups"]

_METHODS = ("task_arithmetic", "ties", "dare")
_METRICS = ("loss", "accuracy")
_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "task_arithmetic": {},
    "ties": {"density": 0.2, "merge": "sum"},
    "dare": {"drop": 0.9},
}


@dataclasses.dataclass(frozen=True)
class EvolutionaryResult:
    """Outcome of :func:`evolutionary_merge`.

    Attributes:
        params: the merge at the best coefficients found.
        weights: ``(models, groups)`` best per-model, per-group weights.
        densities: ``(groups,)`` best densities (TIES density / DARE keep fraction) or None when
            they were not searched.
        fitness: ``(generations,)`` best fitness within each generation (minimised: summed loss,
            or minus summed accuracy).
        best_so_far: ``(generations,)`` running minimum of ``fitness`` (non-increasing).
        init_fitness: fitness of the initial mean (every weight ``init``).
        best_fitness: fitness of ``params``.
        nonfinite: number of candidates whose fitness was NaN/inf (treated as ``+inf``).
        groups: group names, in column order of ``weights``.
        method: ``"task_arithmetic"``, ``"ties"`` or ``"dare"``.
        metric: ``"loss"`` or ``"accuracy"``.
    """

    params: Params
    weights: Array
    densities: Array | None
    fitness: Array
    best_so_far: Array
    init_fitness: Array
    best_fitness: Array
    nonfinite: Array
    groups: tuple[str, ...]
    method: str
    metric: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no parameters)."""
        return {
            "method": self.method,
            "metric": self.metric,
            "groups": list(self.groups),
            "weights": np.asarray(self.weights).tolist(),
            "densities": None if self.densities is None else np.asarray(self.densities).tolist(),
            "fitness": np.asarray(self.fitness).tolist(),
            "best_so_far": np.asarray(self.best_so_far).tolist(),
            "init_fitness": float(self.init_fitness),
            "best_fitness": float(self.best_fitness),
            "nonfinite": int(self.nonfinite),
        }

    def plot(self) -> Any:
        """Plotly figure of the fitness over generations."""
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_scatter(y=np.asarray(self.fitness).tolist(), mode="lines+markers", name="best in generation")
        fig.add_scatter(y=np.asarray(self.best_so_far).tolist(), mode="lines", name="best so far")
        fig.update_layout(title=f"Evolutionary merging ({self.method}, CMA-ES)", xaxis_title="generation",
                          yaxis_title=f"fitness ({self.metric})")
        return fig


jax.tree_util.register_dataclass(
    EvolutionaryResult,
    data_fields=["params", "weights", "densities", "fitness", "best_so_far", "init_fitness", "best_fitness",
                 "nonfinite"],
    meta_fields=["groups", "method", "metric"],
)


def layer_groups(
    params: Params, groups: str | Callable[[str], str] = "layer"
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Group names and, per leaf (in ``jax.tree.leaves`` order), its group index.

    ``"layer"``: a leaf's key path without its last component (``layers/0/kernel`` and
    ``layers/0/bias`` form ``layers/0``; a top-level leaf is its own group); ``"leaf"``: every leaf
    alone; ``"model"``: one group; a callable maps a leaf's key path to its group name. Groups are
    numbered in order of first appearance.
    """
    paths = [p for p, _ in named_leaves(params)]
    if groups == "layer":
        names = [p.rsplit("/", 1)[0] if "/" in p else p for p in paths]
    elif groups == "leaf":
        names = paths
    elif groups == "model":
        names = ["model"] * len(paths)
    elif callable(groups):
        names = [groups(p) for p in paths]
        bad = [(p, n) for p, n in zip(paths, names, strict=True) if not isinstance(n, str)]
        if bad:
            msg = f"groups callable must return a str for every key path; got {bad[0][1]!r} for {bad[0][0]!r}"
            raise TypeError(msg)
    else:
        msg = f"groups must be 'layer', 'leaf', 'model' or a callable(path) -> name, got {groups!r}"
        raise ValueError(msg)
    order = list(dict.fromkeys(names))
    return tuple(order), tuple(order.index(n) for n in names)


def _merge_one(
    coef: Array,
    stacked: Params,
    base: Params,
    dare_key: Key | None,
    *,
    method: str,
    leaf_group: tuple[int, ...],
    n_groups: int,
    m: int,
    search_density: bool,
    settings: tuple[tuple[str, Any], ...],
) -> Params:
    """The merge at one flat coefficient vector ``[w (m * groups), d (groups)?]``."""
    w = coef[: m * n_groups].reshape(m, n_groups)
    d = jnp.clip(coef[m * n_groups:], 0.01, 1.0) if search_density else None
    kw = dict(settings)
    per_group = []
    for g in range(n_groups):
        extra: dict[str, Any] = {}
        if d is not None:
            if method == "ties":
                extra["density"] = d[g]
            else:
                extra["drop"] = jnp.clip(1.0 - d[g], 0.0, 0.99)
        if method == "task_arithmetic":
            out = task_arithmetic(stacked, base=base, lam=1.0, weights=w[:, g], **kw)
        elif method == "ties":
            out = ties(stacked, base=base, lam=1.0, weights=w[:, g], **{**kw, **extra})
        else:
            out = dare(dare_key, stacked, base=base, lam=1.0, weights=w[:, g], **{**kw, **extra})
        per_group.append(jax.tree.leaves(out))
    treedef = jax.tree.structure(base)
    return jax.tree.unflatten(treedef, [per_group[g][i] for i, g in enumerate(leaf_group)])


def _fitness(params: Params, objectives: tuple[Objective, ...], metric: str) -> Array:
    if metric == "loss":
        return sum(o.loss(params) for o in objectives)
    return -sum(o.evaluate(params)["accuracy"] for o in objectives)


@functools.partial(
    jax.jit,
    static_argnames=("method", "metric", "leaf_group", "n_groups", "m", "search_density", "settings",
                     "population", "generations"),
)
def _search(
    key: Key,
    mean0: Array,
    sigma: Array,
    stacked: Params,
    base: Params,
    objectives: tuple[Objective, ...],
    dare_key: Key | None,
    *,
    method: str,
    metric: str,
    leaf_group: tuple[int, ...],
    n_groups: int,
    m: int,
    search_density: bool,
    settings: tuple[tuple[str, Any], ...],
    population: int,
    generations: int,
) -> tuple[Array, Params, Array, Array, Array, Array, Array]:
    from evosax.algorithms import CMA_ES

    merge_kw = {"method": method, "leaf_group": leaf_group, "n_groups": n_groups, "m": m,
                "search_density": search_density, "settings": settings}

    def score(c: Array) -> Array:
        f = _fitness(_merge_one(c, stacked, base, dare_key, **merge_kw), objectives, metric)
        return jnp.asarray(f, jnp.float32)

    es = CMA_ES(population_size=population, solution=jnp.zeros_like(mean0))
    es_params = es.default_params.replace(std_init=sigma)
    k_init, k_run = jax.random.split(key)
    state = es.init(k_init, mean0, es_params)

    def gen(state: Any, k: Key) -> tuple[Any, tuple[Array, Array, Array]]:
        k_ask, k_tell = jax.random.split(k)
        pop, state = es.ask(k_ask, state, es_params)
        f = jax.vmap(score)(pop)
        bad = ~jnp.isfinite(f)
        f = jnp.where(bad, jnp.inf, f)
        state, _ = es.tell(k_tell, pop, f, state, es_params)
        return state, (jnp.min(f), state.best_fitness, jnp.sum(bad))

    state, (fit, best, bad) = jax.lax.scan(gen, state, jax.random.split(k_run, generations))
    merged = _merge_one(state.best_solution, stacked, base, dare_key, **merge_kw)
    f_best = jnp.asarray(_fitness(merged, objectives, metric), jnp.float32)
    return state.best_solution, merged, fit, best, score(mean0), f_best, jnp.sum(bad)


def evolutionary_merge(
    key: Key,
    finetuned: Sequence[Params] | Params,
    objectives: Objective | Sequence[Objective],
    *,
    base: Params,
    method: str = "task_arithmetic",
    groups: str | Callable[[str], str] = "layer",
    metric: str = "loss",
    population: int = 16,
    generations: int = 30,
    init: float = 0.3,
    sigma: float = 0.2,
    search_density: bool = False,
    init_density: float = 0.5,
    dare_key: Key | None = None,
    settings: Mapping[str, Any] | None = None,
) -> EvolutionaryResult:
    """Evolutionary merging (arXiv 2403.13187, parameter space): CMA-ES over per-layer coefficients.

    Args:
        key: PRNG key of the search (CMA-ES sampling).
        finetuned: the fine-tuned models (list or stacked), one per task.
        objectives: one Objective or several (their fitnesses are summed), e.g. one per task's
            validation data.
        base: the pre-trained params.
        method: ``"task_arithmetic"``, ``"ties"`` or ``"dare"``.
        groups: layer groups (:func:`layer_groups`): ``"layer"``, ``"leaf"``, ``"model"`` or a
            callable ``path -> group name``.
        metric: ``"loss"`` (summed losses) or ``"accuracy"`` (minus summed accuracies).
        population: CMA-ES population size (>= 2).
        generations: number of generations (>= 1).
        init: initial weight of every model in every group (0.3: FusionBench's task arithmetic
            and TIES scaling).
        sigma: initial CMA-ES step size.
        search_density: also search one density per group (TIES ``density``; DARE keep
            fraction ``1 - drop``), clipped to ``[0.01, 1]``, starting at ``init_density``.
        dare_key: the fixed key of DARE's drop masks (required for ``method="dare"``).
        settings: further keyword settings of the method (TIES: ``density=0.2, merge="sum"`` by
            default; DARE: ``drop=0.9``); ``weights`` and ``lam`` are owned by the search.

    Returns:
        :class:`EvolutionaryResult`.
    """
    check_choice("method", method, _METHODS)
    check_choice("metric", metric, _METRICS)
    objs = (objectives,) if isinstance(objectives, Objective) else tuple(objectives)
    if not objs or not all(isinstance(o, Objective) for o in objs):
        msg = "objectives must be an Objective or a non-empty sequence of Objectives"
        raise ValueError(msg)
    for name, v, lo in (("population", population, 2), ("generations", generations, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            msg = f"{name} must be an int >= {lo}, got {v!r}"
            raise ValueError(msg)
    check_range("sigma", sigma, 0.0, float("inf"), lo_open=True)
    check_range("init", init, -float("inf"), float("inf"))
    if search_density:
        if method == "task_arithmetic":
            msg = "search_density needs method='ties' or 'dare' (task arithmetic has no density)"
            raise ValueError(msg)
        check_range("init_density", init_density, 0.0, 1.0, lo_open=True)
    if method == "dare" and dare_key is None:
        msg = "method='dare' needs dare_key: the fixed PRNG key of the drop masks (same for every candidate)"
        raise ValueError(msg)
    kw = {**_DEFAULTS[method], **dict(settings or {})}
    owned = {"weights", "lam", "base"} & set(kw)
    if owned:
        msg = f"settings may not set {sorted(owned)}: the search owns the weights (lam is 1, base is given)"
        raise ValueError(msg)
    stacked, m = as_stacked(finetuned, what="finetuned", base=base)
    names, leaf_group = layer_groups(base, groups)
    n_groups = len(names)
    mean0 = jnp.full((m * n_groups,), init, jnp.float32)
    if search_density:
        mean0 = jnp.concatenate([mean0, jnp.full((n_groups,), init_density, jnp.float32)])
    static = {"method": method, "leaf_group": leaf_group, "n_groups": n_groups, "m": m,
              "search_density": search_density, "settings": tuple(sorted(kw.items()))}
    best, params, fit, so_far, f0, f_best, bad = _search(
        key, mean0, jnp.asarray(sigma, jnp.float32), stacked, base, objs, dare_key, metric=metric,
        population=population, generations=generations, **static)
    return EvolutionaryResult(
        params=params,
        weights=best[: m * n_groups].reshape(m, n_groups),
        densities=jnp.clip(best[m * n_groups:], 0.01, 1.0) if search_density else None,
        fitness=fit,
        best_so_far=so_far,
        init_fitness=f0,
        best_fitness=f_best,
        nonfinite=bad,
        groups=names,
        method=method,
        metric=metric,
    )

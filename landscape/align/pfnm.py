r"""PFNM and FedMA: Bayesian nonparametric matching of the neurons of several models.

**PFNM** (Yurochkin et al., "Bayesian Nonparametric Federated Learning of Neural Networks",
arXiv 1905.12022). Each of :math:`J` clients has :math:`L_j` hidden units of a layer, unit
:math:`l` described by the vector :math:`v_{jl}` of its weights (incoming weights, bias and, for
the last hidden layer, outgoing weights to the output). A Beta-Bernoulli process prior on global
units and a Gaussian likelihood :math:`v_{jl} \sim \mathcal N(\theta_i, \sigma^2 I)`,
:math:`\theta_i \sim \mathcal N(\mu_0, \sigma_0^2 I)` give the MAP assignment problem solved client
by client with the Hungarian algorithm. In natural parameters (precision-weighted sums) a global
unit :math:`i` holds :math:`G_i = \mu_0/\sigma_0^2 + \sum_{(j,l)\to i} v_{jl}/\sigma^2` and
:math:`S_i = 1/\sigma_0^2 + \sum_{(j,l)\to i} 1/\sigma^2`, its posterior mean is :math:`G_i/S_i`,
and the cost of giving client :math:`j`'s unit :math:`l` (natural parameters
:math:`x_l = v_{jl}/\sigma^2`, precision :math:`s = 1/\sigma^2`) to global unit :math:`i` or to the
:math:`k`-th new one is (the authors' ``compute_cost``, maximised)

.. math::
    C_{li} &= \Big\|\frac{x_l + G_i}{\sqrt{s + S_i}}\Big\|^2 - \Big\|\frac{G_i}{\sqrt{S_i}}\Big\|^2
              + \log\frac{\min(m_i, 10)}{J - \min(m_i, 10)}, \\
    C_{l,L+k} &= \Big\|\frac{x_l + \mu_0/\sigma_0^2}{\sqrt{s + 1/\sigma_0^2}}\Big\|^2
              - \Big\|\frac{\mu_0/\sigma_0^2}{\sqrt{1/\sigma_0^2}}\Big\|^2 - 2\log k + 2\log\frac{\gamma}{J},
    \quad k = 1..\min(L_j, \max(700 - L, 1)),

with :math:`m_i` the number of clients already assigned to :math:`i` (divisions are per
coordinate). The largest client starts the global model, the others are matched in order of
decreasing width, then ``iterations`` sweeps over the clients in random order (from ``key``)
remove a client and match it again. Hyperparameters default to the authors' experiment defaults
``sigma=sigma0=gamma=1``, ``it=5``; the prior mean is 0 for weights and 0.1 for biases; the
outgoing weights to output class :math:`c` of client :math:`j` have precision
:math:`f_{jc}/\sigma^2` where :math:`f_{jc}` is the client's share of class :math:`c`
(``class_counts``; :math:`1/J` without them), and the output bias is the prior-weighted average
:math:`(\sum_j f_{jc} b_{jc}/\sigma^2 + 0.1/\sigma_0^2)/(\sum_j f_{jc}/\sigma^2 + 1/\sigma_0^2)`
(``process_softmax_bias``). The global model may be wider than every client: unmatched units
become new global units. With the priors, posterior means are shrunk towards :math:`\mu_0`
(:math:`\sigma_0 \gg \sigma` removes the shrinkage).

Layers: the walk goes over the unit groups of a feed-forward
:class:`~landscape.align.PermutationSpec` from the input to the output (as
:func:`~landscape.align.ot_fusion`). A group's unit vector holds every leaf whose *last* axis is the
group (Dense ``(in, out)`` kernel, Conv ``(h, w, in, out)`` filter flattened, bias), with the
input axes of earlier groups scattered into the global order found for them (zeros where the
client has no unit: the authors' ``patch_weights``), plus, for PFNM, the leaves that map the group
straight to the outputs (all other axes unnamed). For a single hidden layer this is exactly the
authors' vector ``[W_in^T, b, W_out]``; with several layers the authors' code walks from the
output down with outgoing weights, while here every hidden layer is matched bottom-up on its
incoming weights (the FedMA order).

**FedMA** (Wang et al., "Federated Learning with Matched Averaging", arXiv 2002.06440): the
same matching, one layer at a time from the input: after layer :math:`n` is matched every client
takes the global units it was assigned (``weight[assignment]``, the client keeps its width),
freezes layers :math:`\le n` and retrains the rest on its own data (the ``retrain`` callback,
e.g. :func:`objective_retrain`); the output layer is finally averaged over the clients with the
class shares :math:`f_{jc}` (their rows scattered into the global order).

Supported models: Dense / Conv chains without norm layers or BatchNorm state (zoo ``MLP``, zoo
``CNN`` with ``norm=None``), Flax layout (output unit on the last axis). Runs on the host (scipy's
Hungarian solver), not jittable.

Example:
    >>> import jax
    >>> from flax import nnx
    >>> from landscape import align, models
    >>> fm, a, _ = models.functional(models.MLP(4, (6, 3), rngs=nnx.Rngs(0)))
    >>> b = align.apply(fm.spec, align.random_permutation(jax.random.key(1), fm.spec, a), a)
    >>> res = align.pfnm(jax.random.key(0), fm.spec, [a, b], sigma0=1e6)
    >>> res.widths, res.new_units
    ({'P_0': 6}, 0)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.optimize import linear_sum_assignment

from landscape._types import Key, Params
from landscape.align.ot_fusion import _layer_order
from landscape.align.spec import PermutationSpec, check_spec
from landscape.objective import Objective
from landscape.tree import named_leaves

__all__ = ["PFNMResult", "fedma", "match_neurons", "objective_retrain", "pfnm", "pfnm_cost"]

_MU0_BIAS = 0.1  # the authors' prior mean of biases (mu0 = 0 for weights)


@dataclasses.dataclass(frozen=True)
class PFNMResult:
    """Outcome of :func:`pfnm` / :func:`fedma`.

    Attributes:
        params: the global model (hidden widths ``widths``; every other axis as the clients').
        assignments: ``{group: (a_1, ..., a_J)}``; ``a_j[l]`` is the global unit of client ``j``'s
            unit ``l`` (distinct within a client).
        widths: ``{group: global width}``.
        local_widths: ``{group: (L_1, ..., L_J)}``.
        clients: the clients' params at the end (FedMA: matched and retrained; PFNM: the inputs).
        method: ``"pfnm"`` or ``"fedma"``.
    """

    params: Params
    assignments: Mapping[str, tuple[np.ndarray, ...]]
    widths: Mapping[str, int]
    local_widths: Mapping[str, tuple[int, ...]]
    clients: tuple[Params, ...]
    method: str

    @property
    def new_units(self) -> int:
        """Global units beyond the widest client, summed over groups."""
        return int(sum(self.widths[g] - max(self.local_widths[g]) for g in self.widths))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no parameters)."""
        return {
            "method": self.method,
            "widths": dict(self.widths),
            "local_widths": {g: list(v) for g, v in self.local_widths.items()},
            "new_units": self.new_units,
            "assignments": {g: [a.tolist() for a in v] for g, v in self.assignments.items()},
        }


# ------------------------------------------------------------------------------ the matching maths
def pfnm_cost(
    local_nat: np.ndarray,
    local_prec: np.ndarray,
    global_nat: np.ndarray,
    global_prec: np.ndarray,
    prior_nat: np.ndarray,
    prior_prec: np.ndarray,
    counts: np.ndarray,
    *,
    gamma: float,
    n_clients: int,
    max_global: int = 700,
) -> np.ndarray:
    """PFNM's augmented assignment score (to maximise), module docstring; shape ``(L_j, L + K)``.

    Args:
        local_nat: ``(L_j, D)`` the client's unit vectors times their precision.
        local_prec: ``(D,)`` the client's per-coordinate precision :math:`1/\\sigma^2`.
        global_nat, global_prec: ``(L, D)`` global natural parameters and precisions.
        prior_nat, prior_prec: ``(D,)`` prior mean times precision, prior precision.
        counts: ``(L,)`` clients assigned to each global unit (the client itself excluded).
        gamma: Indian-buffet mass :math:`\\gamma`.
        n_clients: :math:`J`.
        max_global: the authors' cap (700) on the global width: at most ``max(max_global - L, 1)``
            new columns.
    """
    lj, n_global = local_nat.shape[0], global_nat.shape[0]
    c = np.minimum(counts.astype(np.float64), 10.0)
    param = ((local_nat[:, None, :] + global_nat[None]) ** 2 / (local_prec + global_prec)[None]).sum(-1)
    param = param - (global_nat**2 / global_prec).sum(-1)[None] + np.log(c / (n_clients - c))[None]
    k = min(lj, max(max_global - n_global, 1))
    new = ((local_nat + prior_nat) ** 2 / (prior_prec + local_prec)).sum(-1) - (prior_nat**2 / prior_prec).sum()
    nonparam = new[:, None] - 2.0 * np.log(np.arange(1, k + 1))[None] + 2.0 * np.log(gamma / n_clients)
    return np.hstack([param, nonparam])


def _match_client(
    nat: np.ndarray, prec: np.ndarray, g_nat: np.ndarray, g_prec: np.ndarray, counts: np.ndarray,
    prior_nat: np.ndarray, prior_prec: np.ndarray, gamma: float, n_clients: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One Hungarian step (the authors' ``matching_upd_j``): assign a client, update the globals."""
    n_global = g_nat.shape[0]
    cost = pfnm_cost(nat, prec, g_nat, g_prec, prior_nat, prior_prec, counts, gamma=gamma, n_clients=n_clients)
    rows, cols = linear_sum_assignment(-cost)
    assign = np.empty(nat.shape[0], np.int64)
    g_nat, g_prec, counts = g_nat.copy(), g_prec.copy(), counts.copy()
    new_nat, new_prec = [], []
    for l, i in zip(rows, cols, strict=True):
        if i < n_global:
            assign[l] = i
            counts[i] += 1
            g_nat[i] += nat[l]
            g_prec[i] += prec
        else:
            assign[l] = n_global + len(new_nat)
            new_nat.append(prior_nat + nat[l])
            new_prec.append(prior_prec + prec)
    if new_nat:
        g_nat = np.vstack([g_nat, np.stack(new_nat)])
        g_prec = np.vstack([g_prec, np.stack(new_prec)])
        counts = np.concatenate([counts, np.ones(len(new_nat), counts.dtype)])
    return assign, g_nat, g_prec, counts


def match_neurons(
    key: Key | None,
    units: Sequence[np.ndarray],
    precisions: Sequence[np.ndarray],
    prior_mean: np.ndarray,
    prior_precision: np.ndarray,
    *,
    gamma: float = 1.0,
    iterations: int = 5,
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """BBP-MAP matching of one layer's units over clients (the authors' ``match_layer``).

    Args:
        key: PRNG key of the sweeps' random client order (may be None when ``iterations == 0``).
        units: per client ``(L_j, D)`` unit vectors (not natural parameters).
        precisions: per client ``(D,)`` precisions.
        prior_mean, prior_precision: ``(D,)``.
        gamma: :math:`\\gamma`.
        iterations: remove-and-rematch sweeps after the greedy pass.

    Returns:
        ``(assignments, posterior means (L, D), counts (L,))``.
    """
    n = len(units)
    if n < 2:
        msg = f"PFNM matches at least 2 clients, got {n}"
        raise ValueError(msg)
    if iterations and key is None:
        msg = "match_neurons needs a PRNG key for its random sweep order (or iterations=0)"
        raise ValueError(msg)
    prior_prec = np.asarray(prior_precision, np.float64)
    prior_nat = np.asarray(prior_mean, np.float64) * prior_prec
    precs = [np.asarray(p, np.float64) for p in precisions]
    nats = [np.asarray(u, np.float64) * p for u, p in zip(units, precs, strict=True)]
    order = sorted(range(n), key=lambda j: -nats[j].shape[0])
    first = order[0]
    g_nat = prior_nat + nats[first]
    g_prec = np.tile(prior_prec + precs[first], (g_nat.shape[0], 1))
    counts = np.ones(g_nat.shape[0], np.int64)
    assign: list[np.ndarray] = [np.zeros(0, np.int64)] * n
    assign[first] = np.arange(g_nat.shape[0])
    args = (prior_nat, prior_prec, float(gamma), n)
    for j in order[1:]:
        assign[j], g_nat, g_prec, counts = _match_client(nats[j], precs[j], g_nat, g_prec, counts, *args)
    for it in range(iterations):
        for j in np.asarray(jax.random.permutation(jax.random.fold_in(key, it), n)).tolist():
            a = assign[j]
            g_nat, g_prec, counts = g_nat.copy(), g_prec.copy(), counts.copy()
            g_nat[a] -= nats[j]
            g_prec[a] -= precs[j]
            counts[a] -= 1
            keep = counts > 0
            new_index = np.cumsum(keep) - 1
            g_nat, g_prec, counts = g_nat[keep], g_prec[keep], counts[keep]
            for k in range(n):
                if k != j:
                    assign[k] = new_index[assign[k]]
            assign[j], g_nat, g_prec, counts = _match_client(nats[j], precs[j], g_nat, g_prec, counts, *args)
    return assign, g_nat / g_prec, counts


# ------------------------------------------------------------------------------ walking the model
def _check(
    spec: PermutationSpec, models: Sequence[Params], class_counts: Any
) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
    if not isinstance(spec, PermutationSpec):
        msg = f"spec must be a PermutationSpec, got {type(spec).__name__}"
        raise TypeError(msg)
    if spec.state_axes:
        msg = ("PFNM/FedMA support models without BatchNorm state; this spec has state entries "
               f"{sorted(spec.state_axes)}")
        raise ValueError(msg)
    if not isinstance(models, (list, tuple)):
        msg = f"models must be a list of at least 2 params trees, got {type(models).__name__}"
        raise TypeError(msg)
    if len(models) < 2:
        msg = f"models must be a list of at least 2 params trees, got {len(models)}"
        raise ValueError(msg)
    leaves = []
    for j, m in enumerate(models):
        try:
            check_spec(spec, m)
        except ValueError as err:
            msg = f"model {j}: {err}"
            raise ValueError(msg) from None
        lv = {p: np.asarray(x, np.float64) for p, x in named_leaves(m)}
        for p, x in lv.items():
            if not np.all(np.isfinite(x)):
                msg = f"model {j} leaf {p!r} has non-finite values; PFNM/FedMA need finite weights"
                raise ValueError(msg)
        leaves.append(lv)
        if jax.tree.structure(m) != jax.tree.structure(models[0]):
            msg = f"model {j} has a different tree structure from model 0"
            raise ValueError(msg)
        for p, x in lv.items():
            for ax, name in enumerate(spec.axes[p]):
                if name is None and x.shape[ax] != leaves[0][p].shape[ax]:
                    msg = (f"model {j} leaf {p!r} axis {ax} (no permutation acts on it) has size {x.shape[ax]}, "
                           f"model 0 has {leaves[0][p].shape[ax]}")
                    raise ValueError(msg)
    counts = None
    if class_counts is not None:
        counts = np.asarray(class_counts, np.float64)
        if counts.ndim != 2 or counts.shape[0] != len(models) or np.any(counts < 0) or not np.all(np.isfinite(counts)):
            msg = f"class_counts must be a finite non-negative (clients, classes) array, got shape {counts.shape}"
            raise ValueError(msg)
        if np.any(counts.sum(0) == 0):
            msg = f"class_counts: classes {np.flatnonzero(counts.sum(0) == 0).tolist()} have no examples on any client"
            raise ValueError(msg)
    return leaves, counts


def _roles(spec: PermutationSpec) -> tuple[tuple[str, ...], dict[str, list[str]], dict[str, list[str]], list[str]]:
    """Group order, producers per group, output consumers per group, fixed leaves."""
    order, producers = _layer_order(spec)
    out_consumers: dict[str, list[str]] = {g: [] for g in order}
    fixed: list[str] = []
    for path, names in spec.axes.items():
        named = [n for n in names if n is not None]
        if names[-1] is not None:
            continue
        if not named:
            fixed.append(path)
        elif len(named) == 1:
            out_consumers[named[0]].append(path)
        else:
            msg = f"spec entry {path!r} maps several unit groups {named} to an unpermuted output; PFNM needs chains"
            raise ValueError(msg)
    for g in order:
        ones = [p for p in producers[g] if len(spec.axes[p]) == 1]
        if len(ones) > 1:
            msg = (f"group {g!r} has several 1-D leaves {sorted(ones)} (a norm layer?); PFNM/FedMA support Dense/Conv "
                   "layers with a bias and no norm layers")
            raise ValueError(msg)
    prods = {g: sorted(v) for g, v in producers.items()}
    return order, prods, {g: sorted(v) for g, v in out_consumers.items()}, sorted(fixed)


def _scatter(x: np.ndarray, ax: int, assign: np.ndarray, width: int) -> np.ndarray:
    shape = list(x.shape)
    shape[ax] = width
    out = np.zeros(shape)
    idx = [slice(None)] * x.ndim
    idx[ax] = assign
    out[tuple(idx)] = x
    return out


def _class_share(counts: np.ndarray | None, n: int, size: int, what: str) -> np.ndarray:
    """``(J, size)`` per-client shares of each output class (``1/J`` without counts)."""
    if counts is None:
        return np.full((n, size), 1.0 / n)
    if counts.shape[1] != size:
        msg = f"class_counts has {counts.shape[1]} classes but {what} has {size} outputs"
        raise ValueError(msg)
    return counts / counts.sum(0, keepdims=True)


def _unit_vectors(
    spec: PermutationSpec, lv: dict[str, np.ndarray], paths: list[str], g: str, assign: Mapping[str, list[np.ndarray]],
    widths: Mapping[str, int], j: int,
) -> tuple[np.ndarray, list[tuple[str, tuple[int, ...]]]]:
    """Client ``j``'s ``(L_j, D)`` unit vectors of group ``g`` over ``paths``; earlier groups scattered to global."""
    blocks, layout = [], []
    for p in paths:
        x = lv[p]
        names = spec.axes[p]
        for ax, h in enumerate(names):
            if h is not None and h != g:
                x = _scatter(x, ax, assign[h][j], widths[h])
        gax = names.index(g) if names[-1] != g else x.ndim - 1
        x = np.moveaxis(x, gax, 0)
        layout.append((p, x.shape[1:]))
        blocks.append(x.reshape(x.shape[0], -1))
    return np.hstack(blocks), layout


def _run(
    key: Key | None, spec: PermutationSpec, models: Sequence[Params], *, sigma: float, sigma0: float, gamma: float,
    iterations: int, class_counts: Any, fedma_mode: bool,
    retrain: Callable[[int, Params, frozenset[str]], Params] | None,
) -> PFNMResult:
    for name, v in (("sigma", sigma), ("sigma0", sigma0), ("gamma", gamma)):
        if not (isinstance(v, (int, float)) and np.isfinite(v) and v > 0):
            msg = f"{name} must be a positive finite number, got {v!r}"
            raise ValueError(msg)
    if not isinstance(iterations, int) or iterations < 0:
        msg = f"iterations must be an int >= 0, got {iterations!r}"
        raise ValueError(msg)
    if iterations and key is None:
        msg = "PFNM/FedMA need a PRNG key for the sweeps' random client order (or iterations=0)"
        raise ValueError(msg)
    leaves, counts = _check(spec, models, class_counts)
    order, producers, out_consumers, fixed = _roles(spec)
    n = len(models)
    assign: dict[str, list[np.ndarray]] = {}
    widths: dict[str, int] = {}
    local_widths = {g: tuple(int(leaves[j][producers[g][0]].shape[-1]) for j in range(n)) for g in order}
    global_leaves: dict[str, np.ndarray] = {}
    frozen: set[str] = set()
    for gi, g in enumerate(order):
        paths = producers[g] + ([] if fedma_mode else out_consumers[g])
        vecs, layouts, precs = [], None, []
        for j in range(n):
            v, layouts = _unit_vectors(spec, leaves[j], paths, g, assign, widths, j)
            vecs.append(v)
        prior_mean, prior_prec_parts = [], []
        for p, shape in layouts:
            size = int(np.prod(shape)) if shape else 1
            is_bias = p in producers[g] and len(spec.axes[p]) == 1
            prior_mean.append(np.full(size, _MU0_BIAS if is_bias else 0.0))
            prior_prec_parts.append(np.full(size, 1.0 / sigma0))
        for j in range(n):
            parts = []
            for p, shape in layouts:
                size = int(np.prod(shape)) if shape else 1
                if p in out_consumers[g] and not fedma_mode:
                    share = _class_share(counts, n, shape[-1], p)[j]
                    parts.append(np.broadcast_to(share / sigma, shape).reshape(-1))
                else:
                    parts.append(np.full(size, 1.0 / sigma))
            precs.append(np.concatenate(parts))
        k = None if key is None else jax.random.fold_in(key, gi)
        a, mean, _ = match_neurons(k, vecs, precs, np.concatenate(prior_mean), np.concatenate(prior_prec_parts),
                                   gamma=gamma, iterations=iterations)
        assign[g], widths[g] = a, int(mean.shape[0])
        col = 0
        for p, shape in layouts:
            size = int(np.prod(shape)) if shape else 1
            block = mean[:, col:col + size].reshape((mean.shape[0],) + tuple(shape))
            col += size
            names = spec.axes[p]
            gax = names.index(g) if names[-1] != g else len(names) - 1
            global_leaves[p] = np.moveaxis(block, 0, gax)
        if fedma_mode:
            frozen.update(producers[g])
            for j in range(n):  # the client takes its assigned global units (the authors' weight[assignment])
                for p in producers[g]:
                    x = global_leaves[p]
                    for ax, h in enumerate(spec.axes[p]):
                        if h is not None:
                            x = np.take(x, assign[h][j], axis=ax)
                    leaves[j][p] = x
            if retrain is not None and gi < len(order) - 1:
                for j in range(n):
                    new = retrain(j, _as_params(models[j], leaves[j]), frozenset(frozen))
                    lv = {p: np.asarray(x, np.float64) for p, x in named_leaves(new)}
                    bad = [p for p in lv if lv[p].shape != leaves[j][p].shape]
                    if set(lv) != set(leaves[j]) or bad:
                        msg = f"retrain callback changed the params of client {j} (paths or shapes, e.g. {bad[:1]})"
                        raise ValueError(msg)
                    leaves[j] = lv
    # output layer: FedMA averages every remaining leaf; PFNM the fixed leaves (prior-weighted)
    rest = fixed + ([p for g in order for p in out_consumers[g]] if fedma_mode else [])
    for p in rest:
        names = spec.axes[p]
        xs = []
        for j in range(n):
            x = leaves[j][p]
            for ax, h in enumerate(names):
                if h is not None:
                    x = _scatter(x, ax, assign[h][j], widths[h])
            xs.append(x)
        last = xs[0].shape[-1] if xs[0].ndim else 1
        share = _class_share(counts if xs[0].ndim else None, n, last, p) if xs[0].ndim else np.full((n, 1), 1.0 / n)
        if fedma_mode:
            global_leaves[p] = sum(share[j] * xs[j] for j in range(n)).reshape(xs[0].shape)
        else:
            mu0 = _MU0_BIAS if len(names) == 1 else 0.0
            num = sum(share[j] * xs[j] / sigma for j in range(n)) + mu0 / sigma0
            den = sum(share[j] / sigma for j in range(n)) + 1.0 / sigma0
            global_leaves[p] = (num / den).reshape(xs[0].shape)
    params = _as_params(models[0], global_leaves)
    clients = tuple(_as_params(models[j], leaves[j]) for j in range(n)) if fedma_mode else tuple(models)
    return PFNMResult(
        params=params,
        assignments={g: tuple(np.asarray(a) for a in assign[g]) for g in order},
        widths=widths,
        local_widths=local_widths,
        clients=clients,
        method="fedma" if fedma_mode else "pfnm",
    )


def _as_params(template: Params, leaves: Mapping[str, np.ndarray]) -> Params:
    dtypes = {p: jnp.result_type(x) for p, x in named_leaves(template)}
    paths = [p for p, _ in named_leaves(template)]
    treedef = jax.tree.structure(template)
    return jax.tree.unflatten(treedef, [jnp.asarray(leaves[p], dtypes[p]) for p in paths])


def pfnm(
    key: Key | None,
    spec: PermutationSpec,
    models: Sequence[Params],
    *,
    sigma: float = 1.0,
    sigma0: float = 1.0,
    gamma: float = 1.0,
    iterations: int = 5,
    class_counts: Any = None,
) -> PFNMResult:
    """PFNM (arXiv 1905.12022): one-shot Bayesian nonparametric matching of ``models`` (module docstring).

    Args:
        key: PRNG key of the sweeps' client order (None only with ``iterations=0``).
        spec: the models' permutation spec (feed-forward, Flax layout); clients may differ in width.
        models: at least 2 params trees.
        sigma, sigma0, gamma: likelihood std, prior std, IBP mass (the authors' defaults 1, 1, 1).
        iterations: remove-and-rematch sweeps (the authors' ``it=5``).
        class_counts: optional ``(clients, classes)`` training examples per class and client.
    """
    return _run(key, spec, models, sigma=sigma, sigma0=sigma0, gamma=gamma, iterations=iterations,
                class_counts=class_counts, fedma_mode=False, retrain=None)


def fedma(
    key: Key | None,
    spec: PermutationSpec,
    models: Sequence[Params],
    *,
    retrain: Callable[[int, Params, frozenset[str]], Params] | None = None,
    sigma: float = 1.0,
    sigma0: float = 1.0,
    gamma: float = 1.0,
    iterations: int = 5,
    class_counts: Any = None,
) -> PFNMResult:
    """FedMA (arXiv 2002.06440): layer-wise PFNM matching with retraining between layers.

    Args:
        key: PRNG key of the sweeps' client order (None only with ``iterations=0``).
        spec: the models' permutation spec (Dense / Conv chain, Flax layout).
        models: at least 2 clients' params.
        retrain: ``retrain(client, params, frozen_paths) -> params`` called after each hidden layer
            but the last is matched: train the client's leaves outside ``frozen_paths`` on its
            data, keeping every shape (:func:`objective_retrain` builds one); None skips it.
        sigma, sigma0, gamma, iterations: as :func:`pfnm` (FedMA's code uses the same defaults).
        class_counts: optional ``(clients, classes)``; the output layer average weights client
            ``j``'s class-``c`` column by its share :math:`f_{jc}` (uniform without).
    """
    return _run(key, spec, models, sigma=sigma, sigma0=sigma0, gamma=gamma, iterations=iterations,
                class_counts=class_counts, fedma_mode=True, retrain=retrain)


# ------------------------------------------------------------------------------ retraining
@functools.partial(jax.jit, static_argnames=("frozen_mask", "steps", "learning_rate"))
def _adam_steps(params: Params, obj: Objective, *, frozen_mask: tuple[bool, ...], steps: int,
                learning_rate: float) -> Params:
    opt = optax.adam(learning_rate)
    treedef = jax.tree.structure(params)
    mask = jax.tree.unflatten(treedef, list(frozen_mask))

    def step(carry: tuple[Params, Any], _: None) -> tuple[tuple[Params, Any], None]:
        p, state = carry
        g = jax.grad(obj.loss)(p)
        g = jax.tree.map(lambda gi, f: jnp.zeros_like(gi) if f else gi, g, mask)
        upd, state = opt.update(g, state, p)
        return (optax.apply_updates(p, upd), state), None

    (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return p


def objective_retrain(
    objectives: Sequence[Objective], *, steps: int = 50, learning_rate: float = 1e-2
) -> Callable[[int, Params, frozenset[str]], Params]:
    """A FedMA ``retrain`` callback: full-batch Adam on client ``j``'s Objective, frozen leaves fixed.

    Args:
        objectives: one Objective per client (its own training data).
        steps: Adam steps per retraining (full-dataset loss each step).
        learning_rate: Adam learning rate.
    """
    objs = tuple(objectives)
    if not objs or not all(isinstance(o, Objective) for o in objs):
        msg = "objectives must be a non-empty sequence of Objectives, one per client"
        raise ValueError(msg)
    if not isinstance(steps, int) or steps < 1:
        msg = f"steps must be a positive int, got {steps!r}"
        raise ValueError(msg)

    def retrain(j: int, params: Params, frozen: frozenset[str]) -> Params:
        if not 0 <= j < len(objs):
            msg = f"client {j} has no Objective (got {len(objs)})"
            raise ValueError(msg)
        mask = tuple(p in frozen for p, _ in named_leaves(params))
        return _adam_steps(params, objs[j], frozen_mask=mask, steps=steps, learning_rate=float(learning_rate))

    return retrain

"""Permutation specs and activations of any model, read off the jaxpr of its ``apply_fn``.

A hidden-unit permutation is a symmetry of a network when every tensor axis that carries those
units is permuted alike: the output columns of a layer, its bias, its norm's scale, bias and
running statistics, the residual stream it is added to, and the input rows of every layer that
reads it (Hecht-Nielsen 1990; Entezari et al., arXiv:2110.06296; Ainsworth et al., Git Re-Basin,
arXiv:2209.04836, whose ``permutation_spec`` is written by hand). :func:`trace_spec` derives that
bookkeeping instead: it traces ``apply_fn`` with :func:`jax.make_jaxpr`, gives every axis of every
intermediate value a node, and joins nodes that must carry the same permutation (union-find):

* elementwise ops (activations, bias adds, residual sums, norm arithmetic) join their operands'
  axes position by position (size-1 broadcast axes excepted); ``broadcast_in_dim``, ``reshape``
  (size-1 axes), ``transpose`` and ``squeeze`` carry axes through;
* ``dot_general`` joins each contracted pair and each batch pair and carries the free axes;
  ``conv_general_dilated`` joins the input features with the kernel's input axis and the kernel's
  output axis with the output features (grouped convs only in the depthwise form);
* reductions (``reduce_sum`` / ``max`` ..., LayerNorm statistics, global pooling) are invariant
  under a permutation of the reduced axes; ``reduce_window`` (pooling) carries the axes it does
  not window; ``cond`` and ``scan`` are followed into their bodies, and ``jit`` / ``custom_jvp`` /
  ``custom_vjp`` / ``remat`` calls are inlined.

* multi-head attention: a ``reshape`` splitting a unit axis of ``H·Dh`` units into ``(H, Dh)`` (and
  the merge back before the output projection) gives a *blockwise* group (``PermutationSpec.blocks``:
  a head permutation shared by the layer's queries / keys / values / output rows, composed with a
  permutation inside each head; Verma & Elbayad 2024, arXiv:2403.00986) when the heads and
  within-head axes are not mixed and every op on the within-head axis is batched over heads (the
  ``q·k`` and weights·``v`` contractions are). Queries and keys share their within-head
  permutation (their ``Dh`` axes are contracted), as do values and the output projection's rows.
  Rotary positions (slices / concatenates along ``Dh``, or tables built from ``iota``) fix the
  order inside query / key heads (``inner="fixed"``); heads stay permutable. A lookup into a
  parameter by token ids (``gather``: embeddings) fixes the indexed (vocabulary) axis.

Axes of the inputs and outputs, the spatial axes of conv kernels and the axes a structured op
produces (pooling windows, iota) are *fixed*. Every remaining class of joined axes that holds a
parameter axis is one permutation group, named ``P_0, P_1, ...`` in the order the forward pass
first touches it (for chains this is the zoo's own naming; :func:`match_names` renames a traced
spec to a reference's names). Where an op mixes the entries along a unit axis so that no
permutation survives (any other ``reshape`` merging or splitting a unit axis — e.g. flattening an
``(N, H, W, C)`` map into a dense layer, where the permutation would repeat per position, which a
:class:`PermutationSpec` cannot express —, a ``concatenate`` along units, ``gather`` / ``sort`` /
``cumsum`` / ``argmax`` / pooling along units, a closed-over constant array combined with the units,
an unknown primitive), tracing stops with a ``ValueError`` naming the primitive and the parameter
paths of that group, unless one of those paths is listed in ``unpermuted=`` (the mixed group is
then left unpermuted: its axes get ``None``).

:func:`activations` evaluates the same (inlined) jaxpr and returns, per permutation group, the
activation right before the nonlinearity (``kind="pre"``) and after it (``"post"``), or every
dense / conv layer's input keyed by its kernel path (``"input"``) — the points a zoo model's
``FunctionalModel.intermediates`` taps — so activation-based methods work on any model.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from landscape import align
    >>> def apply_fn(p, x):
    ...     h = jax.nn.relu(x @ p["w1"] + p["b1"])
    ...     return h @ p["w2"] + p["b2"]
    >>> params = {"w1": jnp.ones((3, 5)), "b1": jnp.zeros(5), "w2": jnp.ones((5, 2)), "b2": jnp.zeros(2)}
    >>> spec = align.trace_spec(apply_fn, params, jnp.ones((4, 3)))
    >>> dict(spec.axes)
    {'b1': ('P_0',), 'b2': (None,), 'w1': (None, 'P_0'), 'w2': ('P_0', None)}
    >>> align.activations(apply_fn, params, jnp.ones((4, 3)), kind="post")["P_0"].shape
    (4, 5)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from landscape._types import Array, Params
from landscape.align.spec import PermutationSpec
from landscape.tree import named_leaves

__all__ = [
    "ACTIVATION_KINDS",
    "LayerInputs",
    "LayerOutputs",
    "TracedModel",
    "activations",
    "layer_outputs",
    "match_names",
    "rename",
    "trace_spec",
    "with_activations",
]

ACTIVATION_KINDS = ("pre", "post", "input")
"""Accepted ``kind`` values of :func:`activations`."""

# ---------------------------------------------------------------------------------- primitives
_LINEAR = frozenset(
    {"add", "add_any", "sub", "neg", "convert_element_type", "copy", "copy_p", "reduce_precision", "real", "imag", "conj"}
)
_ELEMENTWISE = _LINEAR | frozenset(
    {
        "mul", "div", "max", "min", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "erf",
        "erfc", "erf_inv", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh",
        "acosh", "atanh", "sqrt", "rsqrt", "cbrt", "integer_pow", "pow", "abs", "sign", "floor",
        "ceil", "round", "select_n", "clamp", "square", "nextafter", "atan2", "rem", "and", "or",
        "not", "xor", "eq", "ne", "lt", "le", "gt", "ge", "is_finite", "lgamma", "digamma",
        "logaddexp", "stop_gradient", "shift_left", "shift_right_logical", "shift_right_arithmetic",
        "population_count", "clz", "optimization_barrier",
    }
)
_REDUCE = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "reduce_xor"})
_ARGREDUCE = frozenset({"argmax", "argmin"})
_CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})
_WINDOW = frozenset({"reduce_window_sum", "reduce_window_max", "reduce_window_min"})
_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
_INLINE = frozenset(
    {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "remat", "checkpoint", "remat2", "custom_lin"}
)


# ---------------------------------------------------------------------------------- flat IR
@dataclasses.dataclass(frozen=True)
class _Eqn:
    """One equation of the inlined jaxpr: the original eqn and its operand / result value ids."""

    eqn: Any
    ins: tuple[int, ...]
    outs: tuple[int, ...]

    @property
    def prim(self) -> str:
        return self.eqn.primitive.name


@dataclasses.dataclass(frozen=True)
class _Flat:
    """A jaxpr with every call inlined: values are ints, constants and literals stored by id."""

    eqns: tuple[_Eqn, ...]
    avals: tuple[Any, ...]
    consts: Mapping[int, Any]  # value id -> concrete value (closed-over constants and literals)
    literal: frozenset[int]  # ids of scalar literals (no nodes, no symmetry)
    invars: tuple[int, ...]
    outvars: tuple[int, ...]


def _sub_jaxpr(eqn: Any) -> tuple[Any, list[Any]] | None:
    for k in _CALL_PARAMS:
        j = eqn.params.get(k)
        if isinstance(j, jcore.ClosedJaxpr):
            return j.jaxpr, list(j.consts)
        if isinstance(j, jcore.Jaxpr):
            return j, []
    return None


def _flatten(closed: Any) -> _Flat:
    avals: list[Any] = []
    consts: dict[int, Any] = {}
    literal: set[int] = set()
    eqns: list[_Eqn] = []

    def new(aval: Any) -> int:
        avals.append(aval)
        return len(avals) - 1

    def read(env: dict[Any, int], v: Any) -> int:
        if isinstance(v, jcore.Literal):
            i = new(v.aval)
            consts[i] = v.val
            if np.ndim(v.val) == 0:
                literal.add(i)
            return i
        return env[v]

    def walk(jaxpr: Any, const_vals: Sequence[Any], ins: Sequence[int]) -> list[int]:
        env: dict[Any, int] = {}
        for v, c in zip(jaxpr.constvars, const_vals):
            i = new(v.aval)
            consts[i] = c
            env[v] = i
        for v, i in zip(jaxpr.invars, ins):
            env[v] = i
        for eqn in jaxpr.eqns:
            args = [read(env, v) for v in eqn.invars]
            sub = _sub_jaxpr(eqn) if eqn.primitive.name in _INLINE else None
            if sub is not None and len(sub[0].invars) == len(args):
                outs = walk(sub[0], sub[1], args)
            else:
                outs = [new(v.aval) for v in eqn.outvars]
                eqns.append(_Eqn(eqn, tuple(args), tuple(outs)))
            for v, o in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = o
        return [read(env, v) for v in jaxpr.outvars]

    invars = [new(v.aval) for v in closed.jaxpr.invars]
    outvars = walk(closed.jaxpr, closed.consts, invars)
    return _Flat(tuple(eqns), tuple(avals), consts, frozenset(literal), tuple(invars), tuple(outvars))


def _eval_flat(flat: _Flat, args: Sequence[Any], wanted: Sequence[int]) -> list[Any]:
    """Evaluate the inlined jaxpr on ``args`` (concrete or traced) and return the ``wanted`` values."""
    env: dict[int, Any] = dict(flat.consts)
    for i, a in zip(flat.invars, args):
        env[i] = a
    want = set(wanted)
    last_use: dict[int, int] = {}
    for k, e in enumerate(flat.eqns):
        for i in e.ins:
            last_use[i] = k
    for k, e in enumerate(flat.eqns):
        invals = [env[i] for i in e.ins]
        params = e.eqn.primitive.get_bind_params(e.eqn.params)
        with e.eqn.ctx.manager:
            outs = e.eqn.primitive.bind(*invals, **params)
        if not e.eqn.primitive.multiple_results:
            outs = [outs]
        for o, val in zip(e.outs, outs):
            env[o] = val
        for i in e.ins:  # free values nobody needs any more
            if last_use.get(i) == k and i not in want and i not in flat.consts and i not in flat.outvars:
                env.pop(i, None)
    return [env[i] for i in wanted]


# ---------------------------------------------------------------------------------- union-find
class _Nodes:
    """Union-find over tensor axes with per-class bookkeeping."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.fixed: list[bool] = []  # benign: inputs, outputs, structured axes, unpermuted params
        self.breaks: list[list[tuple[int, str]]] = []  # (eqn index, primitive) that mix these units
        self.params: list[list[tuple[str, int]]] = []
        self.state: list[list[tuple[str, int]]] = []
        self.seen: list[float] = []
        self.used: list[bool] = []
        self.leaf: set[int] = set()  # the axes of the params / state leaves themselves

    def new(self, size: int, *, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.fixed.append(fixed)
        self.breaks.append([])
        self.params.append([])
        self.state.append([])
        self.seen.append(math.inf)
        self.used.append(False)
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:  # pragma: no cover - guarded by the callers
            msg = f"internal error: joining axes of sizes {self.size[ra]} and {self.size[rb]}"
            raise AssertionError(msg)
        self.parent[rb] = ra
        self.fixed[ra] = self.fixed[ra] or self.fixed[rb]
        self.breaks[ra] += self.breaks[rb]
        self.params[ra] += self.params[rb]
        self.state[ra] += self.state[rb]
        self.seen[ra] = min(self.seen[ra], self.seen[rb])
        self.used[ra] = self.used[ra] or self.used[rb]

    def fix(self, a: int) -> None:
        self.fixed[self.find(a)] = True

    def mark_break(self, a: int, where: tuple[int, str]) -> None:
        self.breaks[self.find(a)].append(where)

    def touch(self, a: int, k: int) -> None:
        r = self.find(a)
        self.seen[r] = min(self.seen[r], k)
        self.used[r] = True


@dataclasses.dataclass(frozen=True)
class _Split:
    """A reshape between one axis of ``B·H``-style size and two axes ``(outer, inner)`` (row-major:
    flat index ``o·|inner| + i``): the head split / merge of multi-head attention."""

    flat: int  # node of the flat axis
    outer: int  # node of the outer (head) axis
    inner: int  # node of the inner (within-head) axis
    merge: bool  # True: (outer, inner) -> flat; False: flat -> (outer, inner)
    where: tuple[int, str]
    value: int  # the flat value id (the reshape's input for a split, its output for a merge)
    top: bool = True  # in the top-level jaxpr (value ids of cond / scan bodies are their own)


@dataclasses.dataclass
class _Analysis:
    nodes: _Nodes
    axes: dict[int, tuple[int, ...]]  # value id -> node per axis
    counter: list[int]
    splits: list[_Split] = dataclasses.field(default_factory=list)
    tables: list[dict[int, tuple[int, ...]]] = dataclasses.field(default_factory=list)  # sub-jaxpr axes
    top: bool = True


def _shape(aval: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in getattr(aval, "shape", ()))


def _fresh(an: _Analysis, aval: Any, *, fixed: bool = False) -> tuple[int, ...]:
    return tuple(an.nodes.new(s, fixed=fixed) for s in _shape(aval))


def _join(an: _Analysis, a: int, b: int) -> None:
    if an.nodes.size[a] == an.nodes.size[b] and an.nodes.size[a] > 1:
        an.nodes.union(a, b)


def _reshape_groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair up runs of axes (size-1 axes dropped) of two shapes with equal products."""
    ia = [i for i, s in enumerate(a) if s != 1]
    ib = [i for i, s in enumerate(b) if s != 1]
    out: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(ia) and j < len(ib):
        ga, gb = [ia[i]], [ib[j]]
        pa, pb = a[ia[i]], b[ib[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(ia):
                ga.append(ia[i])
                pa *= a[ia[i]]
                i += 1
            elif pb < pa and j < len(ib):
                gb.append(ib[j])
                pb *= b[ib[j]]
                j += 1
            else:
                return None
        out.append((ga, gb))
    if i < len(ia) or j < len(ib):
        return None
    return out


def _analyse_eqns(an: _Analysis, flat: _Flat) -> None:  # noqa: C901 - one dispatch table
    nodes = an.nodes
    for e in flat.eqns:
        k = an.counter[0]
        an.counter[0] += 1
        prim = e.prim
        p = e.eqn.params
        where = (k, prim)
        ins = [an.axes.get(i, ()) for i in e.ins]
        in_shapes = [_shape(flat.avals[i]) for i in e.ins]
        out_avals = [flat.avals[o] for o in e.outs]
        for ax in ins:
            for n in ax:
                nodes.touch(n, k)

        def brk(*axes_lists: Sequence[int]) -> None:
            for ax in axes_lists:
                for n in ax:
                    nodes.mark_break(n, where)  # noqa: B023

        outs: list[tuple[int, ...]] | None = None
        if prim in _ELEMENTWISE:
            out = list(_fresh(an, out_avals[0]))
            oshape = _shape(out_avals[0])
            for ax, shp in zip(ins, in_shapes):
                if len(shp) == len(oshape):
                    for d in range(len(oshape)):
                        if shp[d] == oshape[d]:
                            _join(an, ax[d], out[d])
            outs = [tuple(out)] * len(e.outs)
            if len(e.outs) > 1:  # optimization_barrier: identity on each operand
                outs = [tuple(ins[i]) if i < len(ins) else _fresh(an, out_avals[i]) for i in range(len(e.outs))]
        elif prim == "broadcast_in_dim":
            out = list(_fresh(an, out_avals[0]))
            for i, d in enumerate(p["broadcast_dimensions"]):
                if in_shapes[0][i] == _shape(out_avals[0])[d]:
                    _join(an, ins[0][i], out[d])
            outs = [tuple(out)]
        elif prim == "reshape":
            oshape = _shape(out_avals[0])
            out = list(_fresh(an, out_avals[0]))
            groups = _reshape_groups(in_shapes[0], oshape) if p.get("dimensions") is None else None
            if groups is None:
                brk(ins[0])
                for n in out:
                    nodes.fix(n)
            else:
                for ga, gb in groups:
                    if len(ga) == 1 and len(gb) == 1:
                        _join(an, ins[0][ga[0]], out[gb[0]])
                    elif len(ga) == 1 and len(gb) == 2:  # head split, resolved in _resolve_splits
                        an.splits.append(_Split(ins[0][ga[0]], out[gb[0]], out[gb[1]], False, where, e.ins[0], an.top))
                    elif len(ga) == 2 and len(gb) == 1:  # head merge
                        an.splits.append(_Split(out[gb[0]], ins[0][ga[0]], ins[0][ga[1]], True, where, e.outs[0], an.top))
                    else:
                        brk([ins[0][i] for i in ga])
                        for j in gb:
                            nodes.fix(out[j])
            outs = [tuple(out)]
        elif prim == "squeeze":
            dims = {d % len(in_shapes[0]) for d in p["dimensions"]}
            outs = [tuple(n for d, n in enumerate(ins[0]) if d not in dims)]
        elif prim == "expand_dims":  # pragma: no cover - not a lax primitive today
            outs = None
        elif prim == "transpose":
            outs = [tuple(ins[0][d] for d in p["permutation"])]
        elif prim in _REDUCE:
            axes = set(p["axes"])
            outs = [tuple(n for d, n in enumerate(ins[0]) if d not in axes)]
        elif prim in _ARGREDUCE:
            axes = set(p["axes"])
            brk([n for d, n in enumerate(ins[0]) if d in axes])
            outs = [tuple(n for d, n in enumerate(ins[0]) if d not in axes)]
        elif prim in _CUMULATIVE:
            out = list(ins[0])
            brk([ins[0][p["axis"]]])
            out[p["axis"]] = nodes.new(in_shapes[0][p["axis"]], fixed=True)
            outs = [tuple(out)]
        elif prim == "dot_general":
            (lc, rc), (lb, rb) = p["dimension_numbers"]
            lhs, rhs = ins[0], ins[1]
            for a, b in zip(lc, rc):
                _join(an, lhs[a], rhs[b])
            for a, b in zip(lb, rb):
                _join(an, lhs[a], rhs[b])
            lfree = [d for d in range(len(lhs)) if d not in lc and d not in lb]
            rfree = [d for d in range(len(rhs)) if d not in rc and d not in rb]
            outs = [tuple([lhs[d] for d in lb] + [lhs[d] for d in lfree] + [rhs[d] for d in rfree])]
        elif prim == "conv_general_dilated":
            lspec, rspec, ospec = p["dimension_numbers"]
            lhs, rhs = ins[0], ins[1]
            out = list(_fresh(an, out_avals[0]))
            fgc, bgc = p["feature_group_count"], p["batch_group_count"]
            cin, cout = in_shapes[0][lspec[1]], in_shapes[1][rspec[0]]
            if bgc != 1:
                brk(lhs, rhs)
                for n in out:
                    nodes.fix(n)
            else:
                _join(an, lhs[lspec[0]], out[ospec[0]])
                if fgc == 1:
                    _join(an, lhs[lspec[1]], rhs[rspec[1]])
                    _join(an, rhs[rspec[0]], out[ospec[1]])
                elif fgc == cin == cout and in_shapes[1][rspec[1]] == 1:
                    _join(an, lhs[lspec[1]], rhs[rspec[0]])
                    _join(an, rhs[rspec[0]], out[ospec[1]])
                else:
                    brk([lhs[lspec[1]], rhs[rspec[0]], rhs[rspec[1]]])
                    nodes.fix(out[ospec[1]])
                for d in rspec[2:]:
                    nodes.fix(rhs[d])
                brk([lhs[d] for d in lspec[2:]])
                for d in ospec[2:]:
                    nodes.fix(out[d])
            outs = [tuple(out)]
        elif prim in _WINDOW or prim == "reduce_window":
            n_ops = len(e.ins) // 2 if prim == "reduce_window" else 1
            window = p["window_dimensions"]
            strides = p["window_strides"]
            pad = p["padding"]
            bdil = p.get("base_dilation", (1,) * len(window))
            wdil = p.get("window_dilation", (1,) * len(window))
            outs = []
            for o in range(len(e.outs)):
                src = ins[o % n_ops]
                out = list(_fresh(an, out_avals[o]))
                for d in range(len(window)):
                    if window[d] == 1 and strides[d] == 1 and tuple(pad[d]) == (0, 0) and bdil[d] == 1 and wdil[d] == 1:
                        _join(an, src[d], out[d])
                    else:
                        brk([src[d]])
                        nodes.fix(out[d])
                outs.append(tuple(out))
        elif prim == "pad":
            out = list(_fresh(an, out_avals[0]))
            for d, (lo, hi, interior) in enumerate(p["padding_config"]):
                if (lo, hi, interior) == (0, 0, 0):
                    _join(an, ins[0][d], out[d])
                else:
                    brk([ins[0][d]])
                    nodes.fix(out[d])
            outs = [tuple(out)]
        elif prim in ("slice", "dynamic_slice", "rev"):
            out = list(_fresh(an, out_avals[0]))
            oshape = _shape(out_avals[0])
            for d in range(len(oshape)):
                full = in_shapes[0][d] == oshape[d]
                if prim == "slice":
                    full = full and (p["strides"] is None or p["strides"][d] == 1)
                if prim == "rev":
                    full = d not in p["dimensions"]
                if full:
                    _join(an, ins[0][d], out[d])
                elif ins[0][d] in nodes.leaf and prim != "rev":
                    nodes.fix(ins[0][d])  # part of a parameter read by index (positions[:T]): fixed
                    nodes.fix(out[d])
                else:
                    brk([ins[0][d]])
                    nodes.fix(out[d])
            outs = [tuple(out)]
        elif prim == "dynamic_update_slice":
            out = list(_fresh(an, out_avals[0]))
            for d in range(len(in_shapes[0])):
                if in_shapes[1][d] == in_shapes[0][d]:
                    _join(an, ins[0][d], out[d])
                    _join(an, ins[1][d], out[d])
                else:
                    brk([ins[0][d], ins[1][d]])
                    nodes.fix(out[d])
            outs = [tuple(out)]
        elif prim == "concatenate":
            dim = p["dimension"]
            out = list(_fresh(an, out_avals[0]))
            for ax in ins:
                for d in range(len(out)):
                    if d != dim:
                        _join(an, ax[d], out[d])
            brk([ax[dim] for ax in ins])
            nodes.fix(out[dim])
            outs = [tuple(out)]
        elif prim == "split":
            axis = p["axis"]
            outs = []
            brk([ins[0][axis]])
            for o in range(len(e.outs)):
                out = list(_fresh(an, out_avals[o]))
                for d in range(len(out)):
                    if d == axis:
                        nodes.fix(out[d])
                    else:
                        _join(an, ins[0][d], out[d])
                outs.append(tuple(out))
        elif prim in ("sort", "top_k"):
            dim = p.get("dimension", len(in_shapes[0]) - 1)
            outs = []
            for ax in ins:
                brk([ax[dim]])
            for o in range(len(e.outs)):
                out = list(_fresh(an, out_avals[o]))
                for ax in ins:
                    for d in range(len(out)):
                        if d != dim and d < len(ax):
                            _join(an, ax[d], out[d])
                nodes.fix(out[dim])
                outs.append(tuple(out))
        elif prim == "gather":
            dn = p["dimension_numbers"]
            op, idx = ins[0], ins[1]
            oshape = _shape(out_avals[0])
            out = list(_fresh(an, out_avals[0]))
            slice_sizes = p["slice_sizes"]
            batching = tuple(getattr(dn, "operand_batching_dims", ()))
            kept = [d for d in range(len(op)) if d not in dn.collapsed_slice_dims and d not in batching]
            for d, od in zip(kept, dn.offset_dims):
                if d not in dn.start_index_map and slice_sizes[d] == in_shapes[0][d]:
                    _join(an, op[d], out[od])
                else:
                    brk([op[d]])
                    nodes.fix(out[od])
            for d in range(len(op)):
                if d not in kept:
                    # a lookup into a parameter (token embedding): its indexed axis is the input's
                    # vocabulary, fixed; gathering hidden units of an activation mixes them
                    if op[d] in nodes.leaf:
                        nodes.fix(op[d])
                    else:
                        brk([op[d]])
            batch_out = [d for d in range(len(oshape)) if d not in dn.offset_dims]
            for od, n in zip(batch_out, idx[:-1]):
                _join(an, n, out[od])
            outs = [tuple(out)]
        elif prim == "iota":
            out = list(_fresh(an, out_avals[0]))
            nodes.fix(out[p["dimension"]])
            outs = [tuple(out)]
        elif prim == "cond":
            outs = [_fresh(an, a) for a in out_avals]
            for branch in p["branches"]:
                res = _analyse_sub(an, branch, ins[1:])
                for o, r in zip(outs, res):
                    for a, b in zip(o, r):
                        _join(an, a, b)
        elif prim == "scan":
            nc, ncarry = p["num_consts"], p["num_carry"]
            body_in = list(ins[:nc]) + list(ins[nc : nc + ncarry])
            for ax in ins[nc + ncarry :]:
                brk([ax[0]])
                body_in.append(tuple(ax[1:]))
            res = _analyse_sub(an, p["jaxpr"], body_in)
            outs = []
            for c in range(ncarry):
                for a, b in zip(ins[nc + c], res[c]):
                    _join(an, a, b)
                outs.append(tuple(ins[nc + c]))
            for r, aval in zip(res[ncarry:], out_avals[ncarry:]):
                outs.append((nodes.new(_shape(aval)[0], fixed=True), *r))
        if outs is None:  # unknown primitive: nothing may be permuted through it
            brk(*ins)
            outs = [_fresh(an, a, fixed=True) for a in out_avals]
        for o, ax in zip(e.outs, outs):
            an.axes[o] = tuple(ax)
            for n in ax:
                nodes.touch(n, k)


def _analyse_sub(an: _Analysis, closed: Any, in_axes: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Analyse a sub-jaxpr (cond branch, scan body) whose inputs carry ``in_axes``."""
    if isinstance(closed, jcore.Jaxpr):
        closed = jcore.ClosedJaxpr(closed, [])
    flat = _flatten(closed)
    sub = _Analysis(an.nodes, {}, an.counter, an.splits, an.tables, top=False)
    an.tables.append(sub.axes)
    for i, ax in zip(flat.invars, in_axes):
        sub.axes[i] = tuple(ax)
    _seed_consts(sub, flat)
    _analyse_eqns(sub, flat)
    return [sub.axes.get(o, _fresh(an, flat.avals[o], fixed=True)) for o in flat.outvars]


def _seed_consts(an: _Analysis, flat: _Flat) -> None:
    for i, val in flat.consts.items():
        if i in flat.literal:
            an.axes[i] = ()
            continue
        ax = _fresh(an, flat.avals[i], fixed=False)
        for n in ax:
            an.nodes.mark_break(n, (-1, f"closed-over constant {_describe(flat.avals[i])}"))
        an.axes[i] = ax


def _describe(aval: Any) -> str:
    return f"{getattr(aval, 'dtype', '?')}{list(_shape(aval))}"


# ---------------------------------------------------------------------------------- head splits
def _resolve_splits(an: _Analysis) -> dict[int, tuple[int, int]]:
    """Decide which head splits / merges are blockwise symmetries; ``{flat root: (outer root, inner root)}``.

    A reshape of a unit axis ``F`` of size ``H·B`` into ``(H, B)`` (or back) keeps a symmetry when
    the permutation of ``F`` is blockwise, ``σ[h]·B + τ_h[d]``: the outer class (heads) and the inner
    class carry no parameter axis of their own (they exist only between the split and the merge)
    and are not mixed by any op, and every value holding an inner axis also holds the outer axis
    of the same split, so each head's inner units can be permuted on their own (attention: the
    score and value contractions batch over heads). The inner class may be fixed (rotary
    queries / keys: identity inside each head) or mixed within each head (rotary positions rotate
    coordinate pairs: slices and a concatenate along the head axis; the head permutation survives
    with the identity inside each head); a fixed outer class or an inner class met without
    its heads is not a blockwise symmetry this spec expresses. Such splits are treated as before
    (the reshape mixes the source axis: a break, the result axes fixed). A fixed flat axis fixes
    its parts and two fixed parts fix the flat axis. Flat classes split into the same ``(outer,
    inner)`` pair carry the same permutation and are joined (queries and keys; values and the
    output projection's input).
    """
    nodes = an.nodes
    live = list(an.splits)
    dead: list[_Split] = []

    def kill(sp: _Split) -> None:
        src = [sp.outer, sp.inner] if sp.merge else [sp.flat]
        res = [sp.flat] if sp.merge else [sp.outer, sp.inner]
        for n in src:
            nodes.mark_break(n, sp.where)
        for n in res:
            nodes.fix(n)
        dead.append(sp)

    for _ in range(64):
        changed = False
        cooccur: dict[int, set[int]] = {}  # inner root -> roots present in every value holding it
        for table in [an.axes, *an.tables]:
            for ax in table.values():
                roots = {nodes.find(n) for n in ax}
                for r in roots:
                    cooccur[r] = roots if r not in cooccur else cooccur[r] & roots
        outer_of: dict[int, int] = {}
        roles: dict[int, str] = {}
        for sp in live:
            f, o, i = nodes.find(sp.flat), nodes.find(sp.outer), nodes.find(sp.inner)
            if nodes.fixed[f] and not (nodes.fixed[o] and nodes.fixed[i]):
                nodes.fix(o)
                nodes.fix(i)
                changed = True
            elif nodes.fixed[o] and nodes.fixed[i] and not nodes.fixed[f]:
                nodes.fix(f)
                changed = True
            if nodes.fixed[f]:
                continue
            bad = (
                nodes.params[o] or nodes.params[i] or nodes.state[o] or nodes.state[i]
                or nodes.fixed[o] or nodes.breaks[o]
                or (not (nodes.fixed[i] or nodes.breaks[i]) and o not in cooccur.get(i, set()))
                or outer_of.setdefault(i, o) != o
                or roles.setdefault(o, "outer") != "outer" or roles.setdefault(i, "inner") != "inner"
            )
            if bad:
                kill(sp)
                changed = True
        live = [sp for sp in live if sp not in dead]
        # one (outer, inner) pair per flat class, and flat classes with the same pair joined
        pair_of: dict[int, tuple[int, int]] = {}
        by_pair: dict[tuple[int, int], int] = {}
        for sp in live:
            f, o, i = nodes.find(sp.flat), nodes.find(sp.outer), nodes.find(sp.inner)
            if nodes.fixed[f]:
                continue
            if f in pair_of and pair_of[f] != (o, i):
                o0, i0 = pair_of[f]
                if nodes.size[o0] == nodes.size[o] and nodes.size[i0] == nodes.size[i]:
                    nodes.union(o0, o)
                    nodes.union(i0, i)
                else:
                    kill(sp)
                changed = True
                continue
            pair_of[f] = (o, i)
            if (o, i) in by_pair and nodes.find(by_pair[(o, i)]) != f:
                nodes.union(by_pair[(o, i)], f)
                changed = True
            by_pair.setdefault((o, i), f)
        live = [sp for sp in live if sp not in dead]
        if not changed:
            return {
                nodes.find(sp.flat): (nodes.find(sp.outer), nodes.find(sp.inner))
                for sp in live
                if not nodes.fixed[nodes.find(sp.flat)]
            }
    msg = "internal error: head splits did not settle"  # pragma: no cover
    raise AssertionError(msg)  # pragma: no cover


# ---------------------------------------------------------------------------------- tracing
def _call_parts(apply_fn: Any, state: Params | None) -> tuple[Callable[..., Any], Params | None]:
    """``(f, state)`` with ``f(params, state, x)``; a zoo ``FunctionalModel`` defaults to its own state."""
    if state is None and hasattr(apply_fn, "apply_with_state") and jax.tree.leaves(getattr(apply_fn, "state", {})):
        state = apply_fn.state
    if state is None:
        return (lambda p, s, x: apply_fn(p, x)), None
    if hasattr(apply_fn, "apply_with_state"):
        return apply_fn.apply_with_state, state
    return apply_fn, state


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)), tree)


@dataclasses.dataclass(frozen=True, eq=False)
class _Trace:
    flat: _Flat
    nodes: _Nodes
    axes: dict[int, tuple[int, ...]]
    param_ids: dict[str, int]
    state_ids: dict[str, int]
    n_params: int
    n_state: int
    groups: dict[int, str]  # class root -> traced name
    spec: PermutationSpec
    split_values: dict[str, tuple[int, ...]]  # blockwise group -> the flat values split into heads


def _trace(
    apply_fn: Any, params: Params, x: Any, *, state: Params | None, unpermuted: Sequence[str], what: str
) -> _Trace:
    if not callable(apply_fn):
        msg = f"{what} needs a callable apply_fn(params, x), got {type(apply_fn).__name__}"
        raise ValueError(msg)
    fn, state = _call_parts(apply_fn, state)
    state_tree = {} if state is None else state
    try:
        closed = jax.make_jaxpr(fn)(_abstract(params), _abstract(state_tree), _abstract(x))
    except Exception as err:  # noqa: BLE001 - re-raised with the context a user needs
        shapes = jax.tree.map(jnp.shape, x)
        name = getattr(apply_fn, "__qualname__", type(apply_fn).__name__)
        msg = (
            f"{what}: apply_fn {name} cannot be traced with params and x of shapes {shapes}"
            f"{' and the given state' if state is not None else ''}: {type(err).__name__}: {err}"
        )
        raise ValueError(msg) from err
    flat = _flatten(closed)
    p_named = named_leaves(params)
    s_named = named_leaves(state_tree)
    unknown = sorted(set(unpermuted) - {n for n, _ in p_named})
    if unknown:
        msg = f"{what}: unpermuted names {unknown}, which are not params leaves; leaves: {[n for n, _ in p_named]}"
        raise ValueError(msg)
    nodes = _Nodes()
    an = _Analysis(nodes, {}, [0])
    n_p, n_s = len(p_named), len(s_named)
    ins = list(flat.invars)
    param_ids = {name: ins[i] for i, (name, _) in enumerate(p_named)}
    state_ids = {name: ins[n_p + i] for i, (name, _) in enumerate(s_named)}
    for i, (name, leaf) in enumerate(p_named):
        ax = _fresh(an, flat.avals[ins[i]])
        for d, n in enumerate(ax):
            nodes.params[n].append((name, d))
            nodes.leaf.add(n)
        an.axes[ins[i]] = ax
    for i, (name, _) in enumerate(s_named):
        ax = _fresh(an, flat.avals[ins[n_p + i]])
        for d, n in enumerate(ax):
            nodes.state[n].append((name, d))
        an.axes[ins[n_p + i]] = ax
    for i in ins[n_p + n_s :]:
        an.axes[i] = _fresh(an, flat.avals[i], fixed=True)
    _seed_consts(an, flat)
    _analyse_eqns(an, flat)
    for o in flat.outvars:
        for n in an.axes.get(o, ()):
            nodes.fix(n)
    split_pairs = _resolve_splits(an)
    # every class that holds parameter axes, is not fixed and is touched by the computation
    roots: dict[int, None] = {}
    for name in param_ids:
        for n in an.axes[param_ids[name]]:
            r = nodes.find(n)
            if nodes.params[r] and nodes.used[r] and nodes.size[r] > 1:
                roots.setdefault(r)
    cut = set(unpermuted)
    for r in roots:
        if nodes.fixed[r] or not nodes.breaks[r]:
            continue
        if cut & {pp for pp, _ in nodes.params[r]}:
            nodes.fixed[r] = True  # the caller leaves this mixed group unpermuted
            continue
        k, prim = min(nodes.breaks[r])
        paths = sorted({f"{pp} (axis {d})" for pp, d in nodes.params[r]})
        leaves = sorted({pp for pp, _ in nodes.params[r]})
        hint = " or pass it as state= (apply_fn(params, state, x))" if prim.startswith("closed-over") else ""
        if prim == "reshape":
            hint = (
                " (a reshape that merges or splits a unit axis, e.g. flattening an (N, H, W, C) map "
                "into a dense layer, would need the permutation repeated per position, which a "
                "PermutationSpec cannot express; pool over the spatial axes instead, as the zoo does)"
            )
        msg = (
            f"{what}: {prim!r} (equation {k}) mixes the hidden units of the group of {paths}; "
            f"no permutation of these units leaves apply_fn unchanged. Pass unpermuted={leaves} "
            f"to leave these parameters unpermuted{hint}"
        )
        raise ValueError(msg)
    live = sorted((r for r in roots if not nodes.fixed[r]), key=lambda r: (nodes.seen[r], min(nodes.params[r])))
    groups = {r: f"P_{i}" for i, r in enumerate(live)}

    def table(ids: Mapping[str, int]) -> dict[str, tuple[str | None, ...]]:
        return {name: tuple(groups.get(nodes.find(n)) for n in an.axes[i]) for name, i in ids.items()}

    labels: dict[int, str] = {}
    blocks: dict[str, tuple[str, int, str]] = {}
    for r in live:
        if r not in split_pairs:
            continue
        o, i = (nodes.find(v) for v in split_pairs[r])
        label = labels.setdefault(o, f"H_{len(labels)}")
        blocks[groups[r]] = (label, nodes.size[i], "fixed" if nodes.fixed[i] or nodes.breaks[i] else "free")
    spec = PermutationSpec(table(param_ids), {k: v for k, v in table(state_ids).items()}, blocks)
    flat_values: dict[str, tuple[int, ...]] = {}
    for sp in an.splits:
        name = groups.get(nodes.find(sp.flat))
        if name in blocks and not sp.merge and sp.top:
            flat_values[name] = (*flat_values.get(name, ()), sp.value)
    return _Trace(flat, nodes, an.axes, param_ids, state_ids, n_p, n_s, groups, spec, flat_values)


def trace_spec(
    apply_fn: Any,
    params: Params,
    x: Any,
    *,
    state: Params | None = None,
    unpermuted: Sequence[str] = (),
) -> PermutationSpec:
    """The permutation spec of ``apply_fn``, derived from its jaxpr (module docstring).

    Args:
        apply_fn: ``apply_fn(params, x) -> outputs``; with ``state`` given, ``apply_fn(params,
            state, x)`` (a zoo ``FunctionalModel`` is traced through ``apply_with_state`` with its
            own state by default, so BatchNorm statistics get ``state_axes``). Flax Linen:
            ``lambda p, x: module.apply({"params": p}, x)`` (with BatchNorm,
            ``lambda p, s, x: module.apply({"params": p, "batch_stats": s}, x)`` and
            ``state=batch_stats``); Equinox: ``params, static = eqx.partition(model,
            eqx.is_inexact_array)`` and ``lambda p, x: jax.vmap(eqx.combine(p, static))(x)``.
        params: the params pytree (only shapes and dtypes are read).
        x: an example batch (only its shape and dtype are read).
        state: non-trainable state (BatchNorm running statistics), or ``None``.
        unpermuted: parameter key paths of groups to leave unpermuted where a primitive mixes
            their units: every mixed group holding an axis of a listed leaf is cut (its axes get
            ``None``) instead of raising; the leaf's other groups are kept.

    Returns:
        A :class:`PermutationSpec` with one entry per params leaf (and state leaf); groups are
        named ``P_0, P_1, ...`` in forward order.

    Raises:
        ValueError: when ``apply_fn`` cannot be traced with ``params`` and ``x`` (naming it and
            the shapes), or when a primitive mixes the units of a group (naming the primitive and
            the parameter paths; see ``unpermuted``).
    """
    return _trace(apply_fn, params, x, state=state, unpermuted=tuple(unpermuted), what="trace_spec").spec


# ---------------------------------------------------------------------------------- renaming
def rename(spec: PermutationSpec, mapping: Mapping[str, str], heads: Mapping[str, str] | None = None) -> PermutationSpec:
    """``spec`` with every permutation name ``n`` replaced by ``mapping[n]`` (a bijection), and the
    heads labels of its blockwise groups by ``heads`` (those not listed are kept)."""
    if set(mapping) != set(spec.names) or len(set(mapping.values())) != len(mapping):
        msg = f"rename needs a bijection over the spec's names {list(spec.names)}, got {dict(mapping)}"
        raise ValueError(msg)

    def one(table: Mapping[str, tuple[str | None, ...]]) -> dict[str, tuple[str | None, ...]]:
        return {k: tuple(None if n is None else mapping[n] for n in v) for k, v in table.items()}

    heads = dict(heads or {})
    blocks = {mapping[n]: (heads.get(h, h), b, inner) for n, (h, b, inner) in spec.blocks.items()}
    return PermutationSpec(one(spec.axes), one(spec.state_axes), blocks)


def match_names(spec: PermutationSpec, reference: PermutationSpec) -> PermutationSpec:
    """``spec`` renamed with ``reference``'s permutation names, group for group.

    Two specs describe the same symmetry when they differ only in the names of their groups; the
    renamed spec then equals ``reference`` (``==``). Each group of ``spec`` takes the name that
    ``reference`` gives its first ``(path, axis)``.

    Raises:
        ValueError: when the groups cannot be paired (a ``(path, axis)`` named in one spec and not
            in the other, or one group of ``spec`` meeting two groups of ``reference``), naming it.
    """
    mapping: dict[str, str] = {}
    ref_axes = dict(reference.axes)
    for n, where in spec.perm_to_axes.items():
        names = {ref_axes.get(p, ())[d] if d < len(ref_axes.get(p, ())) else None for p, d in where}
        if len(names) != 1 or None in names:
            msg = (
                f"group {n!r} acts on {list(where)}, which the reference spec gives the names "
                f"{sorted(map(str, names))}; the two specs describe different symmetries"
            )
            raise ValueError(msg)
        mapping[n] = names.pop()
    if len(set(mapping.values())) != len(mapping):
        msg = f"several groups map to one reference group: {mapping}"
        raise ValueError(msg)
    heads = {h: reference.blocks[mapping[n]][0] for n, (h, _, _) in spec.blocks.items() if mapping[n] in reference.blocks}
    return rename(spec, mapping, heads)


# ---------------------------------------------------------------------------------- activations
def _param_source(tr: _Trace) -> dict[int, str]:
    """Value id -> params path for the params leaves and their pure relayouts (convert, transpose, reshape)."""
    src = {i: name for name, i in tr.param_ids.items()}
    for e in tr.flat.eqns:
        if e.prim in ("convert_element_type", "transpose", "reshape", "copy", "copy_p") and e.ins[0] in src:
            src[e.outs[0]] = src[e.ins[0]]
    return src


def _data_ids(tr: _Trace) -> set[int]:
    n = tr.n_params + tr.n_state
    data = set(tr.flat.invars[n:])
    for e in tr.flat.eqns:
        if any(i in data for i in e.ins):
            data.update(e.outs)
    return data


def _layer_inputs(tr: _Trace, src: Mapping[int, str]) -> list[tuple[str, int, int, tuple[int, ...]]]:
    """``(kernel path, eqn index, data value id, axes order that puts the unit axis last)``."""
    out = []
    for k, e in enumerate(tr.flat.eqns):
        if e.prim not in ("dot_general", "conv_general_dilated"):
            continue
        a, b = e.ins[0], e.ins[1]
        if (a in src) == (b in src):
            continue
        data_pos = 1 if a in src else 0
        kernel, data = src[e.ins[1 - data_pos]], e.ins[data_pos]
        nd = len(_shape(tr.flat.avals[data]))
        if e.prim == "dot_general":
            (lc, rc), (lb, rb) = e.eqn.params["dimension_numbers"]
            contract = (lc, rc)[data_pos]
            if len(contract) != 1:
                continue
            order = tuple(d for d in range(nd) if d != contract[0]) + (contract[0],)
        else:
            if data_pos != 0:
                continue
            lspec = e.eqn.params["dimension_numbers"][0]
            order = (lspec[0], *lspec[2:], lspec[1])
        out.append((kernel, k, data, order))
    return out


_PASS = frozenset({"reduce_window_max", "reduce_window_sum", "reduce_window_min", "reduce_window", "convert_element_type", "copy", "copy_p", "pad"})


def _unit_axis(tr: _Trace, vid: int, root: int) -> int | None:
    hits = [d for d, n in enumerate(tr.axes.get(vid, ())) if tr.nodes.find(n) == root]
    return hits[0] if len(hits) == 1 else None


def _post_point(tr: _Trace, producer: Mapping[int, _Eqn], data: set[int], vid: int, root: int) -> int:
    """Walk back from a layer input through pooling / scalar scaling to the activation it pools."""
    while vid in producer:
        e = producer[vid]
        if _unit_axis(tr, vid, root) is None:
            break
        prev = None
        if e.prim in _PASS or e.prim in _REDUCE - {"reduce_prod"} or e.prim in ("reshape", "transpose", "squeeze", "broadcast_in_dim"):
            prev = e.ins[0]
        elif e.prim in ("mul", "div"):
            dins = [i for i in e.ins if i in data]
            if len(dins) == 1 and (e.prim == "mul" or e.ins[0] in data):
                other = [i for i in e.ins if i not in data]
                if all(np.prod(_shape(tr.flat.avals[o])) == 1 for o in other):
                    prev = dins[0]
        if prev is None or _unit_axis(tr, prev, root) is None:
            break
        vid = prev
    return vid


def _is_nonlinear(e: _Eqn, data: set[int], avals: Sequence[Any]) -> bool:
    """Whether ``e`` is nonlinear in its full-shape data operands (a per-example statistic such as
    LayerNorm's ``1/σ`` of shape ``(N, 1)`` scales like a constant: a norm is not an activation)."""
    shape = _shape(avals[e.outs[0]])
    dins = [i for i in e.ins if i in data and _shape(avals[i]) == shape]
    if not dins:
        return False
    if e.prim in _LINEAR:
        return False
    if e.prim == "mul":
        return len(dins) > 1
    if e.prim == "div":
        return e.ins[1] in dins
    return True


def _pre_point(tr: _Trace, producer: Mapping[int, _Eqn], data: set[int], post: int) -> int:
    """The input of the nonlinearity that produces ``post`` (``post`` itself when there is none).

    The region is the DAG of elementwise equations of ``post``'s shape feeding ``post``; walking
    its dominators from ``post`` backwards (every data path to the region's sources passes
    through a dominator), the first dominator with a nonlinear op between it and ``post`` is the
    pre-activation (``relu(z)``, ``gelu(z)``, ``silu(z)``: ``z``; a residual ``relu(a + b)``: the sum).
    """
    shape = _shape(tr.flat.avals[post])

    def preds(v: int) -> list[int]:
        e = producer.get(v)
        if e is None or e.prim not in _ELEMENTWISE or _shape(tr.flat.avals[v]) != shape:
            return []
        return [i for i in e.ins if i in data and _shape(tr.flat.avals[i]) == shape]

    cur = post
    for _ in range(256):
        # ancestors of cur in the region
        anc: list[int] = []
        stack, seen = [cur], {cur}
        while stack:
            v = stack.pop()
            for u in preds(v):
                if u not in seen:
                    seen.add(u)
                    anc.append(u)
                    stack.append(u)
        if not anc:
            return post
        sources = {v for v in seen if not preds(v)}

        def reaches_source_avoiding(d: int) -> bool:
            stack2, seen2 = [cur], {cur, d}
            while stack2:
                v = stack2.pop()
                if v in sources and v != d:
                    return True
                for u in preds(v):
                    if u not in seen2:
                        seen2.add(u)
                        stack2.append(u)
            return False

        doms = [d for d in sorted(anc, reverse=True) if not reaches_source_avoiding(d)]
        if not doms:
            return post
        # the nearest dominator: the one every other dominator precedes (largest value id)
        dom = max(doms)
        between = [producer[v] for v in seen if v != dom and _reaches(v, dom, preds)]
        if any(_is_nonlinear(e, data, tr.flat.avals) for e in between):
            return dom
        cur = dom
    return post


def _reaches(v: int, target: int, preds: Callable[[int], list[int]]) -> bool:
    stack, seen = [v], {v}
    while stack:
        u = stack.pop()
        if u == target:
            return True
        for w in preds(u):
            if w not in seen:
                seen.add(w)
                stack.append(w)
    return False


def _spec_roots(tr: _Trace, spec: PermutationSpec) -> dict[str, int]:
    """Each name of ``spec`` -> the traced class its axes belong to (one class per name)."""
    out: dict[str, int] = {}
    for n, where in spec.perm_to_axes.items():
        roots = set()
        for path, d in where:
            if path not in tr.param_ids:
                msg = f"spec entry {path!r} is not a params leaf of the traced model; leaves: {sorted(tr.param_ids)}"
                raise ValueError(msg)
            roots.add(tr.nodes.find(tr.axes[tr.param_ids[path]][d]))
        if len(roots) != 1 or next(iter(roots)) not in tr.groups:
            traced = sorted({tr.groups.get(r, "fixed") for r in roots})
            msg = (
                f"spec group {n!r} acts on {list(where)}, which the trace of apply_fn puts in "
                f"{traced}, so there are no intermediates (activations) to take for it; check the "
                f"spec with align.check_spec(spec, params, apply_fn=..., x=...)"
            )
            raise ValueError(msg)
        out[n] = next(iter(roots))
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class _Points:
    """Where each activation lives in the inlined jaxpr: value id and axis order (unit axis last)."""

    pre: dict[str, tuple[int, tuple[int, ...]]]
    post: dict[str, tuple[int, tuple[int, ...]]]
    input: dict[str, tuple[int, tuple[int, ...]]]
    stacked: dict[str, tuple[tuple[int, tuple[int, ...]], ...]] = dataclasses.field(default_factory=dict)


def _order_last(nd: int, axis: int) -> tuple[int, ...]:
    return tuple(d for d in range(nd) if d != axis) + (axis,)


def _points(tr: _Trace, spec: PermutationSpec) -> _Points:
    src = _param_source(tr)
    data = _data_ids(tr)
    producer = {o: e for e in tr.flat.eqns for o in e.outs}
    layer_inputs = _layer_inputs(tr, src)
    inputs = {kernel: (vid, order) for kernel, _, vid, order in layer_inputs}
    pre: dict[str, tuple[int, tuple[int, ...]]] = {}
    post: dict[str, tuple[int, tuple[int, ...]]] = {}
    stacked: dict[str, tuple[tuple[int, tuple[int, ...]], ...]] = {}
    for name, root in _spec_roots(tr, spec).items():
        consumers = [(k, vid) for _, k, vid, order in layer_inputs if tr.nodes.find(tr.axes[vid][order[-1]]) == root]
        if not consumers:
            # a blockwise group no layer reads (queries and keys, contracted with each other):
            # the projections' outputs before the head split, stacked on a new axis 1
            vals = []
            for v in tr.split_values.get(tr.groups.get(root, ""), ()):
                ax = _unit_axis(tr, v, root)
                if ax is not None:
                    vals.append((v, _order_last(len(_shape(tr.flat.avals[v])), ax)))
            if vals:
                stacked[name] = tuple(vals)
            continue
        _, vid = max(consumers)
        p = _post_point(tr, producer, data, vid, root)
        q = _pre_point(tr, producer, data, p)
        for table, v in ((post, p), (pre, q)):
            ax = _unit_axis(tr, v, root)
            if ax is not None:
                table[name] = (v, _order_last(len(_shape(tr.flat.avals[v])), ax))
    return _Points(pre, post, inputs, stacked)


def activations(
    apply_fn: Any,
    params: Params,
    x: Any,
    *,
    spec: PermutationSpec | None = None,
    kind: str = "pre",
    state: Params | None = None,
) -> dict[str, Array]:
    """Hidden activations of any model at every permutation group, from the trace of ``apply_fn``.

    The same points a zoo model's ``FunctionalModel.intermediates`` taps, found in the jaxpr: for
    group ``g``, the last layer (dense or conv) that reads ``g``'s units is located; walking back
    from its input through pooling (``reduce_window``, reductions over non-unit axes, scalar
    scaling) gives the post-activation, and the input of the elementwise nonlinearity producing it
    the pre-activation (after the norm when there is one; for a residual stream the last residual
    sum before its nonlinearity; for a layer without nonlinearity both are its output). A blockwise
    group that no layer reads — attention queries and keys, contracted with each other — gets the
    projections' outputs before the head split, stacked on a new axis 1 (``(N, 2, T, H·Dh)`` for
    queries and keys; both kinds); values and the output projection get the concatenated heads
    that the output projection reads.

    Args:
        apply_fn: the model, called as in :func:`trace_spec`.
        params: its params (concrete or traced: the function is jittable).
        x: a batch of inputs.
        spec: the permutation spec whose names key the result; default :func:`trace_spec`'s. Its
            groups must be groups of the trace (any naming).
        kind: ``"pre"``, ``"post"`` or ``"input"`` (every dense / conv layer's input keyed by its
            kernel path, e.g. ``"layers/0/kernel"``; conv inputs unpadded, channels last).
        state: as in :func:`trace_spec`.

    Returns:
        ``{name: (N, ..., units)}`` with the unit axis last (``{kernel path: (N, ..., d_in)}`` for
        ``"input"``).
    """
    if kind not in ACTIVATION_KINDS:
        msg = f"unknown activation kind {kind!r}; accepted: {list(ACTIVATION_KINDS)}"
        raise ValueError(msg)
    tr = _trace(apply_fn, params, x, state=state, unpermuted=(), what="activations")
    spec = tr.spec if spec is None else spec
    pts = _points(tr, spec)
    table = getattr(pts, kind)
    _, state = _call_parts(apply_fn, state)
    args = jax.tree.leaves(params) + jax.tree.leaves({} if state is None else state) + jax.tree.leaves(x)
    names = list(table)
    stacked = {} if kind == "input" else {n: v for n, v in pts.stacked.items() if n not in table}
    wanted = [table[n][0] for n in names] + [v for vals in stacked.values() for v, _ in vals]
    vals = _eval_flat(tr.flat, args, wanted)
    out = {n: jnp.transpose(v, table[n][1]) for n, v in zip(names, vals)}
    rest = iter(vals[len(names) :])
    for n, entries in stacked.items():
        out[n] = jnp.stack([jnp.transpose(next(rest), order) for _, order in entries], axis=1)
    return out


def _layer_output_points(
    tr: _Trace, spec: PermutationSpec, layers: Mapping[str, tuple[str, str]]
) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Where each entry of ``layers`` is measured: a group name of ``spec`` at its pre-activation,
    any other key at the output of its layer (the ``add`` of its shift leaf)."""
    group_keys = [k for k in layers if k in spec.names]
    pts = _points(tr, spec) if group_keys else None
    out: dict[str, tuple[int, tuple[int, ...]]] = {}
    for k, (scale_path, bias_path) in layers.items():
        if k in spec.names:
            if k not in pts.pre:  # type: ignore[union-attr]
                msg = f"unit group {k!r} has no traced pre-activation to measure; layers: {dict(layers)}"
                raise ValueError(msg)
            out[k] = pts.pre[k]  # type: ignore[union-attr]
            continue
        for path in (scale_path, bias_path):
            if path not in tr.param_ids:
                msg = f"layers[{k!r}] names {path!r}, which is not a params leaf; leaves: {sorted(tr.param_ids)}"
                raise ValueError(msg)
        derived = {tr.param_ids[bias_path]}
        found = None
        for e in tr.flat.eqns:
            if e.prim in ("broadcast_in_dim", "reshape", "convert_element_type", "transpose", "copy", "copy_p") and e.ins[0] in derived:
                derived.add(e.outs[0])
            elif e.prim in ("add", "add_any") and any(i in derived for i in e.ins):
                found = e.outs[0]
                break
        bias_axes = tr.axes[tr.param_ids[bias_path]]
        ax = _unit_axis(tr, found, tr.nodes.find(bias_axes[-1])) if found is not None and bias_axes else None
        if ax is None:
            msg = (
                f"layers[{k!r}]: the shift {bias_path!r} is not added to an activation along one axis in "
                f"the trace of apply_fn, so its layer's output cannot be measured"
            )
            raise ValueError(msg)
        out[k] = (found, _order_last(len(_shape(tr.flat.avals[found])), ax))
    return dict(sorted(out.items(), key=lambda kv: kv[1][0]))  # forward order


def layer_outputs(
    apply_fn: Any,
    params: Params,
    x: Any,
    layers: Mapping[str, tuple[str, str]],
    *,
    spec: PermutationSpec | None = None,
    state: Params | None = None,
) -> dict[str, Array]:
    """The activation each ``(scale leaf, shift leaf)`` layer of ``layers`` produces, in forward order.

    A key that is a group name of ``spec`` gives that group's pre-activation (:func:`activations`);
    any other key (e.g. ``"blocks/0/ln1"`` for ``("blocks/0/ln1/scale", "blocks/0/ln1/bias")``) gives
    the output of that layer, the value its shift leaf is added to (a LayerNorm's ``γ n + β``, a
    dense layer's ``x W + b``), unit axis last. These are the normalisation points REPAIR and TACT
    correct on models whose groups have several producers (transformers' residual stream).
    """
    tr = _trace(apply_fn, params, x, state=state, unpermuted=(), what="layer_outputs")
    spec = tr.spec if spec is None else spec
    pts = _layer_output_points(tr, spec, layers)
    _, state = _call_parts(apply_fn, state)
    args = jax.tree.leaves(params) + jax.tree.leaves({} if state is None else state) + jax.tree.leaves(x)
    vals = _eval_flat(tr.flat, args, [v for v, _ in pts.values()])
    return {k: jnp.transpose(v, order) for (k, (_, order)), v in zip(pts.items(), vals)}


@dataclasses.dataclass(frozen=True)
class LayerOutputs:
    """``.intermediates(params, x, kind="pre")`` = :func:`layer_outputs` of ``layers`` (REPAIR / TACT taps).

    ``layers`` is a tuple of ``(key, (scale leaf, shift leaf))`` items (hashable: a static argument
    of ``jax.jit``); calling it is calling ``apply_fn``.
    """

    apply_fn: Any
    layers: tuple[tuple[str, tuple[str, str]], ...]
    spec: PermutationSpec | None = None

    def __call__(self, params: Params, x: Any) -> Any:
        return self.apply_fn(params, x)

    def intermediates(self, params: Params, x: Any, *, kind: str = "pre", state: Params | None = None) -> dict[str, Array]:
        """The layer outputs (``kind`` must be ``"pre"``: outputs before any nonlinearity)."""
        if kind != "pre":
            msg = f"LayerOutputs taps layer outputs (kind='pre'), got kind={kind!r}"
            raise ValueError(msg)
        return layer_outputs(self.apply_fn, params, x, dict(self.layers), spec=self.spec, state=state)

    def order(self, params: Params, x: Any) -> tuple[str, ...]:
        """The keys of :attr:`layers` in forward order (the order REPAIR / TACT correct them in)."""
        tr = _trace(self.apply_fn, params, x, state=None, unpermuted=(), what="layer_outputs")
        spec = tr.spec if self.spec is None else self.spec
        return tuple(_layer_output_points(tr, spec, dict(self.layers)))


@dataclasses.dataclass(frozen=True)
class TracedModel:
    """An ``apply_fn`` with traced ``intermediates`` (the zoo's tap interface) for any model.

    ``TracedModel(apply_fn, spec)(params, x)`` is ``apply_fn(params, x)``;
    ``.intermediates(params, x, kind=..., state=None)`` is :func:`activations` keyed by ``spec``'s
    names. Frozen and hashable when ``apply_fn`` is (a static argument of ``jax.jit``).
    """

    apply_fn: Any
    spec: PermutationSpec | None = None

    def __call__(self, params: Params, x: Any) -> Any:
        return self.apply_fn(params, x)

    def intermediates(self, params: Params, x: Any, *, kind: str = "pre", state: Params | None = None) -> dict[str, Array]:
        """Activations at every group of :attr:`spec` (see :func:`activations`)."""
        return activations(self.apply_fn, params, x, spec=self.spec, kind=kind, state=state)

    def __getattr__(self, name: str) -> Any:
        if name in ("apply_fn", "spec") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.apply_fn, name)


def with_activations(apply_fn: Any, spec: PermutationSpec | None = None, *, params: Params | None = None, x: Any = None) -> Any:
    """``apply_fn`` itself when it has ``intermediates`` (a zoo model), else a :class:`TracedModel`
    (also for a zoo model without a hand-written spec, ``apply_fn.spec is None``, e.g. the GPT / ViT:
    its groups are the traced ones).

    The single place where activation-based methods (activation matching, REPAIR, TACT, ZipIt!,
    RegMean, OT fusion) obtain activations, so none of them is limited to the zoo. Given
    ``params`` and a batch ``x``, a zoo model whose ``intermediates`` do not tap every group of
    ``spec`` (the GPT / ViT tap layer inputs only) is traced instead.
    """
    if callable(getattr(apply_fn, "intermediates", None)) and not (
        hasattr(apply_fn, "spec") and apply_fn.spec is None and not isinstance(apply_fn, TracedModel)
    ):
        if isinstance(apply_fn, TracedModel) or params is None or x is None:
            return apply_fn  # a zoo model's taps, keyed by its spec's names
        names = (spec if spec is not None else getattr(apply_fn, "spec", None) or PermutationSpec({})).names
        tapped = jax.eval_shape(lambda p, xb: apply_fn.intermediates(p, xb, kind="pre"), params, x)
        if all(n in tapped for n in names):
            return apply_fn
        # a zoo model whose taps do not cover its groups (the transformers tap layer inputs only)
    if not callable(apply_fn):
        msg = f"apply_fn must be callable as apply_fn(params, x), got {type(apply_fn).__name__}"
        raise ValueError(msg)
    return TracedModel(apply_fn, spec if spec is not None else getattr(apply_fn, "spec", None))


@dataclasses.dataclass(frozen=True)
class LayerInputs:
    """``LayerInputs(apply_fn)(params, x) -> {kernel path: layer input (N, ..., d_in)}`` for any model.

    The ``features_fn`` of RegMean's :func:`~landscape.merge.gram_matrices` and ZipIt!: the zoo's
    ``intermediates(kind="input")`` when ``apply_fn`` has them, else :func:`activations` with
    ``kind="input"``. Frozen and hashable (a static argument of ``jax.jit``).
    """

    apply_fn: Any

    def __call__(self, params: Params, x: Any) -> dict[str, Array]:
        fn = getattr(self.apply_fn, "intermediates", None)
        if callable(fn):
            return dict(fn(params, x, kind="input"))
        return activations(self.apply_fn, params, x, kind="input")

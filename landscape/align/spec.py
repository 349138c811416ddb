"""Permutation specs: which axes of which parameters a hidden-unit permutation acts on.

A feed-forward network computes the same function after its hidden units are relabelled: permuting
the output units of one layer (the columns of its kernel, its bias, its norm's scale and bias) and
the input units of the next layer (the rows of its kernel) by the same permutation ``P`` leaves the
logits unchanged, :math:`W_2 P^\\top \\sigma(P W_1 x + P b_1) = W_2 \\sigma(W_1 x + b_1)`
(Hecht-Nielsen 1990; Entezari et al., arXiv:2110.06296; Ainsworth et al., Git Re-Basin,
arXiv:2209.04836). A :class:`PermutationSpec` records this bookkeeping once per architecture, as in
git-re-basin's ``axes_to_perm``: every parameter's key path (as written by
:func:`landscape.tree.key_name`, e.g. ``"layers/0/kernel"``) maps to one permutation name, or
``None``, per axis. A permutation is a plain dict ``name -> int array``, a pytree, so it can be
vmapped, stacked and saved like params.

Convention (git-re-basin's ``take(B, perm, axis)``): applying ``perm`` gives the new unit ``i`` the
old unit ``perm[name][i]`` along every axis tagged ``name``:

.. math::  \\pi(\\theta)[k]_{\\ldots, i, \\ldots} = \\theta[k]_{\\ldots, p_{\\text{name}}[i], \\ldots}

:func:`apply` is the only place in the toolkit that permutes; matchers return permutations and
call it. Non-trainable state (BatchNorm running mean / variance) has its own entries,
``state_axes``, applied with :func:`apply_state`.

**Blockwise groups (attention heads).** The query / key / value projections of multi-head attention
write an axis of ``H·Dh`` units that the model reshapes to ``(H, Dh)``. Its symmetries are not all
permutations of ``H·Dh`` units but the blockwise ones: a permutation ``σ`` of the heads, shared by
every such axis of the layer, composed with a permutation ``τ_h`` of the ``Dh`` units inside each
head (Verma & Elbayad 2024, arXiv:2403.00986). ``blocks={name: (heads, Dh, inner)}`` marks the
group ``name`` (still an ordinary 1-D permutation of ``H·Dh`` units in a :data:`Permutation`, so
:func:`apply`, :func:`invert` and :func:`compose` act on it unchanged) as having that structure,

.. math::  p_{\\text{name}}[h·D_h + d] = σ_{\\text{heads}}[h]·D_h + τ_h[d],

where every group with the same ``heads`` label shares ``σ`` and ``inner`` is ``"free"`` (each
group its own ``τ_h`` per head) or ``"fixed"`` (``τ_h`` the identity: rotary queries and keys,
whose coordinate pairs must stay together). The ``heads`` labels are not permutation names of
their own (no parameter axis carries them). :func:`random_permutation` draws, and
:func:`apply` (on concrete values) requires, permutations with this structure.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from landscape import align
    >>> spec = align.PermutationSpec(
    ...     {"w1": (None, "h"), "b1": ("h",), "w2": ("h", None), "b2": (None,)})
    >>> params = {"w1": jnp.ones((3, 4)), "b1": jnp.arange(4.0), "w2": jnp.ones((4, 2)),
    ...           "b2": jnp.zeros(2)}
    >>> perm = {"h": jnp.array([3, 2, 1, 0])}
    >>> align.apply(spec, perm, params)["b1"].tolist()
    [3.0, 2.0, 1.0, 0.0]
    >>> spec.sizes(params)
    {'h': 4}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landscape._types import Array, Key, Params
from landscape.tree import key_name, named_leaves

__all__ = [
    "Permutation",
    "PermutationSpec",
    "apply",
    "apply_state",
    "assemble_blocks",
    "check_blocks",
    "check_permutation",
    "check_spec",
    "compose",
    "identity",
    "invert",
    "random_permutation",
    "split_blocks",
]

Permutation = dict[str, Array]
"""A permutation of every hidden-unit group: ``{name: int array of shape (size,)}``."""

_PARTS = ("params", "state")


def _freeze(table: Mapping[str, Any], what: str) -> Mapping[str, tuple[str | None, ...]]:
    if not isinstance(table, Mapping):
        msg = f"PermutationSpec.{what} must be a mapping path -> tuple of names, got {type(table).__name__}"
        raise ValueError(msg)
    out: dict[str, tuple[str | None, ...]] = {}
    for path, names in table.items():
        if not isinstance(path, str):
            msg = f"PermutationSpec.{what} keys must be key-path strings like 'layers/0/kernel', got {path!r}"
            raise ValueError(msg)
        if isinstance(names, str) or not isinstance(names, (tuple, list)):
            msg = (
                f"PermutationSpec.{what}[{path!r}] must be a tuple with one permutation name (str) or "
                f"None per axis, got {names!r}"
            )
            raise ValueError(msg)
        for n in names:
            if n is not None and not isinstance(n, str):
                msg = f"PermutationSpec.{what}[{path!r}] has {n!r}; accepted: a str name or None"
                raise ValueError(msg)
        out[path] = tuple(names)
    return MappingProxyType(dict(sorted(out.items())))


INNER_MODES = ("free", "fixed")
"""Accepted ``inner`` values of a blockwise group: a permutation inside each block, or the identity."""


def _freeze_blocks(table: Any, names: set[str]) -> Mapping[str, tuple[str, int, str]]:
    if not isinstance(table, Mapping):
        msg = f"PermutationSpec.blocks must be a mapping name -> (heads, block size, inner), got {type(table).__name__}"
        raise ValueError(msg)
    out: dict[str, tuple[str, int, str]] = {}
    for name, entry in table.items():
        if name not in names:
            msg = f"PermutationSpec.blocks names {name!r}, which no parameter axis uses; names: {sorted(names)}"
            raise ValueError(msg)
        if not isinstance(entry, (tuple, list)) or len(entry) != 3:
            msg = f"PermutationSpec.blocks[{name!r}] must be (heads label, block size, inner), got {entry!r}"
            raise ValueError(msg)
        heads, size, inner = entry
        if not isinstance(heads, str) or heads in names:
            msg = (
                f"PermutationSpec.blocks[{name!r}] heads label must be a str that is not a permutation "
                f"name, got {heads!r}"
            )
            raise ValueError(msg)
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            msg = f"PermutationSpec.blocks[{name!r}] block size must be a positive int, got {size!r}"
            raise ValueError(msg)
        if inner not in INNER_MODES:
            msg = f"PermutationSpec.blocks[{name!r}] inner must be one of {list(INNER_MODES)}, got {inner!r}"
            raise ValueError(msg)
        out[name] = (heads, int(size), inner)
    return MappingProxyType(dict(sorted(out.items())))


@dataclasses.dataclass(frozen=True, init=False)
class PermutationSpec:
    """Which permutation acts on which axis of every parameter (and state) leaf.

    Args:
        axes: ``{key path: (name | None, ...)}`` with one entry per parameter leaf and one name per
            axis of that leaf. Leaves whose axes are all ``None`` must still be listed, so that a
            spec and a params tree can be checked against each other.
        state_axes: the same for non-trainable state (BatchNorm ``mean`` / ``var``); ``{}`` when
            the model has none. Every name used here must also be used in ``axes``.
        blocks: ``{name: (heads label, block size, inner)}`` for blockwise groups (attention
            heads, module docstring); ``{}`` (default) when every group is an unconstrained
            permutation.

    The spec is immutable and hashable (usable as a static argument of ``jax.jit``).

    Attributes:
        names: the permutation names, sorted.
        perm_to_axes: ``{name: ((path, axis), ...)}`` over the parameters, the inverse map that
            weight matching sums over.
    """

    axes: Mapping[str, tuple[str | None, ...]]
    state_axes: Mapping[str, tuple[str | None, ...]]
    blocks: Mapping[str, tuple[str, int, str]]

    def __init__(
        self,
        axes: Mapping[str, tuple[str | None, ...]],
        state_axes: Mapping[str, tuple[str | None, ...]] | None = None,
        blocks: Mapping[str, tuple[str, int, str]] | None = None,
    ) -> None:
        frozen = _freeze(axes, "axes")
        frozen_state = _freeze({} if state_axes is None else state_axes, "state_axes")
        param_names = {n for names in frozen.values() for n in names if n is not None}
        for path, names in frozen_state.items():
            for n in names:
                if n is not None and n not in param_names:
                    msg = (
                        f"PermutationSpec.state_axes[{path!r}] uses permutation {n!r} that no "
                        f"parameter uses; parameter permutations: {sorted(param_names)}"
                    )
                    raise ValueError(msg)
        object.__setattr__(self, "axes", frozen)
        object.__setattr__(self, "state_axes", frozen_state)
        object.__setattr__(self, "blocks", _freeze_blocks({} if blocks is None else blocks, param_names))

    def __hash__(self) -> int:
        return hash((tuple(self.axes.items()), tuple(self.state_axes.items()), tuple(self.blocks.items())))

    def __repr__(self) -> str:
        extra = f", blocks={dict(self.blocks)}" if self.blocks else ""
        return f"PermutationSpec(axes={dict(self.axes)}, state_axes={dict(self.state_axes)}{extra})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PermutationSpec):
            return NotImplemented
        return (
            dict(self.axes) == dict(other.axes)
            and dict(self.state_axes) == dict(other.state_axes)
            and dict(self.blocks) == dict(other.blocks)
        )

    @property
    def heads(self) -> dict[str, tuple[str, ...]]:
        """``{heads label: (blockwise group names sharing its head permutation, sorted)}``."""
        out: dict[str, list[str]] = {}
        for n, (h, _, _) in self.blocks.items():
            out.setdefault(h, []).append(n)
        return {h: tuple(sorted(v)) for h, v in sorted(out.items())}

    @property
    def names(self) -> tuple[str, ...]:
        """All permutation names, sorted."""
        return tuple(sorted({n for names in self.axes.values() for n in names if n is not None}))

    @property
    def perm_to_axes(self) -> dict[str, tuple[tuple[str, int], ...]]:
        """``{name: ((param path, axis), ...)}``: where each permutation acts among the params."""
        out: dict[str, list[tuple[str, int]]] = {n: [] for n in self.names}
        for path, names in self.axes.items():
            for ax, n in enumerate(names):
                if n is not None:
                    out[n].append((path, ax))
        return {n: tuple(v) for n, v in out.items()}

    def sizes(self, params: Params) -> dict[str, int]:
        """``{name: number of units}`` read off ``params`` (after :func:`check_spec`)."""
        check_spec(self, params)
        leaves = dict(named_leaves(params))
        return {n: int(jnp.shape(leaves[p])[ax]) for n, ((p, ax), *_) in self.perm_to_axes.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: ``{"axes": {path: [name|None, ...]}, "state_axes": {...}}``."""
        out: dict[str, Any] = {
            "axes": {k: list(v) for k, v in self.axes.items()},
            "state_axes": {k: list(v) for k, v in self.state_axes.items()},
        }
        if self.blocks:
            out["blocks"] = {k: list(v) for k, v in self.blocks.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PermutationSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(data["axes"], data.get("state_axes", {}), {k: tuple(v) for k, v in data.get("blocks", {}).items()})


def check_spec(
    spec: PermutationSpec,
    tree: Params,
    *,
    part: str = "params",
    apply_fn: Any = None,
    x: Any = None,
    state: Params | None = None,
    key: Key | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-6,
) -> None:
    """Raise ``ValueError`` unless ``spec`` describes ``tree`` exactly (and, given ``apply_fn``, its function).

    Checks, naming the offending key path: every spec entry has a leaf; every leaf has a spec
    entry; each entry has one name per axis of its leaf; and all axes sharing a permutation name
    have the same size. Only static shapes are read, so this is free inside ``jax.jit``.

    With ``apply_fn`` and a batch ``x`` it also checks the function (on the host, not jittable):
    a random permutation ``π`` under the spec (no group left at the identity) must leave the
    outputs unchanged, :math:`\\max|f(π θ) - f(θ)| \\le \\text{atol} + \\text{rtol} \\cdot
    \\max|f(θ)|` — float32 reassociation stays far below ``rtol = 1e-4`` of the output scale, a wrong
    spec (e.g. the two axes of a square kernel swapped) moves the outputs by O(1) of it. This
    catches a spec that fits the shapes but not the model before any matching work.

    Args:
        spec: the permutation spec.
        tree: a params tree (``part="params"``, checked against ``spec.axes``) or a state tree
            (``part="state"``, checked against ``spec.state_axes``).
        part: ``"params"`` or ``"state"``.
        apply_fn: ``apply_fn(params, x)`` (``apply_fn(params, state, x)`` when ``state`` is given;
            a zoo ``FunctionalModel`` uses its own state by default), as in
            :func:`landscape.align.trace_spec`. Only with ``part="params"``.
        x: a batch of inputs for the functional check.
        state: non-trainable state, permuted with ``spec.state_axes``.
        key: PRNG key of the random permutation (default ``jax.random.key(0)``).
        rtol: tolerance relative to the largest output magnitude.
        atol: absolute tolerance.
    """
    if apply_fn is not None:
        _check_function(spec, tree, apply_fn=apply_fn, x=x, state=state, key=key, rtol=rtol, atol=atol, part=part)
        return
    if not isinstance(spec, PermutationSpec):
        msg = f"spec must be a PermutationSpec, got {type(spec).__name__}"
        raise ValueError(msg)
    if part not in _PARTS:
        msg = f"unknown part {part!r}; accepted: {list(_PARTS)}"
        raise ValueError(msg)
    table = spec.axes if part == "params" else spec.state_axes
    leaves = dict(named_leaves(tree))
    if part == "state" and not table and not leaves:
        return
    for path in table:
        if path not in leaves:
            msg = (
                f"spec entry {path!r} has no matching {part} leaf; the {part} have: "
                f"{sorted(leaves)}"
            )
            raise ValueError(msg)
    seen: dict[str, tuple[int, str, int]] = {}
    for path, leaf in leaves.items():
        if path not in table:
            msg = (
                f"{part} leaf {path!r} (shape {tuple(jnp.shape(leaf))}) is missing from the "
                f"permutation spec; add it with one name or None per axis"
            )
            raise ValueError(msg)
        shape = tuple(jnp.shape(leaf))
        names = table[path]
        if len(names) != len(shape):
            msg = (
                f"spec entry {path!r} gives {len(names)} axes {names} but the {part} leaf has "
                f"shape {shape} ({len(shape)} axes)"
            )
            raise ValueError(msg)
        for ax, n in enumerate(names):
            if n is None:
                continue
            if n in seen and seen[n][0] != shape[ax]:
                size0, path0, ax0 = seen[n]
                msg = (
                    f"permutation {n!r} has size {size0} at {path0!r} axis {ax0} but size "
                    f"{shape[ax]} at {path!r} axis {ax}"
                )
                raise ValueError(msg)
            seen.setdefault(n, (shape[ax], path, ax))
    if part == "params":
        _check_block_sizes(spec, {n: v[0] for n, v in seen.items()})


def _check_block_sizes(spec: PermutationSpec, sizes: Mapping[str, int]) -> dict[str, int]:
    """Each blockwise group's size must be a multiple of its block size, and the groups sharing a
    heads label must have the same number of blocks; returns ``{heads label: number of heads}``."""
    heads: dict[str, tuple[int, str]] = {}
    for n, (h, b, _) in spec.blocks.items():
        if n not in sizes:
            continue
        if sizes[n] % b:
            msg = f"blockwise group {n!r} has {sizes[n]} units, not a multiple of its block size {b}"
            raise ValueError(msg)
        count = sizes[n] // b
        if h in heads and heads[h][0] != count:
            msg = (
                f"groups {heads[h][1]!r} and {n!r} share the heads {h!r} but have {heads[h][0]} and "
                f"{count} blocks"
            )
            raise ValueError(msg)
        heads.setdefault(h, (count, n))
    return {h: c for h, (c, _) in heads.items()}


def _check_function(
    spec: PermutationSpec,
    params: Params,
    *,
    apply_fn: Any,
    x: Any,
    state: Params | None,
    key: Key | None,
    rtol: float,
    atol: float,
    part: str,
) -> None:
    """The functional half of :func:`check_spec`: permuted params must compute the same outputs."""
    from landscape.align.trace import _call_parts

    if part != "params":
        msg = f"check_spec(apply_fn=...) checks params, got part={part!r}"
        raise ValueError(msg)
    if x is None:
        msg = "check_spec(apply_fn=...) needs x=, a batch of inputs to compare the outputs on"
        raise ValueError(msg)
    if not (rtol >= 0 and atol >= 0):
        msg = f"rtol and atol must be >= 0, got rtol={rtol!r}, atol={atol!r}"
        raise ValueError(msg)
    check_spec(spec, params)
    fn, state = _call_parts(apply_fn, state)
    state_tree = {} if state is None else state
    if state is not None:
        check_spec(spec, state_tree, part="state")
    key = jax.random.key(0) if key is None else key
    sizes = spec.sizes(params)
    heads, inner = _draw(key, spec, sizes)
    flat = {n: p for n, p in heads.items() if n in sizes}
    flat = {
        n: (jnp.roll(p, 1) if p.shape[0] > 1 and bool(jnp.all(p == jnp.arange(p.shape[0]))) else p)
        for n, p in flat.items()
    }
    heads = {**heads, **flat}
    for h in spec.heads:  # no head permutation and no within-head permutation left at the identity
        if heads[h].shape[0] > 1 and bool(jnp.all(heads[h] == jnp.arange(heads[h].shape[0]))):
            heads[h] = jnp.roll(heads[h], 1)
    for n, t in inner.items():
        if spec.blocks[n][2] == "free" and t.shape[1] > 1 and bool(jnp.all(t == jnp.arange(t.shape[1]))):
            inner[n] = jnp.roll(t, 1, axis=1)
    perm = _assemble(spec, sizes, heads, inner)
    permuted = apply(spec, perm, params)
    permuted_state = apply_state(spec, perm, state_tree) if state is not None else state_tree
    name = getattr(apply_fn, "__qualname__", type(apply_fn).__name__)
    try:
        before = jax.tree.leaves(fn(params, state_tree, x))
        after = jax.tree.leaves(fn(permuted, permuted_state, x))
    except Exception as err:  # noqa: BLE001 - re-raised with context
        msg = f"check_spec: apply_fn {name} fails on params and x of shape {jax.tree.map(jnp.shape, x)}: {err}"
        raise ValueError(msg) from err
    ref = [np.asarray(a, np.float64) for a in before]
    new = [np.asarray(b, np.float64) for b in after]
    if not all(np.all(np.isfinite(a)) for a in ref):
        msg = f"check_spec: apply_fn {name} gives non-finite outputs on x; cannot check the spec"
        raise ValueError(msg)
    scale = max((float(np.max(np.abs(a))) for a in ref if a.size), default=0.0)
    delta = max((float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in zip(ref, new)), default=0.0)
    tol = atol + rtol * scale
    if not delta <= tol:
        msg = (
            f"spec does not describe apply_fn {name}: a random permutation under the spec changes "
            f"the outputs by max |Δoutput| = {delta:.4g} (max |output| = {scale:.4g}, tolerance "
            f"{tol:.3g} = atol {atol:g} + rtol {rtol:g} · max |output|); derive the spec with "
            f"align.trace_spec(apply_fn, params, x)"
        )
        raise ValueError(msg)


def check_permutation(perm: Permutation, *, names: tuple[str, ...] | None = None) -> None:
    """Raise ``ValueError`` unless ``perm`` is a dict of 1-D integer arrays (with keys ``names``),
    each a permutation of ``0 … n−1``.

    Shapes and dtypes are always checked. The values (no duplicate, none out of range) are checked
    when they are concrete; under ``jax.jit`` / ``jax.vmap`` they are tracers and that check is
    skipped, so a traced index array that is not a permutation is the caller's responsibility
    (``jnp.take`` would clip it silently).
    """
    if not isinstance(perm, Mapping):
        msg = f"a permutation must be a dict name -> int array, got {type(perm).__name__}"
        raise ValueError(msg)
    for n, p in perm.items():
        if jnp.ndim(p) != 1 or not jnp.issubdtype(jnp.result_type(p), jnp.integer):
            msg = (
                f"permutation {n!r} must be a 1-D integer array, got shape {jnp.shape(p)} and "
                f"dtype {jnp.result_type(p)}"
            )
            raise ValueError(msg)
        if not isinstance(p, jax.core.Tracer):
            arr = np.asarray(p)
            size = arr.shape[0]
            if not np.array_equal(np.sort(arr), np.arange(size)):
                out = arr[(arr < 0) | (arr >= size)]
                vals, counts = np.unique(arr, return_counts=True)
                dup = vals[counts > 1]
                msg = (
                    f"permutation {n!r} is not a permutation of 0..{size - 1}: "
                    f"out of range {out[:5].tolist()}, repeated {dup[:5].tolist()}"
                )
                raise ValueError(msg)
    if names is not None and set(perm) != set(names):
        missing = sorted(set(names) - set(perm))
        extra = sorted(set(perm) - set(names))
        msg = (
            f"permutation names do not match the spec: missing {missing}, unexpected {extra}; "
            f"the spec uses {list(names)}"
        )
        raise ValueError(msg)


def _check_sizes(spec_sizes: dict[str, int], perm: Permutation) -> None:
    for n, size in spec_sizes.items():
        if jnp.shape(perm[n]) != (size,):
            msg = f"permutation {n!r} has shape {jnp.shape(perm[n])} but the model has {size} units there"
            raise ValueError(msg)


def _sizes_of(table: Mapping[str, tuple[str | None, ...]], tree: Params) -> dict[str, int]:
    leaves = dict(named_leaves(tree))
    out: dict[str, int] = {}
    for path, names in table.items():
        for ax, n in enumerate(names):
            if n is not None:
                out.setdefault(n, int(jnp.shape(leaves[path])[ax]))
    return out


def _permute(table: Mapping[str, tuple[str | None, ...]], perm: Permutation, tree: Params) -> Params:
    def one(path: Any, x: Array) -> Array:
        for ax, n in enumerate(table[key_name(path)]):
            if n is not None:
                x = jnp.take(x, perm[n], axis=ax)
        return x

    return jax.tree.map_with_path(one, tree)


def apply(spec: PermutationSpec, perm: Permutation, params: Params) -> Params:
    """Permute ``params``: along every axis tagged ``name``, new unit ``i`` is old unit ``perm[name][i]``.

    ``apply(spec, perm, θ)`` computes the same function as ``θ`` for any ``perm`` when ``spec``
    is the model's spec. Checks :func:`check_spec` and the permutation's names and sizes first;
    jittable and vmappable over stacked permutations or params.

    Args:
        spec: the model's permutation spec.
        perm: ``{name: int array (size,)}`` with exactly the names of ``spec.names``.
        params: the params tree described by ``spec.axes``.

    Returns:
        The permuted params, same structure, shapes and dtypes.
    """
    check_spec(spec, params)
    check_permutation(perm, names=spec.names)
    _check_sizes(_sizes_of(spec.axes, params), perm)
    check_blocks(spec, perm)
    return _permute(spec.axes, perm, params)


def check_blocks(spec: PermutationSpec, perm: Permutation) -> None:
    """Raise ``ValueError`` unless every blockwise group of ``perm`` has the structure of ``spec.blocks``.

    ``p[h·B + d] = σ[h]·B + τ_h[d]``: each block of ``B`` new units comes from one old block, the
    groups sharing a heads label take their blocks from the same old heads (one ``σ``), and with
    ``inner="fixed"`` the units inside a block keep their order. Checked on concrete values only
    (skipped under ``jax.jit`` / ``jax.vmap``, like :func:`check_permutation`).
    """
    sigma: dict[str, tuple[np.ndarray, str]] = {}
    for n, (h, b, inner) in spec.blocks.items():
        p = perm.get(n)
        if p is None or isinstance(p, jax.core.Tracer):
            continue
        arr = np.asarray(p)
        if arr.shape[0] % b:
            msg = f"permutation {n!r} has {arr.shape[0]} units, not a multiple of its block size {b}"
            raise ValueError(msg)
        rows = arr.reshape(-1, b)
        old = rows // b
        if not np.all(old == old[:, :1]):
            bad = int(np.argmax(~np.all(old == old[:, :1], axis=1)))
            msg = (
                f"permutation {n!r} is not blockwise: its block {bad} (units {bad * b}..{bad * b + b - 1}) "
                f"takes units from several old blocks {sorted(set(old[bad].tolist()))}; a head must stay a head"
            )
            raise ValueError(msg)
        if inner == "fixed" and not np.all(rows % b == np.arange(b)):
            msg = f"permutation {n!r} permutes units inside a block, but the spec fixes them (inner='fixed')"
            raise ValueError(msg)
        s = old[:, 0]
        if h in sigma and not np.array_equal(sigma[h][0], s):
            msg = (
                f"permutations {sigma[h][1]!r} and {n!r} share the heads {h!r} but move the heads "
                f"differently ({sigma[h][0].tolist()} vs {s.tolist()})"
            )
            raise ValueError(msg)
        sigma.setdefault(h, (s, n))


def split_blocks(spec: PermutationSpec, perm: Permutation) -> tuple[dict[str, Array], dict[str, Array]]:
    """``(σ per heads label, τ per blockwise group as an (H, B) array)`` of a blockwise permutation
    (the inverse of :func:`assemble_blocks`; jittable)."""
    heads: dict[str, Array] = {}
    inner: dict[str, Array] = {}
    for n, (h, b, _) in spec.blocks.items():
        rows = jnp.reshape(perm[n], (-1, b))
        heads.setdefault(h, rows[:, 0] // b)
        inner[n] = rows % b
    return heads, inner


def assemble_blocks(spec: PermutationSpec, heads: Mapping[str, Array], inner: Mapping[str, Array]) -> dict[str, Array]:
    """The flat permutation of every blockwise group, ``p[h·B + d] = σ[h]·B + τ[h, d]``.

    Args:
        spec: the spec with ``blocks``.
        heads: ``{heads label: σ (H,)}``.
        inner: ``{group: τ (H, B)}`` (the identity rows for ``inner="fixed"`` groups).
    """
    out = {}
    for n, (h, b, _) in spec.blocks.items():
        sigma = jnp.asarray(heads[h], jnp.int32)
        out[n] = (sigma[:, None] * b + jnp.asarray(inner[n], jnp.int32)).reshape(-1)
    return out


def apply_state(spec: PermutationSpec, perm: Permutation, state: Params) -> Params:
    """Permute non-trainable state (BatchNorm running statistics) with ``spec.state_axes``.

    Same convention as :func:`apply`; ``perm`` must contain (at least) every name that
    ``spec.state_axes`` uses. ``apply_state(spec, perm, {})`` returns ``{}``.
    """
    check_spec(spec, state, part="state")
    check_permutation(perm)
    used = {n for names in spec.state_axes.values() for n in names if n is not None}
    missing = sorted(used - set(perm))
    if missing:
        msg = f"permutation lacks {missing} that the spec's state entries use; it has {sorted(perm)}"
        raise ValueError(msg)
    _check_sizes(_sizes_of(spec.state_axes, state), perm)
    return _permute(spec.state_axes, perm, state)


def invert(perm: Permutation) -> Permutation:
    """The inverse permutation ``q`` with ``q[p[i]] = i``.

    Hence ``apply(spec, invert(p), apply(spec, p, θ)) == θ``; jittable (a scatter, ``O(n)``).
    """
    check_permutation(perm)

    def inv(p: Array) -> Array:
        return jnp.zeros_like(p).at[p].set(jnp.arange(p.shape[0], dtype=p.dtype))

    return {n: inv(p) for n, p in perm.items()}


def compose(p: Permutation, q: Permutation) -> Permutation:
    """The permutation that applies ``q`` first and then ``p`` (function composition ``p ∘ q``).

    ``apply(spec, compose(p, q), θ) == apply(spec, p, apply(spec, q, θ))``; elementwise
    ``compose(p, q)[name] = q[name][p[name]]``. With this order ``compose(p, invert(p))`` and
    ``compose(invert(p), p)`` are both the identity, and ``compose`` is associative.
    """
    check_permutation(p)
    check_permutation(q, names=tuple(p))
    for n in p:
        if jnp.shape(p[n]) != jnp.shape(q[n]):
            msg = f"cannot compose permutation {n!r}: sizes {jnp.shape(p[n])} and {jnp.shape(q[n])}"
            raise ValueError(msg)
    return {n: q[n][p[n]] for n in p}


def identity(spec: PermutationSpec, params: Params) -> Permutation:
    """The identity permutation ``{name: arange(size)}`` (int32) for a model described by ``spec``."""
    return {n: jnp.arange(s, dtype=jnp.int32) for n, s in spec.sizes(params).items()}


def random_permutation(key: Key, spec: PermutationSpec, params: Params) -> Permutation:
    """A uniformly random permutation of every group, one subkey per name in sorted order.

    A blockwise group (``spec.blocks``) is drawn uniformly among the blockwise permutations: one
    random head permutation per heads label (subkeys after the names'), and with ``inner="free"``
    an independent random permutation inside each block.
    """
    sizes = spec.sizes(params)
    heads, inner = _draw(key, spec, sizes)
    return _assemble(spec, sizes, heads, inner)


def _draw(key: Key, spec: PermutationSpec, sizes: Mapping[str, int]) -> tuple[dict[str, Array], dict[str, Array]]:
    """Random components: ``({name or heads label: perm}, {blockwise group: τ (H, B)})``."""
    head_counts = _check_block_sizes(spec, sizes)
    labels = sorted(head_counts)
    keys = jax.random.split(key, max(len(sizes) + len(labels), 1))
    out: dict[str, Array] = {}
    inner: dict[str, Array] = {}
    for k, (n, s) in zip(keys, sorted(sizes.items())):
        if n in spec.blocks:
            _, b, mode = spec.blocks[n]
            if mode == "free":
                inner[n] = jnp.argsort(jax.random.uniform(k, (s // b, b)), axis=1)  # uniform per block
            else:
                inner[n] = jnp.broadcast_to(jnp.arange(b), (s // b, b))
            inner[n] = inner[n].astype(jnp.int32)
        else:
            out[n] = jax.random.permutation(k, s).astype(jnp.int32)
    for k, h in zip(keys[len(sizes) :], labels):
        out[h] = jax.random.permutation(k, head_counts[h]).astype(jnp.int32)
    return out, inner


def _assemble(
    spec: PermutationSpec, sizes: Mapping[str, int], parts: Mapping[str, Array], inner: Mapping[str, Array]
) -> Permutation:
    flat = assemble_blocks(spec, parts, inner)
    return {n: (flat[n] if n in flat else parts[n]) for n in sorted(sizes)}

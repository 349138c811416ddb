"""From an NNX module to pure functions of pytrees: ``functional(model) -> (apply_fn, params, state)``.

The rest of the toolkit never sees Flax: ``params`` is a plain nested dict of arrays with string
keys (``params["layers"]["0"]["kernel"]``, whose :func:`landscape.tree.key_name` is
``"layers/0/kernel"``), ``state`` the same for non-trainable variables (BatchNorm running
statistics; ``{}`` when there are none), and ``apply_fn(params, x) -> logits`` a pure function.
Inside, ``apply_fn`` rebuilds the module with ``nnx.merge(graphdef, params, state)`` at trace time
and calls it, so it computes exactly what the module computes, and it is jittable,
differentiable and vmappable over a stacked params axis.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from landscape.models import MLP, functional
    >>> apply_fn, params, state = functional(MLP(4, (8, 3), rngs=nnx.Rngs(0)))
    >>> sorted(params["layers"]["0"])
    ['bias', 'kernel']
    >>> apply_fn(params, jnp.ones((2, 4))).shape
    (2, 3)
    >>> {k: v.shape for k, v in apply_fn.intermediates(params, jnp.ones((2, 4))).items()}
    {'P_0': (2, 8)}
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from landscape._types import Array, Params
from landscape.align.spec import PermutationSpec
from landscape.models.base import Taps, ZooModel
from landscape.tree import named_leaves

__all__ = ["INTERMEDIATE_KINDS", "FunctionalModel", "functional"]

INTERMEDIATE_KINDS = ("pre", "post", "input")
"""Accepted ``kind`` values of :meth:`FunctionalModel.intermediates`."""

_Path = tuple[Any, ...]


def _to_nested(flat: Mapping[tuple[str, ...], Array]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def _flat(state: nnx.State) -> list[tuple[_Path, Any]]:
    return list(nnx.to_flat_state(state))


def _digest(tree: Params) -> str | None:
    """Content hash of a tree of concrete arrays; ``None`` when any leaf is traced."""
    h = hashlib.sha256()
    for name, leaf in named_leaves(tree):
        if isinstance(leaf, jax.core.Tracer):
            return None
        a = np.asarray(leaf)
        h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _key_impl(value: Any) -> str | None:
    """The PRNG implementation name of a typed key array (``nnx.RngKey``), ``None`` for other values."""
    if jnp.issubdtype(jnp.result_type(value), jax.dtypes.prng_key):
        return str(jax.random.key_impl(value))
    return None


def _to_pure(value: Any) -> Any:
    """A variable's value as a plain array: typed PRNG keys become their ``uint32`` key data."""
    return jax.random.key_data(value) if _key_impl(value) is not None else value


@dataclasses.dataclass(frozen=True, eq=False)
class _Layout:
    """Where each leaf of a pure dict goes in the NNX state: paths, variable types and shapes.

    Typed PRNG keys (the ``nnx.RngKey`` of an ``nnx.Rngs`` held by ``Dropout``) appear in the pure
    dict as their ``uint32`` key data (``jax.random.key_data``), so state stays a tree of plain
    arrays (savable, hashable); ``key_impls`` says which leaves are wrapped back into keys.
    """

    nnx_paths: tuple[_Path, ...]
    names: tuple[str, ...]
    types: tuple[type, ...]
    shapes: tuple[tuple[int, ...], ...]
    key_impls: tuple[str | None, ...] = ()

    @staticmethod
    def of(state: nnx.State) -> _Layout:
        flat = _flat(state)
        paths = tuple(p for p, _ in flat)
        return _Layout(
            nnx_paths=paths,
            names=tuple("/".join(str(k) for k in p) for p in paths),
            types=tuple(type(v) for _, v in flat),
            shapes=tuple(tuple(jnp.shape(_to_pure(v.get_value()))) for _, v in flat),
            key_impls=tuple(_key_impl(v.get_value()) for _, v in flat),
        )

    def key(self) -> tuple[Any, ...]:
        return (self.nnx_paths, self.types, self.shapes, self.key_impls)

    def pure(self, state: nnx.State) -> dict[str, Any]:
        return _to_nested(
            {tuple(str(k) for k in p): _to_pure(v.get_value()) for p, v in _flat(state)}
        )

    def to_state(self, tree: Params, what: str) -> nnx.State:
        leaves = dict(named_leaves(tree)) if tree else {}
        if set(leaves) != set(self.names):
            missing = sorted(set(self.names) - set(leaves))
            extra = sorted(set(leaves) - set(self.names))
            msg = (
                f"{what} do not fit the model: missing {missing[:5]}, unexpected {extra[:5]}; "
                f"the model's {what} are {list(self.names)}"
            )
            raise ValueError(msg)
        flat = {}
        impls = self.key_impls or (None,) * len(self.names)
        for path, name, typ, shape, impl in zip(self.nnx_paths, self.names, self.types, self.shapes, impls):
            leaf = leaves[name]
            if impl is not None and _key_impl(leaf) is not None:
                leaf = jax.random.key_data(leaf)
            if tuple(jnp.shape(leaf)) != shape:
                msg = f"{what} leaf {name!r} has shape {tuple(jnp.shape(leaf))}, the model needs {shape}"
                raise ValueError(msg)
            if impl is not None:
                leaf = jax.random.wrap_key_data(jnp.asarray(leaf, jnp.uint32), impl=impl)
            flat[path] = typ(leaf)
        return nnx.from_flat_state(flat)


@dataclasses.dataclass(frozen=True, eq=False)
class FunctionalModel:
    """An NNX module as pure functions of ``(params, state, x)``; frozen and hashable.

    Call it as ``apply_fn(params, x) -> logits``: eval mode (BatchNorm uses the running
    statistics in :attr:`state`), pure in ``params``. Equality and hashing use the module's
    graph definition, the leaf layout, the spec and a content hash of :attr:`state`, so two
    ``FunctionalModel`` of the same architecture and statistics are interchangeable as static
    arguments of ``jax.jit`` (e.g. inside an :class:`~landscape.Objective`). A ``FunctionalModel``
    whose state holds tracers (made by :meth:`with_state` inside a trace) compares by identity.

    Attributes:
        graphdef: the module's ``nnx.GraphDef``.
        state: the non-parameter variables as a pure dict (``{}`` when none).
        spec: the model's :class:`~landscape.align.PermutationSpec`, or ``None`` for a module
            outside the zoo that does not define ``permutation_spec()``.
        is_zoo: whether the module is a :class:`~landscape.models.base.ZooModel` (then
            :meth:`intermediates` works and train / eval mode is passed explicitly).
        module_type: the module's class name (for ``repr``).
    """

    graphdef: Any
    params_layout: _Layout
    state_layout: _Layout
    state: dict[str, Any]
    spec: PermutationSpec | None
    is_zoo: bool = False
    module_type: str = "Module"
    _digest: str | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_digest", _digest(self.state))

    def __repr__(self) -> str:
        names = self.spec.names if self.spec is not None else None
        return (
            f"FunctionalModel({self.module_type}, params={list(self.params_layout.names)}, "
            f"state={list(self.state_layout.names)}, permutations={names})"
        )

    def _key(self) -> tuple[Any, ...]:
        return (
            self.graphdef,
            self.params_layout.key(),
            self.state_layout.key(),
            self.spec,
            self.is_zoo,
            self.module_type,
        )

    def __hash__(self) -> int:
        if self._digest is None:
            return id(self)
        return hash((self._key(), self._digest))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FunctionalModel):
            return NotImplemented
        if self._digest is None or other._digest is None:
            return self is other
        return self._digest == other._digest and self._key() == other._key()

    # ------------------------------------------------------------------ rebuilding the module
    def to_module(self, params: Params, state: Params | None = None) -> nnx.Module:
        """A fresh NNX module holding ``params`` and ``state`` (default: :attr:`state`)."""
        p = self.params_layout.to_state(params, "params")
        s = self.state_layout.to_state(self.state if state is None else state, "state")
        return nnx.merge(self.graphdef, p, s)

    def _run(self, module: nnx.Module, x: Array, *, train: bool, taps: Taps | None) -> Array:
        if self.is_zoo:
            return module.forward(x, train=train, taps=taps)
        if train:
            module.train()
        else:
            module.eval()
        return module(x)

    # ------------------------------------------------------------------ the functions
    def __call__(self, params: Params, x: Array) -> Array:
        """Logits in eval mode with the captured :attr:`state`."""
        return self.apply_with_state(params, self.state, x)

    def apply_with_state(self, params: Params, state: Params, x: Array) -> Array:
        """Logits in eval mode with an explicit (possibly traced or vmapped) ``state``."""
        return self._run(self.to_module(params, state), x, train=False, taps=None)

    def apply_train(self, params: Params, state: Params, x: Array) -> tuple[Array, Params]:
        """Train mode: ``(logits, new_state)``.

        BatchNorm normalises with the batch statistics of ``x`` and returns running statistics
        updated as ``r <- m r + (1 - m) batch``; without state returns ``(logits, state)``.
        """
        if not self.state_layout.names:
            self.state_layout.to_state(state, "state")
            logits = self._run(self.to_module(params, {}), x, train=True, taps=None)
            return logits, state
        module = self.to_module(params, state)
        logits = self._run(module, x, train=True, taps=None)
        _, _, rest = nnx.split(module, nnx.Param, ...)
        return logits, self.state_layout.pure(rest)

    def with_state(self, state: Params) -> FunctionalModel:
        """A copy whose eval-mode calls use ``state`` (e.g. recomputed BatchNorm statistics)."""
        self.state_layout.to_state(state, "state")
        return dataclasses.replace(self, state=state)

    def intermediates(
        self, params: Params, x: Array, *, kind: str = "pre", state: Params | None = None
    ) -> dict[str, Array]:
        """Hidden activations in eval mode, unit axis last.

        Args:
            params: the params.
            x: a batch of inputs.
            state: BatchNorm statistics to use instead of :attr:`state` (may be traced).
            kind: ``"pre"``: for every permutation name of :attr:`spec`, the pre-activation of that
                unit group: the layer output right before its nonlinearity, after the norm layer
                when there is one (for a residual stream, the stage's last residual sum before
                its ReLU), shape ``(N, ..., units)``. ``"post"``: the same groups after the
                nonlinearity. ``"input"``: for every dense / conv kernel path, the input the
                layer receives (for convs the unpadded NHWC map; form patches with
                ``jax.lax.conv_general_dilated_patches`` for per-patch Gram matrices).

        Each model's docstring says exactly which tensor each name holds.
        """
        if kind not in INTERMEDIATE_KINDS:
            msg = f"unknown intermediates kind {kind!r}; accepted: {list(INTERMEDIATE_KINDS)}"
            raise ValueError(msg)
        if not self.is_zoo:
            msg = (
                "intermediates need a zoo model (a landscape.models.ZooModel with "
                "forward(x, *, train, taps)); this FunctionalModel wraps a plain nnx.Module"
            )
            raise ValueError(msg)
        taps = Taps()
        self._run(self.to_module(params, state), x, train=False, taps=taps)
        return dict(getattr(taps, kind))


def functional(model: nnx.Module) -> tuple[FunctionalModel, dict[str, Any], dict[str, Any]]:
    """Split an NNX module into ``(apply_fn, params, state)``.

    Args:
        model: a zoo model (:class:`~landscape.models.MLP`, ``CNN``, ``ResNet``) or any
            ``nnx.Module`` whose ``__call__(x)`` gives logits (then ``train`` / ``eval`` switch
            its BatchNorm / Dropout mode and :meth:`FunctionalModel.intermediates` is unavailable).

    Returns:
        ``apply_fn``: a :class:`FunctionalModel`; ``params``: the ``nnx.Param`` variables as a
        nested dict of arrays with string keys; ``state``: all other variables the same way
        (``{}`` when none). The module itself is not modified. An ``nnx.Rngs`` held by the module
        (``nnx.Dropout(rate, rngs=...)``) is part of ``state``: its key as ``uint32`` key data and
        its counter, which :meth:`FunctionalModel.apply_train` advances (a fresh dropout mask per
        step); eval-mode calls are deterministic (dropout off) and leave it unchanged.
    """
    if not isinstance(model, nnx.Module):
        msg = f"functional needs an nnx.Module, got {type(model).__name__}"
        raise ValueError(msg)
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    params_layout, state_layout = _Layout.of(params_state), _Layout.of(rest)
    params = params_layout.pure(params_state)
    state = state_layout.pure(rest)
    spec = model.permutation_spec() if hasattr(model, "permutation_spec") else None
    fm = FunctionalModel(
        graphdef,
        params_layout,
        state_layout,
        state,
        spec,
        is_zoo=isinstance(model, ZooModel),
        module_type=type(model).__name__,
    )
    return fm, params, state

"""The contract every zoo model implements, and the norm layers they share.

A zoo model is an ``nnx.Module`` with

* ``forward(x, *, train=None, taps=None) -> logits``: ``train=None`` follows each BatchNorm's own
  ``use_running_average`` flag (what ``model(x)`` does, see ``model.train()`` / ``model.eval()``),
  ``train=True`` uses batch statistics and updates the running ones, ``train=False`` uses the
  running statistics. When ``taps`` is given the forward pass records, into it, every hidden unit
  group's pre- and post-activation (keyed by permutation name) and every dense / conv layer's input
  (keyed by the layer's kernel path);
* ``permutation_spec() -> PermutationSpec`` describing its params and BatchNorm state.

:func:`landscape.models.functional` turns such a module into pure functions of pytrees.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from landscape._types import Array
from landscape.align.spec import PermutationSpec

__all__ = [
    "ACTIVATIONS",
    "NORMS",
    "Taps",
    "ZooModel",
    "apply_norm",
    "as_float",
    "check_norm",
    "check_rngs",
    "global_average_pool",
    "make_norm",
    "norm_spec_entries",
]

NORMS = ("layer", "batch")
"""Accepted ``norm`` settings (the CNN also accepts ``None``)."""

BATCHNORM_MOMENTUM = 0.9
"""Running statistics ``r <- m r + (1 - m) batch`` with this ``m`` (short training runs)."""


class Taps:
    """Recorder for one forward pass: ``pre``, ``post`` (by permutation name) and ``input`` (by kernel path).

    A model calls :meth:`unit` for each hidden unit group (a later call for the same name
    overwrites an earlier one: a residual stream reports its last block) and :meth:`layer_input`
    for each dense / conv layer.
    """

    def __init__(self) -> None:
        self.pre: dict[str, Array] = {}
        self.post: dict[str, Array] = {}
        self.input: dict[str, Array] = {}

    def unit(self, name: str, pre: Array, post: Array) -> None:
        """Record a hidden group's pre-activation (right before the nonlinearity) and its output."""
        self.pre[name] = pre
        self.post[name] = post

    def layer_input(self, kernel_path: str, x: Array) -> None:
        """Record the input of the layer whose kernel lives at ``kernel_path``."""
        self.input[kernel_path] = x


class ZooModel(nnx.Module):
    """Base class of the zoo.

    Subclasses define ``forward(x, *, train=None, taps=None)`` and ``permutation_spec()`` (see the
    module docstring); ``model(x)`` runs ``forward`` with the module's own BatchNorm mode.
    """

    def __call__(self, x: Array) -> Array:
        return self.forward(x)  # type: ignore[attr-defined]


def check_norm(norm: Any, *, allow_none: bool) -> None:
    """Raise ``ValueError`` unless ``norm`` is an accepted setting."""
    accepted = (*NORMS, None) if allow_none else NORMS
    if norm not in accepted:
        msg = f"unknown norm {norm!r}; accepted: {list(accepted)}"
        raise ValueError(msg)


def make_norm(norm: str | None, width: int, *, rngs: nnx.Rngs) -> nnx.Module | None:
    """``nnx.LayerNorm`` over the unit (last) axis, ``nnx.BatchNorm``, or ``None``.

    LayerNorm normalises each position over its ``width`` units and then scales and shifts per unit,
    so it commutes with a permutation of the units when its scale and bias are permuted too.
    BatchNorm normalises each unit over the batch (and spatial) axes, with momentum
    :data:`BATCHNORM_MOMENTUM` and the exact two-pass variance.
    """
    if norm == "layer":
        return nnx.LayerNorm(width, rngs=rngs)
    if norm == "batch":
        return nnx.BatchNorm(
            width, momentum=BATCHNORM_MOMENTUM, use_fast_variance=False, rngs=rngs
        )
    return None


def apply_norm(layer: nnx.Module | None, x: Array, train: bool | None) -> Array:
    """Run a norm layer made by :func:`make_norm` (identity for ``None``)."""
    if layer is None:
        return x
    if isinstance(layer, nnx.BatchNorm):
        return layer(x, use_running_average=None if train is None else not train)
    return layer(x)


def norm_spec_entries(
    prefix: str, norm: str | None, name: str
) -> tuple[dict[str, tuple[str | None, ...]], dict[str, tuple[str | None, ...]]]:
    """Spec entries ``(params, state)`` of a norm layer at ``prefix`` acting on units ``name``."""
    if norm is None:
        return {}, {}
    params = {f"{prefix}/scale": (name,), f"{prefix}/bias": (name,)}
    state = {f"{prefix}/mean": (name,), f"{prefix}/var": (name,)} if norm == "batch" else {}
    return params, state


def as_float(x: Any) -> Array:
    """``x`` as a floating-point array (integer / bool inputs become float32)."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def check_rngs(rngs: Any, model: str) -> None:
    """Raise ``ValueError`` unless ``rngs`` is an ``nnx.Rngs``."""
    if not isinstance(rngs, nnx.Rngs):
        msg = f"{model} needs rngs=nnx.Rngs(...), got {type(rngs).__name__}"
        raise ValueError(msg)


def global_average_pool(x: Array) -> Array:
    """Mean over the spatial axes of an NHWC map: ``(N, H, W, C) -> (N, C)``."""
    return jnp.mean(x, axis=(1, 2))


ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "tanh": jnp.tanh, "silu": jax.nn.silu}
"""Elementwise activations the MLP accepts (all commute with unit permutations)."""

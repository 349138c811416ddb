"""Multi-layer perceptron: the workhorse of the linear-mode-connectivity literature.

.. math::  h_0 = \\mathrm{flatten}(x),\\quad z_\\ell = h_{\\ell-1} W_\\ell + b_\\ell,\\quad
           h_\\ell = \\sigma(z_\\ell)\\ (\\ell < L),\\quad \\text{logits} = z_L

Hidden group ``ℓ`` (0-based) is permuted by ``"P_ℓ"``: the columns of ``layers/ℓ/kernel``, the
entries of ``layers/ℓ/bias`` and the rows of ``layers/ℓ+1/kernel`` (git-re-basin's
``mlp_permutation_spec``, Ainsworth et al., arXiv:2209.04836).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from landscape.models import MLP
    >>> model = MLP(64, (16, 16, 10), rngs=nnx.Rngs(0))
    >>> model(jnp.ones((2, 8, 8))).shape
    (2, 10)
    >>> sorted(model.permutation_spec().names)
    ['P_0', 'P_1']
"""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx

from landscape._types import Array
from landscape.align.spec import PermutationSpec
from landscape.models.base import ACTIVATIONS, Taps, ZooModel, as_float, check_rngs

__all__ = ["MLP"]


class MLP(ZooModel):
    """Dense layers with an elementwise activation between them; the last layer gives the logits.

    Args:
        in_features: number of input features after flattening every axis but the first.
        widths: output width of every layer, the last one being the number of outputs, e.g.
            ``(512, 512, 10)`` for two hidden layers of 512 units and 10 classes.
        rngs: ``nnx.Rngs`` for the initialisation (LeCun-normal kernels, zero biases).
        activation: one of ``"relu"``, ``"gelu"``, ``"tanh"``, ``"silu"``.

    Params: ``layers/<i>/kernel`` (in, out) and ``layers/<i>/bias`` (out,). No state.
    Intermediates: ``"P_<i>"`` is hidden layer ``i``'s dense output ``z_i`` (``"pre"``) and
    ``σ(z_i)`` (``"post"``), shape ``(N, width_i)``; ``"input"`` gives ``h_{i-1}`` under
    ``"layers/<i>/kernel"`` for every layer including the output layer.
    """

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int],
        *,
        rngs: nnx.Rngs,
        activation: str = "relu",
    ) -> None:
        check_rngs(rngs, "MLP")
        if not isinstance(in_features, int) or in_features < 1:
            msg = f"MLP in_features must be a positive int, got {in_features!r}"
            raise ValueError(msg)
        widths = tuple(widths)
        if not widths or not all(isinstance(w, int) and w >= 1 for w in widths):
            msg = f"MLP widths must be a non-empty sequence of positive ints (last = outputs), got {widths!r}"
            raise ValueError(msg)
        if activation not in ACTIVATIONS:
            msg = f"unknown activation {activation!r}; accepted: {sorted(ACTIVATIONS)}"
            raise ValueError(msg)
        self.in_features = in_features
        self.widths = widths
        self.activation = activation
        dims = (in_features, *widths)
        self.layers = nnx.List(
            [nnx.Linear(dims[i], dims[i + 1], rngs=rngs) for i in range(len(widths))]
        )

    def forward(self, x: Array, *, train: bool | None = None, taps: Taps | None = None) -> Array:
        """Logits ``(N, widths[-1])`` for ``x`` of shape ``(N, ...)`` with ``prod(...) == in_features``."""
        x = as_float(x)
        if x.ndim < 1 or (x.ndim == 1 and self.in_features != 1):
            msg = f"MLP expects inputs (N, ...) with {self.in_features} features per example, got {x.shape}"
            raise ValueError(msg)
        h = x.reshape(x.shape[0], -1)
        if h.shape[1] != self.in_features:
            msg = (
                f"MLP expects {self.in_features} features per example, got input shape {x.shape} "
                f"({h.shape[1]} after flattening)"
            )
            raise ValueError(msg)
        act = ACTIVATIONS[self.activation]
        *hidden, output = self.layers
        for i, layer in enumerate(hidden):
            if taps is not None:
                taps.layer_input(f"layers/{i}/kernel", h)
            z = layer(h)
            h = act(z)
            if taps is not None:
                taps.unit(f"P_{i}", z, h)
        if taps is not None:
            taps.layer_input(f"layers/{len(hidden)}/kernel", h)
        return output(h)

    def permutation_spec(self) -> PermutationSpec:
        """``layers/i/kernel: (P_{i-1}, P_i)``, ``layers/i/bias: (P_i,)``; input and output unpermuted."""
        n = len(self.widths)
        axes: dict[str, tuple[str | None, ...]] = {}
        for i in range(n):
            p_in = f"P_{i - 1}" if i > 0 else None
            p_out = f"P_{i}" if i < n - 1 else None
            axes[f"layers/{i}/kernel"] = (p_in, p_out)
            axes[f"layers/{i}/bias"] = (p_out,)
        return PermutationSpec(axes)

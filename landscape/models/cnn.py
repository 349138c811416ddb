"""VGG-style convolutional network: conv3x3 -> norm -> ReLU stages, max-pooling between them.

.. math::  z_s = \\mathrm{norm}_s(\\mathrm{conv}_s(h_{s-1})),\\quad h_s = \\mathrm{relu}(z_s),\\quad
           h_{s} \\leftarrow \\mathrm{maxpool}_{2\\times2}(h_s)\\ (s < S),\\quad
           \\text{logits} = \\mathrm{mean}_{hw}(h_S)\\, W + b

Stage ``s`` (0-based) has its channels permuted by ``"P_s"``: the output axis of
``convs/s/kernel`` (and its bias), the norm's scale / bias (and BatchNorm's running mean / var),
the input-channel axis of the next conv, and the rows of ``head/kernel`` after global average
pooling — the VGG spec of git-re-basin (Ainsworth et al., arXiv:2209.04836), whose VGG uses
LayerNorm for the same reason we default to it: LayerNorm over channels needs no running
statistics, so interpolated and merged models need no statistics reset.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from landscape.models import CNN
    >>> model = CNN(1, 10, widths=(8, 16), rngs=nnx.Rngs(0))
    >>> model(jnp.ones((2, 8, 8, 1))).shape
    (2, 10)

:class:`VGG` is the deep member of the family: VGG-11 / 13 / 16 / 19 (Simonyan & Zisserman,
arXiv:1409.1556) in the CIFAR form that REPAIR (Jordan et al., arXiv:2211.08403) and git-re-basin
use, with BatchNorm by default and a width multiplier:

    >>> from landscape.models import VGG
    >>> vgg = VGG(1, 10, depth=11, base_width=2, rngs=nnx.Rngs(0))
    >>> vgg(jnp.ones((2, 28, 28, 1))).shape, len(vgg.permutation_spec().names)
    ((2, 10), 8)
"""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx

from landscape._types import Array
from landscape.align.spec import PermutationSpec
from landscape.models.base import (
    Taps,
    ZooModel,
    apply_norm,
    as_float,
    check_norm,
    check_rngs,
    global_average_pool,
    make_norm,
    norm_spec_entries,
)

__all__ = ["CNN", "VGG", "VGG11", "VGG16", "VGG_CONFIGS"]


class CNN(ZooModel):
    """A small VGG: one 3x3 conv per stage, norm, ReLU, 2x2 max-pool between stages, GAP, dense head.

    Args:
        in_channels: channels of the NHWC input (1 for digits as ``(N, 8, 8, 1)``).
        num_classes: outputs of the dense head.
        widths: channels of each stage's conv.
        norm: ``"layer"`` (default), ``"batch"`` or ``None``. Convs have a bias unless followed by
            BatchNorm (whose shift makes it redundant).
        rngs: ``nnx.Rngs`` for the initialisation.

    Params: ``convs/<s>/kernel`` (3, 3, in, out), ``convs/<s>/bias``, ``norms/<s>/{scale,bias}``,
    ``head/{kernel,bias}``; state (BatchNorm only): ``norms/<s>/{mean,var}``.
    Intermediates: ``"P_<s>"`` is stage ``s``'s norm output (the conv output when ``norm=None``)
    right before the ReLU (``"pre"``) and the ReLU output before pooling (``"post"``), shape
    ``(N, H_s, W_s, width_s)``; ``"input"`` gives each conv's unpadded input map under
    ``"convs/<s>/kernel"`` and the pooled features ``(N, width_last)`` under ``"head/kernel"``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        widths: Sequence[int] = (32, 64),
        norm: str | None = "layer",
        rngs: nnx.Rngs,
    ) -> None:
        check_rngs(rngs, "CNN")
        check_norm(norm, allow_none=True)
        for name, v in (("in_channels", in_channels), ("num_classes", num_classes)):
            if not isinstance(v, int) or v < 1:
                msg = f"CNN {name} must be a positive int, got {v!r}"
                raise ValueError(msg)
        widths = tuple(widths)
        if not widths or not all(isinstance(w, int) and w >= 1 for w in widths):
            msg = f"CNN widths must be a non-empty sequence of positive ints, got {widths!r}"
            raise ValueError(msg)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.widths = widths
        self.norm = norm
        dims = (in_channels, *widths)
        self.convs = nnx.List(
            [
                nnx.Conv(
                    dims[i], dims[i + 1], (3, 3), padding="SAME", use_bias=norm != "batch", rngs=rngs
                )
                for i in range(len(widths))
            ]
        )
        self.norms = nnx.List([make_norm(norm, w, rngs=rngs) for w in widths] if norm else [])
        self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

    def forward(self, x: Array, *, train: bool | None = None, taps: Taps | None = None) -> Array:
        """Logits ``(N, num_classes)`` for NHWC ``x`` (``(N, H, W)`` is accepted when ``in_channels == 1``)."""
        x = as_float(x)
        if x.ndim == 3 and self.in_channels == 1:
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            msg = (
                f"CNN expects NHWC inputs (N, H, W, {self.in_channels}), got shape {x.shape}; "
                "reshape flat images first, e.g. x.reshape(-1, 8, 8, 1)"
            )
            raise ValueError(msg)
        h = x
        last = len(self.convs) - 1
        for s, conv in enumerate(self.convs):
            if taps is not None:
                taps.layer_input(f"convs/{s}/kernel", h)
            z = apply_norm(self.norms[s] if self.norm else None, conv(h), train)
            h = nnx.relu(z)
            if taps is not None:
                taps.unit(f"P_{s}", z, h)
            if s < last:
                h = nnx.max_pool(h, (2, 2), strides=(2, 2), padding="SAME")
        pooled = global_average_pool(h)
        if taps is not None:
            taps.layer_input("head/kernel", pooled)
        return self.head(pooled)

    def permutation_spec(self) -> PermutationSpec:
        """One permutation ``P_s`` per stage, shared by conv outputs, norm and the next input."""
        axes: dict[str, tuple[str | None, ...]] = {}
        state: dict[str, tuple[str | None, ...]] = {}
        for s in range(len(self.widths)):
            p_in = f"P_{s - 1}" if s > 0 else None
            p = f"P_{s}"
            axes[f"convs/{s}/kernel"] = (None, None, p_in, p)
            if self.norm != "batch":
                axes[f"convs/{s}/bias"] = (p,)
            norm_params, norm_state = norm_spec_entries(f"norms/{s}", self.norm, p)
            axes.update(norm_params)
            state.update(norm_state)
        axes["head/kernel"] = (f"P_{len(self.widths) - 1}", None)
        axes["head/bias"] = (None,)
        return PermutationSpec(axes, state)


VGG_CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"),
    13: (1, 1, "M", 2, 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"),
    16: (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M"),
    19: (1, 1, "M", 2, 2, "M", 4, 4, 4, 4, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8, "M"),
}
"""VGG layer lists by depth: conv widths in units of ``base_width`` (64 in the paper), ``"M"`` a
2x2 max-pool. With ``base_width=64`` these are the standard configurations A, B, D, E
(64-128-256-512-512)."""


class VGG(ZooModel):
    """VGG-11/13/16/19: 3x3 conv -> norm -> ReLU layers, 2x2 max-pools, global average pool, dense head.

    .. math::  z_\\ell = \\mathrm{norm}_\\ell(\\mathrm{conv}_\\ell(h_{\\ell-1})),\\quad
               h_\\ell = \\mathrm{relu}(z_\\ell)\\ (\\text{then a max-pool where the config
               says}),\\quad \\text{logits} = \\mathrm{mean}_{hw}(h_L)\\, W + b

    The CIFAR VGG of REPAIR (Jordan et al., arXiv:2211.08403) and git-re-basin (Ainsworth et al.,
    arXiv:2209.04836): the convolutional part of Simonyan & Zisserman's configurations
    (:data:`VGG_CONFIGS`) with every width times ``width_multiplier``, and one dense classifier.
    Five ``SAME`` max-pools take a 32x32 input to 1x1 (28x28 MNIST: 28-14-7-4-2-1), where the
    global average pool equals REPAIR's flatten; on larger inputs it averages the final map.
    Convs have no bias when BatchNorm follows (its shift makes a bias redundant).

    Conv layer ``l`` (0-based, pools not counted) has its channels permuted by ``"P_l"``: the
    output axis of ``convs/l/kernel`` (and its bias), the norm's scale / bias and BatchNorm's
    running mean / var, the input axis of the next conv, and the rows of ``head/kernel``.

    Args:
        in_channels: Channels of the NHWC input.
        num_classes: Outputs of the dense head.
        depth: 11, 13, 16 or 19.
        width_multiplier: Multiplies every width (the knob of width-vs-connectivity studies).
        base_width: Width of the first conv before the multiplier (64 in the paper; small values
            give tiny test models).
        norm: ``"batch"`` (default, as REPAIR), ``"layer"`` (git-re-basin's choice) or ``None``.
        rngs: ``nnx.Rngs`` for the initialisation.

    Params: ``convs/<l>/kernel`` (3, 3, in, out), ``convs/<l>/bias`` (without BatchNorm),
    ``norms/<l>/{scale,bias}``, ``head/{kernel,bias}``; state (BatchNorm only):
    ``norms/<l>/{mean,var}``. Intermediates: ``"P_<l>"`` is conv ``l``'s norm output right before
    the ReLU (``"pre"``) and the ReLU output before any pooling (``"post"``); ``"input"`` gives each
    conv's input map under ``"convs/<l>/kernel"`` and the pooled features under ``"head/kernel"``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        depth: int = 11,
        width_multiplier: int = 1,
        base_width: int = 64,
        norm: str | None = "batch",
        rngs: nnx.Rngs,
    ) -> None:
        check_rngs(rngs, "VGG")
        check_norm(norm, allow_none=True)
        if depth not in VGG_CONFIGS:
            msg = f"unknown VGG depth {depth!r}; accepted: {sorted(VGG_CONFIGS)}"
            raise ValueError(msg)
        for name, v in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("width_multiplier", width_multiplier),
            ("base_width", base_width),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                msg = f"VGG {name} must be a positive int, got {v!r}"
                raise ValueError(msg)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.depth = depth
        self.norm = norm
        widths, pool_after = [], []
        for item in VGG_CONFIGS[depth]:
            if item == "M":
                pool_after[-1] = True
            else:
                widths.append(int(item) * base_width * width_multiplier)
                pool_after.append(False)
        self.widths = tuple(widths)
        self.pool_after = tuple(pool_after)
        dims = (in_channels, *widths)
        self.convs = nnx.List(
            [
                nnx.Conv(
                    dims[i], dims[i + 1], (3, 3), padding="SAME", use_bias=norm != "batch", rngs=rngs
                )
                for i in range(len(widths))
            ]
        )
        self.norms = nnx.List([make_norm(norm, w, rngs=rngs) for w in widths] if norm else [])
        self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

    def forward(self, x: Array, *, train: bool | None = None, taps: Taps | None = None) -> Array:
        """Logits ``(N, num_classes)`` for NHWC ``x`` (``(N, H, W)`` is accepted when ``in_channels == 1``)."""
        x = as_float(x)
        if x.ndim == 3 and self.in_channels == 1:
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            msg = (
                f"VGG expects NHWC inputs (N, H, W, {self.in_channels}), got shape {x.shape}; "
                "reshape flat images first, e.g. x.reshape(-1, 28, 28, 1)"
            )
            raise ValueError(msg)
        h = x
        for k, conv in enumerate(self.convs):
            if taps is not None:
                taps.layer_input(f"convs/{k}/kernel", h)
            z = apply_norm(self.norms[k] if self.norm else None, conv(h), train)
            h = nnx.relu(z)
            if taps is not None:
                taps.unit(f"P_{k}", z, h)
            if self.pool_after[k]:
                h = nnx.max_pool(h, (2, 2), strides=(2, 2), padding="SAME")
        pooled = global_average_pool(h)
        if taps is not None:
            taps.layer_input("head/kernel", pooled)
        return self.head(pooled)

    def permutation_spec(self) -> PermutationSpec:
        """One permutation ``P_l`` per conv layer, shared by its output, norm and the next input."""
        axes: dict[str, tuple[str | None, ...]] = {}
        state: dict[str, tuple[str | None, ...]] = {}
        for k in range(len(self.widths)):
            p_in = f"P_{k - 1}" if k > 0 else None
            p = f"P_{k}"
            axes[f"convs/{k}/kernel"] = (None, None, p_in, p)
            if self.norm != "batch":
                axes[f"convs/{k}/bias"] = (p,)
            norm_params, norm_state = norm_spec_entries(f"norms/{k}", self.norm, p)
            axes.update(norm_params)
            state.update(norm_state)
        axes["head/kernel"] = (f"P_{len(self.widths) - 1}", None)
        axes["head/bias"] = (None,)
        return PermutationSpec(axes, state)


class VGG11(VGG):
    """:class:`VGG` with ``depth=11`` (configuration A: 8 convs)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        width_multiplier: int = 1,
        base_width: int = 64,
        norm: str | None = "batch",
        rngs: nnx.Rngs,
    ) -> None:
        super().__init__(
            in_channels, num_classes, depth=11, width_multiplier=width_multiplier,
            base_width=base_width, norm=norm, rngs=rngs,
        )


class VGG16(VGG):
    """:class:`VGG` with ``depth=16`` (configuration D: 13 convs)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        width_multiplier: int = 1,
        base_width: int = 64,
        norm: str | None = "batch",
        rngs: nnx.Rngs,
    ) -> None:
        super().__init__(
            in_channels, num_classes, depth=16, width_multiplier=width_multiplier,
            base_width=base_width, norm=norm, rngs=rngs,
        )

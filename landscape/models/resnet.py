"""Small ResNet (He et al., arXiv:1512.03385) with one residual-stream permutation per stage.

Each basic block computes

.. math::  u = \\mathrm{relu}(\\mathrm{norm}_1(\\mathrm{conv}_1 x)),\\quad
           r = \\mathrm{norm}_2(\\mathrm{conv}_2 u) + \\mathrm{shortcut}(x),\\quad y = \\mathrm{relu}(r)

where the shortcut is the identity, or a 1x1 conv + norm ("projection") where the block changes
width or stride. Because ``x`` is added to ``r`` unchanged, every tensor on a stage's residual
stream (the stem's output for stage 0, every block's ``r`` and ``y``) must be permuted alike: one
permutation ``"P_stage<i>"`` per stage, shared by every block's ``conv2`` / ``norm2`` outputs, the
next blocks' inputs and the projection; each block's inner units get their own
``"P_stage<i>_block<j>"``. This is git-re-basin's ``resnet20_permutation_spec``
(Ainsworth et al., arXiv:2209.04836).

Stage ``i`` has ``base_width * width_multiplier * 2**i`` channels; stages after the first start
with a stride-2 block (a projection shortcut).

:class:`ResNet20` is the CIFAR ResNet-20 of He et al. (Sec. 4.2): a 3x3 stem, three stages of three
basic blocks with ``16k / 32k / 64k`` channels for width multiplier ``k``, global average pooling and
a dense head (0.27M parameters at ``k = 1``), BatchNorm by default. Where a block changes width or
stride the shortcut is a 1x1 strided conv + norm (He et al.'s option B), as in git-re-basin's
``resnet20`` and REPAIR's ResNet-20 (Jordan et al., arXiv:2211.08403); He et al.'s option A
(zero-padded identity) has no parameters to permute and is not implemented.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from landscape.models import ResNet
    >>> model = ResNet(1, 10, base_width=8, rngs=nnx.Rngs(0))
    >>> model(jnp.ones((2, 8, 8, 1))).shape
    (2, 10)
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

__all__ = ["ResNet", "ResNet20"]


class _Projection(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str, *, rngs: nnx.Rngs) -> None:
        self.conv = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
        self.norm = make_norm(norm, cout, rngs=rngs)


class _Block(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str, *, rngs: nnx.Rngs) -> None:
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, padding="SAME", use_bias=False, rngs=rngs)
        self.norm1 = make_norm(norm, cout, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.norm2 = make_norm(norm, cout, rngs=rngs)
        self.projection = stride != 1 or cin != cout
        if self.projection:
            self.shortcut = _Projection(cin, cout, stride, norm, rngs=rngs)


class _Stage(nnx.Module):
    def __init__(self, blocks: list[_Block]) -> None:
        self.blocks = nnx.List(blocks)


class ResNet(ZooModel):
    """Stem conv, residual stages of basic blocks, global average pool, dense head.

    Args:
        in_channels: channels of the NHWC input.
        num_classes: outputs of the dense head.
        width_multiplier: multiplies every width (the knob of width-vs-connectivity studies).
        blocks_per_stage: number of basic blocks in each stage.
        base_width: channels of the stem and the first stage (before the multiplier).
        norm: ``"layer"`` (default) or ``"batch"``. Convs have no bias (every conv is followed by
            a norm with a shift).
        rngs: ``nnx.Rngs`` for the initialisation.

    Params: ``stem/kernel``, ``stem_norm/*``, ``stages/<i>/blocks/<j>/{conv1,norm1,conv2,norm2}/*``,
    ``stages/<i>/blocks/<j>/shortcut/{conv,norm}/*`` (projection blocks only), ``head/*``; state
    (BatchNorm only): every norm's ``mean`` and ``var``.
    Intermediates: ``"P_stage<i>_block<j>"`` is the block's ``norm1`` output before its ReLU
    (``"pre"``) and after it (``"post"``); ``"P_stage<i>"`` is the stage's output: the last block's
    residual sum ``r`` before the final ReLU (``"pre"``) and ``y = relu(r)`` (``"post"``). All are
    ``(N, H, W, units)``. ``"input"`` gives the input of every conv (keyed by its kernel path,
    e.g. ``"stages/0/blocks/0/conv2/kernel"``) and the pooled features under ``"head/kernel"``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        width_multiplier: int = 1,
        blocks_per_stage: Sequence[int] = (1, 1),
        base_width: int = 16,
        norm: str = "layer",
        rngs: nnx.Rngs,
    ) -> None:
        check_rngs(rngs, "ResNet")
        check_norm(norm, allow_none=False)
        for name, v in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("width_multiplier", width_multiplier),
            ("base_width", base_width),
        ):
            if not isinstance(v, int) or v < 1:
                msg = f"ResNet {name} must be a positive int, got {v!r}"
                raise ValueError(msg)
        blocks_per_stage = tuple(blocks_per_stage)
        if not blocks_per_stage or not all(isinstance(b, int) and b >= 1 for b in blocks_per_stage):
            msg = (
                "ResNet blocks_per_stage must be a non-empty sequence of positive ints, "
                f"got {blocks_per_stage!r}"
            )
            raise ValueError(msg)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.blocks_per_stage = blocks_per_stage
        self.norm = norm
        self.stage_widths = tuple(
            base_width * width_multiplier * 2**i for i in range(len(blocks_per_stage))
        )
        w0 = self.stage_widths[0]
        self.stem = nnx.Conv(in_channels, w0, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.stem_norm = make_norm(norm, w0, rngs=rngs)
        stages = []
        cin = w0
        for i, (width, n_blocks) in enumerate(zip(self.stage_widths, blocks_per_stage)):
            blocks = []
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(_Block(cin, width, stride, norm, rngs=rngs))
                cin = width
            stages.append(_Stage(blocks))
        self.stages = nnx.List(stages)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def forward(self, x: Array, *, train: bool | None = None, taps: Taps | None = None) -> Array:
        """Logits ``(N, num_classes)`` for NHWC ``x`` (``(N, H, W)`` is accepted when ``in_channels == 1``)."""
        x = as_float(x)
        if x.ndim == 3 and self.in_channels == 1:
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            msg = (
                f"ResNet expects NHWC inputs (N, H, W, {self.in_channels}), got shape {x.shape}; "
                "reshape flat images first, e.g. x.reshape(-1, 8, 8, 1)"
            )
            raise ValueError(msg)
        if taps is not None:
            taps.layer_input("stem/kernel", x)
        r = apply_norm(self.stem_norm, self.stem(x), train)
        h = nnx.relu(r)
        if taps is not None:
            taps.unit("P_stage0", r, h)
        for i, stage in enumerate(self.stages):
            for j, block in enumerate(stage.blocks):
                prefix = f"stages/{i}/blocks/{j}"
                if taps is not None:
                    taps.layer_input(f"{prefix}/conv1/kernel", h)
                z = apply_norm(block.norm1, block.conv1(h), train)
                u = nnx.relu(z)
                if taps is not None:
                    taps.unit(f"P_stage{i}_block{j}", z, u)
                    taps.layer_input(f"{prefix}/conv2/kernel", u)
                if block.projection:
                    if taps is not None:
                        taps.layer_input(f"{prefix}/shortcut/conv/kernel", h)
                    skip = apply_norm(block.shortcut.norm, block.shortcut.conv(h), train)
                else:
                    skip = h
                r = apply_norm(block.norm2, block.conv2(u), train) + skip
                h = nnx.relu(r)
                if taps is not None:
                    taps.unit(f"P_stage{i}", r, h)
        pooled = global_average_pool(h)
        if taps is not None:
            taps.layer_input("head/kernel", pooled)
        return self.head(pooled)

    def permutation_spec(self) -> PermutationSpec:
        """Residual stream ``P_stage<i>`` per stage, inner ``P_stage<i>_block<j>`` per block."""
        axes: dict[str, tuple[str | None, ...]] = {}
        state: dict[str, tuple[str | None, ...]] = {}

        def norm(prefix: str, name: str) -> None:
            p, s = norm_spec_entries(prefix, self.norm, name)
            axes.update(p)
            state.update(s)

        axes["stem/kernel"] = (None, None, None, "P_stage0")
        norm("stem_norm", "P_stage0")
        stream_in = "P_stage0"
        for i, n_blocks in enumerate(self.blocks_per_stage):
            stream = f"P_stage{i}"
            for j in range(n_blocks):
                prefix = f"stages/{i}/blocks/{j}"
                inner = f"P_stage{i}_block{j}"
                axes[f"{prefix}/conv1/kernel"] = (None, None, stream_in, inner)
                norm(f"{prefix}/norm1", inner)
                axes[f"{prefix}/conv2/kernel"] = (None, None, inner, stream)
                norm(f"{prefix}/norm2", stream)
                if self.stages[i].blocks[j].projection:
                    axes[f"{prefix}/shortcut/conv/kernel"] = (None, None, stream_in, stream)
                    norm(f"{prefix}/shortcut/norm", stream)
                stream_in = stream
        axes["head/kernel"] = (stream_in, None)
        axes["head/bias"] = (None,)
        return PermutationSpec(axes, state)


class ResNet20(ResNet):
    """ResNet-20 with a width multiplier: :class:`ResNet` with 3 stages of 3 blocks, base width 16.

    ``ResNet20(3, 10, width_multiplier=k)`` has stages of ``16k, 32k, 64k`` channels and
    ``272474`` parameters at ``k = 1`` on 3-channel inputs (the quoted 0.27M, with the two
    projection shortcuts); BatchNorm by default as in REPAIR, ``norm="layer"`` as in git-re-basin.

    Args:
        in_channels: Channels of the NHWC input (3 for CIFAR, 1 for MNIST).
        num_classes: Outputs of the dense head.
        width_multiplier: ``k``, multiplies every width (x1, x2, x4, ... in the papers).
        norm: ``"batch"`` (default) or ``"layer"``.
        rngs: ``nnx.Rngs`` for the initialisation.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> model = ResNet20(1, 10, width_multiplier=1, rngs=nnx.Rngs(0))
        >>> model.stage_widths, model(jnp.ones((2, 28, 28, 1))).shape
        ((16, 32, 64), (2, 10))
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        width_multiplier: int = 1,
        norm: str = "batch",
        rngs: nnx.Rngs,
    ) -> None:
        super().__init__(
            in_channels,
            num_classes,
            width_multiplier=width_multiplier,
            blocks_per_stage=(3, 3, 3),
            base_width=16,
            norm=norm,
            rngs=rngs,
        )

"""Transformers for the zoo: a GPT-style causal decoder and a Vision Transformer (ViT).

Both are pre-norm residual stacks (Radford et al. 2019, GPT-2; Dosovitskiy et al., arXiv:2010.11929)

.. math::  h \\leftarrow h + \\mathrm{attn}(\\mathrm{ln}_1(h)),\\qquad
           h \\leftarrow h + \\mathrm{mlp}(\\mathrm{ln}_2(h)),

with multi-head self-attention (Vaswani et al., arXiv:1706.03762): for each head ``a``,
``q_a, k_a, v_a = h W^{q,k,v}_a + b^{q,k,v}_a`` and

.. math::  \\mathrm{attn}(h) = \\big[\\mathrm{softmax}\\big(q_a k_a^\\top / \\sqrt{d_h} + M\\big) v_a\\big]_a W^o + b^o

where the mask ``M`` is ``0`` for an allowed key and ``-inf`` otherwise (a causal mask for the GPT,
and keys with ``attention_mask == 0`` excluded). In code the excluded scores are set to the dtype's
most negative finite value, as ``transformers`` does, so they get weight exactly ``0`` while a
query with no allowed key at all (a padded row) stays finite instead of ``NaN``.

The MLP is ``proj(gelu_tanh(fc(x)))`` (GPT-2's ``gelu_new``), or with ``mlp="gated"`` the SwiGLU of
Llama (Touvron et al., arXiv:2302.13971; Shazeer, arXiv:2002.05202)
``proj(silu(gate(x)) * fc(x))``. Positions are learned embeddings added to the token embeddings
(GPT-2) or rotary embeddings applied to queries and keys (Su et al., arXiv:2104.09864) in the
"rotate half" layout of Hugging Face's Llama: head dims ``j`` and ``j + d_h/2`` form a rotated
pair at angle ``t θ^{-2j/d_h}``. Norms are LayerNorm (two-pass variance) or RMSNorm
(``x / sqrt(mean(x²) + ε) * scale``).

Parameter names and layouts (``docs/transformers.md``; Flax kernels are ``(in, out)``):

======================================  ====================  ==========================================
ours                                     shape                 notes
======================================  ====================  ==========================================
``embed/embedding``                      ``(V, D)``            token embeddings
``pos/embedding``                        ``(C, D)``            ``positions="learned"`` only
``blocks/{i}/ln1/scale``, ``bias``       ``(D,)``              ``norm="rms"``: scale only
``blocks/{i}/attn/{query,key,value}``    ``(D, H*Dh)``, bias   head ``a`` is columns ``a*Dh:(a+1)*Dh``
``blocks/{i}/attn/out/kernel``           ``(H*Dh, D)``, bias
``blocks/{i}/ln2/...``                   ``(D,)``
``blocks/{i}/mlp/fc/kernel``             ``(D, F)``, bias      ``mlp="gated"``: Llama's ``up_proj``
``blocks/{i}/mlp/gate/kernel``           ``(D, F)``, bias      ``mlp="gated"`` only
``blocks/{i}/mlp/proj/kernel``           ``(F, D)``, bias
``ln_f/scale``, ``bias``                 ``(D,)``
``head/kernel``                          ``(D, V)``            ``tied=False`` only (tied: ``h @ embed.T``)
======================================  ====================  ==========================================

(``bias=False`` drops every attention and MLP bias, as Llama has none.) The mapping onto Hugging Face's
GPT-2 / Llama names is :mod:`landscape.models.hf`. ``permutation_spec()`` is
:func:`landscape.align.trace_spec` of the model itself (residual stream, attention heads with their
within-head groups, MLP units), not a hand-written table.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from landscape.models import GPT
    >>> model = GPT(32, 8, 16, 2, 2, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((3, 5), jnp.int32)).shape
    (3, 5, 32)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from landscape._types import Array
from landscape.align.spec import PermutationSpec
from landscape.models.base import Taps, ZooModel, as_float, check_rngs
from landscape.models.functional import _Layout

__all__ = [
    "GPT",
    "MLP_KINDS",
    "POOLS",
    "POSITIONS",
    "TRANSFORMER_NORMS",
    "ViT",
    "check_tokens",
    "rotary",
]

TRANSFORMER_NORMS = ("layer", "rms")
"""Accepted ``norm`` settings: LayerNorm (scale and bias) or RMSNorm (scale only)."""

POSITIONS = ("learned", "rotary")
"""Accepted ``positions`` settings of :class:`GPT`."""

MLP_KINDS = ("gelu", "gated")
"""Accepted ``mlp`` settings: GPT-2's ``proj(gelu_tanh(fc x))`` or Llama's ``proj(silu(gate x) * fc x)``."""

POOLS = ("cls", "mean")
"""Accepted ``pool`` settings of :class:`ViT`."""

_INIT_STD = 0.02  # GPT-2's initializer_range, for embeddings


def _positive_int(model: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        msg = f"{model} {name} must be a positive int, got {value!r}"
        raise ValueError(msg)


def _choice(model: str, name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        msg = f"{model} {name}={value!r} is unknown; accepted: {list(accepted)}"
        raise ValueError(msg)


def _make_norm(norm: str, width: int, eps: float, *, rngs: nnx.Rngs) -> nnx.Module:
    if norm == "rms":
        return nnx.RMSNorm(width, epsilon=eps, use_fast_variance=False, rngs=rngs)
    return nnx.LayerNorm(width, epsilon=eps, use_fast_variance=False, rngs=rngs)


def rotary(x: Array, theta: float) -> Array:
    """Rotary position embedding of ``x`` ``(N, T, H, Dh)`` in Llama's "rotate half" layout.

    ``out = x * cos(t ω) + rotate_half(x) * sin(t ω)`` with ``ω_j = θ^{-2j/Dh}`` repeated over the two
    halves and ``rotate_half([x1, x2]) = [-x2, x1]`` (Su et al., arXiv:2104.09864; Hugging Face's
    ``apply_rotary_pos_emb``). Angles are computed in float32 (float64 for float64 ``x``).
    """
    t, dh = x.shape[1], x.shape[-1]
    ftype = jnp.promote_types(x.dtype, jnp.float32)
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=ftype) / dh))
    angles = jnp.arange(t, dtype=ftype)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([angles, angles], axis=-1)  # (T, Dh)
    cos, sin = jnp.cos(emb).astype(x.dtype)[None, :, None, :], jnp.sin(emb).astype(x.dtype)[None, :, None, :]
    x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def check_tokens(x: Any, *, vocab_size: int, context: int) -> tuple[Array, Array | None]:
    """Validate GPT inputs and split them into ``(ids, attention_mask or None)``.

    Shapes and dtypes are checked always (at trace time under ``jax.jit``); values (ids in
    ``[0, vocab_size)``, mask entries in ``{0, 1}``) only when the arrays are concrete, i.e. when this
    is called outside ``jit`` — call it on a batch before jitting to get the value checks. Inside
    ``jit`` an id outside the vocabulary cannot raise: its embedding row is ``NaN``, so the logits
    of that sequence are ``NaN`` (every position: attention multiplies the ``NaN`` values by their
    weights, ``0 * NaN = NaN``) rather than silently wrapped or clipped.

    Raises:
        ValueError: ``x`` is not ``(N, T)`` integer ids or ``{"input_ids", "attention_mask"}``;
            ``T > context``; the mask's shape differs from the ids'; an id outside the vocabulary
            or a mask value other than 0/1 (concrete inputs) — naming the shape or value.
    """
    mask = None
    if isinstance(x, dict):
        unknown = sorted(set(x) - {"input_ids", "attention_mask"})
        if unknown or "input_ids" not in x:
            msg = f"GPT input dict needs 'input_ids' (and optionally 'attention_mask'), got keys {sorted(x)}"
            raise ValueError(msg)
        ids, mask = x["input_ids"], x.get("attention_mask")
    else:
        ids = x
    ids = jnp.asarray(ids) if not isinstance(ids, jax.core.Tracer) else ids
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        msg = f"GPT expects integer token ids of shape (N, T), got shape {tuple(ids.shape)} and dtype {ids.dtype}"
        raise ValueError(msg)
    if ids.shape[1] > context:
        msg = (
            f"GPT input has {ids.shape[1]} tokens per sequence (ids shape {tuple(ids.shape)}), "
            f"more than its context {context}"
        )
        raise ValueError(msg)
    if ids.shape[1] == 0:
        msg = f"GPT input has no tokens (ids shape {tuple(ids.shape)})"
        raise ValueError(msg)
    if mask is not None:
        mask = jnp.asarray(mask) if not isinstance(mask, jax.core.Tracer) else mask
        if tuple(mask.shape) != tuple(ids.shape):
            msg = (
                f"attention_mask has shape {tuple(mask.shape)}, the input_ids have shape {tuple(ids.shape)}; "
                "they must be equal"
            )
            raise ValueError(msg)
        if not isinstance(mask, jax.core.Tracer):
            m = np.asarray(mask)
            bad = ~((m == 0) | (m == 1))
            if bad.any():
                msg = f"attention_mask must hold only 0 and 1, got {m[bad].flat[0].item()!r} (shape {m.shape})"
                raise ValueError(msg)
    if not isinstance(ids, jax.core.Tracer) and ids.size:
        a = np.asarray(ids)
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= vocab_size:
            where = np.argwhere((a < 0) | (a >= vocab_size))[0]
            msg = (
                f"token id {int(a[tuple(where)])} at position {tuple(int(i) for i in where)} of input_ids "
                f"(shape {a.shape}) is outside the vocabulary [0, {vocab_size})"
            )
            raise ValueError(msg)
    return ids, mask


class _Attention(nnx.Module):
    def __init__(self, width: int, heads: int, head_dim: int, bias: bool, *, rngs: nnx.Rngs) -> None:
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.query = nnx.Linear(width, inner, use_bias=bias, rngs=rngs)
        self.key = nnx.Linear(width, inner, use_bias=bias, rngs=rngs)
        self.value = nnx.Linear(width, inner, use_bias=bias, rngs=rngs)
        self.out = nnx.Linear(inner, width, use_bias=bias, rngs=rngs)


class _FeedForward(nnx.Module):
    def __init__(self, width: int, hidden: int, kind: str, bias: bool, *, rngs: nnx.Rngs) -> None:
        self.kind = kind
        self.fc = nnx.Linear(width, hidden, use_bias=bias, rngs=rngs)
        if kind == "gated":
            self.gate = nnx.Linear(width, hidden, use_bias=bias, rngs=rngs)
        self.proj = nnx.Linear(hidden, width, use_bias=bias, rngs=rngs)


class _Block(nnx.Module):
    def __init__(
        self, width: int, heads: int, hidden: int, norm: str, eps: float, mlp: str, bias: bool, *, rngs: nnx.Rngs
    ) -> None:
        self.ln1 = _make_norm(norm, width, eps, rngs=rngs)
        self.attn = _Attention(width, heads, width // heads, bias, rngs=rngs)
        self.ln2 = _make_norm(norm, width, eps, rngs=rngs)
        self.mlp = _FeedForward(width, hidden, mlp, bias, rngs=rngs)


def _attention(
    attn: _Attention,
    h: Array,
    *,
    causal: bool,
    mask: Array | None,
    rope_theta: float | None,
    prefix: str,
    taps: Taps | None,
) -> Array:
    """Multi-head self-attention of ``h`` ``(N, T, D)`` (module docstring)."""
    n, t, _ = h.shape
    if taps is not None:
        for name in ("query", "key", "value"):
            taps.layer_input(f"{prefix}/{name}/kernel", h)
    shape = (n, t, attn.heads, attn.head_dim)
    q, k, v = attn.query(h).reshape(shape), attn.key(h).reshape(shape), attn.value(h).reshape(shape)
    if rope_theta is not None:
        q, k = rotary(q, rope_theta), rotary(k, rope_theta)
    scores = jnp.einsum("nqhd,nkhd->nhqk", q, k) / jnp.sqrt(jnp.asarray(attn.head_dim, q.dtype))
    allowed = None
    if causal:
        allowed = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if mask is not None:
        keys = (mask != 0)[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
    if allowed is not None:
        scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, t, attn.heads * attn.head_dim)
    if taps is not None:
        taps.layer_input(f"{prefix}/out/kernel", o)
    return attn.out(o)


def _feed_forward(mlp: _FeedForward, h: Array, *, prefix: str, taps: Taps | None) -> Array:
    if taps is not None:
        taps.layer_input(f"{prefix}/fc/kernel", h)
        if mlp.kind == "gated":
            taps.layer_input(f"{prefix}/gate/kernel", h)
    if mlp.kind == "gated":
        u = jax.nn.silu(mlp.gate(h)) * mlp.fc(h)
    else:
        u = jax.nn.gelu(mlp.fc(h), approximate=True)
    if taps is not None:
        taps.layer_input(f"{prefix}/proj/kernel", u)
    return mlp.proj(u)


def _blocks(
    blocks: nnx.List, h: Array, *, causal: bool, mask: Array | None, rope_theta: float | None, taps: Taps | None
) -> Array:
    for i, block in enumerate(blocks):
        prefix = f"blocks/{i}"
        a = block.ln1(h)
        h = h + _attention(
            block.attn, a, causal=causal, mask=mask, rope_theta=rope_theta, prefix=f"{prefix}/attn", taps=taps
        )
        h = h + _feed_forward(block.mlp, block.ln2(h), prefix=f"{prefix}/mlp", taps=taps)
    return h


def _check_common(model: str, width: int, depth: int, heads: int, mlp_ratio: int, norm: str, eps: float) -> None:
    for name, v in (("width", width), ("depth", depth), ("heads", heads), ("mlp_ratio", mlp_ratio)):
        _positive_int(model, name, v)
    if width % heads:
        msg = f"{model} width {width} is not divisible by heads {heads} (head_dim = width // heads)"
        raise ValueError(msg)
    _choice(model, "norm", norm, TRANSFORMER_NORMS)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        msg = f"{model} norm_eps must be a positive float, got {eps!r}"
        raise ValueError(msg)


def _own_function(model: ZooModel) -> tuple[Any, dict[str, Any]]:
    """``(apply_fn, params)``: ``model`` as a pure function of its params, built from ``nnx.split``.

    (``models.functional`` calls ``permutation_spec``, so the spec cannot come from it.) Works on an
    abstract module from ``nnx.eval_shape`` and inside a trace (the params may be tracers).
    """
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    layout = _Layout.of(params_state)

    def apply_fn(params: Any, xb: Any) -> Array:
        return nnx.merge(graphdef, layout.to_state(params, "params"), rest).forward(xb)

    return apply_fn, layout.pure(params_state)


def _traced_spec(model: ZooModel, x: Array) -> PermutationSpec:
    """``landscape.align.trace_spec`` of ``model``'s own function on the dummy batch ``x`` (shapes only)."""
    from landscape.align.trace import trace_spec  # landscape.align imports landscape.models

    apply_fn, params = _own_function(model)
    return trace_spec(apply_fn, params, x)


def _record_units(model: ZooModel, x: Any, taps: Taps) -> None:
    """Fill ``taps.pre`` / ``taps.post`` with :func:`landscape.align.activations` of the model's own function.

    The unit groups of a transformer (the residual stream, attention heads with their within-head
    groups, the MLP units) are the traced spec's, so their activations are the tracer's too, keyed
    by the same names (``apply_fn.spec``): activation matching, REPAIR and TACT work on the zoo
    model exactly as on any traced ``apply_fn``.
    """
    from landscape.align.trace import activations

    apply_fn, params = _own_function(model)
    spec = model.permutation_spec()
    for kind in ("pre", "post"):
        getattr(taps, kind).update(activations(apply_fn, params, x, spec=spec, kind=kind))


class GPT(ZooModel):
    """GPT-style causal decoder: token (+ learned position) embeddings, pre-norm blocks, unembedding.

    Args:
        vocab_size: ``V``, the number of token ids.
        context: ``C``, the longest sequence accepted (and the rows of ``pos/embedding``).
        width: ``D``, the residual stream width.
        depth: number of blocks.
        heads: ``H``; ``head_dim = width // heads`` (``width`` must be divisible by ``heads``).
        mlp_ratio: ``F = mlp_ratio * D`` hidden units in each MLP (unless ``mlp_width`` is given).
        mlp_width: ``F`` directly (e.g. Llama's ``intermediate_size``).
        tied: unembed with the token embeddings (``logits = h @ embed.T``, GPT-2) or with a separate
            ``head/kernel`` ``(D, V)`` (no bias).
        positions: ``"learned"`` (GPT-2: ``pos/embedding`` ``(C, D)`` added to the tokens) or
            ``"rotary"`` (Llama: queries and keys rotated, no position params).
        rope_theta: the rotary base ``θ`` (Llama's ``rope_theta``, default 10000).
        norm: ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm).
        norm_eps: the norms' ``ε`` (GPT-2: 1e-5, Llama: ``rms_norm_eps``).
        mlp: ``"gelu"`` (GPT-2, tanh-approximate GELU) or ``"gated"`` (SwiGLU, Llama).
        bias: whether attention and MLP layers have biases (GPT-2 yes, Llama no).
        rngs: ``nnx.Rngs`` for the initialisation (embeddings ``N(0, 0.02²)``, LeCun-normal kernels).

    Input: integer ids ``(N, T)`` with ``T <= context``, or ``{"input_ids": (N, T), "attention_mask":
    (N, T)}`` with 0/1 entries (keys with 0 are excluded from every query's softmax; positions are
    ``0..T-1`` regardless of the mask, as ``transformers`` does without ``position_ids``). Output:
    logits ``(N, T, V)``. See :func:`check_tokens` for which checks run where.

    Params: module docstring. No state. Intermediates (``"input"``): the input of every dense layer
    keyed by its kernel path: ``blocks/{i}/attn/{query,key,value}/kernel`` get ``ln1(h)``,
    ``attn/out/kernel`` the concatenated heads ``(N, T, H*Dh)``, ``mlp/{fc,gate}/kernel`` ``ln2(h)``,
    ``mlp/proj/kernel`` the MLP hidden units ``(N, T, F)``, and ``head/kernel`` (untied) ``ln_f(h)``.
    ``"pre"`` / ``"post"``: :func:`landscape.align.activations` of the model at every group of
    :meth:`permutation_spec` (e.g. queries and keys stacked ``(N, 2, T, H*Dh)`` for a head group).
    """

    def __init__(
        self,
        vocab_size: int,
        context: int,
        width: int,
        depth: int,
        heads: int,
        *,
        mlp_ratio: int = 4,
        mlp_width: int | None = None,
        tied: bool = True,
        positions: str = "learned",
        rope_theta: float = 10000.0,
        norm: str = "layer",
        norm_eps: float = 1e-5,
        mlp: str = "gelu",
        bias: bool = True,
        rngs: nnx.Rngs,
    ) -> None:
        check_rngs(rngs, "GPT")
        _positive_int("GPT", "vocab_size", vocab_size)
        _positive_int("GPT", "context", context)
        _check_common("GPT", width, depth, heads, mlp_ratio, norm, norm_eps)
        _choice("GPT", "positions", positions, POSITIONS)
        _choice("GPT", "mlp", mlp, MLP_KINDS)
        if mlp_width is not None:
            _positive_int("GPT", "mlp_width", mlp_width)
        if not isinstance(tied, bool) or not isinstance(bias, bool):
            msg = f"GPT tied and bias must be bools, got tied={tied!r}, bias={bias!r}"
            raise TypeError(msg)
        if positions == "rotary" and (width // heads) % 2:
            msg = f"GPT rotary positions need an even head_dim, got width {width} // heads {heads} = {width // heads}"
            raise ValueError(msg)
        if not isinstance(rope_theta, (int, float)) or not rope_theta > 0:
            msg = f"GPT rope_theta must be a positive number, got {rope_theta!r}"
            raise ValueError(msg)
        self.vocab_size, self.context, self.width, self.depth, self.heads = vocab_size, context, width, depth, heads
        self.hidden = mlp_width if mlp_width is not None else mlp_ratio * width
        self.tied, self.positions, self.rope_theta = tied, positions, float(rope_theta)
        self.norm, self.norm_eps, self.mlp, self.bias = norm, float(norm_eps), mlp, bias
        init = nnx.initializers.normal(_INIT_STD)
        self.embed = nnx.Embed(vocab_size, width, embedding_init=init, rngs=rngs)
        if positions == "learned":
            self.pos = nnx.Embed(context, width, embedding_init=init, rngs=rngs)
        self.blocks = nnx.List(
            [_Block(width, heads, self.hidden, norm, self.norm_eps, mlp, bias, rngs=rngs) for _ in range(depth)]
        )
        self.ln_f = _make_norm(norm, width, self.norm_eps, rngs=rngs)
        if not tied:
            self.head = nnx.Linear(width, vocab_size, use_bias=False, rngs=rngs)

    def forward(self, x: Any, *, train: bool | None = None, taps: Taps | None = None) -> Array:
        """Logits ``(N, T, V)`` for ids ``(N, T)`` or ``{"input_ids", "attention_mask"}``."""
        del train  # no BatchNorm or dropout
        ids, mask = check_tokens(x, vocab_size=self.vocab_size, context=self.context)
        if taps is not None:
            _record_units(self, x, taps)
        table = self.embed.embedding[...]
        valid = (ids >= 0) & (ids < self.vocab_size)
        # out-of-vocabulary ids (only possible under jit, see check_tokens) give NaN rows
        h = jnp.take(table, jnp.where(valid, ids, self.vocab_size), axis=0, mode="fill", fill_value=jnp.nan)
        if self.positions == "learned":
            h = h + jnp.take(self.pos.embedding[...], jnp.arange(ids.shape[1]), axis=0)[None]
        h = _blocks(
            self.blocks,
            h,
            causal=True,
            mask=mask,
            rope_theta=self.rope_theta if self.positions == "rotary" else None,
            taps=taps,
        )
        h = self.ln_f(h)
        if self.tied:
            return h @ table.T.astype(h.dtype)
        if taps is not None:
            taps.layer_input("head/kernel", h)
        return self.head(h)

    def permutation_spec(self) -> PermutationSpec:
        """The spec :func:`landscape.align.trace_spec` derives from this model (``P_0, P_1, ...``).

        Traced on a dummy batch of ``(2, min(context, 3))`` ids; the position axis of ``pos/embedding``
        (like the vocabulary axis of ``embed/embedding``) is unpermuted, its feature axis follows the
        residual stream.
        """
        return _traced_spec(self, jnp.zeros((2, min(self.context, 3)), jnp.int32))


class ViT(ZooModel):
    """Vision Transformer: patch embedding, class token or mean pooling, pre-norm blocks, dense head.

    Args:
        image_size: the side of the square input images.
        patch_size: the side of each patch (``image_size`` must be divisible by it); ``P =
            (image_size / patch_size)²`` patches.
        channels: ``C``, the image channels.
        width, depth, heads, mlp_ratio: as :class:`GPT`.
        num_classes: ``K`` outputs.
        pool: ``"cls"`` (a learned class token ``cls`` ``(1, 1, D)`` prepended; its final state is
            classified) or ``"mean"`` (the mean over patches).
        norm, norm_eps: as :class:`GPT` (default LayerNorm, ``ε = 1e-6`` as the original ViT).
        rngs: ``nnx.Rngs``.

    Params: ``patch/kernel`` ``(p, p, C, D)`` and ``patch/bias`` (a stride-``p`` conv), ``cls``
    (``pool="cls"``), ``pos/embedding`` ``(P (+1), D)`` (the class token's row first),
    ``blocks/{i}/...`` exactly as :class:`GPT`'s (attention not causal, GELU MLP, biases),
    ``ln_f/*``, ``head/kernel`` ``(D, K)``, ``head/bias``.
    Input: NHWC images ``(N, image_size, image_size, C)``; ``(N, image_size, image_size)`` when
    ``C == 1``; or flattened rows ``(N, image_size² C)`` (MNIST-style), reshaped row-major to
    ``(N, image_size, image_size, C)``. Output: logits ``(N, K)``.
    Intermediates (``"input"``): ``patch/kernel`` gets the NHWC image, the blocks' layers as the
    GPT's, ``head/kernel`` the pooled features ``(N, D)``; ``"pre"`` / ``"post"`` as the GPT's.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        channels: int,
        width: int,
        depth: int,
        heads: int,
        num_classes: int,
        *,
        mlp_ratio: int = 4,
        pool: str = "cls",
        norm: str = "layer",
        norm_eps: float = 1e-6,
        rngs: nnx.Rngs,
    ) -> None:
        check_rngs(rngs, "ViT")
        for name, v in (
            ("image_size", image_size),
            ("patch_size", patch_size),
            ("channels", channels),
            ("num_classes", num_classes),
        ):
            _positive_int("ViT", name, v)
        if image_size % patch_size:
            msg = f"ViT image_size {image_size} is not divisible by patch_size {patch_size}"
            raise ValueError(msg)
        _check_common("ViT", width, depth, heads, mlp_ratio, norm, norm_eps)
        _choice("ViT", "pool", pool, POOLS)
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        self.width, self.depth, self.heads, self.num_classes = width, depth, heads, num_classes
        self.pool, self.norm, self.norm_eps = pool, norm, float(norm_eps)
        self.num_patches = (image_size // patch_size) ** 2
        p = patch_size
        self.patch = nnx.Conv(channels, width, (p, p), strides=p, padding="VALID", rngs=rngs)
        init = nnx.initializers.normal(_INIT_STD)
        if pool == "cls":
            self.cls = nnx.Param(jnp.zeros((1, 1, width), jnp.float32))
        self.pos = nnx.Embed(self.num_patches + (pool == "cls"), width, embedding_init=init, rngs=rngs)
        self.blocks = nnx.List(
            [
                _Block(width, heads, mlp_ratio * width, norm, self.norm_eps, "gelu", True, rngs=rngs)
                for _ in range(depth)
            ]
        )
        self.ln_f = _make_norm(norm, width, self.norm_eps, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def _images(self, x: Any) -> Array:
        x = as_float(x)
        s, c = self.image_size, self.channels
        if x.ndim == 2 and x.shape[1] == s * s * c:
            return x.reshape(x.shape[0], s, s, c)
        if x.ndim == 3 and c == 1 and x.shape[1:] == (s, s):
            return x[..., None]
        if x.ndim == 4 and x.shape[1:] == (s, s, c):
            return x
        msg = (
            f"ViT expects images (N, {s}, {s}, {c}) (or flattened rows (N, {s * s * c})), got shape {tuple(x.shape)}"
        )
        raise ValueError(msg)

    def forward(self, x: Any, *, train: bool | None = None, taps: Taps | None = None) -> Array:
        """Logits ``(N, num_classes)`` for images (see the class docstring for accepted shapes)."""
        del train
        x = self._images(x)
        if taps is not None:
            _record_units(self, x, taps)
            taps.layer_input("patch/kernel", x)
        z = self.patch(x)
        n = z.shape[0]
        h = z.reshape(n, self.num_patches, self.width)
        if self.pool == "cls":
            h = jnp.concatenate([jnp.broadcast_to(self.cls[...].astype(h.dtype), (n, 1, self.width)), h], axis=1)
        h = h + self.pos.embedding[...][None]
        h = _blocks(self.blocks, h, causal=False, mask=None, rope_theta=None, taps=taps)
        h = self.ln_f(h)
        pooled = h[:, 0] if self.pool == "cls" else jnp.mean(h, axis=1)
        if taps is not None:
            taps.layer_input("head/kernel", pooled)
        return self.head(pooled)

    def permutation_spec(self) -> PermutationSpec:
        """The spec :func:`landscape.align.trace_spec` derives from this model, traced on 2 blank images."""
        return _traced_spec(self, jnp.zeros((2, self.image_size, self.image_size, self.channels)))

"""Attention-aware alignment (issue 13 part 4): traced head structure, blockwise matching, REPAIR/TACT.

The models are plain-JAX GPT / ViT functions following the zoo transformer contract
(``/tmp/team/transformer_contract.md``: parameter names, pre-LN blocks, ``(D, H·Dh)`` projections
reshaped to ``(N, T, H, Dh)``), so the tests do not depend on the zoo module.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape import Objective, align, merge

V, C, D, H, DEPTH = 16, 8, 8, 2, 2
DH = D // H


# ---------------------------------------------------------------------------------- models
def _dense(rng, d_in, d_out):
    return {"kernel": rng.normal(size=(d_in, d_out)) / d_in**0.5, "bias": 0.1 * rng.normal(size=(d_out,))}


def _norm(rng, d, rms):
    out = {"scale": 1.0 + 0.1 * rng.normal(size=(d,))}
    if not rms:
        out["bias"] = 0.1 * rng.normal(size=(d,))
    return out


def _block(rng, rms):
    return {
        "ln1": _norm(rng, D, rms),
        "attn": {m: _dense(rng, D, D) for m in ("query", "key", "value", "out")},
        "ln2": _norm(rng, D, rms),
        "mlp": {"fc": _dense(rng, D, 4 * D), "proj": _dense(rng, 4 * D, D)},
    }


def _f32(p):
    return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), p)


def gpt_init(seed, *, tied=True, positions="learned", rms=False):
    rng = np.random.default_rng(seed)
    p = {"embed": {"embedding": rng.normal(size=(V, D))}, "blocks": {str(i): _block(rng, rms) for i in range(DEPTH)}, "ln_f": _norm(rng, D, rms)}
    if positions == "learned":
        p["pos"] = {"embedding": 0.5 * rng.normal(size=(C, D))}
    if not tied:
        p["head"] = {"kernel": rng.normal(size=(D, V)) / D**0.5}
    return _f32(p)


def _apply_norm(p, x):
    if "bias" in p:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]
    return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * p["scale"]


def _rope(x):
    """Rotary positions (GPT-NeoX / Llama layout: coordinate d rotates with d + Dh/2)."""
    t, half = x.shape[1], x.shape[-1] // 2
    freqs = 1.0 / (10000.0 ** (jnp.arange(half) / half))
    ang = jnp.arange(t)[:, None] * freqs[None, :]
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _attention(p, h, *, causal, rotary):
    n, t, _ = h.shape
    q, k, v = ((h @ p[m]["kernel"] + p[m]["bias"]).reshape(n, t, H, -1) for m in ("query", "key", "value"))
    if rotary:
        q, k = _rope(q), _rope(k)
    s = jnp.einsum("nthd,nshd->nhts", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    if causal:
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
    o = jnp.einsum("nhts,nshd->nthd", jax.nn.softmax(s, axis=-1), v).reshape(n, t, -1)
    return o @ p["out"]["kernel"] + p["out"]["bias"]


def _blocks(p, h, *, causal, rotary):
    for i in range(DEPTH):
        b = p["blocks"][str(i)]
        h = h + _attention(b["attn"], _apply_norm(b["ln1"], h), causal=causal, rotary=rotary)
        m = b["mlp"]
        h = h + jax.nn.gelu(_apply_norm(b["ln2"], h) @ m["fc"]["kernel"] + m["fc"]["bias"]) @ m["proj"]["kernel"] + m["proj"]["bias"]
    return _apply_norm(p["ln_f"], h)


@functools.partial(jax.jit, static_argnames=("rotary",))
def gpt_apply(p, ids, *, rotary=False):
    h = p["embed"]["embedding"][ids]
    if "pos" in p:
        h = h + p["pos"]["embedding"][: ids.shape[1]]
    h = _blocks(p, h, causal=True, rotary=rotary)
    return h @ (p["head"]["kernel"] if "head" in p else p["embed"]["embedding"].T)


IMG, PATCH, K = 8, 4, 3


def vit_init(seed):
    rng = np.random.default_rng(seed)
    return _f32({
        "patch": {"kernel": rng.normal(size=(PATCH, PATCH, 1, D)) / PATCH, "bias": 0.1 * rng.normal(size=(D,))},
        "cls": 0.5 * rng.normal(size=(1, 1, D)),
        "pos": {"embedding": 0.5 * rng.normal(size=((IMG // PATCH) ** 2 + 1, D))},
        "blocks": {str(i): _block(rng, False) for i in range(DEPTH)},
        "ln_f": _norm(rng, D, False),
        "head": _dense(rng, D, K),
    })


@jax.jit
def vit_apply(p, x):
    h = jax.lax.conv_general_dilated(x, p["patch"]["kernel"], (PATCH, PATCH), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = (h + p["patch"]["bias"]).reshape(x.shape[0], -1, D)
    h = jnp.concatenate([jnp.broadcast_to(p["cls"], (x.shape[0], 1, D)), h], axis=1) + p["pos"]["embedding"]
    h = _blocks(p, h, causal=False, rotary=False)
    return h[:, 0] @ p["head"]["kernel"] + p["head"]["bias"]


IDS = jax.random.randint(jax.random.key(5), (6, C), 0, V)
IMAGES = jax.random.normal(jax.random.key(6), (5, IMG, IMG, 1))
GPT_SETTINGS = {
    "learned-tied": ({}, {}),
    "rotary-untied-rms": ({"tied": False, "positions": "rotary", "rms": True}, {"rotary": True}),
}


def _gpt(setting, seed=0):
    init_kw, apply_kw = GPT_SETTINGS[setting]
    return gpt_init(seed, **init_kw), functools.partial(gpt_apply, **apply_kw)


@functools.cache
def _traced(setting):
    p, fn = _gpt(setting)
    return align.trace_spec(fn, p, IDS)


_apply_perm = jax.jit(align.apply, static_argnums=0)  # one compilation instead of one per leaf op
_random_perm = jax.jit(align.random_permutation, static_argnums=1)


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _np_lerp(a, b, t):
    return jax.tree.map(lambda u, v: jnp.asarray((1 - t) * np.asarray(u) + t * np.asarray(v), jnp.float32), a, b)


# ---------------------------------------------------------------------------------- traced specs
def test_traced_gpt_spec_has_heads_residual_and_tied_embedding():
    spec = _traced("learned-tied")
    ax = spec.axes
    res = ax["embed/embedding"][1]
    # one residual permutation: embeddings (D axis), positions, every norm, every projection into / out of it
    for path in ("pos/embedding", "ln_f/scale", "ln_f/bias", "blocks/1/ln2/bias", "blocks/0/attn/out/bias", "blocks/1/mlp/proj/bias"):
        assert ax[path][-1] == res
    assert ax["embed/embedding"][0] is None and ax["pos/embedding"][0] is None  # vocabulary and positions
    for i in range(DEPTH):
        b = f"blocks/{i}/attn"
        qk, vo = ax[f"{b}/query/kernel"][1], ax[f"{b}/value/kernel"][1]
        assert ax[f"{b}/key/kernel"] == (res, qk) and ax[f"{b}/key/bias"] == (qk,)  # q and k share
        assert ax[f"{b}/out/kernel"] == (vo, res) and ax[f"{b}/value/bias"] == (vo,)  # v and out share
        assert spec.blocks[qk][1:] == (DH, "free") and spec.blocks[vo][1:] == (DH, "free")
        assert spec.blocks[qk][0] == spec.blocks[vo][0]  # one head permutation per layer
        assert ax[f"blocks/{i}/mlp/fc/kernel"][0] == res and ax[f"blocks/{i}/mlp/fc/kernel"][1] not in (res, qk, vo)
    assert len(spec.heads) == DEPTH
    assert _round_trips(spec)  # to_dict, rename and match_names keep the blocks


def _round_trips(spec):
    back = align.PermutationSpec.from_dict(spec.to_dict())
    renamed = align.rename(spec, {n: f"g{n}" for n in spec.names}, {h: f"heads{h}" for h in spec.heads})
    return back == spec and hash(back) == hash(spec) and align.match_names(renamed, spec) == spec and renamed != spec


def test_rotary_fixes_the_query_key_order_inside_heads():
    spec = _traced("rotary-untied-rms")
    ax = spec.axes
    for i in range(DEPTH):
        b = f"blocks/{i}/attn"
        assert spec.blocks[ax[f"{b}/query/kernel"][1]][1:] == (DH, "fixed")
        assert spec.blocks[ax[f"{b}/key/kernel"][1]][1:] == (DH, "fixed")
        assert spec.blocks[ax[f"{b}/value/kernel"][1]][1:] == (DH, "free")
        heads = {spec.blocks[ax[f"{b}/{m}/kernel"][1]][0] for m in ("query", "key", "value")}
        assert len(heads) == 1  # queries, keys and values share the head permutation
    assert ax["head/kernel"] == (ax["embed/embedding"][1], None)  # untied unembedding: vocab not permuted
    assert "pos/embedding" not in ax


@pytest.mark.parametrize("setting", [*GPT_SETTINGS, "vit"])
def test_random_permutation_under_traced_spec_keeps_logits(setting):
    if setting == "vit":
        p, fn, x = vit_init(0), vit_apply, IMAGES
        spec = align.trace_spec(fn, p, x)
        assert spec.axes["cls"][-1] == spec.axes["patch/kernel"][-1] == spec.axes["head/kernel"][0]
        assert spec.axes["head/bias"] == (None,) and len(spec.heads) == DEPTH
    else:
        (p, fn), x, spec = _gpt(setting), IDS, _traced(setting)
    ref = fn(p, x)
    for seed in range(2):
        perm = _random_perm(jax.random.key(seed), spec, p)
        align.check_blocks(spec, perm)
        q = _apply_perm(spec, perm, p)
        assert _max_diff(q, p) > 0.1  # the weights moved
        assert float(jnp.max(jnp.abs(fn(q, x) - ref))) < 1e-5
        back = _apply_perm(spec, align.invert(perm), q)
        assert _max_diff(back, p) == 0.0


def test_zoo_gpt_traced_spec_equals_the_plain_jax_spec_and_keeps_logits():
    from landscape import models

    m = models.build("gpt", jax.random.key(0), vocab_size=V, context=C, width=D, depth=DEPTH, heads=H)
    fm, p, _ = models.functional(m)
    ids = IDS[:, :5]  # shorter than the context: positions[:T] is read by index, its axis fixed
    spec = align.trace_spec(fm, p, ids)
    assert spec == _traced("learned-tied")  # same parameter names and layout as the contract
    assert fm.spec == spec  # the zoo's permutation_spec() is this traced spec
    perm = _random_perm(jax.random.key(1), spec, p)
    logits = jax.jit(lambda q: fm(q, ids))
    assert float(jnp.max(jnp.abs(logits(_apply_perm(spec, perm, p)) - logits(p)))) < 1e-5


def test_check_spec_catches_wrong_attention_specs():
    p, fn = _gpt("learned-tied")
    spec = _traced("learned-tied")
    align.check_spec(spec, p, apply_fn=fn, x=IDS)
    qk = spec.axes["blocks/0/attn/query/kernel"][1]
    axes = dict(spec.axes)
    # keys with their own within-head permutation: q·k no longer contracts matching coordinates
    axes["blocks/0/attn/key/kernel"] = (axes["blocks/0/attn/key/kernel"][0], "K")
    axes["blocks/0/attn/key/bias"] = ("K",)
    wrong = align.PermutationSpec(axes, blocks={**spec.blocks, "K": spec.blocks[qk]})
    with pytest.raises(ValueError, match="does not describe apply_fn"):
        align.check_spec(wrong, p, apply_fn=fn, x=IDS)
    # the head split ignored: an unconstrained permutation of the H·Dh units mixes heads
    flat = align.PermutationSpec(spec.axes, blocks={k: v for k, v in spec.blocks.items() if k != qk})
    with pytest.raises(ValueError, match="does not describe apply_fn"):
        align.check_spec(flat, p, apply_fn=fn, x=IDS)
    # a permutation that is not blockwise is refused by apply
    perm = align.identity(spec, p)
    perm[qk] = jnp.asarray([0, 4, 2, 3, 1, 5, 6, 7], jnp.int32)
    with pytest.raises(ValueError, match=f"{qk}.*not blockwise"):
        align.apply(spec, perm, p)
    with pytest.raises(ValueError, match="not a multiple"):
        align.PermutationSpec({"w": (None, "a")}, blocks={"a": ("h", 3, "free")}).sizes({"w": jnp.ones((2, 8))})
    with pytest.raises(ValueError, match="inner"):
        align.PermutationSpec({"w": (None, "a")}, blocks={"a": ("h", 4, "mixed")})


# ---------------------------------------------------------------------------------- matching
def test_blockwise_assignment_equals_brute_force():
    import itertools

    rng = np.random.default_rng(0)
    heads, block = 3, 2
    n = heads * block
    costs = [rng.normal(size=(n, n)) for _ in range(2)]
    inner = ["free", "fixed"]
    perms, value = align.blockwise_assignment(costs, block, inner)
    best = -np.inf
    for sigma in itertools.permutations(range(heads)):
        taus = itertools.product(itertools.permutations(range(block)), repeat=heads)
        for tau in taus:
            flat0 = np.array([sigma[h] * block + tau[h][d] for h in range(heads) for d in range(block)])
            flat1 = np.array([sigma[h] * block + d for h in range(heads) for d in range(block)])
            best = max(best, costs[0][np.arange(n), flat0].sum() + costs[1][np.arange(n), flat1].sum())
    got = sum(c[np.arange(n), q].sum() for c, q in zip(costs, perms))
    assert value == pytest.approx(best, abs=1e-12) and got == pytest.approx(best, abs=1e-12)
    assert np.array_equal(perms[1] % block, np.tile(np.arange(block), heads))  # fixed inner kept


@pytest.mark.parametrize("setting", list(GPT_SETTINGS))
def test_weight_matching_recovers_a_planted_gpt_permutation(setting):
    p, _ = _gpt(setting)
    spec = _traced(setting)
    planted = align.random_permutation(jax.random.key(3), spec, p)
    b = align.apply(spec, planted, p)
    perm, info = align.weight_matching(jax.random.key(4), spec, p, b)
    inv = align.invert(planted)
    assert info.converged and all(bool(jnp.all(perm[n] == inv[n])) for n in spec.names)
    assert _max_diff(align.apply(spec, perm, b), p) == 0.0


def test_activation_matching_recovers_a_planted_gpt_permutation():
    p, fn = _gpt("learned-tied")
    spec = _traced("learned-tied")
    planted = align.random_permutation(jax.random.key(3), spec, p)
    b = align.apply(spec, planted, p)
    ids = jax.random.randint(jax.random.key(9), (48, C), 0, V)
    obj = Objective(fn, ids, jnp.zeros(48, jnp.int32), batch_size=48)
    acts = jax.jit(lambda q: align.activations(fn, q, IDS, spec=spec, kind="post"))(p)
    qk = spec.axes["blocks/0/attn/query/kernel"][1]
    assert acts[qk].shape == (IDS.shape[0], 2, C, D)  # queries and keys stacked
    h = jax.jit(_apply_norm)(p["blocks"]["0"]["ln1"], p["embed"]["embedding"][IDS] + p["pos"]["embedding"])
    for j, m in enumerate(("query", "key")):
        proj = np.asarray(h) @ np.asarray(p["blocks"]["0"]["attn"][m]["kernel"]) + np.asarray(p["blocks"]["0"]["attn"][m]["bias"])
        np.testing.assert_allclose(acts[qk][:, j], proj, atol=1e-5)
    perm, info = align.activation_matching(spec, p, b, obj, apply_fn=fn)
    inv = align.invert(planted)
    assert all(bool(jnp.all(perm[n] == inv[n])) for n in spec.names)
    assert min(info.correlation.values()) > 0.999
    assert _max_diff(align.apply(spec, perm, b), p) == 0.0


# ---------------------------------------------------------------------------------- REPAIR / TACT
@functools.partial(jax.jit, static_argnames=("taps",))
def _moments_jit(params, ids, taps):
    out = taps.intermediates(params, ids)
    return {k: (v.reshape(-1, v.shape[-1]).mean(0), v.reshape(-1, v.shape[-1]).std(0)) for k, v in out.items()}


def _moments(fn, params, ids, layers, spec):
    """Per-unit mean and std of every layer's output, straight from the trace (one compilation)."""
    return _moments_jit(params, ids, align.LayerOutputs(fn, tuple(sorted(layers.items())), spec))


def test_repair_on_a_transformer_restores_the_layernorm_statistics():
    (a, fn), (b, _) = _gpt("learned-tied", 0), _gpt("learned-tied", 1)
    spec = _traced("learned-tied")
    layers = align.repair_layers(spec, a, shared="layers")
    res = spec.axes["ln_f/scale"][0]
    assert res not in layers and layers["blocks/1/ln2"] == ("blocks/1/ln2/scale", "blocks/1/ln2/bias")
    assert layers["blocks/0/attn/query"] == ("blocks/0/attn/query/kernel", "blocks/0/attn/query/bias")
    with pytest.raises(ValueError, match="no single layer"):
        align.repair_layers(spec, a)
    ids = jax.random.randint(jax.random.key(9), (32, C), 0, V)
    obj = Objective(fn, ids, jnp.zeros(32, jnp.int32), batch_size=32)
    mid = _np_lerp(a, b, 0.5)
    rep = align.repair(obj, fn, a, b, mid, t=0.5, spec=spec, layers=layers)
    assert jax.tree.structure(rep) == jax.tree.structure(a) and all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(rep))
    sa, sb, sm, sr = (_moments(fn, q, ids, layers, spec) for q in (a, b, mid, rep))
    for k in layers:  # every LayerNorm output and projection now has the interpolated statistics
        mu_t, sd_t = 0.5 * (sa[k][0] + sb[k][0]), 0.5 * (sa[k][1] + sb[k][1])
        assert float(jnp.max(jnp.abs(sr[k][0] - mu_t))) < 1e-4 and float(jnp.max(jnp.abs(sr[k][1] - sd_t))) < 1e-4
        assert float(jnp.max(jnp.abs(sm[k][1] - sd_t))) > 1e-2  # ... which the plain midpoint did not have
    assert _max_diff(align.repair(obj, fn, a, b, a, t=0.0, spec=spec, layers=layers), a) < 1e-5  # endpoint fixed


def test_tact_on_a_transformer_matches_each_expert():
    (a, fn), (b, _) = _gpt("learned-tied", 0), _gpt("learned-tied", 1)
    spec = _traced("learned-tied")
    ids = [jax.random.randint(jax.random.key(k), (16, C), 0, V) for k in (7, 8)]
    merged = merge.average([a, b])
    out = merge.tact(merged, [a, b], ids, apply_fn=fn, spec=spec, shared="layers")
    layers = align.repair_layers(spec, a, shared="layers")
    assert len(out) == 2
    for expert, x, q in zip((a, b), ids, out):
        assert jax.tree.structure(q) == jax.tree.structure(a)
        se, sq = _moments(fn, expert, x, layers, spec), _moments(fn, q, x, layers, spec)
        for k in ("blocks/0/ln1", "blocks/1/attn/key", "ln_f"):
            assert float(jnp.max(jnp.abs(sq[k][0] - se[k][0]))) < 1e-4
            assert float(jnp.max(jnp.abs(sq[k][1] - se[k][1]))) < 1e-4


def test_repair_on_a_resnet_residual_stream_corrects_every_norm():
    """Issue 10 item 5: REPAIR at every normalisation point of a ResNet (Jordan et al. 2022, arXiv:2211.08403)."""
    from landscape import models

    cfg = dict(in_channels=1, num_classes=3, base_width=4, blocks_per_stage=(1, 1), norm="batch")
    fa, a, _ = models.functional(models.build("resnet", jax.random.key(0), **cfg))
    rng = np.random.default_rng(1)  # a second model: A's weights perturbed (one NNX build is the slow part)
    b = jax.tree.map(lambda v: jnp.asarray(np.asarray(v) * (1 + 0.5 * rng.normal(size=v.shape)) + 0.2 * rng.normal(size=v.shape), jnp.float32), a)
    x = jax.random.normal(jax.random.key(2), (8, 6, 6, 1))
    layers = align.repair_layers(fa.spec, a, shared="layers")
    norms = {k for k, (s, _) in layers.items() if "norm" in s}
    assert "stem_norm" in layers and any(k.endswith("norm2") for k in layers)  # the streams' norms
    assert len(norms) == len(layers)  # every BatchNorm, none of them missed or doubled
    rep = align.repair(x, fa, a, b, _np_lerp(a, b, 0.5), t=0.5, layers=layers)
    sa, sb, sr = (_moments(fa, q, x, layers, fa.spec) for q in (a, b, rep))
    for k in layers:
        assert float(jnp.max(jnp.abs(sr[k][0] - 0.5 * (sa[k][0] + sb[k][0])))) < 1e-4
        assert float(jnp.max(jnp.abs(sr[k][1] - 0.5 * (sa[k][1] + sb[k][1])))) < 1e-4
    assert _max_diff(align.repair(x, fa, a, b, a, t=0.0, shared="layers"), a) < 1e-5  # endpoint unchanged

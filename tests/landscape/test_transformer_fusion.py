"""Tests for landscape.align.transformer_fusion (Imfeld et al. 2024, arXiv 2310.05719).

The models are built here from the zoo transformer contract's parameter names with a plain-JAX
forward pass (``gpt_apply``), so the tests check the fusion against an independent implementation
of the function the parameters compute; the zoo's GPT and ViT (``landscape.models``) are tested too.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape import align
from landscape.align.transformer_fusion import TransformerLayout

V, C, K, HEADS, DEPTH = 11, 6, 3, 2, 2


# ---------------------------------------------------------------------------- plain-JAX models
def layer_norm(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def dense(x, p):
    return x @ p["kernel"] + p["bias"]


def block(h, p, *, causal, acts, prefix):
    n, t, _ = h.shape
    x = layer_norm(h, p["ln1"])
    q, k, v = (dense(x, p["attn"][name]) for name in ("query", "key", "value"))
    if acts is not None:
        for name, y in (("query", q), ("key", k), ("value", v)):
            acts[f"{prefix}attn/{name}"] = y
    dq, dv = q.shape[-1] // HEADS, v.shape[-1] // HEADS
    q, k, v = q.reshape(n, t, HEADS, dq), k.reshape(n, t, HEADS, dq), v.reshape(n, t, HEADS, dv)
    s = jnp.einsum("nthd,nshd->nhts", q, k) / jnp.sqrt(dq)
    if causal:
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    o = jnp.einsum("nhts,nshd->nthd", jax.nn.softmax(s, axis=-1), v).reshape(n, t, HEADS * dv)
    h = h + dense(o, p["attn"]["out"])
    u = jax.nn.gelu(dense(layer_norm(h, p["ln2"]), p["mlp"]["fc"]), approximate=True)
    if acts is not None:
        acts[f"{prefix}mlp"] = u
    return h + dense(u, p["mlp"]["proj"])


def trunk(h, params, *, causal, acts):
    for i in range(DEPTH):
        if acts is not None:
            acts.setdefault("residual", []).append(h)
        h = block(h, params["blocks"][str(i)], causal=causal, acts=acts, prefix=f"blocks/{i}/")
    if acts is not None:
        acts["residual"] = jnp.concatenate(acts["residual"] + [h], axis=0)
    return layer_norm(h, params["ln_f"])


def gpt_apply(params, ids, acts=None):
    h = params["embed"]["embedding"][ids] + params["pos"]["embedding"][: ids.shape[1]]
    h = trunk(h, params, causal=True, acts=acts)
    if "head" in params:
        return h @ params["head"]["kernel"]
    return h @ params["embed"]["embedding"].T


def make_block(key, d, f, dh, dv):
    ks = iter(jax.random.split(key, 24))

    def rnd(*s, scale=0.4):
        return scale * jax.random.normal(next(ks), s)

    def ln():
        return {"scale": 1.0 + rnd(d, scale=0.2), "bias": rnd(d, scale=0.2)}

    attn = {n: {"kernel": rnd(d, HEADS * dh), "bias": rnd(HEADS * dh)} for n in ("query", "key")}
    attn["value"] = {"kernel": rnd(d, HEADS * dv), "bias": rnd(HEADS * dv)}
    attn["out"] = {"kernel": rnd(HEADS * dv, d), "bias": rnd(d)}
    mlp = {"fc": {"kernel": rnd(d, f), "bias": rnd(f)}, "proj": {"kernel": rnd(f, d), "bias": rnd(d)}}
    return {"ln1": ln(), "ln2": ln(), "attn": attn, "mlp": mlp}


def make_gpt(key, d=8, f=16, dh=None, dv=None, tied=True):
    dh, dv = dh or d // HEADS, dv or d // HEADS
    ks = jax.random.split(key, DEPTH + 4)
    p = {
        "embed": {"embedding": 0.5 * jax.random.normal(ks[0], (V, d))},
        "pos": {"embedding": 0.5 * jax.random.normal(ks[1], (C, d))},
        "blocks": {str(i): make_block(ks[2 + i], d, f, dh, dv) for i in range(DEPTH)},
        "ln_f": {"scale": 1.0 + 0.2 * jax.random.normal(ks[-2], (d,)), "bias": 0.2 * jax.random.normal(ks[-1], (d,))},
    }
    if not tied:
        p["head"] = {"kernel": 0.5 * jax.random.normal(jax.random.fold_in(key, 7), (d, V))}
    return p


IDS = jax.random.randint(jax.random.key(100), (4, C), 0, V)
IMAGES = jax.random.normal(jax.random.key(101), (4, 4, 4, 1))
gpt_logits = jax.jit(gpt_apply)


# ---------------------------------------------------------------------------- hand-built permutation
def head_index(sigma, within, dh):
    """Old flat index of new (head j, unit u): sigma[j] * dh + within[j][u]."""
    return np.concatenate([sigma[j] * dh + within[j] for j in range(len(sigma))])


def permute(p, rng, *, qk_within=True):
    """A copy of ``p`` with the residual stream, heads, within-head q/k and v/o units and MLP units
    permuted by hand from the contract's structure; returns (copy, the permutations).
    ``qk_within=False`` keeps the within-head query/key order (rotary positions)."""
    d = p["ln_f"]["scale"].shape[0]
    pi = rng.permutation(d)
    q = jax.tree.map(np.asarray, p)
    q["ln_f"] = {k: v[pi] for k, v in q["ln_f"].items()}
    if "embed" in q:
        q["embed"]["embedding"] = q["embed"]["embedding"][:, pi]
    if "patch" in q:
        q["patch"] = {"kernel": q["patch"]["kernel"][..., pi], "bias": q["patch"]["bias"][pi]}
        if "cls" in q:
            q["cls"] = q["cls"][..., pi]
    if "pos" in q:
        q["pos"]["embedding"] = q["pos"]["embedding"][:, pi]
    if "head" in q:
        q["head"]["kernel"] = q["head"]["kernel"][pi]

    def reorder(layer, rows, cols):
        out = {"kernel": layer["kernel"][rows][:, cols]}
        if "bias" in layer:
            out["bias"] = layer["bias"][cols]
        return out

    perms = {"residual": pi, "heads": [], "mlp": []}
    for i in range(DEPTH):
        b = q["blocks"][str(i)]
        for ln in ("ln1", "ln2"):
            b[ln] = {k: v[pi] for k, v in b[ln].items()}
        a = b["attn"]
        dh, dv = a["query"]["kernel"].shape[1] // HEADS, a["value"]["kernel"].shape[1] // HEADS
        sigma = np.arange(HEADS)[::-1] if i == 0 else rng.permutation(HEADS)  # block 0's heads swapped
        within = [rng.permutation(dh) if qk_within else np.arange(dh) for _ in range(HEADS)]
        iqk = head_index(sigma, within, dh)
        ivo = head_index(sigma, [rng.permutation(dv) for _ in range(HEADS)], dv)
        for name, idx in (("query", iqk), ("key", iqk), ("value", ivo)):
            a[name] = reorder(a[name], pi, idx)
        a["out"] = reorder(a["out"], ivo, pi)
        m = rng.permutation(b["mlp"]["fc"]["kernel"].shape[1])
        for name in ("fc", "gate"):
            if name in b["mlp"]:
                b["mlp"][name] = reorder(b["mlp"][name], pi, m)
        b["mlp"]["proj"] = reorder(b["mlp"]["proj"], m, pi)
        perms["heads"].append(sigma)
        perms["mlp"].append(m)
    return jax.tree.map(jnp.asarray, q), perms


def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def gpt_pair():
    a = make_gpt(jax.random.key(0))
    b, perms = permute(a, np.random.default_rng(0))
    return a, b, perms


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", ["gpt", "gpt-untied"])  # the ViT: test_zoo_models_...
def test_permuted_copy_computes_the_same_and_fuses_back_to_the_model(kind):
    a = make_gpt(jax.random.key(1), tied=kind == "gpt")
    b, perms = permute(a, np.random.default_rng(1))
    la, lb = gpt_logits(a, IDS), gpt_logits(b, IDS)
    assert max_diff(la, lb) < 1e-4 * float(jnp.max(jnp.abs(la)))
    assert max_diff(a, b) > 0.1  # the copy really is permuted
    fused, info = align.transformer_ot_fusion(a, b, model="gpt", heads=HEADS)
    assert max_diff(fused, a) < 1e-5
    assert max_diff(info.aligned, a) < 1e-5
    assert info.is_permutation and all(info.converged)
    assert np.allclose(info.costs, 0.0, atol=1e-6)
    # target unit j receives the source unit that was a's unit j
    pi = perms["residual"]
    assert np.array_equal(np.argmax(np.asarray(info.transport["residual"]), axis=0), np.argsort(pi))
    for i, sigma in enumerate(perms["heads"]):
        assert np.asarray(info.head_perm[f"blocks/{i}/attn"]).tolist() == np.argsort(sigma).tolist()
    summary = json.loads(json.dumps(info.to_dict()))
    assert summary["groups"]["blocks/1/mlp"]["is_permutation"] and summary["layout"]["heads"] == HEADS


@pytest.mark.parametrize("heads_mode", ["flat", "index"])
def test_other_head_modes(gpt_pair, heads_mode):
    a, b, _ = gpt_pair
    fused, info = align.transformer_ot_fusion(a, b, model="gpt", heads=HEADS, heads_mode=heads_mode)
    if heads_mode == "flat":  # one map over H*Dh finds the head-structured permutation too
        assert max_diff(fused, a) < 1e-5 and info.is_permutation and not info.head_perm
    else:  # heads paired by index: wrong when the heads were permuted (both blocks here)
        assert all((np.asarray(p) == np.arange(HEADS)).all() for p in info.head_perm.values())
        swapped = any(perm.tolist() != list(range(HEADS)) for perm in gpt_pair[2]["heads"])
        assert swapped and max_diff(fused, a) > 1e-2


def test_weights_one_zero_returns_the_target_and_zero_one_the_aligned_source():
    a, c = make_gpt(jax.random.key(2)), make_gpt(jax.random.key(3))
    fused, info = align.transformer_ot_fusion(a, c, model="gpt", heads=HEADS, weights=(1.0, 0.0))
    assert max_diff(fused, a) == 0.0
    fused_b, info_b = align.transformer_ot_fusion(a, c, model="gpt", heads=HEADS, weights=(1.0, 0.0), target="b")
    assert max_diff(fused_b, info_b.aligned) < 1e-6
    half, _ = align.transformer_ot_fusion(a, c, model="gpt", heads=HEADS)
    assert max_diff(half, jax.tree.map(lambda x, y: (x + y) / 2, a, info.aligned)) < 1e-6


def test_exact_and_sinkhorn_agree_on_a_permuted_copy(gpt_pair):
    a, b, _ = gpt_pair
    exact, ie = align.transformer_ot_fusion(a, b, model="gpt", heads=HEADS)
    soft, isk = align.transformer_ot_fusion(a, b, model="gpt", heads=HEADS, solver="sinkhorn", epsilon=1e-3)
    assert all(isk.converged)
    assert max_diff(exact, soft) < 1e-3
    for g in ie.order:
        assert float(jnp.max(jnp.abs(ie.transport[g] - isk.transport[g]))) < 1e-3, g


def test_activation_ground_fuses_a_permuted_copy_back(gpt_pair):
    a, b, _ = gpt_pair
    acts_a, acts_b = {}, {}
    gpt_apply(a, IDS, acts_a)
    gpt_apply(b, IDS, acts_b)
    fused, info = align.transformer_ot_fusion(
        a, b, model="gpt", heads=HEADS, ground="activations", activations=(acts_a, acts_b)
    )
    assert info.ground == "activations" and info.is_permutation
    assert max_diff(fused, a) < 1e-5


def widen(p):
    """Net2Net copy with the residual stream and the MLP twice as wide (units duplicated, the
    weights reading them halved); it computes exactly what ``p`` computes (untied head)."""
    def dup(x, ax):
        return jnp.concatenate([x, x], axis=ax)

    q = {
        "embed": {"embedding": dup(p["embed"]["embedding"], 1)},
        "pos": {"embedding": dup(p["pos"]["embedding"], 1)},
        "ln_f": {k: dup(v, 0) for k, v in p["ln_f"].items()},
        "head": {"kernel": dup(p["head"]["kernel"], 0) / 2},
        "blocks": {},
    }
    for i, b in p["blocks"].items():
        a = {
            n: {"kernel": dup(b["attn"][n]["kernel"], 0) / 2, "bias": b["attn"][n]["bias"]}
            for n in ("query", "key", "value")
        }
        a["out"] = {"kernel": dup(b["attn"]["out"]["kernel"], 1), "bias": dup(b["attn"]["out"]["bias"], 0)}
        fc, proj = b["mlp"]["fc"], b["mlp"]["proj"]
        q["blocks"][i] = {
            "ln1": {k: dup(v, 0) for k, v in b["ln1"].items()},
            "ln2": {k: dup(v, 0) for k, v in b["ln2"].items()},
            "attn": a,
            "mlp": {
                "fc": {"kernel": dup(dup(fc["kernel"], 0) / 2, 1), "bias": dup(fc["bias"], 0)},
                "proj": {"kernel": dup(dup(proj["kernel"], 1), 0) / 2, "bias": dup(proj["bias"], 0)},
            },
        }
    return q


def test_unequal_widths_net2net_copy_fuses_back_exactly():
    a = make_gpt(jax.random.key(4), tied=False)
    wide = widen(a)
    assert wide["blocks"]["0"]["mlp"]["fc"]["kernel"].shape == (16, 32)
    assert max_diff(gpt_logits(a, IDS), gpt_logits(wide, IDS)) < 1e-4
    fused, info = align.transformer_ot_fusion(a, wide, model="gpt", heads=HEADS)
    assert info.transport["residual"].shape == (16, 8) and not info.is_permutation
    assert max_diff(fused, a) < 1e-5
    # the paper's literal rule averages the duplicated readers instead: not the model
    fused_bary, _ = align.transformer_ot_fusion(a, wide, model="gpt", heads=HEADS, incoming="barycentric")
    assert max_diff(fused_bary, a) > 1e-2


def test_unequal_widths_take_the_target_shapes_with_finite_logits():
    small = make_gpt(jax.random.key(5), d=8, f=16)  # head dim 4
    big = make_gpt(jax.random.key(6), d=16, f=24)  # head dim 8
    fused, info = align.transformer_ot_fusion(small, big, model="gpt", heads=HEADS)
    assert jax.tree.map(jnp.shape, fused) == jax.tree.map(jnp.shape, small)
    assert info.transport["blocks/0/attn/qk"].shape == (16, 8)
    assert np.allclose(np.asarray(info.plans["blocks/0/mlp"]).sum(axis=0), 1 / 16, atol=1e-6)  # target marginal
    assert bool(jnp.all(jnp.isfinite(gpt_logits(fused, IDS))))
    fused_big, _ = align.transformer_ot_fusion(small, big, model="gpt", heads=HEADS, target="b")
    assert jax.tree.map(jnp.shape, fused_big) == jax.tree.map(jnp.shape, big)
    assert bool(jnp.all(jnp.isfinite(gpt_logits(fused_big, IDS))))


@pytest.mark.parametrize(
    "name, settings, x",
    [
        ("gpt", {"vocab_size": V, "context": C}, IDS),
        ("gpt", {"vocab_size": V, "context": C, "positions": "rotary", "norm": "rms", "mlp": "gated",
                 "bias": False, "tied": False}, IDS),
        ("vit", {"image_size": 4, "patch_size": 2, "channels": 1, "num_classes": K}, IMAGES),
    ],
    ids=["gpt", "llama-style", "vit"],
)
def test_zoo_models_permuted_copy_fuses_back(name, settings, x):
    from landscape import models

    module = models.build(name, jax.random.key(9), width=8, depth=DEPTH, heads=HEADS, **settings)
    fm, a, _ = models.functional(module)
    rotary = settings.get("positions") == "rotary"
    b, perms = permute(a, np.random.default_rng(3), qk_within=not rotary)
    logits = jax.jit(fm.__call__)
    la = logits(a, x)
    assert max_diff(la, logits(b, x)) < 1e-4 * float(jnp.max(jnp.abs(la)))
    fused, info = align.transformer_ot_fusion(a, b, model=fm)  # layout read off the zoo model
    assert info.layout == TransformerLayout(name, DEPTH, HEADS)
    assert max_diff(fused, a) < 1e-5 and info.is_permutation
    if rotary:  # within-head query/key units stay in place: the map only swaps block 0's heads
        swap = np.kron(np.array([[0.0, 1.0], [1.0, 0.0]]), np.eye(4))
        assert np.array_equal(np.asarray(info.transport["blocks/0/attn/qk"]), swap)
        with pytest.raises(ValueError, match="rotary"):
            align.transformer_ot_fusion(a, b, model=fm, heads_mode="flat")
    else:  # activation-based cost from the zoo's layer inputs
        acts = (align.transformer_activations(fm, a, x), align.transformer_activations(fm, b, x))
        fused_act, info_act = align.transformer_ot_fusion(a, b, model=module, ground="activations", activations=acts)
        assert max_diff(fused_act, a) < 1e-5 and info_act.is_permutation
        rows = np.argmax(np.asarray(info_act.transport["residual"]), axis=0)
        assert np.array_equal(rows, np.argsort(perms["residual"]))


def drop(p, path):
    q = jax.tree.map(lambda x: x, p)
    node = q
    *head, last = path.split("/")
    for k in head:
        node = node[k]
    del node[last]
    return q


def test_bad_input_names_the_path(gpt_pair):
    a, b, _ = gpt_pair
    with pytest.raises(ValueError, match="model b: missing leaf 'blocks/1/mlp/fc/kernel'"):
        align.transformer_ot_fusion(a, drop(b, "blocks/1/mlp/fc/kernel"), model="gpt", heads=HEADS)
    with pytest.raises(ValueError, match="differ in depth: 2 vs 1"):
        align.transformer_ot_fusion(a, drop(b, "blocks/1"), model="gpt", heads=HEADS)
    with pytest.raises(ValueError, match="layout says depth 3"):
        align.transformer_ot_fusion(a, b, model=TransformerLayout("gpt", 3, HEADS))
    with pytest.raises(ValueError, match="differ in heads: 2 vs 4"):
        align.transformer_ot_fusion(a, b, model=(TransformerLayout("gpt", 2, 2), TransformerLayout("gpt", 2, 4)))
    with pytest.raises(ValueError, match="'blocks/0/attn/query/kernel' has 8 attention units, not divisible by heads"):
        align.transformer_ot_fusion(a, b, model="gpt", heads=3)
    with pytest.raises(ValueError, match="heads=4 disagrees with the layout's 2 heads"):
        align.transformer_ot_fusion(a, b, model=TransformerLayout("gpt", 2, 2), heads=4)
    with pytest.raises(ValueError, match="heads= is required"):
        align.transformer_ot_fusion(a, b, model="gpt")
    extra = {**b, "extra": {"kernel": jnp.ones(3)}}
    with pytest.raises(ValueError, match="unexpected leaf 'extra/kernel'"):
        align.transformer_ot_fusion(a, extra, model="gpt", heads=HEADS)
    other_vocab = make_gpt(jax.random.key(8))
    other_vocab["embed"]["embedding"] = other_vocab["embed"]["embedding"][:-1]
    with pytest.raises(ValueError, match="'embed/embedding' axis 0"):
        align.transformer_ot_fusion(a, other_vocab, model="gpt", heads=HEADS)
    with pytest.raises(ValueError, match="model a: params have no 'blocks/0"):
        align.transformer_ot_fusion({"w": jnp.ones(2)}, b, model="gpt", heads=HEADS)
    bad = jax.tree.map(lambda x: x, b)
    bad["blocks"]["0"]["ln2"]["scale"] = bad["blocks"]["0"]["ln2"]["scale"].at[1].set(jnp.nan)
    with pytest.raises(ValueError, match="model b leaf 'blocks/0/ln2/scale' has non-finite"):
        align.transformer_ot_fusion(a, bad, model="gpt", heads=HEADS)
    with pytest.raises(ValueError, match="only used with ground='activations'"):
        align.transformer_ot_fusion(a, b, model="gpt", heads=HEADS, activations=({}, {}))
    with pytest.raises(ValueError, match="unknown heads_mode"):
        align.transformer_ot_fusion(a, b, model="gpt", heads=HEADS, heads_mode="mix")
    with pytest.raises(ValueError, match="activations of model b have no 'blocks/0/attn/query'"):
        align.transformer_ot_fusion(
            a, b, model="gpt", heads=HEADS, ground="activations",
            activations=({"residual": jnp.ones((5, 8))} | {
                f"blocks/{i}/{n}": jnp.ones((5, 8)) for i in range(2) for n in ("attn/query", "attn/key", "attn/value")
            } | {f"blocks/{i}/mlp": jnp.ones((5, 16)) for i in range(2)}, {"residual": jnp.ones((5, 8))}),
        )

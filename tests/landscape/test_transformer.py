"""The zoo transformers (landscape.models.transformer) against a numpy reference and exact invariants.

Oracles: an independent numpy forward pass written from the documented parameter convention (loops over
heads, softmax over the allowed keys only), exact causality (a future token cannot change an earlier
logit, bit for bit), the tied unembedding equal to an untied head holding ``embed.T``, and a dense
``jax.hessian`` in float64 for the Lanczos top-5 of a tiny GPT.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from landscape import Objective, align, models, tree
from landscape.models import GPT, ViT
from landscape.models.transformer import check_tokens
from probes import hessian as H

V, C, D, HEADS = 11, 8, 8, 2


_apply = jax.jit(lambda fm, p, x: fm(p, x), static_argnums=0)
_permute = jax.jit(align.apply, static_argnums=0)  # one compilation instead of one per leaf op
_random_perm = jax.jit(align.random_permutation, static_argnums=1)


def _random_params(abstract, seed):
    """Random params at a scale where every term matters (norm scales near 1, biases away from 0)."""
    rng = np.random.default_rng(seed)

    def draw(name, leaf):
        z = rng.standard_normal(leaf.shape).astype(np.float32)
        if name.endswith("scale"):
            return jnp.asarray(1 + 0.1 * z)
        if name.endswith("kernel"):
            return jnp.asarray(z / np.sqrt(np.prod(leaf.shape[:-1])))
        return jnp.asarray(0.3 * z)  # biases, embeddings, the class token

    named = dict(tree.named_leaves(abstract))
    _leaves, treedef = jax.tree.flatten(abstract)
    return jax.tree.unflatten(treedef, [draw(n, named[n]) for n in named])


def _gpt(seed=0, **kw):
    """A GPT's ``(apply_fn, random params)`` without running its (eager) initialisers."""
    settings = {"vocab_size": V, "context": C, "width": D, "depth": 2, "heads": HEADS, "mlp_ratio": 2} | kw
    fm, abstract, _ = models.functional(nnx.eval_shape(lambda: GPT(**settings, rngs=nnx.Rngs(0))))
    return fm, _random_params(abstract, seed)


_BUILT: dict = {}


def _model(name):
    """One build per setting for the whole file."""
    if name not in _BUILT:
        kw = {"gpt2": {}, "untied": {"tied": False}, "llama": VARIANTS["llama"]}[name]
        _BUILT[name] = _gpt(**kw)
    return _BUILT[name]


# ------------------------------------------------------------------ numpy reference
def _np_norm(h, p, kind, eps):
    if kind == "rms":
        return h / np.sqrt(np.mean(h**2, -1, keepdims=True) + eps) * p["scale"]
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    return (h - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_dense(h, p):
    return h @ p["kernel"] + (p.get("bias", 0.0))


def _np_rotary(x, theta):  # x: (T, Dh)
    t, dh = x.shape
    out = np.empty_like(x)
    for pos in range(t):
        for j in range(dh // 2):
            a = pos * theta ** (-2 * j / dh)
            x1, x2 = x[pos, j], x[pos, j + dh // 2]
            out[pos, j] = x1 * math.cos(a) - x2 * math.sin(a)
            out[pos, j + dh // 2] = x2 * math.cos(a) + x1 * math.sin(a)
    return out


def _np_gpt(
    p, ids, mask, *, heads, norm="layer", eps=1e-5, positions="learned", mlp="gelu", tied=True, theta=1e4, fc0=False
):
    """Plain numpy float64 GPT forward from the documented convention (``fc0``: block 0's ``fc`` output)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    n, t = ids.shape
    mask = np.ones((n, t), bool) if mask is None else np.asarray(mask).astype(bool)
    out = []
    for s in range(n):
        h = p["embed"]["embedding"][ids[s]]
        if positions == "learned":
            h = h + p["pos"]["embedding"][:t]
        for i in sorted(p["blocks"], key=int):
            blk = p["blocks"][i]
            a = _np_norm(h, blk["ln1"], norm, eps)
            q, k, v = (_np_dense(a, blk["attn"][w]) for w in ("query", "key", "value"))
            dh = q.shape[1] // heads
            o = np.zeros_like(q)
            for hd in range(heads):
                sl = slice(hd * dh, (hd + 1) * dh)
                qh, kh, vh = q[:, sl], k[:, sl], v[:, sl]
                if positions == "rotary":
                    qh, kh = _np_rotary(qh, theta), _np_rotary(kh, theta)
                for qi in range(t):
                    keys = [kj for kj in range(qi + 1) if mask[s, kj]]
                    if not keys:  # a query with no allowed key (left padding): not compared
                        continue
                    sc = np.array([qh[qi] @ kh[kj] / math.sqrt(dh) for kj in keys])
                    w = np.exp(sc - sc.max())
                    w /= w.sum()
                    o[qi, sl] = sum(wk * vh[kj] for wk, kj in zip(w, keys))
            h = h + _np_dense(o, blk["attn"]["out"])
            b = _np_norm(h, blk["ln2"], norm, eps)
            if mlp == "gated":
                g = _np_dense(b, blk["mlp"]["gate"])
                u = g / (1 + np.exp(-g)) * _np_dense(b, blk["mlp"]["fc"])
            else:
                z = _np_dense(b, blk["mlp"]["fc"])
                if fc0 and i == "0":
                    out.append(z)
                    break
                u = 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
            h = h + _np_dense(u, blk["mlp"]["proj"])
        if fc0:
            continue
        h = _np_norm(h, p["ln_f"], norm, eps)
        out.append(h @ (p["embed"]["embedding"].T if tied else p["head"]["kernel"]))
    return np.stack(out)


VARIANTS = {
    "gpt2": {},
    "llama": {"positions": "rotary", "norm": "rms", "mlp": "gated", "bias": False, "tied": False, "norm_eps": 1e-6},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_equal_numpy_reference_with_and_without_mask(variant):
    kw = VARIANTS[variant]
    fm, p = _model(variant)
    ids = jax.random.randint(jax.random.key(3), (3, 6), 0, V)
    mask = np.ones((3, 6), np.int32)
    mask[0, 4:] = 0  # right padding
    mask[1, :2] = 0  # left padding
    mask[2, 2] = 0  # a hole
    ref_kw = {
        "heads": HEADS,
        "norm": kw.get("norm", "layer"),
        "eps": kw.get("norm_eps", 1e-5),
        "positions": kw.get("positions", "learned"),
        "mlp": kw.get("mlp", "gelu"),
        "tied": kw.get("tied", True),
    }
    got = np.asarray(_apply(fm, p, ids))
    np.testing.assert_allclose(got, _np_gpt(p, np.asarray(ids), None, **ref_kw), rtol=1e-5, atol=1e-5)
    got_m = np.asarray(_apply(fm, p, {"input_ids": ids, "attention_mask": mask}))
    ref_m = _np_gpt(p, np.asarray(ids), mask, **ref_kw)
    rows = [(0, slice(0, 6)), (1, slice(2, 6)), (2, slice(0, 6))]  # queries with at least one allowed key
    for r, sl in rows:
        np.testing.assert_allclose(got_m[r, sl], ref_m[r, sl], rtol=1e-5, atol=1e-5)
    assert np.isfinite(got_m).all()  # fully masked query rows (left padding) stay finite


def test_causal_future_tokens_do_not_change_earlier_logits_exactly():
    fm, p = _model("gpt2")
    ids = jax.random.randint(jax.random.key(4), (2, C), 0, V)
    changed = ids.at[:, 5].set((ids[:, 5] + 3) % V)
    a, b = np.asarray(_apply(fm, p, ids)), np.asarray(_apply(fm, p, changed))
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    assert np.abs(a[:, 5:] - b[:, 5:]).min(axis=-1).max() > 0  # later positions do see it


def test_masked_keys_are_excluded_exactly():
    """Changing a masked-out token changes no logit of any unmasked query (its weight is exactly 0)."""
    fm, p = _model("llama")
    ids = jax.random.randint(jax.random.key(5), (2, 7), 0, V)
    mask = jnp.ones((2, 7), jnp.int32).at[:, 2].set(0)
    changed = ids.at[:, 2].set((ids[:, 2] + 1) % V)
    a = np.asarray(_apply(fm, p, {"input_ids": ids, "attention_mask": mask}))
    b = np.asarray(_apply(fm, p, {"input_ids": changed, "attention_mask": mask}))
    keep = [0, 1, 3, 4, 5, 6]
    np.testing.assert_array_equal(a[:, keep], b[:, keep])
    # without the mask the same change is seen by every later query
    c, d = np.asarray(_apply(fm, p, ids)), np.asarray(_apply(fm, p, changed))
    assert np.abs(c[:, 3:] - d[:, 3:]).max() > 1e-4


def test_tied_equals_untied_head_holding_embedding_transpose():
    fm_t, p_t = _model("gpt2")
    fm_u, p_u = _model("untied")
    assert "head" not in p_t and p_u["head"]["kernel"].shape == (D, V)
    assert tree.num_params(p_u) - tree.num_params(p_t) == D * V
    p_u = {**p_t, "head": {"kernel": p_t["embed"]["embedding"].T}}
    ids = jax.random.randint(jax.random.key(6), (2, 5), 0, V)
    np.testing.assert_allclose(_apply(fm_t, p_t, ids), _apply(fm_u, p_u, ids), rtol=1e-6, atol=1e-6)


def test_param_layout_follows_the_contract():
    _, p = _model("untied")  # (the registry path models.build("gpt", ...) is exercised in test_hf_gpt.py)
    shapes = {k: tuple(v.shape) for k, v in tree.named_leaves(p)}
    inner, f = D, 2 * D
    expected = {
        "embed/embedding": (V, D),
        "pos/embedding": (C, D),
        "ln_f/scale": (D,),
        "ln_f/bias": (D,),
        "head/kernel": (D, V),
    }
    for i in range(2):
        b = f"blocks/{i}"
        expected |= {f"{b}/ln1/scale": (D,), f"{b}/ln1/bias": (D,), f"{b}/ln2/scale": (D,), f"{b}/ln2/bias": (D,)}
        for w in ("query", "key", "value"):
            expected |= {f"{b}/attn/{w}/kernel": (D, inner), f"{b}/attn/{w}/bias": (inner,)}
        expected |= {f"{b}/attn/out/kernel": (inner, D), f"{b}/attn/out/bias": (D,)}
        expected |= {f"{b}/mlp/fc/kernel": (D, f), f"{b}/mlp/fc/bias": (f,)}
        expected |= {f"{b}/mlp/proj/kernel": (f, D), f"{b}/mlp/proj/bias": (D,)}
    assert shapes == expected
    _, q = _model("llama")
    names = {k for k, _ in tree.named_leaves(q)}
    assert "pos/embedding" not in names and "blocks/0/ln1/bias" not in names
    assert "blocks/0/attn/query/bias" not in names
    assert dict(tree.named_leaves(q))["blocks/0/mlp/gate/kernel"].shape == (D, 2 * D)
    m = nnx.eval_shape(lambda: GPT(V, C, D, 1, HEADS, mlp="gated", mlp_width=12, rngs=nnx.Rngs(0)))
    assert m.blocks[0].mlp.gate.kernel.shape == (D, 12) and m.blocks[0].mlp.proj.kernel.shape == (12, D)


def test_taps_record_layer_inputs_by_kernel_path():
    fm, p = _model("untied")
    ids = jnp.zeros((2, 4), jnp.int32)
    inputs = jax.jit(lambda q: fm.intermediates(q, ids, kind="input"))(p)
    kernels = {k for k, _ in tree.named_leaves(p) if k.endswith("/kernel")}
    assert set(inputs) == kernels
    assert inputs["blocks/1/mlp/proj/kernel"].shape == (2, 4, 2 * D)
    assert inputs["blocks/0/attn/out/kernel"].shape == (2, 4, D)
    x = inputs["blocks/0/mlp/proj/kernel"]
    assert x.min() >= -0.2  # GELU (tanh) outputs are bounded below by about -0.17
    assert "head/kernel" in inputs and inputs["head/kernel"].shape == (2, 4, D)


@pytest.mark.parametrize("name", ["gpt2", "llama", "vit"])
def test_random_permutation_under_traced_spec_keeps_logits(name):
    """``permutation_spec()`` is ``align.trace_spec`` of the model itself; permuting under it is a symmetry."""
    fm, p = _vit("cls") if name == "vit" else _model(name)
    x = jax.random.normal(jax.random.key(1), (6, 8, 8, 1)) if name == "vit" else jnp.arange(12).reshape(2, 6) % V
    assert fm.spec is not None and fm.spec.blocks  # attention heads are blockwise groups
    if name != "vit":
        res = fm.spec.axes["embed/embedding"][1]
        assert fm.spec.axes["blocks/1/mlp/proj/kernel"][1] == res  # one residual stream across blocks
    perm = _random_perm(jax.random.key(2), fm.spec, p)
    q = _permute(fm.spec, perm, p)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q))) > 0.1
    np.testing.assert_allclose(_apply(fm, q, x), _apply(fm, p, x), rtol=1e-5, atol=1e-5)


def test_activation_matching_on_the_zoo_gpt_recovers_a_planted_permutation():
    """``intermediates("pre"/"post")`` are the traced activations under ``apply_fn.spec``'s names."""
    fm, p = _model("gpt2")
    spec = fm.spec
    ids = jax.random.randint(jax.random.key(9), (32, 6), 0, V)
    pre = jax.jit(lambda q: fm.intermediates(q, ids[:4], kind="pre"))(p)
    assert set(pre) == set(spec.names)
    np.testing.assert_allclose(pre[spec.axes["blocks/0/mlp/fc/kernel"][1]], _np_fc(p, np.asarray(ids[:4])), atol=1e-5)
    planted = _random_perm(jax.random.key(3), spec, p)
    b = _permute(spec, planted, p)
    obj = Objective(fm, ids, jnp.zeros(32, jnp.int32), batch_size=32)
    perm, _ = align.activation_matching(spec, p, b, obj)
    inv = align.invert(planted)
    assert all(bool(jnp.all(perm[n] == inv[n])) for n in spec.names)


def _np_fc(p, ids):
    """Block 0's MLP pre-activation ``fc(ln2(h))`` in numpy (the GPT-2 variant)."""
    return _np_gpt(p, ids, None, heads=HEADS, fc0=True)


# ------------------------------------------------------------------ bad input
def test_bad_gpt_inputs_raise_naming_shape_or_value():
    fm, p = _model("gpt2")
    with pytest.raises(ValueError, match=r"token id 11 at position \(1, 2\).*\[0, 11\)"):
        fm(p, jnp.zeros((2, 4), jnp.int32).at[1, 2].set(V))
    with pytest.raises(ValueError, match=r"token id -1"):
        check_tokens(np.full((1, 3), -1), vocab_size=V, context=C)
    with pytest.raises(ValueError, match=r"9 tokens.*\(2, 9\).*context 8"):
        fm(p, jnp.zeros((2, C + 1), jnp.int32))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 3\).*\(2, 4\)"):
        fm(p, {"input_ids": jnp.zeros((2, 4), jnp.int32), "attention_mask": jnp.ones((2, 3))})
    with pytest.raises(ValueError, match=r"only 0 and 1, got 2"):
        fm(p, {"input_ids": jnp.zeros((2, 4), jnp.int32), "attention_mask": jnp.full((2, 4), 2)})
    with pytest.raises(ValueError, match=r"integer token ids of shape \(N, T\), got shape \(2, 4, 1\)"):
        fm(p, jnp.zeros((2, 4, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"dtype float32"):
        fm(p, jnp.zeros((2, 4), jnp.float32))
    with pytest.raises(ValueError, match=r"unknown|needs 'input_ids'"):
        fm(p, {"ids": jnp.zeros((2, 4), jnp.int32)})
    # shapes are checked at trace time under jit too
    with pytest.raises(ValueError, match=r"context 8"):
        _apply(fm, p, jnp.zeros((1, C + 3), jnp.int32))
    # values cannot be checked under jit: an out-of-vocabulary id makes its sequence NaN, never wraps
    out = np.asarray(_apply(fm, p, jnp.array([[1, 2, 3], [1, V, 3]])))
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="not divisible by heads 3"):
        GPT(V, C, 8, 1, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="positions='alibi' is unknown"):
        GPT(V, C, 8, 1, 2, positions="alibi", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="norm='batch' is unknown"):
        GPT(V, C, 8, 1, 2, norm="batch", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="even head_dim"):
        GPT(V, C, 6, 1, 2, positions="rotary", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="image_size 9 is not divisible by patch_size 2"):
        ViT(9, 2, 1, 8, 1, 2, 3, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------ Hessian oracle
@jax.jit
def _dense_hessian(obj, p):
    flat, unravel = tree.ravel(p)
    return jax.hessian(lambda f: obj.loss(unravel(f)))(flat)


def test_hessian_top5_equals_dense_float64():
    with jax.enable_x64(True):
        fm, p = _gpt(vocab_size=10, context=6, width=12, depth=1, heads=2)
        p = jax.tree.map(lambda a: a.astype(jnp.float64), p)
        n = tree.num_params(p)
        assert 1000 <= n <= 3000, n
        seqs = jax.random.randint(jax.random.key(7), (5, 7), 0, 10)
        obj = Objective(fm, seqs[:, :-1], seqs[:, 1:], loss="next_token", batch_size=5)
        dense = np.asarray(_dense_hessian(obj, p))
        assert dense.dtype == np.float64
        evals = np.linalg.eigvalsh((dense + dense.T) / 2)[::-1][:5]
        top = H.eigenvalues(jax.random.key(1), obj, p, k=5, which="top", num_steps=40)
        rel = np.max(np.abs(np.asarray(top.eigenvalues) - evals) / np.abs(evals))
        assert rel < 1e-6, (rel, top.eigenvalues, evals)


def test_next_token_loss_on_masked_padded_batch_equals_hand_written():
    """``Objective(loss="next_token")`` on the GPT: mean CE over real tokens only, in a padded last batch."""
    fm, p = _model("llama")
    ids = jax.random.randint(jax.random.key(8), (5, 7), 0, V)
    mask = np.ones((5, 6), np.int32)
    mask[1, 4:] = 0
    mask[3, :2] = 0
    x = {"input_ids": ids[:, :-1], "attention_mask": jnp.asarray(mask)}
    y = ids[:, 1:]
    obj = Objective(fm, x, y, loss="next_token", batch_size=2)  # 3 batches, the last one padded
    logits = np.asarray(_apply(fm, p, x), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(y)[..., None], axis=-1)[..., 0]
    want = float((nll * mask).sum() / mask.sum())
    assert abs(float(jax.jit(obj.loss)(p)) - want) < 1e-6 * max(1.0, abs(want))


# ------------------------------------------------------------------ ViT
def _vit(pool):
    """ViT ``(apply_fn, params)``: built through the registry for ``"cls"``, random params for ``"mean"``."""
    if pool not in _BUILT:
        settings = {"image_size": 8, "patch_size": 4, "channels": 1, "width": 8, "depth": 1, "heads": 2}
        settings |= {"num_classes": 3, "mlp_ratio": 2}
        if pool == "cls":
            fm, p, _ = models.functional(models.build("vit", jax.random.key(0), **settings, pool=pool))
        else:
            fm, abstract, _ = models.functional(nnx.eval_shape(lambda: ViT(**settings, pool=pool, rngs=nnx.Rngs(0))))
            p = _random_params(abstract, 0)
        _BUILT[pool] = (fm, p)
    return _BUILT[pool]


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_shapes_inputs_and_training_step(pool):
    fm, p = _vit(pool)
    assert p["patch"]["kernel"].shape == (4, 4, 1, 8)
    assert p["pos"]["embedding"].shape == (4 + (pool == "cls"), 8)
    assert ("cls" in p) == (pool == "cls")
    x = jax.random.normal(jax.random.key(1), (6, 8, 8, 1))
    y = jnp.array([0, 1, 2, 0, 1, 2])
    logits = _apply(fm, p, x)
    assert logits.shape == (6, 3)
    if pool == "cls":  # accepted layouts (one extra compilation each, so once)
        np.testing.assert_array_equal(_apply(fm, p, x.reshape(6, 64)), logits)  # flattened rows, row-major
        np.testing.assert_array_equal(_apply(fm, p, x[..., 0]), logits)
    with pytest.raises(ValueError, match=r"ViT expects images \(N, 8, 8, 1\).*got shape \(6, 8, 8, 3\)"):
        fm(p, jnp.zeros((6, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"got shape \(6, 7, 7, 1\)"):
        fm(p, jnp.zeros((6, 7, 7, 1)))
    if pool == "mean":
        return  # one training run (one compilation) is enough
    obj = Objective(fm, x, y)
    opt = optax.adam(3e-2)

    @jax.jit
    def steps(params):
        state = opt.init(params)

        def body(carry, _):
            q, s = carry
            g = jax.grad(obj.loss)(q)
            u, s = opt.update(g, s, q)
            return (optax.apply_updates(q, u), s), None

        (q, _), _ = jax.lax.scan(body, (params, state), None, length=10)
        return obj.loss(params), obj.loss(q)

    before, after = steps(p)
    assert float(after) < 0.5 * float(before)


def test_vit_is_permutation_invariant_over_patches_with_mean_pool_and_no_positions():
    """Mean pooling and non-causal attention: permuting patches with their position rows keeps the logits."""
    fm, p = _vit("mean")
    x = jax.random.normal(jax.random.key(2), (6, 8, 8, 1))
    # swap the two top patches (rows 0-3, cols 0-3 <-> cols 4-7) and rows 0 and 1 of pos/embedding
    xs = jnp.concatenate([x[:, :4, 4:], x[:, :4, :4]], axis=2)
    xs = jnp.concatenate([xs, x[:, 4:]], axis=1)
    ps = {**p, "pos": {"embedding": p["pos"]["embedding"][jnp.array([1, 0, 2, 3])]}}
    np.testing.assert_allclose(_apply(fm, p, x), _apply(fm, ps, xs), rtol=1e-5, atol=1e-6)

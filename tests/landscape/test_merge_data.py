"""Data-aware merges: Fisher, RegMean, MaTS and AdaMerging against closed forms and direct solves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape import Objective, merge, tree


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _linear_problem(seed=0, n=13, d=3, c=4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, c, size=n)
    params = {"w": jnp.asarray(rng.normal(size=(d, c)), jnp.float32), "b": jnp.asarray(rng.normal(size=c), jnp.float32)}
    obj = Objective(lambda p, x: x @ p["w"] + p["b"], x, y, batch_size=5)  # 13 = 5 + 5 + 3 padded
    return obj, params, x, y


def test_fisher_diagonal_true_and_empirical_closed_form():
    obj, params, x, y = _linear_problem()
    p = _softmax(x.astype(np.float64) @ np.asarray(params["w"], np.float64) + np.asarray(params["b"], np.float64))
    n, c = p.shape
    # d log p_k / d logit_j = delta_kj - p_j; d logit_j / d w_ij = x_i, d logit_j / d b_j = 1
    fw_true = np.zeros((3, c))
    fb_true = np.zeros(c)
    fw_emp = np.zeros((3, c))
    fb_emp = np.zeros(c)
    for i in range(n):
        for k in range(c):
            gl = np.eye(c)[k] - p[i]
            fw_true += p[i, k] * np.outer(x[i], gl) ** 2
            fb_true += p[i, k] * gl**2
        gl = np.eye(c)[y[i]] - p[i]
        fw_emp += np.outer(x[i], gl) ** 2
        fb_emp += gl**2
    f = jax.jit(lambda o, q: merge.fisher_diagonal(o, q))(obj, params)
    np.testing.assert_allclose(f["w"], fw_true / n, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(f["b"], fb_true / n, rtol=1e-5, atol=1e-7)
    fe = merge.fisher_diagonal(obj, params, kind="empirical")
    np.testing.assert_allclose(fe["w"], fw_emp / n, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fe["b"], fb_emp / n, rtol=1e-5, atol=1e-7)


def test_fisher_average_equal_fishers_is_plain_average_and_closed_form():
    rng = np.random.default_rng(1)
    ms = [{"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)} for _ in range(3)]
    f = {"w": jnp.asarray(rng.uniform(0.1, 2.0, size=(3, 2)), jnp.float32)}
    for mode in ["add", "max", "target"]:
        out = merge.fisher_average(ms, [f, f, f], floor_mode=mode)
        np.testing.assert_allclose(out["w"], merge.average(ms)["w"], rtol=1e-5)
    w = [1.0, 2.0, 3.0]
    out = merge.fisher_average(ms, [f, f, f], weights=w)
    np.testing.assert_allclose(out["w"], merge.average(ms, weights=w)["w"], rtol=1e-5)
    fs = [{"w": jnp.asarray(rng.uniform(0.0, 2.0, size=(3, 2)), jnp.float32)} for _ in range(3)]
    got = merge.fisher_average(ms, fs, floor=0.0, normalize=False)["w"]
    num = sum(np.asarray(fi["w"], np.float64) * np.asarray(mi["w"]) for fi, mi in zip(fs, ms))
    den = sum(np.asarray(fi["w"], np.float64) for fi in fs)
    np.testing.assert_allclose(got, num / den, rtol=1e-5, atol=1e-6)
    # normalisation divides each model's coefficient by ||F_i||
    got = merge.fisher_average(ms, fs, floor=0.0)["w"]
    lam = [1 / np.linalg.norm(np.asarray(fi["w"])) for fi in fs]
    num = sum(li * np.asarray(fi["w"]) * np.asarray(mi["w"]) for li, fi, mi in zip(lam, fs, ms))
    den = sum(li * np.asarray(fi["w"]) for li, fi in zip(lam, fs))
    np.testing.assert_allclose(got, num / den, rtol=1e-5, atol=1e-6)
    # all-zero Fishers without floor: plain average; floor on the target only favours it
    zeros = {"w": jnp.zeros((3, 2))}
    np.testing.assert_allclose(merge.fisher_average(ms, [zeros] * 3, floor=0.0)["w"], merge.average(ms)["w"], rtol=1e-6)
    np.testing.assert_allclose(merge.fisher_average(ms, [zeros] * 3, floor_mode="target", target=1)["w"], ms[1]["w"])


def _mlp(key, sizes=(4, 6, 3)):
    ks = jax.random.split(key, len(sizes))
    return {
        "layers": [
            {"kernel": jax.random.normal(ks[i], (a, b)) / np.sqrt(a), "bias": 0.1 * jax.random.normal(ks[i + 1], (b,))}
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
        ]
    }


def _mlp_apply(p, x):
    h = jnp.tanh(x @ p["layers"][0]["kernel"] + p["layers"][0]["bias"])
    return h @ p["layers"][1]["kernel"] + p["layers"][1]["bias"]


def _mlp_features(p, x):
    h = jnp.tanh(x @ p["layers"][0]["kernel"] + p["layers"][0]["bias"])
    return {"layers/0/kernel": x, "layers/1/kernel": h}


def test_gram_matrices_sum_and_mean():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(11, 4)).astype(np.float32)
    obj = Objective(_mlp_apply, x, np.zeros(11, int), batch_size=4)
    p = _mlp(jax.random.key(0))
    g = merge.gram_matrices(obj, p, _mlp_features)
    h = np.tanh(x @ np.asarray(p["layers"][0]["kernel"]) + np.asarray(p["layers"][0]["bias"]))
    np.testing.assert_allclose(g["layers/0/kernel"], x.T @ x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g["layers/1/kernel"], h.T @ h, rtol=1e-5, atol=1e-5)
    gm = merge.gram_matrices(obj, p, _mlp_features, reduce="mean")
    np.testing.assert_allclose(gm["layers/0/kernel"], x.T @ x / 11, rtol=1e-5, atol=1e-6)


def test_regmean_on_linear_models_is_least_squares():
    rng = np.random.default_rng(3)
    d_in, d_out = 4, 3
    xs = [rng.normal(size=(n, d_in)).astype(np.float32) for n in (9, 14, 6)]
    ws = [rng.normal(size=(d_in, d_out)).astype(np.float32) for _ in xs]
    models = [{"w": jnp.asarray(w), "b": jnp.asarray(rng.normal(size=d_out), jnp.float32)} for w in ws]
    feats = lambda p, x: {"w": x}  # noqa: E731
    apply_fn = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731
    grams = [merge.gram_matrices(Objective(apply_fn, x, np.zeros(len(x), int), batch_size=4), m, feats)
             for x, m in zip(xs, models)]
    got = merge.regmean(models, grams, alpha=1.0)
    big_x = np.concatenate(xs).astype(np.float64)
    big_y = np.concatenate([x @ w for x, w in zip(xs, ws)]).astype(np.float64)
    want = np.linalg.lstsq(big_x, big_y, rcond=None)[0]
    np.testing.assert_allclose(got["w"], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["b"], np.mean([np.asarray(m["b"]) for m in models], axis=0), rtol=1e-6)
    # alpha < 1 scales off-diagonals: closed form
    alpha = 0.6
    gt = [alpha * np.asarray(g["w"], np.float64) + (1 - alpha) * np.diag(np.diag(np.asarray(g["w"], np.float64)))
          for g in grams]
    want = np.linalg.solve(sum(gt), sum(g @ w for g, w in zip(gt, ws)))
    np.testing.assert_allclose(merge.regmean(models, grams, alpha=alpha)["w"], want, rtol=1e-4, atol=1e-4)
    # identical models come back
    same = merge.regmean([models[0]] * 3, grams, alpha=0.9)
    np.testing.assert_allclose(same["w"], models[0]["w"], rtol=1e-4, atol=1e-4)


def test_regmean_on_mlp_with_features_fn():
    rng = np.random.default_rng(4)
    models = [_mlp(jax.random.key(i)) for i in range(2)]
    objs = [Objective(_mlp_apply, rng.normal(size=(10, 4)).astype(np.float32), np.zeros(10, int), batch_size=3)
            for _ in models]
    grams = [merge.gram_matrices(o, m, _mlp_features) for o, m in zip(objs, models)]
    out = jax.jit(lambda ms, gs: merge.regmean(ms, gs, alpha=0.9))(tree.stack(models), grams)
    for li in range(2):
        key = f"layers/{li}/kernel"
        gt = [0.9 * np.asarray(g[key], np.float64) + 0.1 * np.diag(np.diag(np.asarray(g[key], np.float64))) for g in grams]
        ws = [np.asarray(m["layers"][li]["kernel"], np.float64) for m in models]
        want = np.linalg.solve(sum(gt), sum(g @ w for g, w in zip(gt, ws)))
        np.testing.assert_allclose(out["layers"][li]["kernel"], want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out["layers"][li]["bias"],
                                   (models[0]["layers"][li]["bias"] + models[1]["layers"][li]["bias"]) / 2, rtol=1e-6)


def test_mats_diagonal_equals_fisher_average_and_kfac_equals_dense_solve():
    rng = np.random.default_rng(5)
    ms = [{"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.asarray(rng.normal(size=2), jnp.float32)}
          for _ in range(3)]
    fs = [{"w": jnp.asarray(rng.uniform(0.1, 2, size=(3, 2)), jnp.float32),
           "b": jnp.asarray(rng.uniform(0.1, 2, size=2), jnp.float32)} for _ in range(3)]
    got = merge.mats(ms, fs)
    want = merge.fisher_average(ms, fs, floor=0.0, normalize=False)
    for k in ("w", "b"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5)

    def spd(n):
        a = rng.normal(size=(n, n))
        return a @ a.T + n * np.eye(n)

    a_s, g_s = [spd(3) for _ in ms], [spd(2) for _ in ms]
    w = np.array([1.0, 0.5, 2.0])
    kf = [{"w": merge.KroneckerFactors(a=jnp.asarray(a, jnp.float32), g=jnp.asarray(g, jnp.float32)), "b": f["b"]}
          for a, g, f in zip(a_s, g_s, fs)]
    got = merge.mats(ms, kf, weights=w, tol=1e-7, maxiter=200)
    # vec(A V G) = (A kron G) vec(V) for row-major vec and symmetric G
    big = sum(wi * np.kron(a, g) for wi, a, g in zip(w, a_s, g_s))
    rhs = sum(wi * np.kron(a, g) @ np.asarray(m["w"], np.float64).ravel() for wi, a, g, m in zip(w, a_s, g_s, ms))
    np.testing.assert_allclose(got["w"], np.linalg.solve(big, rhs).reshape(3, 2), rtol=1e-4, atol=1e-4)
    want_b = merge.fisher_average(ms, fs, weights=w, floor=0.0, normalize=False)["b"]
    np.testing.assert_allclose(got["b"], want_b, rtol=1e-5)


def test_kfac_fisher_closed_form_on_linear_softmax():
    obj, params, x, y = _linear_problem(seed=6)
    feats = lambda p, x: {"w": x}  # noqa: E731
    f = merge.kfac_fisher(obj, params, feats)
    p = _softmax(x.astype(np.float64) @ np.asarray(params["w"], np.float64) + np.asarray(params["b"], np.float64))
    n = len(x)
    np.testing.assert_allclose(f["w"].a, x.T.astype(np.float64) @ x / n, rtol=1e-5, atol=1e-6)
    # sum_c p_c (e_c - p)(e_c - p)^T = diag(p) - p p^T
    g = sum(np.diag(pi) - np.outer(pi, pi) for pi in p) / n
    np.testing.assert_allclose(f["w"].g, g, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(f["b"], merge.fisher_diagonal(obj, params)["b"], rtol=1e-5, atol=1e-7)
    fe = merge.kfac_fisher(obj, params, feats, kind="empirical")
    ge = sum(np.outer(np.eye(4)[yi] - pi, np.eye(4)[yi] - pi) for yi, pi in zip(y, p)) / n
    np.testing.assert_allclose(fe["w"].g, ge, rtol=1e-4, atol=1e-6)
    merged = merge.mats([params, params], [f, fe])
    np.testing.assert_allclose(merged["w"], params["w"], rtol=1e-4, atol=1e-4)


def test_adamerging_lowers_entropy_and_returns_its_merge():
    rng = np.random.default_rng(7)
    base = _mlp(jax.random.key(10))
    fts = [tree.add_scaled(base, _mlp(jax.random.key(20 + i)), 0.3) for i in range(2)]
    objs = [Objective(_mlp_apply, rng.normal(size=(12, 4)).astype(np.float32), np.zeros(12, int), batch_size=5)
            for _ in fts]
    res = merge.adamerging(fts, objs, base=base, steps=30, learning_rate=0.05)
    assert res.coefficients.shape == (2, 4)
    assert float(res.losses[-1]) < float(res.losses[0])
    tvs = merge.task_vector(fts, base)
    for li, (name, leaf) in enumerate(tree.named_leaves(res.params)):
        want = dict(tree.named_leaves(base))[name] + sum(
            res.coefficients[k, li] * dict(tree.named_leaves(tvs[k]))[name] for k in range(2)
        )
        np.testing.assert_allclose(leaf, want, rtol=1e-5, atol=1e-6)
    task = merge.adamerging(fts, objs, base=base, granularity="task", steps=3, clamp=True)
    assert task.coefficients.shape == (2,) and float(task.coefficients.min()) >= 0.0
    np.testing.assert_allclose(task.losses[0], res.losses[0], rtol=1e-5)  # same init 0.3
    assert task.to_dict()["granularity"] == "task" and len(task.plot().data) == 1


@pytest.mark.parametrize("fn", ["fisher", "gram", "kfac", "ada", "soup"])
def test_data_methods_without_data_raise(fn):
    p = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="needs"):
        if fn == "fisher":
            merge.fisher_diagonal(None, p)
        elif fn == "gram":
            merge.gram_matrices(None, p, lambda q, x: {"w": x})
        elif fn == "kfac":
            merge.kfac_fisher(None, p, lambda q, x: {"w": x})
        elif fn == "ada":
            merge.adamerging([p, p], None, base=p)
        else:
            merge.greedy_soup([p, p], None)

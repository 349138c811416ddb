"""Linear mode connectivity of digits MLPs: naive vs weight / activation / STE matching, ± REPAIR.

Run by hand (not in CI)::

    .venv/bin/python benchmarks/connectivity_digits.py [--widths 64 512] [--seeds 0 1] [--epochs 30]
        [--ste-steps 200] [--out benchmarks/results/connectivity_digits.json]

For each width, two MLPs with three hidden layers (64 → w → w → w → 10) are trained from
different initialisation and data-order seeds (Adam 1e-3, batch 64, 30 epochs). Between them:

* the straight line A → B (naive), and A → π(B) for π from weight matching (Ainsworth et al.,
  arXiv:2209.04836), activation matching with the Tatro et al. correlation and with the raw
  second moment, and STE matching;
* each of those again with REPAIR (Jordan et al., arXiv:2211.08403) applied at every t (the
  statistics taken on the training set).

Reported per path: the loss and error barriers (survey Eq. 1, chord between the endpoints) on the
training set first and on the test set, the midpoint accuracy, and the wall time of every step
(after a warm-up call, so compile time is reported separately from run time where it matters).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from landscape import Objective, align, data, models, tree
from landscape.train import Trainer, make_optimizer
from probes.curves import PathResult

NUM = 25


def train(width: int, seed: int, ds: data.Dataset, epochs: int):
    model = models.build("mlp", jax.random.key(seed), in_features=64, widths=(width, width, width, 10))
    apply_fn, params, state = models.functional(model)
    trainer = Trainer(apply_fn, *ds.train, optimizer=make_optimizer("adam", learning_rate=1e-3), batch_size=64)
    result = trainer.run(jax.random.key(1000 + seed), trainer.init(params, state), epochs=epochs)
    return apply_fn, result.params


def curve(objectives: dict[str, Objective], points: list) -> dict[str, PathResult]:
    ts = jnp.linspace(0.0, 1.0, len(points))
    stacked = tree.stack(points)
    out = {}
    for split, obj in objectives.items():
        ev = jax.jit(jax.vmap(obj.evaluate))(stacked)
        out[split] = PathResult(ts=ts, loss=ev["loss"], accuracy=ev["accuracy"])
    return out


def summary(paths: dict[str, PathResult]) -> dict[str, float]:
    row = {}
    for split, r in paths.items():
        row[f"{split}_loss_barrier"] = r.barrier.loss
        row[f"{split}_error_barrier"] = r.barrier.error
        row[f"{split}_mid_acc"] = r.midpoint["accuracy"]
        row[f"{split}_mid_loss"] = r.midpoint["loss"]
    return row


def repaired_path(x, apply_fn, a, b) -> tuple[list, float]:
    t0 = time.perf_counter()
    pts = [align.repair(x, apply_fn, a, b, tree.lerp(a, b, float(t)), t=float(t)) for t in np.linspace(0, 1, NUM)]
    return pts, time.perf_counter() - t0


def run_pair(
    width: int, seeds: tuple[int, int], ds: data.Dataset, epochs: int, ste_steps: int, ste_select: str
) -> dict:
    rec: dict = {"width": width, "seeds": list(seeds), "times_s": {}}
    t0 = time.perf_counter()
    apply_fn, a = train(width, seeds[0], ds, epochs)
    _, b = train(width, seeds[1], ds, epochs)
    rec["times_s"]["train_two_models"] = time.perf_counter() - t0
    spec = apply_fn.spec
    objectives = {
        "train": Objective(apply_fn, *ds.train, batch_size=512),
        "test": Objective(apply_fn, *ds.test, batch_size=512),
    }
    rec["endpoints"] = {
        name: {split: {k: float(v) for k, v in obj.evaluate(p).items()} for split, obj in objectives.items()}
        for name, p in (("a", a), ("b", b))
    }
    x_train = ds.train[0]

    aligned: dict[str, dict] = {"naive": {"b": b}}
    t0 = time.perf_counter()
    perm, info = align.weight_matching(jax.random.key(0), spec, a, b)
    rec["times_s"]["weight_matching"] = time.perf_counter() - t0
    aligned["weight_matching"] = {"b": align.apply(spec, perm, b), "info": info.to_dict()}
    rec["weight_matching_objective"] = {
        "reached": info.objective,
        "initial": info.initial_objective,
        "self_a": float(tree.vdot(a, a)),
        "self_b": float(tree.vdot(b, b)),
        "sweeps": info.iterations,
        "converged": info.converged,
    }
    for method in ("correlation", "second_moment"):
        align.activation_matching(spec, a, b, objectives["train"], method=method)  # warm-up (compile)
        t0 = time.perf_counter()
        perm, ainfo = align.activation_matching(spec, a, b, objectives["train"], method=method)
        rec["times_s"][f"activation_matching_{method}"] = time.perf_counter() - t0
        aligned[f"activation_{method}"] = {"b": align.apply(spec, perm, b), "info": ainfo.to_dict()}
    if ste_steps:
        t0 = time.perf_counter()
        perm, sinfo = align.ste_matching(
            jax.random.key(0), spec, a, b, objectives["train"], steps=ste_steps, batch_size=64, select=ste_select
        )
        rec["times_s"]["ste_matching"] = time.perf_counter() - t0
        info_d = sinfo.to_dict()
        info_d.pop("losses")
        aligned["ste"] = {"b": align.apply(spec, perm, b), "info": info_d}

    rows = {}
    for name, entry in aligned.items():
        bb = entry["b"]
        t0 = time.perf_counter()
        lin = curve(objectives, [tree.lerp(a, bb, float(t)) for t in np.linspace(0, 1, NUM)])
        rows[name] = {**summary(lin), "eval_s": time.perf_counter() - t0}
        pts, rep_s = repaired_path(x_train, apply_fn, a, bb)
        rep = curve(objectives, pts)
        rows[f"{name}+repair"] = {**summary(rep), "repair_s": rep_s}
    rec["paths"] = rows
    rec["matching_info"] = {k: v["info"] for k, v in aligned.items() if "info" in v}
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--ste-steps", type=int, default=200)
    parser.add_argument("--ste-select", choices=["minibatch", "dataset"], default="minibatch")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results/connectivity_digits.json"))
    args = parser.parse_args()
    ds = data.load("digits")
    results = {"device": str(jax.devices()[0]), "num_t": NUM, "ste_select": args.ste_select, "pairs": []}
    for width in args.widths:
        rec = run_pair(width, tuple(args.seeds), ds, args.epochs, args.ste_steps, args.ste_select)
        results["pairs"].append(rec)
        print(f"\n== width {width}: endpoints", json.dumps(rec["endpoints"]))
        print("weight matching objective", json.dumps(rec["weight_matching_objective"]))
        print("times", json.dumps({k: round(v, 3) for k, v in rec["times_s"].items()}))
        head = f"{'path':32s} {'trB_loss':>9s} {'trB_err':>8s} {'teB_loss':>9s} {'teB_err':>8s} {'tr_mid':>7s} {'te_mid':>7s}"
        print(head)
        for name, row in rec["paths"].items():
            print(
                f"{name:32s} {row['train_loss_barrier']:9.4f} {row['train_error_barrier']:8.4f} "
                f"{row['test_loss_barrier']:9.4f} {row['test_error_barrier']:8.4f} "
                f"{row['train_mid_acc']:7.4f} {row['test_mid_acc']:7.4f}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

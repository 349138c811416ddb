"""Linear mode connectivity of ResNet-20 xk with BatchNorm on real MNIST: naive / weight / activation
matching, each with RESET and with + REPAIR, against width.

Run by hand (not in CI; the full default takes long on a 2-core CPU)::

    .venv/bin/python benchmarks/connectivity_resnet.py [--widths 1 2 4] [--seeds 0 1] [--epochs 10]
        [--num-t 11] [--out benchmarks/results/connectivity_resnet]

    # smoke run (minutes): --epochs 1 --widths 1 --num-t 3 --train-size 500

For each width multiplier k, two ResNet-20 xk with BatchNorm (:class:`landscape.models.ResNet20`:
16k/32k/64k channels, option-B projection shortcuts, He et al. arXiv:1512.03385) are trained from
different initialisation and data-order seeds (Adam 1e-3 with cosine decay, batch 128) on the 5000
real MNIST images of ``data.mnist()`` (4000 train / 1000 test, 28x28x1, pixels in [0, 1]).
Between them:

* the straight line A -> B (naive), and A -> pi(B) for pi from weight matching (Ainsworth et al.,
  arXiv:2209.04836; the running statistics are permuted with the weights) and from activation
  matching (Tatro et al. correlation, arXiv:2009.02439);
* every interior point ``theta(t) = (1-t) theta_A + t pi(theta_B)`` is evaluated with BatchNorm
  statistics recomputed on the training set at that point (RESET, Jordan et al. arXiv:2211.08403,
  exact population statistics); the endpoints use their own running statistics;
* "+ REPAIR": the RESET point is then REPAIRed (Jordan et al.): every unit's pre-activation
  mean / std is set to the interpolation of the endpoints' on the training set, folded into the
  BatchNorm scale / shift. ``align.repair`` takes one ``apply_fn``, so each model's running
  statistics are first folded into its BatchNorm affine (:func:`fold_batchnorm`: the same function
  with canonical statistics mean 0, var 1) -- the same trick lets ``activation_matching`` see each
  endpoint with its own statistics. If ``align.repair`` rejects residual streams (the toolkit
  before issue 10 item 5), only the blocks' inner units are REPAIRed and the table says so.

Reported per path: loss and error barriers (survey Eq. 1, chord between the endpoints) on train
and test, the midpoint accuracy, and the weight-matching objective reached; written as
``<out>.json`` and a markdown table ``<out>.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landscape import Objective, align, data, models, tree
from landscape.train import Trainer, make_optimizer
from probes.curves import PathResult

BN_EPS = 1e-5  # nnx.BatchNorm's default epsilon


@dataclasses.dataclass(frozen=True)
class WithState:
    """``apply(bundle, x)`` for ``bundle = {"params": p, "state": s}``: eval mode with explicit statistics.

    Hashable (a frozen dataclass of a hashable ``FunctionalModel``), so one jitted Objective serves
    every point of every path.
    """

    fm: models.FunctionalModel

    def __call__(self, bundle: dict[str, Any], x: jax.Array) -> jax.Array:
        return self.fm.apply_with_state(bundle["params"], bundle["state"], x)


def _get(tree_: dict, path: str) -> Any:
    node = tree_
    for k in path.split("/"):
        node = node[k]
    return node


def _set(tree_: dict, path: str, value: Any) -> None:
    *head, last = path.split("/")
    node = tree_
    for k in head:
        node = node[k]
    node[last] = value


def _copy(tree_: dict) -> dict:
    return jax.tree.map(lambda v: v, tree_)


def canonical_state(state: dict) -> dict:
    """Running statistics mean 0, var 1 everywhere."""
    return jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.ones_like(v) if p[-1].key == "var" else jnp.zeros_like(v), state
    )


def fold_batchnorm(params: dict, state: dict) -> dict:
    """Params that compute, with :func:`canonical_state`, what ``(params, state)`` computes in eval mode.

    ``gamma (z - mu) / sqrt(v + eps) + beta == gamma' z / sqrt(1 + eps) + beta'`` with
    ``gamma' = gamma sqrt(1 + eps) / sqrt(v + eps)`` and ``beta' = beta - gamma mu / sqrt(v + eps)``.
    """
    out = _copy(params)
    for name, mean in tree.named_leaves(state):
        if not name.endswith("/mean"):
            continue
        prefix = name[: -len("/mean")]
        var = _get(state, f"{prefix}/var")
        gamma, beta = _get(params, f"{prefix}/scale"), _get(params, f"{prefix}/bias")
        inv = 1.0 / jnp.sqrt(var + BN_EPS)
        _set(out, f"{prefix}/scale", gamma * jnp.sqrt(1.0 + BN_EPS) * inv)
        _set(out, f"{prefix}/bias", beta - gamma * mean * inv)
    return out


def repair_groups(spec: align.PermutationSpec, params: dict) -> tuple[dict | None, str]:
    """``(layers, note)``: ``None`` (the library's own choice, every group) or the inner groups only."""
    try:
        align.repair_layers(spec, params)
        return None, "every unit group"
    except ValueError as err:
        layers = {}
        for n in spec.names:
            if "_block" in n:  # P_stage<i>_block<j>: produced by that block's norm1
                i, j = n[len("P_stage"):].split("_block")
                prefix = f"stages/{i}/blocks/{j}/norm1"
                layers[n] = (f"{prefix}/scale", f"{prefix}/bias")
        first = str(err).split(":")[0]
        return layers, f"inner units only (align.repair rejects the residual streams: {first})"


def train(k: int, seed: int, ds: data.Dataset, epochs: int, batch_size: int):
    model = models.build("resnet20", jax.random.key(seed), in_channels=1, num_classes=10, width_multiplier=k)
    apply_fn, params, state = models.functional(model)
    steps = epochs * (ds.x_train.shape[0] // batch_size)
    opt = make_optimizer("adam", learning_rate=1e-3, schedule="cosine", total_steps=steps)
    trainer = Trainer(apply_fn, *ds.train, optimizer=opt, batch_size=batch_size)
    result = trainer.run(jax.random.key(1000 + seed), trainer.init(params, state), epochs=epochs)
    return apply_fn, result.state.params, result.state.model_state


def evaluate_path(objectives: dict[str, Objective], ts: np.ndarray, bundles: list[dict]) -> dict[str, PathResult]:
    out = {}
    for split, obj in objectives.items():
        ev = [obj.evaluate(bd) for bd in bundles]
        out[split] = PathResult(
            ts=jnp.asarray(ts),
            loss=jnp.asarray([float(e["loss"]) for e in ev]),
            accuracy=jnp.asarray([float(e["accuracy"]) for e in ev]),
            stats="reset",
            end_stats="own",
        )
    return out


def summary(paths: dict[str, PathResult]) -> dict[str, float]:
    row = {}
    for split, r in paths.items():
        row[f"{split}_loss_barrier"] = float(r.barrier.loss)
        row[f"{split}_error_barrier"] = float(r.barrier.error)
        row[f"{split}_mid_acc"] = float(r.accuracy[len(r.ts) // 2])
    return row


def run_pair(k: int, seeds: tuple[int, int], ds: data.Dataset, args: argparse.Namespace) -> dict:
    rec: dict = {"width_multiplier": k, "seeds": list(seeds), "times_s": {}}
    t0 = time.perf_counter()
    apply_fn, a, sa = train(k, seeds[0], ds, args.epochs, args.batch_size)
    _, b, sb = train(k, seeds[1], ds, args.epochs, args.batch_size)
    rec["times_s"]["train_two_models"] = time.perf_counter() - t0
    rec["num_params"] = tree.num_params(a)
    spec = apply_fn.spec
    x_train = ds.train[0]
    with_state = WithState(apply_fn)
    objectives = {
        "train": Objective(with_state, *ds.train, batch_size=args.eval_batch),
        "test": Objective(with_state, *ds.test, batch_size=args.eval_batch),
    }
    canon = canonical_state(sa)
    apply_canon = apply_fn.with_state(canon)
    canon_objective = Objective(apply_canon, *ds.train, batch_size=args.eval_batch)
    fa, fb = fold_batchnorm(a, sa), fold_batchnorm(b, sb)
    check = float(jnp.max(jnp.abs(apply_canon(fa, x_train[:64]) - apply_fn.apply_with_state(a, sa, x_train[:64]))))
    rec["fold_check_max_abs_logit_diff"] = check
    rec["endpoints"] = {
        name: {split: {m: float(v) for m, v in obj.evaluate({"params": p, "state": s}).items()}
               for split, obj in objectives.items()}
        for name, p, s in (("a", a, sa), ("b", b, sb))
    }

    aligned: dict[str, tuple[dict, dict]] = {"naive": (b, sb)}
    t0 = time.perf_counter()
    perm, info = align.weight_matching(jax.random.key(0), spec, a, b)
    rec["times_s"]["weight_matching"] = time.perf_counter() - t0
    aligned["weight_matching"] = (align.apply(spec, perm, b), align.apply_state(spec, perm, sb))
    rec["weight_matching_objective"] = {
        "reached": info.objective, "initial": info.initial_objective, "self_a": float(tree.vdot(a, a)),
        "sweeps": info.iterations, "converged": info.converged,
    }
    t0 = time.perf_counter()
    perm, _ = align.activation_matching(spec, fa, fb, canon_objective, method="correlation")
    rec["times_s"]["activation_matching"] = time.perf_counter() - t0
    aligned["activation_matching"] = (align.apply(spec, perm, b), align.apply_state(spec, perm, sb))

    layers, rec["repair_scope"] = repair_groups(spec, fa)
    ts = np.linspace(0.0, 1.0, args.num_t)
    rows = {}
    for name, (bb, sbb) in aligned.items():
        t0 = time.perf_counter()
        reset_pts, repaired_pts = [], []
        fbb = fold_batchnorm(bb, sbb)
        for t in ts:
            p_t = tree.lerp(a, bb, float(t))
            if t == 0.0:
                s_t = sa
            elif t == 1.0:
                s_t = sbb
            else:
                s_t = align.reset(apply_fn, p_t, sa, x_train, batch_size=args.eval_batch)
            reset_pts.append({"params": p_t, "state": s_t})
            repaired = align.repair(
                x_train, apply_canon, fa, fbb, fold_batchnorm(p_t, s_t), t=float(t), layers=layers,
                batch_size=args.eval_batch,
            )
            repaired_pts.append({"params": repaired, "state": canon})
        rec["times_s"][f"points_{name}"] = time.perf_counter() - t0
        rows[f"{name} (RESET)"] = summary(evaluate_path(objectives, ts, reset_pts))
        rows[f"{name} + REPAIR"] = summary(evaluate_path(objectives, ts, repaired_pts))
    rec["paths"] = rows
    return rec


def markdown(results: dict) -> str:
    lines = [
        "# Linear mode connectivity: ResNet-20 xk with BatchNorm on MNIST (5000 real images)",
        "",
        f"Device: {results['device']}. Seeds {results['seeds']}, {results['epochs']} epochs, "
        f"{results['num_t']} points per path; interior points with RESET statistics, endpoints "
        "with their own. Barriers: survey Eq. 1 (chord between endpoint values).",
        "",
    ]
    for rec in results["pairs"]:
        ea, eb = rec["endpoints"]["a"], rec["endpoints"]["b"]
        wm = rec["weight_matching_objective"]
        lines += [
            f"## x{rec['width_multiplier']} ({rec['num_params']:,} params)",
            "",
            f"Endpoints test accuracy A {ea['test']['accuracy']:.4f}, B {eb['test']['accuracy']:.4f}; "
            f"train loss A {ea['train']['loss']:.4f}, B {eb['train']['loss']:.4f}. Weight matching "
            f"objective {wm['initial']:.4g} -> {wm['reached']:.4g} ({wm['sweeps']} sweeps, "
            f"converged {wm['converged']}). REPAIR scope: {rec['repair_scope']}.",
            "",
            "| path | train loss barrier | train error barrier | test loss barrier | test error barrier | test mid acc |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, row in rec["paths"].items():
            lines.append(
                f"| {name} | {row['train_loss_barrier']:.4f} | {row['train_error_barrier']:.4f} | "
                f"{row['test_loss_barrier']:.4f} | {row['test_error_barrier']:.4f} | {row['test_mid_acc']:.4f} |"
            )
        lines += ["", "Times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in rec["times_s"].items()), ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-batch", type=int, default=500)
    parser.add_argument("--num-t", type=int, default=11)
    parser.add_argument("--train-size", type=int, default=None, help="use only this many training images (smoke runs)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results/connectivity_resnet"))
    args = parser.parse_args()
    if args.num_t < 3 or args.num_t % 2 == 0:
        parser.error(f"--num-t must be odd and >= 3 (a midpoint), got {args.num_t}")
    ds = data.mnist()
    if args.train_size is not None:
        ds = ds.replace(x_train=ds.x_train[: args.train_size], y_train=ds.y_train[: args.train_size])
    results = {
        "device": str(jax.devices()[0]), "num_t": args.num_t, "seeds": list(args.seeds), "epochs": args.epochs,
        "dataset": ds.to_dict(), "pairs": [],
    }
    for k in args.widths:
        rec = run_pair(k, tuple(args.seeds), ds, args)
        results["pairs"].append(rec)
        print(f"\n== x{k}: endpoints", json.dumps(rec["endpoints"]), "fold check", rec["fold_check_max_abs_logit_diff"])
        for name, row in rec["paths"].items():
            print(f"{name:32s} " + " ".join(f"{key}={val:.4f}" for key, val in row.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    args.out.with_suffix(".md").write_text(markdown(results))
    print(f"\nwrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

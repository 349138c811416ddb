"""OT fusion and singular-direction alignment on two independently trained digits MLPs (run by hand).

Two MLPs with hidden widths (64, 64, 64) (init seeds 0 / 1, data-order seeds 1000 / 1001) are
trained for 30 epochs with Adam 1e-3, batch 64, on scikit-learn digits. We report, on the training
and the test set, the loss / error barrier (survey Eq. 1, 25 points) of the straight line from A
to B and the accuracy at its midpoint for

* naive: B as trained (the midpoint is the plain average);
* weight matching (Ainsworth et al.): A to pi(B);
* OT fusion (Singh & Jaggi, arXiv 1910.05653), exact and Sinkhorn, weight- and activation-based:
  A to B aligned by the transport maps; the midpoint of that line is the OT-fused model;

then fusion into A's width of a wider model B' (128, 128, 128), and the singular-direction
alignment (Ito et al., arXiv 2402.04051) of A with B before / after weight matching and after the
OT permutation. Writes ``benchmarks/results/ot_singular_digits.json`` and prints a table.

    .venv/bin/python benchmarks/ot_singular_digits.py
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np

from landscape import Objective, align, data, models
from landscape.train import Trainer, make_optimizer
from probes.curves import interpolate
from probes.singular import singular_alignment

OUT = pathlib.Path(__file__).resolve().parent / "results" / "ot_singular_digits.json"


def train(ds, widths, init_seed, data_seed, epochs=30):
    fm, params, state = models.functional(
        models.build("mlp", jax.random.key(init_seed), in_features=64, widths=(*widths, 10))
    )
    trainer = Trainer(fm, *ds.train, optimizer=make_optimizer("adam", learning_rate=1e-3), batch_size=64)
    res = trainer.run(jax.random.key(data_seed), trainer.init(params, state), epochs=epochs)
    return fm, res.params


def line(train_obj, test_obj, a, b):
    out = {}
    for split, obj in (("train", train_obj), ("test", test_obj)):
        r = interpolate(obj, a, b, num=25)
        bar = r.barrier
        out[split] = {
            "barrier_loss": bar.loss,
            "barrier_error": bar.error,
            "midpoint_loss": r.midpoint["loss"],
            "midpoint_accuracy": r.midpoint["accuracy"],
            "endpoint_accuracy": [float(r.accuracy[0]), float(r.accuracy[-1])],
        }
    return out


def main() -> None:
    ds = data.load("digits")
    t0 = time.perf_counter()
    fm, a = train(ds, (64, 64, 64), 0, 1000)
    _, b = train(ds, (64, 64, 64), 1, 1001)
    fm_wide, wide = train(ds, (128, 128, 128), 2, 1002)
    t_train = time.perf_counter() - t0
    train_obj, test_obj = Objective(fm, *ds.train), Objective(fm, *ds.test)
    spec = fm.spec
    rows: dict[str, dict] = {}
    times: dict[str, float] = {"train_3_models": t_train}

    rows["naive"] = line(train_obj, test_obj, a, b)

    t = time.perf_counter()
    perm_wm, info_wm = align.weight_matching(jax.random.key(0), spec, a, b)
    times["weight_matching"] = time.perf_counter() - t
    b_wm = align.apply(spec, perm_wm, b)
    rows["weight_matching"] = line(train_obj, test_obj, a, b_wm)

    ot_infos = {}
    for name, kwargs in (
        ("ot_exact_weights", {}),
        ("ot_sinkhorn_weights_eps0.1", {"solver": "sinkhorn", "epsilon": 0.1}),
        ("ot_sinkhorn_weights_eps0.01", {"solver": "sinkhorn", "epsilon": 0.01}),
        ("ot_sinkhorn_weights_eps0.001", {"solver": "sinkhorn", "epsilon": 0.001}),
        ("ot_exact_activations", {"ground": "activations", "objective": train_obj}),
    ):
        t = time.perf_counter()
        fused, info = align.ot_fusion(spec, a, b, **kwargs)
        times[name] = time.perf_counter() - t
        ot_infos[name] = info
        rows[name] = line(train_obj, test_obj, a, info.aligned)
        rows[name]["fused_train_accuracy"] = float(train_obj.evaluate(fused)["accuracy"])
        rows[name]["fused_test_accuracy"] = float(test_obj.evaluate(fused)["accuracy"])
        rows[name]["is_permutation"] = info.is_permutation
        rows[name]["converged"] = list(info.converged)

    # unequal widths: fuse the wider B' into A's width
    unequal = {}
    for name, kwargs in (
        ("exact_weights", {}),
        ("exact_activations", {"ground": "activations", "objective": train_obj, "apply_fn": (fm, fm_wide)}),
    ):
        t = time.perf_counter()
        fused, info = align.ot_fusion(spec, a, wide, **kwargs)
        times[f"unequal_{name}"] = time.perf_counter() - t
        unequal[name] = {
            "aligned_wide_test_accuracy": float(test_obj.evaluate(info.aligned)["accuracy"]),
            "fused_train_accuracy": float(train_obj.evaluate(fused)["accuracy"]),
            "fused_test_accuracy": float(test_obj.evaluate(fused)["accuracy"]),
        }
    unequal["wide_test_accuracy"] = float(Objective(fm_wide, *ds.test).evaluate(wide)["accuracy"])

    t = time.perf_counter()
    sa_wm = singular_alignment(a, b, k=10, perm=perm_wm, spec=spec)
    sa_ot = singular_alignment(a, b, k=10, perm=ot_infos["ot_exact_weights"].perm, spec=spec)
    times["singular_alignment_x2"] = time.perf_counter() - t
    singular = {
        "weight_matching": sa_wm.summary(),
        "ot_exact_weights": sa_ot.summary(),
        "per_index_v_after_wm": sa_wm.after.to_dict()["v"],
        "angles_v_deg_before": {n: np.degrees(np.asarray(x)).round(1).tolist() for n, x in sa_wm.before.angles_v.items()},
        "angles_v_deg_after_wm": {n: np.degrees(np.asarray(x)).round(1).tolist() for n, x in sa_wm.after.angles_v.items()},
    }

    result = {
        "setup": "digits, MLP 64-64-64-10, Adam 1e-3, batch 64, 30 epochs, seeds (0,1000) and (1,1001); "
        "wide model 128-128-128 seeds (2,1002); barriers from 25 points",
        "device": str(jax.devices()[0]),
        "weight_matching_objective": info_wm.objective,
        "lines": rows,
        "unequal_widths": unequal,
        "singular": singular,
        "seconds": times,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))

    print(
        f"{'method':30s} {'trB loss':>9s} {'trB err':>8s} {'teB loss':>9s} {'teB err':>8s} "
        f"{'mid acc tr':>10s} {'mid acc te':>10s} {'B-end acc te':>12s}"
    )
    for name, r in rows.items():
        tr, te = r["train"], r["test"]
        print(
            f"{name:30s} {tr['barrier_loss']:9.4f} {tr['barrier_error']:8.4f} {te['barrier_loss']:9.4f} "
            f"{te['barrier_error']:8.4f} {tr['midpoint_accuracy']:10.4f} {te['midpoint_accuracy']:10.4f} "
            f"{te['endpoint_accuracy'][1]:12.4f}"
        )
    print("endpoint accuracy (train, test):", rows["naive"]["train"]["endpoint_accuracy"], rows["naive"]["test"]["endpoint_accuracy"])
    print("unequal widths:", json.dumps(unequal))
    for name in ("weight_matching", "ot_exact_weights"):
        s = singular[name]
        for key in ("", "subspace_"):
            fmt = lambda d: {k.split("/")[1]: round(v, 3) for k, v in d.items()}  # noqa: E731
            print(
                f"singular {key or 'pairwise_'}alignment, {name}: before {fmt(s[key + 'before'])} "
                f"-> after {fmt(s[key + 'after'])}"
            )
    print("seconds:", json.dumps({k: round(v, 3) for k, v in times.items()}))
    print("wrote", OUT)


if __name__ == "__main__":
    main()

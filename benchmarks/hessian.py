"""Benchmark: probes.hessian against PyHessian on the same trained digits MLPs (run by hand).

    .venv/bin/python benchmarks/hessian.py            # both models, full 1797-image dataset
    .venv/bin/python benchmarks/hessian.py --quick    # the ~1k-parameter model only

What it does, in one run:

1. Creates ``benchmarks/.venv-torch`` on first use (``python -m venv``) and installs
   ``torch==2.13.0`` (the local CPU build; never unpinned) and PyPI ``pyhessian==0.1`` with
   ``--no-deps``. PyHessian 0.1's ``density`` calls ``torch.eig``, which current torch removed:
   the torch side of this script sets ``torch.eig`` to a shim over ``torch.linalg.eigh`` (the
   Lanczos ``T`` is symmetric; ``torch.eig`` returned ``(n, 2)`` real/imaginary eigenvalues and the
   eigenvectors as columns, and the shim returns exactly that) before calling it. Nothing else in
   PyHessian is changed.
2. Trains (or loads from ``benchmarks/results/``) two ReLU MLPs on all 1797 digits with optax:
   64-512-512-10 (301k parameters) and 64-14-10 (1,060 parameters), and exports the weights and
   data as ``.npz``.
3. Runs PyHessian in the torch venv with its defaults (``eigenvalues(maxIter=100, tol=1e-3,
   top_n=1|5)``, ``trace(maxIter=100, tol=1e-3)``, ``density(iter=100, n_v=1)``) on a dataloader
   of 512-example batches covering the full dataset, and ours with its defaults (``eigenvalues``
   stops once the wanted Ritz pairs have residuals below 1e-3 of the largest) on the same
   weights. The two sides alternate for ``--rounds`` rounds (default 2) of ``--repeats`` runs
   each (default 2): the load of a shared machine drifts over minutes, and alternating spreads
   that over both sides. Every run draws a new random start on both sides.
4. Computes a float64 reference in JAX (one Lanczos run of 120 steps for the top-5 and the
   smallest eigenvalue, residuals listed; the trace exactly from the dense Hessian for the small
   model and by float64 XTrace with 64 probes for the large one, with its standard error).
   PyHessian's results are cached in ``benchmarks/results/`` next to the weights they belong to;
   ``--rerun-peer`` reruns them.
5. Prints and writes ``benchmarks/results/hessian.md`` and ``hessian.json``: median values,
   relative errors against the reference, wall and CPU times over all runs, and their ratios
   (PyHessian / ours; ours after compilation, compile time listed apart). Medians, since
   PyHessian's iteration counts depend on its random start; trace times are per product, since
   its Hutchinson loop picks its own number of probes. Every wall time is listed under the table.

Both sides run on the same CPU threads. The differences come from the algorithms (Lanczos with
full reorthogonalisation and a residual-based stop reaches the float32 floor with fewer products
than power iteration with deflation, which stops on a 1e-3 relative change), from the product
(ours hoists the primal pass out of the loop), and from the loss (ours is free of cancellation at
a confident fit, so the float32 floor itself is 10x lower).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
TORCH_VENV = HERE / ".venv-torch"
TORCH_PY = TORCH_VENV / "bin" / "python"
MODELS = {"mlp-512": (64, 512, 512, 10), "mlp-1k": (64, 14, 10)}
BATCH = 512


# ----------------------------------------------------------------------------------- torch side
def torch_side(weights: str, out: str, seed: int, device: str = "cpu", repeats: int = 1) -> None:
    """Run PyHessian on the exported model; write timings and values to ``out`` (JSON).

    Each quantity is measured ``repeats`` times (fresh random starts each time, as PyHessian
    draws them); every run is kept with its wall and CPU time and its values."""
    import numpy as np
    import torch
    from pyhessian import hessian as pyhessian

    def eig_shim(a: torch.Tensor, eigenvectors: bool = False):  # torch.eig was removed in torch 2.x
        vals, vecs = torch.linalg.eigh(a)
        return torch.stack([vals, torch.zeros_like(vals)], dim=1), vecs

    torch.eig = eig_shim
    torch.manual_seed(seed)
    data = np.load(weights)
    sizes = [int(s) for s in data["sizes"]]
    layers: list[torch.nn.Module] = []
    for i in range(len(sizes) - 1):
        lin = torch.nn.Linear(sizes[i], sizes[i + 1])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(data[f"kernel{i}"].T.copy()))
            lin.bias.copy_(torch.from_numpy(data[f"bias{i}"]))
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers).to(device)
    x = torch.from_numpy(data["x"]).to(device)
    y = torch.from_numpy(data["y"]).long().to(device)
    loader = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]
    crit = torch.nn.CrossEntropyLoss()
    comp = pyhessian(model, crit, dataloader=loader, cuda=device == "cuda")
    res: dict = {"threads": torch.get_num_threads(), "device": device}

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    v = [torch.randn_like(p) for p in comp.params]
    comp.dataloader_hv_product(v)
    sync()
    t0 = time.perf_counter()
    for _ in range(5):
        comp.dataloader_hv_product(v)
    sync()
    res["hvp"] = (time.perf_counter() - t0) / 5

    def best(run) -> dict:
        rows = []
        for _ in range(repeats):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            row = run()
            sync()
            rows.append({"time": time.perf_counter() - t0, "cpu": time.process_time() - c0, **row})
        return {"runs": rows}

    for top_n in (1, 5):
        res[f"top{top_n}"] = best(lambda top_n=top_n: {"values": [float(a) for a in comp.eigenvalues(top_n=top_n)[0]]})

    def trace_row() -> dict:
        samples = comp.trace()
        return {"value": float(np.mean(samples)), "probes": len(samples)}

    def density_row() -> dict:
        nodes, wts = comp.density()
        return {"nodes": [float(a) for a in nodes[0]], "weights": [float(a) for a in wts[0]]}

    res["trace"] = best(trace_row)
    res["density"] = best(density_row)
    pathlib.Path(out).write_text(json.dumps(res))


def ensure_torch_venv() -> None:
    """Create benchmarks/.venv-torch with torch==2.13.0 and pyhessian==0.1 (no deps) once."""
    if TORCH_PY.exists():
        probe = subprocess.run([str(TORCH_PY), "-c", "import torch, pyhessian, numpy"], capture_output=True)
        if probe.returncode == 0:
            return
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(TORCH_VENV)], check=True)
    pip = [str(TORCH_PY), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "torch==2.13.0", "numpy"], check=True)
    subprocess.run([*pip, "--no-deps", "pyhessian==0.1"], check=True)


# ------------------------------------------------------------------------------------- jax side
def train(sizes: tuple[int, ...], x, y, *, steps: int, seed: int):
    """Full-batch Adam on the cross-entropy loss; returns a dict-of-arrays params tree."""
    import jax
    import jax.numpy as jnp
    import optax

    from landscape import Objective

    keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
    params = {
        "layers": {
            str(i): {
                "kernel": jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a),
                "bias": jnp.zeros(b),
            }
            for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
        }
    }
    obj = Objective(apply_fn, x, y, batch_size=BATCH)
    opt = optax.adam(1e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(obj.loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params


def apply_fn(params, x):
    import jax

    layers = params["layers"]
    h = x
    for i in range(len(layers)):
        h = h @ layers[str(i)]["kernel"] + layers[str(i)]["bias"]
        if i < len(layers) - 1:
            h = jax.nn.relu(h)
    return h


def timed(fn, repeats: int = 1):
    """(first-call seconds, best later-call seconds, its CPU seconds, result, runs) where runs holds
    ``(wall, cpu, result)`` of every later call."""
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    best, cpu, runs = float("inf"), float("inf"), []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = jax.block_until_ready(fn())
        wall, used = time.perf_counter() - t0, time.process_time() - c0
        runs.append((wall, used, out))
        if wall < best:
            best, cpu = wall, used
    return first, best, cpu, out, runs


def run_model(
    name: str, sizes: tuple[int, ...], x, y, *, seed: int, steps: int, rerun_peer: bool, device: str = "cpu",
    peer_python: str | None = None, rounds: int = 2, repeats: int = 2,
) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from landscape import Objective, tree
    from probes import hessian

    RESULTS.mkdir(parents=True, exist_ok=True)
    wfile = RESULTS / f"{name}.npz"
    if wfile.exists():
        data = np.load(wfile)
        params = {
            "layers": {
                str(i): {"kernel": jnp.asarray(data[f"kernel{i}"]), "bias": jnp.asarray(data[f"bias{i}"])}
                for i in range(len(sizes) - 1)
            }
        }
    else:
        params = train(sizes, x, y, steps=steps, seed=seed)
        arrays = {"sizes": np.asarray(sizes), "x": np.asarray(x), "y": np.asarray(y)}
        for i in range(len(sizes) - 1):
            arrays[f"kernel{i}"] = np.asarray(params["layers"][str(i)]["kernel"])
            arrays[f"bias{i}"] = np.asarray(params["layers"][str(i)]["bias"])
        np.savez(wfile, **arrays)
    obj = Objective(apply_fn, x, y, batch_size=BATCH)
    n = tree.num_params(params)
    out: dict = {"name": name, "sizes": list(sizes), "num_params": n, **{k: float(v) for k, v in obj.evaluate(params).items()}}
    print(f"[{name}] {n} parameters, loss {out['loss']:.4f}, accuracy {out['accuracy']:.4f}", flush=True)

    # --- float64 reference
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        o64 = Objective(apply_fn, jnp.asarray(x, jnp.float64), y, batch_size=BATCH)
        ref_eig = hessian.eigenvalues(jax.random.key(100), o64, p64, k=5, which="both", num_steps=min(120, n))
        if n <= 5000:
            ref_trace, ref_se = float(jnp.trace(hessian.dense_matrix(o64, p64))), 0.0
        else:
            est = hessian.trace(jax.random.key(102), o64, p64, method="xtrace", num_probes=64)
            ref_trace, ref_se = float(est.estimate), float(est.stderr)
        ref = {
            "top": [float(a) for a in ref_eig.eigenvalues[:5]],
            "top_residuals": [float(a) for a in ref_eig.residuals[:5]],
            "bottom": float(ref_eig.eigenvalues[5]),
            "bottom_residual": float(ref_eig.residuals[5]),
            "trace": ref_trace,
            "trace_stderr": ref_se,
        }
    out["reference"] = ref
    print(f"[{name}] float64 reference done", flush=True)

    # --- PyHessian and ours, interleaved: machine load drifts over minutes, so each side is
    # measured in every round; every run is kept and the table reports medians
    tfile = RESULTS / f"{name}-pyhessian.json"
    rerun = (
        rerun_peer or not tfile.exists() or tfile.stat().st_mtime < wfile.stat().st_mtime
        or "runs" not in json.loads(tfile.read_text()).get("top1", {})
    )
    peer, ours, trace_probes = None, None, None
    for r in range(rounds):
        if rerun:
            subprocess.run(
                [peer_python or str(TORCH_PY), __file__, "--torch-side", str(wfile), str(tfile), "--seed",
                 str(seed + r), "--device", device, "--repeats", str(repeats)],
                check=True, env=os.environ if peer_python else {**os.environ, "PYTHONPATH": ""},
            )
        if rerun or peer is None:
            peer = merge_runs(peer, json.loads(tfile.read_text()))
            print(f"[{name}] round {r}: pyhessian {'done' if rerun else 'loaded from ' + tfile.name}", flush=True)
        trace_probes = trace_probes or peer["trace"]["runs"][0]["probes"]  # the first run's count, every round
        ours = merge_runs(ours, measure_ours(obj, params, n, seed=seed, trace_probes=trace_probes, repeats=repeats))
        print(f"[{name}] round {r}: ours done", flush=True)
    tfile.write_text(json.dumps(peer))  # the cache keeps every run of every round
    out["pyhessian"], out["ours"] = peer, ours
    return out


def merge_runs(old: dict | None, new: dict) -> dict:
    """Merge two measurement records: every run of every quantity, the fastest HVP."""
    if old is None:
        return new
    merged = dict(new)
    for key, val in new.items():
        if isinstance(val, dict) and "runs" in val and key in old:
            # compile time: the first round's (later rounds reuse the compiled code)
            merged[key] = {**val, **{k: v for k, v in old[key].items() if k == "compile"},
                           "runs": old[key]["runs"] + val["runs"]}
        elif key == "hvp":
            merged[key] = min(old[key], val)
    return merged


def measure_ours(obj, params, n: int, *, seed: int, trace_probes: int, repeats: int) -> dict:
    """probes.hessian with its defaults (top-k stops on a 1e-3 relative residual), float32. Each
    run draws a new key, as PyHessian draws a new random start."""
    import jax
    import numpy as np

    from landscape import tree
    from probes import hessian

    base = jax.random.key(seed)
    counter = itertools.count()
    ours: dict = {}
    v = tree.random_like(base, params)
    hvp = jax.jit(lambda p, w: hessian.hvp(obj, p, w))
    _, best, _, _, _ = timed(lambda: hvp(params, v), repeats=5)
    ours["hvp"] = best

    def record(fn, values) -> dict:
        first, best, _, _, runs = timed(lambda: fn(jax.random.fold_in(base, next(counter))), repeats)
        return {"compile": first - best, "runs": [{"time": w, "cpu": c, **values(out)} for w, c, out in runs]}

    for k in (1, 5):
        ours[f"top{k}"] = record(
            lambda key, k=k: hessian.eigenvalues(key, obj, params, k=k),
            lambda spec: {"values": [float(a) for a in spec.eigenvalues], "num_steps": int(spec.num_matvecs),
                          "converged": bool(spec.converged)},
        )
    m = trace_probes
    for method, probes in (("hutchinson", max(m, 2)), ("xtrace", max(2, min(m // 2, n // 4)))):
        ours[f"trace_{method}"] = record(
            lambda key, method=method, probes=probes: hessian.trace(key, obj, params, method=method, num_probes=probes),
            lambda est, probes=probes: {"value": float(est.estimate), "stderr": float(est.stderr), "probes": probes,
                                        "products": est.num_matvecs},
        )
    d_steps = min(100, n)
    ours["density"] = record(
        lambda key: hessian.density(key, obj, params, num_probes=1, num_steps=d_steps),
        lambda dens: {"nodes": np.asarray(dens.nodes[0]).tolist(), "weights": np.asarray(dens.weights[0]).tolist()},
    )
    return ours


def relerr(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _median(xs: list[float]) -> float:
    import numpy as np

    return float(np.median(np.asarray(xs, dtype=float)))


def table(res: dict) -> str:
    """Markdown table of one model's results: medians over every run of each side.

    Medians, not minima: PyHessian's power iteration and Hutchinson loop stop after a random number
    of products (a new random start per call), so its fastest run is its luckiest. Trace times are
    compared per product (PyHessian's Hutchinson picks its own number of probes).
    """
    ph, us, ref = res["pyhessian"], res["ours"], res["reference"]
    lines = [
        f"### {res['name']}: {res['num_params']:,} parameters, {res['sizes']}, "
        f"loss {res['loss']:.4f}, accuracy {res['accuracy']:.4f}",
        "",
        f"Float64 reference: top-5 {[round(v, 6) for v in ref['top']]}, λmin {ref['bottom']:.6g}, "
        f"trace {ref['trace']:.6g} ± {ref['trace_stderr']:.2g}. "
        f"One HVP: PyHessian {ph['hvp'] * 1e3:.2f} ms, ours {us['hvp'] * 1e3:.2f} ms. "
        f"Runs: PyHessian {len(ph['top1']['runs'])}, ours {len(us['top1']['runs'])} per quantity.",
        "",
        "| quantity | PyHessian median value | PyHessian median rel. error | PyHessian median wall / CPU (s) "
        "| ours median value | ours median rel. error | ours median wall / CPU (s) | ours compile (s) "
        "| wall ratio | CPU ratio | accuracy ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def row(label, p_runs, o_runs, err, show, compile_s, per=None):
        """One line; ``err(run)`` is a run's relative error, ``show(run)`` its value, ``per(run)``
        its number of products (times are then per product)."""
        def stats(runs):
            errs = [err(r) for r in runs]
            scale = [per(r) if per else 1 for r in runs]
            mid = sorted(range(len(runs)), key=lambda i: errs[i])[len(runs) // 2]
            return (
                show(runs[mid]), _median(errs), _median([r["time"] / s_ for r, s_ in zip(runs, scale)]),
                _median([r["cpu"] / s_ for r, s_ in zip(runs, scale)]),
            )

        pv, pe, pt, pc = stats(p_runs)
        ov, oe, ot, oc = stats(o_runs)
        unit = " per product" if per else ""
        lines.append(
            f"| {label} | {pv} | {pe:.2e} | {pt:.4g} / {pc:.4g}{unit} | {ov} | {oe:.2e} | {ot:.4g} / {oc:.4g}{unit} "
            f"| {compile_s:.2f} | {pt / ot:.1f}x | {pc / oc:.1f}x | {pe / oe if oe > 0 else float('inf'):.3g}x |"
        )

    for k in (1, 5):
        def err(r, k=k):
            vals = sorted(r["values"], reverse=True)
            return max(relerr(a, b) for a, b in zip(vals, ref["top"][:k]))

        steps = sorted({r["num_steps"] for r in us[f"top{k}"]["runs"]})
        row(f"top-{k} (max rel. err.; ours {'/'.join(map(str, steps))} Lanczos steps)", ph[f"top{k}"]["runs"],
            us[f"top{k}"]["runs"], err, lambda r: f"{max(r['values']):.6g}", us[f"top{k}"]["compile"])
    for method in ("hutchinson", "xtrace"):
        t = us[f"trace_{method}"]
        p_probes = sorted({r["probes"] for r in ph["trace"]["runs"]})
        row(
            f"trace (PyHessian {'/'.join(map(str, p_probes))} probes vs {method} {t['runs'][0]['probes']} probes, "
            f"{t['runs'][0]['products']} products; ours ± {t['runs'][0]['stderr']:.3g})",
            ph["trace"]["runs"], t["runs"], lambda r: relerr(r["value"], ref["trace"]), lambda r: f"{r['value']:.6g}",
            t["compile"], per=lambda r: r.get("products", r.get("probes")),
        )

    def node_err(r):
        return max(relerr(max(r["nodes"]), ref["top"][0]), relerr(min(r["nodes"]), ref["bottom"]))

    row(
        "density, 1 probe × 100 steps (rel. err. of extreme nodes vs λmax, λmin)", ph["density"]["runs"],
        us["density"]["runs"], node_err, lambda r: f"[{min(r['nodes']):.4g}, {max(r['nodes']):.4g}]",
        us["density"]["compile"],
    )
    lines += ["", "All wall times (s):", ""]
    for q in ("top1", "top5", "trace", "density"):
        theirs = ", ".join(f"{r['time']:.3f}" for r in ph[q]["runs"])
        mine = ", ".join(f"{r['time']:.3f}" for r in us["trace_hutchinson" if q == "trace" else q]["runs"])
        lines.append(f"- {q}: PyHessian {theirs}; ours {mine}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the ~1k-parameter model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300, help="full-batch Adam steps for training")
    parser.add_argument("--rerun-peer", action="store_true", help="rerun PyHessian even if its results exist")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="PyHessian's torch device")
    parser.add_argument("--peer-python", default=None,
                        help="a python with torch installed to run PyHessian with (skips creating the venv; "
                             "pyhessian must be importable there)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved rounds of PyHessian and ours (medians over all runs are reported)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of every quantity per side and round")
    parser.add_argument("--torch-side", nargs=2, metavar=("WEIGHTS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_side:
        torch_side(*args.torch_side, seed=args.seed, device=args.device, repeats=args.repeats)
        return

    import jax.numpy as jnp
    from sklearn.datasets import load_digits

    if args.peer_python is None:
        ensure_torch_venv()
    x_np, y_np = load_digits(return_X_y=True)
    x, y = jnp.asarray(x_np / 16.0, jnp.float32), jnp.asarray(y_np, jnp.int32)
    names = ["mlp-1k"] if args.quick else ["mlp-512", "mlp-1k"]
    results = [
        run_model(nm, MODELS[nm], x, y, seed=args.seed, steps=args.steps, rerun_peer=args.rerun_peer,
                  device=args.device, peer_python=args.peer_python, rounds=args.rounds, repeats=args.repeats)
        for nm in names
    ]
    text = "\n\n".join(table(r) for r in results)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hessian.md").write_text(text + "\n")
    (RESULTS / "hessian.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

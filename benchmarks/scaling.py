"""Strong and weak scaling of curvature and surface probes over 1, 2, 4, 8 devices, and memory caps.

Run by hand (not in CI)::

    .venv/bin/python benchmarks/scaling.py --out benchmarks/results/scaling          # full settings
    .venv/bin/python benchmarks/scaling.py --quick --out /tmp/scaling                # small settings

Each device count runs in a fresh subprocess (the device count of a JAX process is fixed when its
backend starts): on CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (forced host
devices share the machine's cores, so they test correctness and overheads, not speed-ups); on an
accelerator machine with ``--platform gpu`` and the first ``D`` devices (``CUDA_VISIBLE_DEVICES``).

Measured, per device count ``D`` (the median of ``--repeats`` runs after one compiling run):

* **strong scaling** — a fixed problem: top-5 Hessian eigenvalues (Lanczos, fixed step count) and an
  SLQ density of an MLP whose large leaves are sharded over a ``"model"`` axis of ``D`` devices
  (:func:`landscape.sharding.shard_params`), and a 41 x 41 loss surface with its grid points sharded
  over a ``"grid"`` axis (:func:`landscape.sharding.evaluate_grid`).
* **weak scaling** — work per device fixed: the same eigenvalues and density on ``N0 · D`` examples
  sharded over a ``"data"`` axis (``Objective(..., mesh=mesh, data_axis="data")``), and a surface
  of ``⌈1681 / 8⌉ · D`` points.
* **memory caps** (one process, no run): the widest 4-hidden-layer MLP whose top-5 spectrum (Lanczos
  with the hoisted linearisation) fits ``--cap-mib`` by XLA's ``compiled.memory_analysis()``
  (arguments + outputs + temporaries of the compiled probe), without and with ``remat="full"``.

Writes ``OUT/scaling.json`` and ``OUT/scaling.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

QUICK = {"width": 64, "depth": 2, "n": 512, "n0": 128, "batch": 128, "steps": 20, "slq_steps": 20,
         "surface_n": 256, "widths": [64, 128, 256, 512], "cap_n": 1024}
FULL = {"width": 256, "depth": 3, "n": 4096, "n0": 1024, "batch": 512, "steps": 40, "slq_steps": 60,
        "surface_n": 1024, "widths": [128, 256, 384, 512, 768, 1024, 1536, 2048], "cap_n": 4096}


# ------------------------------------------------------------------------------------------ worker
def _mlp(width: int, depth: int, n: int, seed: int = 0):
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(jax.random.key(seed), depth + 3)
    sizes = [16] + [width] * depth + [10]
    params = {f"layer{i}": {"kernel": jax.random.normal(ks[i], (a, b)) / jnp.sqrt(a), "bias": jnp.zeros(b)}
              for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}

    def apply(p, x):
        for i in range(len(sizes) - 1):
            x = x @ p[f"layer{i}"]["kernel"] + p[f"layer{i}"]["bias"]
            if i < len(sizes) - 2:
                x = jnp.tanh(x)
        return x

    x = jax.random.normal(ks[-1], (n, 16))
    y = jnp.argmax(x[:, :10], axis=-1)
    return apply, params, x, y


def _time(fn, repeats: int) -> tuple[float, float]:
    import jax
    import numpy as np

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - t0)
    return first, float(np.median(runs))


def worker(devices: int, cfg: dict, repeats: int) -> dict:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from landscape import Objective, sharding, tree
    from probes import hessian

    devs = jax.devices()[:devices]
    key = jax.random.key(0)
    out: dict = {"devices": devices, "device_kind": devs[0].device_kind, "platform": devs[0].platform}
    apply, p, x, y = _mlp(cfg["width"], cfg["depth"], cfg["n"])
    out["num_params"] = tree.num_params(p)
    model = sharding.make_mesh({"model": devices}, devices=devs)
    ps = sharding.shard_params(p, model, min_size=256)
    obj = Objective(apply, x, y, batch_size=cfg["batch"])
    eig = lambda o, q: hessian.eigenvalues(key, o, q, k=5, num_steps=cfg["steps"]).eigenvalues  # noqa: E731
    def slq(o, q):
        return hessian.density(key, o, q, num_probes=1, num_steps=cfg["slq_steps"], grid=200).nodes
    out["strong_eigenvalues"] = _time(lambda: eig(obj, ps), repeats)
    out["strong_slq"] = _time(lambda: slq(obj, ps), repeats)
    out["top5"] = np.asarray(eig(obj, ps)).tolist()

    grid_mesh = sharding.make_mesh({"grid": devices}, devices=devs)
    d1, d2 = tree.random_like(jax.random.key(1), p), tree.random_like(jax.random.key(2), p)
    sobj = Objective(apply, x[: cfg["surface_n"]], y[: cfg["surface_n"]], batch_size=cfg["surface_n"])
    g = np.linspace(-1, 1, 41)
    gx, gy = np.meshgrid(g, g, indexing="ij")
    coords = np.stack([gx.ravel(), gy.ravel()], -1)
    surf = lambda c: sharding.evaluate_grid(sobj, p, (d1, d2), c, mesh=grid_mesh)["loss"]  # noqa: E731
    out["strong_surface"] = _time(lambda: surf(coords), repeats)

    # weak: examples and grid points grow with the device count
    data = sharding.make_mesh({"data": devices}, devices=devs)
    _, _, xw, yw = _mlp(cfg["width"], cfg["depth"], cfg["n0"] * devices, seed=1)
    wobj = Objective(apply, xw, yw, batch_size=cfg["batch"] * devices, mesh=data, data_axis="data")
    prep = jax.device_put(p, NamedSharding(data, PartitionSpec()))
    out["weak_eigenvalues"] = _time(lambda: eig(wobj, prep), repeats)
    out["weak_slq"] = _time(lambda: slq(wobj, prep), repeats)
    per = -(-coords.shape[0] // 8)
    out["weak_surface"] = _time(lambda: surf(coords[: per * devices] if devices < 8 else coords), repeats)
    return out


# ---------------------------------------------------------------------------------------- memory
def memory_caps(cfg: dict, cap_mib: float) -> dict:
    """The widest MLP whose top-5 spectrum fits ``cap_mib`` by XLA's memory analysis, with/without remat."""
    import jax

    from landscape import Objective
    from probes import hessian

    rows = []
    for width in cfg["widths"]:
        apply, p, x, y = _mlp(width, 4, cfg["cap_n"])
        obj = Objective(apply, x, y, batch_size=cfg["batch"])
        select = (True,) * len(jax.tree.leaves(p))
        row = {"width": width, "num_params": sum(a.size for a in jax.tree.leaves(p))}
        for remat in (None, "full"):
            mode = hessian._mode(p, select, remat)
            lowered = hessian._lanczos_impl.lower(
                jax.random.key(0), obj, p, num_steps=30, stop=None, curvature="hessian", select=select,
                linearize=True, vectors=False, mode=mode,
            )
            stats = lowered.compile().memory_analysis()
            total = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
            row["remat" if remat else "plain"] = total / 2**20
        rows.append(row)
    fits = {m: max([r["width"] for r in rows if r[m] <= cap_mib], default=None) for m in ("plain", "remat")}
    return {"cap_mib": cap_mib, "depth": 4, "examples": cfg["cap_n"], "rows": rows, "largest_width": fits}


# ---------------------------------------------------------------------------------------- driver
def _markdown(result: dict) -> str:
    lines = [f"# Scaling ({result['machine']})", "", result["note"], ""]
    runs = result["runs"]
    lines += ["| devices | params | eig strong (s) | SLQ strong (s) | surface 41x41 strong (s) | "
              "eig weak (s) | SLQ weak (s) | surface weak (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        cells = [f"{r[k][1]:.3f}" for k in ("strong_eigenvalues", "strong_slq", "strong_surface", "weak_eigenvalues",
                                            "weak_slq", "weak_surface")]
        lines.append(f"| {r['devices']} | {r['num_params']} | " + " | ".join(cells) + " |")
    lines += ["", "First (compiling) runs in the JSON. Top-5 eigenvalues agree across device counts to "
              f"{result['top5_max_rel_diff']:.1e} (relative).", ""]
    mem = result["memory"]
    lines += [f"## Largest 4-layer MLP whose top-5 spectrum fits {mem['cap_mib']} MiB ({mem['examples']} examples, "
              "XLA memory_analysis, hoisted linearisation)", "", "| width | params | plain (MiB) | remat full (MiB) |",
              "|---|---|---|---|"]
    for r in mem["rows"]:
        lines.append(f"| {r['width']} | {r['num_params']} | {r['plain']:.1f} | {r['remat']:.1f} |")
    lines += ["", f"Largest width: plain {mem['largest_width']['plain']}, remat {mem['largest_width']['remat']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--quick", action="store_true", help="small settings (minutes on a 2-core CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cap-mib", type=float, default=None, help="memory cap (default 64 quick / 1024 full)")
    ap.add_argument("--platform", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--out", default="benchmarks/results/scaling")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.worker is not None:
        print(json.dumps(worker(args.worker, cfg, args.repeats)))  # noqa: T201
        return 0
    runs = []
    for d in args.devices:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        if args.platform == "cpu":
            env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={d}")
        cmd = [sys.executable, __file__, "--worker", str(d), "--repeats", str(args.repeats)]
        cmd += ["--quick"] if args.quick else []
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            return proc.returncode
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{d} device(s): {time.perf_counter() - t0:.1f} s", flush=True)  # noqa: T201
    import numpy as np

    top = np.asarray([r["top5"] for r in runs])
    cap = args.cap_mib if args.cap_mib is not None else (64.0 if args.quick else 1024.0)
    kind = runs[0]["device_kind"]
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {runs[0]['platform']} ({kind})",
        "note": ("Forced host CPU devices share the same cores: no speed-up is expected, the table shows the "
                 "overhead of partitioning." if args.platform == "cpu" else f"Devices: {kind}."),
        "settings": cfg, "runs": runs,
        "top5_max_rel_diff": float(np.max(np.abs(top - top[0]) / np.abs(top[0]))),
        "memory": memory_caps(cfg, cap),
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(result, indent=2))
    (out / "scaling.md").write_text(_markdown(result))
    print(_markdown(result))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: 2-D loss surfaces, ours (``probes.surface``) against loss-landscapes (PyTorch).

Run by hand (not in CI) with the project's venv::

    .venv/bin/python benchmarks/surface.py [--steps 41] [--chunks 1,2,4]

What it does, in one run:

1. Creates ``benchmarks/.venv-surface`` on first use (under a file lock, so two runs never build it
   at once; its own name, so it never clashes with the Hessian benchmark's ``.venv-torch``) with
   ``torch==2.13.0`` (the local CPU wheel, never an unpinned torch), ``loss-landscapes==3.0.6`` and
   numpy.
2. Trains the digits MLP 64-512-512-10 (301,066 parameters) briefly with optax (Adam, full batch)
   on all 1797 sklearn digits.
3. In a subprocess under that venv: the same MLP in PyTorch, and loss-landscapes'
   ``random_plane(model, Loss(CrossEntropyLoss(), X, y), distance=1, steps=41,
   normalization="filter")`` on the full dataset, timed; its two final step directions are captured
   (by wrapping ``rand_u_like`` / ``orthogonal_to``) and saved.
4. Ours: ``surface_2d`` on the peer's exact directions and grid points, compared with the peer's
   losses and, on every 8th row and column, with a float64 evaluation of the exact points
   (error ``|diff| / max(|loss|, 1)``, target 1e-5; the peer walks the grid by in-place float32
   additions, so its points drift from the exact ones), then timed on the 41 x 41 grid for each
   ``chunk``.
5. The floor: forward FLOPs of the grid, ``2 (64·512 + 512·512 + 512·10) · 1797 · 41²`` ≈ 1.8e12,
   divided by this machine's matmul rate, measured here (best of several jitted float32 matmuls:
   a 2048² square and the MLP's own 1797x512x512 layer).

Writes ``benchmarks/results/surface.json`` and ``surface.md`` (gitignored) and prints the table.

loss-landscapes' grid, read from its source (``main.random_plane``): the directions are scaled to
step vectors ``d_k <- d_k (||θ|| / distance / steps) / ||d_k||``, the walk starts at
``θ - steps/2 (d_1 + d_2)``, and column ``i`` (along ``d_1``) holds the points
``θ + (i - steps/2) d_1 + (c - steps/2) d_2`` with ``c = j + 1`` for even ``i`` and ``c = j`` for
odd ``i`` (its snake walk is off by one step between even and odd columns). We evaluate our
surface on ``c = 0 … steps`` and compare at the peer's own points.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-surface"
RESULTS = HERE / "results"
SIZES = (64, 512, 512, 10)
PEER_REQUIREMENTS = ["torch==2.13.0", "loss-landscapes==3.0.6", "numpy"]


# ----------------------------------------------------------------------------------- peer venv
def ensure_venv() -> Path:
    """Create ``benchmarks/.venv-surface`` with the peer's packages (once; file-locked)."""
    python = VENV / "bin" / "python"
    marker = VENV / ".installed"
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / ".venv-surface.lock", "w") as lock:  # results/ is gitignored
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            print(f"creating {VENV} with {PEER_REQUIREMENTS} ...", flush=True)
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
            subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", *PEER_REQUIREMENTS], check=True
            )
            marker.touch()
        fcntl.flock(lock, fcntl.LOCK_UN)
    return python


# ----------------------------------------------------------------------------------- peer side
def run_peer(model_npz: str, out_npz: str, steps: int, device: str) -> None:
    """Runs under .venv-surface: loss-landscapes random_plane on the torch twin of the MLP.

    With ``device="cuda"`` torch's default device is set to the GPU, so loss-landscapes' own
    ``torch.rand`` directions are made there too (its code takes no device argument).
    """
    import numpy as np
    import torch
    from loss_landscapes import main as ll_main
    from loss_landscapes.metrics import Loss

    torch.set_default_device(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    data = np.load(model_npz, allow_pickle=False)
    x = torch.from_numpy(data["x"]).to(device)
    y = torch.from_numpy(data["y"]).long().to(device)
    layers = []
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        lin = torch.nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(data[f"l{i}_kernel"].T.copy()))
            lin.bias.copy_(torch.from_numpy(data[f"l{i}_bias"]))
        layers += [lin, torch.nn.ReLU()] if i < len(SIZES) - 2 else [lin]
    model = torch.nn.Sequential(*layers).to(device)
    metric = Loss(torch.nn.CrossEntropyLoss(), x, y)
    with torch.no_grad():
        start_loss = metric.__call__(ll_main.wrap_model(model))

    captured = []
    rand_u_like, orthogonal_to = ll_main.rand_u_like, ll_main.orthogonal_to

    def capture(fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            captured.append(out)
            return out

        return wrapped

    ll_main.rand_u_like = capture(rand_u_like)
    ll_main.orthogonal_to = capture(orthogonal_to)

    # torch's matmul rate on this machine, for reference
    a = torch.randn(2048, 2048)
    rates = []
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        a @ a
        sync()
        rates.append(2 * 2048**3 / (time.perf_counter() - t0))

    torch.manual_seed(0)
    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        grid = ll_main.random_plane(
            model, metric, distance=1, steps=steps, normalization="filter", deepcopy_model=True
        )
        sync()
        seconds = time.perf_counter() - t0
    d1, d2 = captured  # mutated in place by random_plane into the final step vectors
    out = {"grid": np.asarray(grid, np.float32), "seconds": np.float64(seconds),
           "start_loss": np.float64(start_loss), "torch_matmul_rate": np.float64(max(rates)),
           "torch_threads": np.int64(torch.get_num_threads()),
           "torch_version": np.array(torch.__version__)}
    for name, d in (("d1", d1), ("d2", d2)):
        params = [p.detach().cpu().numpy() for p in d.parameters]
        for i in range(len(SIZES) - 1):
            out[f"{name}_l{i}_kernel"] = params[2 * i].T.copy()
            out[f"{name}_l{i}_bias"] = params[2 * i + 1].copy()
    np.savez(out_npz, **out)


# ----------------------------------------------------------------------------------- our side
def matmul_rate(jax, jnp) -> float:
    """Best float32 matmul rate (FLOP/s) of jitted square 2048² and layer-shaped products."""
    best = 0.0
    target = 2e10 if jax.default_backend() == "cpu" else 2e12
    key = jax.random.key(0)
    for m, k, n in ((2048, 2048, 2048), (1797, 512, 512)):
        a = jax.random.normal(key, (m, k))
        b = jax.random.normal(jax.random.fold_in(key, 1), (k, n))
        reps = max(1, int(target // (2 * m * k * n)))
        f = jax.jit(lambda a, b: jax.lax.fori_loop(0, reps, lambda i, c: a @ (b + c[0, 0]), a @ b))
        f(a, b).block_until_ready()
        for _ in range(5):
            t0 = time.perf_counter()
            f(a, b).block_until_ready()
            best = max(best, (reps + 1) * 2 * m * k * n / (time.perf_counter() - t0))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=41)
    parser.add_argument("--chunks", default="1,2,4", help="comma-separated chunk sizes to time")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument(
        "--batch-sizes", default="1797,599",
        help="Objective batch sizes to time (1797 = one batch; 599 = 1797 / 3, no padding)",
    )
    parser.add_argument("--reference-stride", type=int, default=8,
                        help="every n-th grid row/column gets a float64 reference evaluation")
    parser.add_argument(
        "--no-venv", action="store_true",
        help="run the peer with this interpreter (torch and loss-landscapes importable here)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="the peer's torch device")
    parser.add_argument(
        "--reuse-peer", action="store_true",
        help="reuse the model and peer results of the last run (results/surface_*.npz)",
    )
    parser.add_argument("--peer", nargs=2, metavar=("MODEL_NPZ", "OUT_NPZ"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        run_peer(*args.peer, steps=args.steps, device=args.device)
        return

    model_npz, peer_npz = RESULTS / "surface_model.npz", RESULTS / "surface_peer.npz"
    reuse = args.reuse_peer and model_npz.exists() and peer_npz.exists()
    peer_python = Path(sys.executable) if args.no_venv or reuse else ensure_venv()
    RESULTS.mkdir(parents=True, exist_ok=True)
    import jax

    if jax.default_backend() != "cpu":  # torch does not use TF32 for float32 matmuls by default
        jax.config.update("jax_default_matmul_precision", "highest")
    import jax.numpy as jnp
    import numpy as np
    import optax
    from sklearn.datasets import load_digits

    sys.path.insert(0, str(HERE.parent))
    from landscape import Objective, tree
    from probes import surface

    x_np, y_np = load_digits(return_X_y=True)
    x = jnp.asarray(x_np / 16.0, jnp.float32)
    y = jnp.asarray(y_np, jnp.int32)

    def apply(p, xb):
        for i in range(len(SIZES) - 1):
            xb = xb @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"]
            if i < len(SIZES) - 2:
                xb = jax.nn.relu(xb)
        return xb

    keys = jax.random.split(jax.random.key(0), len(SIZES))
    params = {
        f"l{i}": {"kernel": jax.random.normal(keys[i], (a, b)) * np.sqrt(1.0 / a), "bias": jnp.zeros(b)}
        for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:]))
    }
    n_params = tree.num_params(params)
    obj = Objective(apply, x, y, batch_size=x.shape[0])  # one full batch, like the peer
    opt = optax.adam(1e-3)

    @jax.jit
    def step(p, s):
        g = jax.grad(obj.loss)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    if reuse:
        saved = np.load(model_npz, allow_pickle=False)
        params = {f"l{i}": {n: jnp.asarray(saved[f"l{i}_{n}"]) for n in ("kernel", "bias")} for i in range(3)}
        print(f"reusing {model_npz} and {peer_npz}", flush=True)
    else:
        state = opt.init(params)
        for _ in range(args.train_steps):
            params, state = step(params, state)
    trained = {k: float(v) for k, v in jax.jit(obj.evaluate)(params).items()}
    print(f"MLP {SIZES}, {n_params} params, trained {args.train_steps} Adam steps: {trained}", flush=True)

    if not reuse:
        flat = {f"l{i}_{n}": np.asarray(params[f"l{i}"][n]) for i in range(3) for n in ("kernel", "bias")}
        np.savez(model_npz, x=np.asarray(x), y=np.asarray(y), **flat)
        print("running loss-landscapes random_plane ...", flush=True)
        subprocess.run(
            [str(peer_python), __file__, "--steps", str(args.steps), "--device", args.device,
             "--peer", str(model_npz), str(peer_npz)],
            check=True,
        )
    peer = np.load(peer_npz, allow_pickle=False)
    peer_torch = str(peer["torch_version"]) if "torch_version" in peer.files else "2.13.0"

    def direction(name):
        return {
            f"l{i}": {"kernel": jnp.asarray(peer[f"{name}_l{i}_kernel"]), "bias": jnp.asarray(peer[f"{name}_l{i}_bias"])}
            for i in range(3)
        }

    d1, d2 = direction("d1"), direction("d2")
    steps = args.steps
    half = steps / 2

    # agreement on the peer's own points: our grid covers c = 0 .. steps along d2
    xs = jnp.arange(steps, dtype=jnp.float32) - half
    ys_all = jnp.arange(steps + 1, dtype=jnp.float32) - half
    ours_all = surface.surface_2d(obj, params, (d1, d2), grid=(xs, ys_all))
    ours_np = np.asarray(ours_all.loss, np.float64)
    i = np.arange(steps)[:, None]
    j = np.arange(steps)[None, :]
    c = np.where(i % 2 == 0, j + 1, j)
    ours_at_peer = ours_np[np.broadcast_to(i, c.shape), c]
    peer_grid = np.asarray(peer["grid"], np.float64)

    # float64 reference at the exact points theta + a d1 + b d2 (every `stride`-th row / column):
    # separates float32 rounding in the evaluation from the drift of the peer's in-place walk
    def loss64(a, b):
        h = np.asarray(x, np.float64)
        for li in range(len(SIZES) - 1):
            w = {n: np.asarray(params[f"l{li}"][n], np.float64)
                 + a * np.asarray(d1[f"l{li}"][n], np.float64)
                 + b * np.asarray(d2[f"l{li}"][n], np.float64) for n in ("kernel", "bias")}
            h = h @ w["kernel"] + w["bias"]
            if li < len(SIZES) - 2:
                h = np.maximum(h, 0.0)
        h = h - h.max(axis=1, keepdims=True)
        logz = np.log(np.exp(h).sum(axis=1))
        return float(np.mean(logz - h[np.arange(h.shape[0]), np.asarray(y)]))

    stride = args.reference_stride
    sub = [(ii, jj) for ii in range(0, steps, stride) for jj in range(0, steps, stride)]
    ref = np.array([loss64(ii - half, c[ii, jj] - half) for ii, jj in sub])
    ours_sub = np.array([ours_at_peer[ii, jj] for ii, jj in sub])
    peer_sub = np.array([peer_grid[ii, jj] for ii, jj in sub])

    def err(v, r):  # |v - r| / max(|r|, 1): relative above loss 1, absolute below
        return float(np.max(np.abs(v - r) / np.maximum(np.abs(r), 1.0)))

    agreement = {
        "ours_vs_peer": err(ours_at_peer, peer_grid),
        "ours_vs_peer_max_abs": float(np.max(np.abs(ours_at_peer - peer_grid))),
        "ours_vs_float64": err(ours_sub, ref),
        "peer_vs_float64": err(peer_sub, ref),
        "reference_points": len(sub),
    }
    agree = agreement["ours_vs_float64"] <= 1e-5
    print(
        f"agreement on the peer's {steps}x{steps} points (loss {peer_grid.min():.4g} .. "
        f"{peer_grid.max():.4g}; error = |diff| / max(|loss|, 1)): ours vs peer "
        f"{agreement['ours_vs_peer']:.2g}; on {len(sub)} points against a float64 reference: ours "
        f"{agreement['ours_vs_float64']:.2g}, peer {agreement['peer_vs_float64']:.2g} -> "
        f"{'OK' if agree else 'FAIL'} at 1e-5",
        flush=True,
    )

    # timing on the steps x steps grid
    flops = 2 * sum(a * b for a, b in zip(SIZES[:-1], SIZES[1:])) * x.shape[0] * steps * steps
    rate = matmul_rate(jax, jnp)
    floor = flops / rate
    rows = [{"name": f"loss-landscapes 3.0.6 (torch {peer_torch}, {args.device})", "seconds": float(peer["seconds"])}]
    grid = (xs, xs)
    for bs in [int(v) for v in args.batch_sizes.split(",")]:
        obj_bs = obj.replace(batch_size=bs)
        for chunk in [int(v) for v in args.chunks.split(",")]:
            t0 = time.perf_counter()
            surface.surface_2d(obj_bs, params, (d1, d2), grid=grid, chunk=chunk).loss.block_until_ready()
            first = time.perf_counter() - t0
            best = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                surface.surface_2d(obj_bs, params, (d1, d2), grid=grid, chunk=chunk).loss.block_until_ready()
                best = min(best, time.perf_counter() - t0)
            name = f"ours surface_2d batch_size={bs} chunk={chunk}"
            rows.append({"name": name, "seconds": best, "first_call_seconds": first})
            print(f"  {name}: {best:.2f}s warm, {first:.2f}s first call (with compile)", flush=True)
    rate_after = matmul_rate(jax, jnp)  # the machine is shared: take the better of two measurements
    rate = max(rate, rate_after)
    floor = flops / rate
    peer_s = rows[0]["seconds"]
    for r in rows:
        r["gflops"] = flops / r["seconds"] / 1e9
        r["fraction_of_floor"] = floor / r["seconds"]
        r["speedup_vs_peer"] = peer_s / r["seconds"]

    lines = [
        f"# 2-D loss surface, digits MLP {'-'.join(map(str, SIZES))} ({n_params} params), "
        f"{steps}x{steps} grid, full dataset ({x.shape[0]} examples)",
        "",
        f"device: {jax.devices()[0].device_kind}, {len(os.sched_getaffinity(0))} usable cores; torch threads "
        f"{int(peer['torch_threads'])}",
        f"matmul rate (jax, best): {rate / 1e9:.1f} GFLOP/s; torch 2048² matmul: "
        f"{float(peer['torch_matmul_rate']) / 1e9:.1f} GFLOP/s",
        f"forward FLOPs of the grid: {flops:.3g}; floor = FLOPs / rate = {floor:.2f} s",
        "agreement, |diff| / max(|loss|, 1): ours vs peer on all its points "
        f"{agreement['ours_vs_peer']:.2g}; against a float64 evaluation of the exact points "
        f"({len(sub)} points): ours {agreement['ours_vs_float64']:.2g}, peer "
        f"{agreement['peer_vs_float64']:.2g} -> {'OK' if agree else 'FAIL'} at 1e-5",
        "",
        "| run | seconds | GFLOP/s | % of floor | speed-up vs peer |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['seconds']:.2f} | {r['gflops']:.1f} | {100 * r['fraction_of_floor']:.0f}% "
            f"| {r['speedup_vs_peer']:.2f}x |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    (RESULTS / "surface.md").write_text(table + "\n")
    (RESULTS / "surface.json").write_text(
        json.dumps(
            {
                "model": {"sizes": SIZES, "params": n_params, "train": trained},
                "steps": steps,
                "flops": flops,
                "matmul_rate": rate,
                "floor_seconds": floor,
                "agreement": {**agreement, "ok": agree},
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

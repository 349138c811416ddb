"""One process of the 2-process ``jax.distributed`` test (``test_multihost.py``); not a test module.

``python _multihost_worker.py PORT PROCESS_ID NUM_PROCESSES OUT_DIR [MODE]`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu``. Mode ``"probes"`` (default):
every process runs the same program over the global 8-device mesh — a loss and a top-5 Hessian
spectrum of params sharded over the ``"model"`` axis, a 2-D surface with its grid points sharded
over a ``"grid"`` axis — and process 0 writes them to ``OUT_DIR/multihost.npz``. Mode ``"join"``:
only join (for the process-count check) and exit.
"""

from __future__ import annotations

import sys

import numpy as np

GRID = (np.linspace(-1.0, 1.0, 6), np.linspace(-0.5, 0.5, 5))
KEY = 3


def problem():
    """The tiny model, data, params and surface directions (host NumPy, identical in every process)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 8)).astype(np.float32)
    y = (np.arange(48) % 4).astype(np.int32)
    p = {
        "w1": (0.6 * rng.normal(size=(8, 16))).astype(np.float32), "b1": np.full(16, 0.1, np.float32),
        "w2": (0.6 * rng.normal(size=(16, 4))).astype(np.float32), "b2": np.zeros(4, np.float32),
    }
    dirs = tuple({k: rng.normal(size=v.shape).astype(np.float32) for k, v in p.items()} for _ in range(2))
    return x, y, p, dirs


def apply(q, xb):
    import jax.numpy as jnp

    return jnp.tanh(xb @ q["w1"] + q["b1"]) @ q["w2"] + q["b2"]


def coords() -> np.ndarray:
    gx, gy = np.meshgrid(*GRID, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel()], axis=-1)


def main(argv: list[str]) -> int:
    port, pid, nproc, out = argv[1], int(argv[2]), int(argv[3]), argv[4]
    mode = argv[5] if len(argv) > 5 else "probes"
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    from landscape import Objective, sharding
    from probes import hessian

    try:
        sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid, timeout_s=30)
    except ValueError as err:
        print(f"ValueError: {err}", flush=True)  # noqa: T201 - the test reads it
        return 3
    if mode == "join":
        print(f"joined {jax.process_count()} processes", flush=True)  # noqa: T201
        return 0
    x, y, p, dirs = problem()
    mesh = sharding.make_mesh({"model": -1})  # the 8 devices of both processes
    rep = NamedSharding(mesh, PartitionSpec())
    obj = Objective(apply, jax.device_put(x, rep), jax.device_put(y, rep), batch_size=24)
    ps = sharding.shard_params(p, mesh, min_size=16)
    loss = obj.loss(ps)
    spec = hessian.eigenvalues(jax.random.key(KEY), obj, ps, k=5, num_steps=30)
    grid_mesh = sharding.make_mesh({"grid": -1})
    grid_obj = Objective(apply, jax.device_put(x, NamedSharding(grid_mesh, PartitionSpec())),
                         jax.device_put(y, NamedSharding(grid_mesh, PartitionSpec())), batch_size=24)
    surf = sharding.evaluate_grid(grid_obj, p, dirs, coords(), mesh=grid_mesh)
    vals = multihost_utils.process_allgather(
        {"loss": loss, "eigenvalues": spec.eigenvalues, "surface": surf["loss"]}, tiled=True
    )
    if pid == 0:
        np.savez(f"{out}/multihost.npz", devices=jax.device_count(), processes=jax.process_count(),
                 **{k: np.asarray(v) for k, v in vals.items()})
    multihost_utils.sync_global_devices("done")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

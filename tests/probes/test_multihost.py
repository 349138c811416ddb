"""Two local processes under ``jax.distributed`` (4 CPU devices each) give the single-process numbers.

The worker (``_multihost_worker.py``) runs a loss, a top-5 Hessian spectrum of params sharded over
the 8 global devices and a 2-D surface with its points sharded over them; this process computes the
same quantities unsharded while the workers run.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np

from landscape import Objective
from probes import hessian, surface

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "_multihost_worker.py"
REPO = HERE.parents[1]
TIMEOUT = 240  # seconds; a healthy run takes ~10 s of CPU per process


def _worker_module():
    spec = importlib.util.spec_from_file_location("_multihost_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(counts: list[int], out: pathlib.Path, mode: str) -> list[subprocess.Popen]:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), str(i), str(n), str(out), mode],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i, n in enumerate(counts)
    ]


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    results = []
    try:
        for proc in procs:
            text, _ = proc.communicate(timeout=TIMEOUT)
            results.append((proc.returncode, text))
    finally:
        for proc in procs:  # only the processes this test started
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def test_two_processes_match_single_process(tmp_path):
    procs = _launch([2, 2], tmp_path, "probes")
    w = _worker_module()
    x, y, p, dirs = w.problem()
    obj = Objective(w.apply, x, y, batch_size=24)
    loss = float(obj.loss(p))
    spec = hessian.eigenvalues(jax.random.key(w.KEY), obj, p, k=5, num_steps=30)
    surf = surface.surface_2d(obj, p, dirs, grid=w.GRID)
    for rc, text in _finish(procs):
        assert rc == 0, text[-3000:]
    got = np.load(tmp_path / "multihost.npz")
    assert int(got["processes"]) == 2 and int(got["devices"]) == 8
    np.testing.assert_allclose(float(got["loss"]), loss, rtol=1e-6)
    np.testing.assert_allclose(got["eigenvalues"], np.asarray(spec.eigenvalues), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["surface"].reshape(6, 5), np.asarray(surf.loss), rtol=1e-5)


def test_process_count_mismatch_is_named(tmp_path):
    (rc0, out0), (rc1, out1) = _finish(_launch([2, 3], tmp_path, "join"))
    assert rc0 == 0, out0[-2000:]
    assert rc1 == 3, out1[-2000:]
    assert "asked for num_processes=3, but the coordinator at 127.0.0.1:" in out1 and "runs 2 processes" in out1

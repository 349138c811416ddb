# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Curvature of a trained digits MLP
#
# `probes.hessian` measures the Hessian (and Gauss-Newton / Fisher) of the **full-dataset** loss
# with matrix-free products: top eigenvalues by Lanczos (with residuals that show convergence),
# the trace with a standard error, the spectral density by stochastic Lanczos quadrature, and
# sharpness along a path. The model here is small enough (~1.2k parameters) to check every number
# against the dense Hessian. Runs in well under a minute on a CPU.

# %%
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import plotly.graph_objects as go
from sklearn.datasets import load_digits

from landscape import Objective, tree
from probes import hessian

x_np, y_np = load_digits(return_X_y=True)
x, y = jnp.asarray(x_np / 16.0, jnp.float32), jnp.asarray(y_np, jnp.int32)


def init(key, sizes=(64, 16, 10)):
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        "layers": {
            str(i): {
                "kernel": jax.random.normal(k, (a, b)) * jnp.sqrt(1.0 / a),
                "bias": jnp.zeros(b),
            }
            for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
        }
    }


def apply_fn(params, x):
    layers = params["layers"]
    h = x
    for i in range(len(layers)):
        h = h @ layers[str(i)]["kernel"] + layers[str(i)]["bias"]
        if i < len(layers) - 1:
            h = jnp.tanh(h)
    return h


objective = Objective(apply_fn, x, y, batch_size=512)
params0 = init(jax.random.key(0))
print("parameters:", tree.num_params(params0), "examples:", objective.num_examples)

# %% [markdown]
# Train briefly with Adam on the full batch.

# %%
opt = optax.adam(1e-2)


@jax.jit
def step(params, state):
    loss, grads = jax.value_and_grad(objective.loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss


params, state = params0, opt.init(params0)
for _ in range(300):
    params, state, loss = step(params, state)
print({k: round(float(v), 4) for k, v in objective.evaluate(params).items()})

# %% [markdown]
# ## Top eigenvalues: Lanczos vs the dense Hessian
# 40 Lanczos steps (40 Hessian-vector products) against `numpy.linalg.eigvalsh` of the dense
# matrix (1.2k products). The residual `‖Hv − λv‖` bounds each eigenvalue's error.

# %%
t0 = time.perf_counter()
top = hessian.eigenvalues(jax.random.key(1), objective, params, k=5, num_steps=40)
top.eigenvalues.block_until_ready()
t_lanczos = time.perf_counter() - t0
dense = np.asarray(hessian.dense_matrix(objective, params), dtype=np.float64)
exact = np.linalg.eigvalsh(dense)
for i, (lam, res) in enumerate(zip(np.asarray(top.eigenvalues), np.asarray(top.residuals))):
    print(f"λ{i + 1}: lanczos {lam:.6f}  dense {exact[-1 - i]:.6f}  residual {res:.1e}")
print(f"converged: {bool(top.converged)}  ({t_lanczos:.2f} s with compilation)")
assert np.allclose(np.asarray(top.eigenvalues), exact[::-1][:5], rtol=1e-3)
top.plot()

# %% [markdown]
# Without `num_steps`, Lanczos stops as soon as every wanted pair has a residual below
# `tol · max|λ|` (default `tol=1e-3`); `num_matvecs` says how many products that took.

# %%
auto = hessian.eigenvalues(jax.random.key(1), objective, params, k=5)
print(f"stopped after {int(auto.num_matvecs)} products, converged: {bool(auto.converged)}")
print("max relative error vs dense:", float(np.max(np.abs(np.asarray(auto.eigenvalues) - exact[::-1][:5]) / np.abs(exact[::-1][:5]))))
assert bool(auto.converged) and int(auto.num_matvecs) <= 50

# %% [markdown]
# ## Trace with error bars
# Hutchinson (one product per probe) and XTrace (two per probe, but it captures the top of the
# spectrum exactly, so the error is far smaller for the same budget).

# %%
estimates = {
    method: hessian.trace(jax.random.key(2), objective, params, method=method, num_probes=n)
    for method, n in (("hutchinson", 64), ("xtrace", 32))
}
for method, est in estimates.items():
    print(f"{method:>10}: {float(est.estimate):.4f} ± {float(est.stderr):.4f}  ({est.num_matvecs} products)")
print(f"{'dense':>10}: {np.trace(dense):.4f}")
go.Figure(
    [
        go.Bar(
            x=list(estimates),
            y=[float(e.estimate) for e in estimates.values()],
            error_y={"type": "data", "array": [3 * float(e.stderr) for e in estimates.values()]},
            name="estimate ± 3 s.e.",
        ),
        go.Scatter(x=list(estimates), y=[np.trace(dense)] * 2, mode="lines", name="dense trace"),
    ],
    layout={"title": "Hessian trace"},
)

# %% [markdown]
# ## Spectral density (SLQ)
# The bulk sits at zero and a few outliers stand apart; some mass is negative (the quadrature
# estimate of the fraction of eigenvalues below zero, compared with the dense count).

# %%
dens = hessian.density(jax.random.key(3), objective, params, num_probes=4, num_steps=60)
print("mass below zero:", round(float(dens.negative_mass), 4), " dense:", round(float(np.mean(exact < 0)), 4))
print("SLQ trace:", round(float(dens.trace), 3))
dens.plot()

# %% [markdown]
# ## Sharpness along the path from initialisation to the trained model

# %%
path = hessian.along_path(
    jax.random.key(4), objective, lambda t: tree.lerp(params0, params, t), np.linspace(0, 1, 5),
    k=5, num_steps=40, num_probes=64,  # the settings above: no new compilation
)
print(np.round(np.asarray(path.top[:, 0]), 4))
path.plot()

# %% [markdown]
# ## Per layer
# Each layer's diagonal block: its top eigenvalue (Lanczos) and trace (one shared set of probes).

# %%
layers = hessian.per_layer(jax.random.key(5), objective, params, num_steps=20, num_probes=32)
print(layers.to_dict())
layers.plot()

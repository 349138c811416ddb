# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.16.0
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Loss surfaces
#
# Li et al. 2018 (arXiv 1712.09913) draw the loss on a plane through a trained model, spanned by two
# random directions rescaled *per filter* to the model's own filter norms, so that surfaces of
# different networks are comparable. This notebook trains a small MLP on sklearn's digits with
# optax, then draws
#
# 1. a filter-normalised 2-D surface with the model and its training trajectory on it,
# 2. a 1-D slice along one of the directions,
# 3. the PCA plane of the trajectory,
# 4. the plane through three independently trained models (Garipov et al. 2018, arXiv
#    1802.10026), and the logit ensemble of the three.
#
# Everything runs on a laptop CPU in seconds.

# %%
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

from landscape import Objective, tree
from probes import surface
from probes.ensemble import ensemble

GRID = 21  # points per axis; Li et al. use 51

x_np, y_np = load_digits(return_X_y=True)
x, y = jnp.asarray(x_np / 16.0, jnp.float32), jnp.asarray(y_np, jnp.int32)
SIZES = (64, 32, 10)


def init(key):
    keys = jax.random.split(key, len(SIZES) - 1)
    return {
        f"l{i}": {"kernel": jax.random.normal(k, (a, b)) / np.sqrt(a), "bias": jnp.zeros(b)}
        for i, (k, a, b) in enumerate(zip(keys, SIZES[:-1], SIZES[1:]))
    }


def apply(params, xb):
    for i in range(len(SIZES) - 1):
        xb = xb @ params[f"l{i}"]["kernel"] + params[f"l{i}"]["bias"]
        if i < len(SIZES) - 2:
            xb = jax.nn.relu(xb)
    return xb


objective = Objective(apply, x, y, batch_size=1797)
opt = optax.adam(3e-3)


@jax.jit
def train_step(params, state):
    grads = jax.grad(objective.loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def train(key, steps=150, every=15):
    params = init(key)
    state = opt.init(params)
    trajectory = [params]
    for t in range(1, steps + 1):
        params, state = train_step(params, state)
        if t % every == 0:
            trajectory.append(params)
    return params, trajectory


model, trajectory = train(jax.random.key(0))
print({k: round(float(v), 4) for k, v in objective.evaluate(model).items()})

# %% [markdown]
# ## A filter-normalised 2-D surface
# Each direction has, for every filter (a column of a Dense kernel), the norm of the model's filter;
# biases get no perturbation (`ignore="biasbn"`). The trajectory is projected onto the plane by
# least squares; its distance from the plane is in the hover text.

# %%
d1 = surface.random_direction(jax.random.key(1), model, normalization="filter")
d2 = surface.random_direction(jax.random.key(2), model, normalization="filter")
axis = jnp.linspace(-1.0, 1.0, GRID)
surf = surface.surface_2d(
    objective, model, (d1, d2), grid=(axis, axis),
    overlays={"model": model, "trajectory": trajectory},
)
print("loss range on the plane:", float(surf.loss.min()), float(surf.loss.max()))
surf.plot(kind="surface", log=True)

# %%
surf.plot(kind="contour", log=True)

# %% [markdown]
# ## A 1-D slice
# The same first direction, over a wider range.

# %%
line = surface.surface_1d(objective, model, d1, grid=jnp.linspace(-2.0, 2.0, 41),
                          overlays={"model": model})
line.plot(log=True)

# %% [markdown]
# ## The PCA plane of the trajectory
# Random directions are nearly orthogonal to the path training took; the top two principal
# components of the checkpoints (relative to the final one) show it (Li et al. §7).

# %%
pca = surface.pca_directions(trajectory)
print("explained variance ratio:", np.round(np.asarray(pca.explained_variance_ratio), 3),
      "degenerate:", pca.degenerate)
c = np.asarray(pca.coords)
pad_x, pad_y = 0.3 * np.ptp(c[:, 0]), 0.3 * np.ptp(c[:, 1])
pca_surf = surface.surface_2d(
    objective, pca.center, pca.directions,
    grid=(jnp.linspace(c[:, 0].min() - pad_x, c[:, 0].max() + pad_x, GRID),
          jnp.linspace(c[:, 1].min() - pad_y, c[:, 1].max() + pad_y, GRID)),
    overlays={"trajectory": trajectory},
)
pca_surf.plot(kind="contour", log=True)

# %% [markdown]
# ## The plane through three models
# Two more models from other seeds; Gram–Schmidt axes from the first, 20% margins. Each model's
# own loss is reproduced on the plane at its coordinates (residual 0), and between them we see
# the barriers that separate independently trained networks.

# %%
others = [train(jax.random.key(s))[0] for s in (10, 20)]
plane = surface.plane_through(model, *others, margin=0.2)
plane_surf = surface.surface_2d(
    objective, plane.origin, plane.directions, grid=plane.grid(GRID),
    overlays={"models": [model, *others]},
)
ov = plane_surf.overlays[0]
print("coordinates:", np.round(np.asarray(ov.coords), 2).tolist())
print("own loss:", np.round(np.asarray(ov.loss), 4).tolist(),
      "off-plane distance:", np.round(np.asarray(ov.residual), 6).tolist())
plane_surf.plot(kind="contour", log=True)

# %% [markdown]
# ## The ensemble of the three models

# %%
ens = ensemble(objective, [model, *others])
print({k: v for k, v in ens.to_dict().items() if k != "disagreement"})
ens.plot()

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
# # Mode determinism: the instability analysis
#
# The survey's §6.1.2: the linearly connected basin a network ends in is fixed early in training.
# Frankle et al. 2020 (arXiv 1912.05671) test it by *spawning*: train a parent; at step `k` copy
# its whole training state into two children that differ only in the order of the data; train both
# to the end; measure the loss/error barrier on the straight line between them. Once the barrier
# stays near zero, SGD noise no longer changes the basin: the network is *stable*, from the onset
# step `k*`.
#
# `probes.characteristics.determinism` runs the whole analysis over several seeds, and compares
# the children's distance with that of two independent runs. Here: a 64-128-128-10 MLP on sklearn's
# digits, six epochs of SGD with momentum at a large learning rate (0.3), small settings. (With
# Adam at 1e-3, the report's default, the same network is stable from initialisation: `k* = 0`.)

# %%
import time

import jax
import numpy as np

from landscape import Objective, data, models
from landscape.train import Trainer, make_optimizer
from probes.characteristics import determinism, spawn_ladder

ds = data.load("digits")
(x, y), (xt, yt) = ds.train, ds.test


def build(key):
    return models.functional(models.build("mlp", key, in_features=64, widths=(128, 128, 10)))


apply_fn, _, _ = build(jax.random.key(0))
trainer = Trainer(apply_fn, x, y, optimizer=make_optimizer("sgd", learning_rate=0.3, momentum=0.9), batch_size=64)


def init(key):
    _, params, state = build(key)
    return trainer.init(params, state)


steps = 6 * trainer.steps_per_epoch
print("steps:", steps, " default ladder:", spawn_ladder(steps))

# %%
t0 = time.perf_counter()
res = determinism(jax.random.key(0), trainer, init, steps=steps, spawn_steps=(0, 4, 16, 64), num_seeds=2,
                  objective=Objective(apply_fn, xt, yt), num_points=9, threshold=0.02)
print(f"took {time.perf_counter() - t0:.1f}s; onset k* = {res.onset} (error barrier <= {res.threshold})")
print("spawn step        ", res.spawn_steps)
print("error barrier mean", np.round(res.barrier_error.mean(0), 4))
print("loss barrier mean ", np.round(res.barrier_loss.mean(0), 4))
print("relative distance ", np.round(res.relative_distance.mean(0), 3))
print("independent runs: error barrier", np.round(res.independent_barrier_error, 4),
      "distance", np.round(res.independent_distance, 2))
res.plot()

# %% [markdown]
# A sanity check: children that share the data order too are identical, so their barrier is 0.

# %%
same = determinism(jax.random.key(0), trainer, init, steps=2 * trainer.steps_per_epoch, spawn_steps=(0,),
                   num_seeds=1, share_data_order=True, num_points=3)
print("shared data order: barrier", same.barrier_loss.ravel(), "distance", same.child_distance.ravel())

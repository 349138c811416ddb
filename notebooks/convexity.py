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
# # Mode convexity
#
# The survey's §6.1.1: a trained solution sits in a locally convex basin that holds other good
# solutions which *predict differently*; SWA (Izmailov et al. 2018, arXiv 1803.05407) exploits it
# by averaging them, FGE (Garipov et al. 2018, arXiv 1802.10026) by ensembling them.
#
# This notebook trains a 64-128-128-10 MLP on sklearn's digits (two seeds), samples its basin with
# SWA, FGE, a snapshot ensemble and a simplex (Benton et al. 2021, arXiv 2102.13042), and measures
# convexity with `probes.characteristics.convexity`: chords, barriers, SWA gain, ensemble gain and
# disagreement, and the curvature at the solution. Small settings: it runs in seconds on a CPU.

# %%
import time

import jax

from landscape import Objective, data, models
from landscape.train import Trainer, make_optimizer
from probes import basin
from probes.characteristics import convexity

ds = data.load("digits")
(x, y), (xt, yt) = ds.train, ds.test


def build(key):
    return models.functional(models.build("mlp", key, in_features=64, widths=(128, 128, 10)))


apply_fn, _, _ = build(jax.random.key(0))
trainer = Trainer(apply_fn, x, y, optimizer=make_optimizer("adam", learning_rate=1e-3), batch_size=64)
train_obj, test_obj = Objective(apply_fn, x, y), Objective(apply_fn, xt, yt)
test_eval = jax.jit(test_obj.evaluate)

states = []
for seed in range(2):
    _, params, state = build(jax.random.key(seed))
    states.append(trainer.run(jax.random.key(100 + seed), trainer.init(params, state), epochs=20).state)
print("trained:", [{k: round(float(v), 4) for k, v in test_eval(s.params).items()} for s in states])

# %% [markdown]
# ## Sampling the basin
# Each sampler continues from the trained state with a fresh SGD optimizer; one epoch is
# `trainer.steps_per_epoch` steps.

# %%
epoch = trainer.steps_per_epoch
t0 = time.perf_counter()
swa = basin.swa(jax.random.key(1), trainer, states[0], steps=6 * epoch, every=epoch, learning_rate=0.05)
fge = [basin.fge(jax.random.key(2 + i), trainer, s, cycles=6, cycle_steps=epoch, learning_rate=0.05)
       for i, s in enumerate(states)]
snap = basin.snapshot_ensemble(jax.random.key(4), trainer, states[0], cycles=4, cycle_steps=2 * epoch,
                               learning_rate=0.2)
simplex = basin.simplex(jax.random.key(5), trainer, states[0].params, num_new=2, steps=150,
                        learning_rate=1e-3, volume_weight=1e-2, num_samples=6)
print(f"sampling took {time.perf_counter() - t0:.1f}s")
for name, res in (("swa", swa), ("fge", fge[0]), ("snapshot", snap), ("simplex", simplex)):
    accs = [round(float(test_eval(m)["accuracy"]), 4) for m in res.members]
    print(f"{name:9s} members' test accuracy: {accs}")
fge[0].plot()

# %% [markdown]
# ## Convexity of the FGE basins (two seeds)
# Chords and barriers on the training loss; SWA and ensemble gains on the test set.

# %%
t0 = time.perf_counter()
res = convexity(jax.random.key(6), train_obj, fge, eval_objective=test_obj, num_chords=15, num_points=9)
print(f"convexity took {time.perf_counter() - t0:.1f}s")
for name, s in res.summary.items():
    print(f"{name:20s} mean {s['mean']!s:>24}  std {s['std']}")
res.plot()

# %% [markdown]
# ## A wider basin: the simplex
# The simplex's samples are convex combinations of its vertices, spread over a region the volume
# term pushed open; chords between them test convexity across that region (and `endpoints="hull"`
# would draw chord ends anywhere inside the members' convex hull).

# %%
r = convexity(jax.random.key(7), train_obj, [simplex], eval_objective=test_obj, num_chords=15, num_points=9,
              curvature=False)
m = r.samples[0].metrics
print(f"simplex: chord fraction {m['chord_fraction']:.3f}  barrier {m['barrier_loss']:.4f}  "
      f"distance {m['member_distance']:.3f}  disagreement {m['disagreement']:.4f}  "
      f"ensemble gain {m['ensemble_gain']:+.4f}  SWA gain {m['swa_gain_accuracy']:+.4f}")

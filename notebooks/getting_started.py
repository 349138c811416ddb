# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Getting started: two models, one barrier
#
# Train two small MLPs on the scikit-learn digits with different initialisation and data-order seeds,
# then measure the loss and error along the straight line between them (the survey's Eq. 1).
# Settings are small so the notebook runs in seconds on a CPU; raise `EPOCHS` for the real thing.

# %%
import jax

from landscape import Objective, data, io, models, tree
from landscape.train import Trainer, make_optimizer
from probes.curves import fit_curve, interpolate

EPOCHS = 10
ds = data.load("digits")
print(ds.to_dict())

# %% [markdown]
# `models.functional` turns the Flax NNX module into `(apply_fn, params, state)`: from here on the
# toolkit only sees pytrees. The init seed and the data-order seed are separate keys.

# %%
runs = []
for seed in (0, 1):
    model = models.build("mlp", jax.random.key(seed), in_features=64, widths=(64, 64, 10))
    apply_fn, params, state = models.functional(model)
    trainer = Trainer(apply_fn, *ds.train, optimizer=make_optimizer("adam", learning_rate=3e-3), batch_size=64)
    runs.append(trainer.run(jax.random.key(1000 + seed), trainer.init(params, state), epochs=EPOCHS).params)

train, test = Objective(apply_fn, *ds.train), Objective(apply_fn, *ds.test)
for i, p in enumerate(runs):
    print(i, {k: round(float(v), 4) for k, v in test.evaluate(p).items()})
print("distance between the models:", float(tree.norm(tree.sub(runs[0], runs[1]))))

# %% [markdown]
# The linear path, on the training set first (over-confident models can hide a barrier in test loss).

# %%
line = interpolate(train, runs[0], runs[1], num=15)
print(line.barrier)
print(line.barrier_for("mean"))
line.plot(title="linear path (train)")

# %% [markdown]
# A quadratic Bezier curve with its bend fitted by Adam (Garipov et al. 2018) usually removes the barrier.

# %%
curve = fit_curve(jax.random.key(0), train, runs[0], runs[1], kind="bezier", steps=200, learning_rate=1e-3,
                  num_eval=15)
print("curve barrier:", curve.result.barrier.loss, " line barrier:", line.barrier.loss)
assert curve.result.barrier.loss <= line.barrier.loss

# %% [markdown]
# Checkpoints are safetensors files with metadata; loading never unpickles.

# %%
import tempfile
from pathlib import Path

with tempfile.TemporaryDirectory() as d:
    path = io.save(Path(d) / "model0.safetensors", runs[0], metadata={"seed": 0, "dataset": "digits"})
    back, meta = io.load(path, like=runs[0])
    print(meta, float(tree.norm(tree.sub(back, runs[0]))))

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
# # Transformers: barriers, alignment and the Hessian spectrum of two small GPTs
#
# Two GPT-style causal decoders are trained from different seeds on byte-level text: the Python standard
# library's own source (`landscape.data.stdlib_text`, nothing downloads; the corpus records its Python version
# and sha256). We measure the next-token loss barrier on the straight line between them (naive) and after
# permuting B to A by weight matching (Ainsworth et al. 2022, arXiv 2209.04836) under the attention-aware
# permutation spec traced from the model: a permutation of heads, within each head one permutation shared by
# queries and keys and one by values and the output projection, and one residual-stream permutation across
# blocks that the embeddings and the tied unembedding follow (Verma & Elbayad 2024, arXiv 2403.00986). Then the
# top of each model's Hessian spectrum by Lanczos. Settings are tiny so the notebook runs in seconds on a CPU;
# raise `WIDTH`, `DEPTH`, `EPOCHS` and use all of `data.STDLIB_FILES` for the real thing (about 1M parameters
# is `WIDTH = 128, DEPTH = 4, HEADS = 4`).

# %%
import jax
import numpy as np

from landscape import Objective, align, data, models
from landscape.train import Trainer, make_optimizer
from probes import hessian
from probes.curves import interpolate

WIDTH, DEPTH, HEADS, CONTEXT, EPOCHS = 16, 1, 2, 16, 2
ds = data.stdlib_text(context=CONTEXT, files=["colorsys.py", "bisect.py"])
print(ds.metadata["python_version"], ds.metadata["sha256"][:16], ds.x_train.shape, ds.x_test.shape)

runs = []
for seed in (0, 1):
    model = models.build("gpt", jax.random.key(seed), vocab_size=256, context=CONTEXT, width=WIDTH, depth=DEPTH,
                         heads=HEADS)
    apply_fn, params, _ = models.functional(model)
    trainer = Trainer(apply_fn, *ds.train, optimizer=make_optimizer("adam", learning_rate=3e-3), batch_size=32,
                      loss="next_token")
    result = trainer.run(jax.random.key(100 + seed), trainer.init(params), epochs=EPOCHS)
    runs.append(result.params)
a, b = runs
train = Objective(apply_fn, *ds.train, loss="next_token")
for name, p in (("A", a), ("B", b)):
    print(name, {k: round(float(v), 4) for k, v in train.evaluate(p).items()})

# %% [markdown]
# ## The traced spec, and a permuted copy computes the same function
#
# `apply_fn.spec` is `align.trace_spec` of the GPT itself. A random permutation under it changes every
# parameter but none of the logits.

# %%
spec = apply_fn.spec
print(len(spec.names), "permutation groups:", sorted(spec.names)[:6], "...")
perm = align.random_permutation(jax.random.key(7), spec, a)
a_perm = align.apply(spec, perm, a)
logit_gap = float(np.max(np.abs(np.asarray(apply_fn(a, ds.x_test)) - np.asarray(apply_fn(a_perm, ds.x_test)))))
moved = float(np.max(np.abs(np.asarray(a_perm["embed"]["embedding"]) - np.asarray(a["embed"]["embedding"]))))
print(f"max |logits(A) - logits(pi(A))| = {logit_gap:.2e}; max change of the embedding = {moved:.3f}")
assert logit_gap < 1e-4 and moved > 1e-3

# %% [markdown]
# ## Barriers: naive and weight-matched
#
# Barrier (survey Eq. 1): `max_t L(θ(t)) − ((1−t)L(θ_A) + tL(θ_B))`, in next-token loss and token error,
# on the training set.

# %%
naive = interpolate(train, a, b, num=9)
perm_wm, info = align.weight_matching(jax.random.key(0), spec, a, b)
b_wm = align.apply(spec, perm_wm, b)
matched = interpolate(train, a, b_wm, num=9)
gap_wm = float(np.max(np.abs(np.asarray(apply_fn(b, ds.x_test)) - np.asarray(apply_fn(b_wm, ds.x_test)))))
barriers = {name: res.barrier for name, res in (("naive", naive), ("weight_matching", matched))}
for name, bar in barriers.items():
    print(f"{name:16s} loss barrier {bar.loss:.4f}  token-error barrier {bar.error:.4f}")
assert gap_wm < 1e-4  # the matched B is the same function as B
assert np.isclose(matched.loss[0], naive.loss[0]) and np.isclose(matched.loss[-1], naive.loss[-1], rtol=1e-5)
assert barriers["weight_matching"].loss <= barriers["naive"].loss + 1e-3

# %% [markdown]
# ## The top of the Hessian spectrum of each model
#
# Lanczos with full reorthogonalisation on the token-averaged training loss (`probes.hessian.eigenvalues`);
# the residual `‖Hv − λv‖` says how converged each Ritz value is.

# %%
tops = {}
for i, (name, p) in enumerate((("A", a), ("B", b))):
    spec_top = hessian.eigenvalues(jax.random.key(10 + i), train, p, k=3, which="top")
    tops[name] = np.asarray(spec_top.eigenvalues)
    print(name, "top eigenvalues", np.round(tops[name], 4), "residuals", np.asarray(spec_top.residuals))
    assert np.all(tops[name] > 0) and float(np.max(spec_top.residuals)) < 1e-2 * float(np.max(tops[name]))

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
# # Mode connectivity: alignment, REPAIR, curves and the PAM check
#
# Two MLPs trained from different seeds on the scikit-learn digits sit in different basins. We measure the
# loss barrier on the straight line between them (naive), after permuting B's hidden units to A's by weight
# matching (Ainsworth et al. 2022, arXiv 2209.04836) or by activation correlation (Tatro et al. 2020,
# arXiv 2009.02439), after REPAIR (Jordan et al. 2022, arXiv 2211.08403), and along a fitted quadratic Bezier
# curve without and with alignment (Garipov et al. 2018, arXiv 1802.10026). Settings are small so the
# notebook runs in seconds on a CPU; raise `EPOCHS`, `CURVE_STEPS` and the widths for the real thing.

# %%
import jax

from landscape import Objective, align, data, models
from landscape.train import Trainer, make_optimizer
from probes.characteristics import connectivity
from probes.pam import pam_check

EPOCHS = 5
CURVE_STEPS = 60
ds = data.load("digits")

runs = []
for seed in (0, 1):
    model = models.build("mlp", jax.random.key(seed), in_features=64, widths=(64, 64, 10))
    apply_fn, params, state = models.functional(model)
    trainer = Trainer(apply_fn, *ds.train, optimizer=make_optimizer("adam", learning_rate=3e-3), batch_size=64)
    runs.append(trainer.run(jax.random.key(1000 + seed), trainer.init(params, state), epochs=EPOCHS).params)

train, test = Objective(apply_fn, *ds.train), Objective(apply_fn, *ds.test)
for i, p in enumerate(runs):
    print(i, {k: round(float(v), 4) for k, v in test.evaluate(p).items()})

# %% [markdown]
# Every method on one pair. Training-set barriers come first: models trained to ~100% training accuracy are
# over-confident and their test-loss curve can dip below the chord, hiding a real barrier.

# %%
result = connectivity(jax.random.key(0), train, [tuple(runs)], eval_objectives={"test": test}, num=9,
                      curve_steps=CURVE_STEPS, singular_k=5)
table = result.table()
for method in result.methods:
    row = table[method]
    print(f"{method:20s} train loss barrier {row['train']['loss_barrier']['mean']:.4f}   "
          f"test loss barrier {row['test']['loss_barrier']['mean']:.4f}   "
          f"midpoint test acc {row['test']['midpoint_accuracy']['mean']:.3f}")
sample = result.samples[0]
print("weight-matching objective <A, pi(B)>:", sample.wm_objective, "sweeps:", sample.wm_sweeps)
print("seconds:", {k: round(v, 2) for k, v in sample.seconds.items()})

# %%
result.plot(split="train", title="connectivity of two digits MLPs (train)")

# %% [markdown]
# Singular-direction alignment (Ito et al. 2024, arXiv 2402.04051): how well the top singular directions of
# corresponding layers agree before and after weight matching.

# %%
print({k: v for k, v in sample.singular.items() if k.startswith("mean")})

# %% [markdown]
# ## Is the activation-matching permutation locally optimal for the curve?
#
# Tatro et al.'s proximal alternating minimisation relaxes every permutation to a doubly-stochastic matrix,
# alternates Adam steps on the bend offset φ (bend = ½θ_A + ½P(θ_B) + φ) with projected gradient steps on the
# matrices, and rounds back to permutations. If the rounded permutations equal the starting ones, the
# alignment is locally optimal. Reference defaults: outer 1, inner-perm 20, inner-φ 250; fewer φ steps here.

# %%
perm, info = align.activation_matching(apply_fn.spec, runs[0], runs[1], train)
pam = pam_check(jax.random.key(1), train, runs[0], runs[1], perm, inner_phi=100, inner_perm=20,
                learning_rate=1e-3, num_eval=9)
summary = pam.to_dict()
print("locally optimal:", summary["locally_optimal"])
print("changed fraction per layer:", summary["changed_fraction"])
print("relaxed matrices' distance from the start:", summary["distance_from_initial"])
for when in ("before", "after"):
    s = summary[when]
    print(f"{when:6s} loss barrier {s['loss_barrier']:.4f}  mean acc {s['mean_accuracy']:.3f}  "
          f"min acc {s['min_accuracy']:.3f}")

# %%
pam.plot()

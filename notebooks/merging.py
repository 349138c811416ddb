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
# # Merging experts: task vectors, merge methods and TACT
#
# A base MLP is trained on all ten digit classes; two experts are fine-tuned from it on class
# subsets (0–4 and 5–9). We merge them with the methods of `landscape.merge`, choosing every
# setting on a **validation** split and reporting test accuracy, then apply TACT (Sharma, Roy &
# Dziugaite 2024, arXiv 2410.12766): per-task rescale-and-shift of the merged model's hidden
# units to each expert's statistics. Finally a *non-local* pair (experts from different
# initialisations, aligned by weight matching) shows the variance collapse TACT repairs, and the
# directedness probe summarises the task vectors. Settings are small so this runs in well under a
# minute on a CPU; `benchmarks/merging_digits.py` is the full study.

# %%
import jax
import jax.numpy as jnp

from landscape import Objective, align, data, merge, models
from landscape.train import Trainer, make_optimizer

EPOCHS = 5
key = jax.random.key(0)
ds = data.with_validation(jax.random.key(1), data.load("digits"), fraction=0.2)
tasks = [data.class_subset(ds, list(range(5)), relabel=False),
         data.class_subset(ds, list(range(5, 10)), relabel=False)]


def build(seed):
    return models.functional(models.build("mlp", jax.random.key(seed), in_features=64, widths=(64, 64, 10)))


def fit(params, d, seed, epochs):
    tr = Trainer(apply_fn, *d.train, optimizer=make_optimizer("adam", learning_rate=1e-3), batch_size=64)
    return tr.run(jax.random.key(seed), tr.init(params), epochs=epochs).params


apply_fn, init, _ = build(0)
base = fit(init, ds, 0, EPOCHS)
experts = [fit(base, t, 10 + i, EPOCHS) for i, t in enumerate(tasks)]
val = [Objective(apply_fn, *t.val) for t in tasks]
test = [Objective(apply_fn, *t.test) for t in tasks]
train = [Objective(apply_fn, *t.train) for t in tasks]

# %% [markdown]
# ## Merges at their validation-chosen setting
# The paper keeps one classifier head per task; we do the same for every method (the merged body
# with the task's expert head), so the methods differ only in how the hidden layers are merged.

# %%
heads = merge.head_leaves(apply_fn.spec, base)


def per_task(body, experts=experts):
    return [jax.tree.map_with_path(
        lambda p, b, e: e if "/".join(str(getattr(q, "key", q)) for q in p) in heads else b, body, ex)
        for ex in experts]


def accs(models_, objs):
    return [float(o.evaluate(m)["accuracy"]) for m, o in zip(models_, objs)]


def best(candidates):
    """candidates: {setting: per-task params}; choose on mean validation accuracy, report test."""
    name = max(candidates, key=lambda k: sum(accs(candidates[k], val)))
    return name, accs(candidates[name], test)


LAMS = (0.25, 0.5, 1.0)
fishers = [merge.fisher_diagonal(o, e) for o, e in zip(train, experts)]
grams = [merge.gram_matrices(o, e, lambda p, x: apply_fn.intermediates(p, x, kind="input"))
         for o, e in zip(train, experts)]
rows = {
    "experts": ("-", accs(experts, test)),
    "base": ("-", accs(per_task(base), test)),
    "average": best({"-": per_task(merge.average(experts))}),
    "task arithmetic": best({f"λ={l}": per_task(merge.task_arithmetic(experts, base=base, lam=l)) for l in LAMS}),
    "TIES": best({f"λ={l}": per_task(merge.ties(experts, base=base, density=0.2, lam=l)) for l in LAMS}),
    "DARE": best({f"λ={l}": per_task(merge.dare(key, experts, base=base, drop=0.5, lam=l)) for l in LAMS}),
    "Fisher": best({"-": per_task(merge.fisher_average(experts, fishers))}),
    "RegMean": best({"-": per_task(merge.regmean(experts, grams, alpha=0.9))}),
    "TACT(TA)": best({f"λ={l}": merge.tact(merge.task_arithmetic(experts, base=base, lam=l), experts, train,
                                           apply_fn=apply_fn) for l in LAMS}),
}
print(f"{'method':18s} {'setting':8s} {'0-4':>6s} {'5-9':>6s} {'mean':>6s}")
for name, (setting, a) in rows.items():
    print(f"{name:18s} {setting:8s} {100 * a[0]:6.1f} {100 * a[1]:6.1f} {50 * (a[0] + a[1]):6.1f}")

# %% [markdown]
# ## Non-local experts and variance collapse
# Expert B now comes from a *different* initialisation (its own base). We weight-match the bases
# (the paper's recipe, `merge.align_experts(match="bases")`), permute expert B with its base's
# permutation and merge around the average of the aligned bases. The merged model's hidden units
# lose spread (variance collapse); REPAIR's pooled targets help only partly, TACT restores each
# task's statistics.

# %%
_, init_b, _ = build(1)
base_b = fit(init_b, ds, 1, EPOCHS)
far = [experts[0], fit(base_b, tasks[1], 11, EPOCHS)]
far, bases, _ = merge.align_experts(jax.random.key(2), far, spec=apply_fn.spec, bases=[base, base_b], match="bases")
mid = merge.average(bases)
ta = {l: merge.task_arithmetic(far, base=mid, lam=l) for l in LAMS}
x_mix = jnp.concatenate([t.train[0] for t in tasks])
nonlocal_rows = {
    "task arithmetic": best({f"λ={l}": per_task(m, far) for l, m in ta.items()}),
    "+ REPAIR": best({f"λ={l}": per_task(align.repair(x_mix, apply_fn, far[0], far[1], m), far)
                      for l, m in ta.items()}),
    "+ TACT": best({f"λ={l}": merge.tact(m, far, train, apply_fn=apply_fn) for l, m in ta.items()}),
}
for name, (setting, a) in nonlocal_rows.items():
    print(f"{name:18s} {setting:8s} {100 * a[0]:6.1f} {100 * a[1]:6.1f} {50 * (a[0] + a[1]):6.1f}")

merged = ta[0.5]
sd_expert = align.unit_statistics(train[1], apply_fn, far[1])["P_1"][1]
sd_merged = align.unit_statistics(train[1], apply_fn, merged)["P_1"][1]
print("layer-2 std on task B, merged / expert (mean over units):", float(jnp.mean(sd_merged / (sd_expert + 1e-6))))

# %% [markdown]
# ## Directedness of the task vectors
# `probes.characteristics.directedness` fine-tunes several seeds per task and reports the cosine
# matrix, ±λ curves, merges at their validation-chosen λ, magnitude-mask gains, sign conflicts and
# the effective rank (here a tiny setting; `quick_directedness` is the report's).

# %%
from probes.characteristics import directedness

res = directedness(jax.random.key(3), ds, tasks, seeds_per_task=2, lams=(0.0, 0.5, 1.0), widths=(16,),
                   base_epochs=3, epochs=2, mask_percents=(1, 10, 100))
summary = res.to_dict()
print("same-task cosine", summary["same_task_cosine"], "cross-task", summary["cross_task_cosine"])
print("effective rank", summary["effective_rank"]["all"], "sign conflicts", summary["sign_conflicts"])
res.plot()

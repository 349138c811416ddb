"""Training with optax: a jitted step, scanned over the steps of an epoch.

Two kinds of randomness are kept apart so that experiments can vary one and fix the other:

* the **initialisation** belongs to the model constructor (``models.build(name, key_init, ...)``);
* the **data order** belongs to :meth:`Trainer.run`, whose ``key`` fixes which examples form each
  minibatch: the batch at global step ``s`` is slice ``s mod S`` of the permutation
  ``jax.random.permutation(fold_in(key, s // S), n)``, ``S = n // batch_size`` steps per epoch
  (the last partial batch of each epoch is dropped).

Because the order is a function of the global step, a run can be stopped at any step and continued
exactly (same key), or *spawned* with another key (Frankle et al. 2020, arXiv 1912.05671: two
children sharing everything up to step ``k`` and differing only in SGD noise afterwards).
The optimizer state travels in each :class:`TrainState`, so learning-rate schedules resume too.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from landscape.train import Trainer
    >>> x = jax.random.normal(jax.random.key(0), (64, 3)); y = (x[:, 0] > 0).astype(jnp.int32)
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> trainer = Trainer(apply_fn, x, y, optimizer=optax.sgd(0.5), batch_size=16)
    >>> result = trainer.run(jax.random.key(1), trainer.init({"w": jnp.zeros((3, 2))}), steps=40)
    >>> result.state.step
    40
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from landscape._checks import check_float, check_int
from landscape._types import ApplyFn, Array, Key, LossFn, Params
from landscape.objective import LOSSES, check_targets, label_range

__all__ = ["OPTIMIZERS", "SCHEDULES", "DivergenceError", "TrainResult", "TrainState", "Trainer", "make_optimizer", "spawn"]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "cyclic")


def make_optimizer(
    name: str = "adam",
    *,
    learning_rate: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    total_steps: int | None = None,
    cycle_steps: int | None = None,
    warmup_steps: int = 0,
    final_fraction: float = 0.0,
) -> optax.GradientTransformation:
    """Build an optax optimizer from plain settings (what configs and reports use).

    Schedules: ``"constant"``; ``"cosine"`` decay to ``final_fraction * lr`` over ``total_steps``;
    ``"warmup_cosine"`` (linear warm-up for ``warmup_steps``, then cosine); ``"cyclic"`` cosine
    restarts every ``cycle_steps`` (snapshot ensembles, Huang et al. 2017, arXiv 1704.00109; with a
    short cycle, FGE, Garipov et al. 2018, arXiv 1802.10026). ``weight_decay`` is decoupled for
    ``"adamw"`` and an L2 term added to the gradient for ``"sgd"``/``"adam"``.

    Raises:
        ValueError: naming the setting, for an unknown name or schedule, a ``learning_rate`` that
            is not finite and > 0, ``momentum`` outside ``[0, 1)`` (1 never forgets a gradient;
            above 1 the steps grow without bound), a negative or non-finite ``weight_decay``,
            ``final_fraction`` outside ``[0, 1]``, or step counts that are not ints.
    """
    if name not in OPTIMIZERS:
        msg = f"unknown optimizer {name!r}; accepted: {list(OPTIMIZERS)}"
        raise ValueError(msg)
    if schedule not in SCHEDULES:
        msg = f"unknown schedule {schedule!r}; accepted: {list(SCHEDULES)}"
        raise ValueError(msg)
    learning_rate = check_float("learning_rate", learning_rate, low=0.0, low_open=True)
    momentum = check_float("momentum", momentum, low=0.0, high=1.0, high_open=True)
    weight_decay = check_float("weight_decay", weight_decay, low=0.0)
    final_fraction = check_float("final_fraction", final_fraction, low=0.0, high=1.0)
    warmup_steps = check_int("warmup_steps", warmup_steps, low=0)
    if schedule in ("cosine", "warmup_cosine") and not total_steps:
        msg = f"schedule {schedule!r} needs total_steps > 0, got {total_steps!r}"
        raise ValueError(msg)
    if schedule == "cyclic" and not cycle_steps:
        msg = f"schedule 'cyclic' needs cycle_steps > 0, got {cycle_steps!r}"
        raise ValueError(msg)
    if total_steps is not None:
        total_steps = check_int("total_steps", total_steps, low=1)
    if cycle_steps is not None:
        cycle_steps = check_int("cycle_steps", cycle_steps, low=1)

    lr: Any
    if schedule == "constant":
        lr = learning_rate
    elif schedule == "cosine":
        lr = optax.cosine_decay_schedule(learning_rate, total_steps, alpha=final_fraction)
    elif schedule == "warmup_cosine":
        lr = optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, max(warmup_steps, 1), total_steps, learning_rate * final_fraction
        )
    else:
        cycle = int(cycle_steps)
        lo = learning_rate * final_fraction

        def lr(count: Array) -> Array:
            phase = (count % cycle) / cycle
            return lo + 0.5 * (learning_rate - lo) * (1 + jnp.cos(jnp.pi * phase))

    if name == "sgd":
        opt = optax.sgd(lr, momentum=momentum or None)
    elif name == "adam":
        opt = optax.adam(lr)
    else:
        return optax.adamw(lr, weight_decay=weight_decay)
    if weight_decay:
        opt = optax.chain(optax.add_decayed_weights(weight_decay), opt)
    return opt


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything needed to continue a run: parameters, model state (BatchNorm statistics; ``{}``
    when none), optimizer state and the global step (a static Python int)."""

    params: Params
    model_state: Any
    opt_state: Any
    step: int = dataclasses.field(metadata={"static": True})


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """The final :class:`TrainState`, the captured checkpoints (in step order, the final state
    included when captured) and the per-step training loss and accuracy (minibatch values)."""

    state: TrainState
    checkpoints: tuple[TrainState, ...]
    losses: np.ndarray
    accuracies: np.ndarray

    @property
    def params(self) -> Params:
        """Final parameters."""
        return self.state.params

    @property
    def trajectory(self) -> list[Params]:
        """Parameters of the captured checkpoints, in step order."""
        return [c.params for c in self.checkpoints]

    def checkpoint_at(self, step: int) -> TrainState:
        """The captured checkpoint at ``step`` (ValueError listing the captured steps otherwise)."""
        for c in self.checkpoints:
            if c.step == step:
                return c
        msg = f"no checkpoint at step {step}; captured steps: {[c.step for c in self.checkpoints]}"
        raise ValueError(msg)


@dataclasses.dataclass(frozen=True, eq=False)
class Trainer:
    """Minibatch training of ``apply_fn`` on ``(x, y)`` with an optax optimizer.

    Args:
        apply_fn: ``apply_fn(params, x) -> logits``; if it has ``apply_train(params, state, x) ->
            (logits, new_state)`` (zoo models with BatchNorm), that is used for training.
        x, y: training inputs and targets.
        optimizer: an ``optax.GradientTransformation`` (see :func:`make_optimizer`).
        batch_size: examples per step; ``steps_per_epoch = n // batch_size``.
        loss: ``"cross_entropy"``, ``"mse"`` or ``loss(logits, y) -> (batch,)``.

    One compiled function runs a segment of steps with ``lax.scan`` (the data are arguments, not
    baked-in constants); segments end at epoch boundaries and at captured steps, and each segment
    length is compiled once and then reused.
    """

    apply_fn: ApplyFn
    x: Array
    y: Array
    optimizer: optax.GradientTransformation
    batch_size: int = 64
    loss: str | LossFn = "cross_entropy"

    def __post_init__(self) -> None:
        n = int(jnp.shape(self.x)[0])
        if jnp.shape(self.y)[0] != n:
            msg = f"x and y need the same number of examples, got shapes {jnp.shape(self.x)} and {jnp.shape(self.y)}"
            raise ValueError(msg)
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= n:
            msg = f"batch_size must be an int in [1, {n}] (the number of examples), got {self.batch_size!r}"
            raise ValueError(msg)
        if isinstance(self.loss, str) and self.loss not in LOSSES:
            msg = f"unknown loss {self.loss!r}; accepted: {sorted(LOSSES)} or a callable"
            raise ValueError(msg)
        object.__setattr__(self, "_segment", jax.jit(self._segment_impl, static_argnames="length"))

    @property
    def num_examples(self) -> int:
        return int(jnp.shape(self.x)[0])

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def init(self, params: Params, model_state: Any = None) -> TrainState:
        """The state at step 0: ``params``, ``model_state`` (``{}`` if None) and a fresh optimizer state."""
        ms = {} if model_state is None else model_state
        return TrainState(params, ms, self.optimizer.init(params), 0)

    # ----------------------------------------------------------------- compiled segment
    def _loss_fn(self) -> LossFn:
        return LOSSES[self.loss] if isinstance(self.loss, str) else self.loss

    def _forward(self, params: Params, model_state: Any, xb: Array) -> tuple[Array, Any]:
        train_apply = getattr(self.apply_fn, "apply_train", None)
        if train_apply is not None:
            return train_apply(params, model_state, xb)
        return self.apply_fn(params, xb), model_state

    def _segment_impl(
        self, ts: TrainState, key: Key, start: Array, x: Array, y: Array, *, length: int
    ) -> tuple[TrainState, Array, Array]:
        """Run ``length`` steps from global step ``start`` (all inside one epoch)."""
        spe, bs = self.steps_per_epoch, self.batch_size
        epoch = start // spe
        order = jax.random.permutation(jax.random.fold_in(key, epoch), self.num_examples)
        loss_fn = self._loss_fn()

        def step(carry: tuple[Params, Any, Any], s: Array) -> tuple[tuple[Params, Any, Any], tuple[Array, Array]]:
            params, mstate, ostate = carry
            idx = jax.lax.dynamic_slice_in_dim(order, (s % spe) * bs, bs)
            xb, yb = x[idx], y[idx]

            def objective(p: Params) -> tuple[Array, tuple[Any, Array]]:
                logits, new_m = self._forward(p, mstate, xb)
                per = loss_fn(logits, yb)
                pred = jnp.argmax(logits, -1)
                lab = yb if jnp.issubdtype(yb.dtype, jnp.integer) else jnp.argmax(yb, -1)
                return jnp.mean(per), (new_m, jnp.mean(pred == lab))

            (loss, (new_m, acc)), grads = jax.value_and_grad(objective, has_aux=True)(params)
            updates, ostate = self.optimizer.update(grads, ostate, params)
            params = optax.apply_updates(params, updates)
            return (params, new_m, ostate), (loss, acc)

        steps = start + jnp.arange(length)
        (p, m, o), (losses, accs) = jax.lax.scan(step, (ts.params, ts.model_state, ts.opt_state), steps)
        return TrainState(p, m, o, ts.step), losses, accs

    def _check_targets(self, state: TrainState) -> None:
        """Labels against the model's output shape and class count (one abstract forward pass)."""
        xb = jax.ShapeDtypeStruct((self.batch_size,) + tuple(jnp.shape(self.x))[1:], jnp.result_type(self.x))
        out = jax.eval_shape(lambda p, m, x: self._forward(p, m, x)[0], state.params, state.model_state, xb)
        yb = jax.ShapeDtypeStruct((self.batch_size,) + tuple(jnp.shape(self.y))[1:], jnp.result_type(self.y))
        check_targets(yb, out.shape, loss=self.loss if isinstance(self.loss, str) else "callable",
                      label_range=label_range(self.y))

    # ----------------------------------------------------------------- public loop
    def run(
        self,
        key: Key,
        state: TrainState,
        *,
        steps: int | None = None,
        epochs: int | None = None,
        capture_every: int | None = None,
        capture_steps: Sequence[int] = (),
        progress: bool | None = False,
    ) -> TrainResult:
        """Train from ``state`` until global step ``steps`` (or ``epochs * steps_per_epoch``).

        Args:
            key: data-order key (``jax.random.key(seed)``); the same key and state give the same run.
            state: where to start (:meth:`init`, or a checkpoint of an earlier run: spawning).
            steps / epochs: the *global* step to stop at (exactly one of the two).
            capture_every: also keep a checkpoint every this many global steps (and at the start
                and end) — the trajectory for PCA planes, SWA and instability analysis.
            capture_steps: further global steps to keep checkpoints at.
            progress: show a tqdm bar (``None``: only on a terminal).

        Raises:
            ValueError: ``steps`` / ``epochs`` not a whole number (``epochs=2.9`` is not 2), or
                labels that do not fit the model's outputs (:func:`landscape.objective.check_targets`).
            DivergenceError: a minibatch loss or the parameters became NaN or infinite; the error
                names the global step and epoch and carries the last finite state. Training
                never returns non-finite parameters (``docs/numerics.md``).
        """
        if (steps is None) == (epochs is None):
            msg = f"give exactly one of steps or epochs, got steps={steps!r}, epochs={epochs!r}"
            raise ValueError(msg)
        # a whole number: epochs=2.9 is an error, not 2 epochs
        until = check_int("steps", steps, low=0) if steps is not None else (
            check_int("epochs", epochs, low=0) * self.steps_per_epoch)
        self._check_targets(state)
        if until < state.step:
            msg = f"the run is already at step {state.step}, past the requested end {until}"
            raise ValueError(msg)
        if capture_every is not None and capture_every < 1:
            msg = f"capture_every must be a positive int, got {capture_every!r}"
            raise ValueError(msg)
        bad = [s for s in capture_steps if not state.step <= s <= until]
        if bad:
            msg = f"capture_steps {bad} lie outside the run [{state.step}, {until}]"
            raise ValueError(msg)

        captures = set(int(s) for s in capture_steps)
        if capture_every:
            captures |= {s for s in range(state.step, until + 1) if s % capture_every == 0}
            captures |= {state.step, until}
        spe = self.steps_per_epoch
        bounds = sorted(captures | {s for s in range(state.step, until + 1) if s % spe == 0} | {state.step, until})

        checkpoints = [state] if state.step in captures else []
        losses, accs = [], []
        ts = state
        bar = tqdm(total=until - state.step, disable=(not progress) if progress is not None else None, desc="train")
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            # the step is static in TrainState: pass 0 so one compilation serves every segment
            new, seg_loss, seg_acc = self._segment(
                dataclasses.replace(ts, step=0), key, jnp.asarray(lo), self.x, self.y, length=hi - lo
            )
            _check_finite(np.asarray(seg_loss), new.params, lo, spe, ts)
            ts = dataclasses.replace(new, step=hi)
            losses.append(np.asarray(seg_loss))
            accs.append(np.asarray(seg_acc))
            bar.update(hi - lo)
            if losses and bar.n % max(spe, 1) == 0:
                bar.set_postfix(loss=float(losses[-1][-1]))
            if hi in captures:
                checkpoints.append(ts)
        bar.close()
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros((0,), np.float32)  # noqa: E731
        return TrainResult(ts, tuple(checkpoints), cat(losses), cat(accs))


class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss or non-finite parameters.

    Attributes:
        step: the global step whose loss (or resulting parameters) was not finite.
        epoch: ``step // steps_per_epoch``.
        state: the last :class:`TrainState` known to be finite (the start of the failing segment).
    """

    def __init__(self, msg: str, *, step: int, epoch: int, state: TrainState) -> None:
        super().__init__(msg)
        self.step, self.epoch, self.state = step, epoch, state


@jax.jit
def _all_finite(params: Params) -> Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _check_finite(seg_loss: np.ndarray, params: Params, start: int, spe: int, last_ok: TrainState) -> None:
    """Raise :class:`DivergenceError` at the first non-finite loss of a segment starting at global
    step ``start``, or if the parameters after it are not finite."""
    bad = np.nonzero(~np.isfinite(seg_loss))[0]
    if bad.size:
        step = start + int(bad[0])
        what = f"the minibatch loss is {seg_loss[bad[0]]}"
    elif not bool(_all_finite(params)):
        step = start + seg_loss.size - 1
        what = "the parameters after the update are not finite"
    else:
        return
    epoch = step // max(spe, 1)
    msg = (
        f"training diverged at global step {step} (epoch {epoch}, step {step - epoch * spe} of {spe} in it): "
        f"{what}; lower the learning rate or check the data. The last finite state is at step {last_ok.step} "
        "(DivergenceError.state)"
    )
    raise DivergenceError(msg, step=step, epoch=epoch, state=last_ok)


def spawn(
    key: Key,
    trainer: Trainer,
    checkpoint: TrainState,
    *,
    steps: int,
    capture_every: int | None = None,
    progress: bool | None = False,
) -> TrainResult:
    """Continue ``checkpoint`` (taken at step ``k``) to global step ``steps`` with data-order ``key``.

    With the parent's key this reproduces the parent exactly; with another key it is a child of the
    instability analysis (Frankle et al. 2020, arXiv 1912.05671).
    """
    return trainer.run(key, checkpoint, steps=steps, capture_every=capture_every, progress=progress)

"""Lanczos tridiagonalisation with full reorthogonalisation, restarts and early stopping.

For a symmetric operator ``A`` (given only as ``matvec``) and a start vector ``q₀``, ``K`` steps of
Lanczos (1950) build an orthonormal basis ``Q = [q₀ … q_{K-1}]`` of the Krylov space and a
symmetric tridiagonal ``T = Qᵀ A Q`` (diagonal ``α``, off-diagonal ``β``) such that

.. math::  A Q = Q T + β_{K-1} q_K e_Kᵀ .

The eigenvalues ``θ`` of ``T = S diag(θ) Sᵀ`` (Ritz values) approximate the extremes of the
spectrum first (Kaniel-Paige theory), each with the exact residual ``‖A Q s_i − θ_i Q s_i‖ =
|β_{K-1} S_{K-1,i}|``; the squared first components ``S_{0,i}²`` are the Gauss-quadrature weights
of the spectral measure of ``q₀`` (stochastic Lanczos quadrature). Golub & Van Loan, *Matrix
Computations*, ch. 10; Parlett, *The Symmetric Eigenvalue Problem*, ch. 13.

Each step here:

1. ``w = A q_j − α_j q_j − β_{j-1} q_{j-1}`` (the three-term recurrence);
2. full reorthogonalisation by classical Gram-Schmidt against the *filled* rows of ``Q`` only
   (chunks of 16 rows under a loop whose trip count is ``j // 16 + 1``), with a second pass only
   when the first removed more than ``1 − 1/√2`` of ``w``'s norm (Daniel, Gragg, Kaufman &
   Stewart 1976; "twice is enough", Giraud et al. 2005);
3. if ``‖w‖ ≤ 32 ε ‖A q_j‖`` the Krylov space is invariant (to working precision): ``β_j`` is set to
   0 and the iteration restarts from a random vector orthogonal to ``Q``, so eigenvalues of higher
   multiplicity or outside the start vector's reach are still found, and SLQ weights of the new
   block are exactly zero;
4. optionally, ``stop(θ, residuals, j)`` ends the iteration early (e.g. once the wanted Ritz pairs
   have converged).

Why not matfree's ``decomp.tridiag_sym``: it runs Arnoldi (a full Hessenberg ``H``) with two
reorthogonalisation passes against the *whole* preallocated ``(n, K)`` basis at every step, and
writes basis columns with a stride of ``K``. On the 301k-parameter digits MLP (2-core CPU, the same
hoisted Hessian-vector product, medians of 3): 40 steps took 2.97 s there and 2.22 s here, against
1.93 s for the 40 bare products; 100 steps 11.37 s there and 5.98 s here, against 4.67 s (overhead
6.7 s vs 1.3 s). It also has no early stopping and divides by zero on an invariant Krylov space.
The tridiagonal ``T`` is the same up to rounding.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from probes import lanczos
    >>> A = jnp.diag(jnp.arange(1.0, 9.0))
    >>> tri = lanczos.tridiagonalize(jax.random.key(0), lambda v: A @ v, jnp.ones(8), 8)
    >>> theta, _, _ = lanczos.ritz(tri)
    >>> [round(float(t), 4) for t in theta[-2:]]
    [7.0, 8.0]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from landscape._types import Array, Key

__all__ = ["CHUNK", "Tridiagonal", "ritz", "tridiagonalize"]

CHUNK = 16
"""Basis rows per reorthogonalisation block (the loop over blocks stops at the filled ones)."""

_DGKS = 0.7071067811865476  # 1/√2: a second Gram-Schmidt pass when the first lost more than this
_INVARIANT = 32  # ‖w‖ <= 32 ε ‖A q‖: what is left of w is rounding noise, the Krylov space is invariant


@dataclasses.dataclass(frozen=True)
class Tridiagonal:
    """The result of :func:`tridiagonalize`.

    Attributes:
        alpha: ``(K,)`` diagonal of ``T``; zero at and after ``num_steps``.
        beta: ``(K,)`` ``beta[i]`` couples ``q_i`` and ``q_{i+1}``; ``beta[num_steps - 1]`` is
            the norm of the final residual. Zero where the iteration restarted.
        basis: ``(K_pad, n)`` orthonormal Lanczos vectors as rows (``K_pad`` rounds ``K`` up to a
            multiple of the chunk); rows at and after ``num_steps`` are zero.
        num_steps: ``()`` steps taken (``K`` unless stopped early or non-finite).
        restarts: ``()`` number of restarts after an invariant subspace.
        finite: ``()`` whether every product and coefficient was finite.
    """

    alpha: Array
    beta: Array
    basis: Array
    num_steps: Array
    restarts: Array
    finite: Array


jax.tree_util.register_dataclass(
    Tridiagonal, data_fields=["alpha", "beta", "basis", "num_steps", "restarts", "finite"], meta_fields=[]
)


def ritz(tri: Tridiagonal) -> tuple[Array, Array, Array]:
    """Ritz values, eigenvectors of ``T`` and residual norms after ``tri.num_steps = j`` steps.

    Returns:
        ``theta`` ``(K,)`` ascending, the ``j`` Ritz values first and the ``K − j`` unused slots
        filled with the largest one (so ``theta`` stays sorted and ``theta[j-1]`` is the top);
        ``S`` ``(K, K)`` eigenvectors of ``T`` as columns (unit vectors ``e_i`` in unused slots,
        so their quadrature weights ``S[0, i]²`` are 0); ``residuals`` ``(K,)``
        ``|β_{j-1} S_{j-1,i}|`` (0 in unused slots). All NaN if ``tri.finite`` is false.
    """
    return _ritz(tri.alpha, tri.beta, tri.num_steps, tri.finite)


def _ritz(alpha: Array, beta: Array, j: Array, finite: Array) -> tuple[Array, Array, Array]:
    K = alpha.shape[0]
    idx = jnp.arange(K)
    valid = idx < j
    a = jnp.where(valid & finite, alpha, 0)
    b = jnp.where((idx < j - 1) & finite, beta, 0)
    # unused slots: distinct values above every Ritz value (Gershgorin bound), decoupled from T_j
    # and of the same scale, so the eigensolver's absolute error stays ε · ‖T_j‖
    bound = jnp.max(jnp.abs(a)) + 2 * jnp.max(jnp.abs(b))
    bound = jnp.where(bound > 0, bound, 1)
    diag = jnp.where(valid, a, bound * (2 + idx.astype(a.dtype) / K))
    T = jnp.diag(diag) + jnp.diag(b[:-1], 1) + jnp.diag(b[:-1], -1)
    theta, S = jnp.linalg.eigh(T)
    last = jnp.clip(j - 1, 0, K - 1)
    top = theta[last]
    theta = jnp.where(valid, theta, top)
    final_beta = jnp.where(finite, beta[last], 0)
    resid = jnp.where(valid, jnp.abs(final_beta * S[last, :]), 0)
    nan = jnp.asarray(jnp.nan, theta.dtype)
    return (
        jnp.where(finite, theta, nan),
        jnp.where(finite, S, nan),
        jnp.where(finite, resid, nan),
    )


def _pass(Q: Array, w: Array, j: Array, chunk: int) -> Array:
    """``w − Q_{0..j}ᵀ (Q_{0..j} w)``: one classical Gram-Schmidt pass over the filled rows."""
    blocks = j // chunk + 1
    h = jax.lax.fori_loop(
        0,
        blocks,
        lambda c, h: jax.lax.dynamic_update_slice_in_dim(
            h, jax.lax.dynamic_slice_in_dim(Q, c * chunk, chunk, 0) @ w, c * chunk, 0
        ),
        jnp.zeros(Q.shape[0], w.dtype),
    )
    return jax.lax.fori_loop(
        0,
        blocks,
        lambda c, acc: acc
        - jax.lax.dynamic_slice_in_dim(h, c * chunk, chunk, 0) @ jax.lax.dynamic_slice_in_dim(Q, c * chunk, chunk, 0),
        w,
    )


def _orthogonalize(Q: Array, w: Array, j: Array, chunk: int) -> Array:
    """Full reorthogonalisation with the DGKS criterion for a second pass."""
    w1 = _pass(Q, w, j, chunk)
    again = jnp.linalg.norm(w1) < _DGKS * jnp.linalg.norm(w)
    return jax.lax.cond(again, lambda v: _pass(Q, v, j, chunk), lambda v: v, w1)


def tridiagonalize(
    key: Key,
    matvec: Callable[[Array], Array],
    v0: Array,
    num_steps: int,
    *,
    reorthogonalize: bool = True,
    stop: Callable[[Array, Array, Array], Array] | None = None,
    min_steps: int = 1,
    support: Array | None = None,
) -> Tridiagonal:
    """At most ``num_steps`` Lanczos steps on ``matvec`` from ``v0`` (normalised here).

    Args:
        key: typed PRNG key for restart vectors (used only after an invariant subspace).
        matvec: the symmetric operator, ``(n,) -> (n,)``.
        v0: start vector ``(n,)``, nonzero.
        num_steps: the most steps ``K`` (``1 <= K <= n``).
        reorthogonalize: full reorthogonalisation (default); ``False`` keeps only the three-term
            recurrence (cheaper, loses orthogonality once Ritz values converge: ghost copies).
        stop: optional ``stop(theta, residuals, j) -> bool`` evaluated after every step ``j >=
            min_steps`` on the current Ritz decomposition (:func:`ritz`); ``True`` ends the loop.
        min_steps: the fewest steps before ``stop`` is consulted.
        support: optional ``(n,)`` 0/1 mask the restart vectors are multiplied by, so that an
            operator living on part of the vector (a zero-padded, sharded flat vector,
            :class:`landscape.sharding.FlatLayout`) never sees the padding.

    Returns:
        A :class:`Tridiagonal`. Jittable; the loop is a ``lax.while_loop`` (not reverse-mode
        differentiable).
    """
    n = v0.shape[0]
    dtype = v0.dtype
    K = int(num_steps)
    chunk = min(CHUNK, K)
    K_pad = -(-K // chunk) * chunk
    eps = jnp.finfo(dtype).eps

    def restart_vector(Q: Array, j: Array) -> Array:
        r = jax.random.normal(jax.random.fold_in(key, j), (n,), dtype)
        if support is not None:
            r = r * support
        r = _pass(Q, _pass(Q, r, j, chunk), j, chunk)
        norm = jnp.linalg.norm(r)
        return jnp.where(norm > 0, r / jnp.where(norm > 0, norm, 1), jnp.zeros_like(r))

    def body(state: tuple) -> tuple:
        j, Q, q, q_prev, alpha, beta, restarts, finite, _ = state
        Q = jax.lax.dynamic_update_slice_in_dim(Q, q[None], j, 0)
        aq = matvec(q)
        a = jnp.vdot(q, aq)
        b_prev = jnp.where(j > 0, beta[jnp.maximum(j - 1, 0)], 0)
        w = aq - a * q - b_prev * q_prev
        if reorthogonalize:
            w = _orthogonalize(Q, w, j, chunk)
        b = jnp.linalg.norm(w)
        ok = jnp.isfinite(a) & jnp.isfinite(b)
        invariant = ok & (b <= _INVARIANT * eps * jnp.linalg.norm(aq))
        b = jnp.where(invariant, 0, b)
        q_next = jax.lax.cond(
            invariant, lambda: restart_vector(Q, j), lambda: w / jnp.where(b > 0, b, 1)
        )
        alpha = alpha.at[j].set(a)
        beta = beta.at[j].set(b)
        finite = finite & ok
        j = j + 1
        done = ~finite
        if stop is not None:

            def converged() -> Array:
                theta, _, resid = _ritz(alpha, beta, j, finite)
                return jnp.asarray(stop(theta, resid, j), bool)

            done = done | jax.lax.cond(finite & (j >= min_steps), converged, lambda: jnp.zeros((), bool))
        restarted = invariant & (j < K) & ~done  # the loop goes on from the restart vector
        return j, Q, q_next, q, alpha, beta, restarts + restarted.astype(jnp.int32), finite, done

    def cond(state: tuple) -> Array:
        j, *_, done = state
        return (j < K) & ~done

    norm0 = jnp.linalg.norm(v0)
    q0 = v0 / jnp.where(norm0 > 0, norm0, 1)
    finite0 = jnp.all(jnp.isfinite(v0)) & (norm0 > 0)
    init = (
        jnp.zeros((), jnp.int32),
        jnp.zeros((K_pad, n), dtype),
        q0,
        jnp.zeros_like(q0),
        jnp.zeros(K, dtype),
        jnp.zeros(K, dtype),
        jnp.zeros((), jnp.int32),
        finite0,
        ~finite0,
    )
    j, Q, _, _, alpha, beta, restarts, finite, _ = jax.lax.while_loop(cond, body, init)
    return Tridiagonal(alpha=alpha, beta=beta, basis=Q, num_steps=j, restarts=restarts, finite=finite)

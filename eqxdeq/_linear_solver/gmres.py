from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.scipy as jsp
import lineax as lx
from jaxtyping import Array, PyTree

from .._flat import combine_rows, inner_rows, ravel, set_row, small_dtype, unravel
from .._misc import real_dtype
from .._validation import check_int, check_real
from .neumann import (
    AbstractSquareSolver,
    check_max_steps,
    initial_guess,
    nonfinite_result,
    precise_result,
    RealScalarLike,
    SquareState,
)


def _givens(a: Array, b: Array) -> tuple[Array, Array, Array]:
    """`(c, s, r)` with `c` real, `|c|² + |s|² = 1` and
    `[[c, s], [-conj(s), c]] @ [a, b] = [r, 0]`."""
    abs_a, abs_b = jnp.abs(a), jnp.abs(b)
    norm = jnp.hypot(abs_a, abs_b)
    safe_norm = jnp.where(norm > 0, norm, 1)
    # The phase of `a` (1 for a = 0), so that the rotation is well defined there.
    phase = jnp.where(abs_a > 0, a / jnp.where(abs_a > 0, abs_a, 1).astype(a.dtype), 1)
    c = jnp.where(norm > 0, abs_a / safe_norm, 1)
    s = jnp.where(norm > 0, phase * jnp.conj(b) / safe_norm.astype(a.dtype), 0)
    return c, s.astype(a.dtype), (phase * norm.astype(a.dtype)).astype(a.dtype)


class GMRES(AbstractSquareSolver):
    r"""Restarted GMRES for a square system $A x = b$, which stops as soon as the
    residual is small enough.

    Each step applies $A$ once, extends an orthonormal basis of the Krylov subspace
    (classical Gram–Schmidt on a flat `(restart + 1, size)` buffer: two
    matrix-vector products with it) and updates a QR factorisation of the projected
    least-squares problem by one Givens rotation, which gives the residual norm
    $\|b - A x_k\|_2$ of the current iterate for free. The iteration stops at the
    first step at which

    $$\|b - A x_k\|_2 \le \mathrm{atol} + \mathrm{rtol}\,\|b\|_2,$$

    and after `restart` steps restarts from $x_k$. At the end of every cycle (one
    more product with $A$) the true residual replaces the estimate, so that the
    result does not rest on the orthogonality of the basis.

    Compared with `lineax.GMRES`, which measures convergence only once per restart
    cycle (after all `restart` steps, and with an elementwise test on both the
    residual and the last update, so usually one cycle late), this stops within a
    step of the tolerance and keeps its basis as one flat buffer: in a DEQ's
    backward pass it needs about as many products with $A$ (vector-Jacobian products
    of the layer) as the forward solve needed evaluations of the layer. It is the
    default linear solver of [`eqxdeq.ImplicitAdjoint`][].

    **Arithmetic.** A pytree is solved as one flat vector in its widest floating
    dtype, at least float32 (bfloat16 and float16 states are solved in float32); a
    complex system (every leaf complex) uses Hermitian inner products, and a pytree
    mixing real and complex leaves is solved as the real vector space of their real
    and imaginary parts.

    **Results.** Not converging within `max_steps` steps is reported as
    `lineax.RESULTS.max_steps_reached`; `stagnation_iters` consecutive cycles that
    do not decrease the residual as `lineax.RESULTS.stagnation` (the residual has
    reached what the dtype resolves, or the operator is singular on the right-hand
    side); a non-finite residual as `lineax.RESULTS.breakdown` (or
    `nonfinite_input` when $b$ or `y0` is non-finite). `stats["num_steps"]` is the
    number of steps, `stats["result"]`, an [`eqxdeq.RESULTS`][], the same outcome
    except that a non-finite residual is `RESULTS.linear_solve_diverged` (GMRES
    minimises the residual, so it does not otherwise diverge). Used as the backward
    solver of an eqxdeq adjoint, a failure is reported as that of the *backward
    (adjoint) linear solve*, naming the adjoint and this solver.

    This supports the following `options` (as passed to
    `lx.linear_solve(..., options=...)`):

    - `y0`: the initial estimate of the solution, with the same structure as the
        right-hand side. Defaults to all zeros. Dropped by `transpose` and `conj`.

    The loops are `lax.while_loop`s: `lineax.linear_solve` has its own forward- and
    reverse-mode rules (which use `transpose` and `conj`). Under `jax.vmap` each
    batch element stops when it has converged.

    ??? cite "References"

        ```bibtex
        @article{saad1986gmres,
            author = {Saad, Youcef and Schultz, Martin H.},
            title = {{GMRES}: A Generalized Minimal Residual Algorithm for Solving
                     Nonsymmetric Linear Systems},
            journal = {SIAM Journal on Scientific and Statistical Computing},
            volume = {7},
            number = {3},
            pages = {856--869},
            year = {1986},
        }
        ```
    """

    rtol: RealScalarLike
    atol: RealScalarLike
    restart: int = eqx.field(default=20, static=True)
    max_steps: RealScalarLike | None = None
    stagnation_iters: int = eqx.field(default=2, static=True)

    def __check_init__(self):
        for name in ("rtol", "atol"):
            check_real("GMRES", name, getattr(self, name), lower=0)
        check_int("GMRES", "restart", self.restart, minimum=1)
        check_int("GMRES", "stagnation_iters", self.stagnation_iters, minimum=1)
        check_max_steps("GMRES", self.max_steps)

    def compute(
        self, state: SquareState, vector: PyTree[Array], options: dict[str, Any]
    ) -> tuple[PyTree[Array], lx.RESULTS, dict[str, Any]]:
        operator = state
        dtype = small_dtype(vector)
        rdtype = real_dtype(dtype)
        b = ravel(vector, dtype)
        size = b.size
        restart = min(self.restart, size)
        max_steps = 10 * size if self.max_steps is None else self.max_steps

        def matvec(x):
            return ravel(operator.mv(unravel(x, vector)), dtype)

        def norm(x):
            return jnp.sqrt(jnp.real(jnp.vdot(x, x))).astype(rdtype)

        y0 = initial_guess("GMRES", options, vector)
        if y0 is None:
            x0 = jnp.zeros_like(b)
            r0 = b
        else:
            x0 = ravel(y0, dtype)
            r0 = b - matvec(x0)
        with jax.numpy_dtype_promotion("standard"):
            tol = (self.atol + self.rtol * norm(b)).astype(rdtype)
        zero = jnp.zeros((), rdtype)

        def cycle(x, r, r_norm, steps):
            """`restart` steps of GMRES from `x` (with residual `r`), stopping early
            once the estimated residual is within `tol`."""
            basis = jnp.zeros((restart + 1, size), dtype)
            basis = set_row(
                basis, 0, r / jnp.where(r_norm > 0, r_norm, 1).astype(dtype)
            )
            # Row j of `columns` is column j of the triangular factor R (rows of
            # unused columns are the identity's, so the final solve is defined).
            columns = jnp.eye(restart, restart + 1, dtype=dtype)
            # The product of the Givens rotations so far: Q H = R for the Hessenberg
            # matrix H of the Arnoldi relation, and the residual of the projected
            # problem min ‖r_norm e₁ - H y‖ is r_norm |Q[k, 0]| after k steps.
            rotations = jnp.eye(restart + 1, dtype=dtype)

            def cond(carry):
                k, _, _, _, estimate, breakdown = carry
                return (
                    (k < restart)
                    & (estimate > tol)
                    & jnp.logical_not(breakdown)
                    & (steps + k < max_steps)
                )

            def body(carry):
                k, basis, columns, rotations, _, _ = carry
                w = matvec(basis[k])
                # Classical Gram–Schmidt (rows above k are zero).
                h = inner_rows(basis, w, dtype)
                w = w - combine_rows(h, basis)
                w_norm = norm(w)
                # An invariant subspace (or a non-finite product): this cycle ends,
                # and the true residual decides.
                breakdown = jnp.logical_not(w_norm > 0) | jnp.logical_not(
                    jnp.isfinite(w_norm)
                )
                w = w / jnp.where(breakdown, 1, w_norm).astype(dtype)
                basis = set_row(basis, k + 1, w)
                h = set_row(h, k + 1, w_norm.astype(dtype))
                h = rotations @ h
                c, s, diag = _givens(h[k], h[k + 1])
                c = c.astype(dtype)
                pair = lax.dynamic_slice_in_dim(rotations, k, 2, 0)
                rotate = jnp.stack([jnp.stack([c, s]), jnp.stack([-jnp.conj(s), c])])
                rotations = lax.dynamic_update_slice_in_dim(
                    rotations, rotate @ pair, k, 0
                )
                h = set_row(set_row(h, k, diag), k + 1, jnp.zeros((), dtype))
                columns = set_row(columns, k, h[:restart])
                estimate = r_norm * jnp.abs(rotations[k + 1, 0]).astype(rdtype)
                estimate = jnp.where(jnp.isfinite(estimate), estimate, zero)
                return k + 1, basis, columns, rotations, estimate, breakdown

            init = (0, basis, columns, rotations, r_norm, jnp.array(False))
            k, basis, columns, rotations, _, _ = lax.while_loop(cond, body, init)
            g = r_norm.astype(dtype) * rotations[:restart, 0]
            g = jnp.where(jnp.arange(restart) < k, g, 0)
            coeffs = jsp.linalg.solve_triangular(columns[:, :restart].T, g)
            x = x + combine_rows(coeffs, basis[:restart])
            return x, k

        def outer_cond(carry):
            _, _, r_norm, _, steps, stalled = carry
            return (
                (r_norm > tol)
                & jnp.isfinite(r_norm)
                & (steps < max_steps)
                & (stalled < self.stagnation_iters)
            )

        def outer_body(carry):
            x, r, r_norm, best, steps, stalled = carry
            x, k = cycle(x, r, r_norm, steps)
            r = b - matvec(x)
            r_norm = norm(r)
            stalled = jnp.where(r_norm < best, 0, stalled + 1)
            return x, r, r_norm, jnp.minimum(best, r_norm), steps + k, stalled

        r0_norm = norm(r0)
        init = (x0, r0, r0_norm, r0_norm, jnp.array(0), jnp.array(0))
        x, _, r_norm, _, num_steps, stalled = lax.while_loop(
            outer_cond, outer_body, init
        )
        converged = r_norm <= tol
        result = lx.RESULTS.where(
            converged,
            lx.RESULTS.successful,
            lx.RESULTS.where(
                stalled >= self.stagnation_iters,
                lx.RESULTS.stagnation,
                lx.RESULTS.max_steps_reached,
            ),
        )
        finite = jnp.isfinite(r_norm) & jnp.all(jnp.isfinite(x))
        bad_input = nonfinite_result(vector if y0 is None else (vector, y0))
        result = lx.RESULTS.where(finite, result, bad_input)
        # GMRES minimises the residual, so it does not diverge: only a non-finite
        # residual (`breakdown`) is reported as a diverged solve. (Rounding can leave
        # a stagnated residual a hair above the initial one.)
        stats = {
            "num_steps": num_steps,
            "result": precise_result(result, jnp.array(False)),
        }
        return unravel(x, vector), result, stats


GMRES.__init__.__doc__ = r"""**Arguments:**

- `rtol`: relative tolerance: the solve stops once
    $\|b - A x\|_2 \le \mathrm{atol} + \mathrm{rtol}\,\|b\|_2$.
- `atol`: absolute tolerance.
- `restart`: the size of the Krylov subspace built between restarts (the basis
    buffer has `restart + 1` rows of the system's size). Default 20.
- `max_steps`: the maximum number of steps (products with $A$, not counting the
    one per restart that measures the true residual). Defaults to `10 ×` the size
    of the system, as `lineax.GMRES`. A Python integer or a scalar integer array.
- `stagnation_iters`: the number of consecutive restart cycles without a decrease
    of the residual after which the solve stops as stagnated. Default 2.
"""

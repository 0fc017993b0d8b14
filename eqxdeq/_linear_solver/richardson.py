from collections.abc import Callable
from typing import Any

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, PyTree, Scalar

from .._misc import (
    is_python_number,
    stats_dtype,
    tree_allfinite,
    tree_scale,
    two_norm,
    ω,
)
from .._validation import check_norm, check_real
from .neumann import (
    AbstractSquareSolver,
    check_max_steps,
    initial_guess,
    nonfinite_result,
    precise_result,
    RealScalarLike,
    SquareState,
)


class Richardson(AbstractSquareSolver):
    r"""Damped Richardson (fixed-point) iteration for a square system $A x = b$:

    $$x_{k+1} = x_k + \tau (b - A x_k),$$

    from $x_0$ = `options["y0"]` (default zero), until converged. It converges for
    any $x_0$ if and only if the spectral radius of $I - \tau A$ is below 1, at that
    rate.

    In a DEQ, $A = I - \partial_y f$ and with $\tau = 1$ the step is
    $x \leftarrow \partial_y f\, x + b$: the fixed-point iteration of the linearised
    layer. In the backward pass ($A^\top$) it therefore converges exactly when Picard
    iteration on $f$ does near the fixed point, and at the same rate. Each step costs
    one matrix-vector product with $A$. (Started from $x_0 = 0$, its $k$-th iterate
    is `eqxdeq.Neumann(steps=k - 1, damping=τ)`.)

    **Termination.** As in `lineax.CG` and `lineax.GMRES`, with the elementwise scales
    $s_b = \mathrm{atol} + \mathrm{rtol}\,|b|$ and
    $s_x = \mathrm{atol} + \mathrm{rtol}\,|x_k|$, the iteration stops once

    $$\left\| \frac{b - A x_k}{s_b} \right\| \le 1 \quad\text{and}\quad
    \left\| \frac{\tau (b - A x_k)}{s_x} \right\| \le 1,$$

    i.e. both the residual and the next update are within tolerance, for the norm
    `norm` (default: the max norm, so each element is within its tolerance).

    **Results.** Not converging within `max_steps` is reported as
    `lineax.RESULTS.max_steps_reached`. A non-finite iterate (e.g. the iteration
    diverged, spectral radius above 1) stops the loop and is reported as
    `lineax.RESULTS.breakdown`, or as `lineax.RESULTS.nonfinite_input` when $b$ or
    `y0` is non-finite. `stats["num_steps"]` is the number of steps (matrix-vector
    products after the first residual) taken. `stats["result"]`, an
    [`eqxdeq.RESULTS`][], is more precise: `RESULTS.linear_solve_diverged` when the
    solve failed with a final residual larger than the initial one
    $\|b - A x_0\|_2$ (or non-finite), i.e. the iteration diverged rather than
    converged too slowly; else lineax's result. (The loop itself does not stop on
    growth: a non-normal iteration may grow before it converges.) Used as the
    backward solver of an eqxdeq adjoint, a failure is reported as that of the
    *backward (adjoint) linear solve*, naming the adjoint and this solver.

    This supports the following `options` (as passed to
    `lx.linear_solve(..., options=...)`):

    - `y0`: the initial estimate of the solution, with the same structure as the
        right-hand side. Defaults to all zeros. (For example, the previous backward
        solution in a DEQ training loop.) Dropped by `transpose` and `conj`, as in
        lineax's own iterative solvers.

    The loop is a `lax.while_loop`: it is not itself differentiated, as
    `lineax.linear_solve` has its own forward- and reverse-mode rules, which use
    `transpose` (for $A^\top$) and `conj`. Under `jax.vmap` each batch element stops
    when it has converged.

    ??? cite "References"

        ```bibtex
        @article{richardson1911approximate,
            author = {Richardson, Lewis Fry},
            title = {The approximate arithmetical solution by finite differences of
                     physical problems involving differential equations, with an
                     application to the stresses in a masonry dam},
            journal = {Philosophical Transactions of the Royal Society of London.
                       Series A},
            volume = {210},
            pages = {307--357},
            year = {1911},
        }

        @book{saad2003iterative,
            author = {Saad, Yousef},
            title = {Iterative Methods for Sparse Linear Systems},
            edition = {2},
            publisher = {SIAM},
            year = {2003},
        }
        ```
    """

    rtol: RealScalarLike
    atol: RealScalarLike
    max_steps: RealScalarLike | None = None
    damping: RealScalarLike = 1.0
    norm: Callable[[PyTree], Scalar] = lx.internal.max_norm

    def __check_init__(self):
        for name in ("rtol", "atol"):
            check_real("Richardson", name, getattr(self, name), lower=0)
        check_norm("Richardson", self.norm)
        check_max_steps("Richardson", self.max_steps)
        if is_python_number(self.damping) and not 0 < self.damping < 2:
            raise ValueError(
                f"`Richardson(damping=...)` must be in (0, 2), got {self.damping!r}."
            )
        if (
            self.max_steps is None
            and is_python_number(self.rtol)
            and is_python_number(self.atol)
            and self.rtol == 0
            and self.atol == 0
        ):
            raise ValueError(
                "`Richardson(rtol=0, atol=0)` never converges: pass a positive `rtol` "
                "or `atol`, or a fixed number of steps as `max_steps`."
            )

    def compute(
        self, state: SquareState, vector: PyTree[Array], options: dict[str, Any]
    ) -> tuple[PyTree[Array], lx.RESULTS, dict[str, Any]]:
        operator = state
        y0 = initial_guess("Richardson", options, vector)
        if y0 is None:
            y0 = jtu.tree_map(jnp.zeros_like, vector)
        if self.max_steps is None:
            size = sum(jnp.size(x) for x in jtu.tree_leaves(vector))
            max_steps = 10 * size  # As lineax's CG and GMRES (and SciPy).
        else:
            max_steps = self.max_steps
        tau = jnp.asarray(self.damping)
        # With rtol = atol = 0 (and `max_steps` given), run exactly `max_steps` steps.
        has_scale = not (
            is_python_number(self.rtol)
            and is_python_number(self.atol)
            and self.rtol == 0
            and self.atol == 0
        )

        def scale(y):
            return (self.atol + self.rtol * ω(y).call(jnp.abs)).ω

        def residual(x):
            return (vector**ω - operator.mv(x) ** ω).ω

        def not_converged(x, r):
            if not has_scale:
                return jnp.array(True)
            with jax.numpy_dtype_promotion("standard"):
                norm_b = self.norm((r**ω / scale(vector) ** ω).ω)
                norm_x = self.norm((tree_scale(tau, r) ** ω / scale(x) ** ω).ω)
            # NaN compares False: a non-finite residual is caught separately.
            return (norm_b > 1) | (norm_x > 1)

        def cond_fun(carry):
            x, r, step = carry
            return (step < max_steps) & tree_allfinite(r) & not_converged(x, r)

        def body_fun(carry):
            x, r, step = carry
            x = (x**ω + tree_scale(tau, r) ** ω).ω
            return x, residual(x), step + 1

        step = jnp.zeros((), jnp.result_type(max_steps))
        r0 = residual(y0)
        init_carry = (y0, r0, step)
        solution, r, num_steps = lax.while_loop(cond_fun, body_fun, init_carry)

        if has_scale:
            result = lx.RESULTS.where(
                not_converged(solution, r),
                lx.RESULTS.max_steps_reached,
                lx.RESULTS.successful,
            )
        else:
            result = lx.RESULTS.successful
        finite = tree_allfinite(r) & tree_allfinite(solution)
        bad_input = nonfinite_result((vector, y0))
        result = lx.RESULTS.where(finite, result, bad_input)
        # Diverged: stopped short of the tolerance with a residual larger than the
        # initial one (or non-finite, a `breakdown`). Reported in `stats["result"]`;
        # `result` keeps lineax's vocabulary.
        dtype = stats_dtype(vector)
        grew = two_norm(r, dtype) > two_norm(r0, dtype)
        diverged = (result != lx.RESULTS.successful) & grew
        stats = {"num_steps": num_steps, "result": precise_result(result, diverged)}
        return solution, result, stats


Richardson.__init__.__doc__ = r"""**Arguments:**

- `rtol`: relative tolerance for terminating the solve (see the termination
    criterion above).
- `atol`: absolute tolerance for terminating the solve.
- `max_steps`: the maximum number of iterations. If more are needed then the solve
    fails with `lineax.RESULTS.max_steps_reached`. Defaults to `10 ×` the size of
    the system, as `lineax.CG` and `lineax.GMRES`. A Python integer, or a scalar
    integer JAX array (a runtime budget: changing it does not recompile). With
    `rtol = atol = 0`, exactly `max_steps` steps are taken and the solve succeeds.
- `damping`: $\tau \in (0, 2)$, the step size. Default 1.
- `norm`: the norm of the scaled residual and update in the termination criterion.
    Defaults to the max norm (`lineax.internal.max_norm`).
"""

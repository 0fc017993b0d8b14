from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optimistix as optx

from .._linear_solver import GMRES
from .._validation import check_linear_solver
from ._backward import (
    BackwardStats,
    check_callback,
    check_on_failure,
    check_probe,
    describe_solver,
    Report,
)
from ._core import implicit_apply, INPUT_Y0, is_fixed_point_rewrite


def default_linear_solver(dtype) -> lx.AbstractLinearSolver:
    """The backward solver used when none is given: [`eqxdeq.GMRES`][] with a
    relative tolerance set from the dtype of the fixed point."""
    eps = float(jnp.finfo(dtype).eps)
    if eps < 1e-10:  # float64
        tol = 1e-12
    elif eps < 1e-5:  # float32
        tol = 1e-5
    else:  # 16-bit
        tol = 4 * eps
    return GMRES(rtol=tol, atol=0.0)


def default_stagnation_tol(dtype) -> float:
    """In float64 and 16-bit dtypes the default tolerance is close to what the dtype
    resolves, so GMRES may stagnate just above it: a stagnated solve of the default
    solver with a relative residual below $\\sqrt{\\varepsilon}$ (3e-4 in float32,
    1.5e-8 in float64) is accepted."""
    return float(np.sqrt(np.finfo(dtype).eps))


class ImplicitAdjoint(optx.AbstractAdjoint):
    r"""Exact gradients through a fixed point by the implicit function theorem.

    For $y^\star = f(y^\star, \theta)$,
    $\frac{\mathrm{d}y^\star}{\mathrm{d}\theta} = (I - \partial_y f)^{-1}
    \partial_\theta f$, so reverse mode solves the adjoint system
    $(I - \partial_y f)^\top w = \bar y$ and returns $(\partial_\theta f)^\top w$.
    The operator is applied matrix-free (one vector-Jacobian product of $f$ per
    iteration of the linear solver); the Jacobian is never materialised unless you
    pass a dense solver such as `lineax.LU()`. Memory does not depend on the number of
    forward iterations.

    Unlike [`optimistix.ImplicitAdjoint`][], whose default linear solver materialises
    the Jacobian, the default here is [`eqxdeq.GMRES`][] (matrix-free restarted GMRES
    that stops at the first step within its tolerance) with a tolerance chosen from
    the dtype. Any [`lineax.AbstractLinearSolver`][] may be given, including
    eqxdeq's [`eqxdeq.Richardson`][] and [`eqxdeq.Neumann`][]. Forward mode
    (`jax.jvp`) and higher derivatives work too.

    !!! info "Reporting and failures of the backward solve"

        The backward solve reports what it did (steps, final residual
        $\|(I - \partial_y f)^\top v - \bar y\|_2$, result) through a
        [`eqxdeq.BackwardStats`][] `probe` (whose gradient is the statistics: pure,
        works under `jit` and `vmap`) and/or a host `callback`. If it fails (runs
        out of steps, stagnates, diverges, e.g. because the layer is not
        contractive at the fixed point), `on_failure` decides: `"raise"` (the
        default) raises a runtime error whose message names this adjoint, its
        linear solver and what to try; `"nan"` returns NaN gradients; `"jfb"`
        returns the JFB gradient (the cotangent in place of the solution) and counts
        it in `BackwardStats.fallbacks`. See the
        [failures guide](../guides/failures.md).
    """

    linear_solver: lx.AbstractLinearSolver | None = None
    # Annotated `str` (not a `Literal`) so that `__check_init__` can
    # reject other values with a helpful message.
    on_failure: str = eqx.field(default="raise", static=True, kw_only=True)
    callback: Callable[[BackwardStats], Any] | None = eqx.field(
        default=None, static=True, kw_only=True
    )
    probe: BackwardStats | None = eqx.field(default=None, kw_only=True)

    def __check_init__(self):
        check_linear_solver(
            "ImplicitAdjoint", "linear_solver", self.linear_solver, allow_none=True
        )
        check_on_failure(self.on_failure, "ImplicitAdjoint")
        check_callback(self.callback, "ImplicitAdjoint")
        check_probe(self.probe, "ImplicitAdjoint")

    def apply(self, primal_fn, rewrite_fn, inputs, tags):
        linear_solver = self.linear_solver
        stagnation_tol = None
        if linear_solver is None:
            # Tolerances for the least precise leaf: f (and so the operator) is
            # only as accurate as that (the solve itself runs in the widest dtype).
            leaves = jtu.tree_leaves(inputs[INPUT_Y0])
            dtype = max((x.dtype for x in leaves), key=lambda d: jnp.finfo(d).eps)
            linear_solver = default_linear_solver(dtype)
            stagnation_tol = default_stagnation_tol(dtype)
            description = (
                f"eqxdeq.ImplicitAdjoint() (default {describe_solver(linear_solver)})"
            )
        else:
            description = f"eqxdeq.ImplicitAdjoint({describe_solver(linear_solver)})"
        report = Report(
            description, self.on_failure, self.callback, self.probe, stagnation_tol
        )
        return implicit_apply(
            primal_fn,
            inputs,
            tags,
            linear_solver,
            precondition=False,
            report=report,
            # Root finds, minimisations, least squares: optimistix's own rewrite.
            rewrite_fn=None if is_fixed_point_rewrite(rewrite_fn) else rewrite_fn,
        )


ImplicitAdjoint.__init__.__doc__ = """**Arguments:**

- `linear_solver`: the lineax solver for the system in $I - \\partial_y f$. Default
    `None`: `eqxdeq.GMRES(rtol=tol, atol=0)` (restart 20), with
    $\\|(I - \\partial_y f)^\\top w - \\bar y\\|_2 \\le$ `tol` $\\|\\bar y\\|_2$ for
    `tol = 1e-12` in float64, `1e-5` in float32 and `4 ε` in 16-bit dtypes
    (ε = machine epsilon). In float32 that is the order of a typical forward
    tolerance: the gradient is then about as accurate as the fixed point it is taken
    at (pass e.g. `eqxdeq.GMRES(rtol=1e-6, atol=0)` for more). A stagnation of this
    default solver at a relative residual below $\\sqrt{ε}$ counts as success; a
    linear solver you pass is held to its own tolerance.
- `on_failure`: what a failed backward solve does: `"raise"` (default), `"nan"`
    (NaN gradients; reverse mode only) or `"jfb"` (the JFB gradient). Keyword only.
- `callback`: `None` (default), or a function called on the host with the
    [`eqxdeq.BackwardStats`][] of every backward solve (under `vmap`: once, with
    batched fields). Keyword only.
- `probe`: `None` (default), or a zero [`eqxdeq.BackwardStats`][] (from
    `eqxdeq.BackwardStats.probe()`) whose gradient becomes the statistics of the
    backward solves. Keyword only.
"""

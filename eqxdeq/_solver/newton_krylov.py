from collections.abc import Callable

import lineax as lx
import optimistix as optx
from jaxtyping import PyTree, Scalar

from .._custom_types import Aux, Y
from .._descent import NewtonKrylovDescent
from .._termination import Termination
from .._validation import check_newton_krylov_arguments
from ._base import AbstractDescentSearchSolver, check_solver_fields
from ._common import COMMON_ARGUMENTS_DOC, make_search


class NewtonKrylov(AbstractDescentSearchSolver[Y, Aux]):
    r"""Inexact Newton–Krylov on $g(y) = f(y) - y$, globalised by pseudo-transient
    continuation (default) or by a derivative-free line search.

    Each step solves $(\Delta t_k^{-1} I + I - \partial f/\partial y)\,d = g$
    approximately with a lineax Krylov solver (GMRES by default) using
    Jacobian-vector products only, to the Eisenstat–Walker forcing tolerance
    ([`eqxdeq.NewtonKrylovDescent`][]), and steps to $y + d$.

    - **Pseudo-transient continuation** (default, `pseudo_time_step=1.0`): $y + d$ is
        an implicit-Euler step of $\dot y = f(y) - y$ whose step $\Delta t_k$ grows
        as the residual falls ($\Delta t_k = \Delta t_0 \|g_0\| / \|g_k\|$), from
        a damped Picard step to the Newton step. Every step is taken.
    - **Line search** (`pseudo_time_step=None, line_search=True`): the Newton
        direction ($\Delta t = \infty$), backtracked on $\|g\|$
        ([`eqxdeq.DerivativeFreeBacktracking`][]).
    - **Local Newton** (`pseudo_time_step=None`): full Newton steps; quadratic
        convergence from a good initial guess, divergence from a bad one.

    Unlike Picard, Anderson and Broyden it does not need $f$ to be a contraction:
    it converges to fixed points at which $\partial f/\partial y$ has eigenvalues
    outside the unit circle, which is what a DEQ meets when training makes the layer
    non-contractive. Pseudo-transient continuation finds the fixed points that are
    stable steady states of $\dot y = f(y) - y$ (eigenvalues of
    $\partial f/\partial y$ with real part below 1; those beyond $-1$ make Picard
    oscillate); a line search on $\|g\|$ is drawn to any point where $\|g\|$ has a
    local minimum, including where $I - \partial f/\partial y$ is singular, and
    fails far more often on such layers; on a contraction the line-search variant
    needs a few evaluations fewer (the solver guide has the measurements).

    Cost: one evaluation of $f$ per step, through `jax.linearize` (slightly dearer
    than a plain call, and it keeps the linearisation's residuals in memory), plus
    the Jacobian-vector products of the Krylov solve, reported separately as
    `sol.stats["num_jvps"]` (each costs about as much as an evaluation of $f$).
    Solve per sample (`jax.vmap` over the batch) rather than on a batched state: a
    shared pseudo-time step and Krylov solve for a whole batch converge much more
    slowly.
    """

    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar]
    descent: NewtonKrylovDescent
    search: optx.AbstractSearch
    termination: Termination
    return_best: bool
    history_length: int

    def __init__(
        self,
        rtol: float,
        atol: float,
        norm: Callable[[PyTree], Scalar] = optx.max_norm,
        linear_solver: lx.AbstractLinearSolver = NewtonKrylovDescent.linear_solver,
        forcing: str | float = "eisenstat-walker",
        pseudo_time_step: float | None = 1.0,
        *,
        line_search: bool = False,
        termination: Termination = Termination(),
        return_best: bool = True,
        history_length: int = 0,
    ):
        check_newton_krylov_arguments(forcing, pseudo_time_step, line_search)
        if line_search is True and pseudo_time_step is not None:
            raise ValueError(
                "`NewtonKrylov(line_search=True)` backtracks along the Newton "
                "direction, so it needs `pseudo_time_step=None`; pseudo-transient "
                "continuation is a globalisation of its own (combined, a line search "
                "on the residual undoes the continuation's progress through regions "
                "where the residual grows). For that combination anyway, use "
                "`eqxdeq.DescentSearchSolver(descent=eqxdeq.NewtonKrylovDescent("
                "pseudo_time_step=...), search=eqxdeq.DerivativeFreeBacktracking())`."
            )
        self.rtol = rtol
        self.atol = atol
        self.norm = norm
        self.descent = NewtonKrylovDescent(
            linear_solver, forcing, pseudo_time_step=pseudo_time_step
        )
        self.search = make_search("NewtonKrylov", 1.0, line_search)
        self.termination = termination
        self.return_best = return_best
        self.history_length = history_length

    def __check_init__(self):
        check_solver_fields(self, "NewtonKrylov")


NewtonKrylov.__init__.__doc__ = (
    """**Arguments:**

- `rtol`, `atol`, `norm`: as for [`eqxdeq.Picard`][].
- `linear_solver`: `lineax.GMRES` (default: `restart=10`, `max_steps=6`) or
    `lineax.BiCGStab`; its tolerances are set by the forcing term.
- `forcing`: `"eisenstat-walker"` (default) or a constant relative tolerance of the
    Krylov solves.
- `pseudo_time_step`: $\\Delta t_0$, the pseudo-time step at the initial residual
    (default 1.0); `None` for Newton steps. Smaller values follow the ODE's flow
    more closely (more robust, more steps: 0.1 took 3-6 times as many evaluations
    as 1.0 in the benchmarks), larger values approach Newton sooner.
- `line_search`: with `pseudo_time_step=None`, backtrack along the Newton direction
    on the residual (default `False`).
"""
    + COMMON_ARGUMENTS_DOC
)

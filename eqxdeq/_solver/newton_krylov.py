from collections.abc import Callable

import lineax as lx
import optimistix as optx
from jaxtyping import PyTree, Scalar

from .._custom_types import Aux, Y
from .._descent import NewtonKrylovDescent
from .._termination import Termination
from ._base import AbstractDescentSearchSolver, check_solver_fields
from ._common import COMMON_ARGUMENTS_DOC, make_search


class NewtonKrylov(AbstractDescentSearchSolver[Y, Aux]):
    r"""Inexact Newton–Krylov on $g(y) = f(y) - y$, globalised by a derivative-free
    line search.

    Each step solves $(I - \partial f/\partial y)\,d = g$ approximately with a
    lineax Krylov solver (GMRES by default) using Jacobian-vector products only,
    to the Eisenstat–Walker forcing tolerance
    ([`eqxdeq.NewtonKrylovDescent`][]), then backtracks along $d$
    ([`eqxdeq.DerivativeFreeBacktracking`][]).

    Unlike Picard, Anderson and Broyden it does not need $f$ to be a contraction:
    it converges to fixed points at which $\partial f/\partial y$ has eigenvalues
    outside the unit circle (as long as $I - \partial f/\partial y$ is
    nonsingular), which is what a DEQ meets when training makes the layer
    non-contractive.

    Cost: one evaluation of $f$ per step, through `jax.linearize` (slightly dearer
    than a plain call, and it keeps the linearisation's residuals in memory), plus
    the Jacobian-vector products of the Krylov solve, reported separately as
    `sol.stats["num_jvps"]` (each costs about as much as an evaluation of $f$).
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
        pseudo_time_step: float | None = None,
        *,
        line_search: bool = True,
        termination: Termination = Termination(),
        return_best: bool = True,
        history_length: int = 0,
    ):
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
- `line_search`: backtrack on the residual (default `True`; without it this is a
    local method that can diverge from a poor initial guess).
"""
    + COMMON_ARGUMENTS_DOC
)

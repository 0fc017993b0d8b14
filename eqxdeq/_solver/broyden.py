from collections.abc import Callable

import optimistix as optx
from jaxtyping import PyTree, Scalar

from .._custom_types import Aux, Y
from .._descent import BroydenDescent
from .._termination import Termination
from ._base import AbstractDescentSearchSolver, check_solver_fields
from ._common import COMMON_ARGUMENTS_DOC, make_search


class Broyden(AbstractDescentSearchSolver[Y, Aux]):
    r"""Limited-memory "good" Broyden's method on $g(y) = f(y) - y$.

    A quasi-Newton method: [`eqxdeq.BroydenDescent`][] keeps a low-rank estimate of
    the inverse Jacobian of $g$ in fixed-size buffers (reset when full) and steps
    along $-H g$. The search is a unit step, or with `line_search=True`
    [`eqxdeq.DerivativeFreeBacktracking`][] (Armijo-like on $\tfrac12\|g\|^2$),
    which globalises it on hard problems at the cost of extra evaluations of $f$
    when trials are rejected.

    The final inverse-Jacobian estimate is available to [`eqxdeq.ShineAdjoint`][].
    """

    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar]
    descent: BroydenDescent
    search: optx.AbstractSearch
    termination: Termination
    return_best: bool
    history_length: int

    def __init__(
        self,
        rtol: float,
        atol: float,
        norm: Callable[[PyTree], Scalar] = optx.max_norm,
        memory: int | None = None,
        *,
        line_search: bool = False,
        termination: Termination = Termination(),
        return_best: bool = True,
        history_length: int = 0,
    ):
        self.rtol = rtol
        self.atol = atol
        self.norm = norm
        if memory is None:
            # Measured on the benchmark layers (benchmarks/bench_history.py and the
            # guide "Choosing a solver"): 8 is best for unit steps, 16 with the line
            # search (8 needed up to 1.5x the evaluations there).
            memory = 16 if line_search is True else 8
        self.descent = BroydenDescent(memory)
        self.search = make_search("Broyden", 1.0, line_search)
        self.termination = termination
        self.return_best = return_best
        self.history_length = history_length

    def __check_init__(self):
        check_solver_fields(self, "Broyden")


Broyden.__init__.__doc__ = (
    """**Arguments:**

- `rtol`, `atol`, `norm`: as for [`eqxdeq.Picard`][].
- `memory`: the number of rank-one updates kept before the estimate resets to $-I$.
    Default: 8, or 16 with `line_search=True`.
- `line_search`: use [`eqxdeq.DerivativeFreeBacktracking`][].
"""
    + COMMON_ARGUMENTS_DOC
)

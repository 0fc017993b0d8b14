from collections.abc import Callable

import optimistix as optx
from jaxtyping import PyTree, Scalar

from .._custom_types import Aux, Y
from .._descent import AndersonDescent
from .._termination import Termination
from ._base import AbstractDescentSearchSolver, check_solver_fields
from ._common import COMMON_ARGUMENTS_DOC, make_search


class Anderson(AbstractDescentSearchSolver[Y, Aux]):
    r"""Anderson-accelerated fixed-point iteration.

    Mixes the last `memory` iterates to minimise the linearised residual, then takes
    a relaxed step; see [`eqxdeq.AndersonDescent`][] for the maths, the relative
    ridge regularisation and the restart safeguard. The search is a unit step, or
    [`eqxdeq.DerivativeFreeBacktracking`][] with `line_search=True`.

    Typically needs several times fewer evaluations of $f$ than [`eqxdeq.Picard`][]
    on near-critical layers, for $O(m\,n)$ extra work per step ($n$ = size of $y$).
    """

    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar]
    descent: AndersonDescent
    search: optx.AbstractSearch
    termination: Termination
    return_best: bool
    history_length: int

    def __init__(
        self,
        rtol: float,
        atol: float,
        norm: Callable[[PyTree], Scalar] = optx.max_norm,
        memory: int = 8,
        relaxation: float = 1.0,
        regularisation: float = 1e-8,
        restart_factor: float | None = 1e2,
        *,
        line_search: bool = False,
        termination: Termination = Termination(),
        return_best: bool = True,
        history_length: int = 0,
    ):
        self.rtol = rtol
        self.atol = atol
        self.norm = norm
        self.descent = AndersonDescent(
            memory, relaxation, regularisation, restart_factor
        )
        self.search = make_search("Anderson", 1.0, line_search)
        self.termination = termination
        self.return_best = return_best
        self.history_length = history_length

    def __check_init__(self):
        check_solver_fields(self, "Anderson")


Anderson.__init__.__doc__ = (
    """**Arguments:**

- `rtol`, `atol`, `norm`: as for [`eqxdeq.Picard`][].
- `memory`: the history depth $m \\ge 1$ (default 8).
- `relaxation`: the weight $\\beta \\in (0, 1]$ on $f$ in the mixed update.
- `regularisation`: the ridge on the small least-squares problem, relative to the mean
    diagonal of its Gram matrix.
- `restart_factor`: clear the history when the residual grows by more than this
    factor in one step (`None` disables the safeguard).
- `line_search`: use [`eqxdeq.DerivativeFreeBacktracking`][] on each mixed step.
"""
    + COMMON_ARGUMENTS_DOC
)

from collections.abc import Callable

import optimistix as optx
from jaxtyping import PyTree, Scalar

from .._custom_types import Aux, Y
from .._termination import Termination
from ._base import AbstractDescentSearchSolver, check_solver_fields
from ._common import COMMON_ARGUMENTS_DOC


class DescentSearchSolver(AbstractDescentSearchSolver[Y, Aux]):
    """A fixed-point solver assembled from any descent and any search.

    The named solvers are instances of this loop with particular pieces; use this
    class to combine them differently, e.g. the Broyden direction with fixed damping,
    or Anderson mixing with backtracking:

    ```python
    solver = eqxdeq.DescentSearchSolver(
        rtol=1e-5,
        atol=1e-5,
        descent=eqxdeq.BroydenDescent(memory=8),
        search=optx.LearningRate(0.5),
    )
    ```

    The descent receives [`optimistix.FunctionInfo.Residual`][] with residual
    `f(y) - y`, and must return the step to add to `y`; the search receives the same
    for the accepted point and the trial.
    """

    rtol: float
    atol: float
    descent: optx.AbstractDescent
    search: optx.AbstractSearch
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    termination: Termination = Termination()
    return_best: bool = True
    history_length: int = 0

    def __check_init__(self):
        check_solver_fields(self, "DescentSearchSolver")
        if not isinstance(self.descent, optx.AbstractDescent):
            raise ValueError(
                "`DescentSearchSolver(descent=...)` must be an "
                "`optimistix.AbstractDescent`."
            )
        if not isinstance(self.search, optx.AbstractSearch):
            raise ValueError(
                "`DescentSearchSolver(search=...)` must be an "
                "`optimistix.AbstractSearch`."
            )


DescentSearchSolver.__init__.__doc__ = (
    """**Arguments:**

- `rtol`, `atol`, `norm`: as for [`eqxdeq.Picard`][].
- `descent`: an [`optimistix.AbstractDescent`][] accepting
    [`optimistix.FunctionInfo.Residual`][], e.g. [`eqxdeq.PicardDescent`][],
    [`eqxdeq.AndersonDescent`][], [`eqxdeq.BroydenDescent`][].
- `search`: an [`optimistix.AbstractSearch`][] accepting the same, e.g.
    [`optimistix.LearningRate`][] or [`eqxdeq.DerivativeFreeBacktracking`][].
"""
    + COMMON_ARGUMENTS_DOC
)

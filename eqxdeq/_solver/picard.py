from collections.abc import Callable

import optimistix as optx
from jaxtyping import PyTree, Scalar

from .._custom_types import Aux, Y
from .._descent import PicardDescent
from .._termination import Termination
from ._base import AbstractDescentSearchSolver, check_solver_fields
from ._common import COMMON_ARGUMENTS_DOC, make_search


class Picard(AbstractDescentSearchSolver[Y, Aux]):
    r"""Fixed-point (Picard) iteration with relaxation:
    $y \leftarrow (1 - \beta)\,y + \beta f(y)$.

    The descent is [`eqxdeq.PicardDescent`][] and the search fixed damping
    ([`optimistix.LearningRate`][]`(β)`) or, with `line_search=True`,
    [`eqxdeq.DerivativeFreeBacktracking`][] starting from $\beta$.

    Converges linearly at the rate of the spectral radius of
    $(1-\beta) I + \beta\,\partial f/\partial y$ when that is below 1; for
    near-critical layers prefer [`eqxdeq.Anderson`][] or [`eqxdeq.Broyden`][].

    !!! info "Damping conventions"

        `relaxation` is the weight on $f(y)$. optimistix's
        `FixedPointIteration(damp=d)` is `relaxation = 1 - d`; banax's `damp` and
        torchdeq's `tau` are `relaxation` itself.
    """

    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar]
    descent: PicardDescent
    search: optx.AbstractSearch
    termination: Termination
    return_best: bool
    history_length: int

    def __init__(
        self,
        rtol: float,
        atol: float,
        norm: Callable[[PyTree], Scalar] = optx.max_norm,
        relaxation: float = 1.0,
        *,
        line_search: bool = False,
        termination: Termination = Termination(),
        return_best: bool = True,
        history_length: int = 0,
    ):
        self.rtol = rtol
        self.atol = atol
        self.norm = norm
        self.descent = PicardDescent()
        self.search = make_search("Picard", relaxation, line_search)
        self.termination = termination
        self.return_best = return_best
        self.history_length = history_length

    def __check_init__(self):
        check_solver_fields(self, "Picard")


Picard.__init__.__doc__ = (
    """**Arguments:**

- `rtol`: relative tolerance for terminating the solve.
- `atol`: absolute tolerance for terminating the solve.
- `norm`: the norm used in the termination criterion; any `PyTree -> Scalar`, e.g.
    [`optimistix.max_norm`][] (default), [`optimistix.rms_norm`][],
    [`optimistix.two_norm`][].
- `relaxation`: the weight $\\beta \\in (0, 1]$ on $f(y)$ (1 = plain iteration).
- `line_search`: backtrack on the residual ([`eqxdeq.DerivativeFreeBacktracking`][])
    instead of taking the fixed step $\\beta$.
"""
    + COMMON_ARGUMENTS_DOC
)

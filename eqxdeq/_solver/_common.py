import optimistix as optx

from .._search import DerivativeFreeBacktracking
from .._validation import check_real, describe


COMMON_ARGUMENTS_DOC = """- `termination`: an [`eqxdeq.Termination`][]: the stopping
    criterion (`"elementwise"`, optimistix's, or `"norm"`, the DEQ convention) and
    the divergence and stall detection.
- `return_best`: if the solve does not converge (it diverges, stalls or runs out of
    steps), return the iterate with the smallest residual $\\|f(y)-y\\|_2$ seen
    rather than the last accepted one (torchdeq's behaviour). A converged solve
    always returns its last iterate, the one that met the tolerance. Costs one extra
    copy of `y` and of the aux output. Default `True`.
- `history_length`: if positive, `sol.stats["residual_history"]` records
    $\\|f(y)-y\\|_2$ at the first `history_length` evaluations. Default 0 (no cost).
"""


def make_search(name: str, relaxation, line_search: bool) -> optx.AbstractSearch:
    """The search of a named solver: fixed damping, or backtracking from it."""
    check_real(name, "relaxation", relaxation, lower=0, lower_open=True, upper=1)
    if not isinstance(line_search, bool):
        raise ValueError(
            f"`{name}(line_search=...)` must be a bool, got {describe(line_search)}."
        )
    if line_search:
        return DerivativeFreeBacktracking(step_init=relaxation)
    return optx.LearningRate(relaxation)

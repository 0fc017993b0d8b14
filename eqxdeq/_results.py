import optimistix as optx


class RESULTS(optx.RESULTS):  # pyright: ignore
    """The outcomes of an eqxdeq solve: every [`optimistix.RESULTS`][] member, plus
    the reasons for which eqxdeq's "safe" termination ([`eqxdeq.Termination`][])
    stops a solve early:

    - `RESULTS.diverged`: the residual `|f(y) - y|` grew past
        `Termination(divergence_factor=...)` times its initial value, or became
        non-finite.
    - `RESULTS.stalled`: the best residual did not fall by a factor
        `1 - Termination(stall_tol=...)` within `Termination(stall_patience=...)`
        steps.

    `optx.fixed_point` reports `sol.result` as an `optimistix.RESULTS` (its loop cannot
    carry a subclass), where `diverged` and `stalled` both appear as
    `optimistix.RESULTS.nonlinear_divergence`. The precise reason is in
    `sol.stats["result"]`, an `eqxdeq.RESULTS`:

    ```python
    sol = optx.fixed_point(fn, eqxdeq.Anderson(1e-5, 1e-5), y0, throw=False)
    print(eqxdeq.RESULTS[sol.stats["result"]])
    ```
    """

    diverged = (
        "The fixed-point iteration diverged: the residual `|f(y) - y|` grew by more "
        "than `Termination(divergence_factor=...)` times its initial value, or became "
        "non-finite. Try a smaller `relaxation`, a line search, a stronger solver "
        "(`Anderson`, `Broyden`), or make the layer more contractive (e.g. with a "
        "Jacobian penalty). The best iterate seen so far is returned."
    )
    stalled = (
        "The fixed-point iteration stalled: the best residual did not decrease by a "
        "factor `(1 - Termination(stall_tol=...))` within "
        "`Termination(stall_patience=...)` steps. The problem may have no fixed point "
        "near `y0`, or the tolerances may be below what this dtype can resolve. The "
        "best iterate seen so far is returned."
    )

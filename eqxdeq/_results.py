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

    The backward pass has its own members:

    - `RESULTS.linear_solve_diverged`: in `stats["result"]` of a linear solve with
        [`eqxdeq.Neumann`][] or [`eqxdeq.Richardson`][], whose series or iteration
        grew (lineax's own result cannot say so).
    - `RESULTS.backward_*`: the outcome of the backward (adjoint) solve of an eqxdeq
        adjoint, in its [`eqxdeq.BackwardStats`][] and in the message it raises
        (which also names the adjoint and its linear solver). See the
        [failures guide](../guides/failures.md).
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

    # The linear solves of eqxdeq's own linear solvers, used anywhere.
    linear_solve_diverged = (
        "The linear solve diverged: the terms of the Neumann series (`eqxdeq.Neumann`) "
        "or the residuals of the Richardson iteration (`eqxdeq.Richardson`) grew "
        "instead of shrinking, or became non-finite. Both converge only if the "
        "spectral radius of `I - damping * A` is below 1. Use a smaller `damping`, or "
        "a Krylov solver such as `eqxdeq.GMRES`, which does not need that."
    )

    # The backward (adjoint) linear solve of an eqxdeq adjoint. When raised, each
    # message is prefixed by the adjoint and its linear solver.
    backward_diverged = (
        "The backward (adjoint) linear solve diverged: the terms of its series or the "
        "residuals of its iteration grew instead of shrinking, or became non-finite. "
        "The spectral radius of ∂f/∂y at the fixed point is probably ≥ 1 (for a "
        "damping τ: of I - τ (I - ∂f/∂y)), so Neumann series, Richardson iteration "
        "and phantom gradients cannot converge. Use `eqxdeq.GMRES` (the default of "
        "`eqxdeq.ImplicitAdjoint()`), a smaller `damping`, or keep the layer "
        "contractive during training (a Jacobian penalty, "
        "`eqxdeq.regularization.jacobian_frobenius`, or spectral normalisation); "
        "`on_failure='jfb'` falls back to the JFB gradient instead of raising."
    )
    backward_max_steps_reached = (
        "The backward (adjoint) linear solve did not reach its tolerance within its "
        "`max_steps`. Increase the linear solver's `max_steps`, or loosen its `rtol`/"
        "`atol` (the gradient is no more accurate than the forward fixed point: about "
        "the forward tolerance is enough). Richardson and Neumann converge only if "
        "the spectral radius of ∂f/∂y at the fixed point is below 1, and slowly near "
        "1: use `eqxdeq.GMRES` there. `on_failure='jfb'` falls back to the JFB "
        "gradient instead of raising."
    )
    backward_stagnation = (
        "The backward (adjoint) linear solve stagnated: the residual of the Krylov "
        "solver (GMRES, BiCGStab) stopped decreasing above its tolerance. Usually the "
        "tolerance is below what the dtype resolves (in float32 use `rtol`/`atol` "
        "around 1e-5 to 1e-4, one order below the forward tolerance), or the system "
        "`I - ∂f/∂y` is nearly singular (a fixed point close to unstable). Loosen the "
        "tolerances, increase `restart` and `stagnation_iters`, or keep the layer "
        "contractive during training; `on_failure='jfb'` falls back to the JFB "
        "gradient instead of raising."
    )
    backward_breakdown = (
        "The backward (adjoint) linear solve broke down (an iterative breakdown of a "
        "Krylov solver). Use another linear solver (e.g. `eqxdeq.GMRES` with a larger "
        "`restart`), or `on_failure='jfb'` to fall back to the JFB gradient."
    )
    backward_singular = (
        "The backward (adjoint) linear solve returned non-finite values: "
        "`I - ∂f/∂y` is singular or nearly so at the fixed point (an eigenvalue of "
        "∂f/∂y at or near 1: the fixed point is not isolated, or is close to losing "
        "stability). Keep the layer contractive during training (a Jacobian penalty, "
        "spectral normalisation), or use `on_failure='jfb'`."
    )
    backward_nonfinite_cotangent = (
        "The cotangent entering the backward (adjoint) linear solve is non-finite "
        "(NaN or inf): the gradient of the loss with respect to the fixed point is "
        "already non-finite, so the bug is downstream of the DEQ (in the loss or the "
        "layers after it), not in the backward solve. (`on_failure='jfb'` cannot "
        "repair this; `on_failure='nan'` returns NaN gradients.)"
    )
    backward_failed = (
        "The backward (adjoint) linear solve failed (see the linear solver's own "
        "message in `lineax.RESULTS`). Use another linear solver (e.g. "
        "`eqxdeq.GMRES`), or `on_failure='jfb'` to fall back to the JFB gradient."
    )
    backward_reconstruction_overflow = (
        "The backward reconstruction overflowed: running the iterates of "
        "`eqxdeq.Reversible` backwards amplifies rounding errors geometrically in the "
        "number of steps between checkpoints. Keep more checkpoints "
        "(`eqxdeq.Reversible(checkpoints=...)`), take fewer steps, use a smaller "
        "`Reversible(relaxation=...)` or float64, or use `eqxdeq.ImplicitAdjoint()`."
    )
    backward_reconstruction_drifted = (
        "The backward reconstruction drifted: the iterates of `eqxdeq.Reversible` "
        "reconstructed backwards differ from the exact ones (at a checkpoint, or at "
        "`y0`) by more than the size of the iterates, so the gradient is not that of "
        "the forward iterations (rounding errors grow geometrically in the number of "
        "steps between checkpoints). Keep more checkpoints "
        "(`eqxdeq.Reversible(checkpoints=...)`), take fewer steps, use a smaller "
        "`Reversible(relaxation=...)` or float64, or use `eqxdeq.ImplicitAdjoint()`."
    )

from typing import Literal

import equinox as eqx
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Bool, Int, PyTree, Scalar

from ._misc import is_python_number, ω
from ._results import RESULTS


class Termination(eqx.Module):
    r"""When a fixed-point solve stops, besides running out of steps.

    With $g(y) = f(y) - y$ the residual at an accepted iterate $y$, and `rtol`, `atol`,
    `norm` taken from the solver:

    - `criterion="elementwise"` (optimistix's convention, the default) stops when
        `norm(g / (atol + rtol * |f(y)|)) < 1`, elementwise scaling as in
        [`optimistix.FixedPointIteration`][].
    - `criterion="norm"` (the DEQ convention) stops when
        `norm(g) <= atol + rtol * norm(f(y))`. With `norm=optimistix.two_norm`,
        `atol=0` gives torchdeq's `stop_mode="rel"` and `rtol=0` its `"abs"`.

    "Safe" termination (as NonlinearSolve.jl's) also stops a solve that cannot succeed:

    - divergence: the residual becomes non-finite, or exceeds `divergence_factor`
        times the residual at `y0` → [`eqxdeq.RESULTS.diverged`][eqxdeq.RESULTS];
    - stall: the best residual seen fails to drop by a factor `1 - stall_tol` within
        `stall_patience` consecutive steps → [`eqxdeq.RESULTS.stalled`][eqxdeq.RESULTS].

    Both return the best iterate seen so far when the solver has `return_best=True`.
    """

    criterion: Literal["elementwise", "norm"] = eqx.field(
        default="elementwise", static=True
    )
    divergence_factor: float | None = 1e4
    stall_patience: int | None = None
    stall_tol: float = 1e-3

    def __check_init__(self):
        if self.criterion not in ("elementwise", "norm"):
            raise ValueError(
                "`Termination(criterion=...)` must be 'elementwise' or 'norm', got "
                f"{self.criterion!r}."
            )
        if (
            self.divergence_factor is not None
            and is_python_number(self.divergence_factor)
            and not self.divergence_factor > 1
        ):
            raise ValueError(
                "`Termination(divergence_factor=...)` must be greater than 1 (or "
                "`None` to disable divergence detection)."
            )
        if self.stall_patience is not None and (
            not isinstance(self.stall_patience, int) or self.stall_patience < 1
        ):
            raise ValueError(
                "`Termination(stall_patience=...)` must be a positive integer (or "
                "`None` to disable stall detection)."
            )
        if is_python_number(self.stall_tol) and not 0 <= self.stall_tol < 1:
            raise ValueError("`Termination(stall_tol=...)` must be in [0, 1).")

    def converged(
        self, rtol, atol, norm, residual: PyTree[Array], fy: PyTree[Array]
    ) -> Bool[Array, ""]:
        """Whether the residual `residual = f(y) - y` at `f(y) = fy` is small enough."""
        if self.criterion == "elementwise":
            scale = (atol + rtol * ω(fy).call(jnp.abs)).ω
            return norm((residual**ω / scale**ω).ω) < 1
        else:
            return norm(residual) <= atol + rtol * norm(fy)

    def diverged(self, residual: Scalar, initial_residual: Scalar) -> Bool[Array, ""]:
        bad = jnp.invert(jnp.isfinite(residual))
        if self.divergence_factor is not None:
            bad = bad | (residual > self.divergence_factor * initial_residual)
        return bad

    def stall(
        self,
        best_residual: Scalar,
        stall_reference: Scalar,
        steps_since_progress: Int[Array, ""],
    ) -> tuple[Scalar, Int[Array, ""], Bool[Array, ""]]:
        """One step of stall detection given the best residual so far: the new
        `(stall_reference, steps_since_progress, stalled)`."""
        progress = best_residual < (1 - self.stall_tol) * stall_reference
        stall_reference = jnp.where(progress, best_residual, stall_reference)
        steps_since_progress = jnp.where(progress, 0, steps_since_progress + 1)
        if self.stall_patience is None:
            stalled = jnp.array(False)
        else:
            stalled = steps_since_progress >= self.stall_patience
        return stall_reference, steps_since_progress, stalled


def terminate_result(
    converged: Bool[Array, ""],
    diverged: Bool[Array, ""],
    stalled: Bool[Array, ""],
    num_steps: Int[Array, ""],
    options: dict,
) -> tuple[Bool[Array, ""], optx.RESULTS]:
    """`terminate` for every eqxdeq solver: stop when converged, diverged, stalled
    or past `options["step_budget"]` (compared with `num_steps`, the solver's own
    count of steps)."""
    out_of_budget = jnp.array(False)
    budget = options.get("step_budget", None)
    if budget is not None:
        out_of_budget = num_steps >= budget
    failed = diverged | stalled
    terminate = converged | failed | out_of_budget
    result = optx.RESULTS.where(
        converged,
        optx.RESULTS.successful,
        optx.RESULTS.where(
            failed,
            optx.RESULTS.nonlinear_divergence,
            optx.RESULTS.where(
                out_of_budget,
                optx.RESULTS.nonlinear_max_steps_reached,
                optx.RESULTS.successful,
            ),
        ),
    )
    return terminate, result


def detailed_result(result: optx.RESULTS, stalled: Bool[Array, ""]) -> RESULTS:
    """`sol.stats["result"]`: the loop's result with `nonlinear_divergence` split
    into eqxdeq's `diverged` and `stalled`."""
    return RESULTS.where(
        result == optx.RESULTS.nonlinear_divergence,
        RESULTS.where(stalled, RESULTS.stalled, RESULTS.diverged),
        RESULTS.promote(result),
    )


Termination.__init__.__doc__ = """**Arguments:**

- `criterion`: `"elementwise"` (default) or `"norm"`; see above.
- `divergence_factor`: declare divergence once the residual exceeds this multiple of
    its value at `y0`. `None` only catches non-finite residuals.
- `stall_patience`: declare a stall after this many consecutive steps without
    sufficient improvement of the best residual. `None` (default) disables it.
- `stall_tol`: the relative decrease of the best residual that counts as progress.
"""
